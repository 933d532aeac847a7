"""Gradient-based saliency scores over a dataloader, keyed by canonical parameter names.

Scores (accumulated over batches; ``g_b`` is batch ``b``'s gradient at the current weights θ):

* ``grad_abs_sum`` — ``|Σ_b g_b|`` (SalUn's weight saliency: sum signed gradients, take abs at the end);
* ``grad_sum_abs`` — ``Σ_b |g_b|``;
* ``fisher`` — ``Σ_b g_b²`` (empirical Fisher at batch granularity);
* ``grad_x_weight`` — ``|θ ⊙ Σ_b g_b|`` (SNIP-like connection sensitivity);
* ``act_x_grad`` — neuron scores on module activations: ``|a_j · ∂L/∂a_j|``, max over positions, mean over
  examples; by default on the input of every MLP down-projection (the MLP hidden units).

The model is scored in eval mode (dropout off, as SalUn does) and left exactly as found: training mode of
every module, weights, ``.grad`` and ``requires_grad``. Gradients are folded into one fp32 buffer per
parameter by a post-accumulate-grad hook and freed immediately, so memory is one fp32 score per scored
parameter plus the transient gradient of one tensor at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from hfhooks.core.blocks import find_layers
from hfhooks.core.data import to_device
from hfhooks.core.hooks import HookSet
from hfhooks.core.layers import mlp_projections
from hfhooks.core.params import ParamIndex, is_dtensor, local_tensor

__all__ = ["SCORES", "Scores", "compute_saliency", "model_state_preserved", "shard_slices"]

SCORES = ("grad_abs_sum", "grad_sum_abs", "fisher", "grad_x_weight", "act_x_grad")

LossFn = Callable[[nn.Module, Any], torch.Tensor]

_FOLD_SLICE = 1 << 18  # gradient elements folded at a time when they need an upcast (≤ 1 MB transient)


class Scores(dict):
    """``{canonical name: fp32 score tensor}`` with a ``metadata`` dict (score kind, batches, examples)."""

    def __init__(self, *args: Any, metadata: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.metadata: dict[str, Any] = dict(metadata or {})


@contextlib.contextmanager
def model_state_preserved(model: nn.Module, params: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Restore every module's training flag, and ``.grad`` / ``requires_grad`` of ``params``, on exit.

    On entry the gradients of ``params`` are set aside (``.grad = None``) so that work inside the block
    starts from clean gradients; they are put back on exit, even if the block raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(params)
    saved = [(p, p.requires_grad, p.grad) for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


def shard_slices(model: nn.Module, scores: Mapping[str, torch.Tensor], group: Any = None) -> Scores:
    """``scores`` of ``model``'s parameters as each rank's contiguous slice of the flat full scores, in rank
    order — the input of :meth:`~hfhooks.ParamMask.from_sharded_scores` (a collective-free check).

    A ``Shard(0)`` DTensor's local shard (FSDP2 ``fully_shard``) is such a slice as it is; a parameter every rank
    holds in full is counted once, by rank 0 of ``group``. Other layouts (HSDP's 2-D mesh, tensor parallel
    ``Shard(1)``) are refused: their local shards are not contiguous slices of the flat tensor.
    """
    from torch.distributed.tensor import Shard

    index = ParamIndex(model)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    out = Scores(metadata=getattr(scores, "metadata", {}))
    for name, s in scores.items():
        p = index.param(name)
        if not is_dtensor(p):
            out[name] = s.reshape(-1) if rank == 0 else s.new_empty(0)
            continue
        if tuple(p.placements) != (Shard(0),) or p.device_mesh.size() != world:
            raise RuntimeError(
                f"Cannot select a global top-k over {name!r}: it is sharded as {tuple(p.placements)} over a mesh "
                f"of {p.device_mesh.size()} of {world} ranks, not Shard(0) over all of them (FSDP2 fully_shard "
                "on a 1-D mesh). Compute the mask without this sharding and pass it as mask=..."
            )
        out[name] = s.reshape(-1)
    return out


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    out = (
        model(**batch)
        if isinstance(batch, Mapping)
        else model(*batch)
        if isinstance(batch, (list, tuple))
        else model(batch)
    )
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "The model returned no loss for this batch. Include labels in the batch (HF models compute the loss "
            "from `labels`) or pass loss_fn=lambda model, batch: ... returning a scalar."
        )
    return loss


def _select_params(index: ParamIndex, params: str | Iterable[str]) -> dict[str, nn.Parameter]:
    if params == "trainable":
        chosen = {n: p for n, p in index.items() if p.requires_grad}
        if not chosen:
            raise ValueError(
                "The model has no trainable parameters; pass params='all' to score frozen weights."
            )
        return chosen
    if params == "all":
        return dict(index.items())
    if params == "base":  # frozen base weights of a PeftModel (LoRA adapters excluded)
        return {n: p for n, p in index.items() if ".lora_" not in n}
    return {n: index.param(n) for n in index.select(params)}


def compute_saliency(
    model: nn.Module,
    dataloader: Iterable[Any],
    score: str = "grad_abs_sum",
    loss_fn: LossFn | None = None,
    params: str | Iterable[str] = "trainable",
    modules: Iterable[str] | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    after_backward: Callable[[], None] | None = None,
) -> Scores:
    """Score parameters (or neurons) of ``model`` by gradients of a loss over ``dataloader``.

    Args:
        model: any ``nn.Module``, including PEFT / DDP / compiled wrappers (keys are canonical names).
        dataloader: an iterable of batches (dicts for HF models). Batches are moved to the model's device.
        score: one of :data:`SCORES`.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: ``model(**batch).loss``. The sign does not
            matter for the absolute-value scores (SalUn uses −CE on the forget set).
        params: ``"trainable"`` (default; on a PeftModel the LoRA parameters), ``"all"`` (frozen weights
            too — on a PeftModel, base weights), ``"base"`` (all but LoRA adapters), or patterns for
            :meth:`ParamIndex.select`.
        modules: for ``act_x_grad``: canonical module names whose *input* activations are scored; default:
            every MLP down-projection (so score ``j`` is MLP hidden unit ``j``).
        max_batches: stop after this many batches.
        progress: show a tqdm bar.
        after_backward: called after each batch's backward (e.g. DeepSpeed ZeRO-3's backward epilogue, see
            :func:`hfhooks.freeze.deepspeed.finish_outside_backward`).

    Returns:
        :class:`Scores` — fp32 tensors on the parameters' devices; for ``act_x_grad`` keys are module names
        and values have one entry per unit. Under FSDP2 (parameters sharded as DTensors) each rank scores the
        batches it is given and holds the scores of its local shards only (the gradients are the reduce-scattered
        ones: averaged over ranks); select a mask from them with :func:`shard_slices` and
        :meth:`~hfhooks.ParamMask.from_sharded_scores`.
    """
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not one of {SCORES}.")
    with _outside_zero12(model):
        return _compute(
            model, dataloader, score, loss_fn, params, modules, max_batches, progress, after_backward
        )


@contextlib.contextmanager
def _outside_zero12(model: nn.Module) -> Iterator[None]:
    """DeepSpeed ZeRO-1/2: within the block the module holds plain parameters sharing the storage of its own.

    The engine's gradient hooks sit on the module's parameters and reduce every gradient they see into its
    partitioned buffers, marking it reduced until its next step; a scoring backward through them would leave
    that state behind (ZeRO-2 then refuses the first training backward: "already been reduced"). Parameters
    sharing the storage (every rank holds them in full under ZeRO-1/2) see the same forward and get their
    own gradients, and the engine sees nothing. ZeRO-3 partitions the storage itself; see :func:`_zero3_slice`.
    """
    swapped, shadows = [], {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and hasattr(p, "_hp_mapping"):  # DeepSpeed's tag on ZeRO-1/2 parameters
                if id(p) not in shadows:  # tied weights stay tied
                    shadows[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                module._parameters[key] = shadows[id(p)]
                swapped.append((module, key, p))
    try:
        yield
    finally:
        for module, key, p in swapped:
            module._parameters[key] = p


def _compute(
    model, dataloader, score, loss_fn, params, modules, max_batches, progress, after_backward
) -> Scores:
    index = ParamIndex(model)
    targets = _select_params(index, params) if score != "act_x_grad" else {}
    loss_fn = loss_fn or _default_loss
    device = next(model.parameters()).device
    all_params = [p for _, p in index.items()]
    with model_state_preserved(model, all_params):
        model.eval()
        for p in all_params:  # only scored parameters need gradients; the rest are skipped by autograd
            p.requires_grad_(any(p is t for t in targets.values()) if score != "act_x_grad" else False)
        if score == "act_x_grad":
            scores, n_batches, n_examples = _neuron_scores(
                model, index, dataloader, loss_fn, modules, device, max_batches, progress, after_backward
            )
        else:
            scores, n_batches, n_examples = _param_scores(
                model, targets, dataloader, score, loss_fn, device, max_batches, progress, after_backward
            )
    if n_batches == 0:
        raise ValueError("The dataloader yielded no batches: nothing to score.")
    return Scores(scores, metadata={"score": score, "batches": n_batches, "examples": n_examples})


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        batch = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(batch, (list, tuple)):
        batch = batch[0] if batch else None
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() else 1


def _batches(dataloader: Iterable[Any], max_batches: int | None, progress: bool, desc: str) -> Iterator[Any]:
    total = None
    with contextlib.suppress(TypeError):
        total = len(dataloader)  # type: ignore[arg-type]
    if max_batches is not None:
        total = min(total, max_batches) if total is not None else max_batches
    for i, batch in enumerate(tqdm(dataloader, total=total, desc=desc, disable=not progress, leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        yield batch


class _ScoringPass:
    """The owner of one scoring pass's hooks (:class:`HookSet` keeps a weak reference to its owner)."""


