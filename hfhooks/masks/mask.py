"""``ParamMask``: which coordinates of which parameters may change (1 = trainable / kept).

A mask is keyed by canonical parameter names (see :mod:`hfhooks.core.params`). Each entry is one of:

* ``element`` — a bool tensor of the parameter's shape;
* ``row`` — a bool vector over dim 0 (whole output rows of a Linear, e.g. MLP units of an up-projection);
* ``column`` — a bool vector over dim 1 (whole input columns, e.g. MLP units of a down-projection).

Names absent from a mask are treated as all-zero by the set algebra (``&``, ``|``); ``~`` inverts within
the mask's own names. :meth:`ParamMask.complete` adds the model's other parameters with a fill value.

Saved files are safetensors with one ``U8`` tensor per parameter holding the bit-packed mask (big bit order,
as ``numpy.packbits``) — 1 bit per element — plus metadata giving shapes, granularity, density, the score
and selection used, and a fingerprint of the model. Read one without hfhooks::

    from safetensors import safe_open; import numpy as np, json
    with safe_open("mask.safetensors", "np") as f:
        info = json.loads(f.metadata()["hfhooks.tensors"])
        name = next(iter(info)); meta = info[name]
        bits = np.unpackbits(f.get_tensor(name), count=meta["length"]).astype(bool)
        # element masks: bits.reshape(meta["shape"]); row/column masks: one flag per row/column
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hfhooks.core.layers import Slices
from hfhooks.core.params import ParamIndex, UnknownParameterError
from hfhooks.io.artifacts import (
    ArtifactError,
    bits_as_bytes,
    count_ones,
    model_fingerprint,
    read_artifact,
    reraise_as,
    write_artifact,
)
from hfhooks.io.hub import HubMixin
from hfhooks.masks.topk import iter_topk_masks

__all__ = [
    "GRANULARITIES",
    "MaskFileError",
    "ParamMask",
    "bits_as_bytes",
    "count_ones",
]  # the bit helpers: for enforcers

GRANULARITIES = ("element", "row", "column")
_AXIS = {"row": 0, "column": 1}
_SEMANTICS = "1=trainable"
# What a 1 means. "1=dedicated" is a routing mask (hfhooks.dedicated_mask): a 1 is a coordinate that holds the
# forget domain and is ablated later, not one that may train; ablate / Router check it (hfhooks.routing.ablation.check_dedicated).
_KNOWN_SEMANTICS = (_SEMANTICS, "1=dedicated")
_RESERVED_META = ("tensors", "semantics", "kind", "version", "format_version", "digest")


class MaskFileError(ArtifactError):
    """A mask file that cannot be loaded: corrupt, truncated, foreign, or internally inconsistent."""


def _pack(bits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bool / 0-1 tensor -> packed ``uint8`` bytes (big bit order, zero padding), on the CPU (into ``out``, a
    CPU ``uint8`` vector of ``ceil(numel / 8)`` bytes, if given)."""
    flat = bits.detach().reshape(-1).cpu()
    if flat.dtype != torch.bool:
        flat = flat.bool()
    packed = torch.from_numpy(np.packbits(flat.numpy(), bitorder="big"))
    return packed if out is None else out.copy_(packed)


