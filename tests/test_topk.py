"""Exact global / per-tensor top-k (``hfhooks.masks.topk``) against a brute-force stable-argsort oracle."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hfhooks.masks.topk as topk_mod
from hfhooks import ParamMask, topk_masks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny chunks mean thousands of 65 536-bin histogram ops; with intra-op threads each one waits for a
    second core, which on a loaded machine costs a scheduler slice apiece. One thread keeps this file fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SPECIAL = (0.0, -0.0, float("inf"), float("-inf"), 1.0, -1.0, 65504.0, -65504.0, 1e-30, -1e-30)


def oracle(
    scores: dict[str, torch.Tensor], ratio: float, scope: str, largest: bool
) -> dict[str, torch.Tensor]:
    """Stable argsort of the concatenated scores: the reference semantics of ``topk_masks``."""

    def pick(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
        order = torch.argsort(-flat if largest else flat, stable=True)[:k]
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[order] = True
        out, start = [], 0
        for t in tensors:
            out.append(keep[start : start + t.numel()].reshape(t.shape))
            start += t.numel()
        return out

    names = list(scores)
    if scope == "tensor":
        return {n: pick([scores[n]], round(ratio * scores[n].numel()))[0] for n in names}
    k = round(ratio * sum(t.numel() for t in scores.values()))
    return dict(zip(names, pick([scores[n] for n in names], k)))


@st.composite
def score_dicts(draw) -> dict[str, torch.Tensor]:
    """Small dicts of score tensors: heavy ties, signed zeros, infinities, near-equal values, empty tensors."""
    n_tensors = draw(st.integers(1, 5))
    style = draw(st.sampled_from(["ints", "floats", "special", "near", "mixed"]))
    out = {}
    for i in range(n_tensors):
        shape = draw(st.sampled_from([(0,), (1,), (5,), (3, 4), (2, 0, 3), (17,), (4, 9), (2, 3, 5), ()]))
        numel = int(torch.Size(shape).numel())
        dtype = draw(st.sampled_from(DTYPES)) if style != "near" else torch.float32
        if style == "ints":
            vals = draw(st.lists(st.integers(-3, 3), min_size=numel, max_size=numel))
            vals = [float(v) for v in vals]
        elif style == "floats":
            vals = draw(
                st.lists(
                    st.floats(-1e4, 1e4, allow_nan=False, width=16 if dtype is torch.float16 else 32),
                    min_size=numel,
                    max_size=numel,
                )
            )
        elif style == "special":
            vals = draw(st.lists(st.sampled_from(SPECIAL), min_size=numel, max_size=numel))
        elif style == "near":  # same top 16 bits: exercises the second (low-16-bit) histogram pass
            base = draw(st.sampled_from([1.0, -1.0, 3.5, 1e-3]))
            ulp = torch.finfo(torch.float32).eps * abs(base)
            vals = [
                base + ulp * v for v in draw(st.lists(st.integers(-40, 40), min_size=numel, max_size=numel))
            ]
        else:
            vals = draw(
                st.lists(
                    st.one_of(st.sampled_from(SPECIAL), st.integers(-2, 2).map(float)),
                    min_size=numel,
                    max_size=numel,
                )
            )
        t = torch.tensor(vals, dtype=torch.float64).to(dtype).reshape(shape)
        out[f"t{i}"] = t.to(torch.float32).to(dtype)  # make sure no NaN from overflow
        assume(not bool(torch.isnan(out[f"t{i}"].float()).any()))
    return out


ratios = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.25, 0.1, 0.9, 0.999]), st.floats(0.0, 1.0))


def _run(scores, ratio, scope, largest, chunk):
    with mock.patch.object(topk_mod, "_CHUNK", chunk):
        return topk_masks(scores, ratio, scope=scope, largest=largest)


def _check(got, want, scores, ratio, scope):
    assert list(got) == list(scores)
    for name in scores:
        assert got[name].dtype == torch.bool
        assert got[name].shape == scores[name].shape
        assert torch.equal(got[name], want[name]), name
    if scope == "global":
        n = sum(t.numel() for t in scores.values())
        assert sum(int(m.sum()) for m in got.values()) == round(ratio * n)
    else:
        for name, t in scores.items():
            assert int(got[name].sum()) == round(ratio * t.numel())


@SETTINGS
@given(
    scores=score_dicts(),
    ratio=ratios,
    largest=st.booleans(),
    scope=st.sampled_from(["global", "tensor"]),
    chunk=st.sampled_from([7, 3, 1 << 22]),
)
def test_topk_matches_stable_argsort_oracle(scores, ratio, largest, scope, chunk):
    if any(t.dtype == torch.float64 for t in scores.values()):
        # The selection works on fp32 keys: compare against the oracle on fp32-rounded scores, and only
        # when rounding to fp32 creates no new ties (otherwise fp64 precision would decide the order).
        for t in scores.values():
            d = t.reshape(-1)
            assume(d.unique().numel() == d.float().unique().numel())
    got = _run(scores, ratio, scope, largest, chunk)
    _check(got, oracle(scores, ratio, scope, largest), scores, ratio, scope)


@SETTINGS
@given(scores=score_dicts(), ratio=ratios, largest=st.booleans(), chunk=st.sampled_from([7, 1 << 22]))
def test_param_mask_from_scores_matches_oracle(scores, ratio, largest, chunk):
    assume(all(t.dtype != torch.float64 for t in scores.values()))
    with mock.patch.object(topk_mod, "_CHUNK", chunk):
        mask = ParamMask.from_scores(scores, ratio, largest=largest)
    want = oracle(scores, ratio, "global", largest)
    assert mask.names() == list(scores)
    for name in scores:
        assert mask.granularity(name) == "element"
        assert torch.equal(mask[name], want[name])
    n = sum(t.numel() for t in scores.values())
    assert sum(k for k, _ in mask.counts().values()) == round(ratio * n)
    assert mask.metadata["selection"]["ratio"] == ratio


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_larger_random_inputs_with_ties(chunk):
    gen = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.randint(-50, 50, (300, 7), generator=gen).float(),
        "b": torch.randn(1000, generator=gen).half(),
        "c": torch.empty(0, 4),
        "d": torch.randn(64, 3, generator=gen).bfloat16(),
        "e": torch.randint(0, 3, (513,), generator=gen).float() * 0.0 - 0.0,  # all signed zeros
    }
    for largest in (True, False):
        for ratio in (0.0, 0.013, 0.5, 0.77, 1.0):
            for scope in ("global", "tensor"):
                got = _run(scores, ratio, scope, largest, chunk)
                _check(got, oracle(scores, ratio, scope, largest), scores, ratio, scope)


def test_integer_scores_are_accepted():
    scores = {"a": torch.tensor([3, 1, 2, 2]), "b": torch.tensor([[2, 0], [5, 2]], dtype=torch.int32)}
    got = topk_masks(scores, 0.5)
    _check(got, oracle(scores, 0.5, "global", True), scores, 0.5, "global")


def test_signed_zeros_tie_and_infinities_order():
    scores = {"a": torch.tensor([-0.0, 0.0, float("inf"), float("-inf")]), "b": torch.tensor([0.0, -0.0])}
    got = topk_masks(scores, 0.5)  # k = 3: inf, then the first two zeros in iteration order
    assert got["a"].tolist() == [True, True, True, False]
    assert got["b"].tolist() == [False, False]
    got = topk_masks(scores, 0.5, largest=False)  # -inf, then zeros in order
    assert got["a"].tolist() == [True, True, False, True]
    assert got["b"].tolist() == [False, False]


def test_docstring_example_and_ties_prefer_earlier_tensors():
    m = topk_masks({"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([2.0, 3.0])}, ratio=0.5)
    assert m["a"].tolist() == [True, False] and m["b"].tolist() == [False, True]
    m = topk_masks({"a": torch.ones(3), "b": torch.ones(3)}, ratio=0.5)
    assert m["a"].tolist() == [True, True, True] and m["b"].tolist() == [False, False, False]


@pytest.mark.parametrize("where", ["first", "last", "empty-neighbour"])
def test_nan_raises_value_error(where):
    a = torch.randn(10)
    b = torch.randn(4, 4)
    if where == "first":
        a[3] = float("nan")
    else:
        b[2, 1] = float("nan")
    scores = {"a": a, "e": torch.empty(0), "b": b}
    with pytest.raises(ValueError, match="NaN"):
        topk_masks(scores, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        ParamMask.from_scores(scores, 0.5, scope="tensor")


def test_nan_in_half_precision_raises():
    with pytest.raises(ValueError, match="NaN"):
        topk_masks({"a": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)}, 0.5)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        topk_masks({"a": torch.ones(3)}, ratio)


def test_bad_scope_and_empty_scores():
    with pytest.raises(ValueError, match="scope"):
        topk_masks({"a": torch.ones(3)}, 0.5, scope="layer")
    with pytest.raises(ValueError, match="No scores"):
        topk_masks({}, 0.5)


def test_all_empty_tensors():
    scores = {"a": torch.empty(0), "b": torch.empty(3, 0)}
    for ratio in (0.0, 0.5, 1.0):
        got = topk_masks(scores, ratio)
        assert got["a"].shape == (0,) and got["b"].shape == (3, 0)


def test_scores_are_not_modified_and_grad_tensors_work():
    a = torch.randn(20, requires_grad=True)
    before = a.detach().clone()
    got = topk_masks({"a": a * 1.0}, 0.3)
    assert int(got["a"].sum()) == 6
    assert torch.equal(a.detach(), before)


def test_non_contiguous_input():
    t = torch.randn(6, 5).t()  # non-contiguous
    got = _run({"t": t}, 0.4, "global", True, 7)
    assert torch.equal(got["t"], oracle({"t": t}, 0.4, "global", True)["t"])


def test_chunk_boundaries_with_monkeypatch(monkeypatch):
    """Tensors straddling chunk boundaries, threshold ties spread over several chunks and tensors."""
    monkeypatch.setattr(topk_mod, "_CHUNK", 7)
    g = torch.Generator().manual_seed(5)
    scores = {
        f"t{i}": torch.randint(0, 4, (n,), generator=g).float() for i, n in enumerate([6, 7, 8, 14, 15, 1, 0])
    }
    for ratio in (0.1, 0.33, 0.5, 0.8):
        for largest in (True, False):
            for scope in ("global", "tensor"):
                got = topk_masks(scores, ratio, scope=scope, largest=largest)
                _check(got, oracle(scores, ratio, scope, largest), scores, ratio, scope)
