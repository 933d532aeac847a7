"""Weight diffs (task vectors): extract, apply, negate, add, compose, restrict, quantise, TALL masks, LoRA.

A :class:`WeightDiff` is ``Δ = θ_tuned − θ_base`` keyed by canonical parameter names. Applying it computes
``θ + scale·Δ`` in ``float32`` (or wider) and casts back to each tensor's dtype; coordinates where ``Δ = 0``
are left bit-for-bit untouched.

Guarantees:

* **Wrong base refused.** Every entry records a CRC-32 fingerprint of the base tensor it was computed from
  (and of the target). :meth:`WeightDiff.apply` checks it before changing anything and raises
  :class:`BaseMismatchError` naming the tensors that differ (``check_base=False`` applies anyway, e.g. for task
  arithmetic on purpose).
* **Exactness, stated.** :meth:`WeightDiff.between` checks per tensor whether ``base + Δ`` reproduces the
  target bit for bit (``exact``) and whether ``target − Δ`` reproduces the base (``exact_inverse``). The
  default ``float32`` Δ is exact for ``bfloat16``/``float16`` weights unless a coordinate changes magnitude
  by more than 2¹⁶; ``dtype=torch.float64`` makes both flags hold for ``float32`` weights too (up to 2²⁹).
  Operations that lose exactness (scaling, quantising, masking, adding) clear the flags instead of lying.
* **Bounded memory.** Diffs between checkpoint directories stream tensor by tensor into the diff file
  (``out=``); a large diff file is read lazily (``WeightDiff.load(path, lazy=True)``), with each tensor's
  CRC-32 verified as it is read; applying to a checkpoint streams through
  :func:`hfhooks.checkpoints.edit_checkpoint`.

File format (an hfhooks artifact of kind ``diff``, readable with plain ``safetensors``):

* dense entry: ``<name>`` holds Δ;
* masked-sparse entry: ``<name>::mask`` (``U8``, the bit-packed mask, big bit order like ``numpy.packbits``)
  and ``<name>::values`` (Δ at the set positions, row-major order);
* quantised entry: ``<name>::codes`` (``U8``, codes of ``bits`` bits packed big-endian within each byte),
  ``<name>::range`` (Δ at code 0 and at code ``levels − 1``; Δ = r0 + code·(r1 − r0)/(levels − 1)) and, if
  masked, ``<name>::mask``;
* metadata ``hfhooks.tensors`` = ``{name: {shape, dtype, storage, levels, bits, nnz, base, target, exact,
  exact_inverse, changed, crc32}}``, plus ``hfhooks.base`` / ``hfhooks.target`` (model fingerprints),
  ``hfhooks.exact``, ``hfhooks.scale``, ``hfhooks.ops`` (how it was made) and ``hfhooks.meta_digest``.

Example:
    >>> import torch
    >>> base, tuned = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    >>> d = WeightDiff.between(base, tuned, dtype=torch.float64, progress=False)
    >>> d.exact, sorted(d.names())
    (True, ['bias', 'weight'])
    >>> _ = d.apply(base)
    >>> torch.equal(base.weight, tuned.weight)
    True
    >>> _ = d.negate().apply(base)  # back to where it started
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hfhooks._version import __version__
from hfhooks.artifacts import FORMAT_VERSION, ArtifactError, _digest
from hfhooks.checkpoints import (
    Checkpoint,
    CheckpointError,
    ReadBuffer,
    TensorBlocks,
    TensorInfo,
    _copy_range,
    _tensor_bytes,
    _write_all,
    edit_checkpoint,
    layer_map,
    parse_layers,
    read_safetensors_header,
)
from hfhooks.masks import ParamMask
from hfhooks.params import ParamIndex, UnknownParameterError, canonical_name

__all__ = [
    "BaseMismatchError",
    "DiffFileError",
    "WeightDiff",
    "consensus_mask",
    "consensus_merge",
    "tall_masks",
    "tensor_fingerprint",
]

STORAGES = ("dense", "sparse", "quantized")
_SEP = "::"
_RESERVED_META = ("tensors", "kind", "version", "format_version", "digest", "meta_digest", "path")


class DiffFileError(ArtifactError):
    """A diff file that cannot be loaded: corrupt, truncated, foreign, or internally inconsistent."""


class BaseMismatchError(ValueError):
    """A diff applied to (or combined with) weights other than the ones it was computed from."""


# -- small helpers ---------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name!r} is not a floating-point torch dtype")
    return dtype


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = _INT_VIEW[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def tensor_fingerprint(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's dtype, shape and bytes (``"crc32:1a2b3c4d"``): cheap, and any changed bit shows."""
    t = t.detach().cpu().contiguous()
    seed = zlib.crc32(f"{_dtype_name(t.dtype)}{list(t.shape)}".encode())
    return f"crc32:{zlib.crc32(_tensor_bytes(t), seed):08x}"


def _crc(t: torch.Tensor) -> str:
    return f"{zlib.crc32(_tensor_bytes(t)):08x}"


def _model_fingerprint(per_tensor: Mapping[str, tuple[tuple[int, ...], str | None]]) -> dict[str, Any] | None:
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


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.reshape(-1).numpy().astype(bool), bitorder="big"))


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = np.unpackbits(packed.numpy(), bitorder="big")
    if bits.size < count or bits[count:].any():
        raise ValueError("bit-packed mask has the wrong length or non-zero padding")
    return torch.from_numpy(bits[:count].astype(bool))


def _code_bits(levels: int) -> int:
    return next(b for b in (1, 2, 4, 8) if (1 << b) >= levels)


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    c = codes.reshape(-1).to(torch.uint8)
    pad = -c.numel() % per
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    c = c.reshape(-1, per).to(torch.int32)
    shifts = torch.tensor([8 - bits * (i + 1) for i in range(per)], dtype=torch.int32)
    return (c << shifts).sum(1).to(torch.uint8)


def _unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per = 8 // bits
    if packed.numel() != -(-count // per):
        raise ValueError(f"expected {-(-count // per)} bytes of {bits}-bit codes, got {packed.numel()}")
    shifts = torch.tensor([8 - bits * (i + 1) for i in range(per)], dtype=torch.int32)
    codes = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count]


