"""Refuse training setups in which a callback's gradient edits would silently do nothing."""

from __future__ import annotations

import os
from typing import Any

from hfhooks.core.params import is_dtensor

__all__ = [
    "deepspeed_zero_stage",
    "fsdp_version",
    "has_dtensors",
    "has_fused_lm_head",
    "refuse_lossless_outputs",
    "refuse_step_in_backward",
    "refuse_unsupported",
    "uses_deepspeed",
]

_TRUE = ("1", "true", "yes")


def fsdp_version(args: Any, model: Any = None) -> int | None:
    """The FSDP version in use: ``None`` (no FSDP), ``1`` or ``2``.

    Read from ``args`` (TrainingArguments) first — transformers ≥ 5 defaults ``fsdp_config["version"]`` to 2
    (``fully_shard``), older releases to 1 — then from what ``accelerate launch --use_fsdp`` exports
    (``ACCELERATE_USE_FSDP``, and ``FSDP_VERSION`` since accelerate 1.6; absent means 1, the only version of
    accelerate < 1.6), where the Trainer's ``Accelerator`` builds its FSDP plugin from the environment although
    ``args.fsdp`` is empty; finally from ``model``: a ``FullyShardedDataParallel`` wrapper anywhere in it is
    FSDP1.
    """
    fsdp = getattr(args, "fsdp", None)
    if not fsdp or fsdp in ("", []):
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
            version = os.environ.get("FSDP_VERSION", "1").strip() or "1"
            if version not in ("1", "2"):
                raise RuntimeError(f"FSDP_VERSION={version!r} in the environment: expected '1' or '2'.")
            return int(version)
        if model is not None and _has_fsdp1_wrapper(model):
            return 1
        return None
    config = getattr(args, "fsdp_config", None) or {}
    import transformers

    default = 2 if int(transformers.__version__.split(".")[0]) >= 5 else 1
    return int(config.get("version", config.get("fsdp_version", default)))


def _has_fsdp1_wrapper(model: Any) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    modules = model.modules() if hasattr(model, "modules") else ()
    return any(isinstance(m, FullyShardedDataParallel) for m in modules)


def uses_deepspeed(args: Any) -> bool:
    """True if ``args`` (TrainingArguments) or ``accelerate launch --use_deepspeed`` select DeepSpeed."""
    return (
        bool(getattr(args, "deepspeed", None))
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE
    )


