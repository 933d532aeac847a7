"""The merge methods on one tensor: pruning (:func:`magnitude_mask`, :func:`dare_keep_mask`), sign election,
:func:`merge_blocks` (streamed block by block, what :func:`hfhooks.merging.merge` writes) and
:func:`merge_tensors` (the same on whole tensors).

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

Every method is elementwise once each model's whole-tensor statistics are known (its trim threshold, DARE's L1
scale), so a tensor is merged in flat blocks of :data:`BLOCK` elements: a first pass per pruned model computes
the statistic (one ``|τ|`` buffer of the tensor's size, reused), then one pass over the blocks of the base and
every tuned model writes the result. The block size changes no result: each coordinate sees the same operations
in the same order, ties at a trim threshold are counted across blocks in flat order, and DARE's draw continues
one generator across blocks (``torch.rand`` on CPU fills in flat order).

>>> base = torch.zeros(4)
>>> tuned = [torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([3.0, 1.0, -0.5, 0.0])]
>>> merge_tensors(base, tuned, MergeConfig(method="ties")).tolist()
[2.0, -2.0, 0.5, 0.0]
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from hfhooks.diffs.merging import consensus_bits, tall_mask_tensor
from hfhooks.merging.config import (
    CONSENSUS_METHODS,
    DARE_METHODS,
    PRUNING_METHODS,
    SIGN_METHODS,
    MergeConfig,
)

__all__ = [
    "BLOCK",
    "CHUNK",
    "Reader",
    "Scratch",
    "dare_keep_mask",
    "dare_seed",
    "elect_sign",
    "magnitude_mask",
    "merge_blocks",
    "merge_tensors",
    "tensor_reader",
    "work_dtype",
]

TensorLike = torch.Tensor | Callable[[], torch.Tensor]
Reader = Callable[[int, int], torch.Tensor]
"""``read(lo, hi)``: flat elements ``[lo, hi)`` of one tensor in its stored dtype (valid until the next call)."""

CHUNK = 1 << 20
"""Elements read from each model per ``pread`` (2 MiB of bfloat16) and written per output block."""

BLOCK = 1 << 15
"""Elements per compute step: torch's grain size (``at::internal::GRAIN_SIZE``), so every kernel runs on the
calling thread. An OpenMP parallel region per small kernel waits at its barrier for the slowest thread, a whole
time slice when a core is busy: on a loaded 2-core machine 64 Ki-element steps made a merge 10× slower than
these (and 3× slower than one thread)."""


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is merged in: ``float64`` for ``float64`` weights, else ``float32``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor_reader(t: torch.Tensor) -> Reader:
    """A :data:`Reader` over an in-memory tensor (views, no copy)."""
    flat = t.detach().reshape(-1)
    return lambda lo, hi: flat[lo:hi]


class Scratch:
    """Grow-only buffers reused from block to block and tensor to tensor (no allocation, no page faults per
    block). A buffer from :meth:`get` is valid until the next :meth:`get` of the same key."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[object, torch.dtype], torch.Tensor] = {}

    def get(self, key: object, n: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``n`` elements of buffer ``key`` in ``dtype`` (grown, never shrunk)."""
        buf = self._buffers.get((key, dtype))
        if buf is None or buf.numel() < n:
            self._buffers.pop((key, dtype), None)  # free the old buffer before growing
            buf = self._buffers[(key, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n]


def _spans(numel: int, block: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, numel, block):
        yield lo, min(lo + block, numel)


def _kth_largest(a: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The ``k``-th largest value of the flat CPU tensor ``a`` (``kthvalue(a, n − k + 1)``; NaN counts as the
    largest) and how many values are strictly larger. ``a`` is permuted in place: an O(n) introselect
    (``ndarray.partition``) with no copy and no index tensor, where ``kthvalue`` copies ``a`` and allocates
    8-byte indices. Single-threaded, like every step of a merge (see :data:`BLOCK`)."""
    n, arr = a.numel(), a.numpy()
    arr.partition(n - k)
    return a[n - k].clone(), int(np.count_nonzero(arr[n - k + 1 :] > arr[n - k]))


class _Trim:
    """Magnitude trim of one model's ``τ``, block by block in flat order: keep ``|τ| > threshold`` and the first
    ``ties`` coordinates equal to it (the lowest flat indices), so exactly ``k`` coordinates survive."""

    def __init__(self, threshold: torch.Tensor, ties: int):
        self.threshold, self.ties = threshold, ties
        info = torch.finfo(threshold.dtype)
        # From tiny/eps up, a > t implies a − t ≥ ulp(t) ≥ tiny: the difference is never 0 nor subnormal (so
        # never flushed), and the keep factor sign(max(|τ| − t, 0)) is exactly 1{|τ| > t}, in float kernels
        # (several times faster than making and applying a bool mask).
        self.float_path = info.tiny / info.eps <= float(threshold) < math.inf
        # |τ| ≥ t ⇔ |τ| > the float just below t: the same float kernels keep every tie while ties remain
        self.below = torch.nextafter(threshold, threshold.new_tensor(-math.inf))
        self.float_path_ties = self.float_path and info.tiny / info.eps <= float(self.below)

    def keep(self, tau: torch.Tensor) -> torch.Tensor:
        a = tau.abs()
        keep = a > self.threshold
        if self.ties > 0 and a.numel():
            tied = a == self.threshold
            rank = tied.cumsum(0)
            keep |= tied & (rank <= self.ties)
            self.ties -= min(int(rank[-1]), self.ties)
        return keep

    def __call__(self, tau: torch.Tensor, ws: _Workspace) -> torch.Tensor:
        threshold = self.threshold
        if self.ties > 0:  # keep all the block's ties if that many remain, else rank them (once per tensor)
            tied = int(torch.eq(tau.abs(), threshold).sum()) if self.float_path_ties else self.ties + 1
            if tied > self.ties:
                return tau.mul_(self.keep(tau))
            self.ties -= tied
            threshold = self.below
        elif not self.float_path:
            return tau.mul_(self.keep(tau))
        return tau.mul_(torch.abs(tau, out=ws.factor).sub_(threshold).clamp_(min=0).sign_())


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
    flat = tau.detach().cpu().reshape(-1)
    threshold, greater = _kth_largest(flat.abs(), k)
    return _Trim(threshold, k - greater).keep(flat).reshape(tau.shape)


def dare_seed(seed: int, model: int, name: str) -> int:
    """The generator seed of DARE's draw for one model and tensor: the first 8 bytes (big-endian, top bit
    cleared) of ``sha256(f"{seed}/{model}/{name}")``, so a draw depends on nothing else (not the order tensors
    are processed in, not the sharding, not other tensors)."""
    digest = hashlib.sha256(f"{seed}/{model}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def dare_keep_mask(shape: Sequence[int], density: float, *, seed: int, model: int, name: str) -> torch.Tensor:
    """DARE's keep-mask: coordinate ``i`` is kept iff ``u_i < density``, ``u = torch.rand(shape)`` drawn from a
    CPU ``torch.Generator`` seeded with :func:`dare_seed` ``(seed, model, name)`` (each kept with probability
    ``density``, independently). A merge draws the same ``u`` block by block (flat order).

    >>> m = dare_keep_mask((1000,), 0.3, seed=0, model=1, name="w")
    >>> torch.equal(m, dare_keep_mask((1000,), 0.3, seed=0, model=1, name="w")), 250 < int(m.sum()) < 350
    (True, True)
    """
    if density >= 1:
        return torch.ones(tuple(shape), dtype=torch.bool)
    g = torch.Generator().manual_seed(dare_seed(seed, model, name))
    return torch.rand(tuple(shape), generator=g) < density


class _Dare:
    """DARE on one model's ``τ``, block by block: drop with the seeded draw, then rescale — ``÷ density`` (the
    paper, peft), ``× ‖τ‖₁ / ‖τ·m‖₁`` (mergekit; ``factor`` from a first pass, ``None`` when either norm is
    below mergekit's 1e-7), or not at all."""

    def __init__(self, seed: int, density: float, rescale: str, factor: torch.Tensor | None = None):
        self.generator = torch.Generator().manual_seed(seed)
        self.density, self.rescale, self.factor = density, rescale, factor

    def keep(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) < self.density

    def __call__(self, tau: torch.Tensor, ws: _Workspace) -> torch.Tensor:
        tau.mul_(self.keep(tau.numel()))
        if self.rescale == "inverse":
            return tau.div_(self.density)
        if self.rescale == "l1" and self.factor is not None:
            return tau.mul_(self.factor)
        return tau


def elect_sign(tensors: Sequence[torch.Tensor], method: str = "sum") -> torch.Tensor:
    """Where the elected sign is positive: ``Σ_t x_t ≥ 0`` (``"sum"``) or ``Σ_t sign(x_t) ≥ 0`` (``"count"``);
    a tie elects ``+`` (as peft and mergekit)."""
    total = torch.zeros_like(tensors[0])
    for x in tensors:
        total += x if method == "sum" else x.sign()
    return total >= 0


class _Workspace:
    """One tensor's step buffers (work dtype, :data:`BLOCK` elements each, from the shared :class:`Scratch`),
    viewed at the current step's size: no allocation and no dictionary look-up per step."""

    _NAMES = ("base", "mixed", "factor", "agree", "total", "ones", "divisor")

    def __init__(self, scratch: Scratch, n: int, work: torch.dtype):
        self._full = {k: scratch.get(k, BLOCK, work) for k in self._NAMES}
        self._taus = [scratch.get(("tau", t), BLOCK, work) for t in range(n)]
        self.dtype, self.m = work, -1

    def at(self, m: int) -> _Workspace:
        if m != self.m:
            self.m = m
            for k, buf in self._full.items():
                setattr(self, k, buf[:m])
            self.taus = [buf[:m] for buf in self._taus]
            self.ones.fill_(1)
        return self


def _sign_elect(parts: Sequence[torch.Tensor], method: str, ws: _Workspace) -> torch.Tensor:
    """:func:`elect_sign` as ``γ = ±1.0`` (``+1`` where ``Σ ≥ 0``): float kernels only. The sum is never
    ``−0`` (it starts at ``+0``), so ``copysign(1, Σ)`` is ``+1`` exactly where ``Σ ≥ 0``; a NaN sum comes from a
    NaN or ±inf part, which makes the merged coordinate NaN whatever ``γ``."""
    total = ws.total.zero_()
    for x in parts:
        total += x if method == "sum" else x.sign()
    return torch.copysign(ws.ones, total, out=total)


def _abs_tau(base: Reader, read: Reader, numel: int, scratch: Scratch, ws: _Workspace) -> torch.Tensor:
    """``|θ_t − θ_base|`` of a whole tensor, flat, in the reused ``"store"`` buffer."""
    store = scratch.get("store", numel, ws.dtype)
    for clo, chi in _spans(numel, CHUNK):
        braw, traw = base(clo, chi), read(clo, chi)
        for lo, hi in _spans(chi - clo, BLOCK):
            b = ws.at(hi - lo).base.copy_(braw[lo:hi])
            store[clo + lo : clo + hi].copy_(traw[lo:hi]).sub_(b).abs_()
    return store


def _l1_factor(base, read, numel, scratch, ws, seed: int, density: float) -> torch.Tensor | None:
    """mergekit's ``rescaled_masked_tensor`` scale ``‖τ‖₁ / ‖τ·m‖₁`` (``None`` below its 1e-7), the two sums
    taken over the whole tensor as mergekit does (same reduction, so the same float)."""
    store = _abs_tau(base, read, numel, scratch, ws)
    before, draw = store.sum(), _Dare(seed, density, "none")
    for lo, hi in _spans(numel, BLOCK):
        store[lo:hi].mul_(draw.keep(hi - lo))
    after = store.sum()
    return None if before < 1e-7 or after < 1e-7 else before / after


def _pruners(base, tuned, config, name, numel, scratch, ws) -> list[Callable | None]:
    """Each model's pruning of its ``τ`` blocks (``None``: kept whole), after the first pass its whole-tensor
    statistic needs: the trim threshold (``ties``, ``magnitude_prune``) or DARE's L1 scale (``rescale="l1"``)."""
    densities = config.per_model("density", len(tuned))
    out: list[Callable | None] = []
    for t, (read, density) in enumerate(zip(tuned, densities)):
        if config.method not in PRUNING_METHODS or density >= 1 or numel == 0:
            out.append(None)
        elif config.method in DARE_METHODS:
            seed = dare_seed(config.seed, t, name)
            factor = None
            if config.rescale == "l1":
                factor = _l1_factor(base, read, numel, scratch, ws, seed, density)
            out.append(_Dare(seed, density, config.rescale, factor))
        else:
            k = max(1, int(density * numel))
            threshold, greater = _kth_largest(_abs_tau(base, read, numel, scratch, ws), k)
            out.append(_Trim(threshold, k - greater))
    return out


def _linear(taus: list[torch.Tensor], weights, divisor: float | None, mixed: torch.Tensor) -> torch.Tensor:
    """``Σ_t w_t τ̂_t`` (÷ ``Σ_t w_t`` if normalised) into ``mixed``."""
    mixed.zero_()
    for tau, w in zip(taus, weights):
        mixed += tau if w == 1 else tau.mul_(w)  # x·1.0 == x bit for bit: skip a full pass
    if divisor is not None:
        mixed /= divisor
    return mixed


def _disjoint(taus, weights, config: MergeConfig, ws: _Workspace) -> torch.Tensor:
    """TIES: elect the sign ``γ`` of ``Σ_t w_t τ̂_t``, then sum (÷ the agreeing weights' sum) the ``w_t τ̂_t`` of
    sign ``γ``; a zero never agrees.

    In float kernels (bool masks cost several times more): ``agree = sign(max(γ·u, 0)) ∈ {0, 1}`` (``γ·u`` is
    exact), ``mixed += u·agree``, ``divisor += w·agree`` — the same floats as the definition's masks. With positive
    weights an agreeing divisor is ``≥ min w``, and a coordinate none agrees with has ``mixed = +0``, so clamping
    the divisor at ``min w`` gives the same ``+0`` as replacing 0 by 1."""
    parts = [tau.mul_(w) for tau, w in zip(taus, weights)]
    gamma = _sign_elect(parts, config.majority_sign, ws)
    mixed, agree = ws.mixed.zero_(), ws.agree
    divisor = ws.divisor.zero_() if config.normalized else None
    for u, w in zip(parts, weights.as_f32):
        torch.mul(u, gamma, out=agree).clamp_(min=0).sign_()
        mixed.addcmul_(u, agree)
        if divisor is not None:
            divisor.add_(agree, alpha=w)
    if divisor is not None:
        if weights.positive:
            divisor.clamp_(min=min(weights.as_f32))
        else:
            divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed


class _Weights(list):
    """The per-model weights, with ``as_f32``: each rounded to float32, which is what the definition's
    ``bool_mask · w`` adds to the TIES divisor (a float32 product, the default dtype, whatever the work dtype)."""

    def __init__(self, weights: Sequence[float]):
        super().__init__(weights)
        self.as_f32 = torch.tensor(weights, dtype=torch.float32).tolist()
        self.positive = all(w > 0 for w in weights)


def _tall(taus: list[torch.Tensor], weights, config: MergeConfig, mixed: torch.Tensor) -> torch.Tensor:
    """``τ_MTL = Σ_t w_t τ_t`` kept where task ``task``'s TALL mask is set (``tall``) or ``≥ k`` masks are
    (``consensus``)."""
    mixed.zero_()
    for tau, w in zip(taus, weights):
        mixed += tau * w
    lams = config.per_model("tall_lambda", len(taus))
    if config.method == "tall":
        keep = tall_mask_tensor(taus[config.task], mixed, lams[config.task])
    else:
        keep = consensus_bits([tall_mask_tensor(tau, mixed, lam) for tau, lam in zip(taus, lams)], config.k)
    return mixed.mul_(keep)


def _check(dtype: torch.dtype, n: int, config: MergeConfig, name: str) -> None:
    if not dtype.is_floating_point:
        raise TypeError(f"{name!r} is {dtype}: only floating-point tensors are merged.")
    if n == 0:
        raise ValueError("Nothing to merge: give at least one tuned model.")
    config.check_models(n)


def _merge_block(braw, traws, prune, config, weights, divisor, ws: _Workspace) -> torch.Tensor:
    """One block: ``θ_base + λ · merged`` in the work dtype (a workspace buffer)."""
    ws = ws.at(braw.numel())
    b = ws.base.copy_(braw)
    taus = []
    for tau, x, p in zip(ws.taus, traws, prune):
        tau.copy_(x).sub_(b)
        taus.append(p(tau, ws) if p is not None else tau)
    if config.method in CONSENSUS_METHODS:
        mixed = _tall(taus, weights, config, ws.mixed)
    elif config.method in SIGN_METHODS:
        mixed = _disjoint(taus, weights, config, ws)
    else:
        mixed = _linear(taus, weights, divisor, ws.mixed)
    if config.lambda_ != 1:
        mixed *= config.lambda_
    return b.add_(mixed)


def merge_blocks(
    base: Reader,
    tuned: Sequence[Reader],
    shape: Sequence[int],
    dtype: torch.dtype,
    config: MergeConfig,
    name: str = "",
    *,
    scratch: Scratch | None = None,
) -> Iterator[torch.Tensor]:
    """One tensor of the merge, ``θ_base + λ · merged(τ_1, …, τ_T)``, as flat blocks of up to :data:`CHUNK`
    elements in ``dtype`` (each valid until the next is asked for), read chunk by chunk through the
    :data:`Reader` s and computed in steps of :data:`BLOCK` elements.

    Pruned models are read twice (a first pass finds each one's trim threshold or L1 scale). Memory: a chunk
    per model plus, for pruning with a statistic, one work-dtype buffer of the tensor's size; ``scratch``
    reuses them across tensors. ``name`` seeds DARE's draws. Equals :func:`merge_tensors` bit for bit.
    """
    _check(dtype, len(tuned), config, name)
    numel, work, n = math.prod(shape), work_dtype(dtype), len(tuned)
    scratch = scratch if scratch is not None else Scratch()
    weights = _Weights(config.per_model("weights", n))
    ws = _Workspace(scratch, n, work)
    prune = _pruners(base, tuned, config, name, numel, scratch, ws)
    divisor = None
    if config.normalized and config.method not in SIGN_METHODS:
        divisor = float(torch.tensor(weights, dtype=work).sum())
        divisor = divisor if abs(divisor) >= 1e-8 else 1.0
    for clo, chi in _spans(numel, CHUNK):
        braw, traws = base(clo, chi), [read(clo, chi) for read in tuned]
        out = scratch.get("out", chi - clo, dtype)
        for lo, hi in _spans(chi - clo, BLOCK):
            merged = _merge_block(braw[lo:hi], [x[lo:hi] for x in traws], prune, config, weights, divisor, ws)
            out[lo:hi].copy_(merged)
        yield out


def merge_tensors(
    base: torch.Tensor, tuned: Sequence[TensorLike], config: MergeConfig, name: str = ""
) -> torch.Tensor:
    """One tensor of the merge, in ``base``'s dtype: ``θ_base + λ · merged(τ_1, …, τ_T)``.

    ``tuned`` holds tensors or zero-argument callables returning them. ``name`` seeds DARE's draws.
    Non-floating tensors are refused (the streaming merge copies them from the base). Computed by
    :func:`merge_blocks`, so it equals a streamed merge bit for bit.
    """
    _check(base.dtype, len(tuned), config, name)
    readers = []
    for t, x in enumerate(tuned):
        x = x() if callable(x) else x
        if not x.is_floating_point():  # would be cast and merged: the base's dtype is not the tuned model's
            raise TypeError(
                f"{name!r}: tuned model {t} is {x.dtype} where the base's is {base.dtype}; only floating-point "
                "weights are merged."
            )
        if tuple(x.shape) != tuple(base.shape):
            raise ValueError(
                f"{name!r}: tuned model {t} has shape {tuple(x.shape)}, the base {tuple(base.shape)}; models "
                "merged together must share the base's architecture."
            )
        readers.append(tensor_reader(x.cpu()))
    out = torch.empty(base.numel(), dtype=base.dtype)
    lo = 0
    for blk in merge_blocks(tensor_reader(base.cpu()), readers, base.shape, base.dtype, config, name):
        out[lo : lo + blk.numel()].copy_(blk)
        lo += blk.numel()
    return out.reshape(base.shape).to(base.device)
