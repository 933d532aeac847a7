"""LM unlearning evaluation with a causal LM and its tokenizer: TOFU, MUSE, membership inference, extraction.

Examples are mappings of strings (TOFU-style): ``{"question", "answer"}`` plus, for the truth ratio,
``"paraphrased_answer"`` and ``"perturbed_answers"`` (a list). MUSE's verbatim set uses the same keys: the
``question`` is the prefix shown to the model and the ``answer`` the true continuation. An answer is scored as
``log p(answer tokens | prompt tokens)`` where the prompt is the question (through the tokenizer's chat template
with ``chat_template=True``) tokenised with special tokens, and the answer is tokenised on its own without
them. The metrics themselves are the pure functions of :mod:`hfhooks.unlearning.lm_metrics`.

Every function runs the model in eval mode (its training flags restored after) without gradients. Under
``torch.distributed`` each rank evaluates a strided shard (:func:`sharded_map`) and the results are gathered,
so every rank returns the same, complete result.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from hfhooks.masks.saliency import model_state_preserved
from hfhooks.unlearning import lm_metrics as M
from hfhooks.unlearning.config import LMUnlearningEvalConfig
from hfhooks.unlearning.evaluation import rank_and_world, relearn_attack

__all__ = [
    "MIA_ATTACKS",
    "AnswerTokens",
    "answer_probability",
    "answer_tokens",
    "generate_answers",
    "knowledge_memorization",
    "lm_reference",
    "lm_relearn_attack",
    "lm_unlearning_metrics",
    "mia_scores",
    "qa_batch",
    "rouge_scores",
    "sharded_map",
    "truth_ratios",
    "verbatim_memorization",
]

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
T = TypeVar("T")
R = TypeVar("R")


def sharded_map(fn: Callable[[list[T]], list[R]], items: Sequence[T]) -> list[R]:
    """``fn`` over this rank's strided shard ``items[rank::world]``, gathered (``all_gather_object``) back into
    item order on every rank. ``fn`` must return one result per item; without ``torch.distributed`` it is
    ``fn(list(items))``. Every rank must call it (it is a collective)."""
    rank, world = rank_and_world()
    shard = list(items[rank::world])
    out = list(fn(shard))
    if len(out) != len(shard):
        raise ValueError(f"sharded_map: fn returned {len(out)} results for {len(shard)} items.")
    if world == 1:
        return out
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, out)
    result: list[Any] = [None] * len(items)
    for r, part in enumerate(parts):
        result[r::world] = part
    return result


@dataclass
class AnswerTokens:
    """One scored answer: per-token log-probs, teacher-forced argmax predictions and labels, and (when asked)
    the Min-K%++ token scores; all 1-D CPU tensors of the answer's length (its scored tokens)."""

    logprobs: torch.Tensor
    predictions: torch.Tensor
    labels: torch.Tensor
    plus_plus: torch.Tensor | None = None

    @property
    def mean_logprob(self) -> float:
        """Mean token log-prob: ``log`` of TOFU's normalised probability ``P(a|q)^(1/|a|)``."""
        return float(self.logprobs.double().mean())


