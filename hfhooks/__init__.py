"""hfhooks: gradient masking, attribution alignment, saliency unlearning and layer restoration for
Hugging Face ``Trainer`` runs and plain PyTorch — via callbacks and module/tensor hooks only.

The core (names, masks, scores) works without a Trainer; callbacks are thin adapters over it.
"""

from hfhooks._version import __version__
from hfhooks.artifacts import ArtifactError, model_fingerprint
from hfhooks.attribution import AttributionAlignment, attribute, deletion_insertion, faithfulness
from hfhooks.callbacks import (
    AttributionAlignmentCallback,
    GradientMaskCallback,
    GradientRoutingCallback,
    LayerRestorationCallback,
    SaliencyUnlearningCallback,
    UnlearningEvalCallback,
)
from hfhooks.checkpoints import Checkpoint, CheckpointError, edit_checkpoint
from hfhooks.data import Tagged, TaggedCollator, TaggedDataset
from hfhooks.diffs import (
    BaseMismatchError,
    DiffFileError,
    WeightDiff,
    consensus_mask,
    consensus_merge,
    tall_masks,
    tensor_fingerprint,
)
from hfhooks.evaluation import (
    average_gap,
    mia_efficacy,
    relearn_attack,
    unlearning_metrics,
)
from hfhooks.freeze import GradientMask
from hfhooks.hooks import HookRecord, installed_hooks, remove_hooks
from hfhooks.hub import HubError
from hfhooks.layers import (
    LayerList,
    attention_head_slices,
    find_layers,
    layer_of,
    mlp_projections,
    mlp_unit_slices,
)
from hfhooks.loss_hooks import LossHook
from hfhooks.masks import MaskFileError, ParamMask
from hfhooks.params import ParamIndex, UnknownParameterError, canonical_name, unwrap_model
from hfhooks.restoration import (
    CRCPrompt,
    RestorationSearch,
    RestoreReport,
    crc_prompts,
    crc_scores,
    restore_layers,
    search_restoration,
)
from hfhooks.routing import (
    FORGET,
    RETAIN,
    UNLABELLED,
    Router,
    ablate,
    calibrate_logits,
    dedicated_mask,
    load_logit_bias,
    routing_labels,
)
from hfhooks.saliency import SCORES, Scores, compute_saliency
from hfhooks.topk import topk_masks
from hfhooks.unlearning import (
    OBJECTIVES,
    UnlearningObjective,
    forget_retain_dataset,
    reference_logprobs,
    salun,
)

__all__ = [
    "FORGET",
    "OBJECTIVES",
    "RETAIN",
    "SCORES",
    "UNLABELLED",
    "ArtifactError",
    "AttributionAlignment",
    "AttributionAlignmentCallback",
    "BaseMismatchError",
    "CRCPrompt",
    "Checkpoint",
    "CheckpointError",
    "DiffFileError",
    "GradientMask",
    "GradientMaskCallback",
    "GradientRoutingCallback",
    "HookRecord",
    "HubError",
    "LayerList",
    "LayerRestorationCallback",
    "LossHook",
    "MaskFileError",
    "ParamIndex",
    "ParamMask",
    "RestorationSearch",
    "RestoreReport",
    "Router",
    "SaliencyUnlearningCallback",
    "Scores",
    "Tagged",
    "TaggedCollator",
    "TaggedDataset",
    "UnknownParameterError",
    "UnlearningEvalCallback",
    "UnlearningObjective",
    "WeightDiff",
    "__version__",
    "ablate",
    "attention_head_slices",
    "attribute",
    "average_gap",
    "calibrate_logits",
    "canonical_name",
    "compute_saliency",
    "consensus_mask",
    "consensus_merge",
    "crc_prompts",
    "crc_scores",
    "dedicated_mask",
    "deletion_insertion",
    "edit_checkpoint",
    "faithfulness",
    "find_layers",
    "forget_retain_dataset",
    "installed_hooks",
    "layer_of",
    "load_logit_bias",
    "mia_efficacy",
    "mlp_projections",
    "mlp_unit_slices",
    "model_fingerprint",
    "reference_logprobs",
    "relearn_attack",
    "remove_hooks",
    "restore_layers",
    "routing_labels",
    "salun",
    "search_restoration",
    "tall_masks",
    "tensor_fingerprint",
    "topk_masks",
    "unlearning_metrics",
    "unwrap_model",
]
