"""Hook lifecycle: every hook hfhooks installs is recorded per model, listed by one census, removed by one call,
and never outlives the ``Trainer`` run that installed it.

Each mechanism (:class:`~hfhooks.GradientMask`, :class:`~hfhooks.Router`, :class:`~hfhooks.LossHook`,
:class:`~hfhooks.AttributionAlignment`…) records the handles it installs in a :class:`HookSet`. The registry
behind :func:`installed_hooks` and :func:`remove_hooks` is keyed by the unwrapped model, so any wrapper (DDP,
PEFT, ``torch.compile``) finds the same hooks.

Interrupted runs. An exception inside ``Trainer.train()`` (Ctrl-C, OOM, a NaN guard) skips ``on_train_end``,
where callbacks remove their hooks; a later plain ``backward`` on the model would still be masked or routed.
Python offers no cheap way to run code when a frame unwinds (``sys.settrace`` / ``sys.setprofile`` slow every
call in the process; ``sys.monitoring`` needs Python ≥ 3.12) and the exception's traceback keeps the Trainer's
frame alive, so no finaliser runs either. A hook set installed inside a Trainer run therefore remembers that run
— the ``_inner_training_loop`` frame on the call stack (its id and code object) and the Trainer (weakly) — and
the run counts as over once that frame is no longer on the stack. Every hook set bound to a run is checked,
removed with its owner's ``detach()`` and reported with one warning:

* by a forward pre-hook on the model, before any other hook of that forward (one walk up the call stack per
  forward, ~2 µs; only on the thread that attached, since other threads cannot see that stack);
* whenever another hfhooks mechanism attaches to the same model;
* by :func:`installed_hooks` and :func:`remove_hooks`.

So after ``trainer.train()`` raised, ``installed_hooks(model)`` is already empty and the next forward of the
model runs without any hfhooks hook. Hook sets attached outside a Trainer run (a plain loop, a context manager)
live until their ``detach()`` / ``with`` block ends, or :func:`remove_hooks`.

Example:
    >>> import torch, hfhooks
    >>> model = torch.nn.Linear(2, 2)
    >>> mask = hfhooks.ParamMask({"weight": torch.tensor([[1, 0], [0, 1]]), "bias": torch.tensor([1, 0])})
    >>> gm = hfhooks.GradientMask(model, mask, freeze="grad").attach()
    >>> len(hfhooks.installed_hooks(model))
    2
    >>> hfhooks.remove_hooks(model)
    2
    >>> hfhooks.installed_hooks(model)
    []
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType
from typing import Any

import torch
from torch import nn

from hfhooks.core.names import unwrap_model

__all__ = ["FiniteMonitor", "HookRecord", "HookSet", "installed_hooks", "remove_hooks"]


@dataclass(frozen=True)
class HookRecord:
    """One live hook: the mechanism that installed it, its kind and what it is registered on."""

    owner: str  # e.g. "GradientMask"
    kind: str  # "tensor", "post_accumulate_grad", "forward_pre", "forward", "step_pre", "step_post"
    target: str  # a parameter or module name, or the optimizer's class


@dataclass
class _Run:
    """The Trainer run a hook set belongs to: its training-loop frame (by id and code) and the Trainer."""

    trainer: weakref.ref
    frame_id: int
    code: CodeType
    thread: int

    def alive(self) -> bool:
        trainer = self.trainer()
        if trainer is None:
            return False
        if threading.get_ident() != self.thread:
            return True  # another thread cannot see the training thread's stack: assume the run goes on
        frame = sys._getframe(1)
        while frame is not None:
            # the code object and id pick the frame; its `self` rules out a new frame at a reused address
            if id(frame) == self.frame_id and frame.f_code is self.code:
                return frame.f_locals.get("self") is trainer
            frame = frame.f_back
        return False


def _current_run() -> _Run | None:
    """The innermost ``Trainer._inner_training_loop`` on this thread's call stack, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop":
            trainer = frame.f_locals.get("self")
            if hasattr(trainer, "callback_handler") and hasattr(trainer, "state"):
                return _Run(weakref.ref(trainer), id(frame), frame.f_code, threading.get_ident())
        frame = frame.f_back
    return None


class _ModelHooks:
    """Registry entry of one (unwrapped) model: its live hook sets and the run watchdog."""

    def __init__(self) -> None:
        self.sets: weakref.WeakSet[HookSet] = weakref.WeakSet()
        self.watchdog: torch.utils.hooks.RemovableHandle | None = None


_REGISTRY: weakref.WeakKeyDictionary[nn.Module, _ModelHooks] = weakref.WeakKeyDictionary()


