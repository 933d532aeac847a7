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


@pytest.mark.compat(callback="routing", setup="fsdp2", variant="resume_from_checkpoint (SHARDED_STATE_DICT)")
def test_routing_resumed_from_a_sharded_checkpoint(ranks):
    """Interrupted at checkpoint-2 (accelerate's SHARDED_STATE_DICT: DCP, its FSDP2 default) and resumed in a
    fresh model, optimizer and callback given only the config: the callback resumes with the checkpoint's
    dedicated mask (not its config's default) and counters, the resumed forget step moves no shared coordinate,
    and the run ends bit-identical to the uninterrupted one on both ranks, hooks left 0."""
    for rank, results in enumerate(ranks):
        r = results["routing_resumed"]
        if r.get("status") == "skipped":
            pytest.skip(r["reason"])
        assert r["status"] == "ok", (rank, r)
        assert r["dtensor_params"] > 0, "the model was not sharded: not an FSDP2 run"
        assert r["resumed_with_checkpoint_mask"], "the resumed callback did not take the checkpoint's mask"
        assert r["counts"] == r["straight_counts"] and sum(r["counts"].values()) == 8, r
        assert r["held_moved"] == 0 and r["straight_held_moved"] == 0, (rank, r)
        assert r["changed"] > 0 and r["trained"] > 0, "nothing trained: the test would pass vacuously"
        assert r["differing_vs_straight"] == 0, (
            f"rank {rank}: {r['differing_vs_straight']} coordinates differ"
        )
        assert r["hooks_left"] == 0 and r["straight_hooks_left"] == 0
    assert ranks[0]["routing_resumed"]["digest"] == ranks[1]["routing_resumed"]["digest"], "the ranks differ"


@pytest.mark.compat(callback="routing", setup="fsdp2", variant="offload_policy=CPUOffloadPolicy()")
def test_routing_strict_with_cpu_offload(ranks):
    """``fully_shard(..., offload_policy=CPUOffloadPolicy())``: sharded parameters, their snapshots and the
    optimizer step live on the CPU between uses. The same checks as without offload: every strict step holds
    its coordinates, the result equals one process training the full model, hooks left 0 — parameter level
    (the callback) and activation level (the core Router)."""
    for rank, results in enumerate(ranks):
        r = results["routing_offload"]
        assert r["status"] == "ok", (rank, r)
        assert r["offloaded"], "FSDP2's CPU offload was not active: the test would not exercise it"
        assert r["dtensor_params"] > 0 and r["full_params_hooked"] == r["dtensor_params"]
        assert r["default_mask_matches"]
        for step in ("forget", "retain", "forget_again"):
            assert r[f"{step}_held_moved"] == 0, f"rank {rank}: {step} step moved {r[f'{step}_held_moved']}"
            assert r[f"{step}_changed"] > 0, f"rank {rank}: the {step} step trained nothing"
        assert r["max_diff_vs_reference"] < 1e-4, r["max_diff_vs_reference"]
        assert r["hooks_left"] == 0
        a = results["routing_core_activation_offload"]
        assert a["status"] == "ok" and a["offloaded"], (rank, a)
        assert a["counts"]["forget"] and a["counts"]["retain"] and a["changed"] > 0, a
        assert a["max_diff_vs_reference"] < 1e-4, a["max_diff_vs_reference"]
        assert a["hooks_left"] == 0
    for key in ("routing_offload", "routing_core_activation_offload"):
        assert ranks[0][key]["digest"] == ranks[1][key]["digest"], f"{key}: the ranks' weights differ"


@pytest.mark.compat(callback="attribution", setup="fsdp2")
def test_attribution_penalty_acts(ranks):
    """The callback trains a fully_shard-ed classifier: the penalty pulls the logged term below the same run's
    term without it (λ = 0), hooks left 0."""
    check_penalty_acts(ranks, "attribution")


@pytest.mark.compat(
    callback="attribution", setup="fsdp2", variant="first order, reusing the training backward"
)
def test_attribution_first_order_penalty_acts(ranks):
    check_penalty_acts(ranks, "attribution_first_order")
    for results in ranks:
        assert results["attribution_first_order"]["reused"] > 0, "the training backward was never reused"


def check_penalty_acts(ranks: list[dict], key: str) -> None:
    for rank, results in enumerate(ranks):
        on, off = results[key], results[f"{key}_unweighted"]
        assert on["status"] == "ok" and off["status"] == "ok", (rank, on, off)
        assert on["dtensor_params"] > 0, "the model was not sharded: not an FSDP2 run"
        assert on["hooks_left"] == 0 and off["hooks_left"] == 0
        assert (
            on["terms"][0] == off["terms"][0]
        )  # same model, same batch: the runs differ by the penalty only
        assert on["terms"][-1] < 0.75 * off["terms"][-1], (on["terms"], off["terms"])