def _prompt_ids(tokenizer: Any, question: str, chat_template: bool) -> list[int]:
    if chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(question, add_special_tokens=True)["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _score_rows(model: nn.Module, rows: list[tuple[list[int], list[int]]], pad: int, plus_plus: bool) -> list:
    """One forward over ``rows`` of ``(prompt ids, answer ids)``, right-padded; the scored answer tokens."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a, dtype=torch.long)
        mask[i, : len(p) + len(a)] = 1
    device = _device(model)
    ids = ids.to(device)
    logits = model(input_ids=ids, attention_mask=mask.to(device))["logits"]
    out = []
    for i, (p, a) in enumerate(rows):
        start, end = max(len(p), 1), len(p) + len(a)  # an answer with no prompt: its first token is unscored
        # only the answer positions are upcast and moved (batch × length × vocabulary logits can be GBs)
        lg, tgt = logits[i, start - 1 : end - 1].float(), ids[i, start:end]
        logp = torch.log_softmax(lg, dim=-1)
        out.append(
            AnswerTokens(
                logprobs=logp.gather(-1, tgt[:, None]).squeeze(-1).cpu(),
                predictions=lg.argmax(-1).cpu(),
                labels=tgt.cpu(),
                plus_plus=M.min_k_plus_plus_token_scores(lg, tgt).float().cpu() if plus_plus else None,
            )
        )
    return out


@torch.no_grad()
def answer_tokens(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 8,
    chat_template: bool = False,
    plus_plus: bool = False,
) -> list[AnswerTokens]:
    """Score each ``answers[i]`` given ``questions[i]`` (see the module docstring for the tokenisation) in
    batches of ``batch_size``; ``plus_plus`` also keeps the Min-K%++ token scores. DDP-sharded."""
    if len(questions) != len(answers):
        raise ValueError(f"answer_tokens: {len(questions)} questions for {len(answers)} answers.")
    rows = []
    for q, a in zip(questions, answers):
        p_ids, a_ids = (
            _prompt_ids(tokenizer, q, chat_template),
            list(tokenizer(a, add_special_tokens=False)["input_ids"]),
        )
        if len(a_ids) - (0 if p_ids else 1) < 1:
            raise ValueError(f"answer {a!r} (to {q!r}) has no token to score: it tokenises to {a_ids}.")
        rows.append((p_ids, a_ids))
    pad = _pad_id(tokenizer)

    def run(shard: list[tuple[list[int], list[int]]]) -> list[AnswerTokens]:
        out: list[AnswerTokens] = []
        with model_state_preserved(model):
            model.eval()
            for s in range(0, len(shard), batch_size):
                out.extend(_score_rows(model, shard[s : s + batch_size], pad, plus_plus))
        return out

    return sharded_map(run, rows)


def answer_probability(
    model: nn.Module, tokenizer: Any, questions: Sequence[str], answers: Sequence[str], **kw
) -> torch.Tensor:
    """TOFU's answer probability per example: ``exp(mean token log-prob) = P(a|q)^(1/|a|)``, shape ``(N,)``.
    Keywords as for :func:`answer_tokens`."""
    scored = answer_tokens(model, tokenizer, questions, answers, **kw)
    return torch.tensor([math.exp(s.mean_logprob) for s in scored], dtype=torch.float64)


def _check_truth_items(items: Sequence[Mapping[str, Any]]) -> int:
    have = [("paraphrased_answer" in it and bool(it.get("perturbed_answers"))) for it in items]
    if not all(have):
        missing = [i for i, h in enumerate(have) if not h][:5]
        raise ValueError(
            f"truth ratio: examples {missing} lack 'paraphrased_answer' or a non-empty 'perturbed_answers' list."
        )
    counts = {len(it["perturbed_answers"]) for it in items}
    if len(counts) != 1:
        raise ValueError(
            f"truth ratio: every example needs the same number of perturbed answers, got {sorted(counts)}."
        )
    return counts.pop()


def truth_ratios(model: nn.Module, tokenizer: Any, items: Sequence[Mapping[str, Any]], **kw) -> torch.Tensor:
    """TOFU's truth ratio (false/true, :func:`~hfhooks.unlearning.lm_metrics.truth_ratio`) per example, from
    the paraphrased answer and the perturbed answers; shape ``(N,)``. Keywords as for :func:`answer_tokens`."""
    k = _check_truth_items(items)
    questions = [it["question"] for it in items for _ in range(k + 1)]
    answers = [a for it in items for a in (it["paraphrased_answer"], *it["perturbed_answers"])]
    lp = torch.tensor([s.mean_logprob for s in answer_tokens(model, tokenizer, questions, answers, **kw)])
    lp = lp.reshape(len(items), k + 1)
    return M.truth_ratio(lp[:, 0], lp[:, 1:])


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    chat_template: bool = False,
    prompt_prefix: str = "",
) -> list[str]:
    """Greedy continuations (``do_sample=False``, one beam) of ``prompt_prefix + question``, decoded without
    special tokens and cut at the end-of-sequence token. Prompts are left-padded. DDP-sharded."""
    prompts = [_prompt_ids(tokenizer, prompt_prefix + q, chat_template) for q in questions]
    if any(not p for p in prompts):
        raise ValueError(
            "generate_answers: a prompt tokenises to nothing; the model has nothing to continue."
        )
    pad = _pad_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)

    def run(shard: list[list[int]]) -> list[str]:
        out: list[str] = []
        with model_state_preserved(model):
            model.eval()
            for s in range(0, len(shard), batch_size):
                chunk = shard[s : s + batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=_device(model))
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=ids.device)
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )[:, width:].cpu()
                for row in gen.tolist():
                    if eos is not None and eos in row:
                        row = row[: row.index(eos)]
                    out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        return out

    return sharded_map(run, prompts)


def rouge_scores(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    kind: str = "recall",
    **kw: Any,
) -> torch.Tensor:
    """ROUGE-L (``kind`` = ``"recall"``, TOFU; or ``"f1"``) of the greedy answer to each question against the true
    answer, shape ``(N,)``. MUSE's verbatim memorisation is this with the prefix as question and the true
    continuation as answer; its knowledge memorisation, with few-shot QA pairs as ``prompt_prefix``. Keywords as
    for :func:`generate_answers`."""
    if kind not in ("recall", "f1"):
        raise ValueError(f"rouge_scores: kind={kind!r} must be 'recall' or 'f1'.")
    generated = generate_answers(model, tokenizer, questions, **kw)
    scores = [M.rouge_l(g, a) for g, a in zip(generated, answers)]
    return torch.tensor([s.recall if kind == "recall" else s.fmeasure for s in scores], dtype=torch.float64)


def verbatim_memorization(
    model: nn.Module,
    tokenizer: Any,
    prefixes: Sequence[str],
    continuations: Sequence[str],
    *,
    kind: str = "f1",
    **kw,
) -> torch.Tensor:
    """MUSE's verbatim memorisation per example: ROUGE-L (``kind``) of the greedy continuation of each forget-set
    ``prefix`` against its true ``continuation`` (never through a chat template). Keywords as for
    :func:`generate_answers`."""
    return rouge_scores(
        model, tokenizer, prefixes, continuations, kind=kind, **{**kw, "chat_template": False}
    )


def knowledge_memorization(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    examples: Sequence[tuple[str, str]] = (),
    kind: str = "f1",
    **kw: Any,
) -> torch.Tensor:
    """MUSE's knowledge memorisation per example: ROUGE-L (``kind``) of the greedy answer to each question
    against the true answer, the questions asked as ``"Question: {q}\nAnswer:"`` after the few-shot ``examples``
    (question, answer) pairs in the same format, one blank line apart. Keywords as for :func:`generate_answers`."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in examples)
    asked = [f"Question: {q}\nAnswer:" for q in questions]
    return rouge_scores(model, tokenizer, asked, answers, kind=kind, prompt_prefix=shots, **kw)


def mia_scores(
    scored: Sequence[AnswerTokens], texts: Sequence[str], k: float = 0.4
) -> dict[str, torch.Tensor]:
    """Membership scores (higher = member) per example from :func:`answer_tokens` output (with
    ``plus_plus=True`` for Min-K%++): ``loss`` = mean token log-prob (minus the LOSS attack's loss), ``zlib``,
    ``min_k`` (Min-K% Prob) and ``min_k_plus_plus`` at fraction ``k``; ``texts`` are the scored answers (zlib)."""
    out = {
        "loss": [s.mean_logprob for s in scored],
        "zlib": [M.zlib_score(s.mean_logprob, t) for s, t in zip(scored, texts)],
        "min_k": [M.min_k_percent(s.logprobs, k) for s in scored],
    }
    if all(s.plus_plus is not None for s in scored):
        out["min_k_plus_plus"] = [M.min_k_percent(s.plus_plus, k) for s in scored]
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in out.items()}


