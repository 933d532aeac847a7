"""ZeRO-1/2/3 columns of the compatibility matrix: a stock Trainer under DeepSpeed (gloo, ``DS_ACCELERATOR=cpu``).

One ``torchrun --nproc_per_node 2`` launch trains every case under the three stages in turn
(tests/distributed/deepspeed_callbacks.py, ~40 s on two CPU cores); each test checks one case on both ranks.
Supported: frozen coordinates moved = 0 in the gathered module weights and in the fp32 master weights, zero Adam
state on them, trained coordinates changed, hooks left = 0. Unsupported: the error says why and names the
alternative. Skipped where DeepSpeed is not installed (``pip install 'hfhooks[deepspeed]'``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from compat_utils import torchrun_once

SCRIPT = Path(__file__).parents[1] / "distributed" / "deepspeed_callbacks.py"
pytestmark = [
    pytest.mark.distributed,
    # looked up, not imported: importing deepspeed here would pick its accelerator in the test process
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="DeepSpeed is not installed (pip install 'hfhooks[deepspeed]')",
    ),
]
STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return torchrun_once(
        tmp_path_factory, SCRIPT, "compat_deepspeed", timeout=600, env={"DS_ACCELERATOR": "cpu"}
    )


def _stages(callback: str, **kw):
    return [
        pytest.param(s, marks=pytest.mark.compat(callback=callback, setup=f"zero{s}", **kw), id=f"zero{s}")
        for s in STAGES
    ]


def assert_held(ranks: list[dict], stage: int, key: str) -> None:
    for rank, results in enumerate(ranks):
        r = results[f"zero{stage}"][key]
        assert r["status"] == "ok", (rank, r)
        assert r["zero"] == stage, f"the run was ZeRO-{r['zero']}, not ZeRO-{stage}"
        assert r["moved"] == 0, f"rank {rank}: {r['moved']} frozen coordinates moved in the module weights"
        assert r["master_moved"] == 0, f"rank {rank}: {r['master_moved']} moved in the fp32 masters"
        assert r["state_keys"] == ["exp_avg", "exp_avg_sq"], r["state_keys"]  # the state check read something
        assert r["state_nonzero"] == 0, f"rank {rank}: optimizer state on frozen coordinates"
        assert r["changed"] > 0, "nothing trained: the test would pass vacuously"
        assert r["hooks_left"] == 0
    assert ranks[0][f"zero{stage}"][key] == ranks[1][f"zero{stage}"][key], "ranks disagree"


def assert_refused(ranks: list[dict], stage: int, key: str, *phrases: str, record=None) -> None:
    for results in ranks:
        r = results[f"zero{stage}"][key]
        assert r["status"] == "error", r
        for phrase in phrases:
            assert phrase in r["message"], (phrase, r["message"])
    if record is not None:
        record("compat_error", ranks[0][f"zero{stage}"][key]["message"])


@pytest.mark.parametrize("stage", _stages("gradient_mask"))
def test_gradient_mask_callback(ranks, stage):
    assert_held(ranks, stage, "gradient_mask")


@pytest.mark.parametrize("stage", STAGES, ids=[f"zero{s}" for s in STAGES])
def test_without_the_write_back_weight_decay_moves_frozen_coordinates(ranks, stage):
    """freeze='grad' (the gradient hooks alone): weight decay moves the frozen coordinates, in the masters and the
    module alike, so the write-back is what holds them in the runs above (not an inert setup)."""
    for results in ranks:
        r = results[f"zero{stage}"]["grad_only"]
        assert r["status"] == "ok", r
        assert r["moved"] > 0 and r["master_moved"] > 0, r
        assert r["state_nonzero"] == 0, "the gradient hooks did not reach DeepSpeed's gradients"


@pytest.mark.parametrize("stage", _stages("unlearning"))
def test_unlearning_with_a_precomputed_mask(ranks, stage):
    assert_held(ranks, stage, "unlearning")


@pytest.mark.parametrize("stage", _stages("unlearning", variant="scoring the mask"))
def test_unlearning_scores_its_mask_through_the_engine(ranks, stage):
    """The saliency pass at train begin: ZeRO-1/2 on plain parameters sharing the module's storage (the engine's
    hooks see nothing), ZeRO-3 on each rank's partition with a global top-k (summed histograms). Both ranks hold
    the same mask, equal bit for bit to the single-process one, and the run ends bit-identical to one given that
    mask: the scoring pass left nothing in the engine's gradient state."""
    assert_held(ranks, stage, "unlearning_scoring")
    r0, r1 = ranks[0][f"zero{stage}"]["unlearning_scoring"], ranks[1][f"zero{stage}"]["unlearning_scoring"]
    assert r0["mask_hash"] == r1["mask_hash"], "the ranks hold different masks"
    for r in (r0, r1):
        assert r["equals_single_process"], "the mask differs from the single-process one"
        assert r["density"] == 0.5
        assert r["given_status"] == "ok" and r["equals_given_mask_run"], "scoring changed the training run"


@pytest.mark.parametrize("stage", _stages("routing", expect="error"))
def test_routing_is_refused(ranks, stage, record_property):
    assert_refused(ranks, stage, "routing", "GradientRoutingCallback does not support DeepSpeed", "DDP",
                   record=record_property)  # fmt: skip


@pytest.mark.parametrize("stage", _stages("attribution", expect="error"))
def test_attribution_is_refused(ranks, stage, record_property):
    assert_refused(ranks, stage, "attribution", "AttributionAlignmentCallback does not support DeepSpeed", "DDP",
                   record=record_property)  # fmt: skip


@pytest.mark.parametrize("stage", _stages("restoration", expect="error"))
def test_restoration_is_refused(ranks, stage, record_property):
    assert_refused(ranks, stage, "restoration", "LayerRestorationCallback does not support DeepSpeed",
                   "hfhooks restore", record=record_property)  # fmt: skip


@pytest.mark.parametrize(
    "stage", _stages("gradient_mask", variant="bf16, offload_optimizer (ZeRO-3: and offload_param) to CPU")
)
def test_gradient_mask_callback_with_bf16_and_offload(ranks, stage):
    """A bf16 module with fp32 masters and Adam state in DeepSpeed's CPU buffers (stepped by torch AdamW with
    zero_force_ds_cpu_optimizer=false); the write-back reaches them through the same public accessors."""
    assert_held(ranks, stage, "offload")
    assert ranks[0][f"zero{stage}"]["offload"]["dtype"] == "torch.bfloat16"


@pytest.mark.parametrize("stage", _stages("gradient_mask", variant="resume_from_checkpoint"))
def test_gradient_mask_callback_resumed(ranks, stage):
    """Saved at step 2 (DeepSpeed's own checkpoint shards), resumed by a fresh model and Trainer: still held, and
    the resumed run ends bit-identical to the uninterrupted one (so the checkpoint was really loaded)."""
    assert_held(ranks, stage, "resumed")
    assert all(r[f"zero{stage}"]["resumed"]["equals_uninterrupted"] for r in ranks)
