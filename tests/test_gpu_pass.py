"""The GPU pass's verdicts (benchmarks/gpu_pass.py): a cell passes only on evidence from every rank."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "gpu_pass", Path(__file__).parents[1] / "benchmarks" / "gpu_pass.py"
)
gpu_pass = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_pass)


def cell(**kw):
    return {"status": "ok", "moved": 0, "hooks_left": 0, "acted": True, "changed": 5, "dtype": "torch.float32",
            "dtensor_params": 3, **kw}  # fmt: skip


def test_passes_only_when_every_rank_holds_and_acted():
    assert gpu_pass.verdict("zero2", "gradient_mask", [{"gradient_mask": cell()}] * 2)[0]
    for bad in ({"moved": 1}, {"hooks_left": 1}, {"acted": False}, {"status": "error", "message": "boom"}):
        ok, text = gpu_pass.verdict(
            "zero2", "gradient_mask", [{"gradient_mask": cell()}, {"gradient_mask": cell(**bad)}]
        )
        assert not ok, bad
    assert "boom" in text


def test_a_rank_without_a_result_fails_the_cell_even_an_expected_refusal():
    refused = {"attribution": {"status": "error", "message": "does not support DeepSpeed: under ZeRO-3 ..."}}
    assert gpu_pass.verdict("zero3", "attribution", [refused, refused])[0]
    ok, text = gpu_pass.verdict("zero3", "attribution", [refused, {}])
    assert not ok and "rank(s) 1" in text


def test_expected_refusal_must_be_the_documented_one():
    other = {
        "attribution": {"status": "error", "message": "AssertionError: "}
    }  # an engine failure, not hfhooks'
    assert not gpu_pass.verdict("zero3", "attribution", [other])[0]
    assert not gpu_pass.verdict("zero3", "attribution", [{"attribution": cell()}])[0]  # trained: not refused


def test_salun_mask_must_hash_the_same_on_every_rank():
    ranks = [{"unlearning_scoring": cell(mask_hash="a")}, {"unlearning_scoring": cell(mask_hash="b")}]
    ok, text = gpu_pass.verdict("zero3", "unlearning_scoring", ranks)
    assert not ok and "DIFFERS" in text


def test_fsdp2_on_cuda_needs_dtensor_parameters():
    ranks = [{"device": "NVIDIA H200", "gradient_mask": cell(dtensor_params=0)}]
    assert not gpu_pass.verdict("fsdp2", "gradient_mask", ranks)[0]
    ranks[0]["device"] = "cpu"  # accelerate runs fsdp= as DDP on CPU: no DTensors expected
    assert gpu_pass.verdict("fsdp2", "gradient_mask", ranks)[0]
