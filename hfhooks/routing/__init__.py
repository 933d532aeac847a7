"""Gradient routing / SGTM: ``Router`` (``router``: per-batch masks, strict steps, dedicated masks, ablation,
logit calibration) and ``GradientRoutingCallback`` (``callback``)."""
