"""Cases an adversarial review of the hard freeze found (each failed before its fix): probes that learned a rule
from a warm-up's ``lr = 0``, a closure that computes the gradients inside the step, flushed subnormals, an Adam
``eps`` that rounds to 0 in fp16, and float64 models under the NaN/inf check. Each run is compared with a plain
torch run of the same optimizer on hand-masked gradients: frozen coordinates keep their bits, trainable ones
equal the plain run's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hfhooks.freeze.gradient_mask as gm_module
import hfhooks.freeze.weight_decay as wd_module
from hfhooks import GradientMask, ParamMask


@pytest.fixture(autouse=True)
def _fresh_probes(monkeypatch):
    """Every test starts with no probe answer remembered (they are process-wide caches)."""
    monkeypatch.setattr(wd_module, "_FUSED_PROBES", {})
    monkeypatch.setattr(gm_module, "_FACTOR_RULES", {})
    monkeypatch.setattr(gm_module, "_LAST_FACTOR", {})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _compare(dtype, make_opt, *, schedule=None, closure=False, steps=4, init=None, check_finite=True):
    """Train a masked model and a plain one (gradients masked by hand); returns (trainable coordinates that
    differ, frozen coordinates that moved), summed over the parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    if init is not None:
        init(model)
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    keep = {n: torch.rand(p.shape, generator=g) > 0.5 for n, p in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain_params = dict(plain.named_parameters())
    for n, p in plain_params.items():
        p.register_hook(lambda grad, k=keep[n]: torch.where(k, grad, torch.zeros_like(grad)))
    opt, plain_opt = make_opt(model), make_opt(plain)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (opt, plain_opt)] if schedule else []
    with GradientMask(model, ParamMask(keep), optimizer=opt, check_finite=check_finite):
        for _ in range(steps):
            x = torch.randn(8, 24).to(dtype)
            for m, o in ((model, opt), (plain, plain_opt)):

                def loss(m=m, o=o, x=x):
                    o.zero_grad()
                    out = m(x).float().square().mean()
                    out.backward()
                    return out

                if closure:
                    o.step(loss)
                else:
                    loss()
                    o.step()
            for s in scheds:
                s.step()
            with torch.no_grad():  # the plain run's decay moves its frozen coordinates: put them back
                for n, p in plain_params.items():
                    p.copy_(torch.where(keep[n], p, start[n]))
    differ = moved = 0
    for n, p in model.named_parameters():
        differ += int(((_bits(p) != _bits(plain_params[n])) & keep[n]).sum())
        moved += int(((_bits(p) != _bits(start[n])) & ~keep[n]).sum())
    return differ, moved


def _warm_up(step: int) -> float:
    return min(1.0, step / 2)  # lr = 0 at the first step, as warm-up schedules start


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_fused_step_warming_up_from_lr_zero(dtype):
    """The fused probe steps at a fixed non-zero lr and decay: at the group's lr = 0 both of its runs were
    identical, and bf16 was taken for reproducible by hand."""
    differ, moved = _compare(
        dtype,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True),
        schedule=_warm_up,
    )
    assert (differ, moved) == (0, 0)
    assert wd_module._FUSED_PROBES[(torch.optim.AdamW, dtype, "cpu", False, False, True)] is (
        dtype == torch.float32
    )


def test_a_fused_run_without_weight_decay_first_does_not_decide_the_probe():
    _compare(
        torch.bfloat16, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    )
    differ, moved = _compare(
        torch.bfloat16, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    )
    assert (differ, moved) == (0, 0)


def test_the_decay_factor_rule_is_not_learned_from_a_multiplier_of_one():
    """bf16 ``_foreach_mul_`` rounds the multiplier to bf16; at lr = 0 the multiplier is 1.0 under either rule."""
    differ, moved = _compare(
        torch.bfloat16,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1.0, foreach=True),
        schedule=_warm_up,
    )
    assert (differ, moved) == (0, 0)


@pytest.mark.parametrize("fused", [False, True])
def test_a_closure_that_computes_the_gradients_inside_the_step(fused):
    """The pre-step hook runs before the closure: nothing to decay by hand yet, so the step keeps its decay."""
    differ, moved = _compare(
        torch.float32,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=fused),
        closure=True,
    )
    assert (differ, moved) == (0, 0)


@pytest.mark.parametrize(
    ("dtype", "fused"), [(torch.float32, True), (torch.float32, False), (torch.bfloat16, False)]
)
def test_frozen_subnormals_survive_flushed_denormals(dtype, fused):
    def subnormal_then_flush(model):
        with torch.no_grad():
            for p in model.parameters():  # written before flushing is on (a flushing fill would store 0)
                p.fill_(torch.finfo(dtype).tiny / 4)
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush denormals")

    try:
        _, moved = _compare(
            dtype,
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=fused),
            init=subnormal_then_flush,
            check_finite=False,
        )
    finally:
        torch.set_flush_denormal(False)
    assert moved == 0


def test_fp16_adam_whose_eps_rounds_to_zero_keeps_frozen_coordinates():
    """eps = 1e-8 is 0 in fp16: a zero update is 0 / 0 = NaN there, so that group is snapshotted."""
    assert not wd_module.eps_survives({"eps": 1e-8, "params": [torch.zeros(1, dtype=torch.float16)]})
    _, moved = _compare(
        torch.float16,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
        check_finite=False,
    )
    assert moved == 0


def test_float64_models_pass_the_nan_inf_check():
    differ, moved = _compare(
        torch.float64, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    )
    assert (differ, moved) == (0, 0)
