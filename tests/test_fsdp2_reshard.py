"""A forward outside training leaves FSDP2's root parameter group unsharded (``fully_shard`` does not reshard the
root after forward): the root module's attributes then hold full copies that the optimizer never steps and
whose storage FSDP2 frees. Mechanisms attached after such a forward must act on the sharded parameters
(:func:`hfhooks.core.params.fsdp2_reshard`). Single-process gloo group; the two-rank runs are in
tests/compat/test_fsdp2.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, random_input_ids

from hfhooks import GradientMask, ParamIndex, ParamMask, installed_hooks
from hfhooks.core.params import fsdp2_reshard, is_dtensor

pytestmark = pytest.mark.usefixtures("gloo_group")


def test_gradient_mask_holds_frozen_coordinates_after_a_forward_left_the_root_unsharded():
    from torch.distributed.fsdp import fully_shard

    model = make_model("llama").train()
    g = torch.Generator().manual_seed(1)
    mask = ParamMask.from_scores(
        {n: torch.rand(p.shape, generator=g) for n, p in ParamIndex(model).items()}, 0.4
    )
    initial = {n: p.detach().clone() for n, p in ParamIndex(model).items()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ids = random_input_ids(2, 6)
    with torch.no_grad():
        model(input_ids=ids)
    full_copies = [n for n, p in ParamIndex(model).items() if not is_dtensor(p)]
    assert "lm_head.weight" in full_copies, "precondition: the root's group stayed unsharded"
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)
    # before the fix: the hard freeze held (and its NaN monitor read) the root's full copies, whose storage
    # FSDP2 had freed: a segmentation fault at the first step's post-hook
    with GradientMask(model, mask).attach(opt):
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    moved = changed = 0
    for n, p in ParamIndex(model).items():
        now, keep = p.full_tensor().detach(), mask[n]
        moved += int((now[~keep] != initial[n][~keep]).sum())
        changed += int((now[keep] != initial[n][keep]).sum())
    assert moved == 0 and changed > 0
    assert installed_hooks(model) == []


def test_fsdp2_reshard_leaves_every_attribute_sharded():
    from torch.distributed.fsdp import fully_shard

    model = make_model("llama")
    assert fsdp2_reshard(model) == []  # no FSDP2: nothing to do
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with torch.no_grad():
        model(input_ids=random_input_ids(2, 6))
    assert len(fsdp2_reshard(model)) == len(model.model.layers) + 1
    assert all(is_dtensor(p) for p in model.parameters())
