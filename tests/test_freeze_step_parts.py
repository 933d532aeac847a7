"""Hard freeze under fused AdamW with weight decay, stepped in parts (``hfhooks.freeze.stepping``): each part's
parameters are stepped alone right after their frozen values are copied, so the step holds one part's copy at
a time instead of every masked tensor's — and the result is the same bits as a plain fused run (trainable
coordinates) and as the snapshot-everything path (everything)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hfhooks.freeze.gradient_mask as gm_module
import hfhooks.freeze.weight_decay as wd_module
from hfhooks import GradientMask, ParamMask
from hfhooks.freeze.stepping import raw_step, split_by_size, step_in_parts


@pytest.fixture(autouse=True)
def _snapshot_path(monkeypatch):
    """These tests are about the snapshot path. A fused float32 step no longer takes it on CPU (its weight decay
    is applied by hand once a probe shows the bits match, see ``fused_decay_matches``): make the probe say no,
    as it does for bf16, so both dtypes exercise the snapshots."""
    monkeypatch.setattr(wd_module, "fused_decay_matches", lambda *_: False)


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
_SHAPES = {f"w{i}": (48, 32) for i in range(4)} | {"whole": (16, 16), "free": (8,)}


class _Net(nn.Module):
    """Gradients independent of the values (loss = Σ p·G), so masked and plain runs see the same gradients."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        for name, shape in _SHAPES.items():
            setattr(self, name, nn.Parameter(torch.randn(shape).to(dtype)))
        with torch.no_grad():
            self.w0[0, 0], self.w0[0, 1] = -0.0, float("inf")

    def forward(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((getattr(self, n).float() * g).sum() for n, g in grads.items())


def _mask() -> ParamMask:
    g = torch.Generator().manual_seed(1)
    tensors = {n: torch.rand(s, generator=g) > 0.5 for n, s in _SHAPES.items() if n.startswith("w")}
    tensors["w0"][0, :2] = False
    return ParamMask(
        tensors
        | {"whole": torch.zeros(_SHAPES["whole"], dtype=torch.bool), "free": torch.ones(8, dtype=torch.bool)}
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        model({n: torch.randn(s, generator=g) for n, s in _SHAPES.items()}).backward()
        opt.step()
        opt.zero_grad()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(_BITS[t.dtype])


def _run(dtype, monkeypatch, *, foreign_hook: bool, spy: list | None = None):
    model = _Net(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1, fused=True)
    _train(model, opt, range(1))  # state everywhere before the mask
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gm = GradientMask(model, _mask(), optimizer=opt).attach()
    if (
        foreign_hook
    ):  # another pre-hook: parts are not sound (it may snapshot too), everything at once instead
        opt.register_step_pre_hook(lambda *_: None)
    if spy is not None:
        real = gm_module.step_in_parts

        def counting(optimizer, step, parts, *rest, **kw):
            parts = list(parts)
            spy.append([[t.name for t in items] for items, _ in parts])
            return real(optimizer, step, parts, *rest, **kw)

        monkeypatch.setattr(gm_module, "step_in_parts", counting)
    monkeypatch.setattr(gm_module, "_PART_BYTES", 48 * 32 * 4)  # about one masked tensor per part
    _train(model, opt, range(1, 4))
    gm.detach()
    return model, before, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parts_are_bit_identical_to_plain_and_to_snapshot_all(dtype, monkeypatch):
    spy: list = []
    parted, before, _ = _run(dtype, monkeypatch, foreign_hook=False, spy=spy)
    whole, _, _ = _run(dtype, monkeypatch, foreign_hook=True)
    plain = _Net(dtype)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=5e-2, weight_decay=0.1, fused=True)
    _train(plain, plain_opt, range(4))

    assert len(spy) == 3 and all(len(parts) >= 2 for parts in spy), spy  # the parts path ran, in parts
    mask = _mask()
    for n, p in parted.named_parameters():
        keep = mask[n].expand(p.shape)
        assert torch.equal(_bits(p), _bits(getattr(whole, n))), f"{n}: parts differ from snapshot-all"
        assert torch.equal(_bits(p)[~keep], _bits(before[n])[~keep]), f"{n}: frozen coordinates moved"
        assert torch.equal(_bits(p)[keep], _bits(getattr(plain, n))[keep]), f"{n}: differs from plain fused"


def test_gradients_are_back_after_the_step(monkeypatch):
    model = _Net(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1, fused=True)
    monkeypatch.setattr(gm_module, "_PART_BYTES", 1)
    with GradientMask(model, _mask(), optimizer=opt):
        g = torch.Generator().manual_seed(3)
        model({n: torch.randn(s, generator=g) for n, s in _SHAPES.items()}).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n != "whole"}
        opt.step()
        for n, p in model.named_parameters():
            if n != "whole":  # an entirely frozen tensor's gradient is dropped before any step (as before)
                assert p.grad is not None and torch.equal(p.grad, grads[n]), n


