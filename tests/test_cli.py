"""The ``hfhooks`` command: diff, diff-info, apply, restore, search-restore (and mask info still there)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import transformers as T
from conftest import lora, make_model

from hfhooks.cli import build_parser, main
from hfhooks.core.params import ParamIndex
from hfhooks.diffs import WeightDiff
from hfhooks.io.checkpoints import Checkpoint
from hfhooks.masks.mask import ParamMask
from hfhooks.restoration.restore import restore_layers


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def char_tokenizer() -> T.PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = " abcdefghijklmnopqrstuvwxyz0123456789.,:\n"
    vocab = {"[PAD]": 0, "[UNK]": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture
def ckpts(tmp_path):
    """base/ and tuned/ checkpoints (sharded) of a 4-layer Llama; tuned differs in layers 1–2 only."""
    base = make_model("llama", num_hidden_layers=4)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ParamIndex(tuned).items():
            if ".layers.1." in n or ".layers.2." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    tuned.save_pretrained(tmp_path / "tuned", max_shard_size="40KB")
    return base, tuned, tmp_path


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("mask", "diff", "diff-info", "apply", "restore", "search-restore"):
        assert cmd in out
    for cmd in ("diff", "diff-info", "apply", "restore", "search-restore"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "usage: hfhooks" in text and (cmd == "diff-info" or "Example: hfhooks" in text)
    assert build_parser().prog == "hfhooks"


@pytest.mark.slow  # a fresh interpreter importing torch + transformers
def test_console_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "hfhooks", "restore", "--help"], capture_output=True, text=True, check=True
    )
    assert "--layers" in out.stdout and "--in-place" in out.stdout


def test_diff_info_apply_round_trip(capsys, ckpts):
    base, tuned, tmp = ckpts
    code, out, _ = run(
        capsys, "diff", tmp / "base", tmp / "tuned", "-o", tmp / "d.safetensors", "--dtype", "float64", "-q"
    )
    assert code == 0 and "exact=true" in out and "changed=18" in out
    code, out, _ = run(capsys, "diff-info", tmp / "d.safetensors", "--limit", "3")
    assert code == 0 and "TOTAL" in out and "more tensors" in out and "ops:" in out
    code, out, _ = run(capsys, "diff-info", tmp / "d.safetensors", "--json")
    info = json.loads(out)
    assert info["exact"] is True and len(info["tensors"]) == len(ParamIndex(base))
    code, out, _ = run(capsys, "apply", tmp / "d.safetensors", tmp / "base", "-o", tmp / "applied", "-q")
    assert code == 0 and "applied" in out
    applied, want = Checkpoint(tmp / "applied"), tuned.state_dict()
    assert all(torch.equal(applied.get(n), want[n]) for n in applied)
    # the wrong base is refused with a clean message and exit code 2; nothing is written
    code, _, err = run(capsys, "apply", tmp / "d.safetensors", tmp / "tuned", "-o", tmp / "wrong", "-q")
    assert code == 1 and "--no-check-base" in err and "Traceback" not in err and not (tmp / "wrong").exists()
    code, _, _ = run(
        capsys, "apply", tmp / "d.safetensors", tmp / "tuned", "-o", tmp / "forced", "--no-check-base", "-q"
    )
    assert code == 0
    # an existing output needs --overwrite
    code, _, err = run(capsys, "apply", tmp / "d.safetensors", tmp / "base", "-o", tmp / "applied", "-q")
    assert code == 1 and "--overwrite" in err
    # −Δ in place takes tuned back to base
    code, _, _ = run(
        capsys,
        "apply",
        tmp / "d.safetensors",
        tmp / "applied",
        "--in-place",
        "--scale",
        "-1",
        "--no-check-base",
        "-q",
    )
    assert code == 0
    back = Checkpoint(tmp / "applied")
    assert all(torch.allclose(back.get(n), base.state_dict()[n], atol=1e-7) for n in back)


def test_diff_options(capsys, ckpts):
    _, _, tmp = ckpts
    code, out, _ = run(
        capsys,
        "diff",
        tmp / "base",
        tmp / "tuned",
        "-o",
        tmp / "c.safetensors",
        "--changed-only",
        "--storage",
        "auto",
        "-q",
    )
    assert code == 0 and "unchanged=" in out
    d = WeightDiff.load(tmp / "c.safetensors")
    assert all(".layers.1." in n or ".layers.2." in n for n in d.names())
    code, _, _ = run(
        capsys, "diff", tmp / "base", tmp / "tuned", "-o", tmp / "l.safetensors", "--layers", "2:3", "-q"
    )
    assert code == 0 and all(".layers.2." in n for n in WeightDiff.load(tmp / "l.safetensors").names())
    code, _, _ = run(
        capsys, "diff", tmp / "base", tmp / "tuned", "-o", tmp / "q.safetensors", "--quantize", "16", "-q"
    )
    q = WeightDiff.load(tmp / "q.safetensors")
    assert code == 0 and {e.storage for e in q.entries.values()} == {"quantized"}
    assert (tmp / "q.safetensors").stat().st_size < (tmp / "c.safetensors").stat().st_size
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]
    code, _, err = run(
        capsys, "diff", tmp / "base", tmp / "tuned", "-o", tmp / "x.safetensors", "--names", "nope.*"
    )
    assert code == 1 and "matches no tensor" in err
    code, _, err = run(capsys, "diff", tmp / "base", tmp / "missing", "-o", tmp / "x.safetensors")
    assert code == 1 and "no such file" in err


def test_diff_of_a_lora_adapter(capsys, tmp_path):
    base = make_model("llama")
    peft_model = lora(copy.deepcopy(base), ["q_proj", "v_proj"])
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    base.save_pretrained(tmp_path / "base")
    code, out, _ = run(
        capsys, "diff", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "lora.safetensors"
    )
    assert code == 0 and "4 tensors" in out
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    code, _, _ = run(
        capsys, "apply", tmp_path / "lora.safetensors", tmp_path / "base", "-o", tmp_path / "merged", "-q"
    )
    out_ckpt = Checkpoint(tmp_path / "merged")
    assert code == 0 and all(torch.equal(out_ckpt.get(n), merged[n]) for n in out_ckpt)


def test_restore(capsys, ckpts):
    base, tuned, tmp = ckpts
    code, out, _ = run(
        capsys, "restore", tmp / "tuned", tmp / "base", "--layers", "1:2", "-o", tmp / "r", "-q"
    )
    assert code == 0 and "[1, 2)" in out
    expected = copy.deepcopy(tuned)
    restore_layers(expected, base, [1])
    r = Checkpoint(tmp / "r")
    assert all(torch.equal(r.get(n), expected.state_dict()[n]) for n in r)
    code, _, err = run(capsys, "restore", tmp / "tuned", tmp / "base", "--layers", "9", "-o", tmp / "r2")
    assert code == 1 and "out of range" in err
    code, _, err = run(capsys, "restore", tmp / "tuned", tmp / "base", "--layers", "1", "-o", tmp / "r")
    assert code == 1 and "--overwrite" in err
    code, _, _ = run(
        capsys, "restore", tmp / "tuned", tmp / "base", "--layers", "2", "--in-place", "--final-norm", "-q"
    )
    assert code == 0
    assert torch.equal(
        Checkpoint(tmp / "tuned").get("model.layers.2.mlp.up_proj.weight"),
        base.model.layers[2].mlp.up_proj.weight,
    )
    gpt = make_model("gpt2")
    gpt.save_pretrained(tmp / "g")
    code, _, err = run(
        capsys, "restore", tmp / "g", tmp / "g", "--layers", "0", "--embeddings", "-o", tmp / "g2"
    )
    assert code == 1 and "tied" in err


def test_search_restore(capsys, tmp_path):
    base = make_model("llama", num_hidden_layers=3)
    post = make_model("llama", seed=5, num_hidden_layers=3)
    tok = char_tokenizer()
    for name, model in (("base", base), ("post", post)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    code, out, _ = run(
        capsys, "search-restore", tmp_path / "post", tmp_path / "base", "--n", "4", "--answer-prefix", "",
        "--soup", "5", "--max-width", "3", "--plot", tmp_path / "p.png", "--csv", tmp_path / "t.csv", "--restore-to", tmp_path / "best", "-q",
    )  # fmt: skip
    assert code == 0 and "selected" in out and "6 ranges, 5 soups, 8 prompts" in out
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "t.csv").read_text().count(
        "\n"
    ) == 2 + 6 + 5 + 1
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"input_ids": [3, 4, 5], "valid": [10, 11]})
        + "\n"
        + json.dumps({"prompt": "pick: a, b", "valid": ["a", "b"]})
        + "\n"
    )
    code, out, _ = run(
        capsys,
        "search-restore",
        tmp_path / "post",
        tmp_path / "base",
        "--prompts",
        prompts,
        "--answer-prefix",
        "",
        "--soup",
        "0",
        "--max-width",
        "3",
        "--json",
        "-q",
    )
    result = json.loads(out)
    assert code == 0 and len(result["rows"]) == 2 + 6 and result["best"]["eligible"]
    prompts.write_text('{"input_ids": [1]}\n')
    code, _, err = run(capsys, "search-restore", tmp_path / "post", tmp_path / "base", "--prompts", prompts)
    assert code == 1 and "prompts.jsonl:1" in err


def test_mask_info_still_works(capsys, tmp_path):
    ParamMask.full(make_model("llama")).save(tmp_path / "m.safetensors")
    code, out, _ = run(capsys, "mask", "info", tmp_path / "m.safetensors", "--limit", "2")
    assert code == 0 and "TOTAL" in out
    code, _, err = run(capsys, "diff-info", tmp_path / "m.safetensors")
    assert code == 1 and "not a 'diff' file" in err


def test_every_documented_command_line_parses():
    """Each `hfhooks ...` line in the README and docs is accepted by the real parser (argument order, flags)."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).parents[1]
    lines = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        in_code = False
        for line in doc.read_text().splitlines():
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            m = re.match(r"^\s*hfhooks (\S.*)$", line) if in_code else None
            if m and not m.group(1).startswith("--help"):
                lines.append((doc.name, m.group(1).split("#")[0].strip()))
    assert len(lines) >= 8, lines
    parser = build_parser()
    for doc, args in lines:
        argv = [a for a in shlex.split(args) if a not in ("...",)]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc}: `hfhooks {args}` does not parse")


def test_json_output_is_clean_with_deepspeed_installed(tmp_path):
    """DeepSpeed announces its accelerator on stdout at first import (accelerate imports it to unwrap models):
    the CLI's --json output must still parse, run as a user runs it (no DS_ACCELERATOR in the environment)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed: nothing prints")
    base = make_model("llama", num_hidden_layers=2)
    post = make_model("llama", seed=5, num_hidden_layers=2)
    tok = char_tokenizer()
    for name, model in (("base", base), ("post", post)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "hfhooks", "search-restore", str(tmp_path / "post"), str(tmp_path / "base"),
         "--n", "2", "--answer-prefix", "", "--soup", "3", "--json", "-q"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "best" in json.loads(res.stdout)