def _backward_passes(
    model, dataloader, loss_fn, device, max_batches, progress, desc: str, what: str, after=None
):
    """One forward + backward per batch (the installed hooks collect the scores); ``(batches, examples)``."""
    n_batches = n_examples = 0
    for batch in _batches(dataloader, max_batches, progress, desc):
        batch = to_device(batch, device)
        loss = loss_fn(model, batch)
        if not loss.requires_grad:
            raise ValueError(f"The loss does not depend on {what} (no grad_fn).")
        loss.backward()
        if after is not None:
            after()
        n_batches += 1
        n_examples += _batch_size(batch)
    return n_batches, n_examples


def _zero3_slice(p: torch.Tensor) -> tuple[int, int] | None:
    """DeepSpeed ZeRO-3: ``(start, length)`` of this rank's partition in ``p``'s flat elements (rank ``r``
    holds ``[r * n, (r + 1) * n)`` of them, the last one padded); ``None`` for any other parameter."""
    part = getattr(p, "ds_tensor", None)
    if part is None:
        return None
    start = dist.get_rank(group=getattr(p, "ds_process_group", None)) * part.ds_numel
    return start, max(0, min(part.ds_numel, p.ds_numel - start))


def _fold(buf: torch.Tensor, g: torch.Tensor, score: str) -> None:
    """Fold gradient ``g`` into the fp32 score buffer ``buf`` (same number of elements), in place."""
    # A bf16/fp16 gradient folded into the fp32 buffer is upcast by a temporary fp32 copy on CPU
    # (TensorIterator promotes CPU inputs by copying them; seen in torch's memory profiler): 2x the gradient's
    # bytes, 131 MB for a 32.8M-element embedding. Slices bound that temporary to _FOLD_SLICE elements.
    step = max(1, g.numel()) if g.dtype == buf.dtype else _FOLD_SLICE
    flat_b, flat_g = buf.view(-1), g.reshape(-1)
    for start in range(0, flat_g.numel(), step):
        b, s = flat_b[start : start + step], flat_g[start : start + step]
        if score in ("grad_abs_sum", "grad_x_weight"):
            b.add_(s)
        elif score == "grad_sum_abs":
            b.add_(s.abs())
        else:  # fisher
            b.addcmul_(s, s)


