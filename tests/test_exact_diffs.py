"""Diff format 2: Δ in the weights' dtype + a sparse exact correction (bit-exact round trips in bf16, fp16,
fp32, fp64), size bounds, factored LoRA diffs, the algebra of mixed entries, and reading format-1 files."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import lora, make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from hfhooks.core.params import ParamIndex
from hfhooks.diffs import BaseMismatchError, WeightDiff
from hfhooks.diffs.codec import decode_entry_meta

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hard_tuned(model, seed=1, rel=0.1, skip=("model.norm.weight",)):
    """A copy of ``model`` changed the ways that break a plain ``base + Δ``: small relative noise, sign flips,
    coordinates set to −0.0 and to 0, large changes; the ``skip`` tensors stay unchanged."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ParamIndex(out).items():
            if n in skip:
                continue
            w = p.detach().to(torch.float64)
            noise = torch.randn(w.shape, generator=g, dtype=torch.float64) * rel * w.abs().mean()
            w = w + noise
            flat = w.view(-1)
            k = max(1, flat.numel() // 50)
            pick = torch.randperm(flat.numel(), generator=g)[: 4 * k]
            flat[pick[:k]] = -flat[pick[:k]]  # sign flips: |Δ| ≫ |target|
            flat[pick[k : 2 * k]] = -0.0
            flat[pick[2 * k : 3 * k]] *= 37.0
            p.copy_(w.to(p.dtype))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])), k


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ParamIndex(model).items()}


# -- bit-exact round trips --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact_in_memory(dtype):
    base = make_model("llama").to(dtype)
    tuned = hard_tuned(base)
    d = WeightDiff.between(base, tuned, progress=False)
    assert d.exact is True
    assert all(e.dtype == dtype for e in d.entries.values())  # Δ in the weights' own dtype
    assert_bit_equal(params(d.apply(copy.deepcopy(base))), params(tuned))
    # exact="both": −Δ undoes it bit for bit too
    both = WeightDiff.between(base, tuned, exact="both", progress=False)
    assert both.exact is True and both.exact_inverse is True
    assert_bit_equal(params((-both).apply(copy.deepcopy(tuned))), params(base))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("storage", ["dense", "auto"])
def test_round_trip_is_bit_exact_through_checkpoints_and_files(tmp_path, dtype, storage):
    base = make_model("llama").to(dtype)
    tuned = hard_tuned(base)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    d = WeightDiff.between(
        tmp_path / "base", tmp_path / "tuned", storage=storage, out=tmp_path / "d.safetensors", progress=False
    )
    assert d.exact is True and d.metadata["path"]  # streamed to the file, read back lazily
    d.apply(tmp_path / "base", out=tmp_path / "out", progress=False)
    assert_bit_equal(
        load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "tuned" / "model.safetensors")
    )
    eager = WeightDiff.load(tmp_path / "d.safetensors")  # and the eager reader agrees
    assert_bit_equal(params(eager.apply(copy.deepcopy(base))), params(tuned))


def test_correction_is_used_only_where_it_holds():
    """Scale ≠ 1, check_base=False and another base: plain θ + scale·Δ (the correction is for the verified base
    at scale 1); the exact flag of a scaled diff is not claimed."""
    base = make_model("llama").to(torch.bfloat16)
    tuned = hard_tuned(base)
    d = WeightDiff.between(base, tuned, progress=False)
    assert any(e.fixes for e in d.entries.values())
    plain = WeightDiff.between(base, tuned, exact=False, progress=False)
    assert plain.exact is False  # the correction is needed: without it, bf16 Δ misses somewhere
    for scale in (0.5, 2.0):
        assert_bit_equal(
            params(d.apply(copy.deepcopy(base), scale=scale)),
            params(plain.apply(copy.deepcopy(base), scale=scale)),
        )
    s = 0.5 * d
    assert s.exact is None and all(e.fixes == 0 for e in s.entries.values())
    assert all(torch.equal(s[n], (d[n].float() * 0.5).to(d[n].dtype)) for n in d)
    other = hard_tuned(base, seed=7)  # task arithmetic on other weights, on purpose
    assert_bit_equal(
        params(d.apply(copy.deepcopy(other), check_base=False)),
        params(plain.apply(copy.deepcopy(other), check_base=False)),
    )


def test_round_trip_test_needs_the_correction():
    """The old default (float32 Δ, no correction) misses fp32 targets: the round-trip tests above can fail."""
    base = make_model("llama")
    tuned = hard_tuned(base)
    old = WeightDiff.between(base, tuned, dtype=torch.float32, exact=False, progress=False)
    assert old.exact is False
    got = params(old.apply(copy.deepcopy(base)))
    assert any(not torch.equal(bits(got[n]), bits(v)) for n, v in params(tuned).items())


