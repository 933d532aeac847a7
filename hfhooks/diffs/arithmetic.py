"""Arithmetic on entry payloads: Δ from two tensors, θ + scale·Δ, and the payload maps behind the algebra.

:class:`~hfhooks.diffs.WeightDiff` operations are lazy: each wraps an entry's ``load`` with one of the payload
maps here (negate, scale, mask, sparsify, quantise), so nothing is computed until a payload is read.
:func:`between_entry` computes one tensor's Δ with its exactness flags; :func:`_plus_blocks` / :func:`_plus`
add ``scale·Δ`` in the wider dtype, block by block, leaving θ bit-identical where Δ is zero; :func:`apply_fn`
is the streaming per-tensor edit that applying a diff to a checkpoint hands to
:func:`~hfhooks.io.edit.edit_checkpoint`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from hfhooks.core.params import bit_view
from hfhooks.diffs.entries import (
    BaseMismatchError,
    DiffEntry,
    Payload,
    bitwise_equal,
    const_loader,
    decode_payload,
    dense_entry,
    entry_bases,
    mismatch_message,
    sparse_payload,
    tensor_fingerprint,
)
from hfhooks.diffs.fileformat import DEFERRED, worker_pool
from hfhooks.io.safetensors import ReadBuffer, TensorBlocks


def mapped_loader(e: DiffEntry, fn: Callable[[Payload], Payload]) -> Callable[[], Payload]:
    """A loader applying ``fn`` to ``e``'s payload when it is read (edits stay lazy)."""
    return lambda: fn(e.load())


def negate_payload(p: Payload) -> Payload:
    """The payload of ``-Δ`` (exact for every storage)."""
    out = dict(p)
    if "range" in p:
        out["range"] = -p["range"]  # codes unchanged: r0 + c·(r1 − r0)/(n−1) negates exactly
    else:
        out["values"] = -p["values"]
    return out


def scale_payload(e: DiffEntry, p: Payload, c: float, divide: bool = False) -> Payload:
    """``c·Δ`` (or ``Δ / c``: dividing is not multiplying by ``1/c`` in floating point, and ``d / c`` must
    equal the same division done on the tensors)."""
    out = dict(p)
    key = "range" if "range" in p else "values"
    wide = p[key].to(torch.promote_types(e.dtype, torch.float32))
    out[key] = (wide / c if divide else wide * c).to(e.dtype)
    return out


def mask_payload(e: DiffEntry, p: Payload, bits: torch.Tensor) -> Payload:
    """The payload of ``Δ`` with the coordinates outside ``bits`` dropped (becomes sparse)."""
    bits = bits.to(torch.bool).expand(e.shape)
    if e.storage == "quantized":
        old = p.get("mask")
        codes_full = torch.zeros(e.shape, dtype=torch.int32)
        present = old if old is not None else torch.ones(e.shape, dtype=torch.bool)
        codes_full[present] = p["codes"].to(torch.int32)
        new_mask = present & bits
        return {"mask": new_mask, "codes": codes_full[new_mask], "range": p["range"]}
    return sparse_payload(decode_payload(e, p), bits)


def sparse_is_smaller(delta: torch.Tensor, nz: torch.Tensor | None = None) -> bool:
    """Would masked-sparse storage (1 bit per coordinate + the non-zero values) take fewer bytes than dense?
    The rule of ``storage="auto"``."""
    nz = delta != 0 if nz is None else nz
    sparse_bytes = math.ceil(delta.numel() / 8) + int(nz.sum()) * delta.element_size()
    return sparse_bytes < delta.numel() * delta.element_size()


def sparsify_payload(e: DiffEntry, p: Payload) -> Payload:
    """The sparse payload holding ``Δ``'s non-zero coordinates only."""
    delta = decode_payload(e, p)
    return sparse_payload(delta, delta != 0)


def quantize_payload(e: DiffEntry, p: Payload, levels: int) -> Payload:
    """The payload of ``Δ`` quantised to ``levels`` evenly spaced values between its min and max."""
    if e.storage == "quantized":
        mask = p.get("mask")
        values = decode_payload(e, p)
        values = values[mask] if mask is not None else values.reshape(-1)
    elif e.storage == "sparse":
        mask, values = p["mask"], p["values"]
    else:
        mask, values = None, p["values"].reshape(-1)
    v = values.to(torch.float32) if values.dtype != torch.float64 else values
    lo = v.min() if v.numel() else v.new_zeros(())
    hi = v.max() if v.numel() else v.new_zeros(())
    step = (hi - lo) / (levels - 1)
    codes = (
        torch.zeros(v.shape, dtype=torch.uint8)
        if step == 0
        else ((v - lo) / step).round().clamp_(0, levels - 1)
    )
    out: Payload = {"codes": codes.to(torch.uint8), "range": torch.stack([lo, hi]).to(e.dtype)}
    if mask is not None:
        out["mask"] = mask
    return out


