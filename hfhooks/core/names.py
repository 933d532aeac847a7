"""Canonical parameter names: the one spelling every mask, score and diff is keyed by.

Training wraps models in containers that rename parameters (DDP adds ``module.``, ``torch.compile`` adds
``_orig_mod.``, PEFT adds ``base_model.model.`` and ``.base_layer``, FSDP1 and activation checkpointing add their
own segments). :func:`canonical_name` strips them, :func:`unwrap_model` peels the containers off a model, and
:func:`match_name` is the one pattern language (exact, glob, ``re:``) of every ``include`` / ``exclude``.
This module imports nothing from hfhooks: everything else builds on it.
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

__all__ = ["canonical_name", "match_name", "unwrap_model"]


# Leading segments added by outer wrappers. Order does not matter: they are stripped repeatedly.
_PREFIXES = (
    "module.",
    "_orig_mod.",
    "base_model.model.",
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
)


# Segments that inner wrappers insert anywhere in a name.
_INNER_SEGMENTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "base_layer"}


def canonical_name(name: str) -> str:
    """Return the canonical form of a parameter name as printed by a (possibly wrapped) model.

    Strips DDP / torch.compile / PEFT / FSDP1 / activation-checkpoint wrapper segments and PEFT's
    ``modules_to_save.<adapter>`` / ``original_module`` containers. LoRA adapter weights keep their own
    segment (``...q_proj.lora_A.default.weight``) since they do not exist in the base model.

    >>> canonical_name("module._orig_mod.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    >>> canonical_name("base_model.model.score.modules_to_save.default.weight")
    'score.weight'
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    parts = name.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if part in _INNER_SEGMENTS or part == "original_module":
            i += 1
        elif part == "modules_to_save" and i + 1 < len(parts):
            i += 2  # drop "modules_to_save.<adapter_name>"
        else:
            out.append(part)
            i += 1
    return ".".join(out)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DDP, DataParallel, FSDP1, DeepSpeed, torch.compile and PEFT containers off ``model`` and return the
    base model.

    The returned module is the one whose ``named_parameters()`` (after :func:`canonical_name`) define the
    canonical names. For a PeftModel this is the base transformers model with LoRA layers injected.
    """
    # accelerate's extract_model_from_parallel knows every wrapper its launchers add (DDP, DataParallel, FSDP1,
    # DeepSpeedEngine) and peft's get_base_model() the adapter containers. torch.compile's wrapper is peeled
    # here first: given a compiled model, accelerate re-wraps it by *assigning* the unwrapped module to the
    # compiled one's _orig_mod, which would change the user's model. Imported here, not at the top: the
    # torch-free readers (hfhooks mask info) import this module, and accelerate imports torch (0.13 s once
    # torch is loaded; transformers' models have usually imported it already).
    from accelerate.utils import extract_model_from_parallel

    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            model = model.get_base_model()  # PeftModel -> the transformers model with LoRA layers
        elif (
            hasattr(model, "peft_config")
            and hasattr(model, "base_model")
            and hasattr(model.base_model, "model")
        ):
            model = model.base_model.model  # a peft container without get_base_model (older peft)
        elif isinstance(getattr(model, "module", None), nn.Module) or "_orig_mod" in vars(model):
            # Every wrapper accelerate unwraps (DDP, DataParallel, DeepSpeedEngine, FSDP1) holds the model as
            # ``.module``. Called on anything else it would still import DeepSpeed where installed, to test for
            # its engine: +35 MB of resident memory and about a second, measured, for a model that has none.
            model = extract_model_from_parallel(model, keep_fp32_wrapper=True)
    return model


def match_name(pattern: str, name: str) -> bool:
    """Whether parameter ``name`` matches ``pattern``: exact, a glob (``*?[``), or ``re:<regex>`` (search)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name
