"""Attribution alignment: hand-checked attributions, distances, gradients that really flow, Trainer scaling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import TRANSFORMERS_VERSION
from torch import nn

from hfhooks import (
    AttributionAlignment,
    AttributionAlignmentCallback,
    TaggedCollator,
    TaggedDataset,
    attribute,
)
from hfhooks.attribution import (
    ColumnPrior,
    ContrastivePrior,
    FunctionPrior,
    HybridPrior,
    compute_attribution,
    deletion_insertion,
    distance,
    faithfulness,
    normalise,
    pool_words,
)


class BagModel(nn.Module):
    """logits = W · mean_t(e_t) + b: every attribution has a closed form."""

    def __init__(self, vocab: int = 20, dim: int = 5, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, classes)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None, **kw):
        e = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        logits = self.out(e.mean(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def bag_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 20, (3, 6), generator=g), "labels": torch.tensor([0, 2, 1])}


def test_grad_x_input_and_integrated_gradients_by_hand():
    torch.manual_seed(0)
    model = BagModel()
    batch = bag_batch()
    e = model.emb(batch["input_ids"]).detach()
    w_y = model.out.weight.detach()[batch["labels"]]  # [B, D]
    expected = (e * w_y[:, None, :]).sum(-1) / e.shape[1]  # ∂logit_y/∂e_t = W_y / T
    torch.testing.assert_close(attribute(model, batch, "grad_x_input"), expected)
    torch.testing.assert_close(attribute(model, batch, "grad_x_input_first_order"), expected)
    # the model is linear in e: integrated gradients from a zero baseline equal grad × input exactly
    torch.testing.assert_close(
        attribute(model, batch, "integrated_gradients", steps=3), expected, rtol=1e-5, atol=1e-6
    )


def test_input_gradient_by_hand():
    torch.manual_seed(0)
    model = BagModel()
    batch = bag_batch()
    with torch.no_grad():
        p = model(**batch)["logits"].softmax(-1)  # ∂Σ_k log p_k/∂z_j = 1 − C·p_j
    coef = 1 - p.shape[-1] * p  # [B, C]
    g_tok = (coef @ model.out.weight.detach()) / batch["input_ids"].shape[1]  # same for every token
    expected = g_tok.pow(2).sum(-1)[:, None].expand(-1, 6)  # squared gradient norm per token
    torch.testing.assert_close(attribute(model, batch, "input_gradient"), expected)


def test_attention_attribution_is_last_layer_cls_row():
    cfg = T.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        attn_implementation="eager",
    )
    model = T.BertForSequenceClassification(cfg).eval()
    batch = {"input_ids": torch.tensor([[2, 5, 7, 9, 3]]), "labels": torch.tensor([1])}
    att = model(input_ids=batch["input_ids"], output_attentions=True).attentions[-1].mean(1)[:, 0]
    torch.testing.assert_close(attribute(model, batch, "attention"), att)
    sdpa = T.BertForSequenceClassification(T.BertConfig(**{**cfg.to_dict(), "attn_implementation": "sdpa"}))
    if TRANSFORMERS_VERSION < (5,):  # BERT's SDPA attention falls back to eager to return attention weights
        att = sdpa.eval()(input_ids=batch["input_ids"], output_attentions=True).attentions[-1].mean(1)[:, 0]
        torch.testing.assert_close(attribute(sdpa, batch, "attention"), att)
        return
    with pytest.raises(ValueError, match="eager"):
        attribute(sdpa.eval(), batch, "attention")


def test_eval_mode_sdpa_double_backprop_works():
    """SDPA's fused CPU kernel has no double backward; the math kernel is forced for exact methods."""
    cfg = T.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        attn_implementation="sdpa",
    )
    model = T.BertForSequenceClassification(cfg).eval()
    attr = attribute(
        model,
        {"input_ids": torch.tensor([[2, 5, 7, 3]]), "labels": torch.tensor([0])},
        "grad_x_input",
        differentiable=True,
    )
    attr.pow(2).sum().backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_first_order_gradient_flows_only_through_the_site():
    torch.manual_seed(0)
    model = BagModel()
    batch = bag_batch()
    out = model(**batch)
    site = None

    # first order: d attr / d W_out is zero (gradient held constant), exact: it is not
    def grads(method):
        nonlocal site
        model.zero_grad()
        e = model.emb(batch["input_ids"])
        logits = model(inputs_embeds=e)["logits"]
        attr = compute_attribution(method, logits, e, batch["labels"], create_graph=True)
        attr.sum().backward()
        return model.out.weight.grad.clone() if model.out.weight.grad is not None else torch.zeros(1)

    assert bool(grads("grad_x_input").abs().sum() > 0)
    assert bool(grads("grad_x_input_first_order").abs().sum() == 0)
    del out


