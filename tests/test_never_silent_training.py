"""Training-time guarantees that must hold on every entry point: hooks that tolerate ``None`` gradients, a
warning when weights turn non-finite, no hook outliving an interrupted ``Trainer.train()``, context managers
that refuse to freeze without the optimizer, tied-weight aliases acting on the shared tensor, and exact
routing by default."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T
from conftest import make_model, random_input_ids

from hfhooks import (
    FORGET,
    AttributionAlignmentCallback,
    GradientMask,
    GradientMaskCallback,
    GradientRoutingCallback,
    ParamIndex,
    ParamMask,
    Router,
    TaggedCollator,
    TaggedDataset,
    dedicated_mask,
    installed_hooks,
    remove_hooks,
)


def _args(tmp_path, **kw):
    opts = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2, report_to=[],
        use_cpu=True, logging_strategy="no", save_strategy="no", disable_tqdm=True, weight_decay=0.1,
    )  # fmt: skip
    opts.update(kw)
    return T.TrainingArguments(**opts)


def _lm_data(n=6, seq=6, **tags):
    ids = random_input_ids(n, seq)
    return TaggedDataset([{"input_ids": ids[i], "labels": ids[i]} for i in range(n)], tags=tags)


def _raw_hooks(model, optimizer=None) -> int:
    """Hooks counted straight from torch's dicts (not from hfhooks' own records)."""
    n = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    n += sum(
        len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
        for p in model.parameters()
    )
    if optimizer is not None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        n += len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)
    return n


def _half_mask(model) -> ParamMask:
    """Every tensor's even rows trainable, odd rows frozen (element masks)."""
    masks = {}
    for name, p in ParamIndex(model).items():
        keep = torch.zeros(p.shape, dtype=torch.bool)
        keep[::2] = True
        masks[name] = keep
    return ParamMask(masks)


# -- item 8: None gradients, non-finite weights ---------------------------------------------------------------
def _gpt2_classifier():
    config = make_model("gpt2").config
    config.num_labels, config.pad_token_id = 2, 0
    torch.manual_seed(0)
    return T.GPT2ForSequenceClassification(config)


def _classification_data(n):
    ids = random_input_ids(n, 6) % 63 + 1  # no pad token (0) inside
    rows = [{"input_ids": ids[i], "labels": torch.tensor(i % 2)} for i in range(n)]
    return TaggedDataset(rows, tags={"rationale": [[0.0, 1.0, 1.0, 0.0, 0.0, 1.0]] * n})


def test_gradient_mask_and_attribution_alignment_train_together_on_gpt2(tmp_path):
    model = _gpt2_classifier()
    index = ParamIndex(model)
    mask = _half_mask(model)
    before = {n: p.detach().clone() for n, p in index.items()}
    data = _classification_data(4)
    trainer = T.Trainer(
        model=model, args=_args(tmp_path, max_steps=2), train_dataset=data, data_collator=TaggedCollator(),
        callbacks=[GradientMaskCallback(mask), AttributionAlignmentCallback("grad_x_input", prior="rationale")],
    )  # fmt: skip
    trainer.train()
    moved = 0
    for name, p in index.items():
        frozen = ~mask[name]
        assert torch.equal(p.detach()[frozen], before[name][frozen]), name
        moved += int((p.detach() != before[name]).sum())
    assert moved > 0
    assert installed_hooks(model) == [] and _raw_hooks(model, trainer.optimizer) == 0


def test_nan_loss_in_trainer_warns_once_naming_step_and_tensors(tmp_path):
    model = make_model("llama")
    calls = []

    def poison(module, args, kwargs, out):  # the 2nd training forward returns a NaN loss
        calls.append(1)
        if len(calls) == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    model.register_forward_hook(poison, with_kwargs=True)
    cb = GradientMaskCallback(_half_mask(model), verify=False)
    trainer = T.Trainer(model=model, args=_args(tmp_path, max_steps=4, max_grad_norm=0.0), train_dataset=_lm_data(8),
                        data_collator=TaggedCollator(), callbacks=[cb])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if "NaN or inf" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    total = len(ParamIndex(model))
    assert f"{total} of {total} trainable tensors" in str(ours[0].message)
    assert "optimizer step 2" in str(ours[0].message)


