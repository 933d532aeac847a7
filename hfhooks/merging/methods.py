"""The merge methods on one tensor: pruning (:func:`magnitude_mask`, :func:`dare_keep_mask`), sign election, and
:func:`merge_tensors`, which :func:`hfhooks.merging.merge` calls once per tensor.

Everything is computed in ``float32`` (``float64`` for ``float64`` weights) and returned in the base's dtype. The
rules, with their sources, are in ``docs/merging.md``; in short, for task vectors ``τ_t = θ_t − θ_base``:

* ``task_arithmetic``: ``Σ_t w_t τ_t``;
* ``magnitude_prune``: ``Σ_t w_t·trim(τ_t)``, ``trim`` keeping the ``k = max(1, ⌊density·n⌋)`` largest ``|τ|``;
* ``ties``: trim, elect ``γ = sign(Σ_t w_t·trim(τ_t))``, then the disjoint mean over the models whose sign is
  ``γ``: ``Σ_{t∈A} w_t τ̂_t / Σ_{t∈A} w_t``;
* ``dare_linear`` / ``dare_ties``: as ``task_arithmetic`` / ``ties``, with ``trim`` replaced by a seeded random
  keep-mask with probability ``density`` and the kept coordinates divided by ``density``;
* ``tall`` / ``consensus``: ``τ_MTL = Σ_t w_t τ_t`` restricted to task ``t``'s TALL mask, or to the coordinates
  that ``≥ k`` TALL masks keep;

and the result is ``θ_base + λ · merged``.

>>> base = torch.zeros(4)
>>> tuned = [torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([3.0, 1.0, -0.5, 0.0])]
>>> merge_tensors(base, tuned, MergeConfig(method="ties")).tolist()
[2.0, -2.0, 0.5, 0.0]
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from hfhooks.diffs.merging import consensus_bits, tall_mask_tensor
from hfhooks.merging.config import CONSENSUS_METHODS, DARE_METHODS, SIGN_METHODS, MergeConfig

__all__ = ["dare_keep_mask", "dare_seed", "elect_sign", "magnitude_mask", "merge_tensors", "work_dtype"]

TensorLike = torch.Tensor | Callable[[], torch.Tensor]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is merged in: ``float64`` for ``float64`` weights, else ``float32``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def magnitude_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k`` largest ``|τ|``: ``k = numel`` for ``density ≥ 1``, else ``max(1, ⌊density·numel⌋)``
    (mergekit's rule: a positive density keeps at least one coordinate). Ties at the threshold go to the lower
    flat indices, so exactly ``k`` coordinates are kept, deterministically.

    >>> magnitude_mask(torch.tensor([0.1, -3.0, 2.0, 2.0]), 0.5).tolist()
    [False, True, True, False]
    """
    n = tau.numel()
    if density >= 1 or n == 0:
        return torch.ones(tau.shape, dtype=torch.bool)
    k = max(1, int(density * n))
    a = tau.detach().abs().reshape(-1)
    threshold = torch.kthvalue(a, n - k + 1).values  # the k-th largest |τ|
    keep = a > threshold
    need = k - int(keep.sum())
    if need > 0:  # coordinates equal to the threshold, lowest indices first
        tied = a == threshold
        keep |= tied & (tied.cumsum(0) <= need)
    return keep.reshape(tau.shape)