def test_distances_by_hand():
    attr = torch.tensor([[1.0, -3.0, 0.0, 5.0]])
    prior = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False]])
    q = torch.tensor([[0.25, 0.75, 0.0, 0.0]])  # |attr| over valid, normalised
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(normalise(attr, valid), q)
    kl = (0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))).reshape(())
    torch.testing.assert_close(distance("kl", attr, prior, valid), kl)
    torch.testing.assert_close(
        distance("cosine", attr, prior, valid), 1 - F.cosine_similarity(q, p).squeeze()
    )
    torch.testing.assert_close(distance("mse", attr, prior, valid), ((q - p).pow(2).sum() * 3).reshape(()))
    torch.testing.assert_close(distance("rrr", attr.abs(), prior, valid), torch.tensor(4.0))
    bce = distance("bce", attr, prior, valid)
    a = torch.tensor([0.2, 0.6, 0.0]).clamp(1e-8, 1 - 1e-8)
    torch.testing.assert_close(bce, F.binary_cross_entropy(a, torch.tensor([1.0, 1.0, 0.0])))
    with pytest.raises(ValueError, match="not one of"):
        distance("l1", attr, prior)
    with pytest.raises(ValueError, match="does not match"):
        distance("kl", attr, torch.ones(1, 3))


def test_priors_pooling_and_hybrid():
    attr = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    words = torch.tensor([[-1, 0, 0, 1]])
    pooled = pool_words(attr, words)
    torch.testing.assert_close(pooled, torch.tensor([[5.0, 4.0]]))
    pooled.sum().backward()
    assert attr.grad.tolist() == [[0.0, 1.0, 1.0, 1.0]]

    from types import SimpleNamespace

    Ctx = SimpleNamespace(
        tags={"a": torch.tensor([[1.0, 0.0, 0.0]]), "b": torch.tensor([[0.0, 0.0, 2.0]])},
        valid=None,
        site=torch.zeros(1),
    )

    mean = HybridPrior([ColumnPrior("a"), ColumnPrior("b")])(Ctx)
    torch.testing.assert_close(mean, torch.tensor([[0.5, 0.0, 0.5]]))
    mx = HybridPrior([ColumnPrior("a"), FunctionPrior(lambda c: c.tags["b"], tags=["b"])], reduce="max")
    assert mx.tags == ("a", "b")
    torch.testing.assert_close(mx(Ctx), torch.tensor([[1.0, 0.0, 1.0]]))
    Ctx.tags = {}
    with pytest.raises(RuntimeError, match="TaggedDataset"):
        ColumnPrior("a")(Ctx)


def _bert(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)  # fmt: skip
    cfg.update(kw)
    return T.BertForSequenceClassification(T.BertConfig(**cfg))


