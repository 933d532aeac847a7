"""Review of the second thread of streamed diffs and applies (``prefetched``, the fingerprint CRCs on the
worker pool, ``write_blocks`` with ``lookahead=1``): what a thread can break — threads left running after an
error, how far the producer runs ahead (memory), the interpreter's shutdown refusing new thread work, buffer
reuse on slow writes, interrupted and refused edits."""

from __future__ import annotations

import _thread
import errno
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hfhooks.diffs.fileformat as ff
import hfhooks.io.safetensors as st
from hfhooks.diffs import BaseMismatchError, WeightDiff
from hfhooks.diffs.entries import decode_payload
from hfhooks.io.checkpoints import Checkpoint
from hfhooks.io.pipeline import prefetched

ROOT = Path(__file__).resolve().parents[1]
_CHUNK = 1 << 18  # the block size of the blocked update: tensors above it are written in several blocks


def _threads() -> list[str]:
    """The hfhooks threads that must not outlive a call (the shared CRC pool's thread is meant to persist)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(("hfhooks-prefetch", "hfhooks-write"))]


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _save(path: Path, sd: dict[str, torch.Tensor], shard_bytes: int | None = None) -> Path:
    """``sd`` as a checkpoint directory (one shard per tensor when ``shard_bytes`` is set: a sharded index)."""
    path.mkdir()
    if shard_bytes is None:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(sd, path, max_shard_size=shard_bytes)
    return path


@pytest.fixture
def big(tmp_path):
    """Base and tuned checkpoints whose tensors span several blocks of the blocked update (bf16, sharded),
    with unchanged, sparse-changed and −0.0 tensors so every entry storage occurs."""
    g = torch.Generator().manual_seed(0)
    n = 2 * _CHUNK + 123
    base = {f"w{i}": torch.randn(n, generator=g).to(torch.bfloat16) for i in range(3)}
    base["same"] = torch.randn(1000, generator=g).to(torch.bfloat16)
    base["zeros"] = torch.zeros(5000, dtype=torch.bfloat16).neg_()  # −0.0 everywhere
    base["2d"] = torch.randn(600, 500, generator=g).to(torch.bfloat16)
    tuned = {k: v.clone() for k, v in base.items()}
    for i in range(3):
        tuned[f"w{i}"] += (torch.randn(n, generator=g) * 1e-2).to(torch.bfloat16)
    tuned["w1"][::7] = base["w1"][::7]  # some coordinates unchanged
    tuned["zeros"][::3] = 0.0  # −0.0 → +0.0: a change Δ = 0 cannot express (the exact correction)
    tuned["2d"][:, ::5] += 1.0
    shard = 3 * 2**20
    return _save(tmp_path / "base", base, shard), _save(tmp_path / "tuned", tuned, shard), base, tuned


# -- threads left running after an error ------------------------------------------------------------------------
def test_a_diff_refused_mid_write_leaves_no_producer_thread_running(tmp_path):
    # the 2nd tensor's name is refused by the writer (the main thread) while the producer is ahead of it
    base = {n: torch.randn(8) for n in ("a", "b::x", "c", "d", "e")}
    tuned = {n: t + 1 for n, t in base.items()}
    with pytest.raises(ValueError, match="reserve") as excinfo:  # the traceback (and its frames) stays alive
        WeightDiff.between(base, tuned, out=tmp_path / "d.safetensors", progress=False)
    assert excinfo.value is not None
    assert not _threads(), "the producer thread ran on after the diff failed"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_diff_write_failing_mid_way_leaves_no_thread_and_no_output(big, tmp_path, monkeypatch, error):
    base, tuned, *_ = big
    real, calls = ff.write_all, []

    def failing(fd, data):
        calls.append(1)
        if len(calls) == 2:
            raise error
        real(fd, data)

    monkeypatch.setattr(ff, "write_all", failing)
    out = tmp_path / "d.safetensors"
    with pytest.raises(type(error)) as excinfo:
        WeightDiff.between(base, tuned, out=out, progress=False)
    assert excinfo.value is not None
    assert not _threads(), "the producer thread ran on after the diff failed"
    assert not out.exists() and not list(tmp_path.glob(".d.safetensors*"))


# -- how far ahead the producer runs ------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2])
def test_prefetched_computes_at_most_depth_items_ahead_of_the_caller(depth):
    pulled = []

    def source():
        for i in range(20):
            pulled.append(i)
            yield i

    it = prefetched(source(), depth=depth)
    try:
        assert next(it) == 0
        deadline = time.monotonic() + 0.5  # give a producer that runs too far ahead the time to do it
        while time.monotonic() < deadline and len(pulled) <= 1 + depth:
            time.sleep(0.01)
        # the caller holds item 0; items 1 .. depth may be ready (each is a tensor's Δ in memory), no more
        assert pulled == list(range(1 + depth))
        assert next(it) == 1
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and len(pulled) <= 2 + depth:
            time.sleep(0.01)
        assert pulled == list(range(2 + depth))
    finally:
        it.close()
    assert not _threads()


# -- interpreter shutdown: no new threads, the work runs inline ------------------------------------------------
_AT_EXIT = """
import atexit, sys
import torch
from hfhooks.diffs import WeightDiff

out = sys.argv[1]

def at_exit():  # concurrent.futures refuses new work once the interpreter began shutting down
    base = {"a": torch.randn(600_000), "b": torch.randn(10)}
    tuned = {n: t + 1 for n, t in base.items()}
    WeightDiff.between(base, tuned, progress=False)
    d = WeightDiff.between(base, tuned, out=out + "/d.safetensors", progress=False)
    from safetensors.torch import save_file
    import os
    os.makedirs(out + "/base")
    save_file(base, out + "/base/model.safetensors", metadata={"format": "pt"})
    d.apply(out + "/base", out=out + "/tuned", progress=False)
    print("done")

