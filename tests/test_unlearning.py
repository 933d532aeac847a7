"""SalUn and forgetting objectives: hand-checked losses, the reference mask rule, the freeze, Trainer scaling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import TRANSFORMERS_VERSION, make_model, random_input_ids
from torch import nn

from hfhooks import (
    LossHook,
    ParamMask,
    SaliencyUnlearningCallback,
    TaggedCollator,
    UnlearningObjective,
    average_gap,
    compute_saliency,
    forget_retain_dataset,
    mia_efficacy,
    relearn_attack,
    salun,
    unlearning_metrics,
)
from hfhooks.unlearning.objectives import objective_hook, reference_logprobs


class MLPClassifier(nn.Module):
    """A tiny classifier with the HF calling convention (dict in, dict with loss/logits out)."""

    def __init__(self, d: int = 6, c: int = 4, dropout: float = 0.5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, c))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def blobs(n: int = 64, d: int = 6, c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    centers = torch.randn(c, d, generator=g) * 3
    x = centers[y] + torch.randn(n, d, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def keep_x(items):
    return {"x": torch.stack([i["x"] for i in items]), "labels": torch.stack([i["labels"] for i in items])}


# -- objectives, by hand ---------------------------------------------------------------------------------


def test_random_labels_never_true_and_equal_cross_entropy_with_them():
    obj = UnlearningObjective("random_labels", retain_weight=0.5, seed=3)
    logits = torch.randn(200, 5)
    labels = torch.randint(0, 5, (200,))
    forget = torch.ones(200)
    loss = obj(logits, labels, forget)
    g = torch.Generator().manual_seed(3)  # the objective's generator: reproduce its draw
    wrong = (labels + torch.randint(1, 5, labels.shape, generator=g)) % 5
    assert bool((wrong != labels).all())
    torch.testing.assert_close(loss, F.cross_entropy(logits, wrong))


def test_graddiff_and_ga_by_hand():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 1])
    forget = torch.tensor([1, 0, 1, 0])
    ce = F.cross_entropy(logits, labels, reduction="none")
    expected = torch.where(forget.bool(), -ce, 0.7 * ce).mean()
    torch.testing.assert_close(
        UnlearningObjective("graddiff", retain_weight=0.7)(logits, labels, forget), expected
    )
    pure_ga = torch.where(forget.bool(), -ce, torch.zeros_like(ce)).mean()
    torch.testing.assert_close(UnlearningObjective("ga", retain_weight=0.0)(logits, labels, forget), pure_ga)


def test_npo_by_hand_on_token_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = -100
    ref = torch.tensor([-9.0, -4.0])
    obj = UnlearningObjective("npo", beta=0.1, retain_weight=1.0, reference=ref)
    loss = obj(logits, labels, torch.tensor([1, 1]), example_id=torch.tensor([0, 1]), causal=True)
    logp = torch.log_softmax(logits, -1)
    seq = []
    for b in range(2):
        s = sum(logp[b, t - 1, labels[b, t]] for t in range(1, 5) if labels[b, t] != -100)
        seq.append(s)
    seq = torch.stack(seq)
    n_tok = torch.tensor([4.0, 2.0])  # label tokens after the causal shift; the mean is token-weighted
    expected = (((2 / 0.1) * torch.log1p(torch.exp(0.1 * (seq - ref)))) * n_tok).sum() / n_tok.sum()
    torch.testing.assert_close(loss, expected)


def test_objective_argument_errors():
    with pytest.raises(ValueError, match="not one of"):
        UnlearningObjective("forget_harder")
    with pytest.raises(ValueError, match="beta"):
        UnlearningObjective("npo", beta=0)
    with pytest.raises(ValueError, match="classification"):
        UnlearningObjective("random_labels")(
            torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(2)
        )
    with pytest.raises(ValueError, match="reference"):
        UnlearningObjective("npo")(torch.randn(2, 3), torch.tensor([0, 1]), torch.ones(2))


# -- the SalUn mask --------------------------------------------------------------------------------------


def test_salun_mask_is_reference_algorithm():
    """|Σ_b ∇θ L_f(b)| at θ₀ in eval mode, one global threshold over all parameters."""
    torch.manual_seed(0)
    model = MLPClassifier(dropout=0.9)  # eval mode matters: with dropout active scores would be random
    data = blobs(24)
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=keep_x)
    model.eval()
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in loader:
        grads = torch.autograd.grad(-model(**batch)["loss"], list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            total[n] += g
    flat = torch.cat([t.abs().flatten() for t in total.values()])
    k = round(0.5 * flat.numel())
    oracle = torch.zeros(flat.numel(), dtype=torch.bool)
    oracle[torch.argsort(-flat, stable=True)[:k]] = True
    model.train()
    mask = ParamMask.from_scores(compute_saliency(model, loader, progress=False), 0.5)
    assert model.training  # left as found
    got = torch.cat([mask[n].flatten() for n in total])
    assert torch.equal(got, oracle)


def test_salun_plain_recipe_freezes_outside_mask_and_forgets():
    torch.manual_seed(0)
    model = MLPClassifier(dropout=0.0)
    data = blobs(120)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        batch = keep_x(data)
        opt.zero_grad()
        model(**batch)["loss"].backward()
        opt.step()
    forget, retain = data[:12], data[12:]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_f = model(**keep_x(forget))["loss"].item()
    mask = salun(model, forget, retain, ratio=0.5, epochs=15, batch_size=16, collate=keep_x, progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p[~mask[n]], before[n][~mask[n]]), n
    assert model(**keep_x(forget))["loss"].item() > loss_f  # random labels made the forget set less familiar


def test_callback_in_trainer_and_peft_is_not_a_silent_noop(tmp_path):
    peft = pytest.importorskip("peft")
    base = make_model("llama")
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    ids = random_input_ids(12, 8)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(12)]
    forget, retain = data[:4], data[4:]
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cb = SaliencyUnlearningCallback(
        forget, objective="graddiff", ratio=0.3, progress=False, save_mask=tmp_path / "m.safetensors"
    )
    args = T.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, weight_decay=0.1,
        use_cpu=True, report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    T.Trainer(
        model=model,
        args=args,
        train_dataset=forget_retain_dataset(forget, retain),
        data_collator=TaggedCollator(),
        callbacks=[cb],
    ).train()
    mask = ParamMask.load(tmp_path / "m.safetensors")
    assert all(".lora_" in n for n in mask)  # the mask is over the LoRA parameters
    # unit saliency (item 13): 30 % of the adapted weights' output units keep trainable lora_B rows
    b_rows = [mask[n].all(dim=1) for n in mask if ".lora_B" in n]
    assert abs(float(torch.cat(b_rows).float().mean()) - 0.3) < 0.02
    changed = 0
    for n, p in model.named_parameters():
        if n in lora_before:
            canon = n.replace("base_model.model.", "", 1)
            assert torch.equal(p[~mask[canon]], lora_before[n][~mask[canon]])
            changed += int((p[mask[canon]] != lora_before[n][mask[canon]]).sum())
        else:
            assert torch.equal(p, base_before[n])
    assert changed > 0
    assert cb.freezer is None and cb.hook is None  # hooks removed


# -- loss scaling inside the Trainer -------------------------------------------------------------------------


def _trainer_grads(model, dataset, hook_fn, tmp_path, batch, accumulation):
    grads = {}

    class Grab(T.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
            control.should_training_stop = True

    args = T.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=0.0, max_grad_norm=0.0, use_cpu=True, report_to=[], logging_strategy="no",
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = T.Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=TaggedCollator(), callbacks=[Grab()]
    )
    with LossHook(model, hook_fn, tags=["unlearn", "example_id"]):
        trainer.train()
    return grads


OLD_ACCUMULATION = pytest.mark.skipif(
    TRANSFORMERS_VERSION < (4, 48),
    reason="transformers < 4.48 never divides the accumulated loss of a model whose forward takes no **kwargs "
    "(BERT there) by gradient_accumulation_steps: the Trainer itself, with or without hfhooks, accumulates k× "
    "the one-big-batch gradient (fixed in 4.48: num_items_in_batch=None for such models).",
)


@pytest.mark.parametrize("arch", ["llama", pytest.param("bert", marks=OLD_ACCUMULATION)])
def test_replaced_loss_is_scaled_like_one_big_batch(arch, tmp_path):
    """Accumulating 2 × 4 examples gives the gradient of one batch of 8 (num_items_in_batch path for LMs)."""
    model = make_model(
        arch, **({"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if arch == "bert" else {})
    )
    if arch == "bert":
        ids = random_input_ids(8, 6)
        data = [{"input_ids": ids[i], "labels": torch.tensor(i % 2)} for i in range(8)]
    else:
        ids = random_input_ids(8, 6)
        lab = ids.clone()
        lab[::3, :2] = -100  # uneven token counts: a per-micro-batch mean would be wrong
        data = [{"input_ids": ids[i], "labels": lab[i]} for i in range(8)]
    ds = forget_retain_dataset(data[:3], data[3:])
    obj = UnlearningObjective("graddiff", retain_weight=1.0)
    hook = objective_hook(model, obj)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    g_big = _trainer_grads(m1, ds, hook.fn, tmp_path / "a", 8, 1)
    g_acc = _trainer_grads(m2, ds, hook.fn, tmp_path / "b", 4, 2)
    for n in g_big:
        torch.testing.assert_close(g_acc[n], g_big[n], rtol=1e-4, atol=1e-6)


# -- metrics, by hand ------------------------------------------------------------------------------------


class Fixed(nn.Module):
    """Returns preset logits per example id (x holds the id)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(logits.clone())

    def forward(self, x, labels=None):
        return {"logits": self.table[x.long().squeeze(-1)]}