def _data(n: int = 8, length: int = 7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (n, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    rationale = torch.zeros(n, length)
    rationale[:, 2:4] = 1.0
    lengths = [length - (i % 3) for i in range(n)]  # uneven padding
    rows = []
    for i in range(n):
        mask = torch.zeros(length, dtype=torch.long)
        mask[: lengths[i]] = 1
        rows.append(
            {
                "input_ids": ids[i] * mask,
                "attention_mask": mask,
                "labels": torch.tensor(i % 2),
                "rationale": rationale[i],
            }
        )
    return rows


def test_alignment_term_moves_attributions_toward_the_prior():
    model = _bert()
    data = _data()
    batch = TaggedCollator()([TaggedDataset(data, tags=["rationale"])[i] for i in range(len(data))])
    align = AttributionAlignment(
        model, "grad_x_input", prior="rationale", special_token_ids=[0, 2, 3], weight=1.0
    )
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    kls = []
    with align:
        model.train()
        for _ in range(25):
            out = model(**batch)
            opt.zero_grad()
            (out["loss"]).backward()
            opt.step()
            kls.append(align.pop_stats()["align/term"])
    assert kls[-1] < 0.7 * kls[0], kls  # the penalty's gradient pulls attribution onto the rationale
    assert align.num_hooks == 0


def test_term_really_changes_the_gradients():
    model = _bert()
    batch = TaggedCollator()([TaggedDataset(_data(), tags=["rationale"])[i] for i in range(4)])
    model.train()
    plain = copy.deepcopy(model)
    plain(**{k: v for k, v in batch.items() if k != "rationale"})["loss"].backward()
    with AttributionAlignment(model, "grad_x_input_first_order", prior="rationale", weight=10.0):
        model(**batch)["loss"].backward()
    diff = sum(
        float((p.grad - q.grad).abs().sum())
        for p, q in zip(model.parameters(), plain.parameters())
        if p.grad is not None
    )
    assert diff > 1e-6


def test_silent_noop_is_detected():
    model = _bert()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "classifier.bias")  # the bias cannot change an attribution of the logit
    batch = TaggedCollator()([TaggedDataset(_data(), tags=["rationale"])[i] for i in range(4)])
    model.train()
    with (
        AttributionAlignment(model, "grad_x_input", prior="rationale"),
        pytest.raises(RuntimeError, match="silent no-op"),
    ):
        model(**batch)


def _trainer_grads(model, data, callbacks, tmp_path, batch, accumulation, tags=("rationale",)):
    grads = {}

    class Grab(T.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    args = T.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=0.0, max_grad_norm=0.0, use_cpu=True, report_to=[], logging_strategy="no",
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    T.Trainer(model=model, args=args, train_dataset=TaggedDataset(data, tags=list(tags)), data_collator=TaggedCollator(),
              callbacks=[Grab(), *callbacks]).train()  # fmt: skip
    return grads


def _untagged(data):
    """The examples without their ``rationale`` column (no hook pops it when no alignment runs; models whose
    forward takes no **kwargs, BERT before transformers 5, refuse unknown inputs)."""
    return [{k: v for k, v in row.items() if k != "rationale"} for row in data]


@pytest.mark.skipif(
    TRANSFORMERS_VERSION < (4, 48),
    reason="transformers < 4.48 never divides the accumulated loss of a model whose forward takes no **kwargs "
    "(BERT there) by gradient_accumulation_steps: the Trainer itself accumulates k× the one-big-batch gradient.",
)
def test_accumulation_scaling_matches_one_batch_and_hooks_are_removed(tmp_path):
    """The term's gradient (g(λ) − g(0)) from 2 × 4 accumulated examples equals that of one batch of 8.

    (The task loss alone is compared out: transformers 5.23 skips its division by the accumulation steps for
    models taking **kwargs, yet BertForSequenceClassification's loss ignores num_items_in_batch — an upstream
    mismatch the difference cancels.)"""
    data = _data(8)

    def term_grads(batch, accumulation, sub):
        with_term, without = _bert(), _bert()
        cb = AttributionAlignmentCallback(
            "grad_x_input", prior="rationale", weight=2.0, special_token_ids=[0, 2, 3]
        )
        g1 = _trainer_grads(with_term, data, [cb], tmp_path / f"{sub}1", batch, accumulation)
        g0 = _trainer_grads(without, _untagged(data), [], tmp_path / f"{sub}0", batch, accumulation, tags=())
        assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in with_term.modules())
        return {n: g1[n] - g0[n] for n in g1}

    big, acc = term_grads(8, 1, "big"), term_grads(4, 2, "acc")
    assert sum(float(v.abs().sum()) for v in big.values()) > 0
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-4, atol=1e-5)


