"""Masks built on the base model before PEFT wrapped it (TRL's ``SFTTrainer(peft_config=...)`` wraps after the
callbacks were built): entries that let frozen, unadapted base weights train can never act, so they are refused
when nothing else in the mask acts and warned about otherwise; entries that only freeze such weights hold
trivially and stay quiet."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_llama

from hfhooks import GradientMask, ParamMask
from hfhooks.masks.lora import lora_aware_mask

peft = pytest.importorskip("peft")

Q0, UP0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"


def wrapped():
    """``(base model, PeftModel with LoRA r=2 on q_proj/v_proj)``; the base is wrapped in place."""
    base = tiny_llama()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return base, peft.get_peft_model(base, cfg)


def test_only_unreachable_entries_are_refused_naming_the_recipe():
    base, model = wrapped()
    mask = ParamMask.from_slices({UP0: (0, [0, 1])}, base)
    with pytest.raises(
        ValueError, match=r"up_proj.*no LoRA adapter.*Build the mask on the PeftModel.*do nothing"
    ):
        GradientMask(model, mask).attach()
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_partly_unreachable_mask_warns_and_the_rest_acts():
    base, model = wrapped()
    mask = ParamMask.from_slices({UP0: (0, [0, 1]), Q0: (0, [0, 1, 2])}, base)
    with pytest.warns(
        UserWarning, match=r"1 parameter train \(e\.g\. 'model\.layers\.0\.mlp\.up_proj\.weight'\)"
    ):
        mapped = lora_aware_mask(model, mask)
    b = "model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert mapped.granularity(b) == "row" and mapped.vector(b)[:3].all() and not mapped.vector(b)[3:].any()
    assert UP0 not in mapped


def test_freezing_entries_on_unadapted_weights_stay_quiet():
    """All-zero entries on frozen weights hold by themselves: neither a warning nor an error."""
    base, model = wrapped()
    mask = ParamMask({UP0: torch.zeros(base.model.layers[0].mlp.up_proj.weight.shape, dtype=torch.bool)})
    mask = mask | ParamMask.from_slices({Q0: (0, [0])}, base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapped = lora_aware_mask(model, mask)
    assert UP0 not in mapped and len(mapped) > 0
