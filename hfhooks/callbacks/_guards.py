"""Refuse training setups in which a callback's gradient edits would silently do nothing."""

from __future__ import annotations

import os
from typing import Any

from hfhooks.params import is_dtensor

__all__ = ["fsdp_version", "has_dtensors", "refuse_unsupported"]


def fsdp_version(args: Any) -> int | None:
    """The FSDP version ``args`` (TrainingArguments) selects: ``None`` (no FSDP), ``1`` or ``2``.

    transformers ≥ 5 defaults ``fsdp_config["version"]`` to 2 (``fully_shard``); older releases to 1.
    """
    fsdp = getattr(args, "fsdp", None)
    if not fsdp or fsdp in ("", []):
        return None
    config = getattr(args, "fsdp_config", None) or {}
    import transformers

    default = 2 if int(transformers.__version__.split(".")[0]) >= 5 else 1
    return int(config.get("version", config.get("fsdp_version", default)))


def has_dtensors(model: Any) -> bool:
    """True if any parameter of ``model`` is a DTensor (FSDP2 ``fully_shard`` or tensor parallel)."""
    return model is not None and any(is_dtensor(p) for p in model.parameters())


def refuse_unsupported(
    args: Any, what: str, fsdp2: bool = False, instead: str | None = None, model: Any = None
) -> None:
    """Raise ``RuntimeError`` naming the alternative if ``args`` (TrainingArguments) selects an engine ``what``
    cannot serve: DeepSpeed, FSDP1, or FSDP2 unless ``fsdp2=True``.

    Under DeepSpeed the optimizer steps inside ``backward`` and ``p.grad`` is ``None`` in callbacks, so gradient
    edits made there never reach the weights. FSDP1 flattens parameters, so per-parameter masks and hooks do
    not line up with what the optimizer sees. FSDP2 keeps parameters per tensor (sharded DTensors), which
    callbacks whose core handles DTensors support; a ``model`` whose parameters are DTensors counts as FSDP2
    even when ``args`` does not say so. ``instead`` replaces the suggested alternative.
    """
    ddp = "Train with DDP (torchrun --nproc_per_node N your_script.py) or a single process instead."
    instead = instead or ddp
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in (
        "1",
        "true",
    ):
        raise RuntimeError(
            f"{what} does not support DeepSpeed: it steps the optimizer inside backward and keeps gradients "
            f"partitioned, so gradient edits made from callbacks would silently do nothing. {instead}"
        )
    version = fsdp_version(args)
    if version is None and has_dtensors(model):
        version = 2  # sharded with fully_shard by the user, outside TrainingArguments
    if version == 1:
        raise RuntimeError(
            f"{what} does not support FSDP1 (TrainingArguments(fsdp=..., fsdp_config={{'version': 1}})): flattened "
            "parameters do not line up with per-parameter masks. "
            + ("Use FSDP2 (fsdp_config={'version': 2}) instead." if fsdp2 else instead)
        )
    if version == 2 and not fsdp2:
        raise RuntimeError(
            f"{what} does not support FSDP2 yet: its hooks and tensors are not sharded with the parameters. "
            f"{instead}"
        )
