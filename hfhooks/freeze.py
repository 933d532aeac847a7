"""Masked coordinates never move: gradient hooks plus an optimizer post-step restore.

Masking gradients alone does not freeze weights: decoupled weight decay shrinks every coordinate, and
momentum or Adam state built up before the mask keeps moving them. The SalUn reference code shipped that bug
for two years. :class:`GradientMask` closes every path:

1. a tensor hook on each parameter zeroes the masked-out gradient entries *before* accumulation, clipping and
   DDP reduction (so gradient-norm clipping only sees what will be applied, and all ranks agree);
2. with ``freeze="hard"`` (the default) an optimizer step post-hook copies the original values back into the
   masked-out coordinates after every step and zeroes their optimizer state (``exp_avg``, ``exp_avg_sq``,
   ``momentum_buffer``…), so they are bit-identical to their values at :meth:`GradientMask.attach` under any
   torch optimizer, weight decay, accumulation, clipping and mixed precision;
3. ``freeze="groups"`` additionally removes parameters that are entirely frozen from the optimizer's param
   groups (no weight decay, no state, less optimizer work), restoring the groups on :meth:`detach`;
4. ``freeze="grad"`` only masks gradients (weight decay and momentum may still move masked coordinates).

Parameters of the model that the mask does not name are frozen entirely (``others="freeze"``, the contract
"only masked-in coordinates train") or left alone (``others="train"``).

Example (a plain PyTorch loop):

    >>> import torch
    >>> from hfhooks import GradientMask, ParamMask
    >>> model = torch.nn.Linear(4, 2)
    >>> mask = ParamMask({"weight": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]]), "bias": torch.tensor([1, 0])})
    >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    >>> before = model.weight.detach().clone()
    >>> with GradientMask(model, mask).attach(opt):
    ...     for _ in range(3):
    ...         model(torch.randn(8, 4)).square().mean().backward(); opt.step(); opt.zero_grad()
    >>> bool((model.weight == before)[mask["weight"].logical_not()].all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hfhooks.masks import ParamMask
from hfhooks.params import ParamIndex

__all__ = ["FREEZE_MODES", "GradientMask", "check_freeze_args", "innermost_optimizer"]

FREEZE_MODES = ("hard", "grad", "groups")


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Unwrap accelerate's ``AcceleratedOptimizer`` (and similar wrappers) to the torch optimizer that steps."""
    seen = set()
    while id(optimizer) not in seen and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (same storage), anything else itself."""
    return t.to_local() if _is_dtensor(t) else t


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full-size mask laid out like ``param`` (identity for ordinary tensors).

    Under FSDP2 a parameter is a DTensor sharded across ranks; its mask must be sharded the same way. Every rank
    holds the same full mask, so the slice is cut locally (``src_data_rank=None``: no communication).
    """
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


