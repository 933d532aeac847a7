"""CLI conventions: --json on every command, --dry-run writes nothing, exit codes 0/1/2/130, rank-0 progress,
optional dependencies checked first, and ``mask info`` read and verified without torch."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file

from hfhooks.cli import build_parser, main
from hfhooks.cli.common import progress_enabled
from hfhooks.core.params import ParamIndex
from hfhooks.diffs import WeightDiff
from hfhooks.io.artifacts import ArtifactError, read_artifact
from hfhooks.io.header import read_verified
from hfhooks.masks.mask import ParamMask

ROOT = Path(__file__).parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tree_hash(root: Path) -> str:
    """Names, modes and contents of everything under ``root`` (hidden files, temps and locks included)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(root)}\0{st.st_mode:o}\0".encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpts")
    base = make_model("llama", num_hidden_layers=4)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for n, p in ParamIndex(tuned).items():
            if ".layers.1." in n:
                p.add_(0.01)
    base.save_pretrained(tmp / "base", max_shard_size="40KB")
    tuned.save_pretrained(tmp / "tuned", max_shard_size="40KB")
    WeightDiff.between(tmp / "base", tmp / "tuned", out=tmp / "d.safetensors", progress=False)
    scores = {
        n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in base.named_parameters()
    }
    ParamMask.from_scores(scores, ratio=0.3).save(tmp / "m.safetensors", model=base)
    rows = {"model.layers.0.mlp.up_proj.weight": (0, [1, 3]), "model.layers.1.mlp.down_proj.weight": (1, [0])}
    ParamMask.from_slices(rows, base).save(tmp / "rows.safetensors")
    return tmp


