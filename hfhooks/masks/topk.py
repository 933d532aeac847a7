"""Exact top-k selection over many tensors without concatenating or sorting them.

The SalUn reference code concatenated every score in the model and ran two full argsorts: ~16 bytes of
temporaries per parameter, more than the model itself. We find the exact k-th score instead with a radix
select on order-preserving 32-bit integer keys: one histogram over the top 16 bits, one over the bottom 16
bits of the elements in the chosen bucket, streamed chunk by chunk. Extra memory is O(chunk + 65 536 bins),
whatever the number of scores; the cost is three streaming passes.

Ties are broken exactly like a *stable* sort of the concatenated scores in iteration order: among equal
scores at the threshold, earlier tensors win, and within a tensor lower flat indices win. So exactly
``k`` elements are selected, deterministically.

Sharded scores (``sharded=True``: FSDP2, ZeRO-3): each rank holds a contiguous slice of every tensor's flat
scores, in rank order. The same select runs on every rank with the histograms summed by ``all_reduce`` (two
65 536-bin int64 vectors per selection, whatever the model size) instead of gathering any score, so every rank
finds the same threshold and, with the per-rank counts of tied elements, the same tie order as one process
holding the full scores: the selection is bit-identical to the unsharded one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DegenerateScoresWarning", "iter_topk_masks", "topk_masks"]

TIE_WARN_FRACTION = 0.05
"""Warn when tie-breaking order, not the scores, decides more than this fraction of the selected elements."""


class DegenerateScoresWarning(UserWarning):
    """Scores that cannot rank what they select: all-zero tensors, or ties deciding much of a top-k."""


_CHUNK = 1 << 20  # elements per streamed chunk: ~8 MB of int64 keys (~40 MB of transients while keying one)
_BINS = 1 << 16


def _keys(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """Map floats to int64 keys in [0, 2**32) with the same order (reversed when ``largest`` is False)."""
    # + 0.0 turns -0.0 into +0.0 so that the two zeros tie, as they do under float comparison.
    bits = (x.detach().to(torch.float32) + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    key = torch.where(bits >= 1 << 31, 0xFFFFFFFF - bits, bits + (1 << 31))
    return key if largest else 0xFFFFFFFF - key


def _chunks(t: torch.Tensor) -> Iterator[torch.Tensor]:
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start : start + _CHUNK]


class _Group:
    """The process group a sharded selection sums its counts over (``None`` inside: one process, no collective)."""

    def __init__(self, sharded: bool, group: Any = None):
        self.on = sharded and dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.on else 0
        self.world = dist.get_world_size(group) if self.on else 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (a new CPU tensor; NCCL reduces on the current GPU)."""
        if not self.on:
            return t
        device = torch.device("cuda", torch.cuda.current_device()) if self._nccl() else t.device
        buf = t.to(device, copy=True)
        dist.all_reduce(buf, group=self.group)
        return buf.to(t.device)

    def per_rank(self, t: torch.Tensor) -> torch.Tensor:
        """``(world, *t.shape)``: every rank's ``t`` (a small int64 vector), row ``r`` from rank ``r``."""
        out = torch.zeros((self.world, *t.shape), dtype=t.dtype)
        out[self.rank] = t
        return self.sum(out)

    def _nccl(self) -> bool:
        return dist.get_backend(self.group) == "nccl"


def _kth_key(tensors: list[torch.Tensor], k: int, largest: bool, group: _Group) -> tuple[int, int, int]:
    """Key of the k-th best element (1-based), how many elements have a strictly better key, and how many
    share the k-th key (over every rank's slices when ``group`` is on)."""
    # Counted where the scores live (a GPU's scores are never copied to the CPU chunk by chunk); only the
    # 65 536-bin histograms move.
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for t in tensors:
        for c in _chunks(t):
            hist += torch.bincount(_keys(c, largest) >> 16, minlength=_BINS).cpu()
    hist = group.sum(hist)  # the only data a sharded selection exchanges: counts, never scores
    # Walk buckets from the top: the bucket where the cumulative count from above reaches k.
    above = torch.flip(hist, [0]).cumsum(0)
    pos = int(torch.searchsorted(above, torch.tensor(k)))
    hi = _BINS - 1 - pos
    better = int(above[pos - 1]) if pos > 0 else 0
    low = torch.zeros(_BINS, dtype=torch.int64)
    for t in tensors:
        for c in _chunks(t):
            key = _keys(c, largest)
            sel = key[(key >> 16) == hi]
            if sel.numel():
                low += torch.bincount(sel & 0xFFFF, minlength=_BINS).cpu()
    low = group.sum(low)
    above_low = torch.flip(low, [0]).cumsum(0)
    pos_low = int(torch.searchsorted(above_low, torch.tensor(k - better)))
    lo = _BINS - 1 - pos_low
    better += int(above_low[pos_low - 1]) if pos_low > 0 else 0
    return (hi << 16) | lo, better, int(low[lo])


