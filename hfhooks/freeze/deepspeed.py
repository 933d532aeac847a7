"""DeepSpeed ZeRO-1/2/3: where a parameter's values live, for the hard freeze.

Under ZeRO a parameter's value lives in three places, and a frozen coordinate must hold in all of them:

* the module's own parameter (ZeRO-1/2: a full replica on every rank; ZeRO-3: one partition per rank, gathered
  for forward / backward);
* the fp32 master weights the optimizer steps (partitioned across ranks in every stage);
* the optimizer state of the masters (``exp_avg``, ``exp_avg_sq``…), partitioned like them.

DeepSpeed steps the optimizer inside ``backward`` (``engine.step()``, called by accelerate's ``backward`` at the
end of each accumulation window), so a torch optimizer step hook never sees it; and the masters are not the
module's parameters, so writing the module's parameters alone is undone by the next step, and writing the
masters alone leaves the module's parameters stepped until the next step overwrites them. Gradient tensor hooks
(``p.register_hook``) fire during ``backward`` in all three stages — under ZeRO-3 with the full gradient — so
masking gradients works as without DeepSpeed; weight decay then still moves the frozen coordinates, which are
written back after each step, in the masters and in the module.

Values are read and written through DeepSpeed's public accessors (``deepspeed.utils.safe_get/set_full_fp32_param``
and ``safe_get/set_full_optimizer_state``, ``deepspeed.zero.GatheredParameters``); two private names are touched,
each where it is needed and said why: the tags DeepSpeed puts on parameters (``ds_id``, ``_hp_mapping``) to tell
the stage, and the re-link of the optimizer state in :func:`optimizer_state_keys`. ``deepspeed`` is imported only
when a model is found to be managed by it. Verified with deepspeed 0.19.8.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "finish_outside_backward",
    "full_master",
    "full_optimizer_state",
    "full_shape",
    "gathered",
    "is_zero3",
    "local_master",
    "optimizer_state_keys",
    "require_zero",
    "set_full_master",
    "set_full_optimizer_state",
    "set_local_master",
    "torch_optimizer",
    "zero_optimizer",
    "zero_stage",
]


def zero_stage(model: nn.Module | None) -> int | None:
    """``3`` if ``model``'s parameters are partitioned by DeepSpeed ZeRO-3, ``2`` if they are managed by a
    ZeRO-1/2 (or bf16) DeepSpeed optimizer (its fp32 masters linked to them), else ``None``.

    Read from the parameters themselves (DeepSpeed tags them), so it holds for a model trained by a ``Trainer``
    or by a hand-written loop over ``deepspeed.initialize``; ZeRO-1 and ZeRO-2 are served alike (``2``).
    """
    if model is None:
        return None
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            return 3
        if hasattr(p, "_hp_mapping"):  # set on every parameter (None where this rank holds no fragment)
            return 2
    return None


def require_zero(model: nn.Module | None, what: str) -> int:
    """The ZeRO stage of ``model`` (see :func:`zero_stage`) when DeepSpeed is selected; ``RuntimeError`` if its
    parameters carry no ZeRO bookkeeping (ZeRO stage 0, or an fp16 / plain engine), where the optimizer steps
    master copies hfhooks cannot reach or is not what the Trainer's hooks see."""
    stage = zero_stage(model)
    if stage is None:
        raise RuntimeError(
            f"{what} does not support DeepSpeed without ZeRO-1/2/3: the model's parameters carry no ZeRO "
            "partitioning (zero_optimization.stage 0, or the engine is not built yet), so the weights the "
            "optimizer steps cannot be reached to hold frozen coordinates. Set zero_optimization.stage to 1, 2 "
            "or 3, or train with DDP (torchrun --nproc_per_node N your_script.py)."
        )
    return stage


