"""Trainer callbacks: thin adapters that wire the core into ``transformers.Trainer``'s lifecycle."""

from hfhooks.callbacks.gradient_mask import GradientMaskCallback
from hfhooks.callbacks.routing import GradientRoutingCallback

__all__ = ["GradientMaskCallback", "GradientRoutingCallback"]
