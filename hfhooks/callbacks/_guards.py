"""Refuse training setups in which a callback's gradient edits would silently do nothing."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["refuse_unsupported"]


def refuse_unsupported(args: Any, what: str) -> None:
    """Raise ``RuntimeError`` naming the alternative if ``args`` (TrainingArguments) selects DeepSpeed or FSDP1.

    Under DeepSpeed the optimizer steps inside ``backward`` and ``p.grad`` is ``None`` in callbacks, so gradient
    edits made there never reach the weights. FSDP1 flattens parameters, so per-parameter masks and hooks do
    not line up with what the optimizer sees.
    """
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in (
        "1",
        "true",
    ):
        raise RuntimeError(
            f"{what} does not support DeepSpeed: it steps the optimizer inside backward and keeps gradients "
            "partitioned, so gradient masks applied from callbacks would silently do nothing. Train with DDP "
            "(torchrun --nproc_per_node N your_script.py) or a single process instead."
        )
    fsdp = getattr(args, "fsdp", None)
    if fsdp and fsdp not in ("", [], False):
        raise RuntimeError(
            f"{what} does not support FSDP via TrainingArguments(fsdp=...): flattened parameters do not line up "
            "with per-parameter masks. Train with DDP (torchrun --nproc_per_node N) instead."
        )
