"""ZeRO-1/2/3 columns of the compatibility matrix: a stock Trainer under DeepSpeed (gloo, ``DS_ACCELERATOR=cpu``).

One ``torchrun --nproc_per_node 2`` launch trains every case under the three stages in turn
(tests/distributed/deepspeed_callbacks.py, ~2 min on two loaded CPU cores); each test checks one case on both ranks.
Supported: frozen coordinates moved = 0 in the gathered module weights and in the fp32 master weights, zero Adam
state on them, trained coordinates changed, hooks left = 0; restored layers equal the reference in the module,
the masters and what a resumed run loads; the attribution penalty trains as under DDP. Unsupported: the error says why and names the
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


@pytest.mark.parametrize(
    "stage",
    _stages(
        "unlearning", variant="scoring the mask; bf16, offload_optimizer (ZeRO-3: and offload_param) to CPU"
    ),
)
def test_unlearning_scores_its_mask_with_bf16_and_offload(ranks, stage):
    """Scoring through an engine whose masters (ZeRO-3: and parameters) live in CPU buffers, the module in bf16:
    the same mask on both ranks, then held in the module, the masters and the optimizer state."""
    assert_held(ranks, stage, "unlearning_scoring_offload")
    r = ranks[0][f"zero{stage}"]["unlearning_scoring_offload"]
    assert r["dtype"] == "torch.bfloat16" and r["density"] == 0.5, r


def routed(ranks: list[dict], stage: int, key: str, steps: int = 3) -> dict:
    """The routing run ``key`` of ``stage``, checked to have trained under that stage, identically on both ranks,
    with every micro-batch's label counted (3 steps x 2 accumulated micro-batches; a resumed run counts on from
    its checkpoint's counters) and no hook left; ``steps``: the optimizer steps the router saw."""
    for rank, results in enumerate(ranks):
        r = results[f"zero{stage}"][key]
        assert r["status"] == "ok", (rank, r)
        assert r["zero"] == stage, f"the run was ZeRO-{r['zero']}, not ZeRO-{stage}"
        assert r["steps"] == steps and sum(r["counts"].values()) == 6, r  # labels reached every micro-batch
        assert r["state_keys"] == ["exp_avg", "exp_avg_sq"], r["state_keys"]  # the state check read something
        assert r["state_nonzero"] == 0, f"rank {rank}: the gradient hooks did not reach DeepSpeed's gradients"
        assert r["hooks_left"] == 0
    assert ranks[0][f"zero{stage}"][key] == ranks[1][f"zero{stage}"][key], "ranks disagree"
    return ranks[0][f"zero{stage}"][key]


@pytest.mark.parametrize("stage", _stages("routing"))
def test_routing_callback(ranks, stage):
    """Strict parameter-level routing: forget-only steps leave every shared coordinate bit-identical and train
    the dedicated ones; retain-only steps the reverse; in the gathered module weights and in the fp32 masters."""
    for key, mode in (("routing_forget", "forget"), ("routing_retain", "retain")):
        r = routed(ranks, stage, key)
        assert r["counts"] == {mode: 6}, r["counts"]
        assert r["moved"] == 0, (
            f"{r['moved']} coordinates a {mode} step must hold moved in the module weights"
        )
        assert r["master_moved"] == 0, f"{r['master_moved']} moved in the fp32 masters"
        assert r["changed"] > 0, "nothing trained: the test would pass vacuously"
    assert ranks[0][f"zero{stage}"]["routing_forget"]["changed"] == r["held"], (
        "a dedicated coordinate never trained"
    )


@pytest.mark.parametrize(
    "stage", _stages("routing", variant="bf16, offload_optimizer (ZeRO-3: and offload_param) to CPU")
)
def test_routing_callback_with_bf16_and_offload(ranks, stage):
    """A bf16 module with fp32 masters in DeepSpeed's CPU buffers: forget-only strict steps still hold every shared
    coordinate in both."""
    r = routed(ranks, stage, "routing_offload")
    assert r["dtype"] == "torch.bfloat16"
    assert r["moved"] == 0 and r["master_moved"] == 0, r
    assert r["changed"] > 0, "nothing trained: the test would pass vacuously"