def test_peft_model_with_frozen_embeddings(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _bert(), peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    plain = copy.deepcopy(model)
    cb = AttributionAlignmentCallback("grad_x_input", prior="rationale", weight=1.0)
    grads = _trainer_grads(model, _data(8), [cb], tmp_path / "a", 4, 1)
    zero = AttributionAlignmentCallback("grad_x_input", prior="rationale", weight=0.0)
    base = _trainer_grads(plain, _data(8), [zero], tmp_path / "b", 4, 1)
    # Gradients reach exactly the trainable parameters (LoRA + the classifier copy), never a frozen base weight
    assert set(grads) == trainable and any(".lora_" in n for n in grads)
    # ... and the penalty itself reaches the LoRA weights through the frozen embeddings (λ=1 differs from λ=0)
    lora = [n for n in grads if ".lora_" in n]
    assert any(not torch.allclose(grads[n], base[n]) for n in lora)


def test_contrastive_prior_runs_in_training(tmp_path):
    teacher = _bert()
    torch.manual_seed(1)
    with torch.no_grad():  # a teacher that differs from the student, so the prior pulls somewhere
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn_like(p))
    cb = AttributionAlignmentCallback(
        "grad_x_input_first_order", prior=ContrastivePrior(teacher=teacher), distance="cosine"
    )
    model = _bert()
    plain = copy.deepcopy(model)
    grads = _trainer_grads(model, _untagged(_data(8)), [cb], tmp_path / "a", 4, 1, tags=())
    base = _trainer_grads(plain, _untagged(_data(8)), [], tmp_path / "b", 4, 1, tags=())
    # Every parameter gets a finite gradient and the teacher's prior moves some of them away from the plain loss's
    assert set(grads) == set(base) and all(bool(torch.isfinite(g).all()) for g in grads.values())
    assert any(not torch.allclose(grads[n], base[n]) for n in grads)


def test_reentrant_checkpointing_refused(tmp_path):
    model = _bert()
    cb = AttributionAlignmentCallback("grad_x_input", prior="rationale")

    class Args:
        deepspeed = None
        fsdp = ""
        gradient_checkpointing = True
        gradient_checkpointing_kwargs = None

    with pytest.raises(RuntimeError, match="use_reentrant"):
        cb.on_train_begin(Args(), None, None, model=model)


def test_faithfulness_on_a_model_that_reads_one_token():
    class OneToken(nn.Module):
        """Predicts class 1 iff token 7 is present."""

        def forward(self, input_ids, attention_mask=None, labels=None):
            has = (input_ids == 7).any(-1).float()
            return {"logits": torch.stack([-4 * has, 4 * has], -1)}

    ids = torch.tensor([[2, 5, 7, 9, 11, 3]] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([1, 1])}
    right = (ids == 7).float()  # attribution on the token that matters
    wrong = (ids == 9).float()
    f_right = faithfulness(OneToken(), batch, right, replace_id=0, special_ids=[2, 3])
    f_wrong = faithfulness(OneToken(), batch, wrong, replace_id=0, special_ids=[2, 3])
    assert f_right["comprehensiveness"] > f_wrong["comprehensiveness"]
    assert f_right["sufficiency"] < f_wrong["sufficiency"]
    curves = deletion_insertion(OneToken(), batch, right, replace_id=0, special_ids=[2, 3])
    assert curves["deletion_auc"] < curves["insertion_auc"]
    assert len(curves["deletion"]) == 11


