"""Gradient routing's pieces that DeepSpeed ZeRO-3 changes, checked in one process (the trained runs under ZeRO-1/2/3
are in tests/compat/test_deepspeed.py).

ZeRO-3 replaces every parameter's data by an empty placeholder between forwards and keeps the real shape in
``ds_shape``; the callback builds its default dedicated mask at ``on_train_begin``, when the model is partitioned.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from hfhooks import ParamIndex, Router, dedicated_mask


def partitioned_like_zero3(model: torch.nn.Module) -> torch.nn.Module:
    """What ``deepspeed.zero.Init`` leaves on each parameter outside a gather: empty data, the shape in ds_shape."""
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0, dtype=p.dtype)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_default_dedicated_mask_of_a_zero3_model_is_the_full_models(arch):
    full = dedicated_mask(make_model(arch), mlp_units=4, heads=1)
    placeholder = partitioned_like_zero3(make_model(arch))
    mask = dedicated_mask(placeholder, mlp_units=4, heads=1)
    assert sorted(mask) == sorted(full)
    for name in full:
        assert mask.granularity(name) == full.granularity(name), name
        assert torch.equal(mask[name], full[name]), name
    mask.validate(ParamIndex(placeholder))  # fits the model it was built on


def test_param_index_reports_the_real_shape_of_a_zero3_parameter():
    model = partitioned_like_zero3(make_model("llama"))
    index = ParamIndex(model)
    name = "model.layers.0.mlp.down_proj.weight"
    assert index.param(name).shape == (0,)  # the placeholder
    assert index.info(name).shape == index.param(name).ds_shape
    assert index.shapes()[name] == tuple(index.param(name).ds_shape)


class EngineOptimizer:
    """Stands for a DeepSpeed ZeRO optimizer around an optimizer DeepSpeed implements without a torch step."""

    optimizer = None


def zero12_tagged(model: torch.nn.Module) -> torch.nn.Module:
    """What a ZeRO-1/2 engine leaves on every parameter (its link to the fp32 master fragment)."""
    for p in model.parameters():
        p._hp_mapping = None
    return model


def test_strict_routing_under_deepspeed_refuses_an_optimizer_without_a_torch_step():
    model = zero12_tagged(make_model("llama"))
    router = Router(model, dedicated_mask(model, mlp_units=4), strict=True)
    with pytest.raises(ValueError, match=r"found no torch optimizer inside DeepSpeed's EngineOptimizer"):
        router.attach(EngineOptimizer())
    assert router.num_hooks == 0 and not any(m._forward_pre_hooks for m in model.modules())
    assert not any(p._backward_hooks for p in model.parameters())
    # the leaky mode holds nothing around the step: it attaches, without step hooks
    leaky = Router(model, dedicated_mask(model, mlp_units=4), strict=False).attach(EngineOptimizer())
    assert leaky.num_hooks > 0
    leaky.detach()


class Stage3Optimizer:
    """Stands for DeepSpeed's ZeRO-3 optimizer with a partial optimizer offload (offload_optimizer.ratio < 1): a
    torch optimizer inside, and a second one (``backup_optimizer``) that steps the sub-groups kept on the GPU."""

    __module__ = "deepspeed.runtime.zero.stage3"

    def __init__(self, params):
        self.optimizer = torch.optim.AdamW(params)
        self.backup_optimizer = torch.optim.AdamW(params)

    def state_dict(self):
        return {}


def test_strict_routing_refuses_a_partial_zero3_optimizer_offload():
    model = partitioned_like_zero3(make_model("llama"))
    for p in model.parameters():
        p.ds_id = 0  # what zero.Init tags: the router reads the model as ZeRO-3
    router = Router(model, dedicated_mask(model, mlp_units=4), strict=True)
    with pytest.raises(ValueError, match=r"partial optimizer offload .*backup_optimizer"):
        router.attach(Stage3Optimizer([torch.nn.Parameter(torch.zeros(1))]))
    assert router.num_hooks == 0 and not any(p._backward_hooks for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_master_fragment_selection_matches_the_dense_mask(arch):
    """Strict routing under DeepSpeed holds coordinates in this rank's flat fragment of each fp32 master (ZeRO-3:
    an equal padded chunk of every parameter; ZeRO-1/2: any span): the fragment's selection must be the dense
    mask's, for row (Llama), column (GPT-2 Conv1D) and element (Qwen2 biases) entries, padding included."""
    model = make_model(arch)
    mask = dedicated_mask(model, mlp_units=4, heads=1)
    router = Router(model, mask, strict=False).attach()
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for target, (name, param) in zip(router._targets, ParamIndex(model).items(), strict=True):
        dense = mask[name].reshape(-1) if name in mask else torch.zeros(param.numel(), dtype=torch.bool)
        kinds.add(mask.granularity(name) if name in mask else "none")
        for _ in range(3):
            start = int(torch.randint(0, param.numel(), (1,), generator=g))
            n = int(
                torch.randint(1, param.numel() + 8, (1,), generator=g)
            )  # may run past the end (ZeRO-3 padding)
            inside = torch.arange(start, start + n) < param.numel()
            want = torch.zeros(n, dtype=torch.bool)
            want[inside] = dense[start : start + int(inside.sum())]
            if target.dedicated is not None:
                assert torch.equal(target._flat_selection(True, start, n, param.device), want), name
                assert torch.equal(target._flat_selection(False, start, n, param.device), inside & ~want), (
                    name
                )
            assert torch.equal(target._flat_selection(None, start, n, param.device), inside), name
    router.detach()
    assert kinds >= {"row" if arch != "gpt2" else "column", "none"}
    if arch == "qwen2":
        assert "element" in kinds
