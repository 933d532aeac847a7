"""LM unlearning metrics as pure functions of log-probabilities, token ids and texts (no model in here).

The model-driven side (forward passes, greedy generation, DDP sharding) is :mod:`hfhooks.unlearning.lm_evaluation`;
this module only turns numbers into metrics, so each definition can be checked by hand. Sources:

* **TOFU** (Maini et al., 2024, arXiv:2401.06121; code ``locuslab/tofu`` and ``locuslab/open-unlearning``):
  answer probability, truth ratio, forget quality (KS test), model utility (harmonic mean), ROUGE-L recall;
* **MUSE** (Shi et al., 2024, arXiv:2407.06460): verbatim / knowledge memorisation (ROUGE between a generation
  and the truth) and PrivLeak;
* membership inference: LOSS (Yeom et al., 2018), zlib (Carlini et al., 2021, arXiv:2012.07805), Min-K% (Shi
  et al., 2024, arXiv:2310.16789), Min-K%++ (Zhang et al., 2024, arXiv:2404.02936);
* extraction strength and exact memorisation (Wang et al., ICLR 2025, "Towards Effective Evaluations and
  Comparisons for LLM Unlearning Methods"; as in open-unlearning).

Conventions: a *mean log-prob* is the mean over an answer's tokens of ``log p(token | prefix)`` (so TOFU's
normalised probability ``P(a|q)^(1/|a|)`` is ``exp(mean log-prob)``). Membership scores are oriented as in their
papers: **higher means "more likely a training member"**; :func:`auc` is the probability that a member outscores
a non-member. docs/lm-unlearning-evaluation.md states each definition with the worked numbers the tests use.

>>> round(rouge_l("the cat sat", "the cat sat down").recall, 4)
0.75
>>> round(extraction_strength([5, 9, 7, 8], [1, 2, 7, 8]), 4)
0.5
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, NamedTuple

import torch

__all__ = [
    "RougeScore",
    "auc",
    "exact_memorization",
    "extraction_strength",
    "forget_quality",
    "min_k_percent",
    "min_k_plus_plus_token_scores",
    "model_utility",
    "option_probability",
    "priv_leak",
    "rouge_l",
    "rouge_tokens",
    "truth_ratio",
    "truth_ratio_score",
    "zlib_score",
]


class RougeScore(NamedTuple):
    """ROUGE-L precision, recall and F-measure of one prediction against one reference."""

    precision: float
    recall: float
    fmeasure: float


def _as_1d(values: Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite values {t.tolist()}: the model's log-probs are NaN/inf.")
    return t


def truth_ratio(
    paraphrased: Sequence[float] | torch.Tensor, perturbed: Sequence | torch.Tensor
) -> torch.Tensor:
    """TOFU's truth ratio per question: ``exp(mean_j lp(perturbed_j) - lp(paraphrased))`` = false / true.

    ``paraphrased``: the mean log-prob of the paraphrased correct answer, shape ``(N,)``; ``perturbed``: the mean
    log-probs of the perturbed (wrong) answers, shape ``(N, K)``. The paper writes the numerator as the
    arithmetic mean of the normalised probabilities; the TOFU and open-unlearning code average the *log*-probs
    (a geometric mean), which is what this computes. Values < 1 mean the model prefers the true answer.
    """
    para = _as_1d(paraphrased, "paraphrased")
    pert = torch.as_tensor(perturbed, dtype=torch.float64)
    if pert.dim() == 1:
        pert = pert[:, None]
    if pert.dim() != 2 or pert.shape[0] != para.shape[0] or pert.shape[1] == 0:
        raise ValueError(
            f"truth_ratio: perturbed has shape {tuple(pert.shape)}; it needs (N, K≥1) with N = {para.shape[0]} "
            "(one row of perturbed-answer log-probs per paraphrased answer)."
        )
    _as_1d(pert, "perturbed")
    return torch.exp(pert.mean(dim=1) - para)


def truth_ratio_score(ratios: Sequence[float] | torch.Tensor, split: Literal["forget", "retain"]) -> float:
    """TOFU's aggregate of truth ratios (false/true) over a split.

    ``forget``: ``mean(min(R, 1/R))`` (1 when true and false answers are equally likely, as for a model that
    never saw the facts); ``retain``: ``mean(max(0, 1 - R))`` (high when the model prefers the true answer).
    """
    r = _as_1d(ratios, "ratios")
    if r.numel() == 0:
        raise ValueError("truth_ratio_score got no truth ratios (an empty split).")
    if bool((r <= 0).any()):
        raise ValueError(f"truth ratios must be > 0, got {r.tolist()}.")
    if split == "forget":
        return float(torch.minimum(r, 1 / r).mean())
    if split == "retain":
        return float((1 - r).clamp(min=0).mean())
    raise ValueError(f"truth_ratio_score: split={split!r} must be 'forget' or 'retain'.")


def forget_quality(
    ratios: Sequence[float] | torch.Tensor, reference_ratios: Sequence[float] | torch.Tensor
) -> float:
    """TOFU's forget quality: the p-value of the two-sample Kolmogorov–Smirnov test (``scipy.stats.ks_2samp``)
    between the forget-set truth ratios of the evaluated model and of a retain model (trained without the forget
    set). High (near 1) means indistinguishable from the retain model. Needs scipy (imported here, lazily).

    The KS statistic only depends on the order of the pooled values, so it is the same for R or 1/R
    (open-unlearning tests ``1/R``, TOFU's code ``1/R`` too); this tests R as given.
    """
    try:
        from scipy.stats import ks_2samp
    except ImportError as e:  # pragma: no cover - scipy comes with scikit-learn and most stacks
        raise ImportError("forget_quality needs scipy (pip install scipy).") from e
    a, b = _as_1d(ratios, "ratios"), _as_1d(reference_ratios, "reference_ratios")
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError(f"forget_quality needs truth ratios on both sides, got {a.numel()} and {b.numel()}.")
    return float(ks_2samp(a.numpy(), b.numpy()).pvalue)


def option_probability(
    true_logprob: Sequence[float] | torch.Tensor, false_logprobs: Sequence | torch.Tensor
) -> torch.Tensor:
    """TOFU's probability on the real-authors / world-facts sets: ``p(true) / (p(true) + Σ_j p(false_j))`` with
    normalised probabilities ``p = exp(mean log-prob)``; ``true_logprob`` ``(N,)``, ``false_logprobs`` ``(N, K)``."""
    t = _as_1d(true_logprob, "true_logprob")
    f = torch.as_tensor(false_logprobs, dtype=torch.float64).reshape(t.shape[0], -1)
    pt = torch.exp(t)
    return pt / (pt + torch.exp(f).sum(dim=1))


def model_utility(values: Iterable[float]) -> float:
    """TOFU's model utility: the harmonic mean of the utility statistics (probability, ROUGE and truth-ratio
    score on the retain, real-authors and world-facts sets, or whichever ones are given); 0 if any is 0."""
    v = _as_1d(list(values), "values")
    if v.numel() == 0:
        raise ValueError("model_utility needs at least one statistic.")
    if bool((v < 0).any()):
        raise ValueError(f"model_utility: statistics must be ≥ 0, got {v.tolist()}.")
    if bool((v == 0).any()):
        return 0.0
    return float(v.numel() / (1 / v).sum())


def rouge_tokens(text: str, stemmer: Callable[[str], str] | None = None) -> list[str]:
    """Tokenise as ``rouge_score`` does: lower-case, runs of characters other than ``[a-z0-9]`` split words;
    with ``stemmer`` (e.g. ``nltk``'s ``PorterStemmer().stem``), words longer than 3 characters are stemmed."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    if stemmer is not None:
        words = [stemmer(w) if len(w) > 3 else w for w in words]
    return [w for w in words if w]


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str, stemmer: Callable[[str], str] | None = None) -> RougeScore:
    """ROUGE-L of ``prediction`` against ``reference``: LCS of the word sequences (:func:`rouge_tokens`);
    recall = LCS / |reference|, precision = LCS / |prediction|, F = 2PR / (P + R); all 0 if either is empty.

    Matches ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)``. TOFU and open-unlearning
    score with ``use_stemmer=True`` (Porter stemming): pass ``stemmer=nltk.stem.PorterStemmer().stem`` to match
    them exactly (they differ only where a word's inflection differs, e.g. "sat" vs "sitting" are never equal).
    """
    pred, ref = rouge_tokens(prediction, stemmer), rouge_tokens(reference, stemmer)
    if not pred or not ref:
        return RougeScore(0.0, 0.0, 0.0)
    lcs = _lcs(ref, pred)
    p, r = lcs / len(pred), lcs / len(ref)
    return RougeScore(p, r, 0.0 if lcs == 0 else 2 * p * r / (p + r))