def _qa(items: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    return [it["question"] for it in items], [it["answer"] for it in items]


def _has_truth(items: Sequence[Mapping[str, Any]]) -> bool:
    return any("paraphrased_answer" in it or "perturbed_answers" in it for it in items)


def _split_metrics(model, tokenizer, items, split: str, c: LMUnlearningEvalConfig) -> tuple[dict, Any]:
    """prob / rouge / truth_ratio (and for the forget split es / em) of one split, plus its scored answers."""
    kw = {"batch_size": c.batch_size, "chat_template": c.chat_template}
    q, a = _qa(items)
    scored = answer_tokens(model, tokenizer, q, a, plus_plus=split == "forget", **kw)
    out = {f"{split}_prob": sum(math.exp(s.mean_logprob) for s in scored) / len(scored)}
    if c.generate:
        r = rouge_scores(model, tokenizer, q, a, kind=c.rouge, max_new_tokens=c.max_new_tokens, **kw)
        out[f"{split}_rouge"] = float(r.mean())
    ratios = truth_ratios(model, tokenizer, items, **kw) if _has_truth(items) else None
    if ratios is not None:
        out[f"{split}_truth_ratio"] = M.truth_ratio_score(ratios, split)  # type: ignore[arg-type]
    if split == "forget":
        out["forget_es"] = sum(M.extraction_strength(s.predictions, s.labels) for s in scored) / len(scored)
        out["forget_em"] = sum(M.exact_memorization(s.predictions, s.labels) for s in scored) / len(scored)
    return out, (scored, ratios)


def _mia_aucs(
    model, tokenizer, forget_scored, forget, holdout, c: LMUnlearningEvalConfig
) -> dict[str, float]:
    q, a = _qa(holdout)
    held = answer_tokens(
        model, tokenizer, q, a, plus_plus=True, batch_size=c.batch_size, chat_template=c.chat_template
    )
    member = mia_scores(forget_scored, _qa(forget)[1], c.mia_k)
    nonmember = mia_scores(held, a, c.mia_k)
    return {name: M.auc(member[name], nonmember[name]) for name in member}


def _option_set_metrics(model, tokenizer, name: str, items, c: LMUnlearningEvalConfig) -> dict[str, float]:
    """TOFU's real-authors / world-facts statistics: option-normalised probability, ROUGE, truth-ratio score."""
    k = _check_truth_items(
        [{"paraphrased_answer": "", **it} for it in items]
    )  # a paraphrase is optional here
    kw = {"batch_size": c.batch_size, "chat_template": c.chat_template}
    q, a = _qa(items)
    answers = [x for it in items for x in (it["answer"], *it["perturbed_answers"])]
    scored = answer_tokens(model, tokenizer, [x for x in q for _ in range(k + 1)], answers, **kw)
    lp = torch.tensor([s.mean_logprob for s in scored], dtype=torch.float64).reshape(len(items), k + 1)
    out = {f"{name}_prob": float(M.option_probability(lp[:, 0], lp[:, 1:]).mean())}
    if c.generate:
        r = rouge_scores(model, tokenizer, q, a, kind=c.rouge, max_new_tokens=c.max_new_tokens, **kw)
        out[f"{name}_rouge"] = float(r.mean())
    para = lp[:, 0]  # TOFU scores the answer itself where the set has no paraphrase
    if all("paraphrased_answer" in it for it in items):
        para = torch.tensor(
            [
                s.mean_logprob
                for s in answer_tokens(model, tokenizer, q, [it["paraphrased_answer"] for it in items], **kw)
            ]
        )
    out[f"{name}_truth_ratio"] = M.truth_ratio_score(M.truth_ratio(para, lp[:, 1:]), "retain")
    return out


def _reference_metrics(model, tokenizer, forget, holdout, reference, scored, ratios, c) -> dict[str, float]:
    """forget_quality, mia_<attack>_auc and privleak_<attack> (what the sets and the reference allow)."""
    out: dict[str, float] = {}
    if reference.get("truth_ratios") is not None:
        if ratios is None:
            raise ValueError(
                "forget_quality needs paraphrased_answer / perturbed_answers on the forget examples."
            )
        out["forget_quality"] = M.forget_quality(ratios, reference["truth_ratios"])
    if reference.get("mia_auc") and not holdout:
        raise ValueError(
            "reference has the retain model's MIA AUCs but no holdout set was given: PrivLeak compares the forget "
            "set with a holdout set (pass holdout=..., the same one given to lm_reference)."
        )
    if holdout:
        aucs = _mia_aucs(model, tokenizer, scored, forget, holdout, c)
        out.update({f"mia_{k}_auc": v for k, v in aucs.items()})
        for k, ref_auc in (reference.get("mia_auc") or {}).items():
            if ref_auc >= 1:  # MUSE's AUC (1 - ours) is 0: the relative difference is undefined
                warnings.warn(
                    f"privleak_{k} is undefined: the retain model's {k} AUC is {ref_auc} (it separates the forget "
                    "set from the holdout perfectly); use larger sets. Not reported.",
                    stacklevel=3,
                )
                continue
            out[f"privleak_{k}"] = M.priv_leak(aucs[k], ref_auc)
    return out


def lm_unlearning_metrics(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[Mapping[str, Any]],
    retain: Sequence[Mapping[str, Any]] | None = None,
    *,
    holdout: Sequence[Mapping[str, Any]] | None = None,
    verbatim: Sequence[Mapping[str, Any]] | None = None,
    utility: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    reference: Mapping[str, Any] | None = None,
    config: LMUnlearningEvalConfig | None = None,
    **options: Any,
) -> dict[str, float]:
    """All LM unlearning metrics that the given sets allow, as a flat ``{name: float}``.

    * ``forget_prob`` / ``retain_prob``, ``forget_rouge`` / ``retain_rouge`` (greedy answers, unless
      ``generate=False``), ``forget_truth_ratio`` / ``retain_truth_ratio`` (when the examples carry paraphrased
      and perturbed answers), ``forget_es``, ``forget_em``;
    * ``<name>_prob`` (normalised over the answer and its perturbed answers), ``<name>_rouge``,
      ``<name>_truth_ratio`` for each ``utility`` set (TOFU's real authors and world facts, e.g.
      ``utility={"real_authors": [...], "world_facts": [...]}``; ``perturbed_answers`` required);
    * ``model_utility``: harmonic mean of the retain and ``utility`` statistics;
    * ``forget_quality``: with ``reference["truth_ratios"]`` (the retain model's forget truth ratios,
      :func:`lm_reference`);
    * ``mia_<attack>_auc`` for forget vs ``holdout``, and ``privleak_<attack>`` with ``reference["mia_auc"]``;
    * ``verbmem``: MUSE's verbatim memorisation on ``verbatim`` (ROUGE ``verbatim_rouge``).

    Options: an :class:`~hfhooks.LMUnlearningEvalConfig` or its fields as keywords.
    """
    c = LMUnlearningEvalConfig.resolve(config, options, "lm_unlearning_metrics")
    if not forget:
        raise ValueError("lm_unlearning_metrics: the forget set is empty.")
    out, (f_scored, f_ratios) = _split_metrics(model, tokenizer, forget, "forget", c)
    stats: list[float] = []
    if retain:
        r_out, _ = _split_metrics(model, tokenizer, retain, "retain", c)
        out.update(r_out)
        stats.extend(r_out.values())
    for name, items in (utility or {}).items():
        u_out = _option_set_metrics(model, tokenizer, name, items, c)
        out.update(u_out)
        stats.extend(u_out.values())
    if stats:
        out["model_utility"] = M.model_utility(stats)
    out.update(_reference_metrics(model, tokenizer, forget, holdout, reference or {}, f_scored, f_ratios, c))
    if verbatim:
        q, a = _qa(verbatim)
        kw = {"max_new_tokens": c.max_new_tokens, "batch_size": c.batch_size}
        out["verbmem"] = float(
            verbatim_memorization(model, tokenizer, q, a, kind=c.verbatim_rouge, **kw).mean()
        )
    return out


def lm_reference(
    retain_model: nn.Module,
    tokenizer: Any,
    forget: Sequence[Mapping[str, Any]],
    holdout: Sequence[Mapping[str, Any]] | None = None,
    *,
    config: LMUnlearningEvalConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The retain model's statistics that forget quality and PrivLeak compare against: ``{"truth_ratios":
    list (forget set), "mia_auc": {attack: AUC} (forget vs holdout, if given)}`` — JSON-serialisable, so it
    can be computed once and stored."""
    c = LMUnlearningEvalConfig.resolve(config, options, "lm_reference")
    kw = {"batch_size": c.batch_size, "chat_template": c.chat_template}
    ref: dict[str, Any] = {}
    if _has_truth(forget):
        ref["truth_ratios"] = truth_ratios(retain_model, tokenizer, forget, **kw).tolist()
    if holdout:
        q, a = _qa(forget)
        scored = answer_tokens(retain_model, tokenizer, q, a, plus_plus=True, **kw)
        ref["mia_auc"] = _mia_aucs(retain_model, tokenizer, scored, forget, holdout, c)
    return ref


def qa_batch(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM batch of ``(prompt ids, answer ids)`` rows, the loss (``labels``) on the answers
    only: what :func:`lm_relearn_attack` fine-tunes on (usable as a Trainer ``data_collator`` too)."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)  # the loss is on the answer only
        mask[i, : len(p) + len(a)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_relearn_attack(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[Mapping[str, Any]],
    threshold: float,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    chat_template: bool = False,
    **attack: Any,
) -> dict[str, Any]:
    """Relearning attack: fine-tune a *copy* of ``model`` on the forget QA pairs (loss on the answer tokens)
    and report the first step at which ``evaluate(model)`` (default: the mean forget answer probability)
    reaches ``threshold`` — :func:`~hfhooks.relearn_attack` with a causal-LM dataset. ``attack``: its
    ``steps``, ``eval_every``, ``lr``, ``batch_size``, ``higher_is_recovered``, ``seed``. Returns
    ``{"steps_to_recover": int | None, "curve": [(step, value), ...]}``; the original model is untouched."""
    q, a = _qa(forget)
    rows = [
        (_prompt_ids(tokenizer, x, chat_template), list(tokenizer(y, add_special_tokens=False)["input_ids"]))
        for x, y in zip(q, a)
    ]
    pad = _pad_id(tokenizer)
    if evaluate is None:

        def evaluate(m: nn.Module) -> float:
            return float(answer_probability(m, tokenizer, q, a, chat_template=chat_template).mean())

    return relearn_attack(model, rows, evaluate, threshold, collate=lambda b: qa_batch(b, pad), **attack)
