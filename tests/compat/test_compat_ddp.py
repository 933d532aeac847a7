"""DDP column of the compatibility matrix: one ``torchrun --nproc_per_node 2`` launch (gloo, CPU) runs every
callback in a stock Trainer (tests/distributed/compat_ddp.py); each test checks one callback on both ranks:
the single-process properties (hooks left = 0, frozen coordinates bit-identical, the callback acted) and
bit-identical weights across ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
from compat_utils import CALLBACKS, check_result, torchrun_once

SCRIPT = Path(__file__).parents[1] / "distributed" / "compat_ddp.py"
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return torchrun_once(tmp_path_factory, SCRIPT, "compat_ddp")


@pytest.mark.parametrize(
    "callback", [pytest.param(c, marks=pytest.mark.compat(callback=c, setup="ddp"), id=c) for c in CALLBACKS]
)
def test_callback_under_ddp(callback, ranks):
    for rank, results in enumerate(ranks):
        assert results["world_size"] == 2
        r = results[callback]
        assert r["status"] == "ok", f"rank {rank}:\n{r.get('traceback')}"
        check_result(callback, r)
    assert ranks[0][callback]["digest"] == ranks[1][callback]["digest"], "ranks diverged"


@pytest.mark.compat(callback="routing", setup="ddp", variant="strict, forget and retain micro-batches mixed")
def test_strict_routing_with_mixed_labels_keeps_ranks_identical(ranks):
    for rank, results in enumerate(ranks):
        r = results["routing_mixed"]
        assert r["status"] == "ok", f"rank {rank}:\n{r.get('traceback')}"
        assert r["hfhooks_hooks_left"] == [] and r["census_changed"] == {} and r["callback_hooks"] == 0
    assert ranks[0]["routing_mixed"]["counts"] != ranks[1]["routing_mixed"]["counts"], (
        "ranks saw the same modes"
    )
    assert ranks[0]["routing_mixed"]["digest"] == ranks[1]["routing_mixed"]["digest"], "ranks diverged"
