"""WeightDiff: extraction and application (models and checkpoints), exactness flags, wrong-base refusal,
algebra (−Δ then +Δ), narrowing, quantisation, storage, file I/O (fuzzed), LoRA as a diff, TALL / consensus."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import lora, make_model, randomize_trainable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from hfhooks.core.params import ParamIndex, UnknownParameterError
from hfhooks.diffs import (
    BaseMismatchError,
    DiffFileError,
    WeightDiff,
    consensus_mask,
    consensus_merge,
    tall_masks,
    tensor_fingerprint,
)
from hfhooks.io.artifacts import write_artifact
from hfhooks.io.checkpoints import Checkpoint
from hfhooks.masks.mask import ParamMask

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturbed(model, seed=1, scale=1e-2, names=None, dtype=None):
    """A copy of ``model`` with Gaussian noise added (to ``names`` only, if given)."""
    out = copy.deepcopy(model)
    if dtype is not None:
        out = out.to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ParamIndex(out).items():
            if names is None or n in names:
                p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return out


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ParamIndex(model).items()}


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


# -- extraction, application, exactness ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox", "qwen2", "bert"])
def test_between_then_apply_reproduces_target(arch):
    base = make_model(arch).to(torch.bfloat16)
    tuned = perturbed(base)
    d = WeightDiff.between(base, tuned, progress=False)
    # bf16 Δ + exact correction (format 2; the fp32 Δ of format 1 was exact both ways): exact forward by
    # default, and both ways with exact="both"
    assert d.exact is True and all(e.dtype == torch.bfloat16 for e in d.entries.values())
    both = WeightDiff.between(base, tuned, exact="both", progress=False)
    assert both.exact is True and both.exact_inverse is True
    model = copy.deepcopy(base)
    assert d.apply(model) is model
    assert bitwise_equal(params(model), params(tuned))


def test_exactness_flag_is_truthful_for_float32():
    base = make_model("llama")
    tuned = make_model("llama", seed=3)  # unrelated weights: float32 Δ rounds somewhere
    # exact=False: the float32 Δ alone (the pre-format-2 default); the flag must then say it misses
    d32 = WeightDiff.between(base, tuned, dtype=torch.float32, exact=False, progress=False)
    d64 = WeightDiff.between(base, tuned, dtype=torch.float64, progress=False)
    default = WeightDiff.between(base, tuned, progress=False)  # float32 Δ + the exact correction
    assert d64.exact is True and d64.exact_inverse is True
    assert default.exact is True  # exact_inverse: truthful, checked below through -default
    for d in (d32, d64, default):
        model = d.apply(copy.deepcopy(base))
        for name, e in d.entries.items():
            same = torch.equal(
                ParamIndex(model).param(name).view(torch.int32), params(tuned)[name].view(torch.int32)
            )
            assert same == e.exact, name
    assert d32.exact is False  # and then it says so
    undone = (-default).apply(copy.deepcopy(tuned))
    for name, e in (-default).entries.items():
        same = torch.equal(
            ParamIndex(undone).param(name).view(torch.int32), params(base)[name].view(torch.int32)
        )
        assert same == e.exact, name


@pytest.mark.parametrize(
    ("dtype", "delta_dtype", "scale"),
    [(torch.bfloat16, None, 1e-2), (torch.bfloat16, torch.float64, 0.3), (torch.float32, torch.float64, 0.3)],
)
def test_minus_delta_then_plus_delta_is_the_identity(dtype, delta_dtype, scale):
    base = make_model("llama").to(dtype)
    tuned = perturbed(base, scale=scale)
    # exact="both": −Δ undoes exactly (the default corrects the forward direction only; format 1's fp32 Δ for
    # bf16 weights happened to be exact both ways)
    d = WeightDiff.between(base, tuned, dtype=delta_dtype, exact="both", progress=False)
    assert d.exact is True and d.exact_inverse is True
    model = copy.deepcopy(tuned)
    (-d).apply(model)  # tuned − Δ = base (−Δ's base is the tuned model)
    assert bitwise_equal(params(model), params(base))
    d.apply(model)
    assert bitwise_equal(params(model), params(tuned))
    # the algebra agrees: −(−Δ) = Δ and Δ followed by −Δ is zero everywhere
    assert all(torch.equal(d.negate().negate()[n], d[n]) for n in d)
    zero = d.compose(-d)
    assert all(zero[n].abs().max() == 0 for n in zero)
    assert (-d).exact == d.exact_inverse


def test_unchanged_coordinates_stay_bit_identical():
    base = make_model("llama")
    with torch.no_grad():
        base.model.norm.weight[0] = -0.0  # −0.0 + 0.0 would become +0.0
    tuned = perturbed(base, names={"model.layers.0.mlp.up_proj.weight"})
    d = WeightDiff.between(base, tuned, progress=False)
    model = d.apply(copy.deepcopy(base))
    assert torch.signbit(model.model.norm.weight[0])
    assert bitwise_equal(params(model), params(tuned))


def test_changed_only_reports_what_changed():
    base = make_model("llama")
    names = {"model.layers.1.self_attn.q_proj.weight", "lm_head.weight"}
    tuned = perturbed(base, names=names)
    d = WeightDiff.between(base, tuned, progress=False)
    assert set(d.changed) == names and len(d.unchanged) == len(d) - 2
    c = d.changed_only()
    assert set(c.names()) == names and set(c.metadata["unchanged"]) == set(d.unchanged)
    assert c.exact is True
    direct = WeightDiff.between(base, tuned, changed_only=True, progress=False)
    assert set(direct.names()) == names and set(direct.metadata["unchanged"]) == set(d.unchanged)
    assert bitwise_equal(params(c.apply(copy.deepcopy(base))), params(tuned))


def test_wrong_base_refused_and_nothing_changed():
    base = make_model("llama")
    tuned = perturbed(base)
    other = make_model("llama", seed=7)
    d = WeightDiff.between(base, tuned, progress=False)
    for wrong in (copy.deepcopy(tuned), copy.deepcopy(other)):
        before = params(wrong)
        with pytest.raises(BaseMismatchError, match="check_base=False"):
            d.apply(wrong)
        assert bitwise_equal(params(wrong), before)  # refused before touching anything
    forced = d.apply(copy.deepcopy(other), check_base=False)
    expected = other.model.layers[0].mlp.up_proj.weight + d["model.layers.0.mlp.up_proj.weight"]
    assert torch.allclose(forced.model.layers[0].mlp.up_proj.weight, expected)
    with pytest.raises(UnknownParameterError, match="Nearest"):
        WeightDiff({"model.layers.0.mlp.up_projj.weight": torch.zeros(64, 32)}).apply(base)
    with pytest.raises(ValueError, match="Shape mismatch"):
        WeightDiff({"model.norm.weight": torch.zeros(3)}).apply(base)


def test_scale_add_compose():
    base = make_model("llama")
    t1 = perturbed(base, seed=1, names={"model.layers.0.mlp.up_proj.weight"})
    t2 = perturbed(
        base, seed=2, names={"model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    )
    d1, d2 = WeightDiff.between(base, t1, progress=False), WeightDiff.between(base, t2, progress=False)
    s = d1 + d2
    assert s.exact is None  # not claimed
    for n in s:
        assert torch.equal(s[n], d1[n] + d2[n])
    half = d1.apply(copy.deepcopy(base), scale=0.5)
    w = base.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(
        half.model.layers[0].mlp.up_proj.weight, w + 0.5 * d1["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(
        (0.5 * d1)["model.layers.0.mlp.up_proj.weight"], d1["model.layers.0.mlp.up_proj.weight"] * 0.5
    )
    # compose needs the second diff computed on the first's target
    t12 = perturbed(t1, seed=3, names={"model.layers.1.mlp.down_proj.weight"})
    d12 = WeightDiff.between(t1, t12, progress=False)
    c = d1.compose(d12)
    model = c.apply(copy.deepcopy(base))
    assert torch.allclose(
        params(model)["model.layers.1.mlp.down_proj.weight"],
        params(t12)["model.layers.1.mlp.down_proj.weight"],
    )
    with pytest.raises(BaseMismatchError, match="compose"):
        d1.compose(d2)
    with pytest.raises(BaseMismatchError, match="use compose"):
        d1 + d12
    with pytest.raises(BaseMismatchError, match="different weights"):
        (d1 + d2).apply(copy.deepcopy(t1))


# -- narrowing and storage -------------------------------------------------------------------------------------
def test_restrict_layers_names_and_mask():
    base = make_model("gpt2")
    tuned = perturbed(base)
    d = WeightDiff.between(base, tuned, progress=False)
    by_layer = d.restrict(layers=[1])
    assert by_layer.names() and all(n.startswith("transformer.h.1.") for n in by_layer.names())
    assert "transformer.wte.weight" in by_layer.metadata["dropped"]
    assert d.restrict(layers=[-1]).names() == by_layer.names()
    assert d.restrict(names="*.mlp.*").names() == [n for n in d.names() if ".mlp." in n]
    with pytest.raises(UnknownParameterError):
        d.restrict(names="nothing.here")
    name = "transformer.h.0.mlp.c_fc.weight"
    mask = ParamMask.from_scores({name: torch.rand(d.entry(name).shape)}, 0.1)
    sparse = d.restrict(mask=mask)
    assert sparse.names() == [name] and sparse.entry(name).storage == "sparse"
    assert torch.equal(sparse[name], torch.where(mask[name], d[name], torch.zeros(())))
    model = sparse.apply(copy.deepcopy(base))
    moved = model.transformer.h[0].mlp.c_fc.weight != base.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(moved, mask[name] & (d[name] != 0))
    with pytest.raises(UnknownParameterError, match="names none"):
        d.restrict(mask=ParamMask({"other": torch.ones(2, dtype=torch.bool)}))


@pytest.mark.parametrize("levels", [2, 3, 16, 256])
def test_quantize(tmp_path, levels):
    base = make_model("llama")
    d = WeightDiff.between(base, perturbed(base), progress=False)
    q = d.quantize(levels)
    assert q.exact is None
    for n in d:
        values = q[n]
        assert values.unique().numel() <= levels
        step = (d[n].max() - d[n].min()) / (levels - 1)
        assert (values - d[n]).abs().max() <= step / 2 + 1e-6
        assert torch.equal((-q)[n], -values)  # negation of a quantised diff is exact
    back = WeightDiff.load(q.save(tmp_path / "q.safetensors"))
    assert all(torch.equal(back[n], q[n]) for n in q)
    assert q.nbytes() < d.nbytes() / (32 / 8 if levels > 16 else 32 / 4) * 1.2
    with pytest.raises(ValueError, match="2 to 256"):
        d.quantize(1)


def test_quantized_sparse_keeps_zeros_off_the_mask():
    base = make_model("llama")
    d = WeightDiff.between(base, perturbed(base), progress=False)
    name = "model.layers.0.mlp.up_proj.weight"
    mask = ParamMask.from_scores({name: torch.rand(d.entry(name).shape)}, 0.2)
    q = d.restrict(mask=mask).quantize(4)
    assert torch.equal(q[name] != 0, mask[name] & (q[name] != 0))
    assert (q[name][~mask[name]] == 0).all()


@pytest.mark.parametrize("storage", ["dense", "sparse", "auto"])
def test_storage_modes_decode_to_the_same_delta(tmp_path, storage):
    base = make_model("llama")
    tuned = perturbed(base, names={"model.layers.0.mlp.up_proj.weight"})
    ref = WeightDiff.between(base, tuned, progress=False)
    d = WeightDiff.between(base, tuned, storage=storage, progress=False)
    assert all(torch.equal(d[n], ref[n]) for n in ref)
    assert d.exact is True
    # unchanged tensors are free in every storage mode (format 2: "zero" entries; the dense default used to
    # store their zeros, so this compared against the dense diff's size)
    assert all(d.entry(n).storage == "zero" for n in d.unchanged) and len(d.unchanged) == len(d) - 1
    changed = ParamIndex(base).param("model.layers.0.mlp.up_proj.weight")
    assert d.nbytes() <= changed.numel() * changed.element_size() + changed.numel() // 8 + 64
    path = d.save(tmp_path / "d.safetensors")
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["hfhooks.tensors"])
    assert not any(k.startswith("model.norm.weight") for k in keys)
    assert meta["model.norm.weight"]["storage"] == "zero"
    assert WeightDiff.load(path).exact is True


# -- file I/O --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lazy", [False, True])
def test_save_load_round_trip(tmp_path, lazy):
    base = make_model("qwen2")
    d = WeightDiff.between(base, perturbed(base), progress=False)
    variants = {
        "dense": d,
        "sparse": d.to_sparse(),
        "quant": d.quantize(16),
        "neg": -d,
        "restricted": d.restrict(layers=[0]),
    }
    for key, v in variants.items():
        path = v.save(tmp_path / f"{key}.safetensors", note="hi")
        back = WeightDiff.load(path, lazy=lazy)
        assert back.names() == v.names() and back.metadata["note"] == "hi"
        assert back.exact == v.exact and back.exact_inverse == v.exact_inverse
        assert back.metadata["base"] == v.metadata["base"]
        for n in v:
            e, f = v.entry(n), back.entry(n)
            assert (e.storage, e.base, e.target, e.exact, e.changed) == (
                f.storage,
                f.base,
                f.target,
                f.exact,
                f.changed,
            )
            assert torch.equal(back[n], v[n])
        assert back.metadata["ops"] == v.metadata["ops"]


def test_loaded_diff_still_refuses_wrong_base(tmp_path):
    base = make_model("llama")
    tuned = perturbed(base)
    path = WeightDiff.between(base, tuned, progress=False).save(tmp_path / "d.safetensors")
    with pytest.raises(BaseMismatchError):
        WeightDiff.load(path, lazy=True).apply(copy.deepcopy(tuned))
    model = WeightDiff.load(path, lazy=True).apply(copy.deepcopy(base))
    assert bitwise_equal(params(model), params(WeightDiff.load(path).apply(copy.deepcopy(base))))


def test_bad_diff_files(tmp_path):
    base = make_model("llama")
    path = WeightDiff.between(base, perturbed(base), progress=False).save(tmp_path / "d.safetensors")
    ParamMask.full(base).save(tmp_path / "mask.safetensors")
    with pytest.raises(DiffFileError, match="'mask' file, not a 'diff'"):
        WeightDiff.load(tmp_path / "mask.safetensors")
    with pytest.raises(DiffFileError, match="not an hfhooks diff"):
        WeightDiff.load(tmp_path / "mask.safetensors", lazy=True)
    torch.save({"a": 1}, tmp_path / "pickle.safetensors")
    with pytest.raises(DiffFileError, match="pickle"):
        WeightDiff.load(tmp_path / "pickle.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the last tensor's data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(DiffFileError, match="digest mismatch"):
        WeightDiff.load(tmp_path / "flipped.safetensors")
    lazy = WeightDiff.load(tmp_path / "flipped.safetensors", lazy=True)  # header intact: found when read
    with pytest.raises(DiffFileError, match="CRC-32"):
        lazy.to_dict()


def _valid_meta(name="w", shape=(2, 3)) -> dict:
    return {
        name: {
            "shape": list(shape),
            "dtype": "float32",
            "storage": "dense",
            "base": None,
            "target": None,
            "exact": None,
            "exact_inverse": None,
            "changed": None,
            "crc32": {name: "00000000"},
        }
    }


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=10,
)
entry_fields = st.fixed_dictionaries(
    {},
    optional={
        "shape": st.lists(st.integers(-2, 8), max_size=3) | json_values,
        "dtype": st.sampled_from(["float32", "float16", "int8", "bogus"]) | json_values,
        "storage": st.sampled_from(["dense", "sparse", "quantized", "x"]) | json_values,
        "nnz": st.integers(-2, 10) | json_values,
        "levels": st.integers(0, 300) | json_values,
        "bits": st.sampled_from([1, 2, 4, 8, 3]) | json_values,
        "exact": json_values,
        "base": json_values,
        "crc32": json_values | st.just({"w": "00000000"}),
    },
)
stored = st.dictionaries(
    st.sampled_from(["w", "w::mask", "w::values", "w::codes", "w::range", "x"]),
    st.sampled_from(
        [
            torch.zeros(2, 3),
            torch.zeros(6, dtype=torch.uint8),
            torch.zeros(1, dtype=torch.uint8),
            torch.zeros(2),
            torch.ones(3),
        ]
    ).map(torch.clone),
    max_size=4,
)


@settings(FUZZ, max_examples=300)
@given(fields=entry_fields, tensors=stored, data=st.data())
def test_fuzzed_diff_metadata_gives_clean_errors(tmp_path_factory, fields, tensors, data):
    d = tmp_path_factory.mktemp("fuzz")
    entry = {**_valid_meta()["w"], **fields}
    meta = {"tensors": data.draw(st.just({"w": entry}) | json_values)}
    for lazy in (False, True):
        path = write_artifact(d / "d.safetensors", tensors, "diff", meta)
        try:
            diff = WeightDiff.load(path, lazy=lazy)
            diff.to_dict()
        except DiffFileError:
            pass


def _same_diff(a: WeightDiff, b: WeightDiff) -> bool:
    """Same entries, same recorded provenance, bitwise-identical Δ."""
    fields = ("shape", "dtype", "storage", "base", "target", "exact", "exact_inverse", "changed", "levels")
    return a.names() == b.names() and all(
        all(getattr(a.entry(n), f) == getattr(b.entry(n), f) for f in fields)
        and bitwise_equal({n: a[n]}, {n: b[n]})
        for n in a
    )


_FUZZ_DIFF = WeightDiff(
    {"a.weight": torch.randn(3, 4), "b": torch.randn(5), "c": torch.tensor([0.0, 1.5, 0.0, -2.0])}
).quantize(4, names="b")


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzzed_diff_bytes_never_load_silently(tmp_path_factory, data):
    """A mutated diff file either raises DiffFileError or — eagerly and lazily — loads a diff identical to the
    original (e.g. a flipped padding space that is still JSON whitespace). Mutations land in the JSON header and
    the tensor data, not just the (large) space padding of the reserved header."""
    d = tmp_path_factory.mktemp("bytes")
    original = _FUZZ_DIFF.to_sparse() if data.draw(st.booleans()) else _FUZZ_DIFF
    raw = bytearray(original.save(d / "d.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    json_end = 8 + len(raw[8 : 8 + n].rstrip(b" "))
    regions = [(0, json_end - 1), (8 + n, len(raw) - 1), (0, len(raw) - 1)]
    for _ in range(data.draw(st.integers(1, 3))):
        lo, hi = data.draw(st.sampled_from(regions))
        pos = data.draw(st.integers(lo, hi))
        if data.draw(st.booleans()):
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.integers(0, 3)) == 0:
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    (d / "m.safetensors").write_bytes(bytes(raw))
    for lazy in (False, True):
        try:
            loaded = WeightDiff.load(d / "m.safetensors", lazy=lazy)
            loaded.to_dict()
        except DiffFileError:
            continue
        assert _same_diff(loaded, original), f"a modified diff file loaded silently (lazy={lazy})"


# -- checkpoints -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_checkpoint_paths_match_in_memory(tmp_path, shard):
    base = make_model("llama")
    tuned = perturbed(base, scale=0.05)
    kw = {"max_shard_size": shard} if shard else {}
    base.save_pretrained(tmp_path / "base", **kw)
    tuned.save_pretrained(tmp_path / "tuned", **kw)
    mem = WeightDiff.between(base, tuned, progress=False)
    streamed = WeightDiff.between(
        tmp_path / "base", tmp_path / "tuned", out=tmp_path / "d.safetensors", progress=False
    )
    mixed = WeightDiff.between(base, tmp_path / "tuned", progress=False)
    assert sorted(streamed.names()) == sorted(mem.names()) == sorted(mixed.names())
    for n in mem:
        assert torch.equal(streamed[n], mem[n]) and torch.equal(mixed[n], mem[n])
        assert streamed.entry(n).base == mem.entry(n).base and streamed.entry(n).exact == mem.entry(n).exact
    out = streamed.apply(tmp_path / "base", out=tmp_path / "applied", progress=False)
    ckpt = Checkpoint(out)
    expected = params(mem.apply(copy.deepcopy(base)))
    for n in ckpt:
        assert torch.equal(ckpt.get(n), expected[n]), n
    assert len(ckpt.files) == len(Checkpoint(tmp_path / "base").files)
    with pytest.raises(BaseMismatchError):
        streamed.apply(tmp_path / "tuned", out=tmp_path / "wrong", progress=False)
    assert not (tmp_path / "wrong").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(ValueError, match="needs out="):
        streamed.apply(tmp_path / "base")


# -- LoRA ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "targets", "kw"),
    [
        ("llama", ["q_proj", "v_proj", "down_proj"], {}),
        ("llama", ["q_proj", "up_proj"], {"use_rslora": True}),
        ("gpt2", ["c_attn", "c_fc"], {"fan_in_fan_out": True}),
        ("llama", ["q_proj"], {"modules_to_save": ["lm_head"]}),
        (
            "llama",
            ["q_proj", "embed_tokens"],
            {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 16}},
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_lora_diff_equals_merge_minus_base(tmp_path, arch, targets, kw):
    base = make_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = randomize_trainable(lora(copy.deepcopy(base), targets, **kw))
    d = WeightDiff.from_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = params(copy.deepcopy(peft_model).merge_and_unload())
    ref = params(base)
    changed = {n for n in ref if not torch.equal(ref[n], merged[n])}
    assert set(d.names()) == changed
    for n in d:
        assert torch.allclose(d[n].float(), merged[n] - ref[n], atol=1e-6), n
    applied = d.apply(copy.deepcopy(base))  # the base fingerprints match the PeftModel's frozen weights
    assert bitwise_equal(params(applied), merged)
    if "modules_to_save" not in kw:
        from_dir = WeightDiff.from_lora(tmp_path / "adapter", base=base)
        assert from_dir.names() == sorted(d.names()) or set(from_dir.names()) == set(d.names())
        for n in d:
            assert torch.allclose(from_dir[n], d[n].float(), atol=1e-6)
        assert bitwise_equal(params(from_dir.apply(copy.deepcopy(base))), merged)


# -- TALL and consensus ----------------------------------------------------------------------------------------
def _disjoint_tasks(n_tasks=3):
    base = make_model("llama")
    names = ParamIndex(base).names()
    g = torch.Generator().manual_seed(0)
    owner = {n: torch.randint(0, n_tasks, ParamIndex(base).param(n).shape, generator=g) for n in names}
    tasks = []
    for t in range(n_tasks):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for n, p in ParamIndex(m).items():
                p.add_(torch.where(owner[n] == t, torch.randn(p.shape, generator=g) * 0.05, torch.zeros(())))
        tasks.append(m)
    return base, tasks


def test_tall_exact_recovery_on_disjoint_supports():
    base, tasks = _disjoint_tasks()
    diffs = {
        f"task{t}": WeightDiff.between(base, m, dtype=torch.float64, progress=False)
        for t, m in enumerate(tasks)
    }
    merged = diffs["task0"] + diffs["task1"] + diffs["task2"]
    masks = tall_masks(diffs, lam={"task0": 0.2, "task1": 0.4, "task2": 0.6})
    for t, (key, mask) in enumerate(masks.items()):
        assert mask.metadata["tall"]["lambda"] == {"task0": 0.2, "task1": 0.4, "task2": 0.6}[key]
        recon = merged.restrict(mask=mask).apply(copy.deepcopy(base), check_base=False)
        assert bitwise_equal(params(recon), params(tasks[t])), key
    as_list = tall_masks(list(diffs.values()), lam=0.4)
    assert all(a == b for a, b in zip(as_list, masks.values()))


def test_tall_mask_rule_is_strict():
    tau = {"w": torch.tensor([1.0, 1.0, 0.0, 2.0])}
    other = {"w": torch.tensor([2.5, 1.0, 0.0, 0.0])}
    d1, d2 = WeightDiff(tau), WeightDiff(other)
    m1, m2 = tall_masks([d1, d2], lam=1.0)
    # |τ1| > |τ_MTL − τ1| = |τ2|:  1 > 2.5 no, 1 > 1 no (strict), 0 > 0 no, 2 > 0 yes
    assert m1["w"].tolist() == [False, False, False, True]
    assert m2["w"].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="λ must be ≥ 0"):
        tall_masks([d1, d2], lam=-1)
    with pytest.raises(ValueError, match="2 λ values for"):
        tall_masks([d1, d2, d1], lam=[0.2, 0.3])


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_consensus_edge_cases(k):
    bits = [torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 1, 0, 1]), torch.tensor([1, 0, 0, 0, 0])]
    masks = [ParamMask({"w": b.bool()}) for b in bits]
    counts = torch.stack(bits).sum(0)
    if k > len(masks):
        with pytest.warns(UserWarning, match="keeps nothing"):
            m = consensus_mask(masks, k)
        assert not m["w"].any()
    else:
        m = consensus_mask(masks, k)
        assert torch.equal(m["w"], counts >= k)
    assert m.metadata["consensus"] == {"k": k, "tasks": 3}
    if k == 0:
        assert m["w"].all()
    if k == 1:
        assert torch.equal(m["w"], (masks[0] | masks[1] | masks[2])["w"])


def test_consensus_errors_and_merge():
    with pytest.raises(ValueError, match="at least one"):
        consensus_mask([])
    with pytest.raises(ValueError, match="k=-1"):
        consensus_mask([ParamMask({"w": torch.ones(2, dtype=torch.bool)})], -1)
    base, tasks = _disjoint_tasks(3)
    diffs = [WeightDiff.between(base, m, progress=False) for m in tasks]
    merged = consensus_merge(diffs, k=2)  # disjoint supports: no coordinate is shared by two tasks
    assert all(merged[n].abs().max() == 0 for n in merged)
    union = consensus_merge(diffs, k=1)
    total = diffs[0] + diffs[1] + diffs[2]
    assert all(torch.equal(union[n], total[n]) for n in total)


def test_tensor_fingerprint_sees_every_bit():
    t = torch.randn(100)
    u = t.clone()
    u.view(torch.int32)[57] ^= 1
    assert tensor_fingerprint(t) != tensor_fingerprint(u)
    assert tensor_fingerprint(t) != tensor_fingerprint(t.reshape(10, 10))
    assert tensor_fingerprint(t) == tensor_fingerprint(t.clone())


def test_repr_and_summary():
    base = make_model("llama")
    d = WeightDiff.between(base, perturbed(base), progress=False)
    assert "21 tensors" in repr(d) and "exact=True" in repr(
        WeightDiff.between(base, perturbed(base, dtype=None), dtype=torch.float64, progress=False)
    )
    rows = d.summary()
    assert rows[0]["name"] == d.names()[0] and rows[0]["bytes"] > 0