# -- size ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_file_is_about_the_changed_tensors(tmp_path, dtype):
    base = make_model("llama").to(dtype)
    changed = {
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "lm_head.weight",
    }
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fine-tuning-like: noise at 10% of the weights' scale (bench_checkpoints' recipe)
        for n, p in ParamIndex(tuned).items():
            if n in changed:
                p.add_((torch.randn(p.shape, generator=g) * 0.1 * p.float().abs().mean()).to(dtype))
    d = WeightDiff.between(base, tuned, progress=False)
    path = d.save(tmp_path / "d.safetensors")
    with safe_open(path, "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    ref = ParamIndex(base)
    changed_bytes = sum(ref.param(n).numel() * ref.param(n).element_size() for n in changed)
    assert stored == d.nbytes() <= 1.1 * changed_bytes
    assert {n for n, e in d.entries.items() if e.storage != "zero"} == changed  # unchanged: no bytes
    assert_bit_equal(params(WeightDiff.load(path).apply(copy.deepcopy(base))), params(tuned))


def test_fillers_keep_correction_gaps_in_16_bits(tmp_path):
    """Corrections further apart than 2¹⁶ − 1 coordinates get harmless filler coordinates."""
    base = {"w": torch.randn(300_000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)}
    tuned = {"w": base["w"].clone()}
    far = [3, 70_000, 299_999]
    tuned["w"][far] = -0.0  # x + (−x) is +0.0: base + Δ misses there
    d = WeightDiff.between(base, tuned, progress=False)
    e = d.entry("w")
    assert e.fixes >= len(far) + 3  # fillers added
    back = WeightDiff.load(d.save(tmp_path / "d.safetensors"))
    assert torch.equal(back.entry("w").load()["fix_index"], e.load()["fix_index"])
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(base["w"].clone())
    back.apply(model)
    assert torch.equal(bits(model.w.data), bits(tuned["w"]))


# -- factored LoRA ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "targets", "kw"),
    [("llama", ["q_proj", "v_proj"], {}), ("gpt2", ["c_attn"], {"fan_in_fan_out": True})],
)
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_lora_diff_is_factored_and_equals_peft_merge(tmp_path, arch, targets, kw):
    base = make_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = lora(copy.deepcopy(base), targets, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = params(copy.deepcopy(peft_model).merge_and_unload())
    adapter_bytes = sum(
        t.numel() * t.element_size()
        for t in load_file(tmp_path / "adapter" / "adapter_model.safetensors").values()
    )
    for d in (WeightDiff.from_lora(peft_model), WeightDiff.from_lora(tmp_path / "adapter", base=base)):
        assert {e.storage for e in d.entries.values()} == {"factored"}
        path = d.save(tmp_path / "lora.safetensors")
        stored = WeightDiff.load(path)
        assert stored.nbytes() <= adapter_bytes + 8 * len(d)  # B, A and a float64 scaling per module
        applied = params(stored.apply(copy.deepcopy(base)))
        for n, v in merged.items():
            torch.testing.assert_close(applied[n], v, rtol=1e-6, atol=1e-7)
        dense = stored.to_dense()
        assert {e.storage for e in dense.entries.values()} == {"dense"}
        assert all(torch.equal(dense[n], stored[n]) for n in d)
        for n in d:
            torch.testing.assert_close(stored[n], merged[n] - params(base)[n], rtol=1e-5, atol=1e-6)


# -- algebra ---------------------------------------------------------------------------------------------------
_BASE = make_model("llama").to(torch.bfloat16)
_TASKS = [hard_tuned(_BASE, seed=s, rel=0.05) for s in (1, 2)]


def _variant(d: WeightDiff, kind: str) -> WeightDiff:
    return {"dense": d.to_dense(), "sparse": d.to_sparse(), "auto": d.to_auto(), "exact": d}[kind]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    kinds=st.tuples(*[st.sampled_from(["dense", "sparse", "auto", "exact"])] * 2),
    lam=st.sampled_from([0.5, -1.0, 0.3, 2.0, 1.0]),
    op=st.sampled_from(["sum", "diff", "neg", "scaled_sum", "div"]),
)
def test_linear_combinations_equal_the_tensor_by_tensor_result(kinds, lam, op):
    d1, d2 = (
        _variant(WeightDiff.between(_BASE, t, progress=False), k) for t, k in zip(_TASKS, kinds, strict=True)
    )
    t1, t2 = d1.to_dict(), d2.to_dict()
    wide = {n: torch.promote_types(t1[n].dtype, torch.float32) for n in t1}
    if op == "sum":
        got, want = d1 + d2, {n: t1[n] + t2[n] for n in t1}
    elif op == "diff":
        got, want = d1 - d2, {n: t1[n] - t2[n] for n in t1}
    elif op == "neg":
        got, want = -d1, {n: -t1[n] for n in t1}
    elif op == "div":
        got, want = d1 / lam, {n: (t1[n].to(wide[n]) / lam).to(t1[n].dtype) for n in t1}
    else:
        s = t1.keys()
        got = lam * (d1 + d2)
        want = {n: ((t1[n] + t2[n]).to(wide[n]) * lam).to(t1[n].dtype) for n in s}
    assert got.names() == list(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    # the base fingerprint is kept (−Δ starts from the target), the operation recorded, no exactness claimed
    # that does not hold
    assert got.metadata["base"] == (d1.metadata["target"] if op == "neg" else d1.metadata["base"])
    last = got.metadata["ops"][-1]
    name = {"sum": "add", "diff": "subtract", "neg": "negate", "div": "divide", "scaled_sum": "scale"}[op]
    assert (last["op"] if isinstance(last, dict) else last) == name
    claimed = {"neg": d1.exact_inverse, "div": d1.exact if lam == 1.0 else None}.get(op)  # Δ / 1 is Δ
    assert got.exact == claimed


def test_algebra_keeps_base_and_records_ops_and_refuses_other_bases():
    d1 = WeightDiff.between(_BASE, _TASKS[0], progress=False)
    d2 = WeightDiff.between(_BASE, _TASKS[1], progress=False)
    combo = 0.5 * (d1 + d2) - d2 / 4
    assert combo.metadata["base"] == d1.metadata["base"]
    ops = [o["op"] if isinstance(o, dict) else o for o in combo.metadata["ops"]]
    assert ops == ["between", "add", "scale", "subtract"]
    assert [o["op"] for o in combo.metadata["ops"][-1]["with"]] == ["between", "divide"]
    # the combination applies to the common base, and equals θ + Σ coefficients·Δ tensor by tensor
    got = params(combo.apply(copy.deepcopy(_BASE)))
    dense = combo.to_dict()
    for n, p in params(_BASE).items():
        assert torch.equal(got[n], (p.float() + dense[n].float()).to(p.dtype)), n
    other = WeightDiff.between(_TASKS[0], _TASKS[1], progress=False)
    with pytest.raises(
        BaseMismatchError, match=r"different bases: .*crc32:[0-9a-f]{8}.*crc32:[0-9a-f]{8}.*compose"
    ):
        _ = d1 + other
    with pytest.raises(BaseMismatchError):
        _ = d1 - other


def test_factored_algebra_matches_dense_up_to_rounding(tmp_path):
    base = make_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = lora(copy.deepcopy(base), ["q_proj"])
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    f = WeightDiff.from_lora(peft_model)
    dense = f.to_dense()
    task = WeightDiff.between(base, hard_tuned(base), progress=False)
    for got, want in [
        (-f, {n: -dense[n] for n in f}),  # exact
        (0.3 * f, {n: dense[n] * 0.3 for n in f}),  # folds into the scaling: one rounding apart
        (f + task, {n: dense[n] + task[n] for n in f}),
    ]:
        for n, v in want.items():
            torch.testing.assert_close(got[n], v, rtol=1e-6, atol=1e-8)
    assert all(torch.equal((-f)[n], -dense[n]) for n in f)
    assert {e.storage for e in (0.3 * f).entries.values()} == {"factored"}
    back = WeightDiff.load((-0.3 * f).save(tmp_path / "f.safetensors"))
    assert all(torch.equal(back[n], (-0.3 * f)[n]) for n in f)


# -- formats ---------------------------------------------------------------------------------------------------
def test_format_1_file_still_loads():
    """A file written by hfhooks before format 2 (float32 Δ, sparse and dense entries, no diff_format key)."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    base["h"] = torch.randn(4, 4, generator=g).to(torch.bfloat16)
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["w"][1] += 0.25
    tuned["w"][3, 2] = -tuned["w"][3, 2]
    tuned["h"] = (tuned["h"].float() * 1.5).to(torch.bfloat16)
    path = DATA / "diff_format1.safetensors"
    with safe_open(path, "pt") as f:
        assert "hfhooks.diff_format" not in f.metadata()
    for lazy in (False, True):
        d = WeightDiff.load(path, lazy=lazy)
        assert {n: d.entry(n).storage for n in d} == {"w": "sparse", "b": "sparse", "h": "dense"}
        assert d.entry("h").dtype == torch.float32  # format 1 stored float32 Δ for bf16 weights
        for n in base:
            want = (tuned[n].float() - base[n].float()).to(d[n].dtype)
            assert torch.equal(d[n], want), n


def test_format_1_cannot_claim_format_2_encodings():
    shapes = {"w": (torch.float32, (2, 2))}
    info = {"shape": [2, 2], "dtype": "float32", "storage": "zero", "crc32": {}}
    with pytest.raises(ValueError, match="diff format 1"):
        decode_entry_meta("w", info, shapes, version=1)
    decode_entry_meta("w", info, shapes, version=2)  # fine in format 2
    fixed = {
        "shape": [2, 2],
        "dtype": "float32",
        "storage": "dense",
        "crc32": {"w": "0"},
        "fixes": 1,
        "fix_dtype": "float32",
    }
    with pytest.raises(ValueError, match="no exact corrections"):
        decode_entry_meta("w", fixed, shapes, version=1)


def test_new_files_record_format_2(tmp_path):
    d = WeightDiff.between({"w": torch.zeros(2)}, {"w": torch.ones(2)}, progress=False)
    path = d.save(tmp_path / "d.safetensors")
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["hfhooks.diff_format"]) == 2
