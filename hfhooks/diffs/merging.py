"""Model merging from task diffs: TALL masks (:func:`tall_masks`), :func:`consensus_mask` and :func:`consensus_merge`.

The per-tensor rules (:func:`tall_mask_tensor`, :func:`consensus_bits`) are shared with the streaming merges of
:mod:`hfhooks.merging`, so a TALL mask or a consensus merge is computed by the same code whichever way it is run.

Works on :class:`~hfhooks.diffs.WeightDiff` objects through their public interface only (``d[name]``,
``d1 + d2``, :meth:`~hfhooks.diffs.WeightDiff.restrict`) and returns :class:`~hfhooks.masks.mask.ParamMask` masks,
so it needs nothing else from the package.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hfhooks.diffs.core import WeightDiff
from hfhooks.masks.mask import ParamMask


def tall_mask_tensor(tau: torch.Tensor, merged: torch.Tensor, lam: float) -> torch.Tensor:
    """One tensor of a TALL mask: ``|τ_t| > λ_t·|τ_MTL − τ_t|`` (strict ``>``), computed in float64.

    >>> tall_mask_tensor(torch.tensor([1.0, 0.1]), torch.tensor([1.5, 2.0]), 0.4).tolist()
    [True, False]
    """
    tau = tau.to(torch.float64)
    return tau.abs() > lam * (merged.to(torch.float64) - tau).abs()


def consensus_bits(bits: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Coordinates that at least ``k`` of the boolean tensors ``bits`` keep (one tensor of a consensus mask)."""
    count = torch.zeros(bits[0].shape, dtype=torch.int32)
    for b in bits:
        count += b.to(torch.int32)
    return count >= k


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
            tau = d[n] if n in d else torch.zeros(merged_t[n].shape, dtype=torch.float64)
            bits[n] = tall_mask_tensor(tau, merged_t[n], lam_t)
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
        present = [m[n] for m in masks if n in m]
        bits[n] = consensus_bits(present, k)
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