atexit.register(at_exit)
"""


@pytest.mark.slow  # a fresh interpreter importing torch
def test_diff_and_apply_work_while_the_interpreter_shuts_down(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _AT_EXIT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
    assert "Error" not in proc.stderr, proc.stderr[-2000:]


# -- sound: bit-exact round trips through slow writes, in-place refusals, interrupts ------------------------------
def _dense(e) -> torch.Tensor:
    return decode_payload(e, e.load())


def _slow(monkeypatch, module) -> None:
    real = module.write_all

    def late(fd, data):  # a slow disk: a buffer rewritten while its write is in flight shows as wrong bytes
        time.sleep(0.001)
        real(fd, data)

    monkeypatch.setattr(module, "write_all", late)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"storage": "auto", "changed_only": True},
        {"storage": "sparse", "exact": "both"},
        {"dtype": torch.float32, "exact": False},
    ],
)
def test_streamed_diff_and_apply_round_trip_bit_exactly_on_slow_writes(big, tmp_path, monkeypatch, kwargs):
    base, tuned, base_sd, tuned_sd = big
    _slow(monkeypatch, ff)
    _slow(monkeypatch, st)
    d = WeightDiff.between(base, tuned, out=tmp_path / "d.safetensors", progress=False, **kwargs)
    ref = WeightDiff.between(base_sd, tuned_sd, progress=False, **kwargs)  # in memory, one thread
    assert set(d.entries) == set(ref.entries)
    for n, e in ref.entries.items():
        assert (d.entries[n].base, d.entries[n].target, d.entries[n].storage) == (e.base, e.target, e.storage)
        assert torch.equal(_dense(d.entries[n]), _dense(e)), n
    out = d.apply(base, out=tmp_path / "out", max_shard_size="1MB", progress=False)
    got = Checkpoint(out)
    for n, t in tuned_sd.items():
        if kwargs.get("exact", True):  # the exact correction: the tuned weights, bit for bit
            expected = t
        else:  # θ + Δ in float32, rounded once; θ kept where Δ = 0
            delta = _dense(ref.entries[n])
            expected = torch.where(delta == 0, base_sd[n], (base_sd[n].float() + delta).to(t.dtype))
        assert torch.equal(got.get(n).view(torch.int16), expected.view(torch.int16)), n
    assert not _threads()


def test_in_place_apply_to_the_wrong_base_leaves_it_intact(big, tmp_path):
    base, tuned, *_ = big
    d = WeightDiff.between(base, tuned, out=tmp_path / "d.safetensors", progress=False)
    before = _tree(tuned)
    with pytest.raises(BaseMismatchError):
        d.apply(tuned, out=tuned, progress=False)
    assert _tree(tuned) == before and sorted(os.listdir(tmp_path)) == ["base", "d.safetensors", "tuned"]
    assert not _threads()


def test_ctrl_c_while_a_block_is_being_written_leaves_the_checkpoint_intact(big, tmp_path, monkeypatch):
    base, tuned, *_ = big
    d = WeightDiff.between(base, tuned, out=tmp_path / "d.safetensors", progress=False)
    real, calls = st.write_all, []

    def interrupted(fd, data):  # on the writer thread: the main thread gets the KeyboardInterrupt meanwhile
        calls.append(threading.current_thread().name)
        if len(calls) == 4:
            _thread.interrupt_main()
            time.sleep(0.1)
        real(fd, data)

    monkeypatch.setattr(st, "write_all", interrupted)
    before = _tree(base)
    with pytest.raises(KeyboardInterrupt):
        d.apply(base, out=base, progress=False)
    assert any(name.startswith("hfhooks-write") for name in calls)
    assert _tree(base) == before and sorted(os.listdir(tmp_path)) == ["base", "d.safetensors", "tuned"]
    assert not _threads()


def test_an_error_on_the_producer_thread_is_raised_with_nothing_written(tmp_path):
    # the 3rd tensor is refused while it is diffed on the producer thread (the 1st is written meanwhile)
    base = {"a": torch.randn(8), "b": torch.randn(8).t(), "n": torch.arange(8), "c": torch.randn(8)}
    tuned = {k: (v + 1 if v.is_floating_point() else v) for k, v in base.items()}
    with pytest.raises(ValueError, match="floating-point") as excinfo:
        WeightDiff.between(base, tuned, out=tmp_path / "d.safetensors", progress=False)
    assert excinfo.value is not None
    assert not _threads() and not list(tmp_path.iterdir())


def test_streamed_diff_of_models_and_non_contiguous_tensors_equals_the_in_memory_one(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"t": torch.randn(700, 600, generator=g).t(), "s": torch.randn(50, 4, generator=g)[:, 1]}
    tuned = {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()}
    model_a, model_b = torch.nn.Linear(600, 700), torch.nn.Linear(600, 700)
    for a, b in ((base, tuned), (model_a, model_b)):
        d = WeightDiff.between(a, b, out=tmp_path / "d.safetensors", progress=False, storage="auto")
        ref = WeightDiff.between(a, b, progress=False, storage="auto")
        for n, e in ref.entries.items():
            assert (d.entries[n].base, d.entries[n].target) == (e.base, e.target)
            assert torch.equal(_dense(d.entries[n]), _dense(e)), n
    assert not _threads()
