"""FSDP2 column of the compatibility matrix: every callback around a ``fully_shard``-ed model (gloo, CPU).

One ``torchrun --nproc_per_node 2`` launch runs them all (tests/distributed/fsdp2_callbacks.py); each test
checks one callback's result on both ranks. Supported: frozen coordinates moved = 0, trained ones changed,
hooks left = 0, parameters really DTensors. Unsupported: the error names the alternative.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from compat_utils import torchrun_once

SCRIPT = Path(__file__).parents[1] / "distributed" / "fsdp2_callbacks.py"
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return torchrun_once(tmp_path_factory, SCRIPT, "compat_fsdp2", timeout=400)


def assert_trained_and_frozen(ranks: list[dict], key: str) -> None:
    for rank, results in enumerate(ranks):
        r = results[key]
        assert r["status"] == "ok", (rank, r)
        assert r["moved"] == 0, f"rank {rank}: {r['moved']} frozen coordinates moved"
        assert r["changed"] > 0, "nothing trained: the test would pass vacuously"
        assert r["hooks_left"] == 0
        if "dtensor_params" in r:
            assert r["dtensor_params"] > 0, "the model was not sharded: not an FSDP2 run"


def assert_refused(ranks: list[dict], key: str, *phrases: str, record=None) -> None:
    """Both ranks refused with a message holding ``phrases``; ``record`` (pytest's ``record_property``) puts the
    message into the JUnit report, where docs/compatibility.md quotes it."""
    for results in ranks:
        r = results[key]
        assert r["status"] == "error", r
        for phrase in phrases:
            assert phrase in r["message"], (phrase, r["message"])
    if record is not None:
        record("compat_error", ranks[0][key]["message"])


def test_gradient_mask_core_in_a_plain_loop(ranks):
    assert_trained_and_frozen(ranks, "gradient_mask_core")


@pytest.mark.compat(callback="gradient_mask", setup="fsdp2")
def test_gradient_mask_callback(ranks):
    assert_trained_and_frozen(ranks, "gradient_mask")


@pytest.mark.compat(callback="unlearning", setup="fsdp2")
def test_unlearning_with_a_precomputed_mask(ranks):
    assert_trained_and_frozen(ranks, "unlearning")


@pytest.mark.compat(callback="unlearning", setup="fsdp2", variant="scoring the mask")
def test_unlearning_scores_a_global_mask_under_fsdp2(ranks):
    """Each rank scores its shards, the top-k is global (summed radix histograms): every rank holds the same
    mask, equal bit for bit to the one a single process computes from an unsharded copy and to from_scores over
    the gathered full scores; training then holds it."""
    assert_trained_and_frozen(ranks, "unlearning_scoring")
    r0, r1 = ranks[0]["unlearning_scoring"], ranks[1]["unlearning_scoring"]
    assert r0["mask_hash"] == r1["mask_hash"], "the ranks hold different masks"
    for r in (r0, r1):
        assert r["equals_single_process"], "the sharded mask differs from the single-process one"
        assert r["equals_full_scores"], "the sharded top-k differs from the top-k of the gathered scores"
        assert r["density"] == 0.5


@pytest.mark.compat(callback="routing", setup="fsdp2", expect="error")
def test_routing_is_refused(ranks, record_property):
    assert_refused(
        ranks,
        "routing",
        "GradientRoutingCallback does not support FSDP2",
        "Train with DDP",
        record=record_property,
    )


@pytest.mark.compat(callback="attribution", setup="fsdp2", expect="error")
def test_attribution_is_refused(ranks, record_property):
    assert_refused(
        ranks,
        "attribution",
        "AttributionAlignmentCallback does not support FSDP2",
        "Train with DDP",
        record=record_property,
    )


@pytest.mark.compat(callback="restoration", setup="fsdp2", expect="error")
def test_restoration_is_refused(ranks, record_property):
    assert_refused(
        ranks,
        "restoration",
        "LayerRestorationCallback does not support FSDP2",
        "hfhooks restore",
        record=record_property,
    )