@pytest.mark.parametrize("stage", _stages("routing", variant="resume_from_checkpoint"))
def test_routing_callback_resumed(ranks, stage):
    """Saved at step 2, resumed by a fresh model, callback and Trainer: the dedicated mask and counters come back
    from the checkpoint, shared coordinates are still held, and the run ends bit-identical to the uninterrupted
    one."""
    r = routed(ranks, stage, "routing_resumed", steps=1)
    assert r["counts"] == {"forget": 6}, r["counts"]  # 4 saved at step 2, 2 after resuming
    assert r["moved"] == 0 and r["master_moved"] == 0, r
    assert r["changed"] > 0, "nothing trained: the test would pass vacuously"
    assert r["equals_uninterrupted"]


@pytest.mark.parametrize("stage", _stages("routing", variant="level='activation'"))
def test_routing_callback_activation_level(ranks, stage):
    """Activation-level routing (forward pre-hooks on the dedicated units' consumers) on retain-only data: no
    gradient reaches a dedicated coordinate (their Adam state stays zero, checked by routed()), the rest trains."""
    r = routed(ranks, stage, "routing_activation")
    assert r["counts"] == {"retain": 6}, r["counts"]
    assert r["changed"] > 0, "nothing trained: the test would pass vacuously"


@pytest.mark.parametrize("stage", STAGES, ids=[f"zero{s}" for s in STAGES])
def test_routing_without_strict_weight_decay_moves_shared_coordinates(ranks, stage):
    """strict=False (the gradient hooks alone): weight decay moves the shared coordinates of forget-only steps, in
    the masters and the module alike, so the snapshot of the masters is what holds them in the strict run."""
    r = routed(ranks, stage, "routing_leaky")
    assert r["moved"] > 0 and r["master_moved"] > 0, r


ZERO12 = (1, 2)


def _zero12(callback: str, **kw):
    return [
        pytest.param(s, marks=pytest.mark.compat(callback=callback, setup=f"zero{s}", **kw), id=f"zero{s}")
        for s in ZERO12
    ]


@pytest.mark.parametrize("stage", _zero12("attribution"))
def test_attribution_alignment(ranks, stage):
    """The term is logged, the hooks are gone, and the weights after 2 steps equal those of the same run under
    DDP (ZeRO-1 bit for bit; ZeRO-2 reduces gradients in another order: within 1% of what the penalty itself
    moves, DDP with λ=1 vs λ=0), so DeepSpeed trains the penalty's gradient, not only the task loss's."""
    for rank, results in enumerate(ranks):
        r = results[f"zero{stage}"]["attribution"]
        assert r["status"] == "ok", (rank, r)
        assert r["zero"] == stage and r["reference_zero"] is None, r  # DeepSpeed vs DDP, really
        assert r["checked"] and len(r["terms"]) == 2 and all(t > 0 for t in r["terms"]), r
        assert r["hooks_left"] == 0
        assert r["penalty_effect"] > 1e-2, "the penalty moves nothing: the comparison would be vacuous"
        if stage == 1:
            assert r["max_diff_vs_ddp"] == 0.0, r
        assert r["max_diff_vs_ddp"] < 0.01 * r["penalty_effect"], r


@pytest.mark.parametrize(
    "stage",
    [pytest.param(s, marks=pytest.mark.compat(callback="attribution", setup=f"zero{s}",
                                              variant="bf16, offload_optimizer to CPU"), id=f"zero{s}")
     for s in (1, 2)],
)  # fmt: skip
def test_attribution_alignment_with_bf16_and_offload(ranks, stage):
    """The penalty trains with a bf16 module and the masters and Adam state in DeepSpeed's CPU buffers."""
    for rank, results in enumerate(ranks):
        r = results[f"zero{stage}"]["attribution_offload"]
        assert r["status"] == "ok", (rank, r)
        assert r["zero"] == stage, r
        assert r["checked"] and len(r["terms"]) == 2 and all(t > 0 for t in r["terms"]), r
        assert r["hooks_left"] == 0


@pytest.mark.parametrize("stage", [pytest.param(3, marks=pytest.mark.compat(callback="attribution", setup="zero3", expect="error"), id="zero3")])  # fmt: skip
def test_attribution_alignment_refuses_zero3(ranks, stage, record_property):
    assert_refused(ranks, stage, "attribution", "AttributionAlignmentCallback does not support DeepSpeed",
                   "ZeRO-3", "set zero_optimization.stage to 1 or 2", record=record_property)  # fmt: skip


@pytest.mark.parametrize("stage", STAGES, ids=[f"zero{s}" for s in STAGES])
def test_double_backprop_fails_under_zero3_only(ranks, stage):
    """The reason for the refusal above, without hfhooks: a stock Trainer whose model's forward adds the squared
    input gradient of its logits (torch.autograd.grad with create_graph=True) trains under ZeRO-1/2 and fails
    under ZeRO-3, whose released parameter partitions the backward through that gradient meets (empty)."""
    for results in ranks:
        r = results[f"zero{stage}"]["double_backprop"]
        if stage == 3:
            assert r["status"] == "error" and "size 0" in r["message"], r
        else:
            assert r["status"] == "ok", r


