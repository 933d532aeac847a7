"""LM unlearning metrics (hfhooks.unlearning.lm_metrics) against hand computations on tiny, written-out inputs."""

from __future__ import annotations

import math

import pytest
import torch

from hfhooks.unlearning import lm_metrics as M

LN2 = math.log(2)


def test_truth_ratio_is_false_over_true_with_geometric_mean_of_perturbed():
    # row 0: mean perturbed log-prob (-2 - 1)/2 = -1.5; paraphrased -1 → exp(-1.5 + 1) = exp(-0.5)
    # row 1: exp(-0.5 + 0.5) = 1
    r = M.truth_ratio([-1.0, -0.5], [[-2.0, -1.0], [-0.5, -0.5]])
    assert r.tolist() == pytest.approx([0.6065306597126334, 1.0])
    # the perturbed numerator is the geometric mean of normalised probabilities, as TOFU's code computes it
    p = torch.tensor([[math.exp(-2.0), math.exp(-1.0)]])
    assert M.truth_ratio([-1.0], p.log()).item() == pytest.approx(float(p.prod().sqrt() / math.exp(-1.0)))


def test_truth_ratio_scores_by_split():
    r = [0.6065306597126334, 1.0, 2.0]
    # forget: mean(min(R, 1/R)) = (0.60653 + 1 + 0.5) / 3
    assert M.truth_ratio_score(r, "forget") == pytest.approx((0.6065306597126334 + 1 + 0.5) / 3)
    # retain: mean(max(0, 1 - R)) = (0.39347 + 0 + 0) / 3
    assert M.truth_ratio_score(r, "retain") == pytest.approx(0.3934693402873666 / 3)
    with pytest.raises(ValueError, match="split="):
        M.truth_ratio_score(r, "test")
    with pytest.raises(ValueError, match="shape"):
        M.truth_ratio([-1.0, -2.0], [[-1.0]])


def test_forget_quality_is_scipys_ks_test_pvalue():
    from scipy.stats import ks_2samp

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(40, generator=g) * 2, torch.rand(30, generator=g) * 2 + 0.3
    assert M.forget_quality(a, b) == ks_2samp(a.double().numpy(), b.double().numpy()).pvalue
    # the KS test only sees the order: testing 1/R (as TOFU / open-unlearning do) gives the same p-value
    assert M.forget_quality(1 / a, 1 / b) == pytest.approx(M.forget_quality(a, b))
    # by hand: identical samples → p = 1; fully separated samples of 3 and 3 → exact p = 2 / C(6, 3) = 0.1
    assert M.forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert M.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)


def test_option_probability_and_model_utility():
    # p(true) = 0.5, p(false) = 0.25 + 0.25 → 0.5 / (0.5 + 0.5)
    got = M.option_probability([math.log(0.5)], [[math.log(0.25), math.log(0.25)]])
    assert got.tolist() == pytest.approx([0.5])
    # harmonic mean of 0.5, 1, 0.25 = 3 / (2 + 1 + 4)
    assert M.model_utility([0.5, 1.0, 0.25]) == pytest.approx(3 / 7)
    assert M.model_utility([0.5, 0.0]) == 0.0
    from scipy.stats import hmean

    assert M.model_utility([0.3, 0.9, 0.7]) == pytest.approx(hmean([0.3, 0.9, 0.7]))
    with pytest.raises(ValueError, match="≥ 0"):
        M.model_utility([0.5, -0.1])


def test_rouge_l_by_hand():
    s = M.rouge_l("the cat sat", "the cat sat down")  # LCS 3, |pred| 3, |ref| 4
    assert (s.precision, s.recall) == (1.0, 0.75)
    assert s.fmeasure == pytest.approx(2 * 0.75 / 1.75)
    s = M.rouge_l("a b c d", "b d e")  # LCS "b d" = 2
    assert (s.precision, s.recall) == (0.5, pytest.approx(2 / 3))
    # rouge_score's tokenisation: case and punctuation do not count
    assert M.rouge_tokens("The Cat, sat!") == ["the", "cat", "sat"]
    assert M.rouge_l("The CAT... sat", "the cat sat").recall == 1.0
    assert M.rouge_l("", "the cat") == (0.0, 0.0, 0.0)
    assert M.rouge_l("dog", "the cat").fmeasure == 0.0
    # LCS is order-sensitive (not a bag of words): "sat cat the" shares only one word in order
    assert M.rouge_l("sat cat the", "the cat sat").recall == pytest.approx(1 / 3)
    # a stemmer applies to words longer than 3 characters only
    stem = lambda w: w[:-1] if w.endswith("s") else w  # noqa: E731
    assert M.rouge_l("cats runs", "cat run", stemmer=stem).recall == 1.0
    assert M.rouge_l("cats runs", "cat run").recall == 0.0  # no stemming by default
    assert M.rouge_l("cats bus", "cat bu", stemmer=stem).recall == 0.5  # "bus" (3 characters) is kept
    assert M.rouge_tokens("cats runs bus", stemmer=stem) == ["cat", "run", "bus"]


