"""Gradient masking: ``GradientMask`` (``gradient_mask``, the core: frozen coordinates stay bit-identical) and
its Trainer adapter ``GradientMaskCallback`` (``callback``)."""