def min_k_percent(token_scores: Sequence[float] | torch.Tensor, k: float) -> float:
    """Min-K% (Shi et al., 2024): the mean of the ``max(1, int(k·n))`` lowest of the ``n`` token scores.

    With token log-probs this is Min-K% Prob; with :func:`min_k_plus_plus_token_scores` it is Min-K%++.
    Higher means more likely a member.
    """
    s = _as_1d(token_scores, "token_scores")
    if not 0 < k <= 1:
        raise ValueError(f"min_k_percent: k={k!r} must be in (0, 1] (a fraction: 0.2 = the lowest 20 %).")
    if s.numel() == 0:
        raise ValueError("min_k_percent got no token scores (an empty answer).")
    n = max(1, int(k * s.numel()))
    return float(s.sort().values[:n].mean())


def min_k_plus_plus_token_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Min-K%++ token scores (Zhang et al., 2024): ``(log p(x_t) - μ_t) / σ_t`` where ``μ_t`` and ``σ_t²`` are the
    mean and variance of ``log p(z)`` for ``z`` drawn from the model's next-token distribution at ``t``.

    ``logits``: ``(T, V)`` next-token logits at the positions predicting ``targets`` ``(T,)``. ``σ_t²`` is clamped
    at 1e-6 (as open-unlearning does) so a one-hot distribution does not divide by zero.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"min_k_plus_plus_token_scores: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must "
            "be (T, V) and (T,)."
        )
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=1e-6)
    return (logp.gather(-1, targets.long()[:, None]).squeeze(-1) - mu) / var.sqrt()


