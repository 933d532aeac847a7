"""Bytes held (tensor storage, deduplicated) by the hard freeze and by a loaded mask, against issue 13's limits:
≤ 0.2 extra bytes per element-masked parameter between steps, nothing for tensors that are entirely frozen
and out of the optimizer's reach, and a loaded mask ≤ 2× its file size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hfhooks import GradientMask, ParamIndex, ParamMask
from hfhooks.core.names import unwrap_model


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _held_by(obj) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj``'s attributes (one level into lists, dicts and dataclasses)."""
    found, stack, seen = [], [obj], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple, set)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif hasattr(x, "__dict__") and not isinstance(x, (nn.Module, torch.optim.Optimizer, type)):
            stack.extend(vars(x).values())
    return found


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(10)]).to(dtype)


def _extra_bytes(model, mask, optimizer, **options) -> int:
    """Storage held by an attached GradientMask besides the model's parameters (the mask's bits included)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    gm = GradientMask(model, mask, optimizer=optimizer, **options).attach()
    try:
        held = _storage_bytes([t for t in _held_by(gm) if t.untyped_storage().data_ptr() not in params])
        assert gm.nbytes() <= held  # what it reports is part of what it holds
        return held
    finally:
        gm.detach()


def test_hard_freeze_of_a_half_element_mask_holds_at_most_a_fifth_of_a_byte_per_parameter():
    for dtype in (torch.float32, torch.bfloat16):
        for weight_decay in (
            0.0,
            0.1,
        ):  # with weight decay the frozen values are snapshotted at step time only
            model = _model(dtype)
            g = torch.Generator().manual_seed(1)
            scores = {n: torch.rand(p.shape, generator=g) for n, p in ParamIndex(model).items()}
            mask = ParamMask.from_scores(scores, 0.5)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=weight_decay)
            n = sum(p.numel() for p in model.parameters())
            extra = _extra_bytes(model, mask, opt)
            assert extra <= 0.2 * n, f"{dtype}, wd={weight_decay}: {extra / n:.3f} bytes per masked parameter"


def test_entirely_frozen_tensors_out_of_the_optimizer_cost_nothing():
    """90 % of the tensors entirely frozen: with freeze='groups' (out of the optimizer) or without weight decay
    (the optimizer provably cannot move them), no copy of their values is held."""
    model = _model(torch.float32)
    index = ParamIndex(model)
    names = index.names()
    trained = names[: max(1, len(names) // 10)]
    mask = ParamMask.full(index, True, trained)  # others="freeze": every other tensor entirely frozen
    frozen_numel = sum(index.param(n).numel() for n in names if n not in trained)
    for freeze, wd in (("groups", 0.1), ("hard", 0.0)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=wd)
        held = _extra_bytes(model, mask, opt, freeze=freeze)
        assert held - mask.nbytes <= 0.01 * frozen_numel, (freeze, held, mask.nbytes)


def test_a_loaded_mask_holds_at_most_twice_its_file_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {f"layer{i}.weight": (256, 512) for i in range(4)}
    mask = ParamMask.from_scores({n: torch.rand(s, generator=g) for n, s in shapes.items()}, 0.3)
    path = mask.save(tmp_path / "mask.safetensors")
    loaded = ParamMask.load(path)
    held = _storage_bytes(_held_by(loaded))
    size = path.stat().st_size
    assert held <= 2 * size, f"a {size}-byte mask file holds {held} bytes loaded"
    assert loaded.nbytes <= size
    # the set algebra keeps its results packed too
    for result in (loaded | loaded, loaded & ~loaded, loaded - loaded):
        assert _storage_bytes(_held_by(result)) <= 2 * size
    assert loaded == mask and (loaded - mask).density() == 0.0 and (loaded | ~loaded).density() == 1.0


def test_finite_monitor_norms_half_precision_tensors_in_slices(monkeypatch):
    """Half-precision tensors are normed slice by slice (a whole-tensor float32 norm upcasts the tensor: 126 MB
    for a 32000 x 1024 bf16 embedding); a NaN / inf in any slice is still found, in the right tensor."""
    import hfhooks.core.hooks as hooks_module
    from hfhooks.core.hooks import FiniteMonitor

    monkeypatch.setattr(hooks_module, "_NORM_SLICE", 16)
    big, small, full = torch.randn(100).bfloat16(), torch.randn(5).half(), torch.randn(40)
    monitor = FiniteMonitor([big, small, full], "test")
    seen = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **k: seen.append(len(ts)) or real(ts, *a, **k))
    assert monitor._finite([big, small, full]).tolist() == [True, True, True]
    assert seen == [7 + 1 + 1]  # 100 bf16 elements in 7 slices; fp16 below the slice size; fp32 whole
    big[97] = float("nan")  # the last slice
    full[3] = float("inf")
    assert monitor._finite([big, small, full]).tolist() == [False, True, False]


def test_unwrapping_a_plain_model_does_not_import_deepspeed():
    """accelerate's ``extract_model_from_parallel`` imports DeepSpeed, where installed, to test for its engine:
    35 MB of resident memory for a model that has none. It showed as SalUn scoring holding 4.08 B per parameter
    instead of its one fp32 buffer (4 B). Only wrappers (``.module``) go through it now."""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    code = (
        "import sys, torch\n"
        "from hfhooks.core.names import unwrap_model\n"
        "m = torch.nn.Linear(2, 2)\n"
        "assert unwrap_model(m) is m\n"
        "print('deepspeed' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
    m = torch.nn.Linear(2, 2)
    assert unwrap_model(torch.nn.DataParallel(m)) is m  # wrappers are still peeled