# -- entries ---------------------------------------------------------------------------------------------------
Payload = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DiffEntry:
    """One tensor's Δ: how it is stored and what is known about it (payload loaded on demand).

    ``payload`` keys: ``values`` (dense: the full Δ; sparse/quantised: the stored values), ``mask`` (bool, full
    shape), ``codes`` (quantised: integer codes) and ``range`` (quantised: Δ at the first and last code).
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

    def dense(self) -> torch.Tensor:
        """Δ as a dense tensor of ``shape`` and ``dtype``."""
        return _decode(self, self.load())

    def numel(self) -> int:
        return math.prod(self.shape)


def _decode(entry: DiffEntry, payload: Payload) -> torch.Tensor:
    if entry.storage == "dense":
        return payload["values"]
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


def _stored(name: str, entry: DiffEntry, payload: Payload) -> dict[str, torch.Tensor]:
    """The tensors a file holds for one entry."""
    if entry.storage == "dense":
        return {name: payload["values"].contiguous()}
    out: dict[str, torch.Tensor] = {}
    if payload.get("mask") is not None:
        out[name + _SEP + "mask"] = _pack_bits(payload["mask"])
    if entry.storage == "sparse":
        out[name + _SEP + "values"] = payload["values"].contiguous()
    else:
        out[name + _SEP + "codes"] = _pack_codes(payload["codes"], _code_bits(entry.levels))
        out[name + _SEP + "range"] = payload["range"].to(entry.dtype)
    return out


def _const(payload: Payload) -> Callable[[], Payload]:
    return lambda: payload


def _dense_entry(delta: torch.Tensor, **fields: Any) -> DiffEntry:
    return DiffEntry(tuple(delta.shape), delta.dtype, "dense", _const({"values": delta}), **fields)


def _sparse_payload(delta: torch.Tensor, mask: torch.Tensor) -> Payload:
    mask = mask.to(torch.bool).expand(delta.shape).contiguous()
    return {"mask": mask, "values": delta[mask]}


# -- sources (models, checkpoints, state dicts) ----------------------------------------------------------------
class _Source:
    """Uniform read access to a model, a checkpoint directory or a ``{name: tensor}`` mapping."""

    def __init__(self, obj: Any, allow_pickle: bool = False):
        self.obj = obj
        self.index: ParamIndex | None = None
        self.ckpt: Checkpoint | None = None
        self.buffer = ReadBuffer()  # checkpoint tensors are read into it: each valid until the next get()
        if isinstance(obj, nn.Module):
            self.index = ParamIndex(obj)
            self.names = self.index.names()
            self.label = type(obj).__name__
        elif isinstance(obj, ParamIndex):
            self.index = obj
            self.names = obj.names()
            self.label = type(obj.model).__name__
        elif isinstance(obj, Checkpoint | str | os.PathLike):
            self.ckpt = obj if isinstance(obj, Checkpoint) else Checkpoint(obj, allow_pickle=allow_pickle)
            self.names = self.ckpt.keys()
            self.label = str(self.ckpt.path)
        elif isinstance(obj, Mapping):
            self.names = list(obj)
            self.label = "state dict"
        else:
            raise TypeError(
                f"Expected a model, a checkpoint directory or a {{name: tensor}} mapping, got {type(obj).__name__}."
            )

    @property
    def streaming(self) -> bool:
        return self.ckpt is not None

    def __contains__(self, name: str) -> bool:
        if self.index is not None:
            return name in self.index
        return name in (self.ckpt if self.ckpt is not None else self.obj)

    def shape(self, name: str) -> tuple[int, ...]:
        if self.index is not None:
            return tuple(self.index.info(name).shape)
        if self.ckpt is not None:
            return self.ckpt.info(name).shape
        return tuple(self.obj[name].shape)

    def get(self, name: str) -> torch.Tensor:
        """The tensor (read-only use: for models this is the live parameter's data; from a checkpoint it is
        valid until the next ``get``)."""
        if self.index is not None:
            return self.index.param(name).detach().cpu()
        if self.ckpt is not None:
            return self.ckpt.read(name, self.buffer)
        return torch.as_tensor(self.obj[name]).detach().cpu()

    def unknown(self, name: str) -> str:
        if self.index is not None:
            return self.index._unknown_message(name)
        if self.ckpt is not None:
            return self.ckpt.unknown_message(name)
        return f"{name!r} is not in the state dict ({len(self.names)} tensors)."


# -- the diff --------------------------------------------------------------------------------------------------
class WeightDiff:
    """``Δ = θ_tuned − θ_base`` per canonical parameter name, with provenance (see the module docstring).

    Build one with :meth:`between`, :meth:`from_lora`, :meth:`load`, or from ``{name: Δ}`` tensors directly
    (no base fingerprint then). Combine with ``-d``, ``d1 + d2``, ``c * d``, :meth:`compose`; narrow with
    :meth:`restrict` and :meth:`changed_only`; shrink with :meth:`quantize` and :meth:`to_sparse`.
    """

    def __init__(
        self,
        deltas: Mapping[str, torch.Tensor] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ):
        self.entries: dict[str, DiffEntry] = {}
        for name, delta in (deltas or {}).items():
            delta = torch.as_tensor(delta).detach().cpu()
            if not delta.is_floating_point():
                raise ValueError(f"Δ for {name!r} must be a floating-point tensor, got {delta.dtype}.")
            self.entries[name] = _dense_entry(delta)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.metadata.setdefault("ops", [])

    @classmethod
    def _of(cls, entries: Mapping[str, DiffEntry], metadata: Mapping[str, Any], op: Any) -> WeightDiff:
        diff = cls(metadata={**metadata, "ops": [*metadata.get("ops", []), op]})
        diff.entries = dict(entries)
        diff._refresh_fingerprints()
        return diff

    def _refresh_fingerprints(self) -> None:
        self.metadata["base"] = _model_fingerprint({n: (e.shape, e.base) for n, e in self.entries.items()})
        self.metadata["target"] = _model_fingerprint(
            {n: (e.shape, e.target) for n, e in self.entries.items()}
        )

    # -- access --------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> torch.Tensor:
        """Dense Δ of one tensor."""
        return self.entry(name).dense()

    def entry(self, name: str) -> DiffEntry:
        if name not in self.entries:
            raise UnknownParameterError(f"{name!r} is not in this diff ({len(self)} tensors).")
        return self.entries[name]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """``{name: dense Δ}`` (everything in memory)."""
        return {n: e.dense() for n, e in self.entries.items()}

    def materialize(self) -> WeightDiff:
        """A copy with every payload loaded into memory (a file-backed diff stops reading its file)."""
        entries = {n: replace(e, load=_const(e.load())) for n, e in self.entries.items()}
        diff = WeightDiff._of(entries, self.metadata, "materialize")
        diff.metadata["ops"] = list(self.metadata.get("ops", []))
        return diff

    @property
    def exact(self) -> bool | None:
        """Does ``base + Δ`` reproduce the target bit for bit on every tensor (``None``: not known)?"""
        return _all_flags(e.exact for e in self.entries.values())

    @property
    def exact_inverse(self) -> bool | None:
        """Does ``target − Δ`` reproduce the base bit for bit on every tensor?"""
        return _all_flags(e.exact_inverse for e in self.entries.values())

    @property
    def changed(self) -> list[str]:
        """Names whose target differs from the base (computed from Δ where the diff does not know)."""
        return [n for n, e in self.entries.items() if _is_changed(e)]

    @property
    def unchanged(self) -> list[str]:
        return [n for n, e in self.entries.items() if not _is_changed(e)]

    def nbytes(self) -> int:
        """Bytes the stored tensors take (what :meth:`save` writes, without the header)."""
        total = 0
        for n, e in self.entries.items():
            total += sum(t.numel() * t.element_size() for t in _stored(n, e, e.load()).values())
        return total

    def summary(self) -> list[dict[str, Any]]:
        """Per-tensor rows: name, shape, storage, dtype, exact, changed, stored bytes, max |Δ|."""
        rows = []
        for n, e in self.entries.items():
            payload = e.load()
            stored = _stored(n, e, payload)
            delta = _decode(e, payload)
            rows.append(
                {
                    "name": n,
                    "shape": list(e.shape),
                    "storage": e.storage,
                    "dtype": _dtype_name(e.dtype),
                    "levels": e.levels,
                    "exact": e.exact,
                    "changed": _is_changed(e),
                    "bytes": sum(t.numel() * t.element_size() for t in stored.values()),
                    "max_abs": float(delta.abs().max()) if delta.numel() else 0.0,
                }
            )
        return rows

    def __repr__(self) -> str:
        kinds = sorted({e.storage for e in self.entries.values()})
        return (
            f"WeightDiff({len(self)} tensors, {'/'.join(kinds) or 'empty'}, exact={self.exact}, "
            f"scale={self.metadata.get('scale', 1.0)})"
        )

    # -- extraction ----------------------------------------------------------------------------------------
    @classmethod
    def between(
        cls,
        base: Any,
        tuned: Any,
        *,
        names: str | Iterable[str] | None = None,
        dtype: torch.dtype | None = None,
        storage: str = "dense",
        changed_only: bool = False,
        strict: bool = True,
        out: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
    ) -> WeightDiff:
        """``Δ = tuned − base`` for two models, checkpoint directories or state dicts (any mix).

        Args:
            names: only these tensors (names, globs, or ``re:`` regexes); default: all.
            dtype: storage dtype of Δ; default ``float32`` (``float64`` for ``float64`` weights). Use
                ``torch.float64`` when ``float32`` weights must round-trip bit for bit (see ``exact``).
            storage: ``"dense"``, ``"sparse"`` (``mask`` = where the weights changed) or ``"auto"`` (per
                tensor, whichever is smaller).
            changed_only: leave out tensors that did not change (listed under ``metadata["unchanged"]``).
            strict: names present in only one side are an error (``False``: skipped and listed).
            out: stream straight into this diff file (bounded memory for big checkpoints) and return the
                diff backed by it, lazily loaded.
        """
        if storage not in ("dense", "sparse", "auto"):
            raise ValueError(f"storage={storage!r}: use 'dense', 'sparse' or 'auto'.")
        a, b = _Source(base, allow_pickle), _Source(tuned, allow_pickle)
        selected = _select(a.names, names)
        only_a = [n for n in selected if n not in b]
        only_b = [n for n in _select(b.names, names, quiet=True) if n not in a]
        if (only_a or only_b) and strict:
            n = (only_a or only_b)[0]
            side = "tuned" if only_a else "base"
            msg = b.unknown(n) if only_a else a.unknown(n)
            raise UnknownParameterError(
                f"The models do not have the same parameters: {len(only_a)} only in base, {len(only_b)} only in "
                f"tuned ({n!r} is missing from {side}: {msg}). Pass strict=False to diff the common ones."
            )
        common = [n for n in selected if n in b]
        for n in common:
            if a.shape(n) != b.shape(n):
                raise ValueError(f"Shape mismatch for {n!r}: base {a.shape(n)}, tuned {b.shape(n)}.")
        meta = {
            "ops": [{"op": "between", "base": a.label, "tuned": b.label, "storage": storage}],
            "scale": 1.0,
            "skipped": sorted(only_a + only_b),
        }

        def entries() -> Iterator[tuple[str, DiffEntry | None]]:
            for n in common:
                entry = _between_entry(a.get(n), b.get(n), dtype, storage)
                yield n, (None if changed_only and not entry.changed else entry)

        if out is not None:
            return _write_diff(out, entries(), meta, common, progress, desc="diff")
        diff = cls(metadata=meta)
        unchanged = []
        for n, entry in _progress(entries(), len(common), progress, "diff"):
            if entry is None:
                unchanged.append(n)
            else:
                diff.entries[n] = entry
        diff.metadata["unchanged"] = unchanged
        diff._refresh_fingerprints()
        return diff

    @classmethod
    def from_lora(
        cls,
        model_or_dir: nn.Module | str | os.PathLike,
        adapter: str | None = None,
        *,
        base: Any = None,
        dtype: torch.dtype = torch.float32,
    ) -> WeightDiff:
        """A LoRA adapter as a diff on the base weights: ``ΔW = s·B·A`` per module (never A and B separately).

        ``s`` is the adapter's scaling (``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA, per-module
        ``rank_pattern`` / ``alpha_pattern`` honoured). Works on a ``PeftModel`` (``adapter``: one adapter
        name; default: the active adapters, summed) or an adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors``; pass ``base=`` — a model or checkpoint — to record base fingerprints).
        ``modules_to_save`` copies become dense entries (copy − original). DoRA is refused.
        """
        if isinstance(model_or_dir, nn.Module):
            return _lora_from_model(model_or_dir, adapter, dtype)
        return _lora_from_dir(Path(model_or_dir), base, dtype)

    # -- algebra -------------------------------------------------------------------------------------------
    def negate(self) -> WeightDiff:
        """``−Δ``: applied to the target, gives back the base (its base and target fingerprints swap)."""
        entries = {}
        for n, e in self.entries.items():
            entries[n] = replace(
                e,
                load=_mapped(e, _negate_payload),
                base=e.target,
                target=e.base,
                exact=e.exact_inverse,
                exact_inverse=e.exact,
            )
        diff = WeightDiff._of(entries, self.metadata, "negate")
        diff.metadata["scale"] = -float(self.metadata.get("scale", 1.0))
        return diff

    def __neg__(self) -> WeightDiff:
        return self.negate()

    def scale(self, c: float) -> WeightDiff:
        """``c·Δ`` (its target is unknown unless ``c == 1``)."""
        c = float(c)
        if c == 1.0:
            return self
        entries = {
            n: replace(
                e,
                load=_mapped(e, lambda p, e=e: _scale_payload(e, p, c)),
                target=None,
                exact=None,
                exact_inverse=None,
                changed=e.changed if c != 0 else False,
            )
            for n, e in self.entries.items()
        }
        diff = WeightDiff._of(entries, self.metadata, {"op": "scale", "c": c})
        diff.metadata["scale"] = c * float(self.metadata.get("scale", 1.0))
        return diff

    def __mul__(self, c: float) -> WeightDiff:
        if not isinstance(c, int | float):
            return NotImplemented
        return self.scale(c)

    __rmul__ = __mul__

    def add(self, other: WeightDiff) -> WeightDiff:
        """``Δ₁ + Δ₂`` for two diffs from the same base (task arithmetic). Mismatched bases are refused."""
        for n in self.entries.keys() & other.entries.keys():
            fa, fb = self.entries[n].base, other.entries[n].base
            if fa and fb and fa != fb:
                raise BaseMismatchError(
                    f"Cannot add diffs from different bases: {n!r} has base {fa} in one and {fb} in the other. "
                    "For a diff taken on top of another (base → mid → top), use compose()."
                )
        return _combine(self, other, "add", lambda a, b: (a.base or b.base, None))

    def __add__(self, other: WeightDiff) -> WeightDiff:
        if not isinstance(other, WeightDiff):
            return NotImplemented
        return self.add(other)

    def __sub__(self, other: WeightDiff) -> WeightDiff:
        if not isinstance(other, WeightDiff):
            return NotImplemented
        return self.add(other.negate())

    def compose(self, other: WeightDiff) -> WeightDiff:
        """This diff, then ``other`` (taken on top of this one's target): one diff from this base to ``other``'s
        target. Refused if ``other`` was not computed on this diff's target."""
        for n in self.entries.keys() & other.entries.keys():
            ta, bb = self.entries[n].target, other.entries[n].base
            if ta and bb and ta != bb:
                raise BaseMismatchError(
                    f"Cannot compose: {n!r} of the second diff was computed on {bb}, but the first diff ends at "
                    f"{ta}. compose(a, b) needs b computed on a's target; for two diffs of one base, use add()."
                )
        return _combine(
            self,
            other,
            "compose",
            lambda a, b: (a.base, b.target),
        )

    # -- narrowing -----------------------------------------------------------------------------------------
    def restrict(
        self,
        *,
        layers: str | Iterable[int] | slice | None = None,
        names: str | Iterable[str] | None = None,
        mask: ParamMask | None = None,
    ) -> WeightDiff:
        """Keep only some of Δ: decoder ``layers`` (by index; embeddings, final norm and heads dropped),
        ``names`` (names, globs or ``re:`` regexes), and/or the coordinates a :class:`~hfhooks.ParamMask`
        keeps (masked-sparse storage; names the mask does not list are dropped)."""
        keep = list(self.entries)
        ops: dict[str, Any] = {"op": "restrict"}
        if names is not None:
            keep = _select(keep, names)
            ops["names"] = names if isinstance(names, str) else list(names)
        if layers is not None:
            path, of = layer_map(keep)
            if path is None:
                raise ValueError(
                    "These tensor names have no decoder-layer structure; restrict by names instead."
                )
            wanted = set(parse_layers(layers, 1 + max(i for i in of.values() if i is not None)))
            keep = [n for n in keep if of[n] in wanted]
            ops["layers"] = sorted(wanted)
            if not keep:
                raise ValueError(f"No tensor of this diff is in layers {sorted(wanted)} of {path}.")
        entries = {n: self.entries[n] for n in keep}
        if mask is not None:
            hit = [n for n in entries if n in mask]
            if not hit:
                raise UnknownParameterError(
                    f"The mask names none of this diff's tensors (mask: {len(mask)} tensors, e.g. "
                    f"{next(iter(mask), '?')!r}; diff: e.g. {next(iter(entries), '?')!r})."
                )
            masked = {}
            for n in hit:
                e = entries[n]
                if tuple(mask.shape(n)) != e.shape:
                    raise ValueError(f"Mask shape {mask.shape(n)} does not match Δ {e.shape} for {n!r}.")
                bits = mask[n]
                full = bool(bits.all())
                masked[n] = (
                    e
                    if full
                    else replace(
                        e,
                        load=_mapped(e, lambda p, e=e, bits=bits: _mask_payload(e, p, bits)),
                        storage="sparse" if e.storage == "dense" else e.storage,
                        target=None,
                        exact=None,
                        exact_inverse=None,
                        changed=None,
                    )
                )
            entries = masked
            ops["mask"] = {"tensors": len(hit), "density": round(mask.density(), 6)}
        dropped = [n for n in self.entries if n not in entries]
        diff = WeightDiff._of(entries, self.metadata, ops)
        diff.metadata["dropped"] = dropped
        return diff

    def changed_only(self) -> WeightDiff:
        """Only the tensors that changed; the others are listed in ``metadata["unchanged"]``."""
        unchanged = self.unchanged
        entries = {n: e for n, e in self.entries.items() if n not in set(unchanged)}
        diff = WeightDiff._of(entries, self.metadata, "changed_only")
        diff.metadata["unchanged"] = sorted(set(self.metadata.get("unchanged", [])) | set(unchanged))
        return diff

    # -- storage -------------------------------------------------------------------------------------------
    def quantize(self, levels: int = 16, names: str | Iterable[str] | None = None) -> WeightDiff:
        """Per-tensor min–max quantisation of Δ to ``levels`` (2–256) evenly spaced values.

        Codes take ``1``, ``2``, ``4`` or ``8`` bits (16 levels: 8× smaller than ``float32``). Zeros are not
        preserved in dense tensors (the grid spans [min, max]); masked-sparse entries keep exact zeros off the
        mask. The result is not exact (``exact = None``).
        """
        if not isinstance(levels, int) or not 2 <= levels <= 256:
            raise ValueError(f"levels={levels!r}: use an integer from 2 to 256.")
        chosen = set(_select(list(self.entries), names)) if names is not None else set(self.entries)
        entries = {}
        for n, e in self.entries.items():
            if n not in chosen:
                entries[n] = e
                continue
            entries[n] = replace(
                e,
                load=_mapped(e, lambda p, e=e: _quantize_payload(e, p, levels)),
                storage="quantized",
                levels=levels,
                target=None,
                exact=None,
                exact_inverse=None,
            )
        return WeightDiff._of(entries, self.metadata, {"op": "quantize", "levels": levels})

    def to_sparse(self) -> WeightDiff:
        """Masked-sparse storage with mask = (Δ ≠ 0); lossless (quantised entries are decoded first)."""
        entries = {
            n: replace(e, load=_mapped(e, lambda p, e=e: _sparsify(e, p)), storage="sparse", levels=None)
            for n, e in self.entries.items()
        }
        return WeightDiff._of(entries, self.metadata, "to_sparse")

    def to_dense(self) -> WeightDiff:
        """Dense storage (lossless)."""
        entries = {
            n: replace(
                e, load=_mapped(e, lambda p, e=e: {"values": _decode(e, p)}), storage="dense", levels=None
            )
            for n, e in self.entries.items()
        }
        return WeightDiff._of(entries, self.metadata, "to_dense")

    # -- applying ------------------------------------------------------------------------------------------
    def apply(
        self,
        target: Any,
        scale: float = 1.0,
        *,
        out: str | os.PathLike | None = None,
        check_base: bool = True,
        overwrite: bool = False,
        max_shard_size: int | str | None = None,
        fsync: bool = False,
        allow_pickle: bool = False,
        progress: bool = True,
    ) -> Any:
        """``θ ← θ + scale·Δ`` on a model (in place; returns it) or a checkpoint directory (streamed into
        ``out``; pass ``out=target`` for an atomic in-place edit; returns the output path).

        With ``check_base`` (default) every tensor's fingerprint must match the diff's base before anything
        changes — :class:`BaseMismatchError` otherwise. Coordinates where Δ is zero stay bit-identical.
        """
        if isinstance(target, nn.Module):
            return self._apply_model(target, float(scale), check_base)
        if out is None:
            raise ValueError(
                "Applying to a checkpoint needs out= (a new directory; out=<the checkpoint> edits it in place)."
            )
        ckpt = Checkpoint(target, allow_pickle=allow_pickle)
        stored = {canonical_name(n): n for n in ckpt} if ckpt.kind == "adapter" else None
        edits, buffer = {}, ReadBuffer()  # Δ of one tensor at a time, read into one reused buffer
        for name, entry in self.entries.items():
            key = stored.get(name, name) if stored else name
            if key not in ckpt:
                raise UnknownParameterError(f"Cannot apply the diff: {ckpt.unknown_message(name)}")
            if ckpt.info(key).shape != entry.shape:
                raise ValueError(
                    f"Shape mismatch for {name!r}: diff {entry.shape}, checkpoint {ckpt.info(key).shape}."
                )
            edits[key] = _apply_fn(name, entry, float(scale), check_base, buffer)
        record = {"op": "apply_diff", "scale": float(scale), "tensors": len(edits), "diff": self._describe()}
        return edit_checkpoint(
            ckpt,
            Path(out),
            edits,
            record=record,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            fsync=fsync,
            progress=progress,
            desc="apply diff",
        )

    def _apply_model(self, model: nn.Module, scale: float, check_base: bool) -> nn.Module:
        index = ParamIndex(model)
        params: dict[str, tuple[nn.Parameter, DiffEntry]] = {}
        for name, entry in self.entries.items():
            info = index.info(name)
            if tuple(info.shape) != entry.shape:
                raise ValueError(
                    f"Shape mismatch for {name!r}: diff {entry.shape}, model {tuple(info.shape)}."
                )
            if info.name in params:  # tied weights named twice: one update only
                if params[info.name][1] is not entry:
                    raise ValueError(
                        f"{name!r} is tied to {info.name!r}; the diff must name only one of them."
                    )
                continue
            params[info.name] = (info.param, entry)
        if check_base:
            bad = [
                (n, e.base, fp)
                for n, (p, e) in params.items()
                if e.base is not None and (fp := tensor_fingerprint(p)) != e.base
            ]
            if bad:
                raise BaseMismatchError(_mismatch_message(bad, len(params)))
        with torch.no_grad():
            for _, (param, entry) in params.items():
                new = _add_delta(param.detach().cpu(), entry, scale)
                param.copy_(new.to(param.device))
        return model

    def _describe(self) -> dict[str, Any]:
        return {
            "tensors": len(self),
            "base": self.metadata.get("base"),
            "ops": self.metadata.get("ops", [])[-4:],
        }

    # -- I/O -----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, progress: bool = False, **extra: Any) -> Path:
        """Write the diff as a safetensors artifact (streamed tensor by tensor; atomic). Returns the path."""
        meta = {**{k: v for k, v in self.metadata.items() if k not in _RESERVED_META}, **extra}
        items = ((n, e) for n, e in self.entries.items())
        written = _write_diff(path, items, meta, list(self.entries), progress, desc="save diff")
        return Path(written.metadata["path"])

    @classmethod
    def load(cls, path: str | os.PathLike, *, lazy: bool = False) -> WeightDiff:
        """Load a diff file, verifying it. ``lazy=True`` reads tensors on demand (each CRC-checked as read)
        — for diffs too big for memory; otherwise the whole file's digest is verified up front."""
        return _read_diff(Path(path), lazy)


# -- entry computations ----------------------------------------------------------------------------------------
def _all_flags(flags: Iterable[bool | None]) -> bool | None:
    flags = list(flags)
    if any(f is False for f in flags):
        return False
    if not flags or any(f is None for f in flags):
        return None
    return True


def _is_changed(e: DiffEntry) -> bool:
    if e.changed is not None:
        return e.changed
    return bool(e.dense().ne(0).any())


def _mapped(e: DiffEntry, fn: Callable[[Payload], Payload]) -> Callable[[], Payload]:
    return lambda: fn(e.load())


def _negate_payload(p: Payload) -> Payload:
    out = dict(p)
    if "range" in p:
        out["range"] = -p["range"]  # codes unchanged: r0 + c·(r1 − r0)/(n−1) negates exactly
    else:
        out["values"] = -p["values"]
    return out


def _scale_payload(e: DiffEntry, p: Payload, c: float) -> Payload:
    out = dict(p)
    if "range" in p:
        out["range"] = p["range"] * c
    else:
        out["values"] = (p["values"].to(torch.promote_types(e.dtype, torch.float32)) * c).to(e.dtype)
    return out


def _mask_payload(e: DiffEntry, p: Payload, bits: torch.Tensor) -> Payload:
    bits = bits.to(torch.bool).expand(e.shape)
    if e.storage == "quantized":
        old = p.get("mask")
        codes_full = torch.zeros(e.shape, dtype=torch.int32)
        present = old if old is not None else torch.ones(e.shape, dtype=torch.bool)
        codes_full[present] = p["codes"].to(torch.int32)
        new_mask = present & bits
        return {"mask": new_mask, "codes": codes_full[new_mask], "range": p["range"]}
    return _sparse_payload(_decode(e, p), bits)


def _sparsify(e: DiffEntry, p: Payload) -> Payload:
    delta = _decode(e, p)
    return _sparse_payload(delta, delta != 0)


def _quantize_payload(e: DiffEntry, p: Payload, levels: int) -> Payload:
    if e.storage == "quantized":
        mask = p.get("mask")
        values = _decode(e, p)
        values = values[mask] if mask is not None else values.reshape(-1)
    elif e.storage == "sparse":
        mask, values = p["mask"], p["values"]
    else:
        mask, values = None, p["values"].reshape(-1)
    v = values.to(torch.float32) if values.dtype != torch.float64 else values
    lo = v.min() if v.numel() else v.new_zeros(())
    hi = v.max() if v.numel() else v.new_zeros(())
    step = (hi - lo) / (levels - 1)
    codes = (
        torch.zeros(v.shape, dtype=torch.uint8)
        if step == 0
        else ((v - lo) / step).round().clamp_(0, levels - 1)
    )
    out: Payload = {"codes": codes.to(torch.uint8), "range": torch.stack([lo, hi]).to(e.dtype)}
    if mask is not None:
        out["mask"] = mask
    return out


def _between_entry(
    base: torch.Tensor, tuned: torch.Tensor, dtype: torch.dtype | None, storage: str
) -> DiffEntry:
    if not base.is_floating_point() or not tuned.is_floating_point():
        raise ValueError(f"Diffs are defined on floating-point weights, got {base.dtype} / {tuned.dtype}.")
    dt = dtype or torch.promote_types(torch.promote_types(base.dtype, tuned.dtype), torch.float32)
    delta = tuned.to(dt, copy=True).sub_(base)  # one temporary of Δ's size
    changed = not _bitwise_equal(base, tuned)
    exact = tuned.dtype == base.dtype and _bitwise_equal(_plus(base, delta, 1.0), tuned)
    exact_inv = tuned.dtype == base.dtype and _bitwise_equal(_plus(tuned, delta, -1.0), base)
    fields = {
        "base": tensor_fingerprint(base),
        "target": tensor_fingerprint(tuned),
        "exact": exact,
        "exact_inverse": exact_inv,
        "changed": changed,
    }
    if storage == "dense":
        return _dense_entry(delta, **fields)
    nz = delta != 0
    sparse_bytes = math.ceil(delta.numel() / 8) + int(nz.sum()) * delta.element_size()
    if storage == "auto" and sparse_bytes >= delta.numel() * delta.element_size():
        return _dense_entry(delta, **fields)
    return DiffEntry(tuple(delta.shape), delta.dtype, "sparse", _const(_sparse_payload(delta, nz)), **fields)


_CHUNK = 1 << 18  # elements per step of the blocked update: cache-sized, no large temporaries
_NEG_ZERO = {2: -(1 << 15), 4: -(1 << 31), 8: -(1 << 63)}


def _plus_blocks(
    theta: torch.Tensor, delta: torch.Tensor, scale: float
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``θ + scale·Δ`` in cache-sized blocks ``(start, end, values)`` through reused buffers (the values are
    overwritten by the next block). Computed in the wider dtype and cast back; where Δ = 0, θ is kept bit for
    bit — ``x + 0`` is ``x`` except for ``−0.0``, so the select only runs on blocks where θ holds one."""
    ct = torch.promote_types(torch.promote_types(theta.dtype, delta.dtype), torch.float32)
    tf, df = theta.contiguous().reshape(-1), delta.contiguous().reshape(-1)
    n = tf.numel()
    neg_zero = _NEG_ZERO.get(tf.element_size())
    ti = tf.view(_INT_VIEW[tf.element_size()]) if neg_zero is not None else None
    buf = torch.empty(min(n, _CHUNK), dtype=ct)
    obuf = torch.empty(min(n, _CHUNK), dtype=theta.dtype)
    mask = torch.empty(min(n, _CHUNK), dtype=torch.bool)
    for i in range(0, n, _CHUNK):
        j = min(i + _CHUNK, n)
        b, o, m = buf[: j - i], obuf[: j - i], mask[: j - i]
        b.copy_(tf[i:j])
        if scale == 1.0:
            b.add_(df[i:j])
        else:
            b.add_(df[i:j], alpha=scale)
        o.copy_(b)
        if ti is not None and int(ti[i:j].min()) == neg_zero:  # −0.0 is the smallest integer pattern
            torch.eq(df[i:j], 0, out=m)
            torch.where(m, tf[i:j], o, out=o)
        yield i, j, o


def _plus(theta: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """``θ + scale·Δ`` as a new tensor (see :func:`_plus_blocks`)."""
    out = torch.empty(theta.shape, dtype=theta.dtype)
    of = out.view(-1)
    for i, j, block in _plus_blocks(theta, delta, scale):
        of[i:j].copy_(block)
    return out


def _add_delta(theta: torch.Tensor, entry: DiffEntry, scale: float) -> torch.Tensor:
    return _add_payload(theta, entry, entry.load(), scale)


def _add_payload(theta: torch.Tensor, entry: DiffEntry, payload: Payload, scale: float) -> torch.Tensor:
    if entry.storage == "sparse":  # touch only the masked coordinates
        mask = payload["mask"]
        out = theta.clone()
        out[mask] = _plus(theta[mask], payload["values"], scale)
        return out
    return _plus(theta, _decode(entry, payload), scale)


def _apply_fn(
    name: str, entry: DiffEntry, scale: float, check_base: bool, buffer: ReadBuffer | None = None
) -> Callable[[Callable[[], torch.Tensor]], torch.Tensor | TensorBlocks]:
    """The streaming edit for one tensor: read θ and Δ, check θ's fingerprint and Δ's CRC on a helper thread
    while θ + scale·Δ is computed and written block by block; a failed check aborts the edit."""

    def fn(load: Callable[[], torch.Tensor]) -> torch.Tensor | TensorBlocks:
        theta = load()
        checks = []
        if check_base and entry.base is not None:
            checks.append(_pool().submit(tensor_fingerprint, theta))
        deferred = _DEFERRED.get(entry.load)
        if deferred is not None:
            payload, verify = deferred(buffer)
            checks.append(_pool().submit(verify))
        else:
            payload = entry.load()

        def finish() -> None:
            results = [c.result() for c in checks]  # re-raises a DiffFileError from verify()
            if check_base and entry.base is not None and results[0] != entry.base:
                raise BaseMismatchError(_mismatch_message([(name, entry.base, results[0])], 1))

        if entry.storage != "dense":
            out = _add_payload(theta, entry, payload, scale)
            finish()
            return out

        def blocks() -> Iterator[torch.Tensor]:
            yield from (block for _, _, block in _plus_blocks(theta, payload["values"], scale))
            finish()

        return TensorBlocks(theta.dtype, tuple(theta.shape), blocks())

    return fn


def _mismatch_message(bad: list[tuple[str, str, str]], total: int) -> str:
    name, want, got = bad[0]
    return (
        f"This diff was computed on different weights: {len(bad)} of {total} tensors do not match its base "
        f"(e.g. {name!r}: expected {want}, found {got}). Apply it to the model it was extracted from. To apply "
        "it to other weights on purpose (task arithmetic on an edited model), pass check_base=False (CLI: "
        "--no-check-base); to combine diffs of one base, add them first: (d1 + d2).apply(base)."
    )


def _combine(
    a: WeightDiff,
    b: WeightDiff,
    op: str,
    fingerprints: Callable[[DiffEntry, DiffEntry], tuple[str | None, str | None]],
) -> WeightDiff:
    entries: dict[str, DiffEntry] = {}
    for n in [*a.entries, *(n for n in b.entries if n not in a.entries)]:
        ea, eb = a.entries.get(n), b.entries.get(n)
        if ea is None or eb is None:
            e = ea or eb
            if op == "add":
                entries[n] = replace(e, target=None, exact=None, exact_inverse=None)
            else:
                entries[n] = e
            continue
        if ea.shape != eb.shape:
            raise ValueError(f"Cannot {op} diffs: {n!r} is {ea.shape} in one and {eb.shape} in the other.")
        dt = torch.promote_types(ea.dtype, eb.dtype)
        base, target = fingerprints(ea, eb)
        entries[n] = DiffEntry(
            ea.shape,
            dt,
            "dense",
            lambda ea=ea, eb=eb, dt=dt: {"values": ea.dense().to(dt) + eb.dense().to(dt)},
            base=base,
            target=target,
        )
    meta = {k: v for k, v in a.metadata.items() if k not in ("unchanged", "dropped", "skipped")}
    diff = WeightDiff._of(entries, meta, {"op": op, "with": b.metadata.get("ops", [])[-4:]})
    diff.metadata["scale"] = None
    return diff


def _select(names: Sequence[str], patterns: str | Iterable[str] | None, quiet: bool = False) -> list[str]:
    if patterns is None:
        return list(names)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    keep = []
    for pat in patterns:
        hit = [n for n in names if _match(pat, n)]
        if not hit and not quiet:
            import difflib

            close = difflib.get_close_matches(pat, list(names), n=3, cutoff=0.5)
            raise UnknownParameterError(
                f"{pat!r} matches no tensor." + (f" Nearest: {', '.join(close)}." if close else "")
            )
        keep.extend(h for h in hit if h not in keep)
    return [n for n in names if n in set(keep)]


def _progress(it: Iterable[Any], total: int, enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="tensor", leave=False)


# -- LoRA ------------------------------------------------------------------------------------------------------
def _lora_from_model(model: nn.Module, adapter: str | None, dtype: torch.dtype) -> WeightDiff:
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


# -- TALL masks and consensus ----------------------------------------------------------------------------------
def tall_masks(
    task_diffs: Mapping[str, WeightDiff] | Sequence[WeightDiff],
    lam: float | Sequence[float] | Mapping[str, float] = 0.4,
    merged: WeightDiff | None = None,
) -> dict[str, ParamMask] | list[ParamMask]:
    """TALL masks: ``m_t = 1{|τ_t| > λ_t·|τ_MTL − τ_t|}`` (strict ``>``, as the reference code).

    ``τ_MTL`` is ``merged`` or, by default, the sum of the task vectors. ``θ₀ + m_t ⊙ τ_MTL`` reconstructs
    task ``t`` (``merged.restrict(mask=m_t).apply(base)``); when the tasks' supports are disjoint the
    reconstruction is exact. Returns masks in the input's shape (a dict by task name, or a list).
    """
    keys = list(task_diffs) if isinstance(task_diffs, Mapping) else list(range(len(task_diffs)))
    diffs = [task_diffs[k] for k in keys]
    if not diffs:
        raise ValueError("tall_masks needs at least one task diff.")
    if isinstance(lam, Mapping):
        missing = [k for k in keys if k not in lam]
        if missing:
            raise ValueError(f"No λ for task(s) {missing}.")
        lams = [float(lam[k]) for k in keys]
    elif isinstance(lam, int | float):
        lams = [float(lam)] * len(diffs)
    else:
        lams = [float(x) for x in lam]
        if len(lams) != len(diffs):
            raise ValueError(f"{len(lams)} λ values for {len(diffs)} tasks.")
    if any(x < 0 for x in lams):
        raise ValueError(f"λ must be ≥ 0, got {lams}.")
    names = list(dict.fromkeys(n for d in diffs for n in d.names()))
    if merged is None:
        merged_t = {n: sum((d[n].to(torch.float64) for d in diffs if n in d), torch.zeros(())) for n in names}
    else:
        merged_t = {n: merged[n].to(torch.float64) for n in names if n in merged}
        missing = [n for n in names if n not in merged]
        if missing:
            raise ValueError(f"The merged diff lacks {missing[:3]}… that the task diffs change.")
    masks: list[ParamMask] = []
    for d, lam_t in zip(diffs, lams):
        bits = {}
        for n in names:
            tau = d[n].to(torch.float64) if n in d else torch.zeros(merged_t[n].shape, dtype=torch.float64)
            bits[n] = tau.abs() > lam_t * (merged_t[n] - tau).abs()
        masks.append(
            ParamMask(
                bits, metadata={"tall": {"lambda": lam_t, "rule": "|tau_t| > lambda*|tau_MTL - tau_t|"}}
            )
        )
    return dict(zip(keys, masks)) if isinstance(task_diffs, Mapping) else masks


def consensus_mask(masks: Mapping[Any, ParamMask] | Sequence[ParamMask], k: int = 2) -> ParamMask:
    """Coordinates that at least ``k`` of the task masks keep (TALL "consensus").

    ``k = 0`` keeps everything, ``k = 1`` is the union, ``k = T`` the intersection, ``k > T`` keeps nothing
    (a warning says so).
    """
    masks = list(masks.values()) if isinstance(masks, Mapping) else list(masks)
    if not masks:
        raise ValueError("consensus_mask needs at least one mask.")
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k={k!r}: use an integer ≥ 0.")
    if k > len(masks):
        warnings.warn(f"k={k} > {len(masks)} tasks: the consensus mask keeps nothing.", stacklevel=2)
    names = list(dict.fromkeys(n for m in masks for n in m.names()))
    bits = {}
    for n in names:
        shapes = {tuple(m.shape(n)) for m in masks if n in m}
        if len(shapes) > 1:
            raise ValueError(f"The masks disagree on the shape of {n!r}: {sorted(shapes)}.")
        shape = shapes.pop()
        count = torch.zeros(shape, dtype=torch.int32)
        for m in masks:
            if n in m:
                count += m[n].to(torch.int32)
        bits[n] = count >= k
    return ParamMask(bits, metadata={"consensus": {"k": k, "tasks": len(masks)}})


def consensus_merge(
    task_diffs: Mapping[str, WeightDiff] | Sequence[WeightDiff],
    k: int = 2,
    lam: float | Sequence[float] | Mapping[str, float] = 0.4,
) -> WeightDiff:
    """Consensus merging: ``τ_MTL`` (the sum of the task vectors) kept only where ≥ ``k`` TALL masks agree."""
    diffs = list(task_diffs.values()) if isinstance(task_diffs, Mapping) else list(task_diffs)
    merged = diffs[0]
    for d in diffs[1:]:
        merged = merged + d
    mask = consensus_mask(tall_masks(diffs, lam, merged), k)
    return merged.restrict(mask=mask)


# -- file I/O --------------------------------------------------------------------------------------------------
def _meta_digest(metadata: Mapping[str, str]) -> str:
    skip = {"hfhooks.digest", "hfhooks.meta_digest"}
    return hashlib.sha256(
        json.dumps({k: v for k, v in sorted(metadata.items()) if k not in skip}).encode()
    ).hexdigest()


class _DataFile(Mapping[str, torch.Tensor]):
    """The data section of a file being written, from byte ``base`` on; tensors are read back one at a time
    (a lazy mapping, so the artifact digest never needs more than one tensor in memory)."""

    def __init__(self, fd: int, base: int):
        self.fd, self.base = fd, base
        self.infos: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self.size = 0
        os.lseek(fd, base, os.SEEK_SET)

    def add(self, name: str, t: torch.Tensor) -> str:
        data = _tensor_bytes(t)
        _write_all(self.fd, data)
        self.infos[name] = (t.dtype, tuple(t.shape), self.size, self.size + data.nbytes)
        self.size += data.nbytes
        return f"{zlib.crc32(data):08x}"

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype, shape, start, end = self.infos[name]
        buf = bytearray(end - start)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = os.preadv(self.fd, [view[got:]], self.base + start + got)
            if n <= 0:
                raise OSError("the file being written ended early")
            got += n
        return torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)


def _entry_meta(e: DiffEntry, crcs: dict[str, str], nnz: int | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "shape": list(e.shape),
        "dtype": _dtype_name(e.dtype),
        "storage": e.storage,
        "base": e.base,
        "target": e.target,
        "exact": e.exact,
        "exact_inverse": e.exact_inverse,
        "changed": e.changed,
        "crc32": crcs,
    }
    if nnz is not None:
        info["nnz"] = nnz
    if e.storage == "quantized":
        info["levels"], info["bits"] = e.levels, _code_bits(e.levels)
    return info


def _header_bytes(metadata: Mapping[str, str], data: _DataFile) -> bytes:
    from hfhooks.checkpoints import _CODES

    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    for name, (dtype, shape, start, end) in data.infos.items():
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [start, end]}
    return json.dumps(header, separators=(",", ":")).encode()


def _write_diff(
    path: str | os.PathLike,
    items: Iterable[tuple[str, DiffEntry | None]],
    meta: Mapping[str, Any],
    names: Sequence[str],
    progress: bool,
    desc: str,
) -> WeightDiff:
    """Stream entries into a diff file, atomically.

    Tensors are written straight into the data section behind a reserved header (one pass, one tensor in
    memory); the header — which needs every tensor's offsets, CRCs and exactness — is written last, padded with
    spaces (valid JSON) to the reserved size. A header that outgrows its reservation is rewritten in front of a
    copy of the data (slower, still correct).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    reserve = 65536 + sum(2048 + 24 * len(n) for n in names) + 4 * len(json.dumps(meta, default=str))
    reserve += -reserve % 8
    data = _DataFile(fd, 8 + reserve)
    try:
        infos: dict[str, dict[str, Any]] = {}
        per_base: dict[str, tuple[tuple[int, ...], str | None]] = {}
        per_target: dict[str, tuple[tuple[int, ...], str | None]] = {}
        unchanged: list[str] = list(meta.get("unchanged", []))
        for name, entry in _progress(items, len(names), progress, desc):
            if entry is None:
                unchanged.append(name)
                continue
            if _SEP in name:
                raise ValueError(f"Tensor name {name!r} contains {_SEP!r}, which diff files reserve.")
            payload = entry.load()
            stored = _stored(name, entry, payload)
            crcs = {k: data.add(k, v) for k, v in sorted(stored.items())}
            nnz = int(payload["mask"].sum()) if payload.get("mask") is not None else None
            infos[name] = _entry_meta(entry, crcs, nnz)
            per_base[name] = (entry.shape, entry.base)
            per_target[name] = (entry.shape, entry.target)
            del payload, stored
        full_meta = {k: v for k, v in meta.items() if k not in _RESERVED_META}
        full_meta.update(
            {
                "base": _model_fingerprint(per_base),
                "target": _model_fingerprint(per_target),
                "exact": _all_flags(i["exact"] for i in infos.values()),
                "exact_inverse": _all_flags(i["exact_inverse"] for i in infos.values()),
                "unchanged": unchanged,
                "tensors": infos,
            }
        )
        metadata = {
            "format": "pt",
            "hfhooks.kind": "diff",
            "hfhooks.version": __version__,
            "hfhooks.format_version": FORMAT_VERSION,
        }
        for key, value in full_meta.items():
            metadata[f"hfhooks.{key}"] = json.dumps(value)
        metadata["hfhooks.meta_digest"] = json.dumps(_meta_digest(metadata))
        metadata["hfhooks.digest"] = _digest(metadata, data)
        raw = _header_bytes(metadata, data)
        if len(raw) <= reserve:
            os.pwrite(fd, reserve.to_bytes(8, "little") + raw + b" " * (reserve - len(raw)), 0)
        else:  # pragma: no cover - only with enormous metadata
            raw += b" " * (-len(raw) % 8)
            fd2, tmp2 = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                _write_all(fd2, memoryview(len(raw).to_bytes(8, "little") + raw))
                _copy_range(fd, fd2, 8 + reserve, data.size)
            finally:
                os.close(fd2)
            os.replace(tmp2, tmp)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    diff = _read_diff(path, lazy=True)
    diff.metadata["path"] = str(path)
    return diff


def _read_diff(path: Path, lazy: bool) -> WeightDiff:
    from hfhooks.artifacts import read_artifact

    def bad(why: str) -> DiffFileError:
        return DiffFileError(f"{path}: {why}")

    if lazy:
        try:
            header, raw_meta = read_safetensors_header(path)
        except CheckpointError as e:
            raise DiffFileError(str(e)) from None
        if raw_meta.get("hfhooks.kind") != "diff":
            found = raw_meta.get("hfhooks.kind")
            raise bad(f"not an hfhooks diff file (hfhooks.kind = {found!r}).")
        if raw_meta.get("hfhooks.format_version") != FORMAT_VERSION:
            raise bad(
                f"format_version {raw_meta.get('hfhooks.format_version')!r}; this hfhooks reads {FORMAT_VERSION!r}."
            )
        if raw_meta.get("hfhooks.meta_digest") != json.dumps(_meta_digest(raw_meta)):
            raise bad("failed its metadata integrity check (the header was modified or corrupted).")
        meta: dict[str, Any] = {}
        for key, value in raw_meta.items():
            if key.startswith("hfhooks.") and key not in (
                "hfhooks.kind",
                "hfhooks.version",
                "hfhooks.format_version",
                "hfhooks.digest",
                "hfhooks.meta_digest",
            ):
                try:
                    meta[key[len("hfhooks.") :]] = json.loads(value)
                except (ValueError, RecursionError):
                    raise bad(f"metadata {key!r} is not valid JSON.") from None
        shapes = {n: (i.dtype, i.shape) for n, i in header.items()}
        reader = _LazyReader(path)
    else:
        try:
            tensors, meta = read_artifact(path, "diff")
        except DiffFileError:
            raise
        except ArtifactError as e:
            raise DiffFileError(str(e)) from None
        if meta.get("meta_digest") != _meta_digest(_raw_metadata(path)):
            raise bad("failed its metadata integrity check.")
        shapes = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
        reader = None
    info = meta.pop("tensors", None)
    if not isinstance(info, dict):
        raise bad("'hfhooks.tensors' metadata is missing or not an object.")
    claimed: set[str] = set()
    diff = WeightDiff(metadata={k: v for k, v in meta.items() if k not in _RESERVED_META})
    if not isinstance(diff.metadata.get("ops"), list):
        diff.metadata["ops"] = []
    for name, entry_info in info.items():
        try:
            entry, parts = _decode_entry_meta(name, entry_info, shapes)
        except (ValueError, TypeError, KeyError) as e:
            raise bad(f"tensor {name!r}: {e}") from None
        claimed.update(parts)
        if reader is None:
            payload = _payload_from(entry, name, {p: tensors[p] for p in parts}, path)
            diff.entries[name] = replace(entry, load=_const(payload))
        else:
            diff.entries[name] = replace(entry, load=reader.loader(entry, name, parts, entry_info["crc32"]))
    extra = sorted(set(shapes) - claimed)
    if extra:
        raise bad(f"holds tensors its metadata does not describe (e.g. {extra[0]!r}).")
    diff.metadata["path"] = str(path)
    return diff


def _raw_metadata(path: Path) -> dict[str, str]:
    return read_safetensors_header(path)[1]


def _decode_entry_meta(
    name: str, info: Any, shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
) -> tuple[DiffEntry, list[str]]:
    if not isinstance(info, dict):
        raise ValueError("metadata entry is not an object")
    shape, storage = info.get("shape"), info.get("storage")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ValueError(f"invalid shape {shape!r}")
    if math.prod(shape) >= 1 << 48:
        raise ValueError(f"shape {shape} is implausibly large")
    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r} is not one of {STORAGES}")
    dtype = _parse_dtype(info.get("dtype"))
    numel = math.prod(shape)
    for flag in ("exact", "exact_inverse", "changed"):
        if info.get(flag) not in (True, False, None):
            raise ValueError(f"{flag} must be true, false or null, got {info.get(flag)!r}")
    for fp in ("base", "target"):
        if info.get(fp) is not None and not isinstance(info.get(fp), str):
            raise ValueError(f"{fp} fingerprint must be a string or null")
    levels = None
    if storage == "dense":
        parts = {name: (dtype, tuple(shape))}
    else:
        nnz = info.get("nnz")
        masked = name + _SEP + "mask" in shapes
        if masked and (type(nnz) is not int or not 0 <= nnz <= numel):
            raise ValueError(f"nnz {nnz!r} is not a count between 0 and {numel}")
        count = nnz if masked else numel
        parts = {}
        if masked:
            parts[name + _SEP + "mask"] = (torch.uint8, (-(-numel // 8),))
        if storage == "sparse":
            if not masked:
                raise ValueError("sparse storage needs a ::mask tensor")
            parts[name + _SEP + "values"] = (dtype, (count,))
        else:
            levels = info.get("levels")
            if type(levels) is not int or not 2 <= levels <= 256:
                raise ValueError(f"levels {levels!r} must be an integer from 2 to 256")
            if info.get("bits") != _code_bits(levels):
                raise ValueError(f"bits {info.get('bits')!r} does not match {levels} levels")
            parts[name + _SEP + "codes"] = (torch.uint8, (-(-count // (8 // _code_bits(levels))),))
            parts[name + _SEP + "range"] = (dtype, (2,))
    for part, (want_dtype, want_shape) in parts.items():
        if part not in shapes:
            raise ValueError(f"the file lacks tensor {part!r}")
        got_dtype, got_shape = shapes[part]
        if got_dtype != want_dtype or tuple(got_shape) != want_shape:
            raise ValueError(
                f"{part!r} is {_dtype_name(got_dtype)} {tuple(got_shape)}, expected {_dtype_name(want_dtype)} {want_shape}"
            )
    crcs = info.get("crc32")
    if (
        not isinstance(crcs, dict)
        or set(crcs) != set(parts)
        or not all(isinstance(v, str) for v in crcs.values())
    ):
        raise ValueError("crc32 must map each stored tensor to its checksum")
    entry = DiffEntry(
        tuple(shape),
        dtype,
        storage,
        _const({}),
        base=info.get("base"),
        target=info.get("target"),
        exact=info.get("exact"),
        exact_inverse=info.get("exact_inverse"),
        changed=info.get("changed"),
        levels=levels,
    )
    return entry, list(parts)


def _payload_from(entry: DiffEntry, name: str, parts: Mapping[str, torch.Tensor], path: Path) -> Payload:
    try:
        if entry.storage == "dense":
            return {"values": parts[name]}
        numel = entry.numel()
        payload: Payload = {}
        if name + _SEP + "mask" in parts:
            payload["mask"] = _unpack_bits(parts[name + _SEP + "mask"], numel).reshape(entry.shape)
            count = int(payload["mask"].sum())
            if (name + _SEP + "values" in parts and parts[name + _SEP + "values"].numel() != count) or (
                entry.storage == "quantized"
                and parts[name + _SEP + "codes"].numel() != -(-count // (8 // _code_bits(entry.levels)))
            ):
                raise ValueError(f"the mask sets {count} bits but the stored values do not match")
        else:
            count = numel
        if entry.storage == "sparse":
            payload["values"] = parts[name + _SEP + "values"]
        else:
            codes = _unpack_codes(parts[name + _SEP + "codes"], _code_bits(entry.levels), count)
            if count and int(codes.max()) >= entry.levels:
                raise ValueError(f"a code exceeds levels - 1 = {entry.levels - 1}")
            payload["codes"] = codes
            payload["range"] = parts[name + _SEP + "range"]
        return payload
    except ValueError as e:
        raise DiffFileError(f"{path}: tensor {name!r}: {e}") from None


class _LazyReader:
    """Reads a diff file's entries on demand with ``safe_open``, checking each tensor's CRC-32.

    ``load()`` verifies before returning. :func:`_deferred_loader` exposes the same read with the checks
    returned as a callable, so :meth:`WeightDiff.apply` can run them on a helper thread (``zlib.crc32``
    releases the GIL) while the update is computed.
    """

    def __init__(self, path: Path):
        self.path = path
        self._infos: dict[str, TensorInfo] | None = None

    def info(self, part: str) -> TensorInfo:
        """Where a stored tensor lives in the file (the header is parsed once, on first use)."""
        if self._infos is None:
            self._infos = read_safetensors_header(self.path)[0]
        return self._infos[part]

    def loader(
        self, entry: DiffEntry, name: str, parts: list[str], crcs: Mapping[str, str]
    ) -> Callable[[], Payload]:
        def read(buffer: ReadBuffer | None = None) -> tuple[Payload, Callable[[], None]]:
            from safetensors import safe_open

            tensors = {}
            try:
                if buffer is not None and entry.storage == "dense" and len(parts) == 1:
                    tensors[parts[0]] = buffer.read(self.info(parts[0]))  # no page faults on a memory map
                else:
                    with safe_open(str(self.path), framework="pt") as f:
                        for part in parts:
                            tensors[part] = f.get_tensor(part)
            except Exception as e:
                raise DiffFileError(f"{self.path}: cannot read {name!r}: {e}") from None

            def verify() -> None:
                for part, t in tensors.items():
                    if _crc(t) != crcs[part]:
                        raise DiffFileError(
                            f"{self.path}: tensor {part!r} failed its CRC-32 check (corrupted file)."
                        )

            if entry.storage != "dense":
                verify()  # decoding reads masks and codes: check them first
                return _payload_from(entry, name, tensors, self.path), lambda: None
            return _payload_from(entry, name, tensors, self.path), verify

        def load() -> Payload:
            payload, verify = read()
            verify()
            return payload

        _DEFERRED[load] = read
        return load


_DEFERRED: weakref.WeakKeyDictionary[
    Callable[[], Payload], Callable[[], tuple[Payload, Callable[[], None]]]
] = weakref.WeakKeyDictionary()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfhooks-crc")
    return _POOL
