"""Step a torch optimizer a few parameters at a time, from inside its own ``step`` call.

Why: when the optimizer can move frozen coordinates (fused AdamW's weight decay, which cannot be applied by hand
bit for bit in bf16), their values must be copied before the step and put back after it. Copying them for every
parameter at once adds (frozen fraction × the weights) to the step's peak memory — 14–16 % of a plain Trainer
step at a 50 % mask. Stepping the parameters in parts, each with its own small snapshot, bounds that extra to
one part, and the result is the same bits: torch's optimizers update each parameter from its own gradient,
state and param-group settings only, and skip a parameter whose ``.grad`` is ``None`` entirely (no decay, no
state, no step count). So each part is stepped alone by clearing every other parameter's ``.grad`` for the
call, and the parts' parameters are left without ``.grad`` for the real step, which then steps the rest.

The parts are stepped through the optimizer class's ``step`` *without* torch's hook wrapper
(``functools.wraps`` keeps it as ``__wrapped__``), so that the step pre/post hooks of hfhooks and of anyone
else run once per real step, as they would without parts. Where that wrapper is not found, or a closure is
passed (it would be re-evaluated per part), :func:`raw_step` returns ``None`` and callers snapshot everything
at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

__all__ = ["PART_BYTES", "raw_step", "reattach", "split_by_size", "step_in_parts"]

PART_BYTES = 32 << 20  # parameter bytes stepped together: bounds the snapshot held at once

T = TypeVar("T")


def raw_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Callable | None:
    """The optimizer's unhooked step function (call it as ``fn(optimizer, *args, **kwargs)``) for a caller
    that is the optimizer's only step pre-hook, or ``None`` when parts cannot be stepped alone: not one of
    torch's own optimizers (a third-party one may step a parameter without gradient), LBFGS, a closure among
    the arguments, no recognisable hook wrapper, or other step pre-hooks (they may snapshot values too, and
    must see them before any part moved)."""
    cls = type(optimizer)
    if not cls.__module__.startswith("torch.optim.") or isinstance(optimizer, torch.optim.LBFGS):
        return None
    # accelerate's wrapper passes ``closure=None`` positionally; a real closure would run once per part
    if len(args) > 1 or (args[0] if args else kwargs.get("closure")) is not None:
        return None
    # torch keeps pre-hooks in these dicts (read only here): ours must be the only one
    own = getattr(optimizer, "_optimizer_step_pre_hooks", None)
    everyone = getattr(sys.modules.get("torch.optim.optimizer"), "_global_optimizer_pre_hooks", None)
    if own is None or len(own) != 1 or everyone is None or len(everyone) != 0:
        return None
    step = getattr(cls, "step", None)
    if not getattr(
        step, "hooked", False
    ):  # torch marks the hook wrapper it installs (Optimizer._patch_step_function)
        return None
    return getattr(step, "__wrapped__", None)


def step_in_parts(
    optimizer: torch.optim.Optimizer,
    step: Callable,
    parts: Iterable[tuple[Sequence[T], Sequence[torch.nn.Parameter]]],
    args: tuple,
    kwargs: dict,
    before: Callable[[Sequence[T]], None],
    after: Callable[[Sequence[T]], None],
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Step each part's parameters alone: ``before(items)``, ``step(optimizer, *args, **kwargs)`` with every
    other parameter's ``.grad`` cleared, ``after(items)``. Returns ``{parameter: grad}`` of the parts'
    parameters, which are left without ``.grad`` (so the real step skips them); give it to :func:`reattach`
    after the real step. Every other gradient is back in place when this returns, also when a part raises."""
    every = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grads = {p: p.grad for p in every}
    done: dict[torch.nn.Parameter, torch.Tensor] = {}
    try:
        for p in every:
            p.grad = None
        for items, params in parts:
            with_grad = [p for p in params if p in grads and p not in done]
            for p in with_grad:
                p.grad = grads[p]
            before(items)
            step(optimizer, *args, **kwargs)
            after(items)
            for p in with_grad:
                done[p] = grads[p]
                p.grad = None
    except BaseException:
        reattach(grads)
        raise
    for p, g in grads.items():
        if p not in done:
            p.grad = g
    return done


def reattach(grads: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    """Give the parameters their gradients back (after the real step that skipped them)."""
    for p, g in grads.items():
        p.grad = g


def split_by_size(items: Sequence[T], size: Callable[[T], int], budget: int) -> list[list[T]]:
    """Consecutive groups of ``items`` whose ``size`` sums to at most ``budget`` (an item larger than the
    budget is a group of its own)."""
    groups: list[list[T]] = []
    total = budget + 1
    for item in items:
        n = size(item)
        if total + n > budget or not groups:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += n
    return groups
