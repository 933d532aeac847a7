"""Which gradient hook ``GradientMask`` installs, and that both forms train identically.

In one process without DeepSpeed the accumulated ``.grad`` is masked in place by a post-accumulate-grad hook (no
new tensor per backward); in a process group a tensor hook masks each micro-batch's gradient before accumulation
(DDP's reducer reads ``.grad`` right after accumulation). Both must give the same bits: accumulation, clipping,
weight decay and a non-finite gradient on a frozen coordinate included.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, make_model, random_input_ids

from hfhooks import GradientMask, ParamIndex, ParamMask
from hfhooks.core.hooks import installed_hooks


def _mask(model: torch.nn.Module) -> ParamMask:
    g = torch.Generator().manual_seed(3)
    return ParamMask.from_scores(
        {n: torch.rand(p.shape, generator=g) for n, p in ParamIndex(model).items()}, 0.5
    )


def _train(model: torch.nn.Module, mask: ParamMask, poison: bool) -> dict[str, torch.Tensor]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with GradientMask(model, mask).attach(opt):
        for step in range(3):
            for micro in range(2):  # gradient accumulation
                ids = random_input_ids(seed=10 * step + micro)
                loss = model(input_ids=ids, labels=ids).loss / 2
                if poison and step == 1 and micro == 1:
                    # an inf gradient on every coordinate of one weight, frozen coordinates included; the
                    # clipping norm is then inf and turns the trainable coordinates NaN (warned)
                    w = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
                    loss = loss + (w * 1e38).sum() * 1e38
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_process_masks_accumulated_gradients_in_place():
    model = make_model("llama")
    with GradientMask(model, _mask(model)).attach():
        kinds = {r.kind for r in installed_hooks(model) if r.owner == "GradientMask"}
    assert "post_accumulate_grad" in kinds and "tensor" not in kinds


def test_a_process_group_keeps_the_tensor_hook(gloo_group):
    model = make_model("llama")
    with GradientMask(model, _mask(model)).attach():
        kinds = {r.kind for r in installed_hooks(model) if r.owner == "GradientMask"}
    assert "tensor" in kinds and "post_accumulate_grad" not in kinds


@pytest.mark.parametrize("poison", [False, True])
@pytest.mark.filterwarnings("ignore:GradientMask.*turned NaN or inf")
def test_both_forms_give_the_same_bits(poison):
    model = make_model("llama")
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    in_place = _train(copy.deepcopy(model), mask, poison)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        tensor_hook = _train(copy.deepcopy(model), mask, poison)
    finally:
        dist.destroy_process_group()
    checked = 0
    for n, p in in_place.items():
        assert torch.equal(p.view(torch.int32), tensor_hook[n].view(torch.int32)), n
        if n in mask:
            frozen = ~mask[n]
            assert torch.equal(p[frozen].view(torch.int32), before[n][frozen].view(torch.int32)), n
            checked += 1
    assert checked == len(in_place)  # every parameter is masked, and its frozen coordinates kept their bits
    moved = sum(not torch.equal(p, before[n]) for n, p in in_place.items())
    assert moved == len(in_place)  # and every parameter trained
