"""Adversarial review of the weight arithmetic (:mod:`hfhooks.merging`, :mod:`hfhooks.diffs`, ``hfhooks merge`` /
``hfhooks diff``): each test pins a bug the review found, on tiny inputs built in milliseconds."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import save_file

from hfhooks.cli import main
from hfhooks.diffs import WeightDiff
from hfhooks.io.checkpoints import Checkpoint
from hfhooks.merging import MergeConfig, load_recipe, merge, merge_tensors

BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))
    )


def adversarial_pairs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (base, tuned) pair of special values: ±0, ±1, ±inf, NaN, ±max, tiny, a subnormal, eps."""
    fi = torch.finfo(dtype)
    vals = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        math.inf,
        -math.inf,
        math.nan,
        fi.max,
        -fi.max,
        fi.tiny,
        fi.tiny / 4,
        fi.eps,
    ]
    s = torch.tensor(vals, dtype=torch.float64).to(dtype)
    return s.repeat_interleave(len(s)), s.repeat(len(s))


def holder(**tensors: torch.Tensor) -> torch.nn.Module:
    m = torch.nn.Module()
    for k, v in tensors.items():
        m.register_parameter(k, torch.nn.Parameter(v.clone(), requires_grad=False))
    return m


def tuned_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return tuned


# -- diffs ---------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Δ of 'w' overflows")  # ±max pairs: pinned below
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_exact_inverse_holds_on_special_values(dtype, storage):
    """``exact_inverse`` was checked as ``tuned − Δ`` but ``−d`` applies ``tuned + (−Δ)``: they differ in a NaN's
    sign bit, so ``(-d).apply(tuned)`` missed a NaN base while the flag said exact (fp16, fp32)."""
    base, tuned = adversarial_pairs(dtype)
    d = WeightDiff.between({"w": base}, {"w": tuned}, exact="both", storage=storage, progress=False)
    assert d.exact and d.exact_inverse
    m = holder(w=tuned)
    (-d).apply(m)
    assert bit_equal(m.w.data, base)
    d.apply(m)
    assert bit_equal(m.w.data, tuned)


@pytest.mark.parametrize("storage", ["sparse", "auto"])
def test_apply_to_a_non_contiguous_parameter(storage):
    """A sparse or zero entry with an exact correction indexed ``out.view(-1)`` of a clone that kept θ's strides:
    a transposed parameter raised "view size is not compatible"."""
    base = torch.randn(4, 6).t()
    tuned = base.clone()
    tuned[0, :2] += 1.0  # few changes: sparse storage, and a correction at several coordinates in bf16
    base, tuned = base.to(torch.bfloat16), tuned.to(torch.bfloat16)
    tuned[1:, 1] = tuned[1:, 1] + 0.3
    d = WeightDiff.between({"w": base}, {"w": tuned}, storage=storage, progress=False)
    assert d.entries["w"].storage == "sparse" and d.entries["w"].fixes
    m = holder(w=base.t().contiguous().t())  # the same values, transposed strides
    assert not m.w.is_contiguous()
    d.apply(m)
    assert bit_equal(m.w.data.contiguous(), tuned.contiguous())