def _key(model: nn.Module) -> nn.Module:
    return unwrap_model(model)


def _live(handle: Any) -> bool:
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


class HookSet:
    """The hooks one mechanism installed on one model.

    Create it in ``attach()`` (it checks the model for hooks left by an interrupted run, and binds itself to the
    Trainer run it is created in, if any), register through it, and call :meth:`close` in ``detach()``.

    Short-lived hooks (one scoring pass, one captured forward) use it as a context manager: ``with HookSet(owner,
    model) as hooks: ...`` closes the set on exit, so :func:`installed_hooks` sees them while they are installed.

    Args:
        owner: the mechanism; its ``detach()`` is called when the hook set is removed from outside
            (an ended run, :func:`remove_hooks`), so that it can undo more than hooks (optimizer groups).
        model: the model the hooks serve.
        name: what :func:`installed_hooks` reports as the owner (default: the owner's class name).
    """

    def __init__(self, owner: Any, model: nn.Module, name: str | None = None):
        self.name = name or type(owner).__name__
        self._owner = weakref.ref(owner)
        self._model = model
        self._records: list[tuple[Any, str, str]] = []
        key = _key(model)
        _prune(key)
        self.run = _current_run()
        entry = _REGISTRY.setdefault(key, _ModelHooks())
        entry.sets.add(self)
        if self.run is not None and entry.watchdog is None:
            # prepend: the check runs before every other pre-hook of the forward, so a dead run's hooks are
            # removed before they act (hooks removed mid-forward would still run once: torch snapshots them)
            entry.watchdog = model.register_forward_pre_hook(_make_watchdog(weakref.ref(key)), prepend=True)
        self.live = True

    # -- registration ----------------------------------------------------------------------------------------
    def add(self, handle: Any, kind: str, target: str) -> Any:
        """Record a handle (anything with ``remove()``) installed by the owner; returns it."""
        if kind == "tensor":  # hooks on a step's graph die with it: forget them, or the list grows every step
            self._records = [r for r in self._records if r[1] != "tensor" or _live(r[0])]
        self._records.append((handle, kind, target))
        return handle

    def forward_pre_hook(self, module: nn.Module, fn: Callable, target: str = "", **kwargs: Any) -> Any:
        """``module.register_forward_pre_hook(fn, **kwargs)``, inert once this set is closed."""
        return self.add(module.register_forward_pre_hook(self._guard(fn), **kwargs), "forward_pre", target)

    def forward_hook(self, module: nn.Module, fn: Callable, target: str = "", **kwargs: Any) -> Any:
        """``module.register_forward_hook(fn, **kwargs)``, inert once this set is closed."""
        return self.add(module.register_forward_hook(self._guard(fn), **kwargs), "forward", target)

    def tensor_hook(self, tensor: torch.Tensor, fn: Callable, target: str = "") -> Any:
        """``tensor.register_hook(fn)`` (a gradient hook, before accumulation)."""
        return self.add(tensor.register_hook(fn), "tensor", target)

    def post_accumulate_grad_hook(self, param: torch.Tensor, fn: Callable, target: str = "") -> Any:
        """``param.register_post_accumulate_grad_hook(fn)``."""
        return self.add(param.register_post_accumulate_grad_hook(fn), "post_accumulate_grad", target)

    def step_pre_hook(self, optimizer: torch.optim.Optimizer, fn: Callable) -> Any:
        """``optimizer.register_step_pre_hook(fn)``."""
        return self.add(optimizer.register_step_pre_hook(fn), "step_pre", type(optimizer).__name__)

    def step_post_hook(self, optimizer: torch.optim.Optimizer, fn: Callable) -> Any:
        """``optimizer.register_step_post_hook(fn)``."""
        return self.add(optimizer.register_step_post_hook(fn), "step_post", type(optimizer).__name__)

    def _guard(self, fn: Callable) -> Callable:
        ref = weakref.ref(self)

        def guarded(*args: Any, **kwargs: Any) -> Any:
            hooks = ref()
            return fn(*args, **kwargs) if hooks is not None and hooks.live else None

        return guarded

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state -----------------------------------------------------------------------------------------------
    def records(self) -> list[HookRecord]:
        """The hooks of this set that are still installed."""
        return [HookRecord(self.name, kind, target) for h, kind, target in self._records if _live(h)]

    def __len__(self) -> int:
        return len(self.records())

    def close(self) -> int:
        """Remove every hook of this set; returns how many were still installed. Idempotent."""
        removed = len(self)
        for handle, _, _ in self._records:
            handle.remove()
        self._records.clear()
        self.live = False
        key = _key(self._model)
        entry = _REGISTRY.get(key)
        if entry is not None:
            entry.sets.discard(self)
            if entry.watchdog is not None and not any(s.run is not None for s in entry.sets):
                entry.watchdog.remove()
                entry.watchdog = None
        return removed

    def _detach_owner(self) -> int:
        """Have the owner undo everything (hooks, optimizer edits); fall back to removing the hooks."""
        n = len(self)
        owner = self._owner()
        if owner is not None and hasattr(owner, "detach"):
            try:
                owner.detach()
            except Exception as err:  # the hooks must go even if the owner's undo fails
                warnings.warn(
                    f"hfhooks: {self.name}.detach() failed ({err!r}); removing its hooks.", stacklevel=3
                )
        self.close()
        return n


