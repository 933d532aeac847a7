"""DeepSpeed bookkeeping the hard freeze reads, without DeepSpeed: a ZeRO-3 placeholder parameter (empty ``.data``,
the real shape in ``ds_shape``) as ``deepspeed.zero.Init`` leaves it. The real runs are in
tests/compat/test_deepspeed.py (torchrun, skipped without DeepSpeed)."""

from __future__ import annotations

import pytest
import torch

from hfhooks import GradientMask, ParamMask
from hfhooks.freeze.deepspeed import full_shape, gathered, optimizer_state_keys, zero_stage


def zero3_placeholder(model: torch.nn.Module) -> torch.nn.Module:
    for i, p in enumerate(model.parameters()):
        p.ds_shape, p.ds_id = p.shape, i
        p.data = torch.empty(0)
    return model


def mask_for(model: torch.nn.Linear) -> ParamMask:
    return ParamMask({"weight": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]]), "bias": torch.tensor([1, 0])})


def test_zero3_placeholders_are_recognised_and_validate_with_their_real_shape():
    model = zero3_placeholder(torch.nn.Linear(4, 2))
    assert zero_stage(model) == 3 and full_shape(model.weight) == (2, 4)
    mask_for(model).validate(model)  # .shape is (0,) here: the mask is checked against ds_shape


def test_plain_models_are_not_deepspeed_and_gather_to_themselves():
    model = torch.nn.Linear(4, 2)
    assert zero_stage(model) is None and zero_stage(None) is None
    with gathered(model.parameters(), modify=True):  # nothing partitioned: deepspeed is not even imported
        assert model.weight.shape == (2, 4)
    assert optimizer_state_keys(None) == []


def test_groups_mode_is_refused_under_deepspeed():
    model = zero3_placeholder(torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"freeze='groups'.*DeepSpeed.*use freeze='hard'"):
        GradientMask(model, mask_for(model), freeze="groups").attach()