def between_entry(
    base: torch.Tensor, tuned: torch.Tensor, dtype: torch.dtype | None, storage: str
) -> DiffEntry:
    """The entry ``tuned - base`` in ``dtype`` (default: at least float32), with its exactness flags
    (whether adding it back reproduces ``tuned`` bit for bit, and subtracting it ``base``)."""
    if not base.is_floating_point() or not tuned.is_floating_point():
        raise ValueError(f"Diffs are defined on floating-point weights, got {base.dtype} / {tuned.dtype}.")
    dt = dtype or torch.promote_types(torch.promote_types(base.dtype, tuned.dtype), torch.float32)
    delta = tuned.to(dt, copy=True).sub_(base)  # one temporary of Δ's size
    changed = not bitwise_equal(base, tuned)
    exact = tuned.dtype == base.dtype and bitwise_equal(_plus(base, delta, 1.0), tuned)
    exact_inv = tuned.dtype == base.dtype and bitwise_equal(_plus(tuned, delta, -1.0), base)
    fields = {
        "base": tensor_fingerprint(base),
        "target": tensor_fingerprint(tuned),
        "exact": exact,
        "exact_inverse": exact_inv,
        "changed": changed,
    }
    if storage == "dense":
        return dense_entry(delta, **fields)
    nz = delta != 0
    if storage == "auto" and not sparse_is_smaller(delta, nz):
        return dense_entry(delta, **fields)
    return DiffEntry(
        tuple(delta.shape), delta.dtype, "sparse", const_loader(sparse_payload(delta, nz)), **fields
    )


_CHUNK = 1 << 18  # elements per step of the blocked update: cache-sized, no large temporaries
_NEG_ZERO = {2: -(1 << 15), 4: -(1 << 31), 8: -(1 << 63)}


def _plus_blocks(
    theta: torch.Tensor, delta: torch.Tensor, scale: float
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``θ + scale·Δ`` in cache-sized blocks ``(start, end, values)`` through reused buffers (the values are
    overwritten by the next block). Computed in the wider dtype and cast back; where Δ = 0, θ is kept bit for
    bit — ``x + 0`` is ``x`` except for ``−0.0``, so the select only runs on blocks where θ holds one."""
    ct = torch.promote_types(torch.promote_types(theta.dtype, delta.dtype), torch.float32)
    tf, df = theta.contiguous().reshape(-1), delta.contiguous().reshape(-1)
    n = tf.numel()
    neg_zero = _NEG_ZERO.get(tf.element_size())
    ti = bit_view(tf) if neg_zero is not None else None
    buf = torch.empty(min(n, _CHUNK), dtype=ct)
    obuf = torch.empty(min(n, _CHUNK), dtype=theta.dtype)
    mask = torch.empty(min(n, _CHUNK), dtype=torch.bool)
    for i in range(0, n, _CHUNK):
        j = min(i + _CHUNK, n)
        b, o, m = buf[: j - i], obuf[: j - i], mask[: j - i]
        b.copy_(tf[i:j])
        if scale == 1.0:
            b.add_(df[i:j])
        else:
            b.add_(df[i:j], alpha=scale)
        o.copy_(b)
        if ti is not None and int(ti[i:j].min()) == neg_zero:  # −0.0 is the smallest integer pattern
            torch.eq(df[i:j], 0, out=m)
            torch.where(m, tf[i:j], o, out=o)
        yield i, j, o


def _plus(theta: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """``θ + scale·Δ`` as a new tensor (see :func:`_plus_blocks`)."""
    out = torch.empty(theta.shape, dtype=theta.dtype)
    of = out.view(-1)
    for i, j, block in _plus_blocks(theta, delta, scale):
        of[i:j].copy_(block)
    return out


def add_delta(theta: torch.Tensor, entry: DiffEntry, scale: float) -> torch.Tensor:
    """``theta + scale·Δ`` for one entry (sparse entries touch only their masked coordinates)."""
    return _add_payload(theta, entry, entry.load(), scale)


def _add_payload(theta: torch.Tensor, entry: DiffEntry, payload: Payload, scale: float) -> torch.Tensor:
    if entry.storage == "sparse":  # touch only the masked coordinates
        mask = payload["mask"]
        out = theta.clone()
        out[mask] = _plus(theta[mask], payload["values"], scale)
        return out
    return _plus(theta, decode_payload(entry, payload), scale)


def apply_fn(
    name: str, entry: DiffEntry, scale: float, check_base: bool, buffer: ReadBuffer | None = None
) -> Callable[[Callable[[], torch.Tensor]], torch.Tensor | TensorBlocks]:
    """The streaming edit for one tensor: read θ and Δ, check θ's fingerprint and Δ's CRC on a helper thread
    while θ + scale·Δ is computed and written block by block; a failed check aborts the edit."""

    def fn(load: Callable[[], torch.Tensor]) -> torch.Tensor | TensorBlocks:
        theta = load()
        checks = []
        bases = entry_bases(entry) if check_base else []
        if bases:
            checks.append(worker_pool().submit(tensor_fingerprint, theta))
        deferred = DEFERRED.get(entry.load)
        if deferred is not None:
            payload, verify = deferred(buffer)
            checks.append(worker_pool().submit(verify))
        else:
            payload = entry.load()

        def finish() -> None:
            results = [c.result() for c in checks]  # re-raises a DiffFileError from verify()
            if bases and results[0] not in bases:
                raise BaseMismatchError(mismatch_message([(name, bases[0], results[0])], None))

        if entry.storage != "dense":
            out = _add_payload(theta, entry, payload, scale)
            finish()
            return out

        def blocks() -> Iterator[torch.Tensor]:
            yield from (block for _, _, block in _plus_blocks(theta, payload["values"], scale))
            finish()

        return TensorBlocks(theta.dtype, tuple(theta.shape), blocks())

    return fn