def is_zero3(param: torch.Tensor) -> bool:
    """True for a parameter partitioned by ZeRO-3 (its ``.data`` is an empty placeholder outside a gather)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's real shape (ZeRO-3 keeps it in ``ds_shape``; ``param.shape`` is empty there)."""
    return param.ds_shape if is_zero3(param) else param.shape


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Within the block, ZeRO-3 parameters hold their full values (a collective: every rank must enter);
    ``modify=True`` keeps what the block writes (rank 0's values, broadcast and re-partitioned on exit).
    Parameters not partitioned by ZeRO-3 pass through untouched."""
    params = [p for p in params if is_zero3(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def full_master(param: nn.Parameter) -> torch.Tensor | None:
    """The full fp32 master weight of ``param`` (a collective: every rank must call it), shaped like the
    parameter; ``None`` for a parameter the optimizer does not hold."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    return None if value is None else value.reshape(full_shape(param))


def set_full_master(param: nn.Parameter, value: torch.Tensor) -> None:
    """Write this rank's partition of ``param``'s fp32 master weight from the full ``value`` (local)."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value)


def local_master(param: nn.Parameter) -> tuple[torch.Tensor, int] | None:
    """This rank's fragment of ``param``'s fp32 master weight, flat, and where it starts in the flattened
    parameter; ``None`` where this rank holds none (ZeRO-1/2) or the optimizer does not hold the parameter.
    Local (no collective). Write changes back with :func:`set_local_master`.

    ZeRO-3 partitions every parameter across the ranks in equal padded chunks of ``param.ds_tensor.ds_numel``
    (``deepspeed.utils.safe_get_local_fp32_param``); ZeRO-1/2 partition the flat buffer of a param group, so a
    parameter lies on one rank or a few, where DeepSpeed links its fragment (the private ``_hp_mapping``, as in
    :func:`zero_stage`: ZeRO-1/2 have no public per-rank accessor).
    """
    if is_zero3(param):
        from deepspeed.utils import safe_get_local_fp32_param

        fragment = safe_get_local_fp32_param(param)
        if fragment is None:
            return None
        rank = torch.distributed.get_rank(group=param.ds_process_group)
        return fragment.view(-1), rank * param.ds_tensor.ds_numel
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    return mapping.hp_fragment.view(-1), mapping.lp_fragment_address.start


def set_local_master(param: nn.Parameter, fragment: torch.Tensor) -> None:
    """Write this rank's fragment of ``param``'s fp32 master weight from ``fragment`` (as returned by
    :func:`local_master`, then changed). ZeRO-3 may hand out a copy (an optimizer offloaded to another device):
    it is copied back; ZeRO-1/2's fragment is the master itself, written in place already."""
    if is_zero3(param):
        from deepspeed.utils import safe_set_local_fp32_param

        safe_set_local_fp32_param(param, fragment)


def _chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and what it wraps (accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> torch optimizer)."""
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def finish_outside_backward(optimizer: Any) -> None:
    """After a backward run through a ZeRO-3 module outside ``engine.backward`` (SalUn's scoring pass, whose
    gradient hooks hand the engine zeros): do what the engine's backward epilogue does, then drop the gradients.

    Reduces the engine's pending gradient bucket (else its parameters are in it twice at the next backward:
    ``AssertionError`` in ``__reduce_and_partition_ipg_grads``), releases the parameters gathered for modules whose
    post-backward hook never fired (the embedding: else "Cannot free a ZeRO-3 parameter while it is still
    active" at the next re-partition), and ``zero_grad()`` resets the micro-step so that the first training
    micro-batch overwrites the gradient partitions instead of adding to them. The two epilogue calls are the
    ZeRO-3 optimizer's own public methods (deepspeed 0.19.8); nothing happens for other stages."""
    for o in _chain(optimizer):
        offload = getattr(o, "parameter_offload", None)
        if offload is not None and hasattr(o, "overlapping_partition_gradients_reduce_epilogue"):
            o.overlapping_partition_gradients_reduce_epilogue()
            offload.release_backward_leftovers()
            o.zero_grad(set_to_none=True)
            return


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer that steps inside ``optimizer`` (accelerate's wrapper, DeepSpeed's ZeRO optimizer)."""
    torch_opts = [o for o in _chain(optimizer) if isinstance(o, torch.optim.Optimizer)]
    return torch_opts[-1] if torch_opts else None


def zero_optimizer(optimizer: Any) -> Any | None:
    """DeepSpeed's ZeRO optimizer inside ``optimizer`` (accelerate's wrapper, or itself): the one whose
    ``state_dict()`` DeepSpeed writes into its checkpoint shards; ``None`` if there is none."""
    for opt in _chain(optimizer):
        if type(opt).__module__.startswith("deepspeed.") and callable(getattr(opt, "state_dict", None)):
            return opt
    return None


def optimizer_state_keys(optimizer: Any) -> list[str]:
    """The per-coordinate state keys (``exp_avg``…) of the torch optimizer inside a DeepSpeed ZeRO optimizer
    (``optimizer`` may be accelerate's wrapper, DeepSpeed's ZeRO optimizer or the torch optimizer).

    ZeRO-1/2 link each parameter to its slice of the optimizer state after the first step, but only for the
    param groups whose state exists by then — with two groups (the Trainer's decay / no-decay split) the second
    one is left unlinked, and ``safe_get_full_optimizer_state`` raises for its parameters. The link is
    therefore redone here, once the state exists (DeepSpeed's own ``_lazy_init_hp_params_optimizer_state``).
    """
    chain = _chain(optimizer)
    for opt in chain:
        if getattr(opt, "_hp_optimizer_states_linked", None) is not None and any(
            getattr(o, "state", None) for o in chain
        ):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
    opt = torch_optimizer(optimizer)
    keys: set[str] = set()
    for state in (opt.state if opt is not None else {}).values():
        keys.update(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return sorted(keys)


def full_optimizer_state(param: nn.Parameter, key: str) -> torch.Tensor | None:
    """The full optimizer state ``key`` of ``param``'s master (a collective), shaped like the parameter."""
    from deepspeed.utils import safe_get_full_optimizer_state

    value = safe_get_full_optimizer_state(param, key)
    return None if value is None else value.reshape(full_shape(param))


def set_full_optimizer_state(param: nn.Parameter, value: torch.Tensor, key: str) -> None:
    """Write this rank's partition of ``param``'s optimizer state ``key`` from the full ``value`` (local)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    safe_set_full_optimizer_state(param, value, key)