def test_tagged_collator_pads_per_token_tags_like_input_ids():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    texts, rationales = ["a b a", "b", "a a a a b"], [[1, 0, 1], [1], [0, 0, 1, 1, 0]]
    examples = [dict(fast(t), labels=i % 2) for i, t in enumerate(texts)]
    data = TaggedDataset(
        examples, tags={"rationale": rationales, "word_ids": [list(range(len(r))) for r in rationales]}
    )
    for side, multiple in (("right", None), ("left", 8)):
        fast.padding_side = side
        collate = TaggedCollator(
            DataCollatorWithPadding(fast, pad_to_multiple_of=multiple),
            pad_tags={"word_ids": -1},
            padding_side=side,
        )
        batch = collate([data[i] for i in range(3)])
        width = batch["input_ids"].shape[1]
        assert batch["rationale"].shape == batch["word_ids"].shape == (3, width)
        real = batch["attention_mask"].bool()
        for i, r in enumerate(rationales):  # each tag sits exactly on its example's real tokens
            assert batch["rationale"][i][real[i]].tolist() == r
            assert batch["word_ids"][i][real[i]].tolist() == list(range(len(r)))
        assert bool((batch["rationale"][~real] == 0).all()) and bool((batch["word_ids"][~real] == -1).all())
    short = TaggedDataset(
        [examples[1], examples[1]], tags={"rationale": [[1, 1, 1], [1]]}
    )  # "b" is one token
    with pytest.raises(ValueError, match="longer than input_ids"):
        TaggedCollator(DataCollatorWithPadding(fast))([short[0], short[1]])


def test_a_tokenizer_gives_its_special_ids():
    class Tok:
        all_special_ids = (101, 102, 0)

    align = AttributionAlignment(_bert(), "grad_x_input", prior="rationale", special_token_ids=Tok())
    assert sorted(align.special_ids.tolist()) == [0, 101, 102]


def test_first_order_reusing_the_training_backward_gives_the_same_gradients(tmp_path):
    """reuse_backward=True turns ∂loss/∂e into ∂s/∂e instead of running an extra backward: the parameters'
    gradients must equal the extra-backward path's, under accumulation (the Trainer's loss scaling) too."""
    data = _data(8)
    opts = dict(prior="rationale", score="logprob", weight=3.0, special_token_ids=[0, 2, 3])

    def grads(reuse: bool, sub: str):
        cb = AttributionAlignmentCallback("grad_x_input_first_order", reuse_backward=reuse, **opts)
        model = _bert()
        g = _trainer_grads(model, data, [cb], tmp_path / sub, 4, 2)
        return g, cb

    slow, _ = grads(False, "slow")
    fast, cb = grads(True, "fast")
    assert cb.alignment.num_hooks == 0 and cb.alignment.reused == 1  # micro-batch 2 took the fast path
    for n in slow:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-6)
    emb = "bert.embeddings.word_embeddings.weight"
    plain = _trainer_grads(_bert(), _untagged(data), [], tmp_path / "plain", 4, 2, tags=())
    assert not torch.allclose(fast[emb], plain[emb])  # the term really reached the embeddings