def deepspeed_zero_stage(args: Any, model: Any = None) -> int | None:
    """The DeepSpeed ZeRO stage in use (``0``–``3``; ``0`` also where it cannot be told), ``None`` without
    DeepSpeed.

    A ``model`` whose parameters DeepSpeed has partitioned (tagged ``ds_id`` by ``zero.Init`` or the engine) is
    ZeRO-3 whatever the arguments say. Otherwise the stage is read from ``args.hf_deepspeed_config`` (what
    ``TrainingArguments(deepspeed=...)`` parses), then from what ``accelerate launch --use_deepspeed
    --zero_stage N`` exports (``ACCELERATE_DEEPSPEED_ZERO_STAGE``); failing both, parameters linked to ZeRO-1/2
    fp32 masters (tagged ``_hp_mapping`` once the engine is built) give ``2``.
    """
    params = list(model.parameters()) if model is not None and hasattr(model, "parameters") else []
    if any(hasattr(p, "ds_id") for p in params):
        return 3
    if not uses_deepspeed(args):
        return None
    config = getattr(args, "hf_deepspeed_config", None)
    stage = config.get_value("zero_optimization.stage") if config is not None else None
    if stage in (None, "", "auto"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage not in (None, "", "auto") and int(stage) > 0:
        return int(stage)
    return 2 if any(hasattr(p, "_hp_mapping") for p in params) else 0


def has_dtensors(model: Any) -> bool:
    """True if any parameter of ``model`` is a DTensor (FSDP2 ``fully_shard`` or tensor parallel)."""
    return model is not None and any(is_dtensor(p) for p in model.parameters())


def refuse_unsupported(
    args: Any,
    what: str,
    fsdp2: bool = False,
    instead: str | None = None,
    model: Any = None,
    deepspeed: bool | str = False,
) -> None:
    """Raise ``RuntimeError`` naming the alternative if ``args`` (TrainingArguments) selects an engine ``what``
    cannot serve: DeepSpeed unless ``deepspeed=True`` (ZeRO-1/2/3, with or without offload; a string is the
    reason given when it is refused), FSDP1, or FSDP2 unless ``fsdp2=True``.

    Under DeepSpeed the optimizer steps inside ``backward``, ``p.grad`` is ``None`` in callbacks and the
    optimizer steps fp32 master copies of the weights, so gradient edits and weight writes made there never
    reach the weights unless the callback writes the masters too (see :mod:`hfhooks.freeze.deepspeed`). FSDP1 flattens parameters, so per-parameter masks and hooks do
    not line up with what the optimizer sees. FSDP2 keeps parameters per tensor (sharded DTensors), which
    callbacks whose core handles DTensors support; a ``model`` whose parameters are DTensors counts as FSDP2
    even when ``args`` does not say so. ``instead`` replaces the suggested alternative.
    """
    ddp = "Train with DDP (torchrun --nproc_per_node N your_script.py) or a single process instead."
    instead = instead or ddp
    if uses_deepspeed(args):
        if deepspeed is True:
            return
        why = deepspeed or (
            "DeepSpeed steps the optimizer inside backward on partitioned fp32 master copies of the weights, "
            f"outside what {what} reads and writes"
        )
        raise RuntimeError(f"{what} does not support DeepSpeed: {why}. {instead}")
    version = fsdp_version(args, model)
    if version is None and has_dtensors(model):
        version = 2  # sharded with fully_shard by the user, outside TrainingArguments
    if version == 1:
        raise RuntimeError(
            f"{what} does not support FSDP1 (TrainingArguments(fsdp=..., fsdp_config={{'version': 1}}), or "
            "accelerate launch --use_fsdp with FSDP_VERSION=1 / unset): flattened "
            "parameters do not line up with per-parameter masks. "
            + ("Use FSDP2 (fsdp_config={'version': 2}) instead." if fsdp2 else instead)
        )
    if version == 2 and not fsdp2:
        raise RuntimeError(
            f"{what} does not support FSDP2 yet: its hooks and tensors are not sharded with the parameters. "
            f"{instead}"
        )


# transformers' optimizers that update each parameter inside ``backward`` (``OptimizerNames`` values): LOMO and
# AdaLomo fuse the update into backward; the ``*_layerwise`` ones step per parameter from
# ``register_post_accumulate_grad_hook`` and hand the Trainer a dummy optimizer whose ``step()`` does nothing.
_STEP_IN_BACKWARD = ("lomo", "adalomo")


def refuse_step_in_backward(args: Any, what: str, optimizer: Any = None) -> None:
    """Raise ``RuntimeError`` if the optimizer updates the weights inside ``backward`` (LOMO, AdaLomo,
    layer-wise GaLore / APOLLO), where ``what`` needs a real ``optimizer.step()``: its step hooks (hard freeze,
    strict routing, unlearning's mask guarantee) would never run, and weight decay would move frozen coordinates
    unnoticed."""
    optim = str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", "")) or "").lower()
    cls = type(optimizer).__name__ if optimizer is not None else ""
    if (
        optim in _STEP_IN_BACKWARD
        or optim.endswith("_layerwise")
        or cls
        in (
            "Lomo",
            "AdaLomo",
            "LayerWiseDummyOptimizer",
        )
    ):
        raise RuntimeError(
            f"{what} does not support optim={optim or cls!r}: that optimizer updates the weights inside backward "
            "(there is no optimizer.step() to guard), so the masked coordinates would not be held. Use an "
            "optimizer with a separate step, e.g. optim='adamw_torch' (or 'adafactor' / 'adamw_bnb_8bit' to "
            "save memory)."
        )


def has_fused_lm_head(model: Any) -> bool:
    """Whether ``model``'s forward takes TRL's ``fused_lm_head`` flag (``trl.trainer.utils.add_fused_lm_head``,
    which ``SFTTrainer`` and ``DPOTrainer`` apply: that forward returns label log-probabilities, no logits).

    Read from the code of the bound forward and of the forwards it wraps (accelerate's mixed-precision
    wrapper keeps the previous one as ``model_forward`` / ``_original_forward``), not from the signature: TRL
    wraps its forward with ``functools.wraps``, so ``inspect.signature`` reports the original one.
    """
    from hfhooks.core.params import unwrap_model

    if model is None:
        return False
    for m in (model, unwrap_model(model)):
        for fn in (getattr(m, "forward", None), getattr(m, "_original_forward", None)):
            for _ in range(8):  # a short chain of wrappers; never loop forever on a cyclic one
                if fn is None:
                    break
                code = getattr(getattr(fn, "__func__", fn), "__code__", None)
                if (
                    code is not None
                    and "fused_lm_head" in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
                ):
                    return True
                fn = getattr(fn, "__wrapped__", None) or getattr(fn, "model_forward", None)
    return False


def refuse_lossless_outputs(
    args: Any, what: str, model: Any = None, per_example: bool = False, loss: str | None = None
) -> None:
    """Refuse, at ``on_train_begin`` (before any optimizer step), trainer options under which a callback that
    needs per-example side labels or the model's logits could not act.

    ``per_example``: the callback reads one label per example (routing, forget/retain flags, rationales), which
    TRL's packing / padding-free batches merge into one row. ``loss``: ``"logits"`` if it needs the full logits
    (Liger's fused linear cross-entropy drops them while training); ``"per_token"`` if it replaces the loss
    through TRL's fused LM head, which ``SFTConfig(loss_type='dft')`` reweights token by token.
    """
    if per_example and any(c.__name__ == "DPOConfig" for c in type(args).__mro__):
        raise ValueError(
            f"{what} needs one label per training example, but TRL's DPOTrainer ({type(args).__name__}) "
            "trains on preference pairs, each one a chosen and a rejected completion in the same batch, so "
            "per-example labels cannot line up with the model's batch. Use it with transformers.Trainer or TRL's "
            "SFTTrainer (GradientMaskCallback and LayerRestorationCallback do work under DPOTrainer)."
        )
    if per_example:
        for option in ("packing", "padding_free"):
            if getattr(args, option, False):
                raise ValueError(
                    f"{what} needs one label per example, but {option}=True (TRL's SFTConfig) concatenates "
                    "examples into shared rows, so per-example labels no longer line up with the batch. Set "
                    + (
                        "SFTConfig(packing=False, padding_free=False)."
                        if option == "packing"
                        else "SFTConfig(padding_free=False)."
                    )
                )
    if loss in ("logits", "per_token") and getattr(args, "use_liger_kernel", False):
        config = getattr(args, "liger_kernel_config", None) or {}
        if config.get("fused_linear_cross_entropy", True):
            raise ValueError(
                f"{what} needs the model's logits, but use_liger_kernel=True patches the forward with Liger's fused "
                "linear cross-entropy, which returns no logits while training. Pass use_liger_kernel=False, or "
                "liger_kernel_config={'fused_linear_cross_entropy': False} to keep Liger's other kernels."
            )
    if loss == "per_token" and getattr(args, "loss_type", None) == "dft" and has_fused_lm_head(model):
        raise ValueError(
            f"{what} replaces the training loss, but SFTConfig(loss_type='dft') reweights each token's "
            "log-probability by its probability, which would distort the replaced loss. Pass "
            "SFTConfig(loss_type='nll')."
        )
