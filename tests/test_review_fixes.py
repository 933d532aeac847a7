"""Found in an independent review of the never-lossy / surface work: each test fails on the code before its fix."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers as T
from conftest import make_model, random_input_ids
from test_diffs_integrity import peft_adapter

from hfhooks import AttributionAlignmentCallback, GradientRoutingCallback, TaggedCollator, TaggedDataset
from hfhooks.cli import main
from hfhooks.diffs import WeightDiff
from hfhooks.io.checkpoints import parse_layers
from hfhooks.masks.mask import ParamMask


# -- NaN/inf weights are reported by every training callback, not only GradientMaskCallback --------------------
def _poison_second_forward(model) -> None:
    calls = []

    def poison(module, args, kwargs, out):
        calls.append(1)
        if len(calls) == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    model.register_forward_hook(poison, with_kwargs=True)


def _args(tmp_path, **kw):
    opts = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2, report_to=[],
        use_cpu=True, logging_strategy="no", save_strategy="no", disable_tqdm=True, max_grad_norm=0.0,
    )  # fmt: skip
    opts.update(kw)
    return T.TrainingArguments(**opts)


def _nan_warnings(trainer) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return [str(w.message) for w in caught if "turned NaN or inf" in str(w.message)]


def test_routing_callback_warns_when_weights_turn_nan(tmp_path):
    model = make_model("llama")
    _poison_second_forward(model)
    ids = random_input_ids(6, 6)
    rows = [{"input_ids": ids[i], "labels": ids[i]} for i in range(6)]
    data = TaggedDataset(rows, tags={"routing": [1, 1, 0, 0, 1, 1]})
    cb = GradientRoutingCallback(mlp_units=4, heads=1, level="activation")
    trainer = T.Trainer(model=model, args=_args(tmp_path), train_dataset=data, data_collator=TaggedCollator(),
                        callbacks=[cb])  # fmt: skip
    found = _nan_warnings(trainer)
    assert len(found) == 1 and "GradientRoutingCallback" in found[0] and "optimizer step 2" in found[0]


def test_alignment_callback_warns_when_weights_turn_nan(tmp_path):
    from test_attribution import _bert, _data

    model = _bert()
    _poison_second_forward(model)
    data = TaggedDataset(_data(6), tags=["rationale"])
    cb = AttributionAlignmentCallback("grad_x_input", prior="rationale")
    trainer = T.Trainer(model=model, args=_args(tmp_path), train_dataset=data, data_collator=TaggedCollator(),
                        callbacks=[cb])  # fmt: skip
    found = _nan_warnings(trainer)
    assert len(found) == 1 and "AttributionAlignmentCallback" in found[0]


def test_no_warning_on_a_healthy_run(tmp_path):
    ids = random_input_ids(6, 6)
    rows = [{"input_ids": ids[i], "labels": ids[i]} for i in range(6)]
    data = TaggedDataset(rows, tags={"routing": [1, 1, 0, 0, 1, 1]})
    trainer = T.Trainer(model=make_model("llama"), args=_args(tmp_path), train_dataset=data,
                        data_collator=TaggedCollator(), callbacks=[GradientRoutingCallback(mlp_units=4, heads=1, level="activation")])  # fmt: skip
    assert _nan_warnings(trainer) == []


# -- layer ranges never shrink silently --------------------------------------------------------------------------
def test_out_of_range_layer_range_is_an_error_not_a_shorter_range():
    assert (
        parse_layers("4:6", 6) == [4, 5]
        and parse_layers("-2:", 6) == [4, 5]
        and parse_layers(":", 3) == [0, 1, 2]
    )
    for spec in ("4:8", "7:", "-9:2", slice(0, 99)):
        with pytest.raises(IndexError, match="the model has 6 layers"):
            parse_layers(spec, 6)


# -- CLI: usage errors exit 2 before any work; -q everywhere; honest counts; --storage auto for LoRA ------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ck")
    model = make_model("llama")
    model.save_pretrained(tmp / "base")
    model.save_pretrained(tmp / "same")
    ParamMask({"model.norm.weight": torch.ones(32, dtype=torch.bool)}).save(tmp / "m.safetensors")
    return tmp


@pytest.mark.parametrize(
    "argv",
    [
        ["restore", "{b}", "{s}", "--layers", "abc", "-o", "{t}/x"],
        ["restore", "{b}", "{s}", "--layers", "1:2:3:4", "-o", "{t}/x"],
        ["diff", "{b}", "{s}", "-o", "{t}/d.safetensors", "--layers", "0;1"],
        ["restore", "{b}", "{s}", "--layers", "0:1", "-o", "{t}/x", "--max-shard-size", "12ZB"],
        ["apply", "{t}/d.safetensors", "{b}", "-o", "{t}/x", "--max-shard-size", "lots"],
    ],
)
def test_bad_flag_values_are_usage_errors(ckpt, tmp_path, argv, capsys):
    argv = [a.format(b=ckpt / "base", s=ckpt / "same", t=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert not (tmp_path / "x").exists()


def test_layers_beyond_the_model_exit_1(ckpt, tmp_path, capsys):
    code = main(
        ["restore", str(ckpt / "base"), str(ckpt / "same"), "--layers", "0:99", "-o", str(tmp_path / "x")]
    )
    assert code == 1 and "layers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv", [["mask", "info", "{m}"], ["diff-info", "{d}"]])
def test_every_command_takes_quiet(ckpt, tmp_path, argv, capsys):
    d = tmp_path / "d.safetensors"
    WeightDiff.between(ckpt / "base", ckpt / "same", out=d, progress=False)
    argv = [a.format(m=ckpt / "m.safetensors", d=d) for a in argv]
    assert main([*argv, "-q", "--json"]) == 0
    json.loads(capsys.readouterr().out)


def test_diff_summary_counts_unchanged_tensors(ckpt, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    assert main(["diff", str(ckpt / "base"), str(ckpt / "same"), "-o", str(out), "-q", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["changed"] == 0 and result["unchanged"] == result["tensors"] > 0


def test_lora_diff_honours_storage_auto(tmp_path, capsys):
    base = make_model("llama")
    peft_adapter(tmp_path, base, ["q_proj", "v_proj"], zero=["v_proj"])  # v_proj's Δ = 0: sparse is smaller
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "d.safetensors"
    assert main(["diff", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(out), "-q",
                 "--storage", "auto"]) == 0  # fmt: skip
    d = WeightDiff.load(out)
    storage = {n: d.entry(n).storage for n in d}
    # format 2: a zero Δ is stored as no bytes at all ("zero"), smaller still than sparse
    assert {s for n, s in storage.items() if n.endswith("v_proj.weight")} == {"zero"}
    assert {s for n, s in storage.items() if n.endswith("q_proj.weight")} == {"factored"}  # was dense
    ref = WeightDiff.from_lora(tmp_path / "adapter", base=base)
    assert all(torch.equal(d[n], ref[n].to(d[n].dtype)) for n in ref)
