"""LoRA adapters as weight diffs: ``ΔW = s·B·A`` per adapted module, from a ``PeftModel`` or an adapter directory.

The LoRA arithmetic itself (scaling, rsLoRA, rank / alpha patterns, ``modules_to_save``) is
:mod:`hfhooks.lora`; this module turns its per-module Δ into :class:`~hfhooks.diffs.WeightDiff` entries with
base fingerprints, for :meth:`WeightDiff.from_lora <hfhooks.diffs.WeightDiff.from_lora>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hfhooks.diffs.arithmetic import _between_entry
from hfhooks.diffs.entries import _dense_entry, tensor_fingerprint
from hfhooks.diffs.source import _Source
from hfhooks.params import ParamIndex, UnknownParameterError

if TYPE_CHECKING:
    from hfhooks.diffs.core import WeightDiff


def _lora_from_model(model: nn.Module, adapter: str | None, dtype: torch.dtype) -> WeightDiff:
    from hfhooks.diffs.core import WeightDiff  # core imports this module (WeightDiff.from_lora)
    from hfhooks.lora import lora_delta_weights, modules_to_save_copies

    index = ParamIndex(model)
    deltas = lora_delta_weights(model, adapter, dtype)
    copies = modules_to_save_copies(model, adapter)
    if not deltas and not copies:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers; pass a PeftModel or an adapter directory."
        )
    diff = WeightDiff(metadata={"ops": [{"op": "from_lora", "adapter": adapter or "active"}], "scale": 1.0})
    for key, (orig, copy) in copies.items():  # a full copy: keep it exact
        diff.entries[key] = _between_entry(
            orig, copy, torch.float64 if orig.dtype == torch.float32 else None, "dense"
        )
    for key, (delta, base) in deltas.items():
        if key not in index:
            raise UnknownParameterError(index._unknown_message(key))
        diff.entries[key] = _dense_entry(
            delta, base=tensor_fingerprint(base), changed=bool(delta.ne(0).any())
        )
    diff._refresh_fingerprints()
    return diff


def _lora_from_dir(path: Path, base: Any, dtype: torch.dtype) -> WeightDiff:
    from hfhooks.diffs.core import WeightDiff  # core imports this module (WeightDiff.from_lora)
    from hfhooks.lora import adapter_delta_weights

    src = _Source(base) if base is not None else None
    diff = WeightDiff(metadata={"ops": [{"op": "from_lora", "adapter": str(path)}], "scale": 1.0})
    for key, delta in adapter_delta_weights(path, dtype).items():
        fields: dict[str, Any] = {"changed": bool(delta.ne(0).any())}
        if src is not None:
            if key not in src:
                raise UnknownParameterError(
                    f"The adapter targets {key!r}, which the base lacks: {src.unknown(key)}"
                )
            if src.shape(key) != tuple(delta.shape):
                raise ValueError(
                    f"{key}: adapter Δ is {tuple(delta.shape)}, base weight is {src.shape(key)}."
                )
            fields["base"] = tensor_fingerprint(src.get(key))
        diff.entries[key] = _dense_entry(delta, **fields)
    diff._refresh_fingerprints()
    return diff
