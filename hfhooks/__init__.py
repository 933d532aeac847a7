"""hfhooks: gradient masking, attribution alignment, saliency unlearning and layer restoration for
Hugging Face ``Trainer`` runs and plain PyTorch — via callbacks and module/tensor hooks only.

The core (names, masks, scores) works without a Trainer; callbacks are thin adapters over it.
"""

from hfhooks._version import __version__
from hfhooks.artifacts import ArtifactError, model_fingerprint
from hfhooks.callbacks import GradientMaskCallback, GradientRoutingCallback
from hfhooks.data import Tagged, TaggedCollator, TaggedDataset
from hfhooks.freeze import GradientMask
from hfhooks.layers import (
    LayerList,
    attention_head_slices,
    find_layers,
    layer_of,
    mlp_projections,
    mlp_unit_slices,
)
from hfhooks.masks import MaskFileError, ParamMask
from hfhooks.params import ParamIndex, UnknownParameterError, canonical_name, unwrap_model
from hfhooks.routing import (
    FORGET,
    RETAIN,
    UNLABELLED,
    Router,
    ablate,
    calibrate_logits,
    dedicated_mask,
    routing_labels,
)
from hfhooks.saliency import SCORES, Scores, compute_saliency
from hfhooks.topk import topk_masks

__all__ = [
    "FORGET",
    "RETAIN",
    "SCORES",
    "UNLABELLED",
    "ArtifactError",
    "GradientMask",
    "GradientMaskCallback",
    "GradientRoutingCallback",
    "LayerList",
    "MaskFileError",
    "ParamIndex",
    "ParamMask",
    "Router",
    "Scores",
    "Tagged",
    "TaggedCollator",
    "TaggedDataset",
    "UnknownParameterError",
    "__version__",
    "ablate",
    "attention_head_slices",
    "calibrate_logits",
    "canonical_name",
    "compute_saliency",
    "dedicated_mask",
    "find_layers",
    "layer_of",
    "mlp_projections",
    "mlp_unit_slices",
    "model_fingerprint",
    "routing_labels",
    "topk_masks",
    "unwrap_model",
]