def _install_folds(hooks: HookSet, targets, buffers, slices, score: str) -> None:
    """One fold per scored parameter, where its gradient can be read."""
    for n, p in targets.items():
        buf = buffers[n]
        if slices[n] is not None:
            # DeepSpeed ZeRO-3: its own hooks reduce the gradient into the engine's partitioned buffers after
            # accumulation. Fold this rank's partition of the full gradient before that (a tensor hook) and
            # hand the engine zeros, so that its gradient buffers hold nothing of the scoring pass.
            def take(grad: torch.Tensor, buf=buf, where=slices[n]) -> torch.Tensor:
                _fold(buf, grad.reshape(-1)[where[0] : where[0] + where[1]], score)
                return torch.zeros_like(grad)

            hooks.tensor_hook(p, take, n)
            continue

        def fold(p: torch.Tensor, buf=buf) -> None:
            _fold(buf, local_tensor(p.grad), score)
            p.grad = None  # free it now: peak memory stays at one score buffer per parameter

        hooks.post_accumulate_grad_hook(p, fold, n)


def _param_scores(model, targets, dataloader, score, loss_fn, device, max_batches, progress, after=None):
    # FSDP2: one buffer per local shard (the hook fires on the sharded parameter after the reduce-scatter);
    # ZeRO-3: one per local partition
    slices = {n: _zero3_slice(p) for n, p in targets.items()}
    if after is None and any(w is not None for w in slices.values()):
        raise ValueError(
            "compute_saliency on a DeepSpeed ZeRO-3 model needs after_backward=lambda: "
            "hfhooks.freeze.deepspeed.finish_outside_backward(optimizer) (the engine's optimizer): its backward "
            "runs outside engine.backward, and without the engine's epilogue after each batch the engine's "
            "gradient state is left half-reduced for the next training step."
        )
    buffers = {
        n: torch.zeros(
            slices[n][1] if slices[n] else local_tensor(p).shape, dtype=torch.float32, device=p.device
        )
        for n, p in targets.items()
    }
    with HookSet(_ScoringPass(), model, name="compute_saliency") as hooks:
        _install_folds(hooks, targets, buffers, slices, score)
        n_batches, n_examples = _backward_passes(
            model,
            dataloader,
            loss_fn,
            device,
            max_batches,
            progress,
            f"saliency ({score})",
            "any scored parameter",
            after,
        )
    for n, buf in buffers.items():
        if score == "grad_abs_sum":
            buf.abs_()
        elif score == "grad_x_weight":
            weight = targets[n].ds_tensor[: buf.numel()] if slices[n] else local_tensor(targets[n].detach())
            buf.mul_(weight.float()).abs_()
    return buffers, n_batches, n_examples