def test_diff_of_models_dry_run():
    """``WeightSource.dtype`` read ``ParamInfo.dtype``, which does not exist: a dry run on models crashed."""
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    plan = WeightDiff.between(a, b, dry_run=True)
    assert plan.metadata["planned"] == ["weight", "bias"] and plan.metadata["planned_bytes"] == 8 * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_overflowing_delta_warns_and_stays_exact(dtype):
    """``max − (−max)`` is ``inf`` in the weights' dtype: exact at scale 1 through the correction, but ``c·Δ`` is
    ``±inf`` there — a warning names the tensor and the fix (a wider ``dtype=``)."""
    m = torch.finfo(dtype).max
    base, tuned = torch.tensor([m, -m, 1.0], dtype=dtype), torch.tensor([-m, m, 2.0], dtype=dtype)
    with pytest.warns(UserWarning, match=r"'w' overflows .* 2 coordinate"):
        d = WeightDiff.between({"w": base}, {"w": tuned}, progress=False)
    h = holder(w=base)
    d.apply(h)
    assert bit_equal(h.w.data, tuned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow: no warning, even where the correction is needed
        WeightDiff.between({"w": base[2:]}, {"w": torch.tensor([1.0 + 1e-3], dtype=dtype)}, progress=False)
        wide = WeightDiff.between({"w": base}, {"w": tuned}, dtype=torch.float64, progress=False)
    assert torch.isfinite(wide["w"]).all()


@pytest.mark.parametrize("c", [math.inf, -math.inf, math.nan])
def test_scaling_a_diff_by_a_non_finite_number_is_refused(c):
    d = WeightDiff.between({"w": torch.zeros(3)}, {"w": torch.ones(3)}, progress=False)
    for op in (lambda: c * d, lambda: d / c, lambda: d.scale(c)):
        with pytest.raises(ValueError, match="finite"):
            op()


# -- merging -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", [("task_arithmetic", {}), ("ties", {"density": 0.5})])
def test_merge_of_models(method, kw):
    """``merge(model, [models])`` (documented) crashed on ``ParamInfo.dtype``; it equals the tensor-by-tensor
    merge of the models' weights."""
    base = make_model("llama")
    tuned = [tuned_copy(base, 1), tuned_copy(base, 2)]
    report = merge(base, tuned, method, weights=[1.0, 0.5], **kw)
    cfg = MergeConfig(method=method, weights=(1.0, 0.5), **kw)
    params = [dict(m.named_parameters()) for m in (base, *tuned)]
    assert report.merged == list(params[0])
    for n, p in params[0].items():
        expected = merge_tensors(p.detach(), [t[n].detach() for t in params[1:]], cfg, n)
        assert torch.equal(report.state_dict[n], expected), n


@pytest.fixture
def ckpts(tmp_path: Path) -> tuple[Path, list[Path]]:
    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    for i in range(2):
        tuned_copy(base, i).save_pretrained(tmp_path / f"t{i}")
    return tmp_path / "base", [tmp_path / "t0", tmp_path / "t1"]


def test_peft_adapter_as_merge_input_is_refused_by_name(ckpts, tmp_path):
    """A LoRA adapter directory was reported as a model "of another architecture" lacking tensors; the error now
    says what it is and how to merge it, and the suggested route works."""
    peft = pytest.importorskip("peft")
    base, tuned = ckpts
    model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    for args in ((base, [tuned[0], tmp_path / "adapter"]), (tmp_path / "adapter", [base])):
        with pytest.raises(ValueError, match="PEFT adapter directory.*merge_and_unload"):
            merge(*args, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    full = WeightDiff.from_lora(tmp_path / "adapter", base=base).apply(
        base, out=tmp_path / "full", progress=False
    )
    assert merge(base, [full], out=tmp_path / "o", progress=False).path.is_dir()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weights": [0.0, 0.0]}, "every weight is 0"),
        ({"weights": 0.0}, "every weight is 0"),
        ({"method": "ties", "weights": [0, 0]}, "every weight is 0"),
        ({"weights": [1.0, -1.0], "normalize": True}, "sum to 0"),
        ({"weights": ["1", 1.0]}, r"weights=\['1', 1.0\]"),  # a quoted number was parsed by float()
        ({"names": 5}, "names=5"),
        ({"names": [""]}, "names"),
    ],
)
def test_weights_and_names_that_cannot_act_are_refused(ckpts, tmp_path, kwargs, match):
    """All-zero weights merged into the base itself and weights summing to 0 with ``normalize`` were silently
    divided by 1 (mergekit's fallback); a string weight was parsed, ``names=5`` raised a bare TypeError."""
    base, tuned = ckpts
    with pytest.raises(ValueError, match=match):
        merge(base, tuned, out=tmp_path / "o", progress=False, **kwargs)
    assert not (tmp_path / "o").exists()
    if "names" not in kwargs and not isinstance(kwargs["weights"], float):
        with pytest.raises(ValueError, match=match):  # the plain function too
            merge_tensors(torch.zeros(3), [torch.ones(3), torch.ones(3)], MergeConfig(**kwargs))