def _make_watchdog(key_ref: weakref.ref) -> Callable:
    def watchdog(module: nn.Module, args: tuple) -> None:
        key = key_ref()
        if key is not None:
            _prune(key)

    # Under torch.compile the check runs eagerly (dynamo cannot trace a walk over Python frames).
    return torch.compiler.disable(watchdog)


def _prune(key: nn.Module) -> None:
    """Remove (with one warning) the hook sets on ``key`` whose Trainer run is over."""
    entry = _REGISTRY.get(key)
    if entry is None:
        return
    dead = [s for s in list(entry.sets) if s.run is not None and s.live and not s.run.alive()]
    if not dead:
        return
    counts: dict[str, int] = {}
    for s in dead:
        counts[s.name] = counts.get(s.name, 0) + s._detach_owner()
    detail = ", ".join(f"{n}: {c}" for n, c in counts.items())
    warnings.warn(
        f"hfhooks: the Trainer run that installed hooks on this model ended without on_train_end (an exception "
        f"interrupted train()); removed its {sum(counts.values())} hooks ({detail}). Nothing of that run masks, "
        "routes or changes losses any more. hfhooks.remove_hooks(model) removes hooks explicitly.",
        RuntimeWarning,
        stacklevel=4,
    )


def installed_hooks(model: nn.Module) -> list[HookRecord]:
    """Every hfhooks hook installed for ``model`` (any wrapper of it), after removing those whose Trainer run
    ended without ``on_train_end`` (with a warning). An empty list means no hfhooks hook acts on it."""
    key = _key(model)
    _prune(key)
    entry = _REGISTRY.get(key)
    if entry is None:
        return []
    out = [r for s in list(entry.sets) for r in s.records()]
    if entry.watchdog is not None and _live(entry.watchdog):
        out.append(HookRecord("hfhooks", "forward_pre", "run watchdog"))
    return out


def remove_hooks(model: nn.Module) -> int:
    """Remove every hfhooks hook installed for ``model`` (detaching the mechanisms that installed them, which
    also restores optimizer param groups they edited). Returns the number of hooks removed."""
    key = _key(model)
    entry = _REGISTRY.get(key)
    if entry is None:
        return 0
    removed = sum(s._detach_owner() for s in list(entry.sets))
    if entry.watchdog is not None:
        removed += int(_live(entry.watchdog))
        entry.watchdog.remove()
        entry.watchdog = None
    return removed


_NORM_SLICE = 1 << 22  # elements per slice when FiniteMonitor norms a half-precision tensor


def _norms(pieces: list[torch.Tensor]) -> torch.Tensor:
    """One L2 norm per tensor, accumulated in float32 (half-precision tensors upcast) — float64 tensors in their
    own dtype: ``_foreach_norm(dtype=float32)`` refuses to narrow them."""
    wide = [i for i, t in enumerate(pieces) if t.dtype == torch.float64]
    if not wide:
        return torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float32))
    out = torch.empty(len(pieces), dtype=torch.float64, device=pieces[0].device)
    rest = sorted(set(range(len(pieces))) - set(wide))
    for idx, kw in ((wide, {}), (rest, {"dtype": torch.float32})):
        if idx:
            norms = torch._foreach_norm([pieces[i] for i in idx], 2, **kw)
            out[torch.tensor(idx, device=out.device)] = torch.stack(norms).to(torch.float64)
    return out


