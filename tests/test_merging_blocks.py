"""Block-streamed merges (:func:`hfhooks.merging.methods.merge_blocks`): the block size changes no bit, a checkpoint
merge never reads a whole large tensor, and the trim / DARE / TIES steps equal their whole-tensor definitions.

The references here are written independently of the implementation: ``torch.kthvalue`` + ``cumsum`` for the
magnitude trim (ties to the lowest flat indices), one ``dare_keep_mask`` draw of the whole tensor, and boolean
masks for the TIES sign election and disjoint mean.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hfhooks.io.checkpoints import Checkpoint
from hfhooks.io.safetensors import ReadBuffer
from hfhooks.merging import MergeConfig, dare_keep_mask, merge, merge_tensors
from hfhooks.merging import methods as methods_mod

METHODS = [
    dict(method="task_arithmetic", weights=[0.3, 1.0, -0.7], lambda_=0.5),
    dict(method="task_arithmetic", normalize=True),
    dict(method="ties", density=0.3),
    dict(method="ties", density=[0.2, 0.5, 1.0], weights=[1.0, 0.6, 0.9]),
    dict(method="ties", density=0.4, weights=[0.5, -1.0, 2.0], majority_sign="count"),
    dict(method="magnitude_prune", density=[0.05, 0.5, 0.9], weights=[0.5, 2.0, 1.0]),
    dict(method="dare_linear", density=0.3, seed=3),
    dict(method="dare_ties", density=[0.5, 0.3, 0.7], rescale="l1", normalize=False),
    dict(method="dare_linear", density=0.4, rescale="none"),
    dict(method="tall", task=1),
    dict(method="consensus", k=2),
]


def models(dtype: torch.dtype, n: int = 3000, ties: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    if ties:  # few distinct |τ|: most of a trim decided by the tie rule
        tuned = [base + torch.randint(-3, 4, (n,), generator=g) * 0.25 for _ in range(3)]
    else:
        tuned = [
            base + torch.randn(n, generator=g) * 0.002 * (torch.rand(n, generator=g) < 0.7) for _ in range(3)
        ]
    return base.to(dtype), [t.to(dtype) for t in tuned]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def trim_reference(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, ⌊density·n⌋) largest |τ|, ties at the threshold to the lowest flat indices."""
    a = tau.abs().reshape(-1)
    k = max(1, int(density * a.numel()))
    threshold = torch.kthvalue(a, a.numel() - k + 1).values
    keep = a > threshold
    tied = a == threshold
    keep |= tied & (tied.cumsum(0) <= k - int(keep.sum()))
    return keep.reshape(tau.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_block_size_changes_no_bit(monkeypatch, cfg, ties, dtype):
    base, tuned = models(dtype, n=500, ties=ties)
    config = MergeConfig(**cfg)
    default = merge_tensors(base, tuned, config, "w")
    for chunk, block in [(7, 3), (300, 64)]:
        monkeypatch.setattr(methods_mod, "CHUNK", chunk)
        monkeypatch.setattr(methods_mod, "BLOCK", block)
        assert torch.equal(bits(merge_tensors(base, tuned, config, "w")), bits(default)), (chunk, block)


@pytest.mark.parametrize("small_blocks", [False, True])
def test_trim_equals_the_whole_tensor_definition(monkeypatch, small_blocks):
    if small_blocks:
        monkeypatch.setattr(methods_mod, "CHUNK", 500)
        monkeypatch.setattr(methods_mod, "BLOCK", 37)
    for ties in (False, True):
        base, tuned = models(torch.float32, n=4000, ties=ties, seed=1)
        densities = [0.05, 0.3, 0.9]
        got = merge_tensors(base, tuned, MergeConfig(method="magnitude_prune", density=densities))
        mixed = torch.zeros_like(base)  # Σ_t trim(τ_t), summed in model order: equal bit for bit
        for t, d in zip(tuned, densities):
            tau = t - base
            mixed += tau * trim_reference(tau, d)
        assert torch.equal(got, base + mixed)


def test_trim_with_subnormal_and_zero_thresholds():
    """Thresholds where ``|τ| − t`` could underflow: the exact (boolean) path is taken."""
    base = torch.zeros(1000)
    t1 = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 1e-41  # subnormal τ
    t2 = torch.zeros(1000)
    t2[::3] = 1e-44
    for density in (0.3, 0.6, 0.95):
        got = merge_tensors(base, [t1, t2], MergeConfig(method="magnitude_prune", density=density))
        expect = torch.zeros(1000) + t1 * trim_reference(t1, density)
        expect += t2 * trim_reference(t2, density)
        assert torch.equal(got, expect), density


def test_ties_equals_the_boolean_definition(monkeypatch):
    monkeypatch.setattr(methods_mod, "CHUNK", 300)
    monkeypatch.setattr(methods_mod, "BLOCK", 64)
    base, tuned = models(torch.float32, n=2000, ties=True, seed=3)
    weights, density = [0.5, 1.0, 2.0], 0.4
    parts = [(t - base) * trim_reference(t - base, density) * w for t, w in zip(tuned, weights)]
    total = torch.zeros_like(base)
    for u in parts:
        total += u
    positive = total >= 0
    mixed, divisor = torch.zeros_like(base), torch.zeros_like(base)
    for u, w in zip(parts, weights):
        agree = torch.where(positive, u > 0, u < 0)
        mixed += u * agree
        divisor += agree * w
    divisor[divisor == 0] = 1
    expect = base + mixed / divisor
    got = merge_tensors(base, tuned, MergeConfig(method="ties", density=density, weights=weights))
    assert torch.equal(got, expect)


def test_dare_draw_is_the_whole_tensor_draw_across_blocks(monkeypatch):
    monkeypatch.setattr(methods_mod, "CHUNK", 1000)
    monkeypatch.setattr(methods_mod, "BLOCK", 333)
    base, tuned = models(torch.float32, n=(50 * 90), seed=4)
    base, tuned = base.reshape(50, 90), [t.reshape(50, 90) for t in tuned]
    got = merge_tensors(
        base, tuned[:1], MergeConfig(method="dare_linear", density=0.3, seed=9, rescale="none"), "x"
    )
    keep = dare_keep_mask((50, 90), 0.3, seed=9, model=0, name="x")
    assert torch.equal(got, base + (torch.zeros_like(base) + (tuned[0] - base) * keep))


@pytest.fixture
def big_ckpts(tmp_path):
    """A base and two tuned single-file checkpoints with one tensor of 3 chunks."""
    rows = 3 * methods_mod.CHUNK // 8 + 3  # three chunks and a bit
    g = torch.Generator().manual_seed(0)
    base = {
        "big.weight": (torch.randn(rows, 8, generator=g) * 0.02).bfloat16(),
        "small": torch.ones(3),
    }
    paths = []
    for i in range(3):
        d = tmp_path / ("base" if i == 0 else f"t{i}")
        d.mkdir()
        state = {
            k: (v + (torch.randn(v.shape, generator=g) * 0.002 if i else 0)).to(v.dtype)
            for k, v in base.items()
        }
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        paths.append(d)
    return paths


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_checkpoint_merge_reads_blocks_never_whole_tensors(big_ckpts, tmp_path, monkeypatch, method):
    """Peak memory stays a few chunks per model: no read (base included) is larger than one chunk."""
    base, *tuned = big_ckpts
    sizes: list[int] = []
    real = ReadBuffer.read

    def read(self, info):
        sizes.append(info.end - info.start)
        return real(self, info)

    monkeypatch.setattr(ReadBuffer, "read", read)
    kw = {"density": 0.3} if method == "ties" else {}
    report = merge(base, tuned, method, out=tmp_path / "out", progress=False, **kw)
    monkeypatch.undo()
    assert sizes and max(sizes) <= methods_mod.CHUNK * 2
    with Checkpoint(base) as b, Checkpoint(tuned[0]) as t0, Checkpoint(tuned[1]) as t1:
        expect = merge_tensors(b.get("big.weight"), [t0.get("big.weight"), t1.get("big.weight")],
                               MergeConfig(method=method, **kw), "big.weight")  # fmt: skip
    with Checkpoint(report.path) as out:
        assert torch.equal(out.get("big.weight"), expect)
