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


@dataclass
class _Frozen:
    """One parameter's frozen coordinates and their values at attach time."""

    name: str
    param: nn.Parameter
    kind: str  # "all" | "element" | "row" | "column"
    drop: torch.Tensor | None = None  # bool, broadcastable to the parameter: True = frozen
    idx: torch.Tensor | None = None  # frozen row/column indices
    values: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @classmethod
    def build(cls, name: str, param: nn.Parameter, mask: ParamMask | None) -> _Frozen | None:
        p = param.detach()
        if mask is None or name not in mask:
            return cls(name, param, "all", values=p.clone())
        gran, bits = mask.granularity(name), mask.vector(name).to(p.device)
        if bool(bits.all()):
            return None  # fully trainable: nothing to enforce
        if not bool(bits.any()):
            return cls(name, param, "all", values=p.clone())
        if gran == "element":
            drop = ~bits
            return cls(name, param, "element", drop=drop, values=p[drop].clone())
        axis = 0 if gran == "row" else 1
        idx = (~bits).nonzero().flatten()
        shape = [1] * p.dim()
        shape[axis] = p.shape[axis]
        return cls(
            name, param, gran, drop=(~bits).reshape(shape), idx=idx, values=p.index_select(axis, idx).clone()
        )

    def mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.kind == "all":
            return torch.zeros_like(grad)
        return grad.masked_fill(self.drop, 0)

    @torch.no_grad()
    def restore(self) -> None:
        p = self.param.data
        if self.kind == "all":
            p.copy_(self.values)
        elif self.kind == "element":
            p.masked_scatter_(self.drop, self.values)
        else:
            p.index_copy_(0 if self.kind == "row" else 1, self.idx, self.values)

    @torch.no_grad()
    def zero_state(self, state: dict) -> None:
        for value in state.values():
            if not isinstance(value, torch.Tensor) or value.shape != self.param.shape:
                continue  # scalars such as Adam's "step"
            if self.kind == "all":
                value.zero_()
            elif self.kind == "element":
                value.masked_fill_(self.drop, 0)
            else:
                value.index_fill_(0 if self.kind == "row" else 1, self.idx, 0)

    @torch.no_grad()
    def moved(self) -> int:
        """How many frozen coordinates differ (bitwise, NaN-aware) from their values at attach."""
        p = self.param.detach()
        if self.kind == "all":
            now = p
        elif self.kind == "element":
            now = p[self.drop]
        else:
            now = p.index_select(0 if self.kind == "row" else 1, self.idx)
        same = (now == self.values) | (torch.isnan(now) & torch.isnan(self.values))
        return int((~same).sum())


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
            if type(param).__name__ == "DTensor":
                raise NotImplementedError(
                    f"{name} is a DTensor (FSDP2 / tensor parallel): sharded masks are not supported yet. "
                    "Train with DDP, or a single process, to use GradientMask."
                )
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
            self._handles.append(target.param.register_hook(target.mask_grad))
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
        for target in self._frozen:
            if not (target.kind == "all" and id(target.param) in dropped):  # never stepped: nothing to undo
                target.restore()
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