def test_rouge_l_matches_rouge_score_when_installed():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for pred, ref in [("the cat sat on the mat", "a cat sat on a mat"), ("x y z", "z y x q")]:
        want = scorer.score(ref, pred)["rougeL"]
        got = M.rouge_l(pred, ref)
        assert got == pytest.approx((want.precision, want.recall, want.fmeasure))


def test_min_k_percent_by_hand():
    scores = [-1.0, -4.0, -2.0, -3.0, -0.5]
    assert M.min_k_percent(scores, 0.4) == -3.5  # int(0.4 * 5) = 2 lowest: -4, -3
    assert M.min_k_percent(scores, 0.1) == -4.0  # max(1, int(0.5)) = 1
    assert M.min_k_percent(scores, 0.5) == -3.5  # int(2.5) = 2: the count is floored, not rounded
    assert M.min_k_percent(scores, 1.0) == pytest.approx(-2.1)
    with pytest.raises(ValueError, match="k="):
        M.min_k_percent(scores, 0)


def test_min_k_plus_plus_token_scores_by_hand():
    # next-token distribution (0.5, 0.25, 0.25): log p = (-ln2, -2ln2, -2ln2); μ = -1.5 ln2;
    # E[(log p)²] = 0.5 ln²2 + 0.5 · 4 ln²2 = 2.5 ln²2 → σ² = 0.25 ln²2, σ = 0.5 ln2
    logits = torch.tensor([[0.0, -LN2, -LN2], [0.0, -LN2, -LN2]]) + 3.0  # shift: softmax is shift-invariant
    got = M.min_k_plus_plus_token_scores(logits, torch.tensor([0, 1]))
    assert got.tolist() == pytest.approx(
        [1.0, -1.0]
    )  # (-ln2 + 1.5 ln2) / 0.5 ln2 and (-2ln2 + 1.5ln2) / 0.5ln2


def test_zlib_loss_auc_privleak_by_hand():
    assert M.zlib_score(-2.0, "aaaa") == pytest.approx(-2.0 / 12)  # zlib.compress(b"aaaa") is 12 bytes
    # members (3, 2, 1) vs non-members (2, 0): wins 1 + 1 + ½ + 1 + 0 + 1 over 6 pairs
    assert M.auc([3.0, 2.0, 1.0], [2.0, 0.0]) == 0.75
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    m, n = torch.randint(0, 5, (17,), generator=g).float(), torch.randint(0, 5, (11,), generator=g).float()
    want = sk.roc_auc_score([1] * 17 + [0] * 11, torch.cat([m, n]).numpy())
    assert M.auc(m, n) == pytest.approx(want)
    # MUSE: a never-unlearned model (perfect member detection) leaks -100 %, the retain model 0 %
    assert M.priv_leak(1.0, 0.5) == -100.0
    assert M.priv_leak(0.5, 0.5) == 0.0
    assert M.priv_leak(0.3, 0.5) == pytest.approx(40.0)  # over-unlearned: ((1-0.3) - 0.5) / 0.5
    with pytest.raises(ValueError, match="auc_retrain < 1"):
        M.priv_leak(0.5, 1.0)


def test_extraction_strength_and_exact_memorization_by_hand():
    # from k = 2 on the predictions equal the labels: ES = 1 - 2/4
    assert M.extraction_strength([5, 9, 7, 8], [1, 2, 7, 8]) == 0.5
    assert M.extraction_strength([1, 2, 7, 8], [1, 2, 7, 8]) == 1.0
    assert M.extraction_strength([1, 2, 7, 9], [1, 2, 7, 8]) == 0.0  # not even the last token
    assert M.extraction_strength([0, 2, 0, 8], [1, 2, 7, 8]) == 0.25  # a match before a miss does not count
    assert M.exact_memorization([5, 9, 7, 8], [1, 2, 7, 8]) == 0.5
    with pytest.raises(ValueError, match="predictions for"):
        M.extraction_strength([1, 2], [1, 2, 3])