def _default_neuron_modules(index: ParamIndex) -> list[str]:
    return [path for i in range(len(find_layers(index.model))) for path in mlp_projections(index, i)[1]]


def _neuron_scores(model, index, dataloader, loss_fn, modules, device, max_batches, progress, after=None):
    module_names = list(modules) if modules is not None else _default_neuron_modules(index)
    by_name = {}
    for name in module_names:
        info = index.info(f"{name}.weight")
        by_name[name] = info.module
    sums: dict[str, torch.Tensor] = {}
    hooks = HookSet(_ScoringPass(), model, name="compute_saliency")

    def make_pre_hook(name: str):
        def capture(module: nn.Module, args: tuple) -> tuple:
            act = args[0]
            if not act.requires_grad:
                # Only the first scored site sees no graph (parameters do not require grad while scoring
                # neurons); making it a leaf lets every later activation depend on it. Detaching later sites
                # too would cut the paths through later layers and give partial dL/da.
                act = act.detach().requires_grad_(True)

            def on_grad(grad: torch.Tensor) -> None:
                contrib = (act.detach() * grad).abs().float()
                per_example = contrib.reshape(contrib.shape[0], -1, contrib.shape[-1]).amax(dim=1)
                total = per_example.sum(0)
                sums[name] = sums[name] + total if name in sums else total

            hooks.tensor_hook(act, on_grad, name)
            return (act, *args[1:])

        return capture

    with hooks:
        for name, module in by_name.items():
            hooks.forward_pre_hook(module, make_pre_hook(name), name)
        n_batches, n_examples = _backward_passes(
            model,
            dataloader,
            loss_fn,
            device,
            max_batches,
            progress,
            "saliency (act_x_grad)",
            "the scored activations",
            after,
        )
    missing = [n for n in module_names if n not in sums]
    if missing and n_batches:
        raise ValueError(f"Modules {missing[:3]} never ran in the forward pass; they cannot be scored.")
    return {n: sums[n] / max(n_examples, 1) for n in module_names if n in sums}, n_batches, n_examples