def _clear_padding(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Zero the padding bits after ``length`` in the last byte (in place); returns ``packed``."""
    pad = 8 * packed.numel() - length
    if pad:
        packed[-1] &= (0xFF << pad) & 0xFF
    return packed


def _gather_bits(slices: list[tuple[torch.Tensor, int]], group: Any) -> list[tuple[torch.Tensor, int]]:
    """For each tensor, every rank's slice — given bit-packed (CPU ``uint8``, :func:`_pack`) with its length in
    bits — concatenated in rank order, bit-packed, and its length in bits (a collective: two ``all_gather`` calls
    for all tensors together).

    The slices travel packed (1 bit per element); a byte-aligned slice is appended as is, an unaligned one is
    unpacked to its bits first (one byte per element of that tensor, transiently).
    """
    world = dist.get_world_size(group)
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    mine = torch.tensor([n for _, n in slices], dtype=torch.int64, device=device)
    lengths = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(lengths, mine, group=group)
    lengths = torch.stack(lengths).cpu()  # (world, tensors)
    nbytes = (lengths + 7) // 8
    width = int(nbytes.sum(1).max())
    buf = torch.zeros(width, dtype=torch.uint8)
    torch.cat([p for p, _ in slices] or [buf[:0]], out=buf[: int(nbytes[dist.get_rank(group)].sum())])
    pieces = [torch.empty(width, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(pieces, buf.to(device), group=group)
    pieces = [p.cpu() for p in pieces]
    out = []
    for i in range(len(slices)):
        starts = nbytes[:, :i].sum(1).tolist()
        parts = [pieces[r][starts[r] : starts[r] + int(nbytes[r, i])] for r in range(world)]
        ns = lengths[:, i].tolist()
        if all(n % 8 == 0 for n in ns[:-1]):  # byte-aligned: packed slices concatenate as they are
            out.append((torch.cat(parts), sum(ns)))
        else:
            flat = torch.cat([bits_as_bytes(p, n) for p, n in zip(parts, ns)])
            out.append((_pack(flat.view(torch.bool)), sum(ns)))
    return out


@dataclass(frozen=True)
class _Entry:
    """One tensor's mask, bit-packed: 1 bit per element (element) or per row / column (row, column).

    ``packed`` is the mask file's own representation (``numpy.packbits``, big bit order, zero padding), so
    loading, saving, counting and the set algebra never materialise one byte per element; :attr:`bits` and
    :meth:`dense` unpack one tensor on demand.
    """

    granularity: str
    shape: tuple[int, ...]
    packed: torch.Tensor  # uint8, ceil(length / 8) bytes, CPU
    length: int  # element: prod(shape); row: shape[0]; column: shape[1]
    ones: int

    @classmethod
    def of(cls, granularity: str, shape: tuple[int, ...], bits: torch.Tensor) -> _Entry:
        packed = _pack(bits)
        return cls(granularity, shape, packed, bits.numel(), count_ones(packed))

    @classmethod
    def from_packed(
        cls, granularity: str, shape: tuple[int, ...], packed: torch.Tensor, length: int
    ) -> _Entry:
        return cls(granularity, shape, packed, length, count_ones(packed))

    @property
    def bits(self) -> torch.Tensor:
        """bool; element: ``shape``; row: ``(shape[0],)``; column: ``(shape[1],)`` (a fresh unpacked tensor)."""
        flat = bits_as_bytes(self.packed, self.length).view(torch.bool)
        return flat.reshape(self.shape) if self.granularity == "element" else flat

    def dense(self) -> torch.Tensor:
        if self.granularity == "element":
            return self.bits
        axis = _AXIS[self.granularity]
        view = [1] * len(self.shape)
        view[axis] = self.shape[axis]
        return self.bits.reshape(view).expand(self.shape)

    def count(self) -> int:
        if self.granularity == "element":
            return self.ones
        axis_len = self.shape[_AXIS[self.granularity]]
        return self.ones * (math.prod(self.shape) // axis_len) if axis_len else 0

    def numel(self) -> int:
        return math.prod(self.shape)

    def same_bits(self, other: _Entry) -> bool:
        """Same shape and same mask (compared packed when the granularities agree)."""
        if self.shape != other.shape:
            return False
        if self.granularity == other.granularity:
            return torch.equal(self.packed, other.packed)
        return torch.equal(self.dense(), other.dense())


def _selection_metadata(scores: Any, ratio: float, scope: str, largest: bool) -> dict:
    """The scores' metadata plus how the mask was selected from them (recorded in the mask file)."""
    meta = dict(getattr(scores, "metadata", {}) or {})
    meta["selection"] = {
        "ratio": ratio,
        "scope": scope,
        "largest": largest,
        "ties": "stable: earlier tensor, lower flat index",
    }
    return meta


class ParamMask(HubMixin):
    """A 0/1 mask over a model's parameters, keyed by canonical names.

    Build one from scores (:meth:`from_scores`), from structural slices (:meth:`from_slices`), from bool
    tensors (``ParamMask({"name": bool_tensor})``) or from a file (:meth:`load`).

    >>> import torch
    >>> m = ParamMask.from_scores({"w": torch.tensor([[0.1, 0.9], [0.5, 0.2]])}, ratio=0.5)
    >>> m["w"].tolist(), m.density()
    ([[False, True], [True, False]], 0.5)
    """

    hub_filename = "mask.safetensors"  # the file from_pretrained / save_pretrained / push_to_hub use

    def __init__(
        self, masks: Mapping[str, torch.Tensor] | None = None, *, metadata: Mapping[str, Any] | None = None
    ):
        self._entries: dict[str, _Entry] = {}
        for name, bits in (masks or {}).items():
            bits = torch.as_tensor(bits)
            if bits.dtype != torch.bool:
                if bits.is_floating_point() or not bool(((bits == 0) | (bits == 1)).all()):
                    raise ValueError(
                        f"Mask for {name!r} must be boolean or 0/1 integers, got dtype {bits.dtype}."
                    )
                bits = bits.bool()
            self._entries[name] = _Entry.of("element", tuple(bits.shape), bits)
        self.metadata: dict[str, Any] = dict(metadata or {})

    # -- constructors --------------------------------------------------------------------------------------
    @classmethod
    def _from_entries(
        cls, entries: Mapping[str, _Entry], metadata: Mapping[str, Any] | None = None
    ) -> ParamMask:
        mask = cls(metadata=metadata)
        mask._entries = dict(entries)
        return mask

    @classmethod
    def from_scores(
        cls,
        scores: Mapping[str, torch.Tensor],
        ratio: float,
        scope: str = "global",
        largest: bool = True,
    ) -> ParamMask:
        """Keep the top ``ratio`` fraction of elements by score (the bottom fraction if ``largest=False``).

        ``scope="global"`` applies one threshold across all tensors (SalUn); ``"tensor"`` selects within each
        tensor. Selection is exact and memory-bounded (no concatenation or full sort; see
        :func:`hfhooks.masks.topk.topk_masks`). Exactly ``round(ratio * N)`` elements are kept; ties at the
        threshold go to earlier tensors (in ``scores`` order) and, within a tensor, lower flat indices.
        """
        # Packed as each tensor's mask is selected: one tensor's bool mask at a time, not one byte per score. The
        # packed buffers are allocated first, all together: made one by one between the selection's transients
        # they would fragment the heap (glibc then keeps the holes resident: +38 % peak RSS measured on 192M scores).
        packed = {n: torch.empty((t.numel() + 7) // 8, dtype=torch.uint8) for n, t in scores.items()}
        entries = {}
        for name, bits in iter_topk_masks(scores, ratio, scope=scope, largest=largest):
            entries[name] = _Entry.from_packed(
                "element", tuple(bits.shape), _pack(bits, out=packed.pop(name)), bits.numel()
            )
        return cls._from_entries(entries, metadata=_selection_metadata(scores, ratio, scope, largest))

    @classmethod
    def from_sharded_scores(
        cls,
        scores: Mapping[str, torch.Tensor],
        ratio: float,
        shapes: Mapping[str, Iterable[int]],
        scope: str = "global",
        largest: bool = True,
        group: Any = None,
    ) -> ParamMask:
        """:meth:`from_scores` over scores sharded across ranks; every rank gets the same full mask (a collective).

        ``scores[name]`` is this rank's contiguous slice of the flat scores of a tensor of shape
        ``shapes[name]``, the slices in rank order (an FSDP2 ``Shard(0)`` local shard, a ZeRO-3 partition; an
        empty tensor where this rank holds none of it). The top-k is selected on the slices with summed
        histograms (:func:`hfhooks.masks.topk.topk_masks` with ``sharded=True``) and the bit-packed slices are
        gathered, so no rank ever holds another rank's scores, and the mask equals bit for bit the one
        :meth:`from_scores` computes from the full scores (same threshold, same tie order).
        """
        # each local mask packed as soon as it is selected (one tensor's bool slice at a time, as from_scores);
        # the selection is a collective: every rank iterates it to the end
        local = {
            name: (_pack(bits), bits.numel())
            for name, bits in iter_topk_masks(
                scores, ratio, scope=scope, largest=largest, sharded=True, group=group
            )
        }
        entries = {}
        gathered = _gather_bits(list(local.values()), group)
        for name, (full, length) in zip(local, gathered):
            shape = tuple(int(d) for d in shapes[name])
            if length != math.prod(shape):
                raise ValueError(
                    f"The ranks' score slices of {name!r} hold {length} elements in all, but its shape "
                    f"{shape} has {math.prod(shape)}: each rank must pass its own contiguous slice of the "
                    "flat scores (none twice, none missing)."
                )
            entries[name] = _Entry.from_packed("element", shape, full, length)
        return cls._from_entries(entries, metadata=_selection_metadata(scores, ratio, scope, largest))

    @classmethod
    def from_slices(
        cls, slices: Slices, shapes: nn.Module | ParamIndex | Mapping[str, Iterable[int]]
    ) -> ParamMask:
        """Row/column masks from ``{name: (axis, indices)}`` (see :mod:`hfhooks.core.layers`); ``indices``
        may also be a bool vector over the axis (``True`` = selected).

        ``shapes`` is the model (or its :class:`ParamIndex`) or an explicit ``{name: shape}``. 1-D parameters
        (biases) become element masks.
        """
        if isinstance(shapes, nn.Module):
            shapes = ParamIndex(shapes)
        shape_of = (
            shapes.shapes() if isinstance(shapes, ParamIndex) else {k: tuple(v) for k, v in shapes.items()}
        )
        entries = {}
        for name, (axis, idx) in slices.items():
            if name not in shape_of and isinstance(shapes, ParamIndex) and name in shapes:
                shape_of[name] = tuple(shapes.info(name).shape)  # a tied weight's alias
            if name not in shape_of:
                raise UnknownParameterError(f"Slice names unknown parameter {name!r}.")
            shape = tuple(shape_of[name])
            if axis not in (0, 1) or axis >= len(shape):
                raise ValueError(
                    f"Axis {axis} is invalid for {name!r} of shape {shape}: use 0 (rows) or 1 (columns)."
                )
            bits = torch.zeros(shape[axis], dtype=torch.bool)
            idx = torch.as_tensor(idx).cpu()
            if idx.dtype == torch.bool:  # a selection vector, not indices (as long, it would pick rows 0 / 1)
                if idx.shape != bits.shape:
                    raise ValueError(
                        f"Boolean selection for {name!r} along axis {axis} has shape {tuple(idx.shape)}; it must "
                        f"be ({shape[axis]},) for shape {shape}, or pass the indices (selection.nonzero())."
                    )
                bits |= idx
            else:
                bits[idx.long()] = True
            gran = "element" if len(shape) == 1 else ("row" if axis == 0 else "column")
            entries[name] = _Entry.of(gran, shape, bits)
        return cls._from_entries(entries)

    @classmethod
    def full(
        cls, model: nn.Module | ParamIndex, value: bool = True, names: Iterable[str] | None = None
    ) -> ParamMask:
        """A mask of constant ``value`` over ``names`` (default: every parameter of ``model``)."""
        index = model if isinstance(model, ParamIndex) else ParamIndex(model)
        wanted = list(names) if names is not None else index.names()
        entries = {}
        for n in wanted:  # built packed: never one byte per element
            shape = tuple(index.info(n).shape)
            length = math.prod(shape)
            packed = torch.full(((length + 7) // 8,), 0xFF if value else 0, dtype=torch.uint8)
            entries[n] = _Entry(
                "element", shape, _clear_padding(packed, length), length, length if value else 0
            )
        return cls._from_entries(entries)

    # -- access --------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The dense bool mask of parameter ``name`` (an expanded view for row/column masks)."""
        if name not in self._entries:
            raise UnknownParameterError(f"{name!r} is not in this mask ({len(self)} tensors).")
        return self._entries[name].dense()

    def granularity(self, name: str) -> str:
        return self._entries[name].granularity

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def vector(self, name: str) -> torch.Tensor:
        """The stored bits, unpacked: the full bool tensor (element) or the per-row / per-column bool vector."""
        return self._entries[name].bits

    def packed(self, name: str) -> torch.Tensor:
        """The bits of :meth:`vector` as stored: a flat ``uint8`` tensor, 8 bits a byte, big bit order
        (``numpy.packbits``), zero padding — the mask file's own encoding. Do not modify it in place."""
        return self._entries[name].packed

    @property
    def nbytes(self) -> int:
        """Bytes this mask holds in memory (its packed bits: about the size of its file's tensors)."""
        return sum(e.packed.numel() for e in self._entries.values())

    def to_dict(self) -> dict[str, torch.Tensor]:
        """``{name: dense bool tensor}`` (materialised copies)."""
        return {n: e.dense().clone() for n, e in self._entries.items()}

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{name: (kept, total)}``."""
        return {n: (e.count(), e.numel()) for n, e in self._entries.items()}

    def density(self, name: str | None = None) -> float:
        """Fraction of ones in one tensor, or over all tensors when ``name`` is None."""
        if name is not None:
            if name not in self._entries:
                raise UnknownParameterError(f"{name!r} is not in this mask ({len(self)} tensors).")
            entry = self._entries[name]
            return entry.count() / entry.numel() if entry.numel() else 0.0
        kept = sum(e.count() for e in self._entries.values())
        total = sum(e.numel() for e in self._entries.values())
        return kept / total if total else 0.0

    def densities(self) -> dict[str, float]:
        return {n: (k / t if t else 0.0) for n, (k, t) in self.counts().items()}

    def __repr__(self) -> str:
        grans = sorted({e.granularity for e in self._entries.values()})
        return f"ParamMask({len(self)} tensors, {'/'.join(grans) or 'empty'}, density={self.density():.4f})"

    # -- set algebra ---------------------------------------------------------------------------------------
    def _combine(self, other: ParamMask, op) -> ParamMask:
        if not isinstance(other, ParamMask):
            return NotImplemented
        entries: dict[str, _Entry] = {}
        for name in [*self._entries, *(n for n in other._entries if n not in self._entries)]:
            a, b = self._entries.get(name), other._entries.get(name)
            if a is not None and b is not None and a.shape != b.shape:
                raise ValueError(
                    f"Cannot combine masks: {name!r} has shape {a.shape} in one and {b.shape} in the other."
                )
            ref = a or b
            if a is None or b is None:  # absent = all zero
                zero = _Entry(ref.granularity, ref.shape, torch.zeros_like(ref.packed), ref.length, 0)
                a, b = a or zero, b or zero
            if a.granularity == b.granularity:  # on the packed bytes: padding stays zero under & | and & ~
                packed = op(a.packed, b.packed)
                entries[name] = _Entry.from_packed(a.granularity, a.shape, packed, a.length)
            else:
                entries[name] = _Entry.of("element", a.shape, op(a.dense(), b.dense()))
        return ParamMask._from_entries(entries)

    def __and__(self, other: ParamMask) -> ParamMask:
        return self._combine(other, torch.bitwise_and)

    def __or__(self, other: ParamMask) -> ParamMask:
        return self._combine(other, torch.bitwise_or)

    def __sub__(self, other: ParamMask) -> ParamMask:
        """Set difference: ones of ``self`` that are not ones of ``other`` (names absent from ``other``: kept)."""
        return self._combine(other, lambda a, b: a & ~b)

    def __invert__(self) -> ParamMask:
        return ParamMask._from_entries(
            {
                n: _Entry(
                    e.granularity, e.shape, _clear_padding(~e.packed, e.length), e.length, e.length - e.ones
                )
                for n, e in self._entries.items()
            },
            # the complement no longer means what the recorded semantics / routing layout say
            {k: v for k, v in self.metadata.items() if k not in ("semantics", "routing")},
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParamMask) or set(self._entries) != set(other._entries):
            return False
        return all(self._entries[n].same_bits(other._entries[n]) for n in self._entries)

    __hash__ = None  # mutable container semantics

    def complete(self, model: nn.Module | ParamIndex, fill: bool = False) -> ParamMask:
        """This mask plus every other parameter of ``model`` filled with ``fill``."""
        index = model if isinstance(model, ParamIndex) else ParamIndex(model)
        missing = [n for n in index.names() if n not in self._entries]
        return self | ParamMask.full(index, fill, missing)

    # -- checks --------------------------------------------------------------------------------------------
    def validate(self, model: nn.Module | ParamIndex) -> dict[str, nn.Parameter]:
        """Check every name resolves in ``model`` (wrapped or not) with the right shape.

        Returns ``{canonical name: live Parameter}``. Raises :class:`~hfhooks.core.params.UnknownParameterError`
        listing the nearest names for unknown ones, and ``ValueError`` naming both shapes on a mismatch.
        An empty mask is an error: it would make every hook a silent no-op.
        """
        if not self._entries:
            raise ValueError("The mask is empty: it names no parameter, so applying it would do nothing.")
        index = model if isinstance(model, ParamIndex) else ParamIndex(model)
        resolved: dict[str, nn.Parameter] = {}
        unknown = [n for n in self._entries if n not in index]
        if unknown:
            detail = index.unknown_message(unknown[0])
            more = f" ({len(unknown)} unknown names in total)" if len(unknown) > 1 else ""
            fp = self.metadata.get("model")
            origin = (
                f" The mask was computed on a {fp.get('model_type')} model with fingerprint {fp.get('sha256')}."
                if isinstance(fp, dict)
                else ""
            )
            raise UnknownParameterError(f"Mask does not fit this model{more}. {detail}{origin}")
        for name, entry in self._entries.items():
            param = index.param(name)
            shape = tuple(
                getattr(param, "ds_shape", param.shape)
            )  # DeepSpeed ZeRO-3: .shape is a placeholder
            if shape != entry.shape:
                raise ValueError(
                    f"Mask shape mismatch for {name!r}: mask {entry.shape}, model {shape}. "
                    "The mask was computed on a different model configuration."
                )
            resolved[index.canonical(name)] = param
        self.canonical(index)  # two names of one tensor (tied weights) must not disagree
        return resolved

    def canonical(self, model: nn.Module | ParamIndex) -> ParamMask:
        """This mask keyed by canonical names: tied-weight aliases (``lm_head.weight`` of a model whose head
        shares the embedding) and wrapped names map onto the name the shared tensor is indexed under, so that
        a mask keyed by an alias acts exactly as one keyed by the canonical name.

        Names that do not resolve are kept as they are (:meth:`validate` reports them). Two names of one
        tensor with different bits raise ``ValueError``: one tensor cannot be both frozen and trained.
        """
        index = model if isinstance(model, ParamIndex) else ParamIndex(model)
        entries: dict[str, _Entry] = {}
        source: dict[str, str] = {}
        for name, entry in self._entries.items():
            canon = index.canonical(name) if name in index or index.resolves(name) else name
            if canon in entries:
                first = entries[canon]
                if not first.same_bits(entry):
                    raise ValueError(
                        f"The mask names one tensor twice with different values: {source[canon]!r} and {name!r} "
                        f"are the same parameter ({canon!r}, tied weights). Keep one of the two entries."
                    )
                continue
            entries[canon], source[canon] = entry, name
        if list(entries) == list(self._entries):
            return self
        return ParamMask._from_entries(entries, self.metadata)

    # -- I/O -----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, model: nn.Module | None = None, **extra: Any) -> Path:
        """Save as a bit-packed safetensors mask file (atomically). ``model`` adds its fingerprint."""
        tensors: dict[str, torch.Tensor] = {}
        info: dict[str, dict[str, Any]] = {}
        for name, entry in self._entries.items():
            tensors[name] = entry.packed
            info[name] = {
                "shape": list(entry.shape),
                "granularity": entry.granularity,
                "length": entry.length,
                "ones": entry.ones,
                "density": round(entry.count() / entry.numel(), 6) if entry.numel() else 0.0,
            }
        # A loaded mask's metadata carries the old file's stamp (kind, version, digest...): never write it back.
        meta = {k: v for k, v in self.metadata.items() if k not in _RESERVED_META}
        if model is not None:
            meta["model"] = model_fingerprint(model)
        meta.update(extra)
        semantics = self.metadata.get("semantics", _SEMANTICS)
        if semantics not in _KNOWN_SEMANTICS:
            raise ValueError(f"mask.metadata['semantics']={semantics!r}: use one of {_KNOWN_SEMANTICS}.")
        meta["semantics"] = semantics
        meta["tensors"] = info
        return write_artifact(path, tensors, "mask", meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ParamMask:
        """Load a mask file written by :meth:`save`, verifying its integrity and internal consistency."""
        with reraise_as(MaskFileError):
            tensors, meta = read_artifact(path, "mask")
        if meta.get("semantics") not in _KNOWN_SEMANTICS:
            raise MaskFileError(
                f"{path}: mask semantics {meta.get('semantics')!r}; this hfhooks reads {_KNOWN_SEMANTICS} masks."
            )
        info = meta.pop("tensors", None)
        if not isinstance(info, dict) or set(info) != set(tensors):
            raise MaskFileError(
                f"{path}: 'hfhooks.tensors' metadata does not list exactly the stored tensors."
            )
        entries: dict[str, _Entry] = {}
        for name in info:  # the saved order (safetensors itself stores tensors sorted by name)
            entries[name] = _decode_entry(path, name, tensors[name], info[name])
        return cls._from_entries(entries, meta)


def _decode_entry(path: Any, name: str, packed: torch.Tensor, info: Any) -> _Entry:
    def bad(why: str) -> MaskFileError:
        return MaskFileError(f"{path}: tensor {name!r}: {why}")

    if not isinstance(info, dict):
        raise bad("metadata entry is not an object")
    shape, gran, length = info.get("shape"), info.get("granularity"), info.get("length")
    if gran not in GRANULARITIES:
        raise bad(f"granularity {gran!r} is not one of {GRANULARITIES}")
    # `type(x) is int`, not isinstance: JSON true/false are bools (ints to Python), and 4.0 == 4.
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise bad(f"invalid shape {shape!r}")
    if math.prod(shape) >= 1 << 63:  # math.prod: exact, where np.prod would silently wrap around
        raise bad(f"shape {shape} has too many elements")
    if gran != "element" and len(shape) < 2:
        raise bad(f"{gran} mask needs a parameter of at least 2 dimensions, shape is {shape}")
    expected = math.prod(shape) if gran == "element" else shape[_AXIS[gran]]
    if type(length) is not int or length != expected:
        raise bad(
            f"length {length!r} does not match shape {shape} at {gran} granularity (expected {expected})"
        )
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (expected + 7) // 8:
        raise bad(
            f"expected a U8 vector of {(expected + 7) // 8} bytes, got {packed.dtype} {tuple(packed.shape)}"
        )
    # the byte count is checked above: only padding can be wrong. Checked on the last byte: never unpacked.
    pad = 8 * packed.numel() - expected
    if pad and int(packed[-1]) & ((1 << pad) - 1):
        raise bad("non-zero padding bits")
    entry = _Entry.from_packed(gran, tuple(shape), packed, expected)
    ones = info.get("ones")
    if type(ones) is not int or ones != entry.ones:
        raise bad(f"holds {entry.ones} ones but its metadata says {ones!r}")
    density = round(entry.count() / entry.numel(), 6) if entry.numel() else 0.0
    if type(info.get("density")) is not float or info["density"] != density:
        raise bad(f"density is {density} but its metadata says {info.get('density')!r}")
    return entry