@pytest.mark.parametrize("stage", _stages("restoration"))
def test_layer_restoration(ranks, stage):
    """Layer 0 restored at the save of checkpoint-2 and at train end: bit for bit the reference in the gathered
    module weights and in the fp32 masters (all fp32 here), layer 1 and the rest trained, hooks left 0; the
    checkpoint's model files restored (ZeRO-1/2; ZeRO-3 writes DeepSpeed's shards alone), and a fresh Trainer
    resuming from checkpoint-2 loads layer 0 restored in module and masters and the rest as trained (DeepSpeed's
    shards were rewritten: they are what a resume loads)."""
    for rank, results in enumerate(ranks):
        r = results[f"zero{stage}"]["restoration"]
        assert r["status"] == "ok", (rank, r)
        assert r["zero"] == stage
        assert r["module_layer0"] == 0 and r["master_layer0"] == 0, r
        assert r["others_trained"] > 0 and r["master_vs_module_others"] == 0, r
        assert r["hooks_left"] == 0
        assert r["resumed_module_layer0"] == 0 and r["resumed_master_layer0"] == 0, r
        assert r["resumed_others_vs_trained"] == 0 and r["resumed_master_others"] == 0, r
    main = ranks[0][f"zero{stage}"]["restoration"]
    if stage != 3:
        assert main["files_layer0"] == 0 and main["files_others_vs_live"] == 0, main


@pytest.mark.parametrize(
    "stage", _stages("restoration", variant="bf16, offload_optimizer (ZeRO-3: and offload_param) to CPU")
)
def test_layer_restoration_with_bf16_and_offload(ranks, stage):
    """As above with a bf16 module and fp32 masters in DeepSpeed's CPU buffers: layer 0 is the reference cast to
    bf16 in the module and the reference itself (fp32) in the masters, bit for bit, after training and after
    the resume."""
    for rank, results in enumerate(ranks):
        r = results[f"zero{stage}"]["restoration_offload"]
        assert r["status"] == "ok", (rank, r)
        assert r["dtype"] == "torch.bfloat16" and r["zero"] == stage, r
        assert r["module_layer0"] == 0 and r["master_layer0"] == 0, r
        assert r["others_trained"] > 0 and r["master_vs_module_others"] == 0 and r["hooks_left"] == 0, r
        assert r["resumed_module_layer0"] == 0 and r["resumed_master_layer0"] == 0, r
        assert r["resumed_others_vs_trained"] == 0 and r["resumed_master_others"] == 0, r


@pytest.mark.compat(
    callback="restoration", setup="zero3", variant="save_only_model: DeepSpeed's shards alone"
)
def test_layer_restoration_of_shards_only_checkpoints(ranks):
    """ZeRO-3 without stage3_gather_16bit_weights_on_model_save, save_only_model=True: checkpoints hold DeepSpeed's
    shards alone; consolidated by DeepSpeed's zero_to_fp32, layer 0 is the reference and the rest the trained
    fp32 masters, bit for bit, while the live run keeps its training."""
    for rank, results in enumerate(ranks):
        r = results["zero3"]["restoration_shards_only"]
        assert r["status"] == "ok" and not r["model_files"], (rank, r)
        assert r["live_layer0_trained"] > 0 and r["master_vs_module"] == 0, r
    main = ranks[0]["zero3"]["restoration_shards_only"]
    assert main["shards_layer0"] == 0 and main["shards_others_vs_masters"] == 0, main


@pytest.mark.parametrize("stage", _stages("restoration", variant="mode='variant'"))
def test_layer_restoration_variant(ranks, stage):
    """mode='variant' at train end: <output_dir>/restored/ has layer 0 restored and the rest as trained; the
    live model keeps its training in the module and the masters."""
    for rank, results in enumerate(ranks):
        r = results[f"zero{stage}"]["restoration_variant"]
        assert r["status"] == "ok", (rank, r)
        assert r["live_layer0_trained"] > 0 and r["master_vs_module"] == 0 and r["hooks_left"] == 0, r
    main = ranks[0][f"zero{stage}"]["restoration_variant"]
    assert main["variant_layer0"] == 0 and main["variant_others_vs_live"] == 0, main


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
