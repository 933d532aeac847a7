"""hfhooks: gradient masking, gradient routing, saliency unlearning, attribution alignment and layer
restoration for Hugging Face ``Trainer`` runs and plain PyTorch — via callbacks and module/tensor hooks only.

Layout: one folder per concept (``core``, ``masks``, ``io``, ``freeze``, ``routing``, ``unlearning``,
``attribution``, ``restoration``, ``diffs``, ``merging``, ``trainer``, ``cli``); see docs/architecture.md. Every
public name is importable from here. Names are resolved on first use (PEP 562), so ``import hfhooks`` and the ``hfhooks``
command start without importing torch or transformers; only what a program touches is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hfhooks._version import __version__

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "FORGET": "hfhooks.routing.router",
    "OBJECTIVES": "hfhooks.unlearning.objectives",
    "RETAIN": "hfhooks.routing.router",
    "SCORES": "hfhooks.masks.saliency",
    "UNLABELLED": "hfhooks.routing.router",
    "AlignmentConfig": "hfhooks.attribution.config",
    "ArtifactError": "hfhooks.io.artifacts",
    "AttributionAlignment": "hfhooks.attribution",
    "AttributionAlignmentCallback": "hfhooks.attribution.callback",
    "BaseMismatchError": "hfhooks.diffs",
    "CRCPrompt": "hfhooks.restoration.search",
    "CallbackStateError": "hfhooks.trainer.state",
    "Checkpoint": "hfhooks.io.checkpoints",
    "CheckpointError": "hfhooks.io.checkpoints",
    "Config": "hfhooks.core.config",
    "DiffFileError": "hfhooks.diffs",
    "GradientMask": "hfhooks.freeze.gradient_mask",
    "GradientMaskCallback": "hfhooks.freeze.callback",
    "GradientMaskConfig": "hfhooks.freeze.config",
    "GradientRoutingCallback": "hfhooks.routing.callback",
    "HookRecord": "hfhooks.core.hooks",
    "HubError": "hfhooks.io.hub",
    "LMUnlearningEvalCallback": "hfhooks.unlearning.eval_callback",
    "LMUnlearningEvalConfig": "hfhooks.unlearning.config",
    "LayerList": "hfhooks.core.blocks",
    "LayerRestorationCallback": "hfhooks.restoration.callback",
    "LossHook": "hfhooks.core.loss_hooks",
    "MaskFileError": "hfhooks.masks.mask",
    "MergeConfig": "hfhooks.merging",
    "MergeReport": "hfhooks.merging",
    "ParamIndex": "hfhooks.core.params",
    "ParamMask": "hfhooks.masks.mask",
    "RestorationConfig": "hfhooks.restoration.config",
    "RestorationSearch": "hfhooks.restoration.search",
    "RestoreReport": "hfhooks.restoration.restore",
    "Router": "hfhooks.routing.router",
    "RoutingConfig": "hfhooks.routing.config",
    "SalUnConfig": "hfhooks.unlearning.config",
    "SaliencyUnlearningCallback": "hfhooks.unlearning.callback",
    "Scores": "hfhooks.masks.saliency",
    "Tagged": "hfhooks.core.data",
    "TaggedCollator": "hfhooks.core.data",
    "TaggedDataset": "hfhooks.core.data",
    "UnknownParameterError": "hfhooks.core.params",
    "UnlearningEvalCallback": "hfhooks.unlearning.eval_callback",
    "UnlearningEvalConfig": "hfhooks.unlearning.config",
    "UnlearningObjective": "hfhooks.unlearning.objectives",
    "WeightDiff": "hfhooks.diffs",
    "ablate": "hfhooks.routing.ablation",
    "answer_probability": "hfhooks.unlearning.lm_evaluation",
    "answer_tokens": "hfhooks.unlearning.lm_evaluation",
    "attention_head_slices": "hfhooks.core.layers",
    "attribute": "hfhooks.attribution",
    "average_gap": "hfhooks.unlearning.evaluation",
    "calibrate_logits": "hfhooks.routing.ablation",
    "canonical_name": "hfhooks.core.names",
    "compute_saliency": "hfhooks.masks.saliency",
    "consensus_mask": "hfhooks.diffs",
    "consensus_merge": "hfhooks.diffs",
    "crc_prompts": "hfhooks.restoration.search",
    "crc_scores": "hfhooks.restoration.search",
    "dedicated_mask": "hfhooks.routing.ablation",
    "deletion_insertion": "hfhooks.attribution",
    "edit_checkpoint": "hfhooks.io.edit",
    "extraction_strength": "hfhooks.unlearning.lm_metrics",
    "faithfulness": "hfhooks.attribution",
    "find_layers": "hfhooks.core.blocks",
    "forget_quality": "hfhooks.unlearning.lm_metrics",
    "forget_retain_dataset": "hfhooks.unlearning.objectives",
    "generate_answers": "hfhooks.unlearning.lm_evaluation",
    "installed_hooks": "hfhooks.core.hooks",
    "knowledge_memorization": "hfhooks.unlearning.lm_evaluation",
    "layer_of": "hfhooks.core.blocks",
    "lm_reference": "hfhooks.unlearning.lm_evaluation",
    "lm_relearn_attack": "hfhooks.unlearning.lm_evaluation",
    "lm_unlearning_metrics": "hfhooks.unlearning.lm_evaluation",
    "load_crc_prompts": "hfhooks.restoration.search",
    "load_gguf": "hfhooks.io.gguf",
    "load_logit_bias": "hfhooks.routing.ablation",
    "load_recipe": "hfhooks.merging",
    "merge": "hfhooks.merging",
    "mia_efficacy": "hfhooks.unlearning.evaluation",
    "mia_scores": "hfhooks.unlearning.lm_evaluation",
    "min_k_percent": "hfhooks.unlearning.lm_metrics",
    "mlp_projections": "hfhooks.core.layers",
    "mlp_unit_slices": "hfhooks.core.layers",
    "model_fingerprint": "hfhooks.io.artifacts",
    "model_utility": "hfhooks.unlearning.lm_metrics",
    "priv_leak": "hfhooks.unlearning.lm_metrics",
    "reference_logprobs": "hfhooks.unlearning.objectives",
    "relearn_attack": "hfhooks.unlearning.evaluation",
    "remove_hooks": "hfhooks.core.hooks",
    "restore_layers": "hfhooks.restoration.restore",
    "rouge_l": "hfhooks.unlearning.lm_metrics",
    "rouge_scores": "hfhooks.unlearning.lm_evaluation",
    "routing_labels": "hfhooks.routing.router",
    "salun": "hfhooks.unlearning.objectives",
    "search_restoration": "hfhooks.restoration.search",
    "smollm2_path": "hfhooks.io.gguf",
    "tall_masks": "hfhooks.diffs",
    "tensor_fingerprint": "hfhooks.diffs",
    "topk_masks": "hfhooks.masks.topk",
    "truth_ratio": "hfhooks.unlearning.lm_metrics",
    "truth_ratio_score": "hfhooks.unlearning.lm_metrics",
    "truth_ratios": "hfhooks.unlearning.lm_evaluation",
    "unlearning_metrics": "hfhooks.unlearning.evaluation",
    "unwrap_model": "hfhooks.core.names",
    "verbatim_memorization": "hfhooks.unlearning.lm_evaluation",
}

__all__ = [
    "FORGET",
    "OBJECTIVES",
    "RETAIN",
    "SCORES",
    "UNLABELLED",
    "AlignmentConfig",
    "ArtifactError",
    "AttributionAlignment",
    "AttributionAlignmentCallback",
    "BaseMismatchError",
    "CRCPrompt",
    "CallbackStateError",
    "Checkpoint",
    "CheckpointError",
    "Config",
    "DiffFileError",
    "GradientMask",
    "GradientMaskCallback",
    "GradientMaskConfig",
    "GradientRoutingCallback",
    "HookRecord",
    "HubError",
    "LMUnlearningEvalCallback",
    "LMUnlearningEvalConfig",
    "LayerList",
    "LayerRestorationCallback",
    "LossHook",
    "MaskFileError",
    "MergeConfig",
    "MergeReport",
    "ParamIndex",
    "ParamMask",
    "RestorationConfig",
    "RestorationSearch",
    "RestoreReport",
    "Router",
    "RoutingConfig",
    "SalUnConfig",
    "SaliencyUnlearningCallback",
    "Scores",
    "Tagged",
    "TaggedCollator",
    "TaggedDataset",
    "UnknownParameterError",
    "UnlearningEvalCallback",
    "UnlearningEvalConfig",
    "UnlearningObjective",
    "WeightDiff",
    "__version__",
    "ablate",
    "answer_probability",
    "answer_tokens",
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
    "extraction_strength",
    "faithfulness",
    "find_layers",
    "forget_quality",
    "forget_retain_dataset",
    "generate_answers",
    "installed_hooks",
    "knowledge_memorization",
    "layer_of",
    "lm_reference",
    "lm_relearn_attack",
    "lm_unlearning_metrics",
    "load_crc_prompts",
    "load_gguf",
    "load_logit_bias",
    "load_recipe",
    "merge",
    "mia_efficacy",
    "mia_scores",
    "min_k_percent",
    "mlp_projections",
    "mlp_unit_slices",
    "model_fingerprint",
    "model_utility",
    "priv_leak",
    "reference_logprobs",
    "relearn_attack",
    "remove_hooks",
    "restore_layers",
    "rouge_l",
    "rouge_scores",
    "routing_labels",
    "salun",
    "search_restoration",
    "smollm2_path",
    "tall_masks",
    "tensor_fingerprint",
    "topk_masks",
    "truth_ratio",
    "truth_ratio_score",
    "truth_ratios",
    "unlearning_metrics",
    "unwrap_model",
    "verbatim_memorization",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hfhooks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from hfhooks.attribution import AttributionAlignment, attribute, deletion_insertion, faithfulness
    from hfhooks.attribution.callback import AttributionAlignmentCallback
    from hfhooks.attribution.config import AlignmentConfig
    from hfhooks.core.blocks import LayerList, find_layers, layer_of
    from hfhooks.core.config import Config
    from hfhooks.core.data import Tagged, TaggedCollator, TaggedDataset
    from hfhooks.core.hooks import HookRecord, installed_hooks, remove_hooks
    from hfhooks.core.layers import attention_head_slices, mlp_projections, mlp_unit_slices
    from hfhooks.core.loss_hooks import LossHook
    from hfhooks.core.names import canonical_name, unwrap_model
    from hfhooks.core.params import ParamIndex, UnknownParameterError
    from hfhooks.diffs import (
        BaseMismatchError,
        DiffFileError,
        WeightDiff,
        consensus_mask,
        consensus_merge,
        tall_masks,
        tensor_fingerprint,
    )
    from hfhooks.freeze.callback import GradientMaskCallback
    from hfhooks.freeze.config import GradientMaskConfig
    from hfhooks.freeze.gradient_mask import GradientMask
    from hfhooks.io.artifacts import ArtifactError, model_fingerprint
    from hfhooks.io.checkpoints import Checkpoint, CheckpointError
    from hfhooks.io.edit import edit_checkpoint
    from hfhooks.io.gguf import load_gguf, smollm2_path
    from hfhooks.io.hub import HubError
    from hfhooks.masks.mask import MaskFileError, ParamMask
    from hfhooks.masks.saliency import SCORES, Scores, compute_saliency
    from hfhooks.masks.topk import topk_masks
    from hfhooks.merging import MergeConfig, MergeReport, load_recipe, merge
    from hfhooks.restoration.callback import LayerRestorationCallback
    from hfhooks.restoration.config import RestorationConfig
    from hfhooks.restoration.restore import RestoreReport, restore_layers
    from hfhooks.restoration.search import (
        CRCPrompt,
        RestorationSearch,
        crc_prompts,
        crc_scores,
        load_crc_prompts,
        search_restoration,
    )
    from hfhooks.routing.ablation import ablate, calibrate_logits, dedicated_mask, load_logit_bias
    from hfhooks.routing.callback import GradientRoutingCallback
    from hfhooks.routing.config import RoutingConfig
    from hfhooks.routing.router import FORGET, RETAIN, UNLABELLED, Router, routing_labels
    from hfhooks.trainer.state import CallbackStateError
    from hfhooks.unlearning.callback import SaliencyUnlearningCallback
    from hfhooks.unlearning.config import SalUnConfig, UnlearningEvalConfig
    from hfhooks.unlearning.eval_callback import UnlearningEvalCallback
    from hfhooks.unlearning.evaluation import average_gap, mia_efficacy, relearn_attack, unlearning_metrics
    from hfhooks.unlearning.objectives import (
        OBJECTIVES,
        UnlearningObjective,
        forget_retain_dataset,
        reference_logprobs,
        salun,
    )
