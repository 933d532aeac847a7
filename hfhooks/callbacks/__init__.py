"""Trainer callbacks: thin adapters that wire the core into ``transformers.Trainer``'s lifecycle."""

from hfhooks.callbacks.gradient_mask import GradientMaskCallback

__all__ = ["GradientMaskCallback"]
