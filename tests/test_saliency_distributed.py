"""Sharded SalUn scoring: the global top-k over score slices held by different ranks (FSDP2 shards, ZeRO-3
partitions) equals, bit for bit, the single-process selection over the full scores.

One plain gloo process pair (two subprocesses of this file, ~3 s) runs every case; the FSDP2 / DeepSpeed runs of
the callback itself are in tests/distributed/*_callbacks.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hfhooks import ParamMask
from hfhooks.masks.topk import DegenerateScoresWarning

ROOT = Path(__file__).parents[1]


def full_scores(case: int) -> dict[str, torch.Tensor]:
    """Scores with many ties (small integers), odd sizes (unaligned bytes), a -0.0 / +0.0 tie and an all-zero
    tensor in some cases."""
    g = torch.Generator().manual_seed(case)
    levels = 3 if case % 2 else 1000
    shapes = {"a": (7, 5), "b": (13,), "c": (4, 4, 3), "d": (1,)}
    out = {n: torch.randint(0, levels, s, generator=g).float() for n, s in shapes.items()}
    if case % 3 == 0:
        out["b"] = torch.zeros(13)
        out["b"][::2] = -0.0
    return out


def splits(case: int, numel: int, world: int) -> list[int]:
    """Rank-ordered slice lengths of one flat tensor: even, uneven, or with an empty slice."""
    if case % 4 == 0:
        return [numel, 0][:world] if world == 2 else [numel]
    if case % 4 == 1:
        return [0, numel][:world] if world == 2 else [numel]
    cut = min(numel, 3 + case % 5)
    return [cut, numel - cut]


CASES = [
    (case, ratio, scope, case % 3 != 1)
    for case in range(8)
    for ratio in (0.3, 0.5)
    for scope in ("global", "tensor")
]
CASES += [(1, 0.0, "global", True), (2, 1.0, "global", False)]  # fmt: skip


def worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    import hfhooks.masks.topk as topk_mod

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = []
    for case, ratio, scope, largest in CASES:
        topk_mod._CHUNK = 5 if case % 2 else 1 << 20  # ties carried across streamed chunks too
        full = full_scores(case)
        local = {}
        for n, t in full.items():
            lengths = splits(case, t.numel(), 2)
            start = sum(lengths[:rank])
            local[n] = t.reshape(-1)[start : start + lengths[rank]]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mask = ParamMask.from_sharded_scores(
                local, ratio, {n: t.shape for n, t in full.items()}, scope, largest
            )
        with warnings.catch_warnings(record=True) as caught_single:
            warnings.simplefilter("always")
            single = ParamMask.from_scores(full, ratio, scope, largest)
        results.append({
            "case": [case, ratio, scope, largest],
            "equal": mask == single,
            "bits": {n: mask[n].reshape(-1).int().tolist() for n in mask.names()},
            "warnings": sorted(str(w.message) for w in caught if issubclass(w.category, DegenerateScoresWarning)),
            "warnings_single": sorted(
                str(w.message) for w in caught_single if issubclass(w.category, DegenerateScoresWarning)
            ),
        })  # fmt: skip
    # NaN on one rank only: both ranks raise, neither is left waiting in a collective
    nan = {"a": torch.full((4,), float("nan")) if rank == 1 else torch.ones(4)}
    try:
        ParamMask.from_sharded_scores(nan, 0.5, {"a": (8,)})
        results.append({"nan": "no error"})
    except ValueError as e:
        results.append({"nan": str(e)})
    # a slice missing: the lengths do not add up to the shape
    try:
        ParamMask.from_sharded_scores({"a": torch.ones(3)}, 0.5, {"a": (8,)})
        results.append({"missing": "no error"})
    except ValueError as e:
        results.append({"missing": str(e)})
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[list[dict]]:
    from conftest import free_port

    out = tmp_path_factory.mktemp("sharded_topk")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, __file__, str(r), str(port), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]


def test_sharded_top_k_equals_the_single_process_mask(ranks):
    cases = [r for r in ranks[0] if "case" in r]
    assert len(cases) == len(CASES)
    for r0, r1 in zip(cases, ranks[1]):
        assert r0["equal"] and r1["equal"], r0["case"]
        assert r0["bits"] == r1["bits"], f"ranks hold different masks for {r0['case']}"


def test_ties_decided_identically_and_warned_like_one_process(ranks):
    """Tie-heavy cases do pick among equal scores by order (so the tie rule is exercised), and the warnings the
    sharded selection gives are the single-process ones."""
    tie_warned = 0
    for r0, r1 in zip(ranks[0], ranks[1]):
        if "case" not in r0:
            continue
        assert r0["warnings"] == r0["warnings_single"] == r1["warnings"], r0["case"]
        tie_warned += any("tie order" in w for w in r0["warnings"])
    assert tie_warned > 0, "no case resolved ties by order: the test would not check the tie rule"


def test_nan_on_one_rank_raises_on_every_rank(ranks):
    for results in ranks:
        assert "contain NaN" in next(r["nan"] for r in results if "nan" in r)


def test_slices_that_do_not_add_up_are_refused(ranks):
    for results in ranks:
        assert "hold 6 elements in all" in next(r["missing"] for r in results if "missing" in r)


def test_zero12_scoring_never_reaches_the_module_parameters():
    """Under DeepSpeed ZeRO-1/2 (parameters tagged ``_hp_mapping``) the engine's reduce hooks sit on the module's
    parameters; the scoring pass must run on parameters that share their storage, so those hooks see nothing and
    the module's parameters get no gradient — with the same scores as an untagged model."""
    from conftest import make_model

    from hfhooks import compute_saliency

    batch = {"input_ids": torch.randint(0, 64, (2, 6)), "labels": torch.randint(0, 64, (2, 6))}
    plain = compute_saliency(make_model("llama", seed=0), [batch], progress=False)
    model = make_model("llama", seed=0)
    seen = []
    for n, p in model.named_parameters():
        p._hp_mapping = None  # what DeepSpeed sets on ZeRO-1/2 parameters
        p.register_post_accumulate_grad_hook(lambda p, n=n: seen.append(n))  # the engine's reduce hook
    originals = list(model.parameters())
    scores = compute_saliency(model, [batch], progress=False)
    assert seen == [], f"the engine's hooks saw the scoring gradients of {seen[:3]}"
    assert all(p.grad is None for p in model.parameters())
    assert all(a is b for a, b in zip(originals, model.parameters())), (
        "the module's parameters were not put back"
    )
    assert all(torch.equal(scores[n], plain[n]) for n in plain)


