"""Torch's own weight decay, applied by hand so that the hard freeze needs no copy of the frozen values.

With weight decay, torch's Adam, AdamW and SGD move every coordinate of a parameter, frozen or not, so
:class:`~hfhooks.GradientMask` would have to snapshot the frozen values around each step (one parameter-sized
copy per masked tensor at step time). Instead, right before the step it applies that group's decay itself —
the very op torch applies, with the same Python scalar and the same kernel family (for-loop or ``foreach``) —
to the trainable coordinates only, and lets the step run with ``weight_decay=0``. A coordinate with zero
gradient and zero state then gets an update of exactly ``±0``: the frozen values stay bit-identical and the
trainable ones are bit-identical to the plain optimizer's.

The ops (torch 2.x ``adam.py`` / ``sgd.py``):

* decoupled (AdamW, ``Adam(decoupled_weight_decay=True)``): ``param.mul_(1 - lr * weight_decay)``
  (``torch._foreach_mul_`` with ``foreach``);
* L2 (Adam, SGD): ``grad = grad.add(param, alpha=weight_decay)`` after ``grad = -grad`` under ``maximize``.
  The step reads ``param.grad``, so the decayed gradient is written into ``.grad`` (in place, so DDP's
  bucket views stay valid): between ``step()`` and ``zero_grad()`` the gradient of a parameter in such a
  group holds ``grad + weight_decay * param`` on its trainable coordinates.

Fused kernels (``fused=True``, the HF Trainer's default ``adamw_torch_fused``) apply the decay inside the step, in
their own arithmetic: in float32 and float64 on CPU ``param * (1 - lr * weight_decay)`` rounds exactly like the
op above; in bf16 / fp16 they decay and update in float32 and round once, which no op before the step can
reproduce. So a fused group is decayed by hand only where a probe — the same optimizer class and settings,
stepped twice on a small tensor of that dtype and device with and without the decay done by hand — gives
identical bits (:func:`fused_decay_matches`, run once per class, dtype, device type and flags).

Anything else (capturable, differentiable, a Tensor ``lr`` or ``weight_decay``, a fused step under a grad
scaler, complex or sparse, subclasses) is left to the snapshot path.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["WeightDecay", "decay_is_emulable", "eps_survives", "fused_decay_matches"]

_TYPES = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)

# (optimizer class, dtype, device type, flags) -> whether the fused step's decay is reproduced by hand
_FUSED_PROBES: dict[tuple, bool] = {}
_PROBE_LR, _PROBE_WEIGHT_DECAY = 0.01, 0.1  # non-zero, so that the decay shows in the probe's bits


def decay_is_emulable(opt: torch.optim.Optimizer, group: dict) -> bool:
    """True when this param group's weight decay can be applied by hand, bit-identically, right before the
    step: a torch Adam / AdamW (``eps > 0``) or SGD (the exact types: a subclass may step differently), not
    capturable / differentiable, with a float ``lr`` and ``weight_decay`` (checked at step time); fused only
    where :func:`fused_decay_matches` and no grad scaler drives the step (it may skip it after the decay)."""
    if type(opt) not in _TYPES:
        return False
    if group.get("capturable") or group.get("differentiable"):
        return False
    if type(opt) is not torch.optim.SGD and not eps_survives(group):
        return False  # with eps = 0 a zero update is 0 / 0 = NaN
    lr, wd = group.get("lr"), group.get("weight_decay", 0)
    if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in (lr, wd)):
        return False
    if group.get("fused"):
        # GradScaler hands a fused step its scale and inf flag as attributes; with an inf it skips the step
        if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
            return False
        return fused_decay_matches(opt, group)
    return True


def eps_survives(group: dict) -> bool:
    """Adam's ``eps`` is positive in every parameter dtype of ``group``: the default 1e-8 rounds to 0 in fp16,
    where a frozen coordinate's update is then 0 / 0 = NaN (the step computes ``denom`` in the parameter's
    dtype)."""
    eps = group.get("eps", 0)
    if not (isinstance(eps, numbers.Real) and eps > 0):
        return False
    return all(_positive_in(float(eps), dtype) for dtype in {p.dtype for p in group["params"]})


@functools.lru_cache(maxsize=64)  # asked once per param group and step: no tensor built each time
def _positive_in(value: float, dtype: torch.dtype) -> bool:
    return float(torch.tensor(value, dtype=dtype)) > 0


def fused_decay_matches(opt: torch.optim.Optimizer, group: dict) -> bool:
    """Whether, for every dtype and device of ``group``'s parameters, decaying by hand (:class:`WeightDecay`,
    for-loop ops) and then running the fused step with ``weight_decay=0`` gives the fused step's own bits.

    Probed once per optimizer class, dtype, device type and ``amsgrad`` / ``maximize`` / decoupled flags: two
    steps of a fresh optimizer with the group's settings on 1,031 values (vectorised body and scalar tail), at a
    fixed ``lr = 0.01`` and ``weight_decay = 0.1`` — never the group's own, which may be 0 (a warm-up starts at
    ``lr = 0``): then both runs are the same and the probe would prove nothing."""
    devices = {(p.dtype, p.device) for p in group["params"]}
    return bool(devices) and all(_probe_fused(opt, group, dtype, device) for dtype, device in devices)


def _probe_fused(opt: torch.optim.Optimizer, group: dict, dtype: torch.dtype, device: torch.device) -> bool:
    decoupled = type(opt) is torch.optim.AdamW or bool(group.get("decoupled_weight_decay", False))
    key = (type(opt), dtype, device.type, bool(group.get("amsgrad")), bool(group.get("maximize")), decoupled)
    if key not in _FUSED_PROBES:
        _FUSED_PROBES[key] = _run_probe(opt, group, dtype, device)
    return _FUSED_PROBES[key]


def _run_probe(opt: torch.optim.Optimizer, group: dict, dtype: torch.dtype, device: torch.device) -> bool:
    accepted = inspect.signature(type(opt).__init__).parameters
    settings = {k: v for k, v in group.items() if k in accepted and k not in ("params", "weight_decay", "lr")}
    settings.update(fused=True, lr=_PROBE_LR)
    if "foreach" in accepted:
        settings["foreach"] = None  # fused and foreach are exclusive
    decay = _PROBE_WEIGHT_DECAY
    gen = torch.Generator().manual_seed(0)
    start = (torch.randn(1031, generator=gen) * 2).to(dtype)
    plain, by_hand = (start.clone().to(device).requires_grad_() for _ in range(2))
    try:
        ref = type(opt)([plain], weight_decay=decay, **settings)
        emu = type(opt)([by_hand], weight_decay=0.0, **settings)
        for _ in range(2):
            grad = torch.randn(start.shape, generator=gen).to(dtype).to(device)
            plain.grad, by_hand.grad = grad.clone(), grad.clone()
            ref.step()
            op = WeightDecay.for_group(emu, {**emu.param_groups[0], "weight_decay": decay}, [by_hand])
            with torch.no_grad():
                op.apply_([by_hand.data], [by_hand.grad])
            emu.step()
    except (RuntimeError, TypeError, ValueError):  # a dtype or device the fused kernel does not take
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[start.element_size()]
    return torch.equal(plain.detach().view(bits), by_hand.detach().view(bits))


def _tensors_fit(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Dense, contiguous, real parameters and gradients: what the chunked emulation handles."""
    for p, g in pairs:
        if p.is_complex() or g.is_sparse or not (p.is_contiguous() and g.is_contiguous()):
            return False
        if g.shape != p.shape or g.dtype != p.dtype:
            return False
    return True


