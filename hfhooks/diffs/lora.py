"""LoRA adapters as weight diffs: ``ΔW = s·B·A`` per adapted module, from a ``PeftModel`` or an adapter directory.

The LoRA arithmetic itself (scaling, rsLoRA, rank / alpha patterns, ``modules_to_save``) is
:mod:`hfhooks.masks.lora`; this module turns its per-module Δ into :class:`~hfhooks.diffs.WeightDiff` entries with
base fingerprints, for :meth:`WeightDiff.from_lora <hfhooks.diffs.WeightDiff.from_lora>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfhooks.core.names import canonical_name
from hfhooks.core.params import ParamIndex, UnknownParameterError
from hfhooks.diffs.arithmetic import between_entry
from hfhooks.diffs.entries import DiffEntry, const_loader, dense_entry, tensor_fingerprint
from hfhooks.diffs.source import WeightSource
from hfhooks.masks.lora import (
    adapter_delta_weights,
    adapter_lora_factors,
    adapter_module_copies,
    lora_delta_weights,
    lora_layers,
    modules_to_save_copies,
)

Factors = tuple[torch.Tensor, torch.Tensor, float, bool]  # (B, A, scaling, transposed)


def _factored_entry(delta: torch.Tensor, factors: Factors, **fields: Any) -> DiffEntry:
    """A ``factored`` entry holding an adapter's ``B``, ``A`` and scaling (the adapter's size, not the weight's);
    ``delta`` is the dense Δ it expands to (its dtype and shape; whether it changes anything)."""
    b, a, s, transposed = factors
    payload = {
        "lora_B": b.detach().cpu().contiguous(),
        "lora_A": a.detach().cpu().contiguous(),
        "scaling": torch.tensor(float(s), dtype=torch.float64),
    }
    return DiffEntry(
        tuple(delta.shape), delta.dtype, "factored", const_loader(payload), transposed=transposed, **fields
    )


def _model_factors(model: nn.Module, adapter: str | None) -> dict[str, Factors]:
    """``{base weight name: factors}`` of the modules of a PeftModel that carry exactly one 2-D adapter (summed
    adapters and convolutions stay dense)."""
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[str, list[Factors]] = {}
    for layer in lora_layers(model).values():
        key = f"{canonical_name(names[id(layer)])}.weight"
        for name in [adapter] if adapter is not None else list(layer.active_adapters):
            if name in getattr(layer, "lora_A", {}):
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                transposed = bool(getattr(layer, "fan_in_fan_out", False))
            elif name in getattr(layer, "lora_embedding_A", {}):
                a, b, transposed = layer.lora_embedding_A[name], layer.lora_embedding_B[name], True
            else:
                continue
            found.setdefault(key, []).append(
                (b, a, layer.scaling[name], transposed) if a.dim() == 2 else None
            )
    return {k: v[0] for k, v in found.items() if len(v) == 1 and v[0] is not None}


def _copy_entry(orig: torch.Tensor, copy: torch.Tensor, dtype: torch.dtype | None):
    """A ``modules_to_save`` copy as copy − original: exact (Δ in the weights' dtype + the exact correction)."""
    return between_entry(orig, copy, dtype, "dense")


def lora_from_model(
    model: nn.Module, adapter: str | None, dtype: torch.dtype | None
) -> tuple[dict[str, DiffEntry], dict[str, Any]]:
    """The entries (and the op record) of a diff of a PEFT model's LoRA layers (``B·A·scaling``) and ``modules_to_save`` copies."""

    index = ParamIndex(model)
    deltas = lora_delta_weights(model, adapter, dtype or torch.float32)
    copies = modules_to_save_copies(model, adapter)
    if not deltas and not copies:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers; pass a PeftModel or an adapter directory."
        )
    entries: dict[str, DiffEntry] = {}
    for key, (orig, copy) in copies.items():  # a full copy: keep it exact
        entries[key] = _copy_entry(orig, copy, dtype)
    factors = _model_factors(model, adapter)
    for key, (delta, base) in deltas.items():
        if key not in index:
            raise UnknownParameterError(index.unknown_message(key))
        fields = {"base": tensor_fingerprint(base), "changed": bool(delta.ne(0).any())}
        if key in factors:
            entries[key] = _factored_entry(delta, factors[key], **fields)
        else:
            entries[key] = dense_entry(delta, **fields)
    return entries, {"op": "from_lora", "adapter": adapter or "active"}


def lora_from_dir(
    path: Path, base: Any, dtype: torch.dtype | None
) -> tuple[dict[str, DiffEntry], dict[str, Any]]:
    """The entries (and the op record) of a diff of a saved adapter directory; whole-tensor copies need ``base`` to diff against."""

    src = WeightSource(base) if base is not None else None
    deltas = adapter_delta_weights(path, dtype or torch.float32)
    copies = adapter_module_copies(path)
    if copies and src is None:
        raise ValueError(
            f"{path} carries whole tensors that replace the base's when peft loads it (modules_to_save copies "
            f"or saved base layers: {', '.join(sorted(copies)[:3])}), which are a diff only against the base "
            "they replace. Pass base= (the base model or checkpoint; CLI: the BASE argument) so they can be "
            "diffed instead of dropped."
        )
    entries: dict[str, DiffEntry] = {}
    for key, copy in copies.items():
        _check_target(src, key, tuple(copy.shape), "copy")
        entries[key] = _copy_entry(src.get(key), copy, dtype)
    factors = adapter_lora_factors(path)
    for key, delta in deltas.items():
        fields: dict[str, Any] = {"changed": bool(delta.ne(0).any())}
        if src is not None:
            _check_target(src, key, tuple(delta.shape), "Δ")
            fields["base"] = tensor_fingerprint(src.get(key))
        copied = entries.get(key)
        if copied is not None and copied.changed:  # a saved base layer that differs, then LoRA on top of it
            dt = torch.promote_types(copied.dtype, delta.dtype)
            delta = copied.dense().to(dt) + delta.to(dt)
            fields["changed"] = bool(delta.ne(0).any())
            entries[key] = dense_entry(delta, **fields)
        elif key in factors:
            entries[key] = _factored_entry(delta, factors[key], **fields)
        else:
            entries[key] = dense_entry(delta, **fields)
    return entries, {"op": "from_lora", "adapter": str(path)}


def _check_target(src: WeightSource, key: str, shape: tuple[int, ...], what: str) -> None:
    if key not in src:
        raise UnknownParameterError(f"The adapter targets {key!r}, which the base lacks: {src.unknown(key)}")
    if src.shape(key) != shape:
        raise ValueError(f"{key}: adapter {what} is {shape}, base weight is {src.shape(key)}.")
