"""Diff integrity (issue 11): all-or-nothing in-memory apply, safetensors headers that look like pickles,
eager CRC checks, the reserved ``::`` separator, diff algebra on one base, and LoRA adapters read as diffs
with peft's own pattern rules and merge as the oracle."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import make_model
from safetensors import safe_open
from safetensors.torch import save_file

from hfhooks.core.params import ParamIndex
from hfhooks.diffs import BaseMismatchError, DiffFileError, WeightDiff
from hfhooks.io.artifacts import artifact_digest, metadata_digest
from hfhooks.io.safetensors import read_safetensors_header
from hfhooks.masks.mask import ParamMask

PICKLE_LIKE = {640, 896, 1152, 1408}  # header lengths (mod 2**16) whose first bytes are \x80\x02 … \x80\x05


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ParamIndex(model).items()}


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


def header_length(path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def perturbed(model, seed=1, scale=1e-2):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def rewrite(path, out, edit) -> None:
    """Copy the diff file ``path`` to ``out`` after ``edit(metadata, tensors)``, with both digests recomputed —
    a file only an hfhooks-aware tool could forge, so only the per-entry checks can catch it."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    edit(meta, tensors)
    meta["hfhooks.meta_digest"] = json.dumps(metadata_digest(meta))
    meta["hfhooks.digest"] = artifact_digest(meta, tensors)
    save_file(tensors, str(out), metadata=meta)


# -- item 6: a safetensors header length is not a pickle marker ----------------------------------------------
def test_every_one_tensor_mask_loads_back_whatever_its_name_length(tmp_path):
    hit = set()
    for length in range(1, 400):
        name = "w" * length
        mask = ParamMask({name: torch.tensor([True, False, True])})
        path = mask.save(tmp_path / "m.safetensors")
        hit.add(header_length(path) % 65536)
        loaded = ParamMask.load(path)
        assert list(loaded) == [name] and torch.equal(loaded[name], mask[name]), length
    assert PICKLE_LIKE & hit, "the sweep never produced a header that starts like a pickle"