# -- the torch-free reader agrees with the torch path -----------------------------------------------------------
@pytest.mark.parametrize(
    "name,kind", [("m.safetensors", "mask"), ("rows.safetensors", "mask"), ("d.safetensors", "diff")]
)
def test_torch_free_verification_agrees_with_read_artifact(ckpts, tmp_path, name, kind):
    tensors, meta = read_artifact(ckpts / name, kind)
    data, _entries, meta2 = read_verified(ckpts / name, kind)
    assert meta2 == meta and set(data) == set(tensors)
    for n, t in tensors.items():
        assert data[n] == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    raw = bytearray((ckpts / name).read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # the tensor data follows the JSON header
    for pos in (len(raw) - 1, (start + len(raw)) // 2):  # a bit flipped in the data: both readers refuse it
        bad = tmp_path / f"bad{pos}.safetensors"
        flipped = bytearray(raw)
        flipped[pos] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ArtifactError, match="integrity|not a readable"):
            read_artifact(bad, kind)
        with pytest.raises(ArtifactError, match="integrity|not a readable"):
            read_verified(bad, kind)


@pytest.mark.parametrize("name", ["m.safetensors", "rows.safetensors"])
def test_mask_info_json_matches_the_torch_path(capsys, ckpts, name):
    mask = ParamMask.load(ckpts / name)
    code, out, err = run(capsys, "mask", "info", ckpts / name, "--json")
    result = json.loads(out)
    assert code == 0 and not err
    assert {n: (r["kept"], r["total"]) for n, r in result["tensors"].items()} == mask.counts()
    assert result["density"] == pytest.approx(mask.density()) and result["metadata"] == mask.metadata
    assert [r["granularity"] for r in result["tensors"].values()] == [
        mask.granularity(n) for n in mask.names()
    ]


def test_mask_info_never_imports_torch(ckpts):
    code = (
        "import sys; from hfhooks.cli import main; rc = main(['mask', 'info', sys.argv[1], '--json']); "
        "assert 'torch' not in sys.modules, 'torch imported'; raise SystemExit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code, ckpts / "m.safetensors"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kept"] > 0


# -- --json -------------------------------------------------------------------------------------------------------
def test_json_on_every_command_is_one_document(capsys, ckpts, tmp_path):
    cases = [
        ["mask", "info", ckpts / "m.safetensors"],
        ["diff-info", ckpts / "d.safetensors"],
        ["diff", ckpts / "base", ckpts / "tuned", "-o", tmp_path / "d2.safetensors", "-q"],
        ["apply", ckpts / "d.safetensors", ckpts / "base", "-o", tmp_path / "applied", "-q"],
        ["restore", ckpts / "tuned", ckpts / "base", "--layers", "1:2", "-o", tmp_path / "restored", "-q"],
    ]
    results = []
    for argv in cases:
        code, out, _ = run(capsys, *argv, "--json")
        assert code == 0
        results.append(json.loads(out))  # the whole of stdout is one JSON document
    assert results[2]["changed"] == 9 and results[2]["output"] == str(tmp_path / "d2.safetensors")
    assert results[3]["tensors"] == results[1]["metadata"].get("num_tensors", len(results[1]["tensors"]))
    assert results[4]["layers"] == [1] and len(results[4]["restored"]) == 9
    # every subcommand's parser accepts --json
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        parsers = p._actions[-1].choices.values() if name == "mask" else [p]
        assert all(any("--json" in a.option_strings for a in q._actions) for q in parsers), name


# -- --dry-run ----------------------------------------------------------------------------------------------------
def test_dry_run_writes_nothing_and_reports_the_plan(capsys, ckpts, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("base", "tuned"):  # copies inside the hashed tree: a write to an input would show
        shutil.copytree(ckpts / name, work / name)
    shutil.copy(ckpts / "d.safetensors", work / "d.safetensors")
    before = tree_hash(tmp_path)
    every = len(ParamIndex(make_model("llama", num_hidden_layers=4)))  # d.safetensors holds every tensor
    cases = [
        (["diff", work / "base", work / "tuned", "-o", work / "new.safetensors", "--layers", "1"], 9),
        (["diff", work / "base", work / "tuned", "-o", work / "new.safetensors"], every),
        (["apply", work / "d.safetensors", work / "base", "-o", work / "applied"], every),
        (["apply", work / "d.safetensors", work / "base", "--in-place"], every),
        (["restore", work / "tuned", work / "base", "--layers", "1:3", "-o", work / "restored"], 18),
        (["restore", work / "tuned", work / "base", "--layers", "1:3", "--in-place"], 18),
    ]
    for argv, changed in cases:
        code, out, err = run(capsys, *argv, "--dry-run", "--json")
        assert code == 0, err
        plan = json.loads(out)
        assert plan["dry_run"] is True and len(plan["tensors_changed"]) == changed
        assert all(r["bytes"] > 0 for r in plan["reads"]) and plan["writes"]
        code, out, _ = run(capsys, *argv, "--dry-run")
        assert code == 0 and "nothing written" in out and "would write" in out
        assert tree_hash(tmp_path) == before, argv
    # the same refusals as a real run: an existing output without --overwrite, an output inside an input
    (work / "taken").mkdir()
    code, _, err = run(
        capsys, "apply", work / "d.safetensors", work / "base", "-o", work / "taken", "--dry-run"
    )
    assert code == 1 and "--overwrite" in err
    code, _, err = run(
        capsys, "restore", work / "tuned", work / "base", "--layers", "7", "-o", work / "o", "--dry-run"
    )
    assert code == 1 and "out of range" in err
    code, _, err = run(
        capsys, "diff", work / "base", work / "tuned", "-o", work / "base" / "x.safetensors", "--dry-run"
    )
    assert code == 1 and "inside" in err


# -- exit codes -----------------------------------------------------------------------------------------------------
def test_exit_codes(capsys, ckpts, tmp_path, monkeypatch):
    assert run(capsys, "mask", "info", ckpts / "m.safetensors")[0] == 0
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    code, out, err = run(capsys, "mask", "info", bad)
    assert code == 1 and err.startswith("hfhooks: error:") and not out and "Traceback" not in err
    code, _, err = run(capsys, "diff-info", ckpts / "m.safetensors")  # an hfhooks error (wrong kind)
    assert code == 1 and "not a 'diff' file" in err
    for argv in (
        ["mask", "info", ckpts / "m.safetensors", "--limit", "-1"],
        ["diff", "a", "b", "-o", "c", "--quantize", "1"],
        ["diff", "a", "b", "-o", "c", "--dtype", "int8"],
        ["restore", "a", "b", "--layers", "1", "-o", "c", "--no-such-flag"],
        ["no-such-command"],
    ):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 2, argv
    capsys.readouterr()

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("hfhooks.cli.masks.mask_counts", lambda path: interrupted(None))
    code, _, err = run(capsys, "mask", "info", ckpts / "m.safetensors")
    assert code == 130 and err.strip() == "hfhooks: interrupted (inputs untouched, no output written)"


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes" in out and "130" in out and "usage error" in out


# -- progress and optional dependencies ------------------------------------------------------------------------------
def test_progress_only_on_rank_zero_and_off_with_quiet(monkeypatch):
    args = build_parser().parse_args(["restore", "a", "b", "--layers", "1", "-o", "c"])
    quiet = build_parser().parse_args(["restore", "a", "b", "--layers", "1", "-o", "c", "-q"])
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert progress_enabled(args) and not progress_enabled(quiet)
    monkeypatch.setenv("RANK", "0")
    assert progress_enabled(args)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not progress_enabled(args)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("RANK", "3")
    assert not progress_enabled(args)


def test_missing_matplotlib_is_reported_before_the_search(capsys, ckpts, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    # the checkpoints do not even exist: the dependency check comes before any loading
    code, _, err = run(
        capsys, "search-restore", tmp_path / "nope", tmp_path / "nope2", "--plot", tmp_path / "p.png"
    )
    assert code == 1 and "pip install matplotlib" in err and "--plot" in err


def test_diff_dry_run_estimates_the_delta_in_the_weights_dtype(capsys, tmp_path):
    # Δ is stored in the weights' own dtype by default: for a bf16 checkpoint the estimate is its tensor bytes,
    # not the float32 figure it used to print (2× too big); --dtype overrides it
    model = make_model("llama", num_hidden_layers=2).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "tuned")
    tensors = sum(t.nbytes for t in load_file(tmp_path / "base" / "model.safetensors").values())
    argv = [
        "diff",
        tmp_path / "base",
        tmp_path / "tuned",
        "-o",
        tmp_path / "d.safetensors",
        "--dry-run",
        "--json",
    ]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert json.loads(out)["writes"][0]["bytes"] == tensors
    code, out, err = run(capsys, *argv, "--dtype", "float32")
    assert code == 0, err
    assert json.loads(out)["writes"][0]["bytes"] == 2 * tensors
