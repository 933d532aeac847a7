"""Gradient routing / SGTM: labels reach the hooks, gradients go where the mode says, ablation is exact."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import make_model, random_input_ids

from hfhooks import (
    FORGET,
    RETAIN,
    UNLABELLED,
    GradientRoutingCallback,
    ParamIndex,
    Router,
    TaggedCollator,
    TaggedDataset,
    ablate,
    calibrate_logits,
    dedicated_mask,
    routing_labels,
)

DECODERS = ("llama", "qwen2", "gpt2", "neox")


def no_dropout(model):
    """Train-mode forwards must be deterministic to compare them (GPT-2 / NeoX have dropout)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def grads_for(model, mask, label, level="param", batch=4, **kw):
    """Gradients of one forward/backward with the router attached and all micro-batch labels = label."""
    ids = random_input_ids(batch, 9)
    model.zero_grad()
    with Router(model, mask, level=level, strict=False, **kw):  # gradients only: no optimizer steps
        model.train()
        labels = torch.full((batch,), label)
        model(input_ids=ids, labels=ids, routing=labels).loss.backward()
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in ParamIndex(model).items()
    }


@pytest.mark.parametrize("arch", DECODERS)
def test_forget_gradients_only_reach_dedicated(arch):
    model = make_model(arch)
    mask = dedicated_mask(model, mlp_units=8, heads=1)
    grads = grads_for(model, mask, FORGET)
    nonzero_dedicated = 0
    for name, g in grads.items():
        ded = mask[name] if name in mask else torch.zeros_like(g, dtype=torch.bool)
        assert bool((g[~ded] == 0).all()), f"{name}: forget gradient leaked outside the dedicated slices"
        nonzero_dedicated += int((g[ded] != 0).sum())
    assert nonzero_dedicated > 0


