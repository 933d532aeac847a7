"""The hard freeze applies torch Adam / AdamW / SGD weight decay by hand to the trainable coordinates and steps
without it, instead of snapshotting the frozen values around the step: bit-identical to a hand-masked torch
optimizer on the trainable coordinates and to the snapshot path everywhere, frozen values untouched, and no
parameter-sized copy held during the step. Fused / capturable optimizers keep the snapshot path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hfhooks.freeze.weight_decay as wd_module
from hfhooks import GradientMask, ParamMask

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}

OPTIMIZERS = {
    "adamw": lambda ps, **kw: torch.optim.AdamW(ps, lr=5e-2, weight_decay=0.1, **kw),
    "adamw-amsgrad-max": lambda ps, **kw: torch.optim.AdamW(
        ps, lr=5e-2, weight_decay=0.1, amsgrad=True, maximize=True, **kw
    ),
    "adam-l2": lambda ps, **kw: torch.optim.Adam(ps, lr=5e-2, weight_decay=0.1, **kw),
    "adam-l2-amsgrad-max": lambda ps, **kw: torch.optim.Adam(
        ps, lr=5e-2, weight_decay=0.1, amsgrad=True, maximize=True, **kw
    ),
    "adam-decoupled": lambda ps, **kw: torch.optim.Adam(
        ps, lr=5e-2, weight_decay=0.1, decoupled_weight_decay=True, **kw
    ),
    "sgd-momentum": lambda ps, **kw: torch.optim.SGD(ps, lr=5e-2, momentum=0.9, weight_decay=0.1, **kw),
    "sgd-nesterov-max": lambda ps, **kw: torch.optim.SGD(
        ps, lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True, **kw
    ),
    "sgd-plain": lambda ps, **kw: torch.optim.SGD(ps, lr=5e-2, weight_decay=0.1, **kw),
}


_SPECIAL = torch.zeros(16, 16, dtype=torch.bool)
_SPECIAL[0, :3] = True


class _Net(nn.Sequential):
    """Four linears plus ``extra``, a parameter holding -0.0, inf and NaN in frozen coordinates (and a
    trainable +0.0) that still gets a finite gradient: the loss sees it only through ``masked_fill``."""

    def __init__(self):
        super().__init__(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))
        self.extra = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        out = super().forward(x).float().square().mean()
        return out + (self.extra.masked_fill(_SPECIAL, 0).float() * x[:, :1].float().mean()).sum()


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = _Net().to(dtype)
    with torch.no_grad():
        w = model.extra
        w[0, 0], w[0, 1], w[0, 2], w[1, 1] = -0.0, float("inf"), float("nan"), 0.0
    return model


def _mask(model: nn.Module) -> ParamMask:
    """Element mask (layer 0), rows (layer 1), columns (layer 2), layer 3 and biases 0/1 trainable in full,
    bias 2 entirely frozen (others="freeze" would freeze unnamed tensors; named here to keep it explicit)."""
    g = torch.Generator().manual_seed(3)
    extra = torch.rand(16, 16, generator=g) > 0.5
    extra[0, :3] = False  # -0.0, inf, nan frozen
    extra[1, 1] = True  # a trainable +0.0
    element = ParamMask(
        {
            "extra": extra,
            "0.weight": torch.rand(16, 16, generator=g) > 0.5,
            "0.bias": torch.ones(16, dtype=torch.bool),
            "1.bias": torch.ones(16, dtype=torch.bool),
            "2.bias": torch.zeros(16, dtype=torch.bool),
            "3.weight": torch.ones(4, 16, dtype=torch.bool),
            "3.bias": torch.rand(4, generator=g) > 0.5,
        }
    )
    return element | ParamMask.from_slices(
        {"1.weight": (0, [1, 4, 5, 9]), "2.weight": (1, [0, 2, 3, 15])}, model
    )


def _run(dtype, make_opt, foreach, mode, steps=3):
    """Train 3 steps (2 micro-batches each, clipped, an lr schedule). mode: "emulated" (the default path),
    "snapshot" (weight decay by hand disabled) or "reference" (plain torch, gradients masked by hand).
    Returns (model, mask, peak bytes held by the GradientMask during a step beyond what it holds between)."""
    model = _model(dtype)
    mask = _mask(model)
    opt = make_opt(model.parameters(), foreach=foreach)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    gm, held = None, [0]
    if mode != "reference":
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        opt.register_step_post_hook(  # runs before GradientMask's own post-hook (registered later)
            lambda *_: held.__setitem__(0, max(held[0], _extra_storage(gm, params)))
        )
        gm = GradientMask(model, mask, optimizer=opt).attach()
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for _ in range(2):  # gradient accumulation
            x = torch.randn(8, 16, generator=g).to(dtype)
            model(x).backward()
        if mode == "reference":
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.grad[~mask[name].expand(p.shape)] = 0
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        if mode == "reference":  # put frozen values back (torch moved them): the next forward must see them
            with torch.no_grad():
                for name, p in model.named_parameters():
                    frozen = ~mask[name].expand(p.shape)
                    p[frozen] = initial[name][frozen]
        sched.step()
        opt.zero_grad()
    if gm is not None:
        assert [grp["weight_decay"] for grp in opt.param_groups] == [0.1]  # restored after every step
        held[0] -= gm.nbytes()  # what it holds between steps too (mask bits, row/column indices)
        gm.detach()
    return model, mask, held[0]


def _extra_storage(obj, exclude: set[int]) -> int:
    """Bytes of tensor storage reachable from ``obj`` (one level into containers and dataclasses), not in
    ``exclude``: what the GradientMask holds at that moment."""
    seen, stack, found = set(), [obj], {}
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            ptr = x.untyped_storage().data_ptr()
            if ptr not in exclude:
                found[ptr] = x.untyped_storage().nbytes()
        elif isinstance(x, (list, tuple, set)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif hasattr(x, "__dict__") and not isinstance(x, (nn.Module, torch.optim.Optimizer, type)):
            stack.extend(vars(x).values())
    return sum(found.values())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(_BITS[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_weight_decay_by_hand_is_bit_identical_and_holds_no_snapshot(name, foreach, dtype, monkeypatch):
    before = {n: p.detach().clone() for n, p in _model(dtype).named_parameters()}
    emulated, mask, held = _run(dtype, OPTIMIZERS[name], foreach, "emulated")
    reference, _, _ = _run(dtype, OPTIMIZERS[name], foreach, "reference")
    monkeypatch.setattr(wd_module.WeightDecay, "of", classmethod(lambda cls, *a: None))
    snapshotted, _, held_snapshot = _run(dtype, OPTIMIZERS[name], foreach, "snapshot")

    trained = 0
    for (n, p), r, s in zip(emulated.named_parameters(), reference.parameters(), snapshotted.parameters()):
        keep = mask[n].expand(p.shape)
        assert torch.equal(_bits(p), _bits(s)), f"{n}: differs from the snapshot path"
        assert torch.equal(_bits(p)[~keep], _bits(before[n])[~keep]), f"{n}: frozen coordinates moved"
        assert torch.equal(_bits(p)[keep], _bits(r)[keep]), f"{n}: trainable coordinates differ from torch"
        trained += int((_bits(p) != _bits(before[n]))[keep].sum())
    assert trained > 0  # the comparison is not vacuous
    # During the step, beyond the mask's bits and indices: only a snapshot of `extra` (it holds a NaN, whose bits
    # a ±0 update may change); the snapshot path copies the frozen coordinates of every masked tensor (compactly;
    # the entirely frozen 2.bias loses its gradient instead).
    sizes = {n: p.numel() * p.element_size() for n, p in emulated.named_parameters() if n != "2.bias"}
    frozen = {
        n: int((~mask[n].expand(p.shape)).sum()) * p.element_size()
        for n, p in emulated.named_parameters()
        if n != "2.bias"
    }
    assert held <= sizes["extra"] + 64, (held, sizes)  # + the mask object's own row/column vectors
    assert held_snapshot >= sum(frozen.values())  # the measurement sees a snapshot when there is one


def test_fused_adamw_keeps_the_snapshot_path_where_the_probe_says_no(monkeypatch):
    monkeypatch.setattr(wd_module, "fused_decay_matches", lambda *_: False)  # as for bf16 (see the next test)
    model = _model(torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = _mask(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1, fused=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = []
    opt.register_step_post_hook(lambda *_: held.append(_extra_storage(gm, params)))
    gm = GradientMask(model, mask, optimizer=opt).attach()
    for _ in range(2):
        model(torch.randn(8, 16)).backward()
        opt.step()
        assert opt.param_groups[0]["weight_decay"] == 0.1  # never touched
        opt.zero_grad()
    gm.detach()
    for n, p in model.named_parameters():
        keep = mask[n].expand(p.shape)
        assert torch.equal(_bits(p)[~keep], _bits(before[n])[~keep])
    for n, p in model.named_parameters():  # the special values stayed frozen too
        if n == "extra":
            assert torch.equal(_bits(p)[_SPECIAL], _bits(before[n])[_SPECIAL])
    assert min(held) >= 0.5 * sum(p.numel() * 4 for p in model.parameters())


def test_the_fused_probe_accepts_float32_and_refuses_bf16_and_fp16():
    """Fused AdamW decays and updates in one rounding in 16-bit dtypes: no op before the step reproduces it."""
    for dtype, expected in [
        (torch.float32, True),
        (torch.float64, True),
        (torch.bfloat16, False),
        (torch.float16, False),
    ]:
        p = nn.Parameter(torch.zeros(4, dtype=dtype))
        opt = torch.optim.AdamW([p], lr=5e-2, weight_decay=0.1, fused=True)
        assert wd_module.fused_decay_matches(opt, opt.param_groups[0]) is expected, dtype
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(4))], lr=5e-2, weight_decay=0.1, fused=True)
    opt.grad_scale = torch.ones(())  # a GradScaler drives the step: it may skip it after the decay by hand
    assert not wd_module.decay_is_emulable(opt, opt.param_groups[0])


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("name", ["adamw", "adam-decoupled", "adam-l2"])
def test_fused_float32_decays_by_hand_bit_identically_and_holds_no_snapshot(name, amsgrad, monkeypatch):
    """Float32 fused steps (the HF Trainer's default optimizer) take the weight-decay-by-hand path: the same bits
    as the snapshot path and as torch's fused step on hand-masked gradients, and nothing copied during the step."""

    def make(ps, **kw):
        kw.pop("foreach", None)
        opt = OPTIMIZERS[name](ps, fused=True, **kw)
        for group in opt.param_groups:
            group["amsgrad"] = amsgrad
        return opt

    before = {n: p.detach().clone() for n, p in _model(torch.float32).named_parameters()}
    emulated, mask, held = _run(torch.float32, make, None, "emulated")
    reference, _, _ = _run(torch.float32, make, None, "reference")
    monkeypatch.setattr(wd_module, "fused_decay_matches", lambda *_: False)
    snapshotted, _, held_snapshot = _run(torch.float32, make, None, "snapshot")
    runs = {"snapshot path": snapshotted, "torch": reference}
    counts = {what: 0 for what in ("frozen moved", "trained", *(f"differs from {r}" for r in runs))}
    for n, p in emulated.named_parameters():
        keep, now = mask[n].expand(p.shape), _bits(p)
        counts["frozen moved"] += int((now != _bits(before[n]))[~keep].sum())
        counts["trained"] += int((now != _bits(before[n]))[keep].sum())
        for what, run in runs.items():  # the snapshot path everywhere, torch on the trainable coordinates
            other = _bits(dict(run.named_parameters())[n])
            counts[f"differs from {what}"] += int((now != other)[keep if what == "torch" else ...].sum())
    assert counts.pop("trained") > 0, counts
    assert set(counts.values()) == {0}, counts
    nan_tensor = mask["extra"].numel() * 4  # the tensor holding a frozen NaN keeps its snapshot (see _Frozen)
    assert held <= nan_tensor + 64 < held_snapshot, (held, held_snapshot)


def test_weight_decay_is_restored_when_the_step_raises():
    model = _model(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)
    gm = GradientMask(model, _mask(model), optimizer=opt).attach()

    def boom(*_):
        raise RuntimeError("boom")

    handle = opt.register_step_pre_hook(boom)  # after GradientMask's pre-hook: weight decay already zeroed
    model(torch.randn(8, 16)).backward()
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    handle.remove()
    opt.step()  # the next step's pre-hook puts the group's weight decay back before using it
    assert opt.param_groups[0]["weight_decay"] == 0.1
    handle = opt.register_step_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    gm.detach()  # and so does detach
    assert opt.param_groups[0]["weight_decay"] == 0.1
    handle.remove()


def test_two_masks_on_one_optimizer_fall_back_to_snapshots():
    """Each GradientMask would decay the other's masked tensors in full: with two, both snapshot."""
    model = _model(torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = _mask(model)
    first = ParamMask({n: mask[n].expand(p.shape) for n, p in model.named_parameters() if n.startswith("0.")})
    second = ParamMask(
        {n: mask[n].expand(p.shape) for n, p in model.named_parameters() if n.startswith("1.")}
    )
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)
    with (
        GradientMask(model, first, optimizer=opt, others="train"),
        GradientMask(model, second, optimizer=opt, others="train"),
    ):
        for _ in range(2):
            model(torch.randn(8, 16)).backward()
            opt.step()
            opt.zero_grad()
    for n, p in model.named_parameters():
        if n[:2] in ("0.", "1."):
            keep = mask[n].expand(p.shape)
            assert torch.equal(_bits(p)[~keep], _bits(before[n])[~keep]), n


@pytest.mark.parametrize("fused", [False, True])
def test_an_entirely_frozen_tensor_is_skipped_by_the_decay_by_hand_step(fused):
    """On the decay-by-hand path too, an entirely frozen tensor loses its gradient before the step, so torch's
    optimizer does no work on it: its state (step count included) stays as it was at attach."""
    model = _model(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1, fused=fused)
    model(torch.randn(8, 16)).backward()
    opt.step()  # state for every tensor, before the mask
    opt.zero_grad()
    frozen = dict(model.named_parameters())["2.bias"]  # entirely frozen in _mask
    step_before = opt.state[frozen]["step"].clone()
    gm = GradientMask(model, _mask(model), optimizer=opt).attach()
    for _ in range(2):
        model(torch.randn(8, 16)).backward()
        opt.step()
        assert frozen.grad is None
        opt.zero_grad()
    gm.detach()
    assert torch.equal(opt.state[frozen]["step"], step_before)
    assert not opt.state[frozen]["exp_avg"].any() and not opt.state[frozen]["exp_avg_sq"].any()
