"""Trainer callbacks: thin adapters that wire the core into ``transformers.Trainer``'s lifecycle."""

from hfhooks.callbacks._state import CallbackStateError
from hfhooks.callbacks.attribution import AttributionAlignmentCallback
from hfhooks.callbacks.evaluation import UnlearningEvalCallback
from hfhooks.callbacks.gradient_mask import GradientMaskCallback
from hfhooks.callbacks.restoration import LayerRestorationCallback
from hfhooks.callbacks.routing import GradientRoutingCallback
from hfhooks.callbacks.unlearning import SaliencyUnlearningCallback

__all__ = [
    "AttributionAlignmentCallback",
    "CallbackStateError",
    "GradientMaskCallback",
    "GradientRoutingCallback",
    "LayerRestorationCallback",
    "SaliencyUnlearningCallback",
    "UnlearningEvalCallback",
]
