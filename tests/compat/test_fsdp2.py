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


@pytest.mark.compat(callback="unlearning", setup="fsdp2", variant="scoring the mask", expect="error")
def test_unlearning_refuses_to_score_a_mask_under_fsdp2(ranks, record_property):
    assert_refused(
        ranks, "unlearning_scoring", "cannot score saliency under FSDP2", "pass mask=", record=record_property
    )


@pytest.mark.compat(callback="routing", setup="fsdp2")
def test_routing_strict_on_sharded_parameters(ranks):
    """Parameter-level strict routing (the callback's defaults) around the sharded model, on the gathered
    weights of both ranks: a forget-only step moves no shared coordinate (also once Adam's momentum would move
    them), a retain-only step no dedicated one, and each moves the others; a step where rank 0's micro-batches
    are forget and rank 1's retain is routed per rank before FSDP2 averages them, so the result equals one process
    training the full model on both ranks' micro-batches (a router that masked the reduced gradient, or whose
    hooks sat on the sharded parameters, where they never fire, is off by ~0.15)."""
    for rank, results in enumerate(ranks):
        r = results["routing"]
        assert r["status"] == "ok", (rank, r)
        assert r["dtensor_params"] > 0, "the model was not sharded: not an FSDP2 run"
        assert r["full_params_hooked"] == r["dtensor_params"]
        assert r["default_mask_matches"], "the default dedicated mask differs from the unsharded model's"
        for step in ("forget", "retain", "forget_again"):
            assert r[f"{step}_held_moved"] == 0, f"rank {rank}: {step} step moved {r[f'{step}_held_moved']}"
            assert r[f"{step}_changed"] > 0, f"rank {rank}: the {step} step trained nothing"
        assert r["max_diff_vs_reference"] < 1e-4, r["max_diff_vs_reference"]
        assert r["hooks_left"] == 0
    assert ranks[0]["routing"]["digest"] == ranks[1]["routing"]["digest"], "the ranks' weights differ"


def test_routing_core_at_the_activation_level_in_a_plain_loop(ranks):
    """``with Router(model, mask, level="activation", optimizer=opt)`` around the sharded model, labels mixed
    inside every micro-batch: the forward hooks see full activations, so the result equals one process training
    the full model on both ranks' micro-batches."""
    for rank, results in enumerate(ranks):
        r = results["routing_core_activation"]
        assert r["status"] == "ok", (rank, r)
        assert r["dtensor_params"] > 0, "the model was not sharded: not an FSDP2 run"
        assert r["counts"]["forget"] and r["counts"]["retain"], r["counts"]
        assert r["changed"] > 0
        assert r["max_diff_vs_reference"] < 1e-4, r["max_diff_vs_reference"]
        assert r["hooks_left"] == 0
    assert ranks[0]["routing_core_activation"]["digest"] == ranks[1]["routing_core_activation"]["digest"]


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