def test_after_backward_runs_after_every_batch():
    from conftest import tiny_llama

    from hfhooks import compute_saliency

    batch = {"input_ids": torch.randint(0, 64, (2, 6)), "labels": torch.randint(0, 64, (2, 6))}
    calls = []
    compute_saliency(tiny_llama(), [batch] * 3, progress=False, after_backward=lambda: calls.append(1))
    assert len(calls) == 3


def test_zero3_scoring_without_the_engine_epilogue_is_refused(gloo_group):
    """A ZeRO-3 parameter (tagged with its partition ``ds_tensor``) scored without ``after_backward`` would leave
    the engine's gradient state half-reduced: refused before any backward, naming the fix."""
    from conftest import make_model

    from hfhooks import compute_saliency

    model = make_model("llama", seed=0)
    for p in model.parameters():  # what DeepSpeed ZeRO-3 sets on its parameters (1 rank: one whole partition)
        p.ds_numel = p.numel()
        p.ds_tensor = p.detach().reshape(-1)
        p.ds_tensor.ds_numel = p.numel()
    batch = {"input_ids": torch.randint(0, 64, (2, 6)), "labels": torch.randint(0, 64, (2, 6))}
    with pytest.raises(ValueError, match="finish_outside_backward"):
        compute_saliency(model, [batch], progress=False)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
