"""AttributionAlignmentCallback and LayerRestorationCallback under DeepSpeed, without a DeepSpeed run: the stage
each reads from the arguments / environment / model, and what each accepts or refuses at train begin.

The real runs (ZeRO-1/2/3 under torchrun) are tests/compat/test_deepspeed.py; here the model's parameters carry
the tags DeepSpeed puts on them (``ds_id`` under ZeRO-3, ``_hp_mapping`` under ZeRO-1/2), and the environment is
what ``accelerate launch --use_deepspeed --zero_stage N`` exports.
"""

from __future__ import annotations

import pytest
import transformers as T
from conftest import tiny_bert, tiny_llama

from hfhooks import AttributionAlignmentCallback, LayerRestorationCallback
from hfhooks.trainer.guards import deepspeed_zero_stage


class _Config:
    """What ``TrainingArguments(deepspeed=...)`` keeps as ``args.hf_deepspeed_config``."""

    def __init__(self, **values):
        self.values = values

    def get_value(self, key):
        return self.values.get(key)


def _tag(model, stage: int):
    for p in model.parameters():
        if stage == 3:
            p.ds_id = 0
        else:
            p._hp_mapping = None
    return model


def _args(tmp_path, **kw):
    return T.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)


def _deepspeed(monkeypatch, stage: int | None):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    if stage is not None:
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))


def test_zero_stage_is_read_from_args_environment_and_model(tmp_path, monkeypatch):
    args = _args(tmp_path)
    assert deepspeed_zero_stage(args) is None  # no DeepSpeed
    assert deepspeed_zero_stage(args, _tag(tiny_llama(), 3)) == 3  # partitioned parameters are ZeRO-3
    object.__setattr__(args, "deepspeed", {"zero_optimization": {"stage": 2}})
    object.__setattr__(args, "hf_deepspeed_config", _Config(**{"zero_optimization.stage": 2}))
    assert deepspeed_zero_stage(args) == 2
    assert deepspeed_zero_stage(args, _tag(tiny_llama(), 3)) == 3
    args = _args(tmp_path)
    _deepspeed(monkeypatch, 1)
    assert deepspeed_zero_stage(args) == 1
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    assert deepspeed_zero_stage(args, tiny_llama()) == 0  # cannot be told
    assert deepspeed_zero_stage(args, _tag(tiny_llama(), 2)) == 2  # linked to ZeRO-1/2 masters


@pytest.mark.parametrize("stage", [1, 2])
def test_attribution_accepts_zero12(tmp_path, monkeypatch, stage):
    args = _args(tmp_path)
    _deepspeed(monkeypatch, stage)
    cb = AttributionAlignmentCallback("grad_x_input", prior="rationale")
    model = _tag(tiny_bert(), stage)
    cb.on_train_begin(args, T.TrainerState(), T.TrainerControl(), model=model)
    try:
        assert cb.alignment is not None and cb.alignment.num_hooks > 0
    finally:
        cb.on_train_end(args, T.TrainerState(), T.TrainerControl())
    assert cb.alignment.num_hooks == 0


@pytest.mark.parametrize("tagged", [True, False], ids=["model", "environment"])
def test_attribution_refuses_zero3_with_the_reason(tmp_path, monkeypatch, tagged):
    args = _args(tmp_path)
    _deepspeed(monkeypatch, None if tagged else 3)
    model = _tag(tiny_bert(), 3) if tagged else tiny_bert()
    cb = AttributionAlignmentCallback("grad_x_input", prior="rationale")
    with pytest.raises(
        RuntimeError, match=r"does not support DeepSpeed: under ZeRO-3 .*released.*stage to 1 or 2"
    ):
        cb.on_train_begin(args, T.TrainerState(), T.TrainerControl(), model=model)
    assert cb.alignment is None  # nothing attached


def test_restoration_accepts_zero_and_checks_its_saves(tmp_path, monkeypatch):
    args = _args(tmp_path)
    _deepspeed(monkeypatch, 2)
    cb = LayerRestorationCallback({}, "0:1", when=("save", "train_end"))
    cb.on_train_begin(args, T.TrainerState(), T.TrainerControl(), model=_tag(tiny_llama(), 2))
    assert cb._zero == 2
    # ZeRO-3 writes no model files into checkpoints unless told to gather them: a variant needs them
    variant = LayerRestorationCallback({}, "0:1", when="save", mode="variant")
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        variant.on_train_begin(args, T.TrainerState(), T.TrainerControl(), model=_tag(tiny_llama(), 3))
    object.__setattr__(args, "hf_deepspeed_config", _Config(**{"zero_optimization.stage": 3,
                       "zero_optimization.stage3_gather_16bit_weights_on_model_save": True}))  # fmt: skip
    variant.on_train_begin(args, T.TrainerState(), T.TrainerControl(), model=_tag(tiny_llama(), 3))
    # the Trainer uploads DeepSpeed's shards with the checkpoint before they are restored (at on_save)
    object.__setattr__(args, "push_to_hub", True)
    object.__setattr__(args, "hub_strategy", "checkpoint")
    with pytest.raises(ValueError, match="hub_strategy='checkpoint'.*every_save"):
        cb.on_train_begin(args, T.TrainerState(), T.TrainerControl(), model=_tag(tiny_llama(), 2))


def test_restoration_train_end_without_deepspeed_is_unchanged(tmp_path):
    """The variant path, refactored for DeepSpeed, still restores only the copy it saves."""
    import torch

    from hfhooks import ParamIndex

    model, reference = tiny_llama(), tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {n: p.detach().clone() for n, p in ParamIndex(model).items()}
    args = _args(tmp_path)
    cb = LayerRestorationCallback(reference, "0:1", mode="variant")
    cb.on_train_begin(args, T.TrainerState(), T.TrainerControl(), model=model)
    cb.on_train_end(args, T.TrainerState(), T.TrainerControl(), model=model)
    assert all(torch.equal(p, before[n]) for n, p in ParamIndex(model).items())
    saved = T.LlamaForCausalLM.from_pretrained(tmp_path / "restored")
    ref = dict(reference.named_parameters())
    for n, p in saved.named_parameters():
        assert torch.equal(p, ref[n] if ".layers.0." in n else before[n]), n