def test_finite_training_does_not_warn_and_plain_loop_warns():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GradientMask(model, _half_mask(model), optimizer=opt):
            for _ in range(3):
                model(torch.randn(5, 4)).square().mean().backward()
                opt.step()
                opt.zero_grad()
    warns = pytest.warns(
        RuntimeWarning, match=r"4 of 4 trainable tensors turned NaN or inf at optimizer step 2"
    )
    with warns, GradientMask(model, _half_mask(model), optimizer=opt):
        for step in range(3):
            loss = model(torch.randn(5, 4)).square().mean()
            (loss * (float("inf") if step == 1 else 1.0)).backward()
            opt.step()
            opt.zero_grad()


# -- item 9: no hook outlives an interrupted run -----------------------------------------------------------------
class _Boom(T.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt("interrupted at step 2")


def _interrupted_run(tmp_path, model, callbacks, data=None):
    trainer = T.Trainer(model=model, args=_args(tmp_path, max_steps=5), train_dataset=data or _lm_data(12),
                        data_collator=TaggedCollator(), callbacks=[*callbacks, _Boom()])  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    return trainer


def _frozen_grad_after_plain_backward(model, mask) -> float:
    """|grad| summed over coordinates the mask froze, after a plain forward/backward (0 = still masked)."""
    model.zero_grad()
    ids = random_input_ids(2, 6) % 63 + 1
    labels = (
        torch.tensor([0, 1]) if model.config.num_labels == 2 and "Sequence" in type(model).__name__ else ids
    )
    model(input_ids=ids, labels=labels).loss.backward()
    return sum(
        float(p.grad[~mask[n]].abs().sum()) for n, p in ParamIndex(model).items() if p.grad is not None
    )


def test_interrupted_train_leaves_no_hooks(tmp_path):
    model = _gpt2_classifier()
    mask = _half_mask(model)
    align = AttributionAlignmentCallback("grad_x_input", prior="rationale")
    trainer = _interrupted_run(tmp_path, model, [GradientMaskCallback(mask), align], _classification_data(12))
    with pytest.warns(RuntimeWarning, match="ended without on_train_end"):
        left = installed_hooks(model)
    assert left == []
    assert _raw_hooks(model, trainer.optimizer) == 0
    assert _frozen_grad_after_plain_backward(model, mask) > 0


def test_next_forward_removes_hooks_of_an_interrupted_run(tmp_path):
    model = make_model("qwen2")
    mask = _half_mask(model)
    trainer = _interrupted_run(tmp_path, model, [GradientMaskCallback(mask)])
    groups_before = [list(g["params"]) for g in trainer.optimizer.param_groups]
    with pytest.warns(RuntimeWarning, match=r"removed its \d+ hooks \(GradientMask"):
        assert _frozen_grad_after_plain_backward(model, mask) > 0
    assert _raw_hooks(model, trainer.optimizer) == 0
    assert [list(g["params"]) for g in trainer.optimizer.param_groups] == groups_before


def test_new_attach_cleans_stale_hooks_and_remove_hooks_is_one_call(tmp_path):
    model = make_model("llama")
    mask = _half_mask(model)
    trainer = _interrupted_run(tmp_path, model, [GradientMaskCallback(mask, freeze="groups")])
    with pytest.warns(RuntimeWarning, match="ended without on_train_end"):
        gm = GradientMask(model, mask, freeze="grad").attach()
    # the interrupted run's optimizer groups are whole again, and only the new mask's hooks remain
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(ParamIndex(model))
    assert {r.owner for r in installed_hooks(model)} == {"GradientMask"}
    assert len(installed_hooks(model)) == gm.num_hooks == len(ParamIndex(model))
    assert remove_hooks(model) == len(ParamIndex(model))
    assert installed_hooks(model) == [] and _raw_hooks(model) == 0 and not gm.attached


def test_router_hooks_removed_after_interrupted_run(tmp_path):
    model = make_model("llama")
    ded = dedicated_mask(model, mlp_units=8, heads=1)
    data = TaggedDataset(
        [{"input_ids": i, "labels": i} for i in random_input_ids(12, 6)],
        tags={"routing": [FORGET] * 12}, group_by="routing", batch_size=2,
    )  # fmt: skip
    trainer = T.Trainer(model=model, args=_args(tmp_path, max_steps=5, per_device_train_batch_size=1),
                        train_dataset=data, data_collator=TaggedCollator(),
                        callbacks=[GradientRoutingCallback(ded), _Boom()])  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    with pytest.warns(RuntimeWarning, match="Router"):
        assert installed_hooks(model) == []
    assert _raw_hooks(model, trainer.optimizer) == 0


def test_hooks_attached_outside_a_run_stay_until_detached():
    model = make_model("llama")
    opt = torch.optim.AdamW(model.parameters())
    gm = GradientMask(model, _half_mask(model), optimizer=opt).attach()
    ids = random_input_ids(2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(installed_hooks(model)) == gm.num_hooks > 0
    gm.detach()
    assert installed_hooks(model) == [] and _raw_hooks(model, opt) == 0


# -- item 10: the context manager needs the optimizer ------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 3),
    )


def test_context_manager_with_optimizer_keeps_frozen_coordinates_under_adamw_decay():
    model = _mlp()
    mask = _half_mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    with GradientMask(model, mask, optimizer=opt):
        for _ in range(5):
            model(torch.randn(8, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    moved = sum(int((p.detach() != before[n])[~mask[n]].sum()) for n, p in model.named_parameters())
    assert moved == 0
    assert sum(int((p.detach() != before[n])[mask[n]].sum()) for n, p in model.named_parameters()) > 0


def test_context_manager_without_optimizer_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="needs the optimizer"), GradientMask(model, _half_mask(model)):
        pass
    assert installed_hooks(model) == []
    with GradientMask(model, _half_mask(model), freeze="grad"):  # gradient masking only: no optimizer needed
        assert installed_hooks(model)


def test_attach_without_optimizer_warns_if_frozen_coordinates_moved():
    model = _mlp()
    mask = _half_mask(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    gm = GradientMask(model, mask).attach()
    model(torch.randn(8, 6)).square().mean().backward()
    opt.step()
    with pytest.warns(RuntimeWarning, match="without an optimizer and after_step"):
        gm.detach()


# -- item 12: tied-weight aliases ----------------------------------------------------------------------------------
def _tied(arch):
    return make_model("gpt2") if arch == "gpt2" else make_model("llama", tie_word_embeddings=True)


def _train_with_mask(model, mask, others, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    with GradientMask(model, mask, others=others, optimizer=opt):
        for s in range(steps):
            ids = random_input_ids(2, 6, seed=s)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    return {n: p.detach().clone() for n, p in ParamIndex(model).items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("value,others", [(False, "train"), (True, "freeze")])
def test_mask_keyed_by_tied_alias_acts_like_canonical_name(arch, value, others):
    index = ParamIndex(_tied(arch))
    canon = index.canonical("lm_head.weight")
    assert canon != "lm_head.weight"  # the head is an alias of the embedding
    shape = index.param(canon).shape
    before = {n: p.detach().clone() for n, p in index.items()}
    by_alias = _train_with_mask(_tied(arch), ParamMask({"lm_head.weight": torch.full(shape, value)}), others)
    by_canon = _train_with_mask(_tied(arch), ParamMask({canon: torch.full(shape, value)}), others)
    for n in by_canon:
        torch.testing.assert_close(by_alias[n], by_canon[n], rtol=0, atol=0)
    assert torch.equal(by_alias[canon], before[canon]) is (not value)


def test_alias_and_canonical_name_that_disagree_are_refused():
    model = _tied("gpt2")
    shape = model.lm_head.weight.shape
    no, yes = torch.zeros(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool)
    mask = ParamMask({"lm_head.weight": no, "transformer.wte.weight": yes})
    with pytest.raises(ValueError, match="same parameter"):
        GradientMask(model, mask, freeze="grad").attach()
    same = ParamMask({"lm_head.weight": no, "transformer.wte.weight": no})
    assert same.canonical(model).names() == ["transformer.wte.weight"]


def test_router_and_selectors_resolve_the_tied_alias():
    model = _tied("gpt2")
    index = ParamIndex(model)
    assert index.select("lm_head.weight") == ["transformer.wte.weight"]
    ded = dedicated_mask(model, mlp_units=4, heads=0)
    rows = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
    rows[:5] = True
    alias = ded | ParamMask.from_slices({"lm_head.weight": (0, rows.nonzero().flatten())}, index)
    router = Router(model, alias, strict=False).attach()
    try:
        assert "transformer.wte.weight" in router.dedicated and "lm_head.weight" not in router.dedicated
    finally:
        router.detach()


# -- item 14: exact routing by default ----------------------------------------------------------------------------
def test_router_is_strict_by_default_and_refuses_without_optimizer():
    model = make_model("llama")
    ded = dedicated_mask(model, mlp_units=8, heads=1)
    assert Router(model, ded).strict and GradientRoutingCallback(ded).strict
    with pytest.raises(ValueError, match="needs the optimizer"):
        Router(model, ded).attach()
    with Router(model, ded, strict=False):  # the leaky mode, asked for by name
        pass
    with Router(model, ded, level="activation"):  # activation routing has nothing to restore
        pass


def _routing_run(tmp_path, **cb_kw):
    model = make_model("qwen2")
    ded = dedicated_mask(model, mlp_units=8, heads=1)
    data = TaggedDataset(
        [{"input_ids": i, "labels": i} for i in random_input_ids(8, 6)],
        tags={"routing": [FORGET] * 8}, group_by="routing", batch_size=2,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in ParamIndex(model).items()}
    T.Trainer(model=model, args=_args(tmp_path, per_device_train_batch_size=1, max_steps=3), train_dataset=data,
              data_collator=TaggedCollator(), callbacks=[GradientRoutingCallback(ded, **cb_kw)]).train()  # fmt: skip
    leaked = 0
    for n, p in ParamIndex(model).items():
        shared = ~ded[n] if n in ded else torch.ones_like(p, dtype=torch.bool)
        leaked += int((p.detach() != before[n])[shared].sum())
    return leaked


def test_default_routing_callback_moves_no_shared_coordinate_on_forget_steps(tmp_path):
    assert _routing_run(tmp_path / "a") == 0
    assert _routing_run(tmp_path / "b", strict=False) > 0  # the leak the default closes


def test_missing_routing_labels_raise_before_the_first_optimizer_step(tmp_path):
    model = make_model("llama")
    before = {n: p.detach().clone() for n, p in ParamIndex(model).items()}
    data = _lm_data(4, 6, other=[0] * 4)
    trainer = T.Trainer(model=model, args=_args(tmp_path, per_device_train_batch_size=1, max_steps=2),
                        train_dataset=data, data_collator=TaggedCollator(),
                        callbacks=[GradientRoutingCallback(mlp_units=8)])  # fmt: skip
    with pytest.raises(RuntimeError, match="No routing labels reached the model"):
        trainer.train()
    for n, p in ParamIndex(model).items():
        assert torch.equal(p.detach(), before[n]), f"{n} changed before the error"
    assert installed_hooks(model) == [] and _raw_hooks(model, trainer.optimizer) == 0


def test_plain_router_raises_before_a_step_without_labels():
    model = make_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    router = Router(model, dedicated_mask(model, mlp_units=8), optimizer=opt)
    with pytest.raises(RuntimeError, match="No routing labels"), router:
        ids = random_input_ids(2, 6)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert installed_hooks(model) == []
