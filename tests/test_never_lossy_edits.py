"""Adversarial tests of the never-lossy guarantees of checkpoint edits, diff and mask writes, and the CLI.

Outputs equal to / inside / holding an input, symlinks leading out of the given directories, FIFOs given as
inputs, an in-place edit racing a reader, locks, kill -9 mid-write, umask, a full disk (RLIMIT_FSIZE), Ctrl-C.
"""

from __future__ import annotations

import copy
import hashlib
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_model

from hfhooks.cli import main
from hfhooks.core.params import ParamIndex
from hfhooks.diffs import BaseMismatchError, WeightDiff
from hfhooks.io import paths
from hfhooks.io.checkpoints import Checkpoint, CheckpointError
from hfhooks.io.edit import edit_checkpoint
from hfhooks.masks.mask import ParamMask

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"the secret outside every directory hfhooks was given"


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): file content hashes, link targets, directories."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def ckpts(tmp_path, capsys):
    """work/base and work/tuned (sharded tiny Llamas, tuned = base + noise in layer 1), a sibling file, and a
    secret outside ``work``."""
    torch.set_num_threads(1)
    base = make_model("llama", num_hidden_layers=2)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for n, p in ParamIndex(tuned).items():
            if ".layers.1." in n:
                p.add_(0.01)
    work = tmp_path / "work"
    base.save_pretrained(work / "base", max_shard_size="20KB")
    tuned.save_pretrained(work / "tuned", max_shard_size="20KB")
    (work / "sibling.txt").write_text("a file next to the checkpoints")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(SECRET)
    capsys.readouterr()  # save_pretrained's progress bars are not the CLI's output
    return work


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# -- item 1: outputs never equal, contain or lie inside an input -----------------------------------------------
@pytest.mark.parametrize("spell", ["same", "dot", "dotdot"])
def test_restore_output_equal_to_its_target_is_refused(capsys, ckpts, spell):
    post = ckpts / "tuned"
    out = {"same": post, "dot": post / ".", "dotdot": ckpts / "base" / ".." / "tuned"}[spell]
    before = tree_digest(ckpts)
    code, err = run(capsys, "restore", post, ckpts / "base", "--layers", "1", "-o", out, "-q")
    assert code == 1 and "is the input" in err and "--in-place" in err
    assert tree_digest(ckpts) == before


def test_output_holding_the_inputs_is_never_replaced(capsys, ckpts):
    before = tree_digest(ckpts)
    for argv in (
        ["restore", ckpts / "tuned", ckpts / "base", "--layers", "1", "-o", ckpts, "--overwrite", "-q"],
        ["restore", ckpts / "tuned", ckpts / "base", "--layers", "1", "-o", ckpts / "tuned" / "sub", "-q"],
        [
            "restore",
            ckpts / "tuned",
            ckpts / "base",
            "--layers",
            "1",
            "-o",
            ckpts / "base",
            "--overwrite",
            "-q",
        ],
    ):
        code, err = run(capsys, *argv)
        assert code == 1 and (
            "contains the input" in err or "inside the input" in err or "is the input" in err
        )
    assert tree_digest(ckpts) == before  # the checkpoints and the sibling file are all still there


def test_apply_output_equal_to_target_and_diff_into_a_base_shard_are_refused(capsys, ckpts):
    diff_path = ckpts.parent / "task.safetensors"
    assert run(capsys, "diff", ckpts / "base", ckpts / "tuned", "-o", diff_path, "-q")[0] == 0
    before = tree_digest(ckpts)
    code, err = run(capsys, "apply", diff_path, ckpts / "base", "-o", ckpts / "base", "-q")
    assert code == 1 and "is the input" in err
    shard = next((ckpts / "base").glob("model-*.safetensors"))
    code, err = run(capsys, "diff", ckpts / "base", ckpts / "tuned", "-o", shard, "--overwrite", "-q")
    assert code == 1 and "inside the input" in err
    assert tree_digest(ckpts) == before
    Checkpoint(ckpts / "base")  # still loads