def test_attribution_gradients_match_a_single_process(ranks):
    """loss + λ·term backpropagated through fully_shard-ed modules (double backprop for grad_x_input and
    input_gradient) gives the unsharded model's gradients: FSDP2 would otherwise reshard (free) the gathered
    parameters inside the attribution's own backward, which the term's graph still reads."""
    for results in ranks:
        r = results["attribution_gradients"]
        assert r["status"] == "ok", r
        for method, rel in r["worst_relative_difference"].items():
            assert rel < 1e-5, (method, rel)


@pytest.mark.compat(callback="attribution", setup="fsdp2", variant="integrated gradients", expect="error")
def test_attribution_refuses_integrated_gradients(ranks, record_property):
    assert_refused(
        ranks,
        "attribution_integrated_gradients",
        "does not support FSDP2",
        "method='grad_x_input'",
        record=record_property,
    )


def test_integrated_gradients_under_fsdp2_crashes_without_the_refusal(ranks):
    """The refusal's reason is real: with it switched off, a training step of integrated-gradients alignment on a
    fully_shard-ed classifier kills the process with SIGSEGV; the same step unsharded completes."""
    r = ranks[0]["attribution_ig_crash"]
    assert r["status"] == "ok", r
    assert "unsharded ok" in r["stdout"], r
    assert "sharded ok" not in r["stdout"].replace("unsharded ok", ""), r
    assert r["returncode"] == -11, r  # SIGSEGV


@pytest.mark.compat(callback="restoration", setup="fsdp2")
def test_restoration_restores_sharded_layers(ranks):
    """At train end the restored layer equals the reference bit for bit on every rank (in place, and in the
    variant copy written from the gathered shards), the other layers trained, hooks left 0."""
    for rank, results in enumerate(ranks):
        r = results["restoration"]
        for mode in ("inplace", "variant"):
            m = r[mode]
            assert m["status"] == "ok", (rank, mode, m)
            assert m["restored"] > 0 and m["restored_bitwise"], (rank, mode, m)
            assert m["others_trained"] > 0, "nothing trained: the test would pass vacuously"
            assert m["hooks_left"] == 0
            assert m["dtensor_params"] > 0, "the model was not sharded: not an FSDP2 run"
        assert r["variant_live_layer0_trained"], "mode='variant' restored the live model"
        assert r["variant_layers_above_match_live"], "the variant copy lost the trained layers"


def checkpoints_case(results: dict) -> dict:
    """The checkpoint case of one rank; skipped where accelerate predates FSDP2 checkpoints (test-min)."""
    r = results["restoration_checkpoints"]
    if r.get("status") == "skipped":
        pytest.skip(r["reason"])
    return r


@pytest.mark.compat(callback="restoration", setup="fsdp2", variant="checkpoints in place (when='save')")
def test_restoration_restores_fsdp2_checkpoints_in_place(ranks):
    """mode="inplace" at each save restores both files the Trainer writes under FSDP2: model.safetensors and
    pytorch_model_fsdp.bin, so a run resumed from the checkpoint (load_fsdp_model) continues from the restored
    layer, with the other layers as trained."""
    for results in ranks:
        r = checkpoints_case(results)
        assert r["checkpoint_trained"], "layer 0 did not train: the test would pass vacuously"
        assert r["inplace_safetensors_restored"] and r["inplace_resumed_restored"], r
        assert r["inplace_resumed_keeps_other_layers"], r
        assert "pytorch_model_fsdp.bin" in r["files"] and not any("partial" in f for f in r["files"]), r


@pytest.mark.compat(
    callback="restoration", setup="fsdp2", variant="checkpoints, mode='variant' (when='save')"
)
def test_restoration_writes_restored_variants_of_fsdp2_checkpoints(ranks):
    """on_save with mode="variant" writes <checkpoint>/restored/: layer 0 from the reference, the rest trained."""
    for results in ranks:
        r = checkpoints_case(results)
        assert r["checkpoint_trained"], r
        assert r["variant_restored"] and r["variant_keeps_other_layers"], r


def test_fsdp_resume_loads_pytorch_model_fsdp_bin(ranks):
    """Why in-place restores rewrite pytorch_model_fsdp.bin too: restoring model.safetensors alone leaves what a
    resumed FSDP run loads trained."""
    for results in ranks:
        r = checkpoints_case(results)
        assert r["safetensors_only_restored"], r
        assert not r["safetensors_only_resumed_restored"], r
