"""Adversarial review of the memory-saving paths: bit-packed masks, compact strict routing, SalUn scoring, NPO's
precomputed reference. Each test states the property; the bug tests failed on the code before their fix."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, random_input_ids

from hfhooks.masks.mask import ParamMask
from hfhooks.masks.topk import topk_masks
from hfhooks.routing.ablation import dedicated_mask
from hfhooks.routing.router import FORGET, RETAIN, UNLABELLED, Router
from hfhooks.unlearning.objectives import UnlearningObjective, objective_hook, salun


# -- NPO / GradDiff / GA against a straightforward implementation ---------------------------------------------
def _plain_objective(logits, labels, forget, name, alpha, beta, reference):
    """The objectives written the obvious way: per example, F.cross_entropy over the shifted tokens."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    total = weight = 0.0
    for i in range(len(labels)):
        summed = F.cross_entropy(logits[i], labels[i], ignore_index=-100, reduction="sum")  # = -log π(y|x)
        n = int((labels[i] != -100).sum())
        if not forget[i]:
            term = alpha * summed / n
        elif name == "npo":
            term = 2 / beta * F.softplus(beta * (-summed - reference[i]))
        else:
            term = -summed / n
        total, weight = total + term * n, weight + n
    return total / weight


@pytest.mark.parametrize("name", ["ga", "graddiff", "npo"])
def test_objectives_equal_a_plain_implementation_on_padded_mixed_batches(name):
    model = make_model("llama").train()
    ids = random_input_ids(5, 7)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that does not count
    labels[3, 5:] = -100  # right padding
    forget = torch.tensor([1, 0, 1, 0, 1])
    reference = torch.randn(5) - 20
    objective = UnlearningObjective(name, retain_weight=0.7, beta=0.3)
    objective.reference = reference
    with objective_hook(model, objective):
        loss = model(input_ids=ids, labels=labels, unlearn=forget, example_id=torch.arange(5))["loss"]
    with torch.no_grad():
        expected = _plain_objective(model(input_ids=ids)["logits"], labels, forget, name, 0.7, 0.3, reference)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)


def test_npo_forget_example_without_a_reference_entry_is_an_error_not_a_clamped_lookup():
    """Bug: ids past the reference were clamped to its last entry, so a stale reference (computed for a shorter
    forget set) silently gave forget examples another example's log-probability."""
    model = make_model("llama").train()
    ids = random_input_ids(2, 6)
    objective = UnlearningObjective("npo")
    objective.reference = torch.full((2,), -20.0)
    with objective_hook(model, objective), pytest.raises(ValueError, match=r"example_id \[5\].*stale"):
        model(input_ids=ids, labels=ids, unlearn=torch.tensor([1, 1]), example_id=torch.tensor([0, 5]))
    # retain examples' ids lie past the forget set by design: no reference needed for them
    with objective_hook(model, objective):
        loss = model(input_ids=ids, labels=ids, unlearn=torch.tensor([1, 0]), example_id=torch.tensor([1, 7]))
    assert torch.isfinite(loss["loss"])


def test_salun_refuses_an_npo_reference_of_another_forget_set():
    model = make_model("llama")
    ids = random_input_ids(6, 6)
    forget = [{"input_ids": ids[i], "labels": ids[i]} for i in range(4)]
    retain = [{"input_ids": ids[i], "labels": ids[i]} for i in range(4, 6)]
    objective = UnlearningObjective("npo")
    objective.reference = torch.zeros(3)  # computed for a forget set of 3
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="holds 3 log-probabilities but the forget set has 4"):
        salun(model, forget, retain, objective, mask=ParamMask.full(model), epochs=1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before training


def test_salun_callback_refuses_a_given_npo_reference_of_another_forget_set(tmp_path):
    import transformers as T

    from hfhooks import SaliencyUnlearningCallback, TaggedCollator, forget_retain_dataset

    model = make_model("llama")
    ids = random_input_ids(8, 6)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]
    objective = UnlearningObjective("npo")
    objective.reference = torch.zeros(3)  # a reference for 3 forget examples; the forget set has 4
    callback = SaliencyUnlearningCallback(
        data[:4], objective=objective, mask=ParamMask.full(model), progress=False
    )
    args = T.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, use_cpu=True, report_to=[],
        logging_strategy="no", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = T.Trainer(
        model=model,
        args=args,
        train_dataset=forget_retain_dataset(data[:4], data[4:]),
        data_collator=TaggedCollator(),
        callbacks=[callback],
    )
    with pytest.raises(ValueError, match="SaliencyUnlearningCallback: the NPO reference holds 3"):
        trainer.train()


# -- ParamMask ------------------------------------------------------------------------------------------------
def test_from_slices_takes_a_bool_selection_as_a_selection_not_as_indices():
    """Bug: a bool vector was cast to int64 indices, so [F, T, T, F] selected rows 0 and 1."""
    mask = ParamMask.from_slices({"w": (0, torch.tensor([False, True, True, False]))}, {"w": (4, 3)})
    assert mask.vector("w").tolist() == [False, True, True, False]
    assert mask == ParamMask.from_slices({"w": (0, torch.tensor([1, 2]))}, {"w": (4, 3)})
    with pytest.raises(ValueError, match=r"must be \(3,\)"):
        ParamMask.from_slices({"w": (1, torch.tensor([True, False]))}, {"w": (4, 3)})


