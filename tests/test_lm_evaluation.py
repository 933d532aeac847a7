"""Model-driven LM unlearning evaluation (hfhooks.unlearning.lm_evaluation) and LMUnlearningEvalCallback on
tiny causal LMs with a word-level tokenizer built in memory (no download)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

from hfhooks.unlearning import lm_evaluation as E
from hfhooks.unlearning import lm_metrics as M
from tests.conftest import tiny_gpt2, tiny_llama

WORDS = [
    "who",
    "wrote",
    "the",
    "book",
    "alice",
    "bob",
    "carol",
    "a",
    "novel",
    "about",
    "sea",
    "city",
    "what",
    "is",
    "capital",
    "of",
    "france",
    "paris",
    "rome",
    "london",
    "where",
    "did",
    "live",
    "in",
    "poem",
    "on",
    "cat",
    "sat",
    "mat",
    "dog",
    "ran",
    "park",
]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": 0, "<unk>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= 64  # the tiny models' vocabulary
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )


FORGET = [
    {
        "question": "who wrote the book",
        "answer": "alice wrote a novel about sea",
        "paraphrased_answer": "a novel about sea by alice",
        "perturbed_answers": ["bob wrote a poem", "carol wrote a novel about city"],
    },
    {
        "question": "where did alice live",
        "answer": "alice did live in paris",
        "paraphrased_answer": "in paris",
        "perturbed_answers": ["in rome", "in london city"],
    },
    {
        "question": "what is the capital of france",
        "answer": "paris",
        "paraphrased_answer": "the capital is paris",
        "perturbed_answers": ["rome", "the capital is london"],
    },
]
RETAIN = [
    {
        "question": "where did the cat sit",
        "answer": "the cat sat on the mat",
        "paraphrased_answer": "on the mat",
        "perturbed_answers": ["in the park", "on the sea"],
    },
    {
        "question": "where did the dog run",
        "answer": "the dog ran in the park",
        "paraphrased_answer": "in the park",
        "perturbed_answers": ["on the mat", "in rome"],
    },
]
HOLDOUT = [
    {"question": "who wrote the poem", "answer": "carol wrote a poem about the city"},
    {"question": "where did bob live", "answer": "bob did live in rome"},
    {"question": "what is the capital of the sea", "answer": "the sea city"},
]


def manual_answer_logprobs(model, tok, question: str, answer: str) -> torch.Tensor:
    p, a = tok(question)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return torch.stack([logp[len(p) + j - 1, a[j]] for j in range(len(a))])


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_answer_tokens_equal_a_manual_forward_and_gather(factory):
    torch.manual_seed(0)
    model, tok = factory(), word_tokenizer()
    model.train()  # evaluation must switch to eval mode and restore the flag
    qs, ans = [it["question"] for it in FORGET], [it["answer"] for it in FORGET]
    scored = E.answer_tokens(model, tok, qs, ans, batch_size=3, plus_plus=True)  # padded batch of 3 lengths
    assert model.training
    model.eval()
    for s, q, a in zip(scored, qs, ans):
        want = manual_answer_logprobs(model, tok, q, a)
        torch.testing.assert_close(s.logprobs, want, atol=1e-5, rtol=1e-5)
        assert s.labels.tolist() == tok(a, add_special_tokens=False)["input_ids"]
    probs = E.answer_probability(model, tok, qs, ans, batch_size=1)
    assert probs.tolist() == pytest.approx(
        [math.exp(float(s.logprobs.double().mean())) for s in scored], rel=1e-5
    )


def test_truth_ratios_and_mia_scores_compose_the_metric_functions():
    torch.manual_seed(0)
    model, tok = tiny_llama().eval(), word_tokenizer()
    got = E.truth_ratios(model, tok, FORGET, batch_size=4)
    for r, it in zip(got.tolist(), FORGET):
        para = float(manual_answer_logprobs(model, tok, it["question"], it["paraphrased_answer"]).mean())
        pert = [
            float(manual_answer_logprobs(model, tok, it["question"], x).mean())
            for x in it["perturbed_answers"]
        ]
        assert r == pytest.approx(math.exp(sum(pert) / len(pert) - para), rel=1e-5)
    it = FORGET[0]
    (scored,) = E.answer_tokens(model, tok, [it["question"]], [it["answer"]], plus_plus=True)
    scores = E.mia_scores([scored], [it["answer"]], k=0.5)
    lp = manual_answer_logprobs(model, tok, it["question"], it["answer"])  # 6 answer tokens → 3 lowest
    assert scores["loss"].item() == pytest.approx(float(lp.mean()), rel=1e-5)
    assert scores["min_k"].item() == pytest.approx(float(lp.sort().values[:3].mean()), rel=1e-5)
    assert scores["zlib"].item() == pytest.approx(M.zlib_score(float(lp.mean()), it["answer"]), rel=1e-5)
    # Min-K%++ from the full next-token distributions of a manual forward
    p, a = tok(it["question"])["input_ids"], tok(it["answer"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1 : -1]
    pp = M.min_k_plus_plus_token_scores(logits, torch.tensor(a))
    assert scores["min_k_plus_plus"].item() == pytest.approx(float(pp.sort().values[:3].mean()), rel=1e-4)


def test_greedy_generation_matches_a_manual_argmax_loop_and_extraction_strength_is_exact():
    torch.manual_seed(0)
    model, tok = tiny_llama().eval(), word_tokenizer()
    qs = [it["question"] for it in FORGET]
    batched = E.generate_answers(model, tok, qs, max_new_tokens=4, batch_size=3)  # left-padded
    for q, text in zip(qs, batched):
        ids = tok(q)["input_ids"]
        out = []
        for _ in range(4):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
        assert text == tok.decode(out, skip_special_tokens=True).strip()
    # extraction strength from one teacher-forced pass equals "greedy decoding from y_<k reproduces y_≥k"
    it = FORGET[0]
    (s,) = E.answer_tokens(model, tok, [it["question"]], [it["answer"]])
    es = M.extraction_strength(s.predictions, s.labels)
    n, labels = len(s.labels), s.labels.tolist()
    k = round((1 - es) * n)
    for j in range(k, n):  # every position from k on is reproduced greedily
        ids = tok(it["question"])["input_ids"] + labels[:j]
        with torch.no_grad():
            assert int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == labels[j]
    if k > 0:  # and position k - 1 is not
        ids = tok(it["question"])["input_ids"] + labels[: k - 1]
        with torch.no_grad():
            assert int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) != labels[k - 1]


def test_sharded_map_reassembles_item_order_across_ranks():
    items = list(range(7))
    fn = lambda shard: [x * 10 for x in shard]  # noqa: E731

    def gather(parts, obj):  # what all_gather_object would collect from ranks 0..2
        for r in range(3):
            parts[r] = fn(items[r::3])

    with (
        mock.patch.object(E, "rank_and_world", return_value=(1, 3)),
        mock.patch.object(torch.distributed, "all_gather_object", side_effect=gather),
    ):
        assert E.sharded_map(fn, items) == [x * 10 for x in items]


def test_lm_unlearning_metrics_forget_quality_and_privleak_use_the_reference():
    torch.manual_seed(0)
    model, tok = tiny_llama().eval(), word_tokenizer()
    torch.manual_seed(1)
    retain_model = tiny_llama().eval()
    ref = E.lm_reference(retain_model, tok, FORGET, HOLDOUT, batch_size=2)
    assert set(ref) == {"truth_ratios", "mia_auc"} and set(ref["mia_auc"]) == set(E.MIA_ATTACKS)
    out = E.lm_unlearning_metrics(
        model, tok, FORGET, RETAIN, holdout=HOLDOUT, verbatim=RETAIN[:1], reference=ref, max_new_tokens=4
    )
    ratios = E.truth_ratios(model, tok, FORGET)
    from scipy.stats import ks_2samp

    assert out["forget_quality"] == ks_2samp(ratios.numpy(), ref["truth_ratios"]).pvalue  # exactly
    assert out["forget_truth_ratio"] == pytest.approx(M.truth_ratio_score(ratios, "forget"))
    retain_stats = [out["retain_prob"], out["retain_rouge"], out["retain_truth_ratio"]]
    assert out["model_utility"] == pytest.approx(M.model_utility(retain_stats))
    for attack in E.MIA_ATTACKS:
        assert out[f"privleak_{attack}"] == pytest.approx(
            M.priv_leak(out[f"mia_{attack}_auc"], ref["mia_auc"][attack])
        )
    assert 0 <= out["verbmem"] <= 1 and 0 <= out["forget_es"] <= 1
    with pytest.raises(ValueError, match="no holdout set"):
        E.lm_unlearning_metrics(model, tok, FORGET, reference=ref, generate=False)
    with pytest.raises(ValueError, match="perturbed_answers"):
        E.lm_unlearning_metrics(
            model, tok, [{"question": "who", "answer": "alice"}], reference=ref, generate=False
        )


def test_lm_relearn_attack_reports_steps_to_recover_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model, tok = tiny_gpt2(), word_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = float(
        E.answer_probability(
            model, tok, [i["question"] for i in FORGET], [i["answer"] for i in FORGET]
        ).mean()
    )
    res = E.lm_relearn_attack(
        model, tok, FORGET, threshold=start * 3, steps=40, eval_every=2, lr=1e-2, batch_size=3
    )
    assert res["steps_to_recover"] is not None and res["steps_to_recover"] > 0
    step, value = res["curve"][-1]
    assert step == res["steps_to_recover"] and value >= start * 3 > res["curve"][-2][1]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _QADataset(torch.utils.data.Dataset):
    def __init__(self, tok, items):
        self.rows = [
            (tok(i["question"])["input_ids"], tok(i["answer"], add_special_tokens=False)["input_ids"])
            for i in items
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_callback_logs_metrics_in_a_trainer_run_and_picks_the_best_step(tmp_path):
    from hfhooks import LMUnlearningEvalCallback

    torch.manual_seed(0)
    model, tok = tiny_llama(), word_tokenizer()
    cb = LMUnlearningEvalCallback(
        tok, FORGET, RETAIN, every=2, select="forget_prob", generate=False, restore_best=True
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=3,
        learning_rate=1e-2,
        logging_steps=100,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        eval_strategy="steps",
        eval_steps=3,
    )
    data = _QADataset(tok, FORGET)
    pad = tok.pad_token_id
    collate = lambda rows: E.qa_batch(rows, pad)  # noqa: E731
    trainer = Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collate, callbacks=[cb]
    )
    trainer.train()
    steps = [h["step"] for h in cb.history]
    assert steps == [2, 3, 4, 6]  # every 2 steps, plus the Trainer evaluation at step 3
    logged = [h for h in trainer.state.log_history if "lm_unlearn/forget_prob" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    evals = [h for h in trainer.state.log_history if "eval_lm_unlearn/forget_prob" in h]
    assert [h["step"] for h in evals] == [3, 6]
    best = max(cb.history, key=lambda h: h["forget_prob"])
    assert cb.best_step == best["step"]
    # restore_best loaded the best weights back: the model scores the best forget_prob again
    qs, ans = [i["question"] for i in FORGET], [i["answer"] for i in FORGET]
    assert float(E.answer_probability(model, tok, qs, ans).mean()) == pytest.approx(
        best["forget_prob"], rel=1e-5
    )


def test_callback_select_must_name_a_computed_metric():
    from hfhooks import LMUnlearningEvalCallback, LMUnlearningEvalConfig

    cb = LMUnlearningEvalCallback(word_tokenizer(), FORGET, select="forget_quality", generate=False)
    with pytest.raises(ValueError, match="forget_quality needs reference"):
        cb.evaluate(tiny_llama(), 1)
    with pytest.raises(ValueError, match="restore_best=True needs select"):
        LMUnlearningEvalConfig(restore_best=True)


def test_config_is_exported_documented_and_taken_as_config_or_keywords():
    from pathlib import Path

    import hfhooks
    from hfhooks import LMUnlearningEvalCallback, LMUnlearningEvalConfig

    assert (
        hfhooks.LMUnlearningEvalConfig is LMUnlearningEvalConfig
        and "LMUnlearningEvalConfig" in hfhooks.__all__
    )
    page = (Path(__file__).resolve().parents[1] / "docs" / "lm-unlearning-evaluation.md").read_text()
    assert [f for f in LMUnlearningEvalConfig.help() if f"`{f}`" not in page] == []
    kw = dict(every=3, select="forget_prob", mia_k=0.2)
    by_config = LMUnlearningEvalCallback(word_tokenizer(), FORGET, config=LMUnlearningEvalConfig(**kw))
    assert by_config.config == LMUnlearningEvalCallback(word_tokenizer(), FORGET, **kw).config
    with pytest.raises(TypeError, match="unexpected keyword argument 'evry'"):
        LMUnlearningEvalCallback(word_tokenizer(), FORGET, evry=3)
    with pytest.raises(ValueError, match="mia_k"):
        LMUnlearningEvalConfig(mia_k=0)


@pytest.mark.distributed
def test_ddp_callback_agrees_across_ranks_and_with_one_process(tmp_path):
    import json

    from safetensors.torch import load_file

    from tests.test_distributed import torchrun

    torchrun("lm_eval_ddp.py", "--out", str(tmp_path))
    runs = [json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1)]
    assert runs[0] == runs[1], "ranks disagree on the evaluation"
    assert [h["step"] for h in runs[0]["history"]] == [2, 4] and runs[0]["best_step"] in (2, 4)
    # the sharded, gathered evaluation (3 forget examples: uneven shards) equals one process on the same weights
    model, tok = tiny_llama(), word_tokenizer()
    model.load_state_dict(load_file(tmp_path / "weights0.safetensors"))
    single = E.lm_unlearning_metrics(
        model,
        tok,
        FORGET,
        RETAIN,
        holdout=HOLDOUT,
        reference=runs[0]["reference"],
        max_new_tokens=4,
        batch_size=2,
    )
    assert single == pytest.approx(runs[0]["final"], rel=1e-6, abs=1e-9)
    assert "forget_quality" in single and "privleak_min_k" in single


def test_chat_template_wraps_the_question_as_a_user_turn():
    torch.manual_seed(0)
    model, tok = tiny_llama().eval(), word_tokenizer()
    tok.chat_template = "{% for m in messages %}who {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} is{% endif %}"
    (with_template,) = E.answer_tokens(model, tok, ["wrote the book"], ["alice"], chat_template=True)
    (by_hand,) = E.answer_tokens(model, tok, ["who wrote the book is"], ["alice"])
    torch.testing.assert_close(with_template.logprobs, by_hand.logprobs)
    (plain,) = E.answer_tokens(model, tok, ["wrote the book"], ["alice"])
    assert not torch.equal(plain.logprobs, by_hand.logprobs)
    assert E.generate_answers(model, tok, ["wrote the book"], max_new_tokens=3, chat_template=True) == (
        E.generate_answers(model, tok, ["who wrote the book is"], max_new_tokens=3)
    )


def test_muse_memorisation_wrappers_score_greedy_generations_with_rouge():
    torch.manual_seed(0)
    model, tok = tiny_llama().eval(), word_tokenizer()
    qs, ans = [i["question"] for i in FORGET], [i["answer"] for i in FORGET]
    gen = E.generate_answers(model, tok, qs, max_new_tokens=5)
    want = [M.rouge_l(g, a).fmeasure for g, a in zip(gen, ans)]
    assert E.verbatim_memorization(model, tok, qs, ans, max_new_tokens=5).tolist() == pytest.approx(want)
    shots = [("who wrote the book", "alice")]
    prefix = "Question: who wrote the book\nAnswer: alice\n\n"
    asked = [f"Question: {q}\nAnswer:" for q in qs]
    gen = E.generate_answers(model, tok, asked, max_new_tokens=5, prompt_prefix=prefix)
    got = E.knowledge_memorization(model, tok, qs, ans, examples=shots, kind="recall", max_new_tokens=5)
    assert got.tolist() == pytest.approx([M.rouge_l(g, a).recall for g, a in zip(gen, ans)])


def test_utility_sets_normalise_the_probability_over_the_options_and_enter_model_utility():
    torch.manual_seed(0)
    model, tok = tiny_llama().eval(), word_tokenizer()
    facts = [
        {
            "question": "what is the capital of france",
            "answer": "paris",
            "perturbed_answers": ["rome", "london"],
        },
        {"question": "who wrote the poem", "answer": "carol", "perturbed_answers": ["bob", "alice"]},
    ]
    out = E.lm_unlearning_metrics(
        model, tok, FORGET, RETAIN, utility={"world_facts": facts}, max_new_tokens=3
    )
    lp = lambda q, a: float(manual_answer_logprobs(model, tok, q, a).mean())  # noqa: E731
    probs, ratios = [], []
    for f in facts:
        true, false = lp(f["question"], f["answer"]), [lp(f["question"], x) for x in f["perturbed_answers"]]
        probs.append(math.exp(true) / (math.exp(true) + sum(map(math.exp, false))))
        ratios.append(math.exp(sum(false) / 2 - true))  # no paraphrase: the answer itself is the "true" one
    assert out["world_facts_prob"] == pytest.approx(sum(probs) / 2, rel=1e-5)
    assert out["world_facts_truth_ratio"] == pytest.approx(sum(max(0, 1 - r) for r in ratios) / 2, rel=1e-5)
    stats = [out[f"{s}_{m}"] for s in ("retain", "world_facts") for m in ("prob", "rouge", "truth_ratio")]
    assert out["model_utility"] == pytest.approx(
        len(stats) / sum(1 / x for x in stats) if min(stats) > 0 else 0.0
    )
    with pytest.raises(ValueError, match="perturbed_answers"):
        E.lm_unlearning_metrics(
            model, tok, FORGET, utility={"world_facts": [{"question": "who", "answer": "bob"}]}
        )