@pytest.mark.parametrize(
    "recipe,match",
    [
        ({"models": [{"model": "t", "parameters": {"weight": "abc"}}]}, r"weights=\('abc',\)"),
        ({"models": [{"model": "t", "parameters": 5}]}, r"models\[0\].parameters=5"),
        ({"models": [{"model": "t", "parameters": ["weight"]}]}, r"models\[0\].parameters=\['weight'\]"),
        ({"parameters": ["lambda"]}, r"parameters=\['lambda'\] must be a mapping"),
        ({"parameters": {"names": 5}}, "names=5"),
        ({"dtype": "float32", "out_dtype": "bfloat16"}, "dtype='float32' and out_dtype='bfloat16' differ"),
    ],
)
def test_recipe_errors_name_the_bad_value(recipe, match):
    """These raised bare ``TypeError`` / ``AttributeError`` / "could not convert string to float", or (two
    dtypes) silently ignored ``dtype``."""
    with pytest.raises(ValueError, match=match):
        load_recipe({"base_model": "b", "models": ["t"], **recipe})


# -- the CLI -------------------------------------------------------------------------------------------------------
def test_cli_diff_layers_and_names_intersect(ckpts, tmp_path, capsys):
    """``hfhooks diff --layers 0 --names '*mlp*'`` wrote the union (every tensor of layer 0 and every MLP of
    every layer); ``restrict``, ``merge`` and the LoRA path all take the intersection."""
    base, tuned = ckpts
    out = tmp_path / "d.safetensors"
    assert (
        main(["diff", str(base), str(tuned[0]), "-o", str(out), "--layers", "0", "--names", "*mlp*", "-q"])
        == 0
    )
    names = WeightDiff.load(out).names()
    assert names == [n for n in Checkpoint(base) if n.startswith("model.layers.0.mlp.")] and names
    capsys.readouterr()
    argv = ["diff", str(base), str(tuned[0]), "-o", str(tmp_path / "e.safetensors"), "--layers", "0"]
    code = main([*argv, "--names", "lm_head.weight", "-q"])
    assert code == 1 and "selects no tensor" in capsys.readouterr().err
    assert not (tmp_path / "e.safetensors").exists()


@pytest.mark.filterwarnings("ignore:Δ of 'w' overflows")
def test_exact_round_trip_through_checkpoint_files_with_special_values(tmp_path):
    """The streamed checkpoint apply (blocks, correction per block) on the adversarial values, both ways."""
    base, tuned = adversarial_pairs(torch.float16)
    (tmp_path / "b").mkdir()
    save_file({"w": base, "s": torch.tensor(1.5, dtype=torch.float16)}, tmp_path / "b" / "model.safetensors")
    d = WeightDiff.between(
        tmp_path / "b",
        {"w": tuned, "s": torch.tensor(-0.0, dtype=torch.float16)},
        exact="both",
        progress=False,
    )
    out = d.apply(tmp_path / "b", out=tmp_path / "t", progress=False)
    back = (-d).apply(out, out=tmp_path / "back", progress=False)
    with Checkpoint(out) as t, Checkpoint(back) as b:
        assert bit_equal(t.get("w"), tuned) and bit_equal(b.get("w"), base)
        assert bit_equal(t.get("s"), torch.tensor(-0.0, dtype=torch.float16))


def test_restrict_to_no_names_is_refused_not_an_empty_diff():
    diff = WeightDiff({"w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"names=\[\]\) selects no tensor"):
        diff.restrict(names=[])
    assert diff.restrict(names=("w",)).names() == ["w"]  # any iterable of names, including a tuple