def _ids(n, offset, labels):
    return [{"x": torch.tensor([offset + i]), "labels": torch.tensor(labels[i])} for i in range(n)]


def test_metrics_match_hand_computation():
    # 10 examples: ids 0-3 forget, 4-7 retain, 8-9 test; correct where logits favour the label
    labels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    logits = torch.zeros(10, 2)
    correct = [True, False, True, True, True, True, True, False, True, False]
    for i, (y, ok) in enumerate(zip(labels, correct)):
        logits[i, y if ok else 1 - y] = 3.0
    model = Fixed(logits)
    collate = TaggedCollator().base
    m = unlearning_metrics(
        model, _ids(4, 0, labels[0:4]), _ids(4, 4, labels[4:8]), _ids(2, 8, labels[8:10]), collate=collate
    )
    assert m["UA"] == pytest.approx(100 - 75.0)
    assert m["RA"] == pytest.approx(75.0)
    assert m["TA"] == pytest.approx(50.0)
    # MIA by hand: the members are 2 of the retain confidences (seed 0 picks two correct ones, softmax 0.953),
    # the non-members the test set's (0.953, 0.047). The SVC calls low confidence "non-member" and 0.953 (two
    # members against one non-member there) "member"; of the forget set's (0.953, 0.047, 0.953, 0.953) one
    # is predicted non-member: 25 %. Counting members instead (75) or using another class's confidence differs.
    assert m["MIA"] == pytest.approx(25.0)
    assert average_gap(
        {"UA": 1, "RA": 2, "TA": 3, "MIA": 4}, {"UA": 2, "RA": 2, "TA": 1, "MIA": 8}
    ) == pytest.approx(7 / 4)
    with pytest.raises(KeyError, match="MIA"):
        average_gap({"UA": 1, "RA": 1, "TA": 1}, {"UA": 1, "RA": 1, "TA": 1})


