"""The ✗ cells of the compatibility matrix: setups a callback cannot serve raise an error naming the alternative.

The DeepSpeed messages are also checked where DeepSpeed is not installed (the ZeRO cells come from real runs in
test_deepspeed.py): the callback's ``on_train_begin`` gets real ``TrainingArguments`` and the environment
accelerate sets for a DeepSpeed launch (``ACCELERATE_USE_DEEPSPEED=true``), or ``args.deepspeed`` set; FSDP1
cells likewise (the Trainer refuses FSDP outside a distributed launch). The remaining refusals run inside a real Trainer.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import transformers as T
from compat_utils import (
    ListData,
    bert,
    llama,
    lm_rows,
    prepare_model,
    random_mask,
    rationale_rows,
    refused,
    train,
    training_args,
)

from hfhooks import (
    AttributionAlignmentCallback,
    GradientMaskCallback,
    GradientRoutingCallback,
    LayerRestorationCallback,
    SaliencyUnlearningCallback,
    TaggedCollator,
    TaggedDataset,
    dedicated_mask,
)

pytestmark = pytest.mark.filterwarnings("ignore")

NAMES = {
    "gradient_mask": "GradientMaskCallback",
    "routing": "GradientRoutingCallback",
    "unlearning": "SaliencyUnlearningCallback",
    "attribution": "AttributionAlignmentCallback",
    "restoration": "LayerRestorationCallback",
}


def _callback(name: str, model) -> T.TrainerCallback:
    if name == "gradient_mask":
        return GradientMaskCallback(random_mask(model))
    if name == "routing":
        return GradientRoutingCallback(mlp_units=8)
    if name == "unlearning":
        return SaliencyUnlearningCallback(lm_rows(4), progress=False)
    if name == "attribution":
        return AttributionAlignmentCallback("grad_x_input", prior="rationale")
    return LayerRestorationCallback({n: p.detach().clone() for n, p in model.state_dict().items()}, "0:1")


def _begin(name: str, args: T.TrainingArguments) -> None:
    model = bert() if name == "attribution" else llama()
    cb = _callback(name, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cb.on_train_begin(args, T.TrainerState(), T.TrainerControl(), model=model, optimizer=opt)


def _cells(setup: str):
    return [
        pytest.param(n, marks=pytest.mark.compat(callback=n, setup=setup, expect="error"), id=n)
        for n in NAMES
    ]


# DeepSpeed without DeepSpeed installed: the arguments select it, the model carries no ZeRO bookkeeping. The
# ZeRO-1/2/3 cells of the matrix come from real runs (test_deepspeed.py); these check every message here too.
_DEEPSPEED_REFUSAL = {
    "gradient_mask": r"^GradientMaskCallback does not support DeepSpeed without ZeRO-1/2/3: .*stage to 1, 2 or 3, "
    r"or train with DDP",
    "unlearning": r"^SaliencyUnlearningCallback does not support DeepSpeed without ZeRO-1/2/3: .*stage to 1, 2 "
    r"or 3, or train with DDP",
    "restoration": r"^LayerRestorationCallback does not support DeepSpeed without ZeRO-1/2/3: .*stage to 1, 2 or 3, "
    r"or train with DDP",
    "attribution": r"^AttributionAlignmentCallback does not support DeepSpeed: only ZeRO-1 and ZeRO-2 are verified.*"
    r"set zero_optimization.stage to 1 or 2, or train with DDP",
    "routing": r"^GradientRoutingCallback does not support DeepSpeed without ZeRO-1/2/3: .*stage to 1, 2 or 3, "
    r"or train with DDP",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_deepspeed_refusals_say_why_and_what_to_use(name, tmp_path, monkeypatch):
    expected = _DEEPSPEED_REFUSAL.get(name, rf"^{NAMES[name]} does not support DeepSpeed: .*(DDP|restore)")
    args = training_args(tmp_path, "single")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch --use_deepspeed` sets
    with pytest.raises(RuntimeError, match=expected):
        _begin(name, args)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    object.__setattr__(args, "deepspeed", "ds_zero2.json")  # TrainingArguments(deepspeed=...)
    with pytest.raises(RuntimeError, match=expected):
        _begin(name, args)


def test_deepspeed_unlearning_with_a_mask_needs_zero(tmp_path, monkeypatch):
    model, args = llama(), training_args(tmp_path, "single")  # built before the launch's environment is set
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cb = SaliencyUnlearningCallback(lm_rows(4), mask=random_mask(model), progress=False)
    with pytest.raises(
        RuntimeError, match=r"^SaliencyUnlearningCallback does not support DeepSpeed without ZeRO"
    ):
        cb.on_train_begin(args, T.TrainerState(), T.TrainerControl(), model=model)


@pytest.mark.parametrize("name", _cells("fsdp1"))
def test_fsdp1_is_refused(name, request, tmp_path):
    with mock.patch.dict(os.environ):  # transformers < 5 exports ACCELERATE_USE_FSDP=true & co. for fsdp=...
        args = training_args(tmp_path, "single", fsdp="full_shard", fsdp_config={"version": 1})
        with refused(request, RuntimeError, rf"^{NAMES[name]} does not support FSDP1 .*(DDP|FSDP2|restore)"):
            _begin(name, args)


@pytest.mark.compat(callback="gradient_mask", setup="peft", variant="element mask on a frozen LoRA base weight",
                    expect="error")  # fmt: skip
def test_peft_element_mask_on_a_frozen_base_weight_is_refused(request, tmp_path):
    model = prepare_model(llama(), "peft")
    mask = random_mask(llama())  # element mask over the base model's weights, which LoRA freezes
    with refused(request, ValueError, "cannot be enforced"):
        train(model, training_args(tmp_path, "peft"), ListData(lm_rows()), GradientMaskCallback(mask))


@pytest.mark.compat(callback="routing", setup="peft", variant="dedicated slices in LoRA-frozen base weights",
                    expect="error")  # fmt: skip
def test_peft_routing_on_frozen_base_weights_is_refused(request, tmp_path):
    model = prepare_model(llama(), "peft")
    ded = dedicated_mask(model, mlp_units=8, heads=1)  # q_proj rows: a LoRA-wrapped, frozen base weight
    data = TaggedDataset(ListData(lm_rows()), tags={"routing": [1] * 16}, group_by="routing", batch_size=2)
    args = training_args(tmp_path, "peft", per_device_train_batch_size=1)
    with refused(request, ValueError, r"are frozen \(requires_grad=False\).*modules_to_save"):
        train(model, args, data, GradientRoutingCallback(ded), TaggedCollator(homogeneous="routing"))


@pytest.mark.compat(
    callback="attribution", setup="grad_ckpt", variant="reentrant checkpointing", expect="error"
)
def test_attribution_refuses_reentrant_checkpointing(request, tmp_path):
    args = training_args(tmp_path, "grad_ckpt", gradient_checkpointing_kwargs={"use_reentrant": True})
    data = TaggedDataset(ListData(rationale_rows()), tags=["rationale"])
    with refused(request, RuntimeError, r"reentrant gradient checkpointing breaks.*use_reentrant': False"):
        train(bert(), args, data, AttributionAlignmentCallback(prior="rationale"), TaggedCollator())


@pytest.mark.compat(callback="attribution", setup="compile", variant="AOTAutograd backends (inductor, aot_eager)",
                    expect="error")  # fmt: skip
def test_attribution_refuses_aot_compile(request, tmp_path):
    data = TaggedDataset(ListData(rationale_rows()), tags=["rationale"])
    args = training_args(tmp_path, "compile", torch_compile_backend="inductor")
    with pytest.raises(RuntimeError, match=r"torch.compile with the 'inductor' backend.*'eager'"):
        train(bert(), args, data, AttributionAlignmentCallback(prior="rationale"), TaggedCollator())
    args = training_args(tmp_path, "compile")
    with refused(request, RuntimeError, r"torch.compile with the 'aot_eager' backend.*'eager'"):
        train(bert(), args, data, AttributionAlignmentCallback(prior="rationale"), TaggedCollator())
