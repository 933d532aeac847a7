"""Gradient routing on a model sharded with FSDP2's ``fully_shard``, in one process (a single-rank gloo group).

The two-rank run — row masks sliced onto each rank's shard, ranks with different modes in one step, the result
against one process on the full model — is in the FSDP2 launch (tests/compat/test_fsdp2.py). Here: the gradient
hooks really act on a sharded model (not only the strict restore), also in bf16 compute and after a forward
that left the root's parameters unsharded, the hooks go away, and DTensors that FSDP2 does not manage (tensor
parallel) are refused instead of silently left unrouted.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, random_input_ids
from torch import nn

from hfhooks import FORGET, RETAIN, ParamIndex, Router, dedicated_mask, installed_hooks
from hfhooks.core.params import fsdp2_unsharded_params

pytestmark = pytest.mark.usefixtures("gloo_group")


def _shard(model: nn.Module, mixed_precision: bool = False) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 compute: the full parameters FSDP2 computes with (where the gradient hooks go) are bf16, the shards
    # the optimizer steps fp32, gradients reduced in fp32 (an LLM run's usual policy)
    policy = (
        MixedPrecisionPolicy(torch.bfloat16, torch.float32) if mixed_precision else MixedPrecisionPolicy()
    )
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in ParamIndex(model).items()}


def _step(model, opt, ids, label):
    routing = torch.full((ids.shape[0],), label)
    model(input_ids=ids, labels=ids, routing=routing).loss.backward()
    model(input_ids=ids.flip(0), labels=ids.flip(0), routing=routing).loss.backward()  # two micro-batches
    grads = {n: p.grad.full_tensor().clone() for n, p in ParamIndex(model).items()}
    opt.step()
    opt.zero_grad()
    return grads


@pytest.mark.parametrize("mixed_precision", [False, True], ids=["fp32", "bf16-compute"])
def test_forget_gradients_reach_only_dedicated_coordinates_of_a_sharded_model(mixed_precision):
    model = make_model("llama").train()  # routing acts on training forwards only
    mask = dedicated_mask(model, mlp_units=4, heads=1)
    model = _shard(model, mixed_precision)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = random_input_ids(2, 6)
    with (
        torch.no_grad()
    ):  # a forward outside training: fully_shard leaves the root's group unsharded after it,
        model(input_ids=ids)  # so the module attributes hold full copies the optimizer never steps
    with Router(model, mask, optimizer=opt) as router:
        assert router.num_hooks > 0
        retain_grads = _step(model, opt, ids, RETAIN)  # every shared coordinate gets Adam momentum
        before = _full(model)
        forget_grads = _step(model, opt, ids, FORGET)
        after = _full(model)
    for n, grad in forget_grads.items():
        ded = mask[n] if n in mask else torch.zeros_like(grad, dtype=torch.bool)
        # the hooks masked the gradient itself (the strict restore alone would leave it whole)
        assert not grad[~ded].any(), f"{n}: forget gradient reached shared coordinates"
        assert not retain_grads[n][ded].any(), f"{n}: retain gradient reached dedicated coordinates"
        assert torch.equal(after[n][~ded], before[n][~ded]), f"{n}: a forget step moved shared coordinates"
    assert sum(int((after[n] != before[n]).sum()) for n in after) > 0, "the forget step trained nothing"
    assert installed_hooks(model) == []
    assert not any(p._backward_hooks for p in fsdp2_unsharded_params(model).values())


def test_dtensors_that_fsdp2_does_not_manage_are_refused():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    model = make_model("llama")
    mask = dedicated_mask(model, mlp_units=4, heads=1)
    mesh = init_device_mesh("cpu", (1,))
    proj = model.model.layers[0].mlp.up_proj
    proj.weight = nn.Parameter(distribute_tensor(proj.weight.detach(), mesh, [Replicate()]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(NotImplementedError, match=r"up_proj\.weight is a DTensor .* supports FSDP2 alone"):
        Router(model, mask, optimizer=opt).attach()
    assert installed_hooks(model) == []


def test_gradient_hooks_that_never_fire_raise_before_the_step():
    """The FSDP2 routing hooks sit on the full parameters FSDP2 reuses across all-gathers; if autograd ever
    computed with other tensors (a torch that re-creates them, parameters replaced after attach), forget and
    retain gradients would reach the optimizer unrouted. The step pre-hook notices and raises instead."""
    model = make_model("llama").train()
    mask = dedicated_mask(model, mlp_units=4, heads=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    router = Router(model, mask, optimizer=opt).attach()
    # new Parameter objects: the hooked ones no longer take part in the forward
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    ids = random_input_ids(2, 6)
    model(input_ids=ids, labels=ids, routing=torch.full((2,), FORGET)).loss.backward()
    with pytest.raises(
        RuntimeError, match="forget micro-batches, but none of the router's gradient hooks fired"
    ):
        opt.step()
    assert not router.attached and installed_hooks(model) == []


def test_a_step_after_labelled_forwards_in_eval_mode_raises():
    """from_pretrained returns a model in eval mode, where the router drops routing labels (evaluation): a
    plain training loop that forgot model.train() used to step unrouted gradients without a word."""
    model = make_model("llama")  # eval mode
    mask = dedicated_mask(model, mlp_units=4, heads=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = random_input_ids(2, 6)
    with Router(model, mask, optimizer=opt):
        with torch.no_grad():  # evaluation proper: labels dropped, nothing to complain about
            model(input_ids=ids, routing=torch.full((2,), FORGET))
        model(input_ids=ids, labels=ids, routing=torch.full((2,), FORGET)).loss.backward()
        with pytest.raises(RuntimeError, match=r"eval mode .* Call model\.train\(\)"):
            opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), (
        "the refused step moved weights"
    )
    assert installed_hooks(model) == []