def test_a_failing_part_puts_every_gradient_back():
    params = [nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    for p in params:
        p.grad = torch.ones(4)
    grads = [p.grad for p in params]

    def boom(_items):
        raise RuntimeError("boom")

    step = raw_step(opt, (), {}) or (lambda o, *a, **k: None)
    with pytest.raises(RuntimeError, match="boom"):
        step_in_parts(opt, step, [([0], [params[0]]), ([1], [params[1]])], (), {}, lambda _i: None, boom)
    assert all(p.grad is g for p, g in zip(params, grads))


def test_raw_step_refuses_what_parts_cannot_do():
    p = nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    handle = opt.register_step_pre_hook(lambda *_: None)
    assert raw_step(opt, (), {}) is not None  # torch's own optimizer, one pre-hook (the caller's)
    assert raw_step(opt, (None,), {}) is not None  # accelerate passes closure=None positionally
    assert raw_step(opt, (), {"closure": lambda: 0.0}) is None  # a closure would run once per part
    assert raw_step(opt, (lambda: 0.0,), {}) is None
    opt.register_step_pre_hook(lambda *_: None)
    assert raw_step(opt, (), {}) is None  # another pre-hook may snapshot too
    handle.remove()

    class Custom(torch.optim.SGD):  # defined outside torch.optim: may step gradless parameters
        pass

    custom = Custom([p], lr=0.1)
    custom.register_step_pre_hook(lambda *_: None)
    assert raw_step(custom, (), {}) is None
    lbfgs = torch.optim.LBFGS([p])
    lbfgs.register_step_pre_hook(lambda *_: None)
    assert raw_step(lbfgs, (), {}) is None


def test_split_by_size():
    assert split_by_size([3, 3, 3, 9, 1], lambda n: n, 6) == [[3, 3], [3], [9], [1]]
    assert split_by_size([], lambda n: n, 6) == []


def _routed_run(monkeypatch, *, foreign_hook: bool, spy: list | None = None):
    import copy

    from conftest import make_model, random_input_ids

    import hfhooks.routing.router as router_module
    from hfhooks import FORGET, RETAIN, Router, dedicated_mask

    torch.manual_seed(0)
    model = copy.deepcopy(make_model("qwen2")).train()
    ded = dedicated_mask(model, mlp_units=8, heads=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    router = Router(model, ded, optimizer=opt).attach()
    if foreign_hook:
        opt.register_step_pre_hook(lambda *_: None)
    if spy is not None:
        real = router_module.step_in_parts

        def counting(optimizer, step, parts, *rest, **kw):
            parts = list(parts)
            spy.append(len(parts))
            return real(optimizer, step, parts, *rest, **kw)

        monkeypatch.setattr(router_module, "step_in_parts", counting)
    monkeypatch.setattr(router_module, "PART_BYTES", 4096)
    for i, mode in enumerate((FORGET, RETAIN, FORGET, RETAIN)):
        ids = random_input_ids(2, 6, seed=i)
        model(input_ids=ids, labels=ids, routing=torch.full((2,), mode)).loss.backward()
        opt.step()
        opt.zero_grad()
    router.detach()
    return model


def test_strict_routing_in_parts_is_bit_identical(monkeypatch):
    spy: list = []
    parted = _routed_run(monkeypatch, foreign_hook=False, spy=spy)
    whole = _routed_run(monkeypatch, foreign_hook=True)
    assert len(spy) == 4 and min(spy) >= 2, spy  # every strict step went through parts
    for (n, a), (_, b) in zip(parted.named_parameters(), whole.named_parameters()):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), n


def test_a_stock_trainer_steps_in_parts(monkeypatch, tmp_path):
    """accelerate's optimizer wrapper passes ``closure=None`` positionally: the parts path must still run."""
    import transformers
    from conftest import make_model

    from hfhooks import GradientMaskCallback

    model = make_model("llama")
    g = torch.Generator().manual_seed(0)
    mask = ParamMask({n: torch.rand(p.shape, generator=g) > 0.5 for n, p in model.named_parameters()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls: list = []
    real = gm_module.step_in_parts
    monkeypatch.setattr(gm_module, "step_in_parts", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = [torch.randint(0, 32, (8,), generator=g) for _ in range(4)]
    args = transformers.TrainingArguments(
        str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to=[], weight_decay=0.1,
        optim="adamw_torch_fused", use_cpu=True, save_strategy="no", learning_rate=1e-2,
    )  # fmt: skip
    transformers.Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": x, "labels": x} for x in ids],
        callbacks=[GradientMaskCallback(mask)],
    ).train()
    assert len(calls) == 2
    for n, p in model.named_parameters():
        keep = mask[n]
        assert torch.equal(p.detach()[~keep], before[n][~keep]), n
        assert not torch.equal(p.detach()[keep], before[n][keep]), n


def test_cpu_gather_and_scatter_of_frozen_values_round_trip_across_slices():
    g = torch.Generator().manual_seed(0)
    n = (1 << 21) + 12345  # several 1 Mi-element slices of the scatter, and a ragged end
    bits = torch.randint(-(2**15), 2**15, (n,), dtype=torch.int16, generator=g)
    keep = (torch.rand(n, generator=g) > 0.3).to(torch.uint8)
    values = gm_module._gather_frozen(bits, keep)
    assert torch.equal(values, bits[keep == 0])
    out = torch.zeros_like(bits)
    gm_module._scatter_frozen(out, keep, values)
    assert torch.equal(out[keep == 0], bits[keep == 0]) and not out[keep == 1].any()