@pytest.mark.parametrize("arch", DECODERS)
def test_retain_sends_no_gradient_to_dedicated_and_zeroes_their_activations(arch):
    model = make_model(arch)
    mask = dedicated_mask(model, mlp_units=8, heads=1)
    grads = grads_for(model, mask, RETAIN)
    for name in mask:
        assert bool((grads[name][mask[name]] == 0).all()), f"{name}: retain gradient reached dedicated slices"
    # the retain forward equals the forward of the ablated model (dedicated activations zeroed)
    ids = random_input_ids(2, 9)
    ablated = no_dropout(make_model(arch))
    no_dropout(model)
    ablate(ablated, mask)
    with Router(model, mask, strict=False):  # forward only: no optimizer steps
        model.train()
        routed = model(input_ids=ids, routing=torch.full((2,), RETAIN)).logits
    ablated.train()
    torch.testing.assert_close(routed, ablated(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_unlabelled_and_eval_are_untouched():
    model = make_model("llama")
    mask = dedicated_mask(model, mlp_units=8, heads=1)
    plain = grads_for(model, mask, UNLABELLED)
    ids = random_input_ids(4, 9)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in ParamIndex(model).items():
        torch.testing.assert_close(plain[n], p.grad)
    with Router(model, mask, strict=False):  # eval: labels are popped and ignored
        model.eval()
        out = model(input_ids=ids, routing=torch.full((4,), RETAIN)).logits
    model.eval()
    torch.testing.assert_close(out, model(input_ids=ids).logits)


def test_param_level_refuses_mixed_microbatch():
    model = make_model("llama")
    ids = random_input_ids(2, 9)
    with (
        Router(model, dedicated_mask(model, mlp_units=8), strict=False),
        pytest.raises(ValueError, match="mixing routing labels"),
    ):
        model.train()
        model(input_ids=ids, routing=torch.tensor([FORGET, RETAIN]))


def test_activation_level_matches_per_example_param_level():
    """On a mixed batch, activation routing leaves values unchanged and routes each example's gradient."""
    model = make_model("llama")
    mask = dedicated_mask(model, mlp_units=8, heads=1)
    ids = random_input_ids(2, 9)
    labels = torch.tensor([FORGET, UNLABELLED])
    model.train()
    with Router(model, mask, level="activation"):
        out = model(input_ids=ids, routing=labels)
    # forget example: its loss gradient w.r.t. a down_proj input only flows through dedicated units
    site = ParamIndex(model).info("model.layers.1.mlp.down_proj.weight").module
    captured = {}

    def grab(mod, args):
        captured["x"] = args[0]
        args[0].retain_grad()

    h = site.register_forward_pre_hook(grab)
    with Router(model, mask, level="activation"):
        model(input_ids=ids, routing=labels).logits[0].sum().backward()
    h.remove()
    g = captured["x"].grad[0]  # example 0 = forget
    ded_units = mask.vector("model.layers.1.mlp.down_proj.weight")
    assert bool((g[..., ~ded_units] == 0).all()) and bool((g[..., ded_units] != 0).any())
    model.eval()
    torch.testing.assert_close(out.logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_activation_level_fractional_and_negative_weights_scale_gradients():
    model = make_model("llama")
    mask = dedicated_mask(
        model, layers=[1], mlp_units=8, heads=0
    )  # one site: downstream grads do not depend on w
    ids = random_input_ids(1, 9)
    site = ParamIndex(model).info("model.layers.1.mlp.down_proj.weight").module
    grads = {}
    for w in (1.0, -0.75):
        captured = {}

        def grab(mod, args, captured=captured):
            captured["x"] = args[0]
            args[0].retain_grad()

        h = site.register_forward_pre_hook(grab)  # registered first: sees the input before routing
        with Router(model, mask, level="activation", forget_weights=(1.0, w)):
            model.train()
            model(input_ids=ids, routing=torch.tensor([FORGET])).logits.sum().backward()
        h.remove()
        grads[w] = captured["x"].grad
    shared = ~mask.vector("model.layers.1.mlp.down_proj.weight")
    torch.testing.assert_close(grads[-0.75][..., shared], -0.75 * grads[1.0][..., shared])


def test_ablate_zeroes_exactly_the_dedicated_slices():
    model = make_model("gpt2")
    mask = dedicated_mask(model, layers=[1], mlp_units=8, heads=1)
    before = {n: p.detach().clone() for n, p in ParamIndex(model).items()}
    changed = ablate(model, mask)
    assert changed == sum(k for k, _ in mask.counts().values())
    for n, p in ParamIndex(model).items():
        if n in mask:
            assert bool((p[mask[n]] == 0).all())
            assert torch.equal(p[~mask[n]], before[n][~mask[n]])
        else:
            assert torch.equal(p, before[n])
    g = torch.Generator().manual_seed(0)
    ablate(model, mask, how="reinit", generator=g)
    name = next(iter(mask))
    assert bool((ParamIndex(model).param(name)[mask[name]] != 0).any())


def test_dedicated_mask_metadata_and_save_roundtrip(tmp_path):
    model = make_model("llama")
    mask = dedicated_mask(model, layers=slice(0, 1), mlp_units=8, heads=2)
    assert mask.metadata["routing"]["layers"] == [0]
    path = mask.save(tmp_path / "dedicated.safetensors", model=model)
    from hfhooks import ParamMask

    assert ParamMask.load(path) == mask
    with pytest.raises(ValueError, match="No dedicated"):
        dedicated_mask(model, mlp_units=0, heads=0)


def test_routing_labels_normalise():
    assert routing_labels(["forget", "retain", None, "unlabelled", 1, 0, -1]) == [1, 0, -1, -1, 1, 0, -1]
    with pytest.raises(ValueError, match="Unknown routing label"):
        routing_labels(["forgett"])


def test_tagged_dataset_groups_and_collator():
    ids = random_input_ids(10, 5)
    ds = [{"input_ids": ids[i], "labels": ids[i], "routing": i % 2, "text": "x"} for i in range(10)]
    tagged = TaggedDataset(ds, tags=["routing"], group_by="routing", batch_size=2)
    assert len(tagged) == 6  # 5 + 5 examples in groups of 2 -> 3 + 3
    collate = TaggedCollator(homogeneous="routing")
    for i in range(len(tagged)):
        batch = collate([tagged[i]])
        assert set(batch) == {"input_ids", "labels", "routing"}  # junk text dropped, tag added
        assert len(set(batch["routing"].tolist())) == 1
    mixed = [tagged[i] for i in range(len(tagged))]
    with pytest.raises(ValueError, match="label-homogeneous"):
        collate(mixed)
    with pytest.raises(TypeError, match="TaggedDataset"):
        collate([ds[0]])
    with pytest.raises(ValueError, match="values for a dataset"):
        TaggedDataset(ds, tags={"routing": [1, 0]})


def _trainer(model, dataset, callbacks, tmp_path, **kw):
    args = T.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=2, learning_rate=1e-2, report_to=[],
        use_cpu=True, logging_strategy="no", save_strategy="no", disable_tqdm=True, **kw,
    )  # fmt: skip
    return T.Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=TaggedCollator(), callbacks=callbacks
    )


def test_trainer_without_labels_fails_loudly(tmp_path):
    model = make_model("llama")
    ids = random_input_ids(4, 6)
    plain = TaggedDataset(
        [{"input_ids": ids[i], "labels": ids[i]} for i in range(4)], tags={"other": [0] * 4}
    )
    with pytest.raises(RuntimeError, match="No routing labels reached the model"):
        _trainer(model, plain, [GradientRoutingCallback(mlp_units=8)], tmp_path).train()
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_trainer_strict_forget_only_moves_dedicated_and_removes_hooks(tmp_path):
    model = make_model("qwen2")
    mask = dedicated_mask(model, mlp_units=8, heads=1)
    ids = random_input_ids(8, 6)
    ds = TaggedDataset(
        [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)],
        tags={"routing": [FORGET] * 8},
        group_by="routing",
        batch_size=2,
    )
    before = {n: p.detach().clone() for n, p in ParamIndex(model).items()}
    cb = GradientRoutingCallback(mask, strict=True, save_mask=tmp_path / "ded.safetensors")
    _trainer(model, ds, [cb], tmp_path, weight_decay=0.1, gradient_accumulation_steps=2).train()
    for n, p in ParamIndex(model).items():
        ded = mask[n] if n in mask else torch.zeros_like(p, dtype=torch.bool)
        assert torch.equal(p[~ded], before[n][~ded]), n
    assert cb.router.num_hooks == 0 and cb.router.counts["forget"] == 4
    assert (tmp_path / "ded.safetensors").exists()
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_calibrate_logits_trains_only_the_bias():
    model = make_model("llama")
    ids = random_input_ids(4, 8)
    before = {n: p.detach().clone() for n, p in ParamIndex(model).items()}
    batches = [{"input_ids": ids, "labels": ids}]
    history = calibrate_logits(
        model, {"forget": (batches, 1.0), "retain": (batches, 0.5)}, steps=30, lr=5e-2, progress=False
    )
    assert history[-1] < history[0]
    for n, p in ParamIndex(model).items():
        if n != "lm_head.bias":
            assert torch.equal(p, before[n]), n
            assert p.requires_grad
    assert model.lm_head.bias is not None and bool((model.lm_head.bias != 0).any())