def _foreach_default(params: list[torch.Tensor]) -> bool:
    """Whether torch's step would take its ``foreach`` path for these parameters (``foreach=None``)."""
    try:  # the rule torch itself applies (private, but it is the only source of truth)
        from torch.optim.optimizer import _default_to_fused_or_foreach

        return _default_to_fused_or_foreach(params, False, use_fused=False)[1]
    except ImportError:  # pragma: no cover - older/newer torch: the documented rule
        return all(p.device.type == "cuda" for p in params)


@dataclass(frozen=True)
class WeightDecay:
    """One param group's weight decay at one step, applied as torch applies it.

    Attributes:
        decoupled: ``param *= 1 - lr * weight_decay`` (else L2: ``grad += weight_decay * param``).
        weight_decay: the group's ``weight_decay`` (Python float).
        lr: the group's ``lr`` at step time (after the scheduler set it).
        maximize: the group gradient-ascends (L2 then adds the decay to the negated gradient).
        foreach: use the ``torch._foreach_*`` kernels, as the step would.
    """

    decoupled: bool
    weight_decay: float
    lr: float
    maximize: bool
    foreach: bool

    @classmethod
    def of(cls, opt: torch.optim.Optimizer, group: dict, local: Callable) -> WeightDecay | None:
        """The decay this group's next step would apply, or ``None`` when it cannot be emulated exactly
        (``local`` maps a parameter or gradient to the tensor this rank holds)."""
        if not decay_is_emulable(opt, group) or group["weight_decay"] == 0:
            return None
        params = [p for p in group["params"] if p.grad is not None]
        if not _tensors_fit([(local(p), local(p.grad)) for p in params]):
            return None
        return cls.for_group(opt, group, params)

    @classmethod
    def for_group(cls, opt: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]) -> WeightDecay:
        """The op for ``group`` (whose ``params`` have gradients), unchecked: :meth:`of` checks first. A fused
        group is decayed a tensor at a time (the fused kernel has no ``foreach`` op to match)."""
        foreach = False if group.get("fused") else group.get("foreach")
        return cls(
            decoupled=type(opt) is not torch.optim.SGD and bool(group.get("decoupled_weight_decay", False)),
            weight_decay=group["weight_decay"],
            lr=group["lr"],
            maximize=bool(group.get("maximize", False)),
            foreach=_foreach_default(params) if foreach is None else bool(foreach),
        )

    @property
    def factor(self) -> float:
        """The decoupled multiplier, computed in Python floats exactly as torch does (never a tensor: a bf16
        scalar would round differently)."""
        return 1 - self.lr * self.weight_decay

    def target(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor the decay writes: the parameter (decoupled) or its gradient (L2)."""
        return param if self.decoupled else param.grad

    def values(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """New values of :meth:`target` for (a chunk of) ``param`` and its ``grad``, in a new tensor, computed
        with the very call torch's step makes (in place vs out of place matters: on CPU, bf16
        ``_foreach_mul_`` rounds the scalar to bf16 and ``_foreach_mul`` does not)."""
        if self.decoupled:  # torch: param.mul_(f) / torch._foreach_mul_(params, f)
            out = param.clone()
            if self.foreach:
                torch._foreach_mul_([out], self.factor)
            else:
                out.mul_(self.factor)
            return out
        if self.foreach:  # torch: _foreach_neg then _foreach_add_ (maximize), else _foreach_add
            if self.maximize:
                out = torch._foreach_neg([grad])[0]
                torch._foreach_add_([out], [param], alpha=self.weight_decay)
            else:
                out = torch._foreach_add([grad], [param], alpha=self.weight_decay)[0]
        else:  # torch: grad = -grad (maximize); grad = grad.add(param, alpha=weight_decay)
            out = (-grad if self.maximize else grad).add(param, alpha=self.weight_decay)
        # The step negates the gradient again under maximize; negation is exact, so it sees torch's value.
        return out.neg_() if self.maximize else out

    @torch.no_grad()
    def apply_(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Decay whole (fully trainable) parameters in place, as the step would have (local tensors; L2
        writes ``grads`` in place)."""
        if not params:
            return
        if self.decoupled:
            if self.foreach:
                torch._foreach_mul_(params, self.factor)
            else:
                for p in params:
                    p.mul_(self.factor)
            return
        for p, g in zip(params, grads):  # L2 into .grad, a parameter at a time (as torch's own temporary)
            g.copy_(self.values(p, g))
