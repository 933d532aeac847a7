"""Exact top-k selection over many tensors without concatenating or sorting them.

The SalUn reference code concatenated every score in the model and ran two full argsorts: ~16 bytes of
temporaries per parameter, more than the model itself. We find the exact k-th score instead with a radix
select on order-preserving 32-bit integer keys: one histogram over the top 16 bits, one over the bottom 16
bits of the elements in the chosen bucket, streamed chunk by chunk. Extra memory is O(chunk + 65 536 bins),
whatever the number of scores; the cost is three streaming passes.

Ties are broken exactly like a *stable* sort of the concatenated scores in iteration order: among equal
scores at the threshold, earlier tensors win, and within a tensor lower flat indices win. So exactly
``k`` elements are selected, deterministically.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping

import torch

__all__ = ["DegenerateScoresWarning", "topk_masks"]

TIE_WARN_FRACTION = 0.05
"""Warn when tie-breaking order, not the scores, decides more than this fraction of the selected elements."""


class DegenerateScoresWarning(UserWarning):
    """Scores that cannot rank what they select: all-zero tensors, or ties deciding much of a top-k."""


_CHUNK = 1 << 22  # elements per streamed chunk: ~32 MB of int64 keys
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


def _kth_key(tensors: list[torch.Tensor], k: int, largest: bool) -> tuple[int, int, int]:
    """Key of the k-th best element (1-based), how many elements have a strictly better key, and how many
    share the k-th key."""
    # Counted where the scores live (a GPU's scores are never copied to the CPU chunk by chunk); only the
    # 65 536-bin histograms move.
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for t in tensors:
        for c in _chunks(t):
            hist += torch.bincount(_keys(c, largest) >> 16, minlength=_BINS).cpu()
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
    above_low = torch.flip(low, [0]).cumsum(0)
    pos_low = int(torch.searchsorted(above_low, torch.tensor(k - better)))
    lo = _BINS - 1 - pos_low
    better += int(above_low[pos_low - 1]) if pos_low > 0 else 0
    return (hi << 16) | lo, better, int(low[lo])


def _select(
    tensors: list[torch.Tensor], k: int, largest: bool, ties: list[tuple[int, int, int]] | None = None
) -> list[torch.Tensor]:
    """Exact top-``k``; appends ``(k, elements taken by tie order, elements tied)`` to ``ties`` when tie order
    decided part of the selection."""
    total = sum(t.numel() for t in tensors)
    if k <= 0:
        return [torch.zeros(t.shape, dtype=torch.bool, device=t.device) for t in tensors]
    if k >= total:
        return [torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in tensors]
    threshold, better, tied = _kth_key(tensors, k, largest)
    ties_left = k - better  # how many elements equal to the threshold still get selected
    if ties is not None and tied > ties_left:  # tie order, not the scores, picks ties_left of `tied`
        ties.append((k, ties_left, tied))
    out = []
    for t in tensors:
        mask = torch.empty(t.numel(), dtype=torch.bool, device=t.device)  # filled chunk by chunk: no cat copy
        start = 0
        for c in _chunks(t):
            key = _keys(c, largest)
            m = mask[start : start + c.numel()]
            torch.gt(key, threshold, out=m)
            eq = key == threshold
            if ties_left > 0 and bool(eq.any()):
                rank = eq.cumsum(0)
                m |= eq & (rank <= ties_left)
                ties_left -= min(int(rank[-1]), ties_left)
            start += c.numel()
        out.append(mask.reshape(t.shape))
    return out


def topk_masks(
    scores: Mapping[str, torch.Tensor], ratio: float, scope: str = "global", largest: bool = True
) -> dict[str, torch.Tensor]:
    """Boolean masks selecting the top ``ratio`` fraction of ``scores`` (bottom fraction if not ``largest``).

    ``scope="global"`` uses one threshold over every element of every tensor (the SalUn rule);
    ``scope="tensor"`` keeps ``round(ratio * numel)`` elements of each tensor. Exactly
    ``round(ratio * N)`` elements are kept; ties at the threshold go to earlier tensors and lower flat indices.

    >>> import torch
    >>> m = topk_masks({"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([2.0, 3.0])}, ratio=0.5)
    >>> m["a"].tolist(), m["b"].tolist()
    ([True, False], [False, True])
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} must be in [0, 1] (the fraction of elements kept).")
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope={scope!r} must be 'global' (one threshold) or 'tensor' (per-tensor top-k).")
    names = list(scores)
    if not names:
        raise ValueError("No scores given: nothing to select from.")
    tensors = []
    zero = []
    for name in names:
        t = scores[name]
        if not torch.is_floating_point(t):
            t = t.float()
        if bool(torch.isnan(t).any()):
            raise ValueError(
                f"Scores for {name!r} contain NaN; fix the scoring (e.g. a NaN loss) before selecting."
            )
        if t.numel() and not bool(t.any()):
            zero.append(name)
        tensors.append(t)
    if zero:
        warnings.warn(
            f"Scores of {len(zero)} of {len(names)} tensors are all zero (e.g. {zero[:3]}): they cannot be ranked, "
            "so tie order (tensor order, flat index) decides their part of the mask. Typical causes: parameters the "
            "loss does not reach, or a fresh LoRA adapter scored on its own weights (lora_A has zero gradient "
            "while lora_B = 0; see hfhooks.masks.lora.lora_unit_saliency).",
            DegenerateScoresWarning,
            stacklevel=2,
        )
    ties: list[tuple[int, int, int]] = []
    if scope == "tensor":
        out = {n: _select([t], round(ratio * t.numel()), largest, ties)[0] for n, t in zip(names, tensors)}
    else:
        k = round(ratio * sum(t.numel() for t in tensors))
        out = dict(zip(names, _select(tensors, k, largest, ties)))
    selected = sum(k for k, _, _ in ties)
    by_order = sum(taken for _, taken, _ in ties)
    if selected and by_order > TIE_WARN_FRACTION * selected:
        warnings.warn(
            f"{by_order} of the {selected} selected elements were picked among "
            f"{sum(tied for _, _, tied in ties)} equal scores by tie order (earlier tensors, lower flat indices), "
            "not by their scores: the scores do not rank enough elements to select this ratio.",
            DegenerateScoresWarning,
            stacklevel=2,
        )
    return out