def zlib_score(mean_logprob: float, text: str) -> float:
    """Carlini et al.'s zlib membership score, oriented higher = member: ``mean log-prob / zlib length`` where the
    zlib length is ``len(zlib.compress(text.encode("utf-8")))`` in bytes (i.e. minus loss / zlib entropy)."""
    return float(mean_logprob) / len(zlib.compress(text.encode("utf-8")))


def auc(
    member_scores: Sequence[float] | torch.Tensor, nonmember_scores: Sequence[float] | torch.Tensor
) -> float:
    """ROC AUC of a membership score (higher = member): ``P(member > non-member) + ½ P(tie)`` over all pairs
    (the Mann–Whitney U statistic / (n_m · n_n)); equals ``sklearn.metrics.roc_auc_score`` with members as the
    positive class. 0.5 is chance, 1 perfect detection of the members."""
    m, n = _as_1d(member_scores, "member_scores"), _as_1d(nonmember_scores, "nonmember_scores")
    if m.numel() == 0 or n.numel() == 0:
        raise ValueError(f"auc needs members and non-members, got {m.numel()} and {n.numel()}.")
    diff = m[:, None] - n[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def priv_leak(auc_unlearned: float, auc_retrain: float) -> float:
    """MUSE's PrivLeak in percent, from membership AUCs (forget set as members vs a holdout set, :func:`auc`).

    MUSE writes ``(AUC_unlearn − AUC_retrain) / AUC_retrain`` with its AUC measured the other way round (1 − ours;
    open-unlearning converts the same way), so here ``((1−a_u) − (1−a_r)) / (1−a_r) · 100``. 0 is ideal (as
    leaky as the retain model); **negative** means the forget set is still recognisable as training data
    (under-unlearning, −100 for a model that was never unlearned); positive means over-unlearning.
    """
    if not (0 <= auc_unlearned <= 1 and 0 <= auc_retrain < 1):
        raise ValueError(
            f"priv_leak: AUCs must lie in [0, 1] (auc_retrain < 1), got {auc_unlearned!r}, {auc_retrain!r}."
        )
    ref = 1 - auc_retrain
    return float(((1 - auc_unlearned) - ref) / ref * 100)


def _ids(x: Sequence[int] | torch.Tensor) -> list[int]:
    return torch.as_tensor(x).reshape(-1).tolist()


def extraction_strength(
    predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor
) -> float:
    """Extraction strength: ``1 − k/n`` for the smallest ``k`` such that the model, given the first ``k`` answer
    tokens, reproduces the remaining ``n − k`` exactly; 0 if it does not even produce the last token.

    ``predictions``: the model's argmax at each answer position under teacher forcing. Greedy decoding from the
    prefix ``y_<k`` reproduces ``y_≥k`` exactly iff every teacher-forced argmax from ``k`` on equals the label,
    so one forward pass decides it. (open-unlearning's loop returns ``1/n`` instead of 0 when no suffix matches.)
    """
    p, y = _ids(predictions), _ids(labels)
    if len(p) != len(y) or not y:
        raise ValueError(f"extraction_strength: {len(p)} predictions for {len(y)} labels (need equal, ≥ 1).")
    k = len(y)
    while k > 0 and p[k - 1] == y[k - 1]:
        k -= 1
    return 1 - k / len(y)


def exact_memorization(
    predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor
) -> float:
    """Exact memorisation: the fraction of answer tokens where the teacher-forced argmax equals the label."""
    p, y = _ids(predictions), _ids(labels)
    if len(p) != len(y) or not y:
        raise ValueError(f"exact_memorization: {len(p)} predictions for {len(y)} labels (need equal, ≥ 1).")
    return sum(a == b for a, b in zip(p, y)) / len(y)