@pytest.mark.parametrize("target", sorted(PICKLE_LIKE))
def test_diff_whose_header_starts_like_a_pickle_loads_back(tmp_path, target):
    """Pad the metadata until the diff writer's header length is ≡ target (mod 2**16) (bisection: the length
    grows monotonically with the padding), then load the file both ways."""
    d = WeightDiff({"layer.weight": torch.randn(3, 2)})

    def length(pad: int) -> int:
        return header_length(d.save(tmp_path / "d.safetensors", note="x" * pad))

    goal = length(0) + (target - length(0)) % 65536
    lo, hi = 0, 1
    while length(hi) < goal:
        hi *= 2
    while lo < hi:  # the smallest padding whose header reaches the goal
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if length(mid) < goal else (lo, mid)
    path = d.save(tmp_path / "d.safetensors", note="x" * lo)
    assert header_length(path) % 65536 == target
    with open(path, "rb") as f:
        assert f.read(2) == bytes([0x80, target // 256])
    for lazy in (False, True):
        assert torch.equal(WeightDiff.load(path, lazy=lazy)["layer.weight"], d["layer.weight"])


def test_real_pickles_are_still_refused(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.safetensors")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.safetensors", _use_new_zipfile_serialization=False)
    for name, kind in (("zip", "zip archive"), ("legacy", "Python pickle")):
        with pytest.raises(DiffFileError, match=kind):
            WeightDiff.load(tmp_path / f"{name}.safetensors")


# -- item 4: an in-memory apply of a corrupt lazy diff changes nothing ----------------------------------------
@pytest.mark.parametrize("storage", ["dense", "sparse", "quantized"])
def test_lazy_apply_of_corrupt_diff_leaves_the_model_untouched(tmp_path, storage):
    base = make_model("llama")
    d = WeightDiff.between(base, perturbed(base), progress=False)
    d = d.to_sparse() if storage == "sparse" else d.quantize(16) if storage == "quantized" else d
    path = d.save(tmp_path / "d.safetensors")
    infos = read_safetensors_header(path)[0]
    last = max(infos.values(), key=lambda i: i.start)  # stored last: read after every other entry
    raw = bytearray(path.read_bytes())
    raw[last.start + (last.end - last.start) // 2] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    lazy = WeightDiff.load(tmp_path / "bad.safetensors", lazy=True)  # the header is intact: loads lazily
    model = copy.deepcopy(base)
    before = params(model)
    with pytest.raises(DiffFileError, match="CRC-32"):
        lazy.apply(model)
    assert bitwise_equal(params(model), before)
    with pytest.raises(DiffFileError, match="CRC-32"):  # also through derived (scaled, negated) diffs
        (0.5 * lazy).apply(model)
    assert bitwise_equal(params(model), before)


# -- item 7: eager loads check the per-tensor CRCs; "::" names are refused -----------------------------------
def test_eager_load_checks_recorded_crcs(tmp_path):
    path = WeightDiff({"a": torch.ones(4), "b": torch.zeros(3)}).save(tmp_path / "d.safetensors")

    def edit(meta, tensors):
        tensors["b"][0] = 1.0  # the digests are recomputed, the recorded CRC of "b" is not

    rewrite(path, tmp_path / "e.safetensors", edit)
    for lazy in (False, True):
        with pytest.raises(DiffFileError, match="'b' failed its CRC-32 check"):
            WeightDiff.load(tmp_path / "e.safetensors", lazy=lazy).to_dict()


def test_names_with_the_reserved_separator_are_refused_on_read(tmp_path):
    path = WeightDiff({"a": torch.ones(4)}).save(tmp_path / "d.safetensors")

    def edit(meta, tensors):
        info = json.loads(meta["hfhooks.tensors"])
        info["x::y"] = info.pop("a")
        info["x::y"]["crc32"] = {"x::y": info["x::y"]["crc32"]["a"]}
        meta["hfhooks.tensors"] = json.dumps(info)
        tensors["x::y"] = tensors.pop("a")

    rewrite(path, tmp_path / "e.safetensors", edit)
    for lazy in (False, True):
        with pytest.raises(DiffFileError, match="'x::y' contains '::'"):
            WeightDiff.load(tmp_path / "e.safetensors", lazy=lazy)
    with pytest.raises(ValueError, match="reserve"):
        WeightDiff({"x::y": torch.ones(2)}).save(tmp_path / "f.safetensors")


# -- item 17: linear combinations of diffs from one base ------------------------------------------------------
COMBOS = {
    "lam*(t1+t2)": lambda a, b, c: 0.3 * (a + b),
    "(t1+t2)*lam": lambda a, b, c: (a + b) * 0.3,
    "t1-t2": lambda a, b, c: a - b,
    "-t1+t2": lambda a, b, c: -a + b,
    "t1-(-t2)": lambda a, b, c: a - (-b),
    "2*t1-t2/3+c": lambda a, b, c: 2 * a - b / 3 + c,
    "-(t1+t2)+t3": lambda a, b, c: -(a + b) + c,
    "(t1-t2)/7*-2": lambda a, b, c: (a - b) / 7 * -2,
    "0.5*(-t1)": lambda a, b, c: 0.5 * (-a),
    "-(t1+t2)": lambda a, b, c: -(a + b),
}


@pytest.fixture(scope="module")
def tasks():
    base = make_model("llama")
    diffs = [WeightDiff.between(base, perturbed(base, seed=s), progress=False) for s in (1, 2, 3)]
    return base, diffs


@pytest.mark.parametrize("combo", list(COMBOS))
def test_linear_combinations_of_one_base(tmp_path, tasks, combo):
    base, diffs = tasks
    fn = COMBOS[combo]
    d = fn(*diffs)
    assert sorted(d.names()) == sorted(diffs[0].names())
    for n in d:  # the same combination done tensor by tensor, bit for bit
        assert torch.equal(d[n], fn(*(x[n] for x in diffs))), n
    if combo not in ("0.5*(-t1)", "-(t1+t2)"):  # (a multiple of) −Δ records its path base: the target
        assert d.metadata["base"] == diffs[0].metadata["base"]
    model = d.apply(copy.deepcopy(base))  # checked against the base: it is a diff of that base
    ref = params(base)
    assert bitwise_equal(params(model), {n: ref[n] + d[n] for n in ref})
    last = d.metadata["ops"][-1]
    assert (last if isinstance(last, str) else last["op"]) in ("add", "subtract", "scale", "divide", "negate")
    reloaded = WeightDiff.load(d.save(tmp_path / "d.safetensors"))
    assert reloaded.metadata["base"] == d.metadata["base"]
    (reloaded + diffs[0]).apply(copy.deepcopy(base))  # the linear base survives a save


def test_negation_still_undoes_and_still_composes(tasks):
    base, (t1, _, _) = tasks
    tuned = t1.apply(copy.deepcopy(base))
    assert bitwise_equal(params((-t1).apply(copy.deepcopy(tuned))), params(base)) is (
        t1.exact_inverse is True
    )
    (-t1).apply(copy.deepcopy(base))  # and task negation on the base is accepted too
    assert all(not bool(t1.compose(-t1)[n].ne(0).any()) for n in t1)


def test_combinations_of_different_bases_are_refused(tasks):
    base, (t1, t2, _) = tasks
    other = perturbed(base, seed=9)
    s = WeightDiff.between(other, perturbed(other, seed=4), progress=False)
    for combo in (
        lambda: t1 + s,
        lambda: t1 - s,
        lambda: -t1 + s,
        lambda: 2 * t1 - s / 2,
        lambda: -(t1 + t2) + s,
    ):
        with pytest.raises(BaseMismatchError, match="different bases"):
            combo()
    with pytest.raises(BaseMismatchError):
        (0.5 * (t1 - t2)).apply(copy.deepcopy(other))
    with pytest.raises(ZeroDivisionError):
        t1 / 0
    with pytest.raises(TypeError):
        t1 * "2"


# -- item 16: LoRA adapters as diffs, with peft as the oracle --------------------------------------------------
def peft_adapter(tmp_path, base, targets, zero=(), **kw):
    """A random LoRA on a copy of ``base`` (lora_B of modules containing a ``zero`` name left at 0), saved to
    ``tmp_path/adapter``. Returns the PeftModel peft loads back from that directory — the oracle for reading
    the directory (peft's JSON config may list pattern keys in another order than the live config) — and
    peft's merged weights of it."""
    import peft

    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny models; peft 0.21 mistakes a lora_B bias for a ZeRO-3 shard
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and not (any(z in n for z in zero) and "lora_B" in n):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.save_pretrained(tmp_path / "adapter")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
        merged = params(copy.deepcopy(loaded).merge_and_unload())
    return loaded, merged


PATTERNS = {
    "regex-or": ({"q_proj|v_proj": 4}, {"q_proj|v_proj": 16}),
    # overlapping keys: the first in the file wins (listed sorted: peft writes the JSON with sorted keys, and
    # cannot reload its own adapter when the live order differed and set another rank)
    "overlapping": ({"q_proj": 3, "self_attn.q_proj": 5}, {"q_proj": 9, "self_attn.q_proj": 2}),
    "rank-only": ({"up_proj": 4}, {}),
    "alpha-only-overlap": ({}, {"layers.1.mlp.up_proj": 3, "up_proj": 12}),
    "dotted-regex": ({r"layers\.0\..*": 4}, {"v_proj": 1}),
}


@pytest.mark.parametrize("case", list(PATTERNS))
def test_lora_dir_scaling_follows_peft_patterns(tmp_path, case):
    from hfhooks.masks.lora import lora_layers, lora_scaling

    rank_pattern, alpha_pattern = PATTERNS[case]
    base = make_model("llama")
    model, merged = peft_adapter(
        tmp_path,
        base,
        ["q_proj", "v_proj", "up_proj"],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    names = {id(m): n for n, m in model.base_model.model.named_modules()}
    for layer in lora_layers(model).values():  # peft's own scaling of every module
        assert lora_scaling(cfg, names[id(layer)]) == layer.scaling["default"], names[id(layer)]
    d = WeightDiff.from_lora(tmp_path / "adapter", base=base)
    assert bitwise_equal(params(d.apply(copy.deepcopy(base))), merged)


def test_pattern_fallback_matches_installed_peft():
    other = pytest.importorskip("peft.utils.other")
    if not hasattr(other, "get_pattern_key"):
        pytest.skip("this peft has no get_pattern_key (peft 0.13)")
    from hfhooks.masks.lora import _pattern_key

    keys = [
        "q_proj",
        "q_proj|v_proj",
        "proj",
        "self_attn.q_proj",
        r"layers\.0\..*",
        "mlp.*",
        "v_proj",
        "0.mlp",
    ]
    modules = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.0.mlp.up_proj",
        "q_proj",
        "model.layers.10.mlp",
        "model.layers.1.self_attn.xq_proj",
    ]
    for i in range(len(keys)):
        for j in range(len(keys)):
            order = [keys[i], keys[j], *keys]
            for m in modules:
                assert _pattern_key(order, m) == other.get_pattern_key(order, m), (order, m)


def test_lora_bias_is_part_of_the_diff(tmp_path):
    import peft

    if "lora_bias" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip("this peft has no lora_bias")
    base = make_model("gpt2")
    model, merged = peft_adapter(tmp_path, base, ["c_attn", "c_fc"], lora_bias=True, fan_in_fan_out=True)
    for d in (WeightDiff.from_lora(model), WeightDiff.from_lora(tmp_path / "adapter", base=base)):
        assert any(n.endswith("c_attn.bias") for n in d)
        assert bitwise_equal(params(d.apply(copy.deepcopy(base))), merged)


def test_lora_dir_modules_to_save_are_diffed_not_dropped(tmp_path):
    base = make_model("llama")
    _, merged = peft_adapter(tmp_path, base, ["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="modules_to_save copies .*lm_head.weight.*Pass base="):
        WeightDiff.from_lora(tmp_path / "adapter")
    d = WeightDiff.from_lora(tmp_path / "adapter", base=base)
    assert "lm_head.weight" in d
    assert bitwise_equal(params(d.apply(copy.deepcopy(base))), merged)


def test_lora_dir_with_unknown_tensors_is_refused(tmp_path):
    base = make_model("llama")
    peft_adapter(tmp_path, base, ["q_proj"])
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    with safe_open(str(f), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = torch.ones(2, 32)
    save_file(tensors, str(f))
    with pytest.raises(NotImplementedError, match="trainable_tokens_delta"):
        WeightDiff.from_lora(tmp_path / "adapter", base=base)


def test_cli_diff_of_lora_dir_honours_dtype_and_changed_only(tmp_path, capsys):
    from hfhooks.cli import main

    base = make_model("llama")
    _, merged = peft_adapter(tmp_path, base, ["q_proj", "v_proj"], zero=["v_proj"])
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "d.safetensors"
    args = ["diff", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(out), "--quiet"]
    assert main([*args, "--dtype", "float64", "--changed-only"]) == 0
    d = WeightDiff.load(out)
    assert d.names() and all(n.endswith("q_proj.weight") for n in d)  # v_proj's Δ is 0: left out
    assert {d.entry(n).dtype for n in d} == {torch.float64}
    assert any(n.endswith("v_proj.weight") for n in d.metadata["unchanged"])
    applied = params(d.apply(copy.deepcopy(base)))  # s·B·A in float64: close to peft's float32 merge
    assert all(torch.allclose(applied[n], merged[n], atol=1e-6, rtol=0) for n in merged)