def test_mia_efficacy_separable_case():
    members = torch.full((50,), 0.99)
    nonmembers = torch.full((50,), 0.30)
    assert mia_efficacy(members, nonmembers, torch.full((10,), 0.31)) == pytest.approx(100.0)
    assert mia_efficacy(members, nonmembers, torch.full((10,), 0.98)) == pytest.approx(0.0)


def test_relearn_attack_counts_steps_and_leaves_model_untouched():
    torch.manual_seed(0)
    model = MLPClassifier(dropout=0.0)
    data = blobs(32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def acc(m):
        m.eval()
        with torch.no_grad():
            b = keep_x(data)
            return float((m(**b)["logits"].argmax(-1) == b["labels"]).float().mean())

    res = relearn_attack(
        model, data, acc, threshold=0.9, steps=300, eval_every=5, lr=1e-2, batch_size=8, collate=keep_x
    )
    assert res["steps_to_recover"] is not None and res["steps_to_recover"] % 5 == 0
    assert res["curve"][-1][1] >= 0.9
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    never = relearn_attack(
        model, data, acc, threshold=2.0, steps=10, eval_every=5, batch_size=8, collate=keep_x
    )
    assert never["steps_to_recover"] is None


def test_reference_logprobs_match_model_at_theta0():
    model = make_model("llama")
    ids = random_input_ids(5, 6)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(5)]
    ref = reference_logprobs(model, data, batch_size=2, progress=False)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    # mean token NLL from the model equals -ref / tokens on average
    torch.testing.assert_close(-ref.sum() / (5 * 5), out.loss, rtol=1e-4, atol=1e-5)


def test_diverged_model_gives_a_clear_error_not_an_sklearn_crash():
    class NaNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x, labels=None):
            return {"logits": torch.full((x.shape[0], 3), float("nan")) + self.w}

    data = [{"x": torch.tensor([float(i)]), "labels": torch.tensor(i % 3)} for i in range(6)]
    with pytest.raises(ValueError, match="diverged"):
        unlearning_metrics(NaNModel(), data, data, data, collate=TaggedCollator().base)


def test_npo_reference_is_never_reused_across_runs():
    """A reused objective must not keep the first model's reference log-probs (stale-reference bug)."""
    obj = UnlearningObjective("npo", retain_weight=1.0)
    data = blobs(24)
    m1, m2 = MLPClassifier(dropout=0.0), MLPClassifier(dropout=0.0)
    salun(m1, data[:6], data[6:], objective=obj, epochs=1, batch_size=8, collate=keep_x, progress=False)
    assert obj.reference is None  # computed for that run only
    ref2 = reference_logprobs(m2, data[:6], keep_x, progress=False)
    seen = {}
    orig = reference_logprobs

    def spy(model, forget, *a, **k):
        seen["ref"] = orig(model, forget, *a, **k)
        return seen["ref"]

    import hfhooks.unlearning.objectives as U

    U.reference_logprobs, saved = spy, U.reference_logprobs
    try:
        salun(m2, data[:6], data[6:], objective=obj, epochs=1, batch_size=8, collate=keep_x, progress=False)
    finally:
        U.reference_logprobs = saved
    torch.testing.assert_close(seen["ref"], ref2)


def test_reference_logprobs_accept_plain_dict_outputs():
    ref = reference_logprobs(MLPClassifier(dropout=0.0), blobs(5), keep_x, progress=False)
    assert ref.shape == (5,) and bool((ref <= 0).all())
