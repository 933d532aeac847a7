"""Callback state across ``resume_from_checkpoint``, and callback metrics in ``report_to`` integrations."""

from __future__ import annotations

import warnings
from typing import ClassVar

import pytest
import torch
import transformers as T
from conftest import make_model, random_input_ids, skip_unless_trainer_resumes

from hfhooks import (
    GradientMaskCallback,
    GradientRoutingCallback,
    ParamMask,
    SaliencyUnlearningCallback,
    TaggedCollator,
    TaggedDataset,
    forget_retain_dataset,
)
from hfhooks.trainer.state import CallbackStateError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _lm_data(n: int = 16):
    ids = random_input_ids(n, 8)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def _bert_data(n: int = 16):
    ids = random_input_ids(n, 6)
    return [{"input_ids": ids[i], "labels": torch.tensor(i % 2)} for i in range(n)]


def _args(out, **kw) -> T.TrainingArguments:
    base = dict(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, weight_decay=0.1,
        use_cpu=True, report_to=[], logging_strategy="no", save_strategy="steps", save_steps=3,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    base.update(kw)
    return T.TrainingArguments(**base)


def _train(arch, out, dataset, callbacks, resume=None, model_seed=0, collator=None, eval_dataset=None, **kw):
    """Train a fresh tiny model (its init differs by ``model_seed``: a resumed run must get its weights from
    the checkpoint); return the final weights."""
    if resume:
        skip_unless_trainer_resumes()
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if arch == "bert" else {}
    model = make_model(arch, seed=model_seed, **overrides)
    trainer = T.Trainer(
        model=model,
        args=_args(out, **kw),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=collator or TaggedCollator(),
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _differing(a, b) -> int:
    return sum(int((a[n] != b[n]).sum()) for n in a)


# -- resume ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "objective"), [("llama", "npo"), ("bert", "random_labels")])
def test_resumed_salun_equals_uninterrupted(arch, objective, tmp_path):
    """Item 11: SalUn resumed from the middle checkpoint (a fresh model and Trainer) ends bit-identical to the
    uninterrupted run — the plain Trainer's own resume is bit-exact on CPU (checked first) — and no coordinate
    outside the θ₀ mask moved (the old code re-scored at the resumed weights: thousands moved)."""
    skip_unless_trainer_resumes()
    data = _lm_data() if arch == "llama" else _bert_data()
    forget, retain = data[:4], data[4:]
    ds = forget_retain_dataset(forget, retain)

    plain = _train(arch, tmp_path / "plain", ds, [])
    plain_resumed = _train(
        arch, tmp_path / "plain", ds, [], resume=str(tmp_path / "plain/checkpoint-3"), model_seed=5
    )
    assert _differing(plain, plain_resumed) == 0  # the baseline: the Trainer alone resumes bit-exactly

    def callback():
        return SaliencyUnlearningCallback(forget, objective=objective, ratio=0.3, progress=False)

    full_cb = callback()
    full = _train(arch, tmp_path / "a", ds, [full_cb])
    resumed = _train(
        arch, tmp_path / "a", ds, [callback()], resume=str(tmp_path / "a/checkpoint-3"), model_seed=5
    )
    assert _differing(full, resumed) == 0
    theta0 = dict(
        make_model(arch, **({"hidden_dropout_prob": 0.0} if arch == "bert" else {})).named_parameters()
    )
    mask = full_cb.mask
    outside = sum(int((resumed[n][~mask[n]] != theta0[n].detach()[~mask[n]]).sum()) for n in mask)
    assert outside == 0
    assert sum(int((resumed[n] != theta0[n].detach()).sum()) for n in mask) > 0  # it did train


def test_resume_true_finds_the_checkpoint_and_missing_state_raises(tmp_path):
    data = _lm_data()
    forget, retain = data[:4], data[4:]
    ds = forget_retain_dataset(forget, retain)
    # a checkpoint written without the callback: resuming with it must not silently re-score
    _train("llama", tmp_path, ds, [], max_steps=3)
    cb = SaliencyUnlearningCallback(forget, objective="graddiff", ratio=0.3, progress=False)
    with pytest.raises(CallbackStateError, match="does not exist"):
        _train("llama", tmp_path, ds, [cb], resume=True)
    # resume_from=False asks for the re-scoring by name
    cb = SaliencyUnlearningCallback(
        forget, objective="graddiff", ratio=0.3, progress=False, resume_from=False
    )
    _train("llama", tmp_path, ds, [cb], resume=True)
    assert cb.mask is not None


def test_resume_from_another_runs_checkpoint_is_refused(tmp_path):
    data = _lm_data()
    forget, retain = data[:4], data[4:]
    ds = forget_retain_dataset(forget, retain)
    cb = SaliencyUnlearningCallback(forget, objective="graddiff", ratio=0.3, progress=False)
    _train("llama", tmp_path / "a", ds, [cb])
    cb = SaliencyUnlearningCallback(
        forget, objective="graddiff", ratio=0.3, progress=False, resume_from=tmp_path / "a/checkpoint-6"
    )
    with pytest.raises(CallbackStateError, match="does not hold the state this run resumed from"):
        _train("llama", tmp_path / "b", ds, [cb], resume=str(tmp_path / "a/checkpoint-3"))


def test_gradient_mask_resume_checks_the_mask(tmp_path):
    model = make_model("llama")
    data = _lm_data()
    names = [n for n, _ in model.named_parameters() if "mlp" in n]
    mask = ParamMask.from_scores({n: torch.rand(model.get_parameter(n).shape) for n in names}, 0.5)
    other = ~mask
    collator = T.default_data_collator
    full = _train("llama", tmp_path, data, [GradientMaskCallback(mask)], collator=collator)
    assert (tmp_path / "checkpoint-3/hfhooks/GradientMaskCallback.mask.safetensors").is_file()
    resumed = _train(
        "llama",
        tmp_path,
        data,
        [GradientMaskCallback(mask)],
        resume=str(tmp_path / "checkpoint-3"),
        model_seed=5,
        collator=collator,
    )
    assert _differing(full, resumed) == 0
    with pytest.raises(CallbackStateError, match="differs from the one the checkpoint was trained with"):
        _train("llama", tmp_path, data, [GradientMaskCallback(other)], resume=True, collator=collator)


def test_routing_counters_and_dedicated_mask_survive_resume(tmp_path):
    data = _lm_data()
    labels = [i % 2 for i in range(len(data))]
    ds = TaggedDataset(data, tags={"routing": labels}, group_by="routing", batch_size=2)
    kw = dict(per_device_train_batch_size=1, max_steps=6)

    full_cb = GradientRoutingCallback(mlp_units=8, heads=1)
    full = _train("llama", tmp_path, ds, [full_cb], **kw)
    resumed_cb = GradientRoutingCallback(mlp_units=8, heads=1)
    resumed = _train(
        "llama", tmp_path, ds, [resumed_cb], resume=str(tmp_path / "checkpoint-3"), model_seed=5, **kw
    )
    assert _differing(full, resumed) == 0
    assert resumed_cb.router.counts == full_cb.router.counts  # counted from step 0, not from the resume
    assert resumed_cb.dedicated == full_cb.dedicated


# -- metrics in report_to integrations -------------------------------------------------------------------------


class Recorder(T.TrainerCallback):
    """A stand-in for TensorBoardCallback (registered as the "tensorboard" integration): it keeps a copy of
    what a reporter sees at its on_log — the moment TensorBoard or wandb write the step."""

    seen: ClassVar[list[dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        Recorder.seen.append(dict(logs))


@pytest.fixture
def recorder(monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "tensorboard", Recorder)
    Recorder.seen = []
    return Recorder


def test_routing_metrics_reach_the_reporting_integrations(recorder, tmp_path):
    """Item 15: routing/* metrics are in the logs the integrations see (the old code added them after)."""
    data = _lm_data()
    ds = TaggedDataset(
        data, tags={"routing": [i % 2 for i in range(len(data))]}, group_by="routing", batch_size=2
    )
    cb = GradientRoutingCallback(mlp_units=8, heads=1)
    _train(
        "llama", tmp_path, ds, [cb], per_device_train_batch_size=1, max_steps=4, save_strategy="no",
        report_to=["tensorboard"], logging_strategy="steps", logging_steps=2,
    )  # fmt: skip
    train_logs = [log for log in recorder.seen if "loss" in log]
    assert len(train_logs) == 2
    assert all("routing/forget_batches" in log and "routing/retain_batches" in log for log in train_logs)
    assert train_logs[-1]["routing/forget_batches"] + train_logs[-1]["routing/retain_batches"] == 4


def test_callback_handler_is_found_from_inside_an_event(tmp_path):
    """The one stack-walking helper: from inside any callback event it returns the Trainer's handler."""
    from hfhooks.trainer.reporting import callback_handler

    found = {}

    class Probe(T.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            found["handler"] = callback_handler()

    trainer = T.Trainer(
        model=make_model("llama"), args=_args(tmp_path, max_steps=1, save_strategy="no"),
        train_dataset=_lm_data(4), callbacks=[Probe()],
    )  # fmt: skip
    trainer.train()
    assert found["handler"] is trainer.callback_handler
    assert callback_handler() is None  # outside an event: nothing to find


def test_unlearning_metrics_are_reported_and_select_the_best_checkpoint(recorder, tmp_path):
    """Item 15: eval_unlearn/* reach the integrations at each Trainer evaluation and metric_for_best_model
    selects the checkpoint where they were best (the old code raised: the metric was not in the eval metrics)."""
    from hfhooks import UnlearningEvalCallback

    data = _bert_data(24)
    forget, retain, test = data[:6], data[6:18], data[18:]
    cb = UnlearningEvalCallback(forget, retain, test, every=1000, collate=T.default_data_collator)
    _train(
        "bert", tmp_path, data, [cb], collator=T.default_data_collator, max_steps=6, learning_rate=5e-2,
        eval_strategy="steps", eval_steps=2, save_steps=2, report_to=["tensorboard"],
        metric_for_best_model="unlearn/RA", greater_is_better=True, load_best_model_at_end=True, eval_dataset=test,
    )  # fmt: skip
    evals = [log for log in recorder.seen if "eval_runtime" in log]
    assert len(evals) == 3
    assert all(
        {"eval_unlearn/UA", "eval_unlearn/RA", "eval_unlearn/TA", "eval_unlearn/MIA"} <= set(e) for e in evals
    )
    state = T.TrainerState.load_from_json(str(tmp_path / "checkpoint-6" / "trainer_state.json"))
    values = [e["eval_unlearn/RA"] for e in evals]
    best = max(range(3), key=lambda i: (values[i], -i))  # the Trainer keeps the first of equal values
    assert state.best_metric == values[best]
    assert state.best_model_checkpoint.endswith(f"checkpoint-{2 * (best + 1)}")


# -- SalUn on LoRA, degenerate scores (item 13) ---------------------------------------------------------------


def test_topk_warns_on_all_zero_scores_and_deciding_ties():
    from hfhooks.masks.topk import DegenerateScoresWarning, topk_masks

    with pytest.warns(DegenerateScoresWarning, match="all zero"):
        topk_masks({"a": torch.rand(10), "b": torch.zeros(10)}, 0.5)
    with pytest.warns(DegenerateScoresWarning, match="tie order"):  # 9 of 10 picks among 50 equal scores
        topk_masks({"a": torch.cat([torch.tensor([5.0]), torch.ones(50)])}, 10 / 51)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateScoresWarning)
        topk_masks({"a": torch.randperm(100).float(), "b": torch.tensor([1.0, 1.0])}, 0.3)  # distinct: silent


def test_salun_on_fresh_lora_scores_base_units_and_freezes_the_others(tmp_path):
    """A fresh adapter's lora_A scores 0: the mask came from layer order, silently. Now the adapted base weights'
    output units are scored (checked against plain autograd), the top ratio keep trainable lora_B rows, and
    the effective weight W + s·B·A of every other unit is unchanged after training."""
    from conftest import lora

    from hfhooks.masks.lora import lora_delta_weights
    from hfhooks.masks.topk import DegenerateScoresWarning

    model = lora(make_model("llama"), ["q_proj", "v_proj", "down_proj"])
    data = _lm_data(12)
    forget, retain = data[:4], data[4:]
    # oracle: |Σ ∇W| of each adapted base weight over the forget set, summed per output row
    model.eval()
    bases = {n: p for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    for p in bases.values():
        p.requires_grad_(True)
    loss = sum(model(**T.default_data_collator(forget[i : i + 2]))["loss"] for i in (0, 2))
    grads = torch.autograd.grad(loss, list(bases.values()))
    for p in bases.values():
        p.requires_grad_(False)
    units = {n: g.abs().sum(1) for n, g in zip(bases, grads)}
    k = round(0.3 * sum(u.numel() for u in units.values()))
    threshold = torch.cat(list(units.values())).topk(k).values[-1]

    cb = SaliencyUnlearningCallback(forget, objective="graddiff", ratio=0.3, progress=False, batch_size=2)
    before = {n: d.clone() for n, (d, _) in lora_delta_weights(model).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateScoresWarning)
        T.Trainer(
            model=model, args=_args(tmp_path, max_steps=3, save_strategy="no"),
            train_dataset=forget_retain_dataset(forget, retain), data_collator=TaggedCollator(), callbacks=[cb],
        ).train()  # fmt: skip
    after = lora_delta_weights(model)
    moved_units = kept_units = 0
    for name, u in units.items():
        canon = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        kept = u >= threshold
        b_name = next(n for n in cb.mask if n.startswith(canon.rsplit(".", 1)[0] + ".lora_B"))
        assert torch.equal(cb.mask[b_name].all(dim=1), kept)  # lora_B rows trainable ⇔ top units
        delta = after[canon][0] - before[canon]
        assert not bool(delta[~kept].any())  # the other units' effective weights never moved
        moved_units += int(delta[kept].ne(0).any(dim=1).sum())
        kept_units += int(kept.sum())
    assert moved_units > 0 and kept_units == k


def test_attribution_alignment_resume_equals_uninterrupted(tmp_path):
    """AttributionAlignmentCallback's token-sampling generator (fraction < 1) continues across a resume."""
    from test_attribution import _bert, _data

    from hfhooks import AttributionAlignmentCallback

    skip_unless_trainer_resumes()
    ds = TaggedDataset(_data(16), tags=["rationale"])

    def run(resume=None, seed=0):
        torch.manual_seed(seed)
        model = _bert()
        cb = AttributionAlignmentCallback("grad_x_input", prior="rationale", weight=1.0, fraction=0.5)
        T.Trainer(
            model=model,
            args=_args(tmp_path),
            train_dataset=ds,
            data_collator=TaggedCollator(),
            callbacks=[cb],
        ).train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    full = run()
    assert _differing(full, run(str(tmp_path / "checkpoint-3"))) == 0
