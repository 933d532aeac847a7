"""Real distributed runs: torchrun --nproc_per_node 2 with gloo on CPU and a stock Trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors import safe_open

from hfhooks import ParamMask

SCRIPTS = Path(__file__).parent / "distributed"
pytestmark = pytest.mark.distributed


def torchrun(script: str, *args: str, timeout: int = 300) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPTS / script), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def load_rank(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        initial = {k.split("::", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith("initial::")}  # noqa: SIM118
        final = {k.split("::", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith("final::")}  # noqa: SIM118
        return initial, final, f.metadata()


def test_ddp_gradient_mask_bit_identical_on_both_ranks(tmp_path):
    torchrun("grad_mask_ddp.py", "--out", str(tmp_path))
    mask = ParamMask.load(tmp_path / "mask.safetensors")
    ranks = [load_rank(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    trained = 0
    for initial, final, meta in ranks:
        assert meta["world_size"] == "2" and meta["hooks_left"] == "0"
        for name, keep in mask.to_dict().items():
            frozen = ~keep
            assert torch.equal(final[name][frozen], initial[name][frozen]), (
                f"{name}: frozen coordinates moved"
            )
            trained += int((final[name][keep] != initial[name][keep]).sum())
    assert trained > 0, "nothing trained: the test would pass vacuously"
    for name in ranks[0][1]:  # DDP keeps ranks in sync
        assert torch.equal(ranks[0][1][name], ranks[1][1][name]), f"{name}: ranks diverged"


def test_ddp_unlearning_eval_callback_agrees_across_ranks_and_with_one_process(tmp_path):
    import json

    from safetensors.torch import load_file

    from hfhooks import unlearning_metrics

    torchrun("unlearning_eval_ddp.py", "--out", str(tmp_path))
    runs = [json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1)]
    assert runs[0] == runs[1], "ranks disagree on the evaluation"
    assert [h["step"] for h in runs[0]["history"]] == [2, 4]
    # the sharded, gathered evaluation equals a single-process evaluation of the same weights
    import importlib.util

    spec = importlib.util.spec_from_file_location("script", SCRIPTS / "unlearning_eval_ddp.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = script.Classifier()
    model.load_state_dict(load_file(tmp_path / "weights0.safetensors"))
    train, test = script.blobs(101, 1), script.blobs(37, 2)
    single = unlearning_metrics(model, train[:11], train[11:], test)
    assert single == runs[0]["final"]