def test_first_order_reuse_in_a_plain_loop_with_a_scaled_loss_and_its_refusals():
    data = _data(8)
    batch = TaggedCollator()([TaggedDataset(data, tags=["rationale"])[i] for i in range(8)])
    opts = dict(prior="rationale", score="logprob", weight=2.0, special_token_ids=[0, 2, 3])
    results = {}
    for reuse in (False, True):
        model = _bert()
        model.train()
        with AttributionAlignment(model, "grad_x_input_first_order", reuse_backward=reuse, **opts) as align:
            for _ in range(3):  # step 1: extra backward (checks); step 2: reuse + self-check; step 3: reuse
                model.zero_grad()
                (0.25 * model(**batch)["loss"]).backward()  # a scaled root: c = 0.25
        results[reuse] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert align.num_hooks == 0 and align.reused == (2 if reuse else 0)
    for n in results[False]:
        torch.testing.assert_close(results[True][n], results[False][n], rtol=1e-4, atol=1e-6)

    model = _bert()
    model.train()
    with AttributionAlignment(model, "grad_x_input_first_order", reuse_backward=True, **opts):
        model(**batch)["loss"].backward()  # first step: the extra backward
        out = model(**batch)
        with pytest.raises(RuntimeError, match="not the model loss's alone"):
            (out["loss"] + out["logits"].pow(2).mean()).backward()  # another term depends on the embeddings
    with pytest.raises(ValueError, match="score='logprob'"):
        AttributionAlignment(
            _bert(), "grad_x_input_first_order", reuse_backward=True, score="logit", prior="rationale"
        )

    # the default ("auto") for first order: logprob, reuse; on a failed check it warns and falls back, exactly
    model = _bert()
    model.train()
    auto_opts = {k: v for k, v in opts.items() if k != "score"}
    with AttributionAlignment(model, "grad_x_input_first_order", **auto_opts) as align:
        assert align.score == "logprob" and align.reuse_backward
        model(**batch)["loss"].backward()
        out = model(**batch)
        with pytest.warns(UserWarning, match="extra backward from now on"):
            (out["loss"] + out["logits"].pow(2).mean()).backward()
        assert not align.reuse_backward and align.reused == 1
    assert AttributionAlignment(_bert(), "grad_x_input", prior="rationale").score == "logit"


def test_a_model_compiled_with_an_aot_backend_gets_a_clear_error():
    data = _data(4)
    batch = TaggedCollator()([TaggedDataset(data, tags=["rationale"])[i] for i in range(4)])
    model = _bert()
    model.train()
    compiled = torch.compile(model, backend="aot_eager")
    align = AttributionAlignment(compiled, "grad_x_input", prior="rationale", special_token_ids=[0, 2, 3])
    with align, pytest.raises(RuntimeError, match="backend='eager'"):
        compiled(**batch)


def test_first_order_reuse_frees_each_steps_graph():
    """The backward hooks hold no reference back into the graph (a cycle through autograd nodes would leak
    every step's outputs and activations)."""
    import gc
    import weakref

    data = _data(8)
    batch = TaggedCollator()([TaggedDataset(data, tags=["rationale"])[i] for i in range(8)])
    model = _bert()
    model.train()
    alive = []
    with AttributionAlignment(
        model, "grad_x_input_first_order", prior="rationale", special_token_ids=[0, 2, 3]
    ) as al:
        for _ in range(4):
            out = model(**batch)
            out["loss"].backward()
            alive.append(weakref.ref(out["logits"]))
            del out
        assert al.reused >= 2
    gc.collect()
    assert sum(r() is not None for r in alive) == 0


def test_tagged_collator_follows_the_tokenizer_and_pads_equal_length_per_token_tags():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.padding_side = "left"
    data = TaggedDataset(
        [dict(fast(t), labels=0) for t in ["a b a", "b"]], tags={"rationale": [[1, 0, 1], [True]]}
    )
    batch = TaggedCollator(DataCollatorWithPadding(fast))([data[0], data[1]])  # no padding_side given
    assert batch["rationale"][1].tolist() == [0, 0, 1] and batch["input_ids"][1].tolist() == [0, 0, 3]
    fast.padding_side = "right"
    same = TaggedDataset(
        [dict(fast(t), labels=0) for t in ["a b a", "b b a"]], tags={"m": [[True, False, True]] * 2}
    )
    batch = TaggedCollator(DataCollatorWithPadding(fast, pad_to_multiple_of=8))([same[0], same[1]])
    assert batch["input_ids"].shape == batch["m"].shape == (2, 8) and batch["m"].dtype == torch.bool
