"""Items earlier sessions noticed and left alone, each fixed with a test that fails without the fix."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import lora, make_model, randomize_trainable

from hfhooks import ParamMask
from hfhooks.diffs import WeightDiff, arithmetic
from hfhooks.io.pipeline import prefetched
from hfhooks.merging import MergeConfig, merge, merge_tensors


def test_merge_refuses_an_integer_tuned_tensor_where_the_base_is_float():
    """The base decides what is merged; a tuned model whose tensor of the same name is an integer tensor was
    cast and merged without a word."""
    base = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    tuned = {"w": torch.randint(-3, 3, (4, 3)), "b": torch.randn(3)}
    with pytest.raises(ValueError, match=r"'w' is torch.int64 where the base's is torch.float32"):
        merge(base, [tuned], "task_arithmetic")
    merged = merge(base, [{"w": base["w"] + 1, "b": tuned["b"]}], "task_arithmetic")  # floats: merged
    assert torch.equal(merged.state_dict["w"], base["w"] + 1)
    cfg = MergeConfig(method="task_arithmetic")
    for bad in (torch.tensor([1, 2, 3]), torch.tensor([True, False, True])):  # the tensor-level entry point
        with pytest.raises(
            TypeError, match=f"tuned model 0 is {bad.dtype} where the base's is torch.float32"
        ):
            merge_tensors(torch.zeros(3), [bad], cfg, "w")


def test_to_sparse_clears_the_transposed_flag_of_a_factored_entry():
    """GPT-2's fan_in_fan_out LoRA is a factored entry with ``transposed=True``; once stored sparse, the
    values are Δ itself and the flag no longer describes anything."""
    model = randomize_trainable(lora(make_model("gpt2"), ["c_attn"], fan_in_fan_out=True))
    g = torch.Generator().manual_seed(1)
    d = WeightDiff.from_lora(model)
    factored = [n for n, e in d.entries.items() if e.storage == "factored"]
    assert factored and all(d.entries[n].transposed for n in factored)
    sparse = d.to_sparse()
    for n in factored:
        assert sparse.entries[n].storage == "sparse" and not sparse.entries[n].transposed, n
        assert torch.equal(sparse.entries[n].dense(), d.entries[n].dense()), n
    zeroed = (
        WeightDiff._of(  # a factored entry whose Δ is zero: to_auto makes it a zero entry
            {n: d.entries[n] for n in factored}, d.metadata, "test"
        )
        .scale(0.0)
        .to_auto()
    )
    for n in factored:
        assert zeroed.entries[n].storage == "zero" and not zeroed.entries[n].transposed, n
    quantized = d.quantize(256)
    half = ParamMask({n: torch.rand(d.entries[n].shape, generator=g) < 0.5 for n in factored})
    masked = d.restrict(mask=half)
    for n in factored:
        assert quantized.entries[n].storage == "quantized" and not quantized.entries[n].transposed, n
        assert masked.entries[n].storage == "sparse" and not masked.entries[n].transposed, n
        assert torch.equal(masked.entries[n].dense(), d.entries[n].dense() * half[n]), n


def test_between_entry_reports_its_own_error_not_the_fingerprint_threads(monkeypatch):
    """When Δ's computation and the fingerprint thread both fail, the error raised is Δ's (it was the
    fingerprint's: ``prints.result()`` ran in a ``finally``)."""

    def delta_fails(*a, **k):
        raise ArithmeticError("delta failed")

    def print_fails(t):
        raise LookupError("fingerprint failed")

    monkeypatch.setattr(arithmetic, "_delta_blocks", delta_fails)
    monkeypatch.setattr(arithmetic, "tensor_fingerprint", print_fails)
    with pytest.raises(ArithmeticError, match="delta failed"):
        arithmetic.between_entry(torch.zeros(8), torch.ones(8), None, "dense")
    monkeypatch.undo()
    monkeypatch.setattr(arithmetic, "tensor_fingerprint", print_fails)
    with pytest.raises(LookupError, match="fingerprint failed"):  # alone, the fingerprint's error still shows
        arithmetic.between_entry(torch.zeros(8), torch.ones(8), None, "dense")


def test_prefetch_thread_runs_in_the_callers_inference_mode():
    seen = []

    def items():
        for i in range(3):
            seen.append((threading.current_thread().name, torch.is_inference_mode_enabled()))
            yield i

    with torch.inference_mode():
        assert list(prefetched(items())) == [0, 1, 2]
    assert seen and all(name == "hfhooks-prefetch" and mode for name, mode in seen)
    seen.clear()
    assert list(prefetched(items())) == [0, 1, 2]
    assert seen and not any(mode for _, mode in seen)


def test_prefetched_tensors_made_under_inference_mode_are_inference_tensors():
    """What the thread computes is what the caller would have computed inline."""
    x = torch.ones(3)
    with torch.inference_mode():
        (z,) = list(prefetched(x * k for k in (2,)))  # the generator runs on the prefetch thread
    assert z.is_inference()
    (w,) = list(prefetched(x * k for k in (2,)))
    assert not w.is_inference()


def test_streamed_apply_of_a_corrupt_diff_reports_the_crc_not_what_the_corruption_broke(
    tmp_path, monkeypatch
):
    """A dense Δ's values are CRC-checked on the helper thread while θ + Δ is computed, so corrupt values can
    make the arithmetic fail before the check reports; the error raised is the check's, with the arithmetic's
    as its cause (it was the arithmetic's). Other storages check every part before decoding it."""
    from hfhooks.diffs import DiffFileError
    from hfhooks.io.safetensors import read_safetensors_header

    base = make_model("llama")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 1e-2)
    base.save_pretrained(tmp_path / "base")
    d = WeightDiff.between(base, tuned, progress=False)
    path = d.to_dense().save(tmp_path / "d.safetensors")
    raw = bytearray(path.read_bytes())
    for info in read_safetensors_header(path)[0].values():  # every entry: whichever is applied first
        raw[info.start + (info.end - info.start) // 2] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))

    def broken(*args, **kwargs):
        raise IndexError("decoding went wrong")

    monkeypatch.setattr(arithmetic, "_plus_blocks", broken)
    lazy = WeightDiff.load(tmp_path / "bad.safetensors", lazy=True)
    with pytest.raises(DiffFileError, match="CRC-32") as caught:
        lazy.apply(tmp_path / "base", out=tmp_path / "out", progress=False)
    assert isinstance(caught.value.__cause__, IndexError)
    assert not (tmp_path / "out").exists()