def _tied_before(tensors: list[torch.Tensor], threshold: int, largest: bool, group: _Group) -> list[int]:
    """For each tensor, how many elements equal to ``threshold`` come before this rank's slice of it in the
    order of the concatenated full scores (earlier tensors on every rank, then lower ranks of this tensor)."""
    local = torch.tensor(
        [sum(int((_keys(c, largest) == threshold).sum()) for c in _chunks(t)) for t in tensors],
        dtype=torch.int64,
    )
    counts = group.per_rank(local)  # (world, tensors)
    before, seen = [], 0
    for i in range(len(tensors)):
        before.append(seen + int(counts[: group.rank, i].sum()))
        seen += int(counts[:, i].sum())
    return before


def _select(
    tensors: list[torch.Tensor],
    k: int,
    largest: bool,
    ties: list[tuple[int, int, int]] | None = None,
    group: _Group | None = None,
    total: int | None = None,
) -> Iterator[torch.Tensor]:
    """Exact top-``k``, one mask per tensor, each yielded as soon as it is selected (a caller that packs them
    never holds more than one); appends ``(k, elements taken by tie order, elements tied)`` to ``ties`` when tie
    order decided part of the selection. With ``group`` on, ``tensors`` are this rank's slices and ``k`` counts
    over every rank's (``total``: the number of elements over every rank, if known)."""
    group = group or _Group(False)
    if total is None:
        total = int(group.sum(torch.tensor([sum(t.numel() for t in tensors)], dtype=torch.int64))[0])
    if k <= 0 or k >= total:
        for t in tensors:
            yield torch.full(t.shape, k > 0, dtype=torch.bool, device=t.device)
        return
    threshold, better, tied = _kth_key(tensors, k, largest, group)
    ties_left = k - better  # how many elements equal to the threshold still get selected
    if ties is not None and tied > ties_left:  # tie order, not the scores, picks ties_left of `tied`
        ties.append((k, ties_left, tied))
    # Sharded: the tied elements before this rank's slice of each tensor take their share first.
    before = _tied_before(tensors, threshold, largest, group) if group.on and tied > ties_left else None
    left = ties_left
    for i, t in enumerate(tensors):
        if before is not None:
            left = max(ties_left - before[i], 0)
        mask = torch.empty(t.numel(), dtype=torch.bool, device=t.device)  # filled chunk by chunk: no cat copy
        start = 0
        for c in _chunks(t):
            key = _keys(c, largest)
            m = mask[start : start + c.numel()]
            torch.gt(key, threshold, out=m)
            eq = key == threshold
            if left > 0 and bool(eq.any()):
                rank = eq.cumsum(0)
                m |= eq & (rank <= left)
                left -= min(int(rank[-1]), left)
            start += c.numel()
        yield mask.reshape(t.shape)
        del mask  # the consumer has it: the next tensor's mask is not allocated beside it


def _merged_by_float32(t: torch.Tensor) -> bool:
    """Whether ``t`` (float64, integer) holds a value that float32 rounds (compared chunk by chunk): two such
    values can share one float32 key. float32 / float16 / bfloat16 scores convert exactly."""
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.bool):
        return False
    return any(bool((c.float().double() != c.double()).any()) for c in _chunks(t))


