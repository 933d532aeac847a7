"""Gradient routing / SGTM: ``Router`` (``router``: per-batch gradient masks, activation routing, strict steps),
the dedicated parameters and what is done with them after training (``ablation``: ``dedicated_mask``,
``ablate``, ``calibrate_logits``), and ``GradientRoutingCallback`` (``callback``)."""
