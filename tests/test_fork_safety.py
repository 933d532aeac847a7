"""Diffs and applies keep working in a forked child (a DataLoader worker, a multiprocessing pool, the CLI's
forked campaign children): a thread pool inherited through fork() has no thread, so it must be recreated."""

from __future__ import annotations

import copy
import os
import signal
import time

import pytest
import torch
from conftest import tiny_llama

from hfhooks.diffs import WeightDiff


@pytest.fixture
def ckpts(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    tuned.save_pretrained(tmp_path / "tuned", max_shard_size="20KB")
    return tmp_path / "base", tmp_path / "tuned"


def _wait(pid: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung on a thread pool it inherited")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_apply_works_in_a_forked_child_after_an_apply_in_the_parent(tmp_path, ckpts):
    base, tuned = ckpts
    diff = WeightDiff.between(base, tuned, out=tmp_path / "d.safetensors", progress=False)
    diff.apply(base, out=tmp_path / "parent", progress=False)  # the CRC pool now has its thread
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            WeightDiff.load(tmp_path / "d.safetensors", lazy=True).apply(
                base, out=tmp_path / "child", progress=False
            )
            code = 0
        finally:
            os._exit(code)
    assert _wait(pid, 60) == 0