@dataclass
class _Frozen:
    """One parameter's frozen coordinates and what they must be restored to.

    Element masks keep ``keep`` (1 = may train, 0 = frozen) and ``values`` (the frozen values, zeros elsewhere) as
    full-size tensors in the parameter's dtype. On CPU, masking is then a float multiply and restoring
    ``p = p·keep + values`` — two fused passes over all parameters (``torch._foreach_*``), ~10× faster than
    selects with ``bool`` masks there. Multiplying is exact only for finite values (inf·0 is NaN) and
    ``-0.0 + 0.0`` loses a sign, so: gradients and parameters whose sum is not finite take an exact select,
    and so do tensors with a frozen ``-0.0`` or non-finite value (``exact_add=False``). On other devices
    (CUDA) selects are as fast and need no host sync, so they are always used. (A trainable ``-0.0`` may come
    back as ``+0.0`` from the fused restore: equal, and not frozen.)
    """

    name: str
    param: nn.Parameter
    kind: str  # "all" | "element" | "row" | "column"
    keep: torch.Tensor | None = None  # broadcastable to the (local) parameter: 1/True = may train
    idx: torch.Tensor | None = None  # frozen row/column indices (local)
    values: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    exact_add: bool = True

    @classmethod
    def build(cls, name: str, param: nn.Parameter, mask: ParamMask | None) -> _Frozen | None:
        p = _local(param.detach())
        if mask is None or name not in mask:
            return cls(name, param, "all", values=p.clone())
        gran, bits = mask.granularity(name), mask.vector(name).to(param.device)
        if bool(bits.all()):
            return None  # fully trainable: nothing to enforce
        if not bool(bits.any()):
            return cls(name, param, "all", values=p.clone())
        if gran != "element" and not _is_dtensor(param):  # rows/columns: small index copies
            axis = 0 if gran == "row" else 1
            shape = [1] * p.dim()
            shape[axis] = p.shape[axis]
            idx = (~bits).nonzero().flatten()
            return cls(
                name, param, gran, keep=bits.reshape(shape), idx=idx, values=p.index_select(axis, idx).clone()
            )
        keep = mask[name].to(param.device, torch.bool).expand(param.shape)  # rows/columns of a DTensor too
        keep = _shard_like(keep.contiguous(), param)
        if bool(keep.all()):
            return None  # this rank's shard is fully trainable
        vals = p.masked_fill(keep, 0)
        negative_zero = torch.signbit(vals) & (vals == 0) & ~keep
        exact = bool(torch.isfinite(vals).all()) and not bool(negative_zero.any())
        return cls(name, param, "element", keep=keep.to(p.dtype), values=vals, exact_add=exact)

    @property
    def drop(self) -> torch.Tensor:
        """Frozen coordinates (bool)."""
        return self.keep == 0

    def mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Tensor-hook form (before accumulation): a new, masked gradient."""
        if self.kind == "all":
            return torch.zeros_like(grad)
        if grad.is_cpu:  # a float multiply is ~10x a select here, and reading the sum costs no device sync
            out = grad * self.keep
            if bool(torch.isfinite(grad.sum())):
                return out
        return _select(grad, self.keep)  # exact for inf/NaN gradients too (inf·0 is NaN)

    def mask_grad_(self, param: torch.Tensor) -> None:
        """Post-accumulate form (FSDP2: fires on the sharded DTensor after reduce-scatter): in place."""
        if param.grad is None:
            return
        g = _local(param.grad)
        if self.kind == "all":
            g.zero_()
        elif g.is_cpu and bool(torch.isfinite(g.sum())):
            g.mul_(self.keep)
        else:
            g.masked_fill_(self.keep == 0, 0)

    @torch.no_grad()
    def restore(self, fused: bool | None = None) -> None:
        """Restore this tensor on its own (the batched path lives in :func:`_restore_all`). ``fused``: whether
        ``p·keep + values`` is exact here (``None``: find out)."""
        p = _local(self.param.data)
        if self.kind == "all":
            p.copy_(self.values)
        elif self.kind == "element":
            if fused is None:
                fused = self.fusable() and bool(torch.isfinite(p.sum()))
            if fused:
                p.mul_(self.keep).add_(self.values)
            else:
                p.copy_(_select(p, self.keep, self.values))
        else:
            p.index_copy_(0 if self.kind == "row" else 1, self.idx, self.values)

    def fusable(self) -> bool:
        """Whether the fused ``p·keep + values`` restore may be used (CPU, frozen values finite and not −0.0;
        the caller still checks that ``p`` is finite, since inf·0 is NaN)."""
        return self.kind == "element" and self.exact_add and self.param.data.is_cpu

    @torch.no_grad()
    def zero_state(self, state: dict) -> None:
        for value in state.values():
            if not isinstance(value, torch.Tensor) or value.shape != self.param.shape:
                continue  # scalars such as Adam's "step"
            v = _local(value)
            if self.kind == "all":
                v.zero_()
            elif self.kind == "element":
                v.masked_fill_(self.keep == 0, 0)  # a select: state may hold inf
            else:
                v.index_fill_(0 if self.kind == "row" else 1, self.idx, 0)

    @torch.no_grad()
    def moved(self) -> int:
        """How many frozen coordinates (on this rank) differ (bitwise, NaN-aware) from their attach values."""
        p = _local(self.param.detach())
        if self.kind == "all":
            now, then = p, self.values
        elif self.kind == "element":
            drop = self.drop
            now, then = p[drop], self.values[drop]
        else:
            now, then = p.index_select(0 if self.kind == "row" else 1, self.idx), self.values
        same = (now == then) | (torch.isnan(now) & torch.isnan(then))
        return int((~same).sum())


def _select(x: torch.Tensor, keep: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` where ``keep`` is set, else ``other`` (default 0): exact whatever the values (NaN, inf, −0.0)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(keep != 0, x, zero if other is None else other)


@torch.no_grad()
def _restore_all(targets: list[_Frozen]) -> None:
    """Restore many tensors with a few vectorised ``torch._foreach_*`` calls.

    The fused ``p·keep + values`` is exact only where ``p`` is finite (inf·0 is NaN; e.g. ``Adam(eps=0)`` makes
    0/0 on frozen coordinates): one sum per tensor says so, and the others take an exact select.
    """
    whole = [t for t in targets if t.kind == "all"]
    if whole:
        torch._foreach_copy_([_local(t.param.data) for t in whole], [t.values for t in whole])
    candidates = [t for t in targets if t.fusable()]
    fused: list[_Frozen] = []
    if candidates:
        sums = torch.stack([_local(t.param.data).sum().float() for t in candidates])
        fused = [t for t, ok in zip(candidates, torch.isfinite(sums).tolist(), strict=True) if ok]
    if fused:
        params = [_local(t.param.data) for t in fused]
        torch._foreach_mul_(params, [t.keep for t in fused])
        torch._foreach_add_(params, [t.values for t in fused])
    done = {id(t) for t in whole} | {id(t) for t in fused}
    for t in targets:
        if id(t) not in done:
            t.restore(fused=False)


def check_freeze_args(freeze: str, others: str) -> None:
    """Raise ``ValueError`` for an unknown ``freeze`` mode or ``others`` policy."""
    if freeze not in FREEZE_MODES:
        raise ValueError(f"freeze={freeze!r} is not one of {FREEZE_MODES}.")
    if others not in ("freeze", "train"):
        raise ValueError(f"others={others!r} must be 'freeze' or 'train'.")


def _state_stays_zero(opt: torch.optim.Optimizer) -> bool:
    """True when a zero gradient keeps a zero optimizer state zero (so per-step state zeroing can be skipped).

    Adam/AdamW with decoupled (or no) weight decay only feed gradients into their moments; SGD without
    momentum has no state. Anything else (SGD momentum with L2 decay, RMSprop, custom optimizers) folds the
    weights into the state and is zeroed after every step.
    """
    if isinstance(opt, torch.optim.AdamW):
        return True
    if isinstance(opt, torch.optim.Adam):
        return all(
            g.get("weight_decay", 0) == 0 or g.get("decoupled_weight_decay", False) for g in opt.param_groups
        )
    if isinstance(opt, torch.optim.SGD):
        return all(g.get("momentum", 0) == 0 for g in opt.param_groups)
    return False


class GradientMask:
    """Enforce a :class:`ParamMask` on a model's training: only masked-in coordinates change.

    Args:
        model: the model (plain, PEFT, DDP or compiled; names are canonical).
        mask: the mask (``1`` = may train) or a path to a saved mask file.
        freeze: ``"hard"`` (default: bit-identical guarantee), ``"groups"`` (hard, and drop fully frozen
            tensors from the optimizer), or ``"grad"`` (gradient masking only).
        others: what happens to trainable parameters the mask does not name: ``"freeze"`` (default) or ``"train"``.
    """

    def __init__(self, model: nn.Module, mask: ParamMask | str, freeze: str = "hard", others: str = "freeze"):
        check_freeze_args(freeze, others)
        self.model, self.freeze, self.others = model, freeze, others
        self.mask = (
            ParamMask.load(mask) if isinstance(mask, (str, bytes)) or hasattr(mask, "__fspath__") else mask
        )
        self._frozen: list[_Frozen] = []
        self._handles: list = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._removed: list[tuple[dict, list[nn.Parameter]]] = []
        self._zero_state_each_step = True

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def num_hooks(self) -> int:
        """Number of live hooks this object installed (0 after :meth:`detach`)."""
        return len(self._handles)

    def _targets(self) -> list[_Frozen]:
        from hfhooks.lora import lora_aware_mask  # LoRA mapping lives with the other PEFT knowledge

        index = ParamIndex(self.model)
        mask = lora_aware_mask(index, self.mask)
        mask.validate(index)
        frozen = []
        for name, param in index.items():
            if not param.requires_grad:
                continue
            if name not in mask and self.others == "train":
                continue
            target = _Frozen.build(name, param, mask)
            if target is not None:
                frozen.append(target)
        return frozen

    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> GradientMask:
        """Install the hooks; with an optimizer, also restore after each of its steps (``hard``/``groups``).

        Without an optimizer call :meth:`after_step` yourself after every ``optimizer.step()``.
        Snapshot values are taken now: attach after loading a checkpoint, before training.
        """
        if self.attached:
            raise RuntimeError("GradientMask is already attached; call detach() first.")
        self._frozen = self._targets()
        for target in self._frozen:
            if _is_dtensor(target.param):
                # FSDP2: the sharded parameter never sees an autograd gradient (the unsharded copy does); FSDP
                # runs post-accumulate hooks on it once the reduce-scattered gradient shard is in place.
                hook = target.param.register_post_accumulate_grad_hook(target.mask_grad_)
            else:
                # Before accumulation, clipping and DDP's all-reduce, so all of them see the masked gradient.
                hook = target.param.register_hook(target.mask_grad)
            self._handles.append(hook)
        if optimizer is not None:
            opt = innermost_optimizer(optimizer)
            self._optimizer = opt
            self._zero_state_each_step = not _state_stays_zero(opt)
            self._zero_all_state()
            if self.freeze == "groups":
                self._drop_frozen_from_groups(opt)
            if self.freeze in ("hard", "groups"):
                self._handles.append(opt.register_step_post_hook(lambda *_: self.after_step()))
        return self

    def after_step(self) -> None:
        """Restore frozen coordinates (and zero their optimizer state). Called automatically when attached
        with an optimizer in ``hard`` / ``groups`` mode."""
        if self.freeze == "grad":
            return
        dropped = {id(p) for _, params in self._removed for p in params}
        # Tensors dropped from the optimizer never stepped: nothing to undo.
        _restore_all([t for t in self._frozen if not (t.kind == "all" and id(t.param) in dropped)])
        if self._optimizer is not None and self._zero_state_each_step:
            self._zero_all_state()

    def _zero_all_state(self) -> None:
        if self._optimizer is None:
            return
        state = self._optimizer.state
        for target in self._frozen:
            if target.param in state:
                target.zero_state(state[target.param])

    def _drop_frozen_from_groups(self, opt: torch.optim.Optimizer) -> None:
        whole = {id(t.param) for t in self._frozen if t.kind == "all"}
        for group in opt.param_groups:
            dropped = [p for p in group["params"] if id(p) in whole]
            if dropped:
                self._removed.append((group, list(group["params"])))
                group["params"] = [p for p in group["params"] if id(p) not in whole]
                for p in dropped:
                    opt.state.pop(p, None)

    def moved(self) -> dict[str, int]:
        """``{name: number of frozen coordinates that changed since attach}`` for tensors where any did."""
        out = {t.name: t.moved() for t in self._frozen}
        return {k: v for k, v in out.items() if v}

    def detach(self) -> None:
        """Remove every hook this object installed and put back optimizer param groups it edited."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for group, params in self._removed:
            group["params"] = params
        self._removed.clear()
        self._optimizer = None

    def __enter__(self) -> GradientMask:
        if not self.attached:
            self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