class FiniteMonitor:
    """Warn once when parameters turn non-finite after an optimizer step (a NaN/inf loss or gradient makes every
    trainable weight NaN, and the Trainer's ``logging_nan_inf_filter`` hides the loss).

    :meth:`check` takes one L2 norm per tensor (``torch._foreach_norm``, a single read of the trainable
    parameters; ~1 ms per million parameters on one CPU core, about 15 % of an AdamW step there). On CPU the result is read at once; on accelerators it
    is copied asynchronously to pinned memory and read at a later :meth:`check` or :meth:`flush` once ready, so
    training never waits on the device. After the first warning it stops checking.
    """

    def __init__(self, params: list[torch.Tensor], what: str):
        self.params = list(params)
        self.what = what
        self.step = 0  # optimizer steps checked
        self.step_offset = 0  # added to step in the message (the Trainer's global_step at attach)
        self.warned = False
        self._pending: list[tuple[int, torch.Tensor, Any]] = []
        self._groups: dict[torch.device, list[torch.Tensor]] = {}
        for p in self.params:
            local = p.to_local() if type(p).__name__ == "DTensor" else p
            self._groups.setdefault(local.device, []).append(local)
        # tensors already non-finite at attach (e.g. inf on frozen coordinates) did not *become* so: skip them
        with torch.no_grad():
            self._finite_at_start = {d: self._finite(ts) for d, ts in self._groups.items()}

    @classmethod
    def for_model(cls, model: nn.Module, what: str, step_offset: int = 0) -> FiniteMonitor:
        """A monitor over ``model``'s trainable parameters, reporting steps after ``step_offset`` (for callbacks
        that have no :class:`~hfhooks.GradientMask` of their own: routing, attribution alignment)."""
        monitor = cls([p for p in model.parameters() if p.requires_grad], what)
        monitor.step_offset = step_offset
        return monitor

    @staticmethod
    def _finite(tensors: list[torch.Tensor]) -> torch.Tensor:
        # The L2 norm is non-finite iff an element is (accumulated in float32, so bf16/fp16 tensors cannot
        # overflow it; a float32 tensor would need elements ~1e19). Measured 10x faster than max|x| on CPU.
        # A bf16/fp16 tensor is upcast whole for its norm (126 MB for a 32000 x 1024 bf16 embedding, measured),
        # so large contiguous ones are normed in slices of _NORM_SLICE elements: one slice's copy at a time.
        pieces, owner = [], []
        for i, t in enumerate(tensors):
            t = t.detach()
            if t.numel() > _NORM_SLICE and t.is_contiguous() and t.element_size() < 4:
                parts = t.view(-1).split(_NORM_SLICE)
            else:
                parts = (t,)
            pieces.extend(parts)
            owner.extend([i] * len(parts))
        ok = torch.isfinite(_norms(pieces))
        if len(pieces) == len(tensors):
            return ok
        broken = torch.zeros(len(tensors), dtype=torch.int32, device=ok.device)
        broken.index_add_(0, torch.tensor(owner, device=ok.device), (~ok).to(torch.int32))
        return broken == 0

    def check(self) -> None:
        """Call after each optimizer step."""
        self.step += 1
        if self.warned or not self.params:
            return
        self._poll(block=False)
        for device, tensors in self._groups.items():
            with torch.no_grad():
                bad = (~self._finite(tensors) & self._finite_at_start[device]).sum()
            if device.type == "cpu":
                self._report(self.step, int(bad))
            else:
                event = torch.cuda.Event() if device.type == "cuda" else None
                host = torch.empty((), dtype=bad.dtype, pin_memory=event is not None)
                host.copy_(bad, non_blocking=event is not None)  # other accelerators: a plain (synced) copy
                if event is not None:
                    event.record()
                self._pending.append((self.step, host, event))

    def flush(self) -> None:
        """Read every pending result (waits for the device); call at the end of training."""
        self._poll(block=True)

    def _poll(self, block: bool) -> None:
        while self._pending and not self.warned:
            step, host, event = self._pending[0]
            if event is not None and not block and not event.query():
                return
            if event is not None:
                event.synchronize()
            self._pending.pop(0)
            self._report(step, int(host))
        if self.warned:
            self._pending.clear()

    def _report(self, step: int, bad: int) -> None:
        if bad and not self.warned:
            # exact recount (once, off the hot path): which tensors hold a NaN / inf element now
            bad = 0
            with torch.no_grad():
                for device, tensors in self._groups.items():
                    for t, ok in zip(tensors, self._finite_at_start[device].tolist(), strict=True):
                        bad += int(ok and not bool(torch.isfinite(t.detach()).all()))
            if not bad:
                return
            self.warned = True
            warnings.warn(
                f"{self.what}: {bad} of {len(self.params)} trainable tensors turned NaN or inf at optimizer step "
                f"{step + self.step_offset} (a non-finite loss or gradient). Training continues on broken weights; "
                "stop and lower the learning rate, enable gradient clipping or fix the loss. (Warned once.)",
                RuntimeWarning,
                stacklevel=4,
            )
