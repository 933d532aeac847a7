"""The freeze guarantee: every coordinate outside the mask is bit-identical after training."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

from hfhooks import (
    GradientMask,
    GradientMaskCallback,
    ParamIndex,
    ParamMask,
    attention_head_slices,
    mlp_unit_slices,
)
from hfhooks.trainer.guards import refuse_unsupported

VOCAB = 48


def tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        return T.LlamaForCausalLM(
            T.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
        )
    if arch == "qwen2":
        return T.Qwen2ForCausalLM(
            T.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
        )
    if arch == "gpt2":
        return T.GPT2LMHeadModel(
            T.GPT2Config(
                n_embd=32,
                n_layer=2,
                n_head=4,
                vocab_size=VOCAB,
                n_positions=32,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    if arch == "bert":
        return T.BertForMaskedLM(T.BertConfig(hidden_size=32, intermediate_size=64, **common))
    raise ValueError(arch)


class LMData(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def random_mask(model: nn.Module, ratio: float = 0.5, seed: int = 1) -> ParamMask:
    g = torch.Generator().manual_seed(seed)
    return ParamMask.from_scores(
        {n: torch.rand(p.shape, generator=g) for n, p in ParamIndex(model).items()}, ratio
    )


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ParamIndex(model).items()}


def assert_frozen_bit_identical(before, model, mask: ParamMask, expect_change: bool = True):
    changed_in = 0
    for name, p in ParamIndex(model).items():
        keep = mask[name] if name in mask else torch.zeros(p.shape, dtype=torch.bool)
        now = p.detach()
        frozen_same = now[~keep].view(torch.int32 if now.dtype == torch.float32 else torch.int16) == before[
            name
        ][~keep].view(torch.int32 if now.dtype == torch.float32 else torch.int16)
        assert bool(frozen_same.all()), f"{name}: {int((~frozen_same).sum())} frozen coordinates moved"
        changed_in += int((now[keep] != before[name][keep]).sum())
    if expect_change:
        assert changed_in > 0, "nothing trained at all: the test would pass vacuously"


def train(model, callbacks, tmp_path, **overrides):
    args = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=5e-2,
        weight_decay=0.1,
        max_grad_norm=0.5,
        warmup_steps=0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    args.update(overrides)
    trainer = T.Trainer(
        model=model, args=T.TrainingArguments(**args), train_dataset=LMData(), callbacks=callbacks
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_trainer_adamw_accumulation_clipping_bf16(arch, tmp_path):
    model = tiny(arch)
    mask = random_mask(model)
    before = snapshot(model)
    cb = GradientMaskCallback(mask)
    train(model, [cb], tmp_path, bf16=True)
    assert_frozen_bit_identical(before, model, mask)
    assert cb.enforcer is None  # detached at train end
    assert all(not p._backward_hooks for p in model.parameters())  # no tensor hooks left behind


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch", "adafactor", "rmsprop"])
def test_any_optimizer(optim, tmp_path):
    model = tiny("llama")
    mask = random_mask(model, 0.3)
    before = snapshot(model)
    extra = {"optim_args": "momentum=0.9"} if optim == "sgd" else {}
    train(model, [GradientMaskCallback(mask)], tmp_path, optim=optim, **extra)
    assert_frozen_bit_identical(before, model, mask)


def test_grad_mode_is_not_enough_under_weight_decay(tmp_path):
    """Why 'hard' exists: with gradient masking alone, weight decay moves frozen coordinates."""
    model = tiny("llama")
    mask = random_mask(model)
    before = snapshot(model)
    train(model, [GradientMaskCallback(mask, freeze="grad")], tmp_path)
    with pytest.raises(AssertionError, match="frozen coordinates moved"):
        assert_frozen_bit_identical(before, model, mask)


def test_groups_mode_drops_whole_frozen_tensors_and_restores_groups():
    model = tiny("llama")
    index = ParamIndex(model)
    mask = ParamMask.full(index, True, [n for n in index.names() if ".mlp." in n])  # everything else frozen
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    before = snapshot(model)
    batch = LMData()[0]
    with GradientMask(model, mask, freeze="groups").attach(opt) as gm:
        assert sum(len(g["params"]) for g in opt.param_groups) == len(mask)
        for _ in range(3):
            model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
            opt.step()
            opt.zero_grad()
        assert gm.moved() == {}
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params
    assert_frozen_bit_identical(before, model, mask)


def test_row_and_column_masks_sgd_momentum():
    model = tiny("llama")
    index = ParamIndex(model)
    mask = ParamMask.from_slices(
        {**mlp_unit_slices(index, 1, 8), **attention_head_slices(index, 0, 2)}, index
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    before = snapshot(model)
    batch = LMData()[0]
    with GradientMask(model, mask).attach(opt):
        for _ in range(3):
            model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
            opt.step()
            opt.zero_grad()
        for name in mask:  # optimizer state of frozen rows/columns is zero
            buf = opt.state[index.param(name)]["momentum_buffer"]
            assert bool((buf[~mask[name]] == 0).all())
    assert_frozen_bit_identical(before, model, mask)


def test_state_loaded_from_a_checkpoint_is_zeroed_and_cannot_move_weights():
    """Momentum accumulated before the mask (e.g. a resumed run) must not keep moving frozen coordinates."""
    model = tiny("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    batch = LMData()[0]
    for _ in range(2):  # build up Adam state everywhere
        model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
        opt.step()
        opt.zero_grad()
    mask = random_mask(model)
    before = snapshot(model)
    with GradientMask(model, mask).attach(opt):
        for _ in range(2):
            model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
            opt.step()
            opt.zero_grad()
    assert_frozen_bit_identical(before, model, mask)


def test_resume_from_checkpoint_keeps_guarantee(tmp_path):
    model = tiny("llama")
    mask = random_mask(model)
    before = snapshot(model)
    train(model, [GradientMaskCallback(mask)], tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    model2 = tiny("llama")  # fresh init; the checkpoint restores the trained weights
    train(model2, [GradientMaskCallback(mask)], tmp_path, max_steps=4, resume_from_checkpoint=True)
    assert_frozen_bit_identical(before, model2, mask)


def test_others_train_leaves_unnamed_parameters_alone():
    model = tiny("llama")
    index = ParamIndex(model)
    name = "model.layers.0.mlp.up_proj.weight"
    mask = ParamMask({name: torch.zeros(index.param(name).shape, dtype=torch.bool)})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = snapshot(model)
    batch = LMData()[0]
    with GradientMask(model, mask, others="train").attach(opt):
        model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
        opt.step()
    assert torch.equal(index.param(name), before[name])
    assert not torch.equal(
        index.param("model.layers.0.mlp.down_proj.weight"), before["model.layers.0.mlp.down_proj.weight"]
    )


def test_peft_element_mask_on_frozen_base_weight_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["up_proj"]))
    mask = random_mask(tiny("llama"))
    with pytest.raises(ValueError, match="cannot be enforced"):
        GradientMask(model, mask).attach()


def test_peft_neuron_mask_maps_onto_lora_and_freezes_effective_weight(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny("llama")
    index = ParamIndex(base)
    rows = mlp_unit_slices(index, 0, 16)  # dedicated: the last 16 MLP units of layer 0
    mask = ParamMask.from_slices(rows, index)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["up_proj", "down_proj"], lora_dropout=0.0)
    )
    effective_before = {m: _effective(model, m) for m in ("up_proj", "down_proj")}
    train(model, [GradientMaskCallback(mask)], tmp_path)
    for module in ("up_proj", "down_proj"):
        w0, w1 = effective_before[module], _effective(model, module)
        keep = mask[f"model.layers.0.mlp.{module}.weight"]
        assert torch.equal(w1[~keep], w0[~keep]), f"{module}: frozen units of the effective weight moved"
        assert not torch.equal(w1[keep], w0[keep]), f"{module}: dedicated units did not train"
    # adapters of other layers (not named by the mask) are frozen too
    layer1 = model.base_model.model.model.layers[1].mlp.up_proj
    assert bool((layer1.lora_B["default"].weight == 0).all())


def _effective(model, module: str) -> torch.Tensor:
    layer = getattr(model.base_model.model.model.layers[0].mlp, module)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (layer.base_layer.weight + layer.scaling["default"] * b @ a).detach().clone()


def test_deepspeed_and_fsdp1_are_refused_with_an_alternative():
    class Args:
        deepspeed = "ds_config.json"
        fsdp = ""

    with pytest.raises(RuntimeError, match="DeepSpeed.*DDP"):
        refuse_unsupported(Args(), "GradientMaskCallback")
    Args.deepspeed, Args.fsdp, Args.fsdp_config = None, "full_shard", {"version": 1}
    with pytest.raises(RuntimeError, match=r"does not support FSDP1.*Use FSDP2 \(fsdp_config"):
        refuse_unsupported(Args(), "GradientMaskCallback", fsdp2=True)
    Args.fsdp_config = {"version": 2}
    refuse_unsupported(Args(), "GradientMaskCallback", fsdp2=True)  # supported
    with pytest.raises(RuntimeError, match="does not support FSDP2 yet.*DDP"):
        refuse_unsupported(Args(), "GradientRoutingCallback")


def test_negative_zero_and_non_finite_frozen_values_are_restored_bit_for_bit():
    """-0.0 and inf frozen values (where ``p * keep + values`` would fail) come back bit for bit."""
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-0.0, 1.0, float("inf"), 2.0], [0.5, -0.0, 3.0, 1.0], [1.0] * 4]))
    keep = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    before = lin.weight.detach().clone()
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.5)
    with GradientMask(lin, ParamMask({"weight": keep})).attach(opt) as gm:
        assert gm._frozen[0].kind == "element"
        for _ in range(3):
            lin(torch.randn(5, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        assert gm.moved() == {}
    now = lin.weight.detach()
    assert torch.equal(now[~keep].view(torch.int32), before[~keep].view(torch.int32))  # -0.0 kept its sign
    assert bool((now[keep] != before[keep]).any())


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="freeze="):
        GradientMaskCallback(ParamMask({"w": torch.ones(2, dtype=torch.bool)}), freeze="soft")
    with pytest.raises(ValueError, match="empty"):
        GradientMask(tiny("llama"), ParamMask({})).attach()


@pytest.mark.parametrize("case", ["adam_eps0", "inf_grad_with_clipping", "inf_state"])
def test_non_finite_values_on_frozen_coordinates_are_erased_not_multiplied(case):
    """inf·0 is NaN: masking and restoring must select, not multiply, where non-finite values meet the mask."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 2, bias=False)
    keep = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    if case == "inf_grad_with_clipping":
        with torch.no_grad():
            lin.weight[0, 1] = 0.0  # frozen: d sqrt(|w|) / dw is inf here
    before = lin.weight.detach().clone()
    opt = (torch.optim.Adam if case == "adam_eps0" else torch.optim.AdamW)(
        lin.parameters(), lr=0.1, **({"eps": 0.0} if case == "adam_eps0" else {"weight_decay": 0.1})
    )
    if case == "inf_state":  # optimizer state from before the mask, holding an inf
        lin(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        opt.state[lin.weight]["exp_avg"][0, 1] = float("inf")
        before = lin.weight.detach().clone()
    with GradientMask(lin, ParamMask({"weight": keep})).attach(opt) as gm:
        for _ in range(3):
            loss = lin(torch.randn(5, 4)).square().mean()
            if case == "inf_grad_with_clipping":
                loss = loss + lin.weight.abs().sqrt().sum()
            loss.backward()
            if case == "inf_grad_with_clipping":
                assert torch.isfinite(lin.weight.grad).all()  # the inf sat on a frozen coordinate
                torch.nn.utils.clip_grad_norm_(lin.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        assert gm.moved() == {}
    now = lin.weight.detach()
    assert torch.equal(now[~keep].view(torch.int32), before[~keep].view(torch.int32))
    assert torch.isfinite(now).all() and bool((now[keep] != before[keep]).any())