def test_diff_output_needs_overwrite_and_overwrite_replaces_only_a_diff(capsys, ckpts, tmp_path):
    out = tmp_path / "task.safetensors"
    out.write_bytes(b"precious, not a diff")
    code, err = run(capsys, "diff", ckpts / "base", ckpts / "tuned", "-o", out, "-q")
    assert code == 1 and "already exists" in err and out.read_bytes() == b"precious, not a diff"
    code, err = run(capsys, "diff", ckpts / "base", ckpts / "tuned", "-o", out, "--overwrite", "-q")
    assert code == 1 and "not a previous hfhooks diff file" in err
    assert out.read_bytes() == b"precious, not a diff"
    out.unlink()
    assert run(capsys, "diff", ckpts / "base", ckpts / "tuned", "-o", out, "-q")[0] == 0
    assert run(capsys, "diff", ckpts / "base", ckpts / "tuned", "-o", out, "--overwrite", "-q")[0] == 0
    WeightDiff.load(out)


def test_overwrite_never_replaces_a_directory_hfhooks_did_not_write(capsys, ckpts, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    code, err = run(
        capsys, "restore", ckpts / "tuned", ckpts / "base", "--layers", "1", "-o", home, "--overwrite", "-q"
    )
    assert code == 1 and "not a previous hfhooks checkpoint directory" in err
    assert (home / "thesis.tex").read_text() == "years of work"
    # an earlier hfhooks output is replaced
    out = tmp_path / "restored"
    for _ in range(2):
        args = ["restore", ckpts / "tuned", ckpts / "base", "--layers", "1", "-o", out, "--overwrite", "-q"]
        assert run(capsys, *args)[0] == 0


def test_output_that_is_a_symlink_to_the_input_is_refused(capsys, ckpts, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(ckpts / "tuned")
    before = tree_digest(tmp_path)
    code, err = run(
        capsys, "restore", ckpts / "tuned", ckpts / "base", "--layers", "1", "-o", link, "--overwrite", "-q"
    )
    assert code == 1 and "is the input" in err
    diff_link = tmp_path / "d.safetensors"
    diff_link.symlink_to(next((ckpts / "base").glob("model-*.safetensors")))
    code, err = run(capsys, "diff", ckpts / "base", ckpts / "tuned", "-o", diff_link, "--overwrite", "-q")
    assert code == 1 and "inside the input" in err
    before[diff_link.name] = "link:" + os.readlink(diff_link)
    assert tree_digest(tmp_path) == before  # the links are unchanged and no temporary link is left behind


def test_python_api_checks_the_reference_and_the_diff_file_too(ckpts, tmp_path):
    from hfhooks.restoration.restore import restore_layers

    with pytest.raises(paths.OutputPathError, match="is the input"):
        restore_layers(
            ckpts / "tuned", ckpts / "base", [1], out=ckpts / "base", overwrite=True, progress=False
        )
    with pytest.raises(paths.OutputPathError, match="contains the input"):
        restore_layers(ckpts / "tuned", ckpts / "base", [1], out=ckpts, overwrite=True, progress=False)
    diff = WeightDiff.between(
        ckpts / "base", ckpts / "tuned", out=tmp_path / "d" / "task.safetensors", progress=False
    )
    with pytest.raises(paths.OutputPathError, match="contains the input"):
        diff.apply(ckpts / "base", out=tmp_path / "d", overwrite=True, progress=False)
    with pytest.raises(paths.OutputPathError, match="inside the input"):
        WeightDiff.between(
            ckpts / "base", ckpts / "tuned", out=ckpts / "base" / "x.safetensors", progress=False
        )
    with pytest.raises(paths.OutputPathError, match="not a previous hfhooks mask"):
        ParamMask.full(make_model("llama", num_hidden_layers=2)).save(
            next((ckpts / "base").glob("model-*.safetensors"))
        )


# -- item 2: symlinks never lead reads or writes outside the given directories ---------------------------------
def test_symlinked_side_file_is_not_copied_into_the_output(ckpts, tmp_path):
    (ckpts / "tuned" / "notes.txt").symlink_to(tmp_path / "outside" / "secret.txt")
    out = edit_checkpoint(ckpts / "tuned", tmp_path / "out", {}, progress=False)
    copied = out / "notes.txt"
    assert copied.is_symlink()  # recreated as a link: the secret's bytes are not in the output
    assert not any(p.is_file() and not p.is_symlink() and p.read_bytes() == SECRET for p in out.iterdir())


def test_shard_or_index_entry_resolving_outside_is_refused(ckpts, tmp_path):
    shard = next((ckpts / "tuned").glob("model-*.safetensors"))
    moved = tmp_path / "outside" / shard.name
    shutil.move(shard, moved)
    shard.symlink_to(moved)
    with pytest.raises(CheckpointError, match="outside the directory"):
        Checkpoint(ckpts / "tuned")
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").symlink_to(moved)
    with pytest.raises(CheckpointError, match="outside the directory"):
        Checkpoint(single)


def test_in_place_edit_does_not_follow_directory_symlinks(ckpts, tmp_path):
    outside = tmp_path / "outside"
    (outside / "tree").mkdir()
    (outside / "tree" / "big.bin").write_bytes(b"x" * 1000)
    (ckpts / "tuned" / "linked_dir").symlink_to(outside / "tree")
    (ckpts / "tuned" / "rel_link").symlink_to("config.json")
    before_outside = tree_digest(outside)
    edit_checkpoint(ckpts / "tuned", None, {"model.norm.weight": lambda load: load() * 2}, progress=False)
    assert (ckpts / "tuned" / "linked_dir").is_symlink()  # still a link, not a tree of hard links
    assert os.readlink(ckpts / "tuned" / "rel_link") == "config.json"
    assert tree_digest(outside) == before_outside
    assert os.stat(outside / "tree" / "big.bin").st_nlink == 1


# -- item 3: FIFOs and other non-regular files are refused before open() ---------------------------------------
def _unblock_after(fifo: Path, seconds: float) -> threading.Timer:
    """If the code under test blocks opening ``fifo`` for reading, open it as a writer after ``seconds`` so the
    test fails (too slow) instead of hanging."""

    def unblock():
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        time.sleep(0.2)
        os.close(fd)

    timer = threading.Timer(seconds, unblock)
    timer.daemon = True
    timer.start()
    return timer


@pytest.mark.parametrize("where", ["diff", "shard", "single", "diff-info"])
def test_fifo_input_is_refused_without_blocking(capsys, ckpts, tmp_path, where):
    fifo = tmp_path / "fifo.safetensors"
    if where == "shard":
        shard = next((ckpts / "base").glob("model-*.safetensors"))
        shard.unlink()
        os.mkfifo(shard)
        fifo = shard
        argv = ["restore", ckpts / "tuned", ckpts / "base", "--layers", "1", "-o", tmp_path / "r", "-q"]
    elif where == "single":
        d = tmp_path / "single"
        d.mkdir()
        fifo = d / "model.safetensors"
        os.mkfifo(fifo)
        argv = ["diff", d, ckpts / "tuned", "-o", tmp_path / "x.safetensors", "-q"]
    else:
        os.mkfifo(fifo)
        argv = (
            ["apply", fifo, ckpts / "base", "-o", tmp_path / "a", "-q"]
            if where == "diff"
            else ["diff-info", fifo, "--lazy"]
        )
    timer = _unblock_after(fifo, 5.0)
    start = time.monotonic()
    try:
        code, err = run(capsys, *argv)
    finally:
        timer.cancel()
    assert time.monotonic() - start < 5.0, "blocked opening the FIFO"
    assert code == 1 and ("FIFO" in err or "no such file" in err), err


# -- item 5: readers and in-place edits, locks, outputs created meanwhile --------------------------------------
def test_reader_opened_before_an_in_place_edit_reads_the_version_it_opened(ckpts):
    src = ckpts / "tuned"
    reader = Checkpoint(src)
    expected = {n: reader.get(n).clone() for n in reader}
    # the edit adds an hfhooks.edits record to every header: every tensor's byte offset in the new files moves
    edit_checkpoint(
        src, None, {"model.norm.weight": lambda load: load() * 2}, record={"x": "y" * 300}, progress=False
    )
    assert Checkpoint(src).get("model.norm.weight").ne(expected["model.norm.weight"]).any()
    for n in reader:  # the old reader: exactly the version it opened, never shifted bytes
        assert torch.equal(reader.get(n), expected[n]), n
    reader.close()
    with pytest.raises(CheckpointError, match="changed on disk"):  # after close: re-validated, not misread
        reader.get("model.norm.weight")


def test_in_place_edit_of_a_stale_view_is_refused(ckpts):
    src = ckpts / "tuned"
    stale = Checkpoint(src)
    edit_checkpoint(src, None, {"model.norm.weight": lambda load: load() + 1}, progress=False)
    edited = Checkpoint(src).get("model.norm.weight")
    with pytest.raises(CheckpointError, match="changed since it was opened"):
        edit_checkpoint(stale, None, {"model.norm.weight": lambda load: load() * 0}, progress=False)
    assert torch.equal(Checkpoint(src).get("model.norm.weight"), edited)  # the first edit was not undone


def test_a_locked_checkpoint_or_output_is_refused(ckpts, tmp_path):
    with paths.exclusive_lock(ckpts / "tuned"), pytest.raises(OSError, match="another hfhooks process"):
        edit_checkpoint(ckpts / "tuned", None, {}, progress=False)
    with paths.exclusive_lock(tmp_path / "out"), pytest.raises(OSError, match="another hfhooks process"):
        edit_checkpoint(ckpts / "tuned", tmp_path / "out", {}, progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(ckpts.parent.glob("*.hfhooks.lock")) and not list(ckpts.glob(".*hfhooks*"))


def test_output_created_meanwhile_is_left_alone(ckpts, tmp_path, monkeypatch):
    import hfhooks.io.edit as C

    out = tmp_path / "out"
    real_write = C._write_edit

    def write_then_someone_creates_out(*a, **k):
        real_write(*a, **k)
        out.mkdir()
        (out / "theirs.txt").write_text("created by someone else meanwhile")

    monkeypatch.setattr(C, "_write_edit", write_then_someone_creates_out)
    with pytest.raises(FileExistsError, match="created by someone else"):
        edit_checkpoint(ckpts / "tuned", out, {}, progress=False)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert not [p for p in tmp_path.iterdir() if ".hfhooks" in p.name]


# -- item 7: temporaries, modes, full disks, Ctrl-C, unlisted shards, messages ----------------------------------
_STALL_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import hfhooks.diffs.core as core
    from hfhooks.diffs import WeightDiff

    base, tuned, out, marker = sys.argv[1:5]
    real, calls = core.between_entry, []

    def slow(*a, **k):  # stall once a tensor with bytes was written (unchanged ones are free since format 2)
        entry = real(*a, **k)
        calls.append(entry.storage != "zero")
        if sum(calls) == 2:
            Path(marker).write_text("a changed tensor written")
            time.sleep(120)
        return entry

    core.between_entry = slow
    WeightDiff.between(base, tuned, out=out, progress=False)
    """
)


@pytest.mark.slow  # a fresh interpreter importing torch + transformers
def test_kill_9_mid_diff_write_leaves_a_temp_the_next_write_removes(ckpts, tmp_path):
    out = tmp_path / "task.safetensors"
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _STALL_CHILD,
            str(ckpts / "base"),
            str(ckpts / "tuned"),
            str(out),
            str(marker),
        ],
        env=env,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        temps = list(tmp_path.glob(".task.safetensors.hfhooks-tmp-*"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0
        # the live writer's temporary survives a concurrent write's sweep
        assert paths.sweep_stale(out) == []
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists() and temps[0].exists()
    WeightDiff.between(ckpts / "base", ckpts / "tuned", out=out, progress=False)
    assert not list(tmp_path.glob(".task.safetensors.hfhooks-tmp-*"))  # the stale one was removed
    WeightDiff.load(out)


def test_stale_temps_are_decided_by_the_writers_lock(tmp_path):
    target = tmp_path / "mask.safetensors"
    model = make_model("llama", num_hidden_layers=2)
    stale = tmp_path / ".mask.safetensors.hfhooks-tmp-0123456789abcdef"
    with paths.temp_file(target) as (live, _):  # a live writer (this process) holds its lock
        stale.write_bytes(b"half a file from a writer killed long ago")  # nobody holds its lock
        ParamMask.full(model).save(target)
        assert live.exists() and not stale.exists()  # unlocked: removed; locked: kept
        live.unlink()
    ParamMask.load(target)


def test_save_replacing_keeps_the_previous_file_when_interrupted(tmp_path, monkeypatch):
    """The writer restoration uses for DeepSpeed shards and FSDP ``.bin`` files: all or nothing."""
    target = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    paths.save_replacing(target, {"step": 1})
    stale = tmp_path / f".{target.name}.hfhooks-tmp-0123456789abcdef"
    stale.write_bytes(b"half a file from a writer killed long ago")

    def interrupted(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        paths.save_replacing(target, {"step": 2})
    monkeypatch.undo()
    assert torch.load(target) == {"step": 1}
    # the dead writer's temporary swept, this one's removed, the lock file released
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    paths.save_replacing(target, {"step": 2})
    assert torch.load(target) == {"step": 2}


def test_files_are_created_with_the_mode_the_umask_implies(ckpts, tmp_path):
    old = os.umask(0o022)
    try:
        mask = ParamMask.full(make_model("llama", num_hidden_layers=2)).save(tmp_path / "m.safetensors")
        diff = WeightDiff.between(ckpts / "base", ckpts / "tuned", progress=False).save(
            tmp_path / "d.safetensors"
        )
        out = edit_checkpoint(ckpts / "tuned", tmp_path / "e", {}, progress=False)
    finally:
        os.umask(old)
    for f in [mask, diff, *out.glob("*.safetensors")]:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o644, f


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))


@pytest.mark.slow  # a fresh interpreter importing torch + transformers
def test_full_disk_is_an_error_naming_the_path(ckpts, tmp_path):
    out = tmp_path / "task.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "hfhooks", "diff", ckpts / "base", ckpts / "tuned", "-o", out, "-q"],
        env=env,
        preexec_fn=_limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"cannot write {out}" in proc.stderr and "File too large" in proc.stderr
    assert "Traceback" not in proc.stderr and "SafetensorError" not in proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".hfhooks" in p.name]


def test_ctrl_c_is_one_line_and_exit_130(capsys, ckpts, tmp_path, monkeypatch):
    import hfhooks.restoration.restore as R

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "restore_layers", interrupted)
    try:
        code, err = run(
            capsys, "restore", ckpts / "tuned", ckpts / "base", "--layers", "1", "-o", tmp_path / "r"
        )
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err


def test_a_shard_the_index_does_not_list_is_a_warning(ckpts):
    shard = next((ckpts / "tuned").glob("model-*.safetensors"))
    shutil.copy(shard, ckpts / "tuned" / "model-00099-of-00099.safetensors")
    with pytest.warns(UserWarning, match="does not list"):
        Checkpoint(ckpts / "tuned")


def test_streamed_base_mismatch_message_says_what_was_checked(ckpts, tmp_path):
    diff = WeightDiff.between(ckpts / "base", ckpts / "tuned", out=tmp_path / "d.safetensors", progress=False)
    with pytest.raises(BaseMismatchError) as e:
        diff.apply(ckpts / "tuned", out=tmp_path / "wrong", progress=False)
    msg = str(e.value)
    assert "1 of 1" not in msg and "first mismatch" in msg and "nothing was written" in msg
    assert not (tmp_path / "wrong").exists()