def _checked(
    scores: Mapping[str, torch.Tensor], group: _Group
) -> tuple[list[torch.Tensor], list[str], list[int]]:
    """The scores as float tensors, the names of those that are all zero, and the tensors' sizes (over every
    rank); raises on NaN on every rank alike, so that no rank is left waiting in a collective."""
    # (has NaN, has a non-zero, numel, has values float32 keys would merge)
    tensors, flags = [], torch.zeros((len(scores), 4), dtype=torch.int64)
    for i, t in enumerate(scores.values()):
        flags[i, 3] = int(_merged_by_float32(t))
        t = t if torch.is_floating_point(t) else t.float()
        flags[i, 0], flags[i, 1] = int(bool(torch.isnan(t).any())), int(bool(t.any()))
        flags[i, 2] = t.numel()
        tensors.append(t)
    flags = group.sum(flags)  # one collective for the four
    numel = flags[:, 2].tolist()
    names = list(scores)
    for i, name in enumerate(names):
        if flags[i, 0]:
            raise ValueError(
                f"Scores for {name!r} contain NaN; fix the scoring (e.g. a NaN loss) before selecting."
            )
        if flags[i, 3]:
            dtype = scores[name].dtype
            raise ValueError(
                f"Scores for {name!r} ({dtype}) hold values float32 cannot represent: the selection ranks "
                "float32 keys, so distinct scores rounding to one float32 would be ordered by position, not by "
                "value. Rescale them into float32's precision, or cast them with .float() to accept those ties."
            )
    return tensors, [n for i, n in enumerate(names) if numel[i] and not flags[i, 1]], numel


def topk_masks(
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    scope: str = "global",
    largest: bool = True,
    sharded: bool = False,
    group: Any = None,
) -> dict[str, torch.Tensor]:
    """``{name: bool mask}`` of :func:`iter_topk_masks` (all masks at once: one byte per score; iterate
    :func:`iter_topk_masks` to hold one at a time).

    >>> import torch
    >>> m = topk_masks({"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([2.0, 3.0])}, ratio=0.5)
    >>> m["a"].tolist(), m["b"].tolist()
    ([True, False], [False, True])
    """
    return dict(iter_topk_masks(scores, ratio, scope, largest, sharded, group))


def iter_topk_masks(
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    scope: str = "global",
    largest: bool = True,
    sharded: bool = False,
    group: Any = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Boolean masks selecting the top ``ratio`` fraction of ``scores`` (bottom fraction if not ``largest``).

    ``scope="global"`` uses one threshold over every element of every tensor (the SalUn rule);
    ``scope="tensor"`` keeps ``round(ratio * numel)`` elements of each tensor. Exactly
    ``round(ratio * N)`` elements are kept; ties at the threshold go to earlier tensors and lower flat indices.

    ``sharded=True`` (a collective: every rank of ``group``, default the whole world, calls it with the same
    names in the same order): each value is this rank's contiguous slice of the tensor's flat scores, the slices
    in rank order (a ``Shard(0)`` DTensor's local shard, a ZeRO-3 partition; empty where a rank holds none).
    ``N`` and the selection are over the full tensors, exactly as one process holding them would select; each
    rank gets the masks of its own slices.

    Yields ``(name, bool mask)`` in ``scores`` order, each mask as soon as it is selected: a caller that packs
    (or otherwise consumes) each one before the next holds one tensor's mask at a time, not one byte per score.
    Iterate to the end (the tie warnings come last; sharded: every rank must, it is a collective).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} must be in [0, 1] (the fraction of elements kept).")
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope={scope!r} must be 'global' (one threshold) or 'tensor' (per-tensor top-k).")
    names = list(scores)
    if not names:
        raise ValueError("No scores given: nothing to select from.")
    g = _Group(sharded, group)
    tensors, zero, numel = _checked(scores, g)
    if zero:
        warnings.warn(
            f"Scores of {len(zero)} of {len(names)} tensors are all zero (e.g. {zero[:3]}): they cannot be ranked, "
            "so tie order (tensor order, flat index) decides their part of the mask. Typical causes: parameters the "
            "loss does not reach, or a fresh LoRA adapter scored on its own weights (lora_A has zero gradient "
            "while lora_B = 0; see hfhooks.masks.lora.lora_unit_saliency).",
            DegenerateScoresWarning,
            stacklevel=3,
        )
    ties: list[tuple[int, int, int]] = []
    if scope == "tensor":
        for n, t, size in zip(names, tensors, numel):
            yield n, next(_select([t], round(ratio * size), largest, ties, g, size))
    else:
        selected = _select(tensors, round(ratio * sum(numel)), largest, ties, g, sum(numel))
        for n in names:  # not zip(): its reused result tuple would keep the previous mask alive
            yield n, next(selected)
    selected = sum(k for k, _, _ in ties)
    by_order = sum(taken for _, taken, _ in ties)
    if selected and by_order > TIE_WARN_FRACTION * selected:
        warnings.warn(
            f"{by_order} of the {selected} selected elements were picked among "
            f"{sum(tied for _, _, tied in ties)} equal scores by tie order (earlier tensors, lower flat indices), "
            "not by their scores: the scores do not rank enough elements to select this ratio.",
            DegenerateScoresWarning,
            stacklevel=3,
        )