@pytest.mark.parametrize(
    "scores",
    [
        torch.tensor([1.0, 1.0 + 1e-12], dtype=torch.float64),
        torch.tensor([16777217, 16777216], dtype=torch.int64),  # 2**24 + 1 rounds to 2**24 in float32
    ],
)
def test_topk_refuses_scores_float32_keys_cannot_tell_apart(scores):
    """Bug: float64 / int64 scores were ranked by their float32 rounding, so the larger of two scores that round
    to one float32 lost to the earlier one by tie order, silently."""
    with pytest.raises(ValueError, match="float32 cannot represent"):
        topk_masks({"a": scores}, 0.5)
    exact = scores.double() * 0 + torch.tensor([1.0, 2.0], dtype=torch.float64)  # float64, exactly float32
    assert topk_masks({"a": exact}, 0.5)["a"].tolist() == [False, True]
    assert topk_masks({"a": torch.tensor([3, 1])}, 0.5)["a"].tolist() == [True, False]


# -- strict routing: which micro-batches count for a step ------------------------------------------------------
_DOWN = "model.layers.0.mlp.down_proj.weight"


def _routed_llama():
    model = make_model("llama").train()
    dedicated = dedicated_mask(model, mlp_units=8, heads=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, dedicated, opt, Router(model, dedicated, optimizer=opt).attach()


def _micro_batch(model, mode, seed=0):
    ids = random_input_ids(2, 6, seed=seed)
    return model(input_ids=ids, labels=ids, routing=torch.full((2,), mode)).loss


def _retain_step_holds_dedicated(model, dedicated, opt, seed=9) -> bool:
    before = model.get_parameter(_DOWN).detach().clone()
    _micro_batch(model, RETAIN, seed).backward()
    opt.step()
    opt.zero_grad()
    held = dedicated[_DOWN]
    return torch.equal(model.get_parameter(_DOWN).detach()[held], before[held])


def test_a_window_dropped_without_a_step_does_not_make_the_next_retain_step_mixed():
    """Bug: a forget window whose optimizer step was skipped (fp16 GradScaler: inf/NaN) left its mode behind, so the
    next retain-only step counted as mixed, held nothing, and AdamW's momentum and weight decay moved the dedicated
    coordinates."""
    model, dedicated, opt, router = _routed_llama()
    _micro_batch(model, FORGET, 1).backward()
    opt.step()  # momentum on the dedicated coordinates
    opt.zero_grad()
    _micro_batch(model, FORGET, 2).backward()
    opt.zero_grad()  # what a GradScaler-skipped step leaves: no optimizer.step(), gradients dropped
    assert _retain_step_holds_dedicated(model, dedicated, opt)
    router.detach()


def test_end_window_forgets_a_dropped_window_the_router_cannot_see():
    """zero_grad(set_to_none=False) leaves zero gradients: the drop is invisible, end_window() (called by the
    callback at every Trainer step end) forgets it."""
    model, dedicated, opt, router = _routed_llama()
    _micro_batch(model, FORGET, 1).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    _micro_batch(model, FORGET, 2).backward()
    opt.zero_grad(set_to_none=False)
    router.end_window()
    assert _retain_step_holds_dedicated(model, dedicated, opt)
    router.detach()


def test_a_forward_without_gradients_does_not_count_for_the_step():
    """Bug: a training-mode forward under torch.no_grad() (a metric, a generation) recorded its mode for the step,
    so a forget-labelled one before a retain-only step made it mixed and the dedicated coordinates moved."""
    model, dedicated, opt, router = _routed_llama()
    _micro_batch(model, FORGET, 1).backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        _micro_batch(model, FORGET, 2)
    assert _retain_step_holds_dedicated(model, dedicated, opt)
    router.detach()


def test_a_window_mixing_forget_and_retain_still_trains_both():
    """The counterpart: within one window (no drop) forget and retain micro-batches make a mixed step, which
    holds nothing (docs/routing.md), so the dedicated coordinates learn from the forget micro-batch."""
    model, dedicated, opt, router = _routed_llama()
    before = model.get_parameter(_DOWN).detach().clone()
    _micro_batch(model, FORGET, 1).backward()
    _micro_batch(model, RETAIN, 2).backward()
    _micro_batch(model, UNLABELLED, 3).backward()
    opt.step()
    held = dedicated[_DOWN]
    assert not torch.equal(model.get_parameter(_DOWN).detach()[held], before[held])
    assert not torch.equal(model.get_parameter(_DOWN).detach()[~held], before[~held])  # retain trained
    router.detach()


def test_routing_callback_ends_the_window_at_every_step_end():
    from hfhooks.routing.callback import GradientRoutingCallback

    model, dedicated, opt, router = _routed_llama()
    callback = GradientRoutingCallback(dedicated)
    callback.router = router
    _micro_batch(model, FORGET, 1).backward()
    opt.zero_grad(set_to_none=False)  # dropped, invisibly
    callback.on_step_end(None, None, None)
    assert _retain_step_holds_dedicated(model, dedicated, opt)
    router.detach()


def test_shared_on_forget_matching_parameters_with_dedicated_coordinates_warns():
    """Never silent: shared_on_forget applies to parameters without dedicated coordinates; a pattern reaching
    ones with dedicated coordinates changes nothing for them, which is now said."""
    model = make_model("llama").train()
    dedicated = dedicated_mask(model, mlp_units=8, heads=1)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.warns(UserWarning, match=r"matches 2 parameter\(s\) with dedicated coordinates"):
        Router(model, dedicated, optimizer=opt, shared_on_forget=["*down_proj*"]).attach().detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Router(model, dedicated, optimizer=opt, shared_on_forget=["*embed_tokens*"]).attach().detach()


def test_topk_masks_are_yielded_one_at_a_time():
    """Memory: the selection holds no earlier tensor's mask once its consumer dropped it (ParamMask.from_scores
    packs each as it comes), instead of one bool byte per score for all tensors at once."""
    import weakref

    from hfhooks.masks.topk import iter_topk_masks

    scores = {f"t{i}": torch.rand(5, 7) for i in range(3)}
    masks = iter_topk_masks(scores, 0.3)
    name, first = next(masks)
    gone = weakref.ref(first)
    del first
    assert name == "t0" and gone() is None  # the generator keeps no reference to it
    rest = dict(masks)
    assert list(rest) == ["t1", "t2"]


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_from_scores_packs_exactly_the_topk_selection(scope):
    """Ties (small integers), odd sizes, a 0-d and an empty tensor: the packed mask is topk_masks' selection."""
    g = torch.Generator().manual_seed(3)
    scores = {
        "a": torch.randint(0, 3, (5, 3), generator=g).float(),
        "b": torch.tensor(1.0),
        "c": torch.zeros(0),
        "d": torch.randint(0, 3, (13,), generator=g).float(),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ties decide much of it, on purpose
        expected = topk_masks(scores, 0.4, scope=scope)
        mask = ParamMask.from_scores(scores, 0.4, scope=scope)
    assert mask.names() == list(scores)
    assert all(torch.equal(mask[n], expected[n]) for n in scores)
    assert mask.counts()["a"][0] + mask.counts()["b"][0] + mask.counts()["d"][0] == sum(
        int(m.sum()) for m in expected.values()
    )


def test_resumed_routing_run_whose_labels_no_longer_arrive_is_refused(tmp_path):
    """Bug: on resume the callback restores the checkpoint's batch counters, and the "no routing label arrived"
    check read them, so a resumed run whose collator dropped the labels trained every step unrouted, silently."""
    import transformers as T
    from conftest import skip_unless_trainer_resumes

    from hfhooks import GradientRoutingCallback, TaggedCollator, TaggedDataset

    skip_unless_trainer_resumes()
    ids = random_input_ids(8, 6)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]
    tagged = TaggedDataset(
        data, tags={"routing": [i % 2 for i in range(8)]}, group_by="routing", batch_size=2
    )

    def train(dataset, collator, resume=None):
        args = T.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=4, use_cpu=True, report_to=[],
            logging_strategy="no", save_strategy="steps", save_steps=2, disable_tqdm=True,
        )  # fmt: skip
        trainer = T.Trainer(
            model=make_model("llama"),
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            callbacks=[GradientRoutingCallback(mlp_units=8, heads=1)],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(resume_from_checkpoint=resume)

    train(tagged, TaggedCollator())
    with pytest.raises(RuntimeError, match="No routing labels reached the model"):
        train(data, T.default_data_collator, resume=str(tmp_path / "checkpoint-2"))  # labels gone


def test_forwards_of_two_modes_before_one_backward_warn_at_param_level():
    """Parameter-level hooks route a backward by the last forward's mode: a backward through a forget and a
    retain forward routes the forget example's gradients as retain. Never silent: it warns (once)."""
    model, _, _, router = _routed_llama()
    with pytest.warns(
        UserWarning, match=r"several routing modes \(forget, retain\).*last forward's mode \(retain\)"
    ):
        (_micro_batch(model, FORGET, 1) + _micro_batch(model, RETAIN, 2)).backward()
    router.detach()


def test_one_backward_per_forward_does_not_warn():
    model, _, opt, router = _routed_llama()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for mode, seed in ((FORGET, 1), (RETAIN, 2), (UNLABELLED, 3)):
            _micro_batch(model, mode, seed).backward()
        with torch.no_grad():
            _micro_batch(model, FORGET, 4)  # not backpropagated: does not count for the next backward
        _micro_batch(model, RETAIN, 5).backward()
        opt.step()
    assert not [w for w in seen if "several routing modes" in str(w.message)]
    router.detach()
