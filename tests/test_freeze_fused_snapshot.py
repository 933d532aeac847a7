"""Hard freeze under fused AdamW with weight decay (the HF Trainer's default ``adamw_torch_fused``), where the
decay cannot be applied by hand and the frozen values are snapshotted around the step: entirely frozen tensors
lose their gradient instead (torch's step skips them: no copy), element masks snapshot only the frozen
coordinates, and everything stays bit-identical to a plain fused run on the trainable coordinates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hfhooks.freeze.weight_decay as wd_module
from hfhooks import GradientMask, ParamMask


@pytest.fixture(autouse=True)
def _snapshot_path(monkeypatch):
    """These tests are about the snapshot path. A fused float32 step no longer takes it on CPU (its weight decay
    is applied by hand once a probe shows the bits match, see ``fused_decay_matches``): make the probe say no,
    as it does for bf16, so both dtypes exercise the snapshots."""
    monkeypatch.setattr(wd_module, "fused_decay_matches", lambda *_: False)


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
_SHAPES = {"whole": (64, 64), "element": (64, 64), "rows": (32, 16), "free": (16,)}


class _Net(nn.Module):
    """Parameters whose gradients do not depend on their values (loss = Σ p·G): a masked run and a plain run
    get the same gradients on the trainable coordinates whatever the frozen ones hold."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        for name, shape in _SHAPES.items():
            setattr(self, name, nn.Parameter(torch.randn(shape).to(dtype)))
        with torch.no_grad():  # specials on frozen coordinates of the element-masked tensor
            self.element[0, 0], self.element[0, 1], self.element[0, 2] = -0.0, float("nan"), float("inf")

    def forward(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((getattr(self, n).float() * g).sum() for n, g in grads.items())


def _mask() -> ParamMask:
    g = torch.Generator().manual_seed(1)
    element = torch.rand(_SHAPES["element"], generator=g) > 0.5
    element[0, :3] = False
    rows = torch.zeros(_SHAPES["rows"], dtype=torch.bool)
    rows[::2] = True
    return ParamMask(
        {
            "whole": torch.zeros(_SHAPES["whole"], dtype=torch.bool),
            "element": element,
            "rows": rows,
            "free": torch.ones(_SHAPES["free"], dtype=torch.bool),
        }
    )


def _grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(shape, generator=g) for n, shape in _SHAPES.items()}


def _held(gm: GradientMask, params: set[int]) -> int:
    """Bytes of tensor storage the GradientMask holds right now beyond the parameters and its between-step
    bits/indices (one level into its per-tensor records and their lists)."""
    found = {}
    for target in gm._frozen:
        for value in vars(target).values():
            for t in value if isinstance(value, list) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                    found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(found.values()) - gm.nbytes()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        model(_grads(step)).backward()
        opt.step()
        opt.zero_grad()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(_BITS[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_hard_freeze_is_compact_and_bit_identical(dtype):
    model, plain = _Net(dtype), _Net(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1, fused=True)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=5e-2, weight_decay=0.1, fused=True)
    _train(model, opt, range(1))  # optimizer state exists for every tensor before the mask is attached
    _train(plain, plain_opt, range(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    whole_step = opt.state[model.whole]["step"].clone()
    mask = _mask()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    gm = GradientMask(model, mask, optimizer=opt).attach()
    seen = []

    def during_step(*_):  # registered after the GradientMask's pre-hook: runs right after it
        assert model.whole.grad is None  # (a) dropped, so the step skips it ...
        assert model.element.grad is not None and model.free.grad is not None
        seen.append(_held(gm, params))  # ... and nothing but the frozen coordinates is copied

    opt.register_step_pre_hook(during_step)
    _train(model, opt, range(1, 4))
    _train(plain, plain_opt, range(1, 4))
    gm.detach()

    assert len(seen) == 3
    size = model.element.element_size()
    frozen = sum(int((~mask[n].expand(p.shape)).sum()) for n, p in model.named_parameters() if n != "whole")
    assert frozen * size <= min(seen) and max(seen) <= frozen * size + 64, (seen, frozen * size)  # (b)
    for n, p in model.named_parameters():
        keep = mask[n].expand(p.shape)
        assert torch.equal(_bits(p)[~keep], _bits(before[n])[~keep]), f"{n}: frozen coordinates moved"
        assert torch.equal(_bits(p)[keep], _bits(getattr(plain, n))[keep]), f"{n}: differs from plain fused"
        assert n == "whole" or bool((_bits(p) != _bits(before[n]))[keep].any())  # not vacuous
    state = opt.state[model.whole]  # (a) zeroed at attach, never stepped since
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert torch.equal(state["step"], whole_step)
    assert not opt.state[model.element]["exp_avg"][~mask["element"]].any()