def dare_seed(seed: int, model: int, name: str) -> int:
    """The generator seed of DARE's draw for one model and tensor: the first 8 bytes (big-endian, top bit
    cleared) of ``sha256(f"{seed}/{model}/{name}")``, so a draw depends on nothing else (not the order tensors
    are processed in, not the sharding, not other tensors)."""
    digest = hashlib.sha256(f"{seed}/{model}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def dare_keep_mask(shape: Sequence[int], density: float, *, seed: int, model: int, name: str) -> torch.Tensor:
    """DARE's keep-mask: coordinate ``i`` is kept iff ``u_i < density``, ``u = torch.rand(shape)`` drawn from a
    CPU ``torch.Generator`` seeded with :func:`dare_seed` ``(seed, model, name)`` (each kept with probability
    ``density``, independently).

    >>> m = dare_keep_mask((1000,), 0.3, seed=0, model=1, name="w")
    >>> torch.equal(m, dare_keep_mask((1000,), 0.3, seed=0, model=1, name="w")), 250 < int(m.sum()) < 350
    (True, True)
    """
    if density >= 1:
        return torch.ones(tuple(shape), dtype=torch.bool)
    g = torch.Generator().manual_seed(dare_seed(seed, model, name))
    return torch.rand(tuple(shape), generator=g) < density


def _dare(tau: torch.Tensor, keep: torch.Tensor, density: float, rescale: str) -> torch.Tensor:
    """Drop and rescale: ``τ·m / density`` (the paper, peft), ``τ·m`` scaled to ``‖τ‖₁`` (mergekit), or ``τ·m``."""
    if density >= 1:
        return tau
    masked = tau * keep
    if rescale == "inverse":
        return masked.div_(density)
    if rescale == "l1":  # mergekit's rescaled_masked_tensor, eps 1e-7 included
        before, after = tau.abs().sum(), masked.abs().sum()
        if before < 1e-7 or after < 1e-7:
            return masked
        return masked * (before / after)
    return masked


def elect_sign(tensors: Sequence[torch.Tensor], method: str = "sum") -> torch.Tensor:
    """Where the elected sign is positive: ``Σ_t x_t ≥ 0`` (``"sum"``) or ``Σ_t sign(x_t) ≥ 0`` (``"count"``);
    a tie elects ``+`` (as peft and mergekit)."""
    total = torch.zeros_like(tensors[0])
    for x in tensors:
        total += x if method == "sum" else x.sign()
    return total >= 0


def _task_vector(
    base: torch.Tensor, tuned: TensorLike, t: int, density: float, config: MergeConfig, name: str
) -> torch.Tensor:
    """``τ_t = θ_t − θ_base`` (work dtype), pruned as the method says."""
    x = tuned() if callable(tuned) else tuned
    if tuple(x.shape) != tuple(base.shape):
        raise ValueError(
            f"{name!r}: tuned model {t} has shape {tuple(x.shape)}, the base {tuple(base.shape)}; models merged "
            "together must share the base's architecture."
        )
    tau = x.to(base.dtype, copy=True).sub_(base)
    del x
    if config.method in DARE_METHODS:
        keep = dare_keep_mask(tau.shape, density, seed=config.seed, model=t, name=name)
        return _dare(tau, keep, density, config.rescale)
    if config.method in ("ties", "magnitude_prune") and density < 1:
        return tau.mul_(magnitude_mask(tau, density))
    return tau


def _linear(base, tuned, config, name, weights, densities) -> torch.Tensor:
    """``Σ_t w_t τ̂_t`` accumulated one model at a time (÷ ``Σ_t w_t`` if normalised)."""
    mixed = torch.zeros_like(base)
    for t, (x, w, d) in enumerate(zip(tuned, weights, densities)):
        tau = _task_vector(base, x, t, d, config, name)
        mixed += tau if w == 1 else tau.mul_(w)  # x·1.0 == x bit for bit: skip a full pass
        del tau
    if config.normalized:
        divisor = float(torch.tensor(weights, dtype=base.dtype).sum())
        mixed /= divisor if abs(divisor) >= 1e-8 else 1.0
    return mixed


def _disjoint(base, tuned, config, name, weights, densities) -> torch.Tensor:
    """TIES: elect the sign of ``Σ_t w_t τ̂_t``, then sum (÷ the agreeing weights' sum) those that agree."""
    parts = [
        _task_vector(base, x, t, d, config, name).mul_(w)
        for t, (x, w, d) in enumerate(zip(tuned, weights, densities))
    ]
    positive = elect_sign(parts, config.majority_sign)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base) if config.normalized else None
    for u, w in zip(parts, weights):
        agree = torch.where(positive, u > 0, u < 0)  # sign(u) == γ; a zero never agrees
        mixed += u * agree
        if divisor is not None:
            divisor += agree * w
    del parts
    if divisor is not None:
        divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed


def _tall(base, tuned, config, name, weights) -> torch.Tensor:
    """``τ_MTL = Σ_t w_t τ_t`` kept where task ``task``'s TALL mask is set (``tall``) or ``≥ k`` masks are
    (``consensus``)."""
    taus = [_task_vector(base, x, t, 1.0, config, name) for t, x in enumerate(tuned)]
    merged = torch.zeros_like(base)
    for tau, w in zip(taus, weights):
        merged += tau * w
    lams = config.per_model("tall_lambda", len(taus))
    if config.method == "tall":
        keep = tall_mask_tensor(taus[config.task], merged, lams[config.task])
    else:
        keep = consensus_bits([tall_mask_tensor(tau, merged, lam) for tau, lam in zip(taus, lams)], config.k)
    return merged.mul_(keep)


def merge_tensors(
    base: torch.Tensor, tuned: Sequence[TensorLike], config: MergeConfig, name: str = ""
) -> torch.Tensor:
    """One tensor of the merge, in ``base``'s dtype: ``θ_base + λ · merged(τ_1, …, τ_T)``.

    ``tuned`` holds tensors or zero-argument callables returning them (read when needed, so a streaming merge
    holds one raw tuned tensor at a time). ``name`` seeds DARE's draws. Non-floating tensors are refused (the
    streaming merge copies them from the base).
    """
    if not torch.is_floating_point(base):
        raise TypeError(f"{name!r} is {base.dtype}: only floating-point tensors are merged.")
    n = len(tuned)
    if n == 0:
        raise ValueError("Nothing to merge: give at least one tuned model.")
    if config.method == "tall" and not 0 <= config.task < n:
        raise ValueError(f"task={config.task} but there are {n} tuned models (0…{n - 1}).")
    b = base.detach().to(work_dtype(base.dtype), copy=True)
    weights = config.per_model("weights", n)
    densities = config.per_model("density", n)
    if config.method in CONSENSUS_METHODS:
        mixed = _tall(b, tuned, config, name, weights)
    elif config.method in SIGN_METHODS:
        mixed = _disjoint(b, tuned, config, name, weights, densities)
    else:
        mixed = _linear(b, tuned, config, name, weights, densities)
    if config.lambda_ != 1:
        mixed *= config.lambda_
    return b.add_(mixed).to(base.dtype)
