"""One tensor's Δ in a :class:`~hfhooks.diffs.WeightDiff`: :class:`DiffEntry`, its payload, and what it records.

Here live the pieces every other module of :mod:`hfhooks.diffs` builds on, so this module imports none of
them: the errors (:class:`DiffFileError`, :class:`BaseMismatchError`), dtype helpers, the fingerprints that
tie an entry to its base and target (:func:`tensor_fingerprint`, whole-diff fingerprints, CRC-32 of stored
tensors), the ``DiffEntry`` record with its lazily loaded payload and decoding to a dense Δ, and the small
flag and progress helpers shared by extraction, algebra and file I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hfhooks.core.params import bit_view
from hfhooks.io.artifacts import ArtifactError
from hfhooks.io.safetensors import crc32, tensor_bytes

STORAGES = ("dense", "sparse", "quantized", "zero", "factored")
# Payload keys of the sparse exact correction (see :class:`DiffEntry`).
FIX_KEYS = ("fix_index", "fix_values", "unfix_index", "unfix_values")
# The fields an operation resets when its result no longer lands on a known target bit for bit (scaling, masking,
# quantising, combining): the exact correction holds at scale 1 on the diff's own base only.
INEXACT = {"target": None, "exact": None, "exact_inverse": None, "fixes": 0, "unfixes": 0, "fix_dtype": None}


class DiffFileError(ArtifactError):
    """A diff file that cannot be loaded: corrupt, truncated, foreign, or internally inconsistent."""


class BaseMismatchError(ValueError):
    """A diff applied to (or combined with) weights other than the ones it was computed from."""


def mismatch_message(bad: list[tuple[str, str, str]], total: int | None) -> str:
    """``total=None``: a streamed apply that stops at the first mismatching tensor (the others are unchecked)."""
    name, want, got = bad[0]
    found = (
        f"{len(bad)} of {total} tensors do not match its base (e.g. {name!r}: expected {want}, found {got})"
        if total is not None
        else f"tensor {name!r} does not match its base (expected {want}, found {got}; the streamed apply stops "
        "at the first mismatch, so later tensors were not checked, and nothing was written)"
    )
    return (
        f"This diff was computed on different weights: {found}. Apply it to the model it was extracted from. To apply "
        "it to other weights on purpose (task arithmetic on an edited model), pass check_base=False (CLI: "
        "--no-check-base); to combine diffs of one base, add them first: (d1 + d2).apply(base)."
    )


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"`` (the spelling diff metadata uses)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any) -> torch.dtype:
    """The floating-point torch dtype named ``name``; ``ValueError`` for anything else."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name!r} is not a floating-point torch dtype")
    return dtype


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors have the same dtype, shape and bits (``-0.0 != 0.0``, ``NaN == NaN``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(bit_view(a.contiguous()), bit_view(b.contiguous()))


def tensor_fingerprint(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's dtype, shape and bytes (``"crc32:1a2b3c4d"``): cheap, and any changed bit shows."""
    t = t.detach().cpu().contiguous()
    seed = crc32(f"{dtype_name(t.dtype)}{list(t.shape)}".encode())
    return f"crc32:{crc32(tensor_bytes(t), seed):08x}"


def tensor_crc(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes alone, as 8 hex digits (the per-part check of diff files)."""
    return f"{crc32(tensor_bytes(t)):08x}"


def diff_fingerprint(per_tensor: Mapping[str, tuple[tuple[int, ...], str | None]]) -> dict[str, Any] | None:
    """Fingerprint of a whole set of tensors: architecture (names and shapes) and values (tensor CRCs)."""
    if not per_tensor:
        return None
    arch, values = hashlib.sha256(), hashlib.sha256()
    known = True
    for name in sorted(per_tensor):
        shape, fp = per_tensor[name]
        arch.update(f"{name}:{list(shape)};".encode())
        known &= fp is not None
        values.update(f"{name}:{fp};".encode())
    return {
        "sha256": arch.hexdigest()[:16],
        "values": values.hexdigest()[:16] if known else None,
        "num_tensors": len(per_tensor),
    }


Payload = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DiffEntry:
    """One tensor's Δ: how it is stored and what is known about it (payload loaded on demand).

    ``payload`` keys: ``values`` (dense: the full Δ; sparse/quantised: the stored values), ``mask`` (bool, full
    shape), ``codes`` (quantised: integer codes), ``range`` (quantised: Δ at the first and last code),
    ``lora_B`` / ``lora_A`` / ``scaling`` (factored: Δ = (B·A)·scaling, transposed if ``transposed``); a
    ``zero`` entry has no values (Δ = 0).

    The **exact correction**: ``fix_index`` (sorted flat indices) and ``fix_values`` (the target's values
    there, in ``fix_dtype``) list the ``fixes`` coordinates where ``base + Δ`` misses the target bit for bit;
    ``unfix_index`` / ``unfix_values`` (the base's values) the ``unfixes`` where ``target − Δ`` misses the base.
    Applying Δ at scale 1 to its verified base sets the listed coordinates to the listed values. It is not part
    of the dense Δ: negation swaps the two lists, lossless storage changes keep them, anything else drops them.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    storage: str
    load: Callable[[], Payload] = field(repr=False, compare=False)
    base: str | None = None  # fingerprint of the base tensor
    target: str | None = None  # fingerprint of the target tensor
    exact: bool | None = None  # base + Δ == target, bit for bit (None: unknown)
    exact_inverse: bool | None = None  # target − Δ == base, bit for bit
    changed: bool | None = None  # target != base (None: unknown)
    levels: int | None = None
    # Set on −Δ (negate) of a diff computed on this base: the entry is then both the inverse path from the
    # target (``base``) and −1 × a task vector of ``negated_base`` — so it also applies there, and linear
    # combinations treat it as a vector of that base.
    negated_base: str | None = None
    fixes: int = 0  # coordinates in the forward exact correction (fix_index / fix_values)
    unfixes: int = 0  # coordinates in the inverse one (unfix_index / unfix_values), used by −Δ
    fix_dtype: torch.dtype | None = None  # dtype of the corrections' values (the weights')
    transposed: bool = False  # factored: Δ = ((B·A)·scaling)ᵀ (fan_in_fan_out and embedding LoRA)

    def dense(self) -> torch.Tensor:
        """Δ as a dense tensor of ``shape`` and ``dtype``."""
        return decode_payload(self, self.load())

    def numel(self) -> int:
        return math.prod(self.shape)


def decode_payload(entry: DiffEntry, payload: Payload) -> torch.Tensor:
    """The dense ``Δ`` an entry's payload stands for (dense, sparse or quantised storage)."""
    if entry.storage == "dense":
        return payload["values"]
    if entry.storage == "zero":
        return torch.zeros(entry.shape, dtype=entry.dtype)
    if entry.storage == "factored":
        # peft's get_delta_weight order: (B·A)·scaling, then the transpose — so the Δ equals peft's merge
        b, a = payload["lora_B"].to(entry.dtype), payload["lora_A"].to(entry.dtype)
        delta = (b @ a) * float(payload["scaling"])
        return (delta.T if entry.transposed else delta).contiguous()
    if entry.storage == "quantized":
        lo, hi = payload["range"].to(entry.dtype).unbind()
        step = (hi - lo) / (entry.levels - 1)
        values = lo + payload["codes"].to(entry.dtype) * step
    else:
        values = payload["values"]
    mask = payload.get("mask")
    if mask is None:
        return values.reshape(entry.shape)
    out = torch.zeros(entry.shape, dtype=entry.dtype)
    out[mask] = values
    return out


def linear_base(e: DiffEntry) -> str | None:
    """The base ``e`` is a task vector of, for linear combinations (a negated entry's original base)."""
    return e.negated_base or e.base


def entry_bases(e: DiffEntry) -> list[str]:
    """Fingerprints of the weights ``e`` may be applied to (empty: unknown, not checked)."""
    return [f for f in dict.fromkeys((e.base, e.negated_base)) if f is not None]


def const_loader(payload: Payload) -> Callable[[], Payload]:
    """A payload loader that returns ``payload`` (an entry whose payload is already in memory)."""
    return lambda: payload


def dense_entry(delta: torch.Tensor, **fields: Any) -> DiffEntry:
    """A dense, in-memory :class:`DiffEntry` holding ``delta``; ``fields`` set its other attributes."""
    return DiffEntry(tuple(delta.shape), delta.dtype, "dense", const_loader({"values": delta}), **fields)


def sparse_payload(delta: torch.Tensor, mask: torch.Tensor) -> Payload:
    """The sparse payload of ``delta`` restricted to ``mask`` (broadcast to ``delta``'s shape)."""
    mask = mask.to(torch.bool).expand(delta.shape).contiguous()
    return {"mask": mask, "values": delta[mask]}


def negate_fix(p: Payload) -> Payload:
    """The exact corrections of ``−Δ`` (only those keys): the inverse list becomes the forward one and vice
    versa."""
    out: Payload = {}
    for a, b in (("fix", "unfix"), ("unfix", "fix")):
        if a + "_index" in p:
            out[b + "_index"], out[b + "_values"] = p[a + "_index"], p[a + "_values"]
    return out


def without_fix(p: Payload) -> Payload:
    """``p`` without its exact correction (what an operation that changes Δ's values keeps)."""
    return {k: v for k, v in p.items() if k not in FIX_KEYS}


def with_fix(src: Payload, out: Payload) -> Payload:
    """``out`` carrying ``src``'s exact correction (a lossless storage change keeps it)."""
    return {**out, **{k: src[k] for k in FIX_KEYS if k in src}}


def all_flags(flags: Iterable[bool | None]) -> bool | None:
    """``False`` if any flag is ``False``, else ``None`` if any is unknown (or there are none), else ``True``."""
    flags = list(flags)
    if any(f is False for f in flags):
        return False
    if not flags or any(f is None for f in flags):
        return None
    return True


def is_changed(e: DiffEntry) -> bool:
    """Whether an entry changes any weight (its recorded flag, else a look at its values)."""
    if e.changed is not None:
        return e.changed
    return bool(e.dense().ne(0).any())


def progress_bar(it: Iterable[Any], total: int, enabled: bool, desc: str) -> Iterable[Any]:
    """``it`` wrapped in a tqdm bar when ``enabled`` (tqdm is imported only then)."""
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="tensor", leave=False)
