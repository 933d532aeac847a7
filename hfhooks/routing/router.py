"""Selective gradient masking (SGTM) and gradient routing: localise a domain into dedicated parameters.

Dedicated parameters are, in selected layers, the last ``k`` MLP hidden units and the last ``h`` attention
heads (:func:`~hfhooks.routing.ablation.dedicated_mask`). Each training forward carries a routing label per example:

=========== ===== ============================================== ==============================================
label       value forward                                        gradient (parameter-level, ``level="param"``)
=========== ===== ============================================== ==============================================
forget      1     full model                                     only the dedicated coordinates receive it
retain      0     dedicated activations zeroed                   nothing reaches the dedicated coordinates
unlabelled  -1    full model                                     unchanged
=========== ===== ============================================== ==============================================

Parameter-level masking needs label-homogeneous micro-batches (:class:`hfhooks.TaggedDataset` with
``group_by``); gradient tensor hooks mask each micro-batch before accumulation, so micro-batches of different
modes may share an optimizer step. Activation-level routing (``level="activation"``) handles mixed batches,
per example or per token: at every dedicated-unit site ``ã = m ⊙ a + (1 − m) ⊙ stopgrad(a)``, with weights
``m`` (fractional or negative allowed) chosen by label for dedicated and shared units.

One optimizer for everything still moves zero-gradient slices through momentum and weight decay (a known
weakness of the reference code, which avoids it with separate optimizers). Routing is therefore exact by
default (``strict=True``): after each step whose micro-batches were all *forget* (all *retain*), the coordinates
that mode must not change are restored, which needs the optimizer (``Router(..., optimizer=opt)`` or
``attach(opt)``). The leaky behaviour of the reference code must be asked for by name: ``strict=False``.
A first optimizer step that no routing label reached raises before the optimizer changes anything.

Under DDP the masks act on each rank's micro-batch before the all-reduce. Under FSDP2 (``fully_shard``) the
sharded DTensor parameters only ever receive the reduce-scattered, accumulated gradient, so the gradient hooks
go on the full parameters FSDP2 computes with (:func:`~hfhooks.core.params.fsdp2_unsharded_params`): each
micro-batch is routed whole, on its rank, before ranks are averaged, exactly as one process would; activation
sites see full activations; strict steps hold coordinates of each rank's local shard. Modes are united across
ranks before a strict step (see :meth:`Router._sync_modes`), so every rank holds the same coordinates.

Under DeepSpeed ZeRO-1/2/3 the gradient hooks see each micro-batch's full gradient as without it, and the step
hooks go on the torch optimizer DeepSpeed steps inside ``backward`` (once per param group): each rank takes the
snapshot from, and restores it into, its own fragments of the fp32 master weights (:mod:`hfhooks.freeze.deepspeed`);
DeepSpeed copies the masters into the module's parameters after the step.

The dedicated mask itself, and what is done with it after training (:func:`~hfhooks.routing.ablation.ablate`,
:func:`~hfhooks.routing.ablation.calibrate_logits`), live in :mod:`hfhooks.routing.ablation`.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hfhooks.core.data import pop_kwargs_hook
from hfhooks.core.hooks import HookSet
from hfhooks.core.params import ParamIndex, fsdp2_unsharded_params, is_dtensor, local_tensor, shard_like
from hfhooks.freeze import deepspeed as ds
from hfhooks.freeze.gradient_mask import innermost_optimizer
from hfhooks.freeze.stepping import PART_BYTES, raw_step, reattach, split_by_size, step_in_parts
from hfhooks.masks.mask import ParamMask
from hfhooks.routing.ablation import check_dedicated
from hfhooks.routing.config import RoutingConfig

__all__ = ["FORGET", "RETAIN", "UNLABELLED", "Router", "routing_labels"]


FORGET, RETAIN, UNLABELLED = 1, 0, -1
_MODE_NAMES = {FORGET: "forget", RETAIN: "retain", UNLABELLED: "unlabelled"}
_NAMES = {
    "forget": FORGET,
    "retain": RETAIN,
    "unlabelled": UNLABELLED,
    "unlabeled": UNLABELLED,
    None: UNLABELLED,
}


def routing_labels(values: Iterable[Any]) -> list[int]:
    """Normalise labels (``"forget"``/``"retain"``/``None``/``"unlabelled"`` or 1/0/-1) to ints."""
    out = []
    for v in values:
        if isinstance(v, str) or v is None:
            if v not in _NAMES:
                raise ValueError(
                    f"Unknown routing label {v!r}: use 'forget', 'retain', 'unlabelled' or 1/0/-1."
                )
            out.append(_NAMES[v])
        elif int(v) in (FORGET, RETAIN, UNLABELLED):
            out.append(int(v))
        else:
            raise ValueError(f"Unknown routing label {v!r}: use 'forget', 'retain', 'unlabelled' or 1/0/-1.")
    return out


@dataclass
class _Target:
    """Routing state for one trainable parameter.

    Row/column masks are kept as two index vectors along their axis (dedicated and shared rows/columns) and
    applied with ``index_fill`` / ``index_select`` / ``index_copy_``: never expanded to the parameter's shape,
    which would cost 1 byte per element (≈ 6.5 GB at 7B). Element masks (biases, hand-built masks) keep their
    bool tensor of the parameter's shape, which is what the mask stores anyway.

    Under FSDP2 two tensors play the parameter's part: gradients are routed on ``grad_param``, the full
    parameter FSDP2 computes with (each micro-batch's full gradient, before ranks are averaged), so
    ``dedicated`` / ``shared`` index the full shape; a strict step holds coordinates of ``param``, the sharded
    DTensor the optimizer steps, on this rank's shard, which ``local_dedicated`` / ``local_shared`` index.
    Elsewhere both pairs are the same tensors.
    """

    param: nn.Parameter
    shared_on_forget: bool  # a non-dedicated parameter that still learns from forget data
    axis: int | None = None  # row (0) / column (1) mask; None: element mask, or no dedicated coordinates
    dedicated: torch.Tensor | None = None  # axis: long indices; element: bool of the param's shape; else None
    shared: torch.Tensor | None = None  # axis: long indices of the other rows / columns
    grad_param: torch.Tensor | None = None  # where the gradient hook goes (default: param)
    local_dedicated: torch.Tensor | None = None  # dedicated / shared on this rank's shard (default: the same)
    local_shared: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.grad_param is None:
            self.grad_param = self.param
        if self.local_dedicated is None:
            self.local_dedicated, self.local_shared = self.dedicated, self.shared

    @classmethod
    def build(
        cls,
        param: nn.Parameter,
        mask: ParamMask,
        name: str,
        shared_on_forget: bool,
        grad_param: torch.Tensor | None = None,
    ) -> _Target:
        if name not in mask:
            return cls(param, shared_on_forget, grad_param=grad_param)
        gran = mask.granularity(name)
        local = _local_mask(mask, name, param) if is_dtensor(param) else None
        # gradients are routed where the gradient hook's tensor lives (FSDP2 with CPU offload: the compute
        # device, while the sharded parameter, its snapshots and local indices stay on the CPU)
        device = (grad_param if grad_param is not None else param).device
        if gran == "element":
            dedicated = mask[name].to(device)
            return cls(
                param, shared_on_forget, dedicated=dedicated, grad_param=grad_param, local_dedicated=local
            )
        vector = mask.vector(name).to(device)
        target = cls(
            param,
            shared_on_forget,
            axis=0 if gran == "row" else 1,
            dedicated=vector.nonzero().flatten(),
            shared=(~vector).nonzero().flatten(),
            grad_param=grad_param,
        )
        if local is not None:  # this rank's rows (FSDP2 shards dim 0) / all its columns, as index vectors
            along = local.movedim(target.axis, 0).reshape(local.shape[target.axis], -1).any(dim=1)
            target.local_dedicated, target.local_shared = (
                along.nonzero().flatten(),
                (~along).nonzero().flatten(),
            )
        return target

    def zero_grad_of(self, grad: torch.Tensor, dedicated: bool) -> torch.Tensor:
        """``grad`` (full shape) with the dedicated (``dedicated=True``) or the shared coordinates set to zero."""
        if self.axis is None:
            return grad.masked_fill(self.dedicated if dedicated else ~self.dedicated, 0)
        if dedicated:  # a few rows/columns to zero
            return grad.index_fill(self.axis, self.dedicated, 0)
        # keep only the few dedicated rows/columns: build from zeros (cost ∝ the dedicated count) rather than
        # zeroing the many shared ones — index_fill over most columns measured 5-20× slower than this on CPU
        kept = grad.index_select(self.axis, self.dedicated)
        return torch.zeros_like(grad).index_copy_(self.axis, self.dedicated, kept)

    def snapshot(self, dedicated: bool | None) -> _Snapshot:
        """The current values of the dedicated (True), shared (False) or all (None) coordinates of this rank's
        tensor (the local shard under FSDP2), gathered."""
        p = local_tensor(self.param.detach())
        if dedicated is None:
            return _Snapshot(self.param, None, None, p.clone())
        if self.axis is None:
            frozen = self.local_dedicated if dedicated else ~self.local_dedicated
            return _Snapshot(self.param, None, frozen, p[frozen])
        index = self.local_dedicated if dedicated else self.local_shared
        return _Snapshot(self.param, self.axis, index, p.index_select(self.axis, index))

    def master_snapshot(self, dedicated: bool | None) -> _MasterSnapshot | None:
        """DeepSpeed: like :meth:`snapshot`, from this rank's fragment of the fp32 master weight (local: each rank
        holds only its own fragment's values); ``None`` where this rank holds no fragment."""
        found = ds.local_master(self.param)
        if found is None:
            return None
        fragment, start = found
        where = self._flat_selection(dedicated, start, fragment.numel(), fragment.device)
        values = fragment[where].clone()
        if values.numel() * 8 < where.numel():  # few held (a retain step's dedicated slices): int64 positions
            where = where.nonzero().flatten()
        return _MasterSnapshot(self.param, where, values)

    def _flat_selection(
        self, dedicated: bool | None, start: int, n: int, device: torch.device
    ) -> torch.Tensor:
        """Which of the flattened parameter's elements ``start .. start + n`` (a master fragment, padded past
        the end under ZeRO-3) are the dedicated (True), shared (False) or any (None) coordinates."""
        shape = ds.full_shape(self.param)
        flat = torch.arange(start, start + n, device=device)
        inside = flat < math.prod(shape)
        if dedicated is None:
            return inside
        flat = flat.clamp_(max=math.prod(shape) - 1)
        if self.axis is None:  # element mask of the parameter's shape
            chosen = self.dedicated.to(device).reshape(-1)[flat]
        else:  # the row (axis 0) / column (axis 1) each element lies in, looked up in the dedicated rows / columns
            inner = math.prod(shape[self.axis + 1 :])
            vector = torch.zeros(shape[self.axis], dtype=torch.bool, device=device)
            vector[self.dedicated.to(device)] = True
            chosen = vector[(flat // inner) % shape[self.axis]]
        return inside & (chosen if dedicated else ~chosen)


@dataclass
class _MasterSnapshot:
    """DeepSpeed: the values one optimizer step must not change in this rank's fragment of an fp32 master weight,
    and where they lie in it (a bool over the fragment, or int64 positions where they are few)."""

    param: nn.Parameter
    where: torch.Tensor
    values: torch.Tensor

    @torch.no_grad()
    def restore(self) -> None:
        """Write the held values back into the master fragment (local). DeepSpeed copies the masters into the
        module's parameters after the step, so those follow."""
        found = ds.local_master(self.param)
        if found is not None:
            fragment = found[0]
            if self.where.dtype == torch.bool:
                fragment.masked_scatter_(self.where, self.values)
            else:
                fragment.index_copy_(0, self.where, self.values)
            ds.set_local_master(self.param, fragment)

    def nbytes(self) -> int:
        return self.values.nbytes + self.where.nbytes


def _local_mask(mask: ParamMask, name: str, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``mask[name]`` (bool, the local shard's shape). The full-shape bool tensor exists
    only here, once per sharded parameter when the router attaches: what it costs is one byte per element of
    the largest parameter, for a moment."""
    return shard_like(mask[name].to(param.device).contiguous(), param).to(local_tensor(param).device)


@dataclass
class _Snapshot:
    """Values one optimizer step must not change, gathered (only those coordinates), and where they go back
    (into this rank's tensor: the local shard of a DTensor)."""

    param: nn.Parameter
    axis: int | None  # index_copy_ along this axis; None: masked_scatter_ (element mask) or a whole tensor
    where: torch.Tensor | None  # long indices (axis), bool mask (element) or None (whole tensor)
    values: torch.Tensor

    @torch.no_grad()
    def restore(self) -> None:
        data = local_tensor(self.param.data)
        if self.where is None:
            data.copy_(self.values)
        elif self.axis is None:
            data.masked_scatter_(self.where, self.values)
        else:
            data.index_copy_(self.axis, self.where, self.values)

    def nbytes(self) -> int:
        extra = self.where.numel() * self.where.element_size() if self.where is not None else 0
        return self.values.numel() * self.values.element_size() + extra


@dataclass
class _Site:
    """A module whose input's last dimension holds hidden units, some of them dedicated."""

    module: nn.Module
    units: torch.Tensor  # bool over the last input dimension: True = dedicated


class Router:
    """Route gradients by per-example labels (see the module docstring). Usable in any training loop.

    Args:
        model: the model the Trainer (or your loop) calls.
        dedicated: mask of dedicated coordinates (1 = dedicated), e.g. from :func:`dedicated_mask`.
        level: ``"param"`` (SGTM, homogeneous micro-batches) or ``"activation"`` (gradient routing).
        label_name: the keyword the routing labels arrive under (popped before ``forward``).
        forget_weights / retain_weights: activation-level ``(dedicated, shared)`` gradient weights.
        shared_on_forget: patterns of non-dedicated parameters that still learn from forget data (e.g.
            ``["*embed_tokens*"]``); by default forget data trains only dedicated coordinates.
        strict: ``True`` (default): restore, after each optimizer step, the coordinates that step's mode must
            not change (momentum / weight decay), so nothing leaks; needs ``optimizer`` for parameter-level
            routing. ``False``: the leaky mode (one optimizer moves every coordinate), asked for by name.
        optimizer: the optimizer that steps the model (used by ``with Router(...)`` and :meth:`attach`).
        config: a :class:`~hfhooks.RoutingConfig`; the keywords above (but ``optimizer``) replace its fields.
            Its callback-only fields (``layers``, ``mlp_units``, ``heads``, ``save_mask``, ``resume_from``)
            are not used here.
    """

    _FIELDS = ("level", "label_name", "forget_weights", "retain_weights", "shared_on_forget", "strict")

    def __init__(
        self,
        model: nn.Module,
        dedicated: ParamMask,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        config: RoutingConfig | None = None,
        **options: Any,
    ):
        self.config = RoutingConfig.resolve(config, options, "Router", only=self._FIELDS)
        check_dedicated(dedicated, "Router")
        self.model, self.dedicated, self.optimizer = model, dedicated, optimizer
        self.level, self.label_name, self.strict = (
            self.config.level,
            self.config.label_name,
            self.config.strict,
        )
        self.forget_weights, self.retain_weights = self.config.forget_weights, self.config.retain_weights
        self.shared_on_forget = list(self.config.shared_on_forget)
        self.counts: Counter[str] = Counter()  # micro-batches seen per mode (training forwards only)
        self._counts_at_attach: Counter[str] = Counter()  # counts when attached (restored ones, on resume)
        self._labels: torch.Tensor | None = None
        self._mode: int = UNLABELLED
        # modes of the micro-batches whose gradients reached the parameters since the last step (what a strict step
        # holds by), recorded by the first gradient hook of each backward from _pending (the grad-enabled training
        # forwards since the last backward); _forward_modes: those forwards' modes, for _check_hooks_fired
        self._step_modes: set[int] = set()
        self._pending: set[int] = set()
        self._forward_modes: set[int] = set()
        self._routed = 0  # gradient hooks that routed a forget / retain micro-batch since the last step
        self._eval_labelled = 0  # labelled forwards in eval mode with gradients enabled since the last step
        self._warned_mixed_backward = False  # param level: forwards of several modes before one backward
        self._hooks: HookSet | None = None
        self.steps = 0  # optimizer steps since attach (counted by the step pre-hook)
        self._targets: list[_Target] = []
        self._sites: list[_Site] = []
        self._snapshot: list[_Snapshot | _MasterSnapshot] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._detached: dict[nn.Parameter, torch.Tensor] = {}  # grads of the parts already stepped this step
        # DeepSpeed ZeRO stage (3, or 2 for ZeRO-1/2), see hfhooks.freeze.deepspeed
        self._zero: int | None = None
        # a training forward ran since the last step's snapshot (DeepSpeed, see _before_step)
        self._fresh = False

    @property
    def num_hooks(self) -> int:
        return len(self._hooks) if self._hooks is not None else 0

    @property
    def attached(self) -> bool:
        return self._hooks is not None and self._hooks.live

    # -- setup ---------------------------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> Router:
        """Install the label pre-hook, gradient hooks, activation hooks and optimizer step hooks.

        ``optimizer`` defaults to the constructor's. Parameter-level ``strict`` routing refuses to attach
        without one (it could not undo weight decay and momentum); pass ``strict=False`` to accept the leak.
        """
        if self.attached:
            raise RuntimeError("Router is already attached; call detach() first.")
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None and self.strict and self.level == "param":
            raise ValueError(
                "Router(strict=True) needs the optimizer: without its step hooks, weight decay and momentum move "
                "coordinates a forget (retain) step must not change. Use Router(model, dedicated, optimizer=opt) "
                "(or router.attach(opt)); strict=False asks for the leaky behaviour explicitly."
            )
        full = fsdp2_unsharded_params(self.model)  # collective; leaves the module attributes sharded
        index = ParamIndex(self.model)
        self._zero = ds.zero_stage(self.model)
        self._check_sharded(index, full)
        self.dedicated = self.dedicated.canonical(index)  # tied-weight aliases act on the shared tensor
        resolved = self.dedicated.validate(index)
        frozen = [n for n, p in resolved.items() if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"Dedicated parameters {frozen[:3]} are frozen (requires_grad=False), e.g. base weights of a PeftModel. "
                "Routing needs trainable dedicated parameters: train the full model, or add the dedicated modules to "
                "the LoRA config's modules_to_save."
            )
        shared = set(index.select(self.shared_on_forget)) if self.shared_on_forget else set()
        ignored = sorted(n for n in shared if n in self.dedicated and index.param(n).requires_grad)
        if ignored:  # never silent: the option cannot act on these
            warnings.warn(
                f"Router: shared_on_forget={list(self.shared_on_forget)} matches {len(ignored)} parameter(s) with "
                f"dedicated coordinates (e.g. {ignored[:3]}); it applies to parameters without any, so forget "
                "steps still train only their dedicated coordinates. Narrow the patterns to silence this.",
                UserWarning,
                stacklevel=3,
            )
        for name, param in index.items():
            if param.requires_grad:
                self._targets.append(
                    _Target.build(param, self.dedicated, name, name in shared, full.get(param))
                )
        for name in self.dedicated:
            gran = self.dedicated.granularity(name)
            module = index.info(name).module
            consumer_axis = (
                0 if type(module).__name__ == "Conv1D" else 1
            )  # input units live on this weight axis
            if name.endswith(".weight") and gran == ("row" if consumer_axis == 0 else "column"):
                device = full.get(index.param(name), index.param(name)).device  # where activations are
                self._sites.append(_Site(module, self.dedicated.vector(name).to(device)))
        if not self._sites:
            raise ValueError(
                "The dedicated mask has no consumer (down/output projection) slices: nothing to route in the forward."
            )
        opt = self._stepping_optimizer(optimizer)
        self._hooks = hooks = HookSet(self, self.model)
        self.steps = 0
        self._counts_at_attach = Counter(self.counts)
        self.end_window()  # a re-attached router starts a fresh window
        pop_kwargs_hook(hooks, self.model, [self.label_name], self._receive, "routing labels")
        for target in self._targets:
            hooks.tensor_hook(target.grad_param, self._grad_hook(target))
        for site in self._sites:
            hooks.forward_pre_hook(site.module, self._site_hook(site))
        if opt is not None:
            self._optimizer = opt
            # torch passes the step's own (self, *args): the optimizer comes first
            hooks.step_pre_hook(opt, lambda _opt, args, kwargs: self._before_step(args[1:], kwargs))
            if self.strict:
                hooks.step_post_hook(opt, lambda *_: self._after_step())
        return self

    def _stepping_optimizer(self, optimizer: Any) -> torch.optim.Optimizer | None:
        """The torch optimizer whose step the router hooks: inside accelerate's wrapper, or, under DeepSpeed, the
        one DeepSpeed's ZeRO optimizer steps inside ``backward`` on the fp32 masters, once per param group
        (ZeRO-3: sub-group) — the wrappers around it step nothing there."""
        if optimizer is None:
            return None
        if not self._zero:
            return innermost_optimizer(optimizer)
        opt = ds.torch_optimizer(optimizer)
        zero_opt = ds.zero_optimizer(optimizer)
        if getattr(zero_opt, "backup_optimizer", None) is not None and self.strict and self.level == "param":
            # ZeRO-3 partial optimizer offload (offload_optimizer.ratio < 1) steps part of the sub-groups with a
            # second optimizer this router does not hook: those would not be held
            self._targets.clear()
            self._sites.clear()
            raise ValueError(
                "Router(strict=True) under ZeRO-3 with a partial optimizer offload (offload_optimizer.ratio < 1): "
                "DeepSpeed steps part of the parameters with a second optimizer (backup_optimizer) outside the "
                "step the router holds, so a forget (retain) step could change coordinates it must not. Offload "
                "the whole optimizer (ratio 1, the default) or none, or use strict=False for the leaky behaviour."
            )
        if opt is None and self.strict and self.level == "param":
            self._targets.clear()
            self._sites.clear()
            raise ValueError(
                f"Router(strict=True) found no torch optimizer inside DeepSpeed's {type(optimizer).__name__}: "
                "its step hooks are what hold the coordinates a forget (retain) step must not change. Use a "
                "torch optimizer (e.g. TrainingArguments(optim='adamw_torch')), or strict=False for the leaky "
                "behaviour."
            )
        return opt

    @staticmethod
    def _check_sharded(index: ParamIndex, full: dict[nn.Parameter, nn.Parameter]) -> None:
        """Raise for trainable DTensors that FSDP2 does not turn into full parameters (``full``: see
        :func:`~hfhooks.core.params.fsdp2_unsharded_params`) — tensor parallel, whose gradient hooks would never
        fire: routing needs each micro-batch's full gradient (see :class:`_Target`)."""
        for name, param in index.items():
            if is_dtensor(param) and param.requires_grad and (param not in full or is_dtensor(full[param])):
                raise NotImplementedError(
                    f"{name} is a DTensor that FSDP2's fully_shard does not turn into a full tensor for the "
                    "forward (tensor parallel, or FSDP2 on top of it): gradient routing needs each "
                    "micro-batch's full gradient, so it supports FSDP2 alone. Train with FSDP2 "
                    "(fully_shard), DDP (torchrun --nproc_per_node N) or a single process."
                )

    def detach(self) -> None:
        """Remove every hook this router installed."""
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None
        self._targets.clear()
        self._sites.clear()
        self._snapshot = []
        self._labels = None

    def __enter__(self) -> Router:
        if not self.attached:
            self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- per forward -----------------------------------------------------------------------------------------
    def _receive(self, found: dict[str, Any]) -> None:
        labels = found.get(self.label_name)
        if not self.model.training:
            self._labels, self._mode = None, UNLABELLED  # evaluation: labels are dropped, no routing
            # ...unless it is training by mistake (from_pretrained returns a model in eval mode): if an optimizer
            # step follows, _check_hooks_fired raises
            self._eval_labelled += int(labels is not None and torch.is_grad_enabled())
            return
        self._fresh = True
        if labels is None:
            self._labels, self._mode = None, UNLABELLED
            self.counts["unlabelled (no labels passed)"] += 1
            self._forward_modes_add({UNLABELLED})
            return
        labels = torch.as_tensor(labels)
        if self.level == "param":
            values = torch.unique(labels)
            if values.numel() != 1:
                raise ValueError(
                    f"Parameter-level routing got a micro-batch mixing routing labels {values.tolist()}. Use "
                    "TaggedDataset(..., group_by='routing', batch_size=B) with per_device_train_batch_size=1, or "
                    "level='activation' for mixed batches."
                )
            self._mode = int(values)
            self._labels = None
        else:
            self._labels = labels
            self._mode = UNLABELLED
        modes = (
            {int(v) for v in torch.unique(labels).tolist()} if self.level == "activation" else {self._mode}
        )
        for v in modes:
            self.counts[_MODE_NAMES[v]] += 1
        self._forward_modes_add(modes)

    def _forward_modes_add(self, modes: set[int]) -> None:
        """A training forward's modes: they count for this step once its gradient arrives (:meth:`_take_pending`).
        A forward without gradients (``torch.no_grad``) adds nothing to the step: a forget-mode one would otherwise
        turn the next retain-only step into a mixed one, which holds nothing."""
        if torch.is_grad_enabled():
            self._pending |= modes
            self._forward_modes |= modes

    def _take_pending(self) -> None:
        """The first gradient hook of a backward: the pending forwards' gradients are arriving, so their modes
        count for the coming step. If no trainable parameter holds a gradient yet (single process or DDP, where
        ``.grad`` accumulates), the micro-batches recorded before were dropped without an optimizer step (a
        ``GradScaler`` that found inf/NaN skips ``optimizer.step()``; ``zero_grad()`` follows): their modes are
        forgotten, else a forget window dropped before a retain-only step would make it a mixed step that holds
        nothing."""
        if self._step_modes and not self._zero and self._targets:
            plain = all(t.grad_param is t.param for t in self._targets)
            if plain and all(t.param.grad is None for t in self._targets):
                self._step_modes = set()
        if self.level == "param" and len(self._pending) > 1 and not self._warned_mixed_backward:
            # The hooks route by the mode of the last forward: a backward through forwards of several modes
            # routes all of its gradients by that one (never silent: say so, once).
            self._warned_mixed_backward = True
            warnings.warn(
                f"Router(level='param'): training forwards of several routing modes "
                f"({', '.join(sorted(_MODE_NAMES[m] for m in self._pending))}) ran before this backward; its gradients "
                f"are all routed by the last forward's mode ({_MODE_NAMES[self._mode]}). Run one backward per forward "
                "(or a forward whose graph is not backpropagated under torch.no_grad()), or use level='activation', "
                "which routes each example.",
                UserWarning,
                stacklevel=2,
            )
        self._step_modes |= self._pending
        self._pending = set()

    def end_window(self) -> None:
        """Forget the micro-batches seen since the last optimizer step: call it when a loop drops the accumulated
        gradients without stepping the optimizer (:class:`~hfhooks.GradientRoutingCallback` calls it at the end of
        every Trainer step). Needed where :meth:`_take_pending` cannot see the drop: ``zero_grad(set_to_none=False)``,
        FSDP2, DeepSpeed."""
        self._step_modes, self._pending, self._forward_modes = set(), set(), set()
        self._routed = 0

    def _grad_hook(self, target: _Target):
        def route(grad: torch.Tensor) -> torch.Tensor:
            if self._pending:
                self._take_pending()
            if self.level != "param" or self._mode == UNLABELLED:
                return grad
            self._routed += 1
            if self._mode == FORGET:
                if target.dedicated is None:
                    return grad if target.shared_on_forget else torch.zeros_like(grad)
                return target.zero_grad_of(grad, dedicated=False)
            # retain
            return grad if target.dedicated is None else target.zero_grad_of(grad, dedicated=True)

        return route

    def _site_hook(self, site: _Site):
        def pre(module: nn.Module, args: tuple) -> tuple | None:
            if not args or not module.training:
                return None
            x = args[0]
            if self.level == "param":
                if self._mode != RETAIN:
                    return None
                return (x.masked_fill(site.units, 0), *args[1:])
            if self._labels is None:
                return None
            return (self._route_activation(x, site.units), *args[1:])

        return pre

    def _route_activation(self, x: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        labels = self._labels.to(x.device)
        while labels.dim() < x.dim() - 1:  # per-example labels broadcast over positions
            labels = labels.unsqueeze(-1)
        labels = labels[..., None]
        ones = torch.ones((), dtype=x.dtype, device=x.device)
        w_ded = torch.where(
            labels == FORGET,
            self.forget_weights[0],
            torch.where(labels == RETAIN, self.retain_weights[0], ones),
        )
        w_sh = torch.where(
            labels == FORGET,
            self.forget_weights[1],
            torch.where(labels == RETAIN, self.retain_weights[1], ones),
        )
        weight = torch.where(units, w_ded.to(x.dtype), w_sh.to(x.dtype))
        routed = x.detach() + weight * (x - x.detach())  # value x, gradient scaled by weight
        retain_dedicated = (labels == RETAIN) & units  # retain examples never use dedicated units
        return routed.masked_fill(retain_dedicated, 0)

    # -- optimizer steps -------------------------------------------------------------------------------------
    def check_labels_arrived(self) -> None:
        """Raise (after detaching) if no routing label reached the model since attach: routing would do
        nothing. Called before the first optimizer step, so the refused step never changes a weight."""
        # since attach: a resumed run starts from the checkpoint's counters (GradientRoutingCallback restores them),
        # whose forget/retain batches must not vouch for a run whose labels no longer arrive
        counts = self.counts - self._counts_at_attach
        if counts["unlabelled (no labels passed)"] and not (
            counts["forget"] or counts["retain"] or counts["unlabelled"]
        ):
            self.detach()
            raise RuntimeError(
                f"No routing labels reached the model in the first step (batch key {self.label_name!r}). Wrap the "
                "training set in hfhooks.TaggedDataset(dataset, tags=[...]) and pass data_collator=hfhooks.TaggedCollator(); "
                "with a datasets.Dataset the trainer requires as is (TRL's SFTTrainer), keep the column with "
                "remove_unused_columns=False and data_collator=hfhooks.TaggedCollator(<the trainer's collator>, "
                f"columns=[{self.label_name!r}])."
            )

    def _before_step(self, args: tuple = (), kwargs: dict | None = None) -> None:
        if self._zero:
            # DeepSpeed calls the torch optimizer's step once per param group (sub-group): the first call of a
            # step (the first since a training forward) takes the snapshot for all of them.
            if not self._fresh:
                return
            self._fresh = False
        self.steps += 1
        if self.steps == 1:
            self.check_labels_arrived()
        self._check_hooks_fired()
        self._pending = set()  # forwards whose backward never came: no gradient of theirs is in this step
        if not self.strict:
            self._step_modes = set()
            return
        modes, self._step_modes = self._sync_modes(self._step_modes), set()
        self._snapshot = []
        if self.level != "param" or len(modes) != 1 or modes == {UNLABELLED}:
            return
        # Only the values this step must not change, gathered: a retain step keeps the dedicated slices (small);
        # a forget step keeps everything else (about the model's size, held only while the optimizer steps).
        only_forget = modes == {FORGET}
        kept = [
            (t, None if t.dedicated is None else not only_forget)
            for t in self._targets
            if t.dedicated is not None or (only_forget and not t.shared_on_forget)
        ]
        if self._zero:
            self._snapshot_masters(kept)
            return
        self._wrap_step(kept, args, kwargs or {})

    def _snapshot_masters(self, kept: list[tuple[_Target, bool | None]]) -> None:
        """DeepSpeed: hold what this step must not change from this rank's fragments of the fp32 masters the
        optimizer steps (each rank its own: no collective, 1/world of the values). The module's parameters are
        copied from the masters after the step, so restoring the masters (:meth:`_after_step`) restores them."""
        for target, dedicated in kept:
            snap = target.master_snapshot(dedicated)
            if snap is not None:  # None: no fragment on this rank
                self._snapshot.append(snap)

    def _check_hooks_fired(self) -> None:
        """Raise (after detaching), before the optimizer changes anything, if gradients would reach the
        optimizer unrouted: labelled forwards ran in eval mode with gradients enabled, or this step had forget or
        retain micro-batches at the parameter level but none of the gradient hooks fired (autograd computed with
        other tensors than the hooked ones)."""
        fired, self._routed = self._routed, 0
        eval_labelled, self._eval_labelled = self._eval_labelled, 0
        if eval_labelled:
            self.detach()
            raise RuntimeError(
                f"{eval_labelled} forward(s) with routing labels ran with the model in eval mode and gradients "
                "enabled, and an optimizer step followed: routing acts on training forwards only (evaluation "
                "drops the labels), so these gradients would reach the optimizer unrouted. Call model.train() "
                "before training (from_pretrained returns a model in eval mode); evaluate under torch.no_grad()."
            )
        routed = sorted(m for m in self._forward_modes if m in (FORGET, RETAIN))
        self._forward_modes = set()
        if self.level != "param" or fired or not routed or not self._targets:
            return
        self.detach()
        raise RuntimeError(
            f"This optimizer step had {'/'.join(_MODE_NAMES[m] for m in routed)} micro-batches, but none of the "
            "router's gradient hooks fired: autograd computed with other tensors than the parameters the router "
            "hooked at attach, so the gradients would reach the optimizer unrouted. Were the model's parameters "
            "replaced after attach (load_state_dict(assign=True), to_empty(), re-sharding)? Attach the Router (or "
            "create the Trainer with the callback) once the model is final."
        )

    def _wrap_step(self, kept: list[tuple[_Target, bool | None]], args: tuple, kwargs: dict) -> None:
        """Snapshot what this step must not change: part by part, each part stepped alone right away (one
        part's copy held at a time, see :mod:`hfhooks.freeze.stepping`) where that is sound, else all at once
        (restored by the post-hook)."""
        step = raw_step(self._optimizer, args, kwargs) if kept and self._optimizer is not None else None
        if step is None:
            self._snapshot = [t.snapshot(dedicated) for t, dedicated in kept]
            return

        def before(part: list[tuple[_Target, bool | None]]) -> None:
            self._snapshot = [t.snapshot(dedicated) for t, dedicated in part]

        parts = split_by_size(kept, lambda k: local_tensor(k[0].param).nbytes, PART_BYTES)
        self._detached = step_in_parts(
            self._optimizer,
            step,
            [(part, [t.param for t, _ in part]) for part in parts],
            args,
            kwargs,
            before,
            lambda _part: self._restore_snapshot(),
        )

    def _sync_modes(self, modes: set[int]) -> set[int]:
        """The modes seen this step by *any* rank. Under DDP one rank's micro-batches may be forget while
        another's are retain; their gradients are averaged, so every rank must restore the same coordinates
        (the union of modes decides), or the replicas diverge."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return modes
        order = (FORGET, RETAIN, UNLABELLED)
        # the compute device (FSDP2's full parameters): NCCL reduces no CPU tensor, even with CPU offload
        device = self._targets[0].grad_param.device if self._targets else torch.device("cpu")
        flags = torch.tensor([int(m in modes) for m in order], dtype=torch.int32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return {m for m, f in zip(order, flags.tolist()) if f}

    def _after_step(self) -> None:
        if self._zero:
            # after each param group's step (the others' masters are unchanged: writing them back is a no-op);
            # the snapshot is kept for the step's later groups, until the next step or end_step()
            for snap in self._snapshot:
                snap.restore()
            return
        self._restore_snapshot()
        reattach(self._detached)  # the parts stepped alone before the step (see _wrap_step)
        self._detached = {}

    def end_step(self) -> None:
        """DeepSpeed: drop the values held for the step that just ended (memory only: the next step replaces
        them). Call after ``engine.step()``; :class:`~hfhooks.GradientRoutingCallback` does."""
        if self._zero:
            self._snapshot = []

    def _restore_snapshot(self) -> None:
        for snap in self._snapshot:
            snap.restore()
        self._snapshot = []

    def held_bytes(self) -> dict[str, int]:
        """Bytes of tensor storage the router holds: ``masks`` (index vectors / element masks) and
        ``snapshot`` (the values a strict step restores; non-zero only between the step's pre- and post-hook)."""
        held = {
            id(t): t
            for target in self._targets
            for t in (target.dedicated, target.shared, target.local_dedicated, target.local_shared)
            if t is not None
        }
        masks = sum(t.numel() * t.element_size() for t in held.values())
        return {"masks": masks, "snapshot": sum(s.nbytes() for s in self._snapshot)}
