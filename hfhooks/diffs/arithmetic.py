"""Arithmetic on entry payloads: Δ from two tensors, θ + scale·Δ, and the payload maps behind the algebra.

:class:`~hfhooks.diffs.WeightDiff` operations are lazy: each wraps an entry's ``load`` with one of the payload
maps here (negate, scale, mask, sparsify, quantise), so nothing is computed until a payload is read.
:func:`between_entry` computes one tensor's Δ with its exactness flags; :func:`_plus_blocks` / :func:`_plus`
add ``scale·Δ`` in the wider dtype, block by block, leaving θ bit-identical where Δ is zero; :func:`apply_fn`
is the streaming per-tensor edit that applying a diff to a checkpoint hands to
:func:`~hfhooks.io.edit.edit_checkpoint`.
"""

from __future__ import annotations

import concurrent.futures
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from hfhooks.core.params import bit_view
from hfhooks.diffs.entries import (
    BaseMismatchError,
    DiffEntry,
    Payload,
    const_loader,
    decode_payload,
    entry_bases,
    mismatch_message,
    negate_fix,
    sparse_payload,
    tensor_fingerprint,
    with_fix,
    without_fix,
)
from hfhooks.diffs.fileformat import DEFERRED, beside
from hfhooks.io.safetensors import ReadBuffer, TensorBlocks


def mapped_loader(e: DiffEntry, fn: Callable[[Payload], Payload]) -> Callable[[], Payload]:
    """A loader applying ``fn`` to ``e``'s payload when it is read (edits stay lazy)."""
    return lambda: fn(e.load())


def negate_payload(p: Payload) -> Payload:
    """The payload of ``-Δ`` (exact for every storage). The exact corrections swap: ``−Δ`` leads from the
    target back to the base, corrected where ``between(..., exact="both")`` recorded it."""
    out = dict(p)
    if "range" in p:
        out["range"] = -p["range"]  # codes unchanged: r0 + c·(r1 − r0)/(n−1) negates exactly
    elif "scaling" in p:
        out["scaling"] = -p["scaling"]  # (B·A)·(−s) = −((B·A)·s) exactly
    elif "values" in p:
        out["values"] = -p["values"]
    return {**without_fix(out), **negate_fix(p)}


def scale_payload(e: DiffEntry, p: Payload, c: float, divide: bool = False) -> Payload:
    """``c·Δ`` (or ``Δ / c``: dividing is not multiplying by ``1/c`` in floating point, and ``d / c`` must
    equal the same division done on the tensors). The exact correction is dropped (it holds at scale 1 only).
    A factored Δ stays factored with its scaling multiplied (equal to scaling the dense Δ up to one rounding)."""
    out = without_fix(p)
    if e.storage == "zero":
        return out
    if e.storage == "factored":
        s = p["scaling"].to(torch.float64)
        out["scaling"] = s / c if divide else s * c
        return out
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


def sparse_is_smaller(delta: torch.Tensor, nz: torch.Tensor | None = None, limit: int | None = None) -> bool:
    """Would masked-sparse storage (1 bit per coordinate + the non-zero values) take fewer bytes than dense
    (or than ``limit`` bytes)? The rule of ``storage="auto"``."""
    nz = delta != 0 if nz is None else nz
    sparse_bytes = math.ceil(delta.numel() / 8) + int(nz.sum()) * delta.element_size()
    return sparse_bytes < (delta.numel() * delta.element_size() if limit is None else limit)


def sparsify_payload(e: DiffEntry, p: Payload) -> Payload:
    """The sparse payload holding ``Δ``'s non-zero coordinates only."""
    delta = decode_payload(e, p)
    return with_fix(p, sparse_payload(delta, delta != 0))


def quantize_payload(e: DiffEntry, p: Payload, levels: int) -> Payload:
    """The payload of ``Δ`` quantised to ``levels`` evenly spaced values between its min and max."""
    if e.storage == "quantized":
        mask = p.get("mask")
        values = decode_payload(e, p)
        values = values[mask] if mask is not None else values.reshape(-1)
    elif e.storage == "sparse":
        mask, values = p["mask"], p["values"]
    else:
        mask, values = None, decode_payload(e, p).reshape(-1)
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
    base: torch.Tensor,
    tuned: torch.Tensor,
    dtype: torch.dtype | None,
    storage: str,
    exact: bool | str = True,
    name: str = "",
) -> DiffEntry:
    """The entry ``tuned − base`` with its exactness flags (whether adding it back reproduces ``tuned`` bit for
    bit, and subtracting it ``base``).

    Δ is stored in ``dtype`` (default: the weights' own dtype; the wider of the two, at least float32, when
    they differ). With ``exact`` (and equal dtypes) the coordinates where ``base + Δ`` — as :func:`add_delta`
    computes it — misses ``tuned`` go into the sparse exact correction (``exact="both"``: also those where
    ``tuned − Δ`` misses ``base``, for an exact ``−Δ``), so the flags hold. A Δ that is zero everywhere is a
    ``zero`` entry (no bytes)."""
    if not base.is_floating_point() or not tuned.is_floating_point():
        raise ValueError(f"Diffs are defined on floating-point weights, got {base.dtype} / {tuned.dtype}.")
    same = base.dtype == tuned.dtype
    dt = dtype or (base.dtype if same else torch.promote_types(base.dtype, tuned.dtype))
    if not same and dtype is None:
        dt = torch.promote_types(dt, torch.float32)
    # the two CRC-32 fingerprints run on the helper thread while Δ is computed (the CRC releases the GIL)
    prints = beside(lambda: (tensor_fingerprint(base), tensor_fingerprint(tuned)))
    try:
        delta, misses, flags = _delta_blocks(base, tuned, dt, exact == "both")
    except BaseException:
        # base and tuned may be reused buffers: the thread is done with them before this returns; its own
        # error, if any, must not replace the one raised here
        concurrent.futures.wait([prints])
        raise
    base_print, target_print = prints.result()
    nonzero = flags.pop("nonzero")
    _warn_overflow(name, base, tuned, delta, misses[0])
    fields: dict[str, Any] = {"base": base_print, "target": target_print, **flags}
    extra: Payload = {}
    if exact and same:
        bf, tf = base.contiguous().reshape(-1), tuned.contiguous().reshape(-1)
        sides = [("fix", misses[0], tf, "exact")] + (
            [("unfix", misses[1], bf, "exact_inverse")] if exact == "both" else []
        )
        for key, idx, values, flag in sides:
            if idx.numel():
                idx = _with_fillers(idx)
                extra[key + "_index"], extra[key + "_values"] = idx, values[idx]
                fields[key + "es"] = int(idx.numel())
                fields["fix_dtype"] = base.dtype
            fields[flag] = True
    if not nonzero:
        return DiffEntry(tuple(base.shape), dt, "zero", const_loader(extra), **fields)
    nz = None if storage == "dense" else delta != 0
    if storage == "dense" or (storage == "auto" and not sparse_is_smaller(delta, nz)):
        return DiffEntry(tuple(base.shape), dt, "dense", const_loader({"values": delta, **extra}), **fields)
    payload = {**sparse_payload(delta, nz), **extra}
    return DiffEntry(tuple(base.shape), dt, "sparse", const_loader(payload), **fields)


def _warn_overflow(
    name: str, base: torch.Tensor, tuned: torch.Tensor, delta: torch.Tensor, misses: torch.Tensor
) -> None:
    """Warn where Δ overflowed its dtype (``65504 − (−65504)`` is ``inf`` in float16): ``base + Δ`` is still
    exact through the correction, but ``c·Δ``, sums and other bases get ±inf there. Such a coordinate always
    misses (``base + inf`` is not the finite target), so only the misses are looked at."""
    if not misses.numel():
        return
    bf, tf = base.contiguous().reshape(-1)[misses], tuned.contiguous().reshape(-1)[misses]
    over = delta.reshape(-1)[misses].isinf() & bf.isfinite() & tf.isfinite()
    if bool(over.any()):
        warnings.warn(
            f"Δ of {name or 'a tensor'!r} overflows {delta.dtype} at {int(over.sum())} coordinate(s) (the "
            f"difference of two finite weights exceeds {torch.finfo(delta.dtype).max:.4g}): applying it at "
            "scale 1 to its base is still exact (the exact correction), but c·Δ, sums of diffs and other bases "
            "get ±inf there; store Δ wider with dtype= (torch.float64 holds the difference of any two 16- or "
            "32-bit floats).",
            stacklevel=4,
        )


FIX_GAP = (1 << 16) - 1  # the largest gap between corrected coordinates: files store the gaps in 16 bits


def _with_fillers(idx: torch.Tensor) -> torch.Tensor:
    """Sorted indices with a filler coordinate added wherever two (or the first and 0) are more than
    :data:`FIX_GAP` apart, so the gaps fit 16 bits. A filler is a coordinate that needed no correction: the
    value stored there is the one ``base + Δ`` already gives, so setting it changes nothing."""
    prev = torch.cat([idx.new_zeros(1), idx[:-1]])
    extra = ((idx - prev - 1) // FIX_GAP).clamp_(min=0)
    total = int(extra.sum())
    if not total:
        return idx
    starts = torch.repeat_interleave(prev, extra)
    first = torch.repeat_interleave(torch.cumsum(extra, 0) - extra, extra)
    fill = starts + (torch.arange(total) - first + 1) * FIX_GAP
    return torch.sort(torch.cat([idx, fill])).values


def _delta_blocks(
    base: torch.Tensor, tuned: torch.Tensor, dt: torch.dtype, inverse_misses: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict[str, bool]]:
    """Δ in ``dt``, block by block (cache-sized temporaries only); the flat indices where ``base + Δ`` misses
    ``tuned`` and (``inverse_misses``; else only the flag is computed) where ``tuned − Δ`` misses ``base``; the
    flags ``exact`` / ``exact_inverse`` / ``changed`` and ``nonzero`` (whether Δ has a non-zero coordinate).

    Where ``tuned`` equals ``base`` bit for bit, Δ is 0 (``inf − inf`` would be NaN); elsewhere it is the
    difference computed in the wider of ``dt`` and float32, rounded once to ``dt``."""
    bf, tf = base.contiguous().reshape(-1), tuned.contiguous().reshape(-1)
    none = torch.zeros(0, dtype=torch.int64)
    if base.dtype != tuned.dtype:  # another dtype is another tensor: never "unchanged", never exact
        wide = torch.promote_types(
            torch.promote_types(dt, torch.promote_types(base.dtype, tuned.dtype)), torch.float32
        )
        delta = torch.empty(bf.numel(), dtype=dt)
        for i in range(0, bf.numel(), _CHUNK):
            j = min(i + _CHUNK, bf.numel())
            delta[i:j].copy_(tf[i:j].to(wide) - bf[i:j].to(wide))
        flags = {"changed": True, "exact": False, "exact_inverse": False, "nonzero": bool(delta.ne(0).any())}
        return delta.reshape(base.shape), (none, none), flags
    if torch.equal(bit_view(bf), bit_view(tf)):  # unchanged: the common case of a fine-tune's tensors
        flags = {"changed": False, "exact": True, "exact_inverse": True, "nonzero": False}
        return torch.zeros(base.shape, dtype=dt), (none, none), flags
    delta = torch.empty(bf.numel(), dtype=dt)
    fwd, inv, miss_inv, nonzero = _exact_delta(bf, tf, delta, inverse_misses)
    flags = {"changed": True, "exact": not fwd.numel(), "exact_inverse": not miss_inv, "nonzero": nonzero}
    return delta.reshape(base.shape), (fwd, inv), flags


def _exact_delta(
    bf: torch.Tensor, tf: torch.Tensor, delta: torch.Tensor, inverse_misses: bool
) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """Fill ``delta`` (flat, same-dtype weights) and find where ``bf + Δ`` misses ``tf`` and ``tf − Δ`` misses
    ``bf``, as :func:`_plus_blocks` computes them: θ ± Δ in the wide dtype, rounded once; θ kept where Δ = 0
    (so a moved coordinate with Δ = 0, e.g. −0.0 → +0.0, always misses).

    Block by block through buffers allocated once; the bit compares, ``any`` and ``nonzero`` run in numpy
    (SIMD compares, several times faster than torch's on one thread). Two identities skip work without
    changing a bit: where θ is bit-equal to the target and finite, ``t − b`` is already +0 (the fill with 0
    only matters where a NaN appeared), and ``x ± 0`` rounds back to ``x`` unless ``x`` is −0.0, so "kept"
    adds misses only to blocks where θ or the target holds a −0.0. Once an inverse miss is found (``inverse_misses`` off), the
    inverse check stops."""
    n, m, dt, wt = bf.numel(), min(bf.numel(), _CHUNK), delta.dtype, bf.dtype
    wide = torch.promote_types(torch.promote_types(dt, wt), torch.float32)
    wbuf = torch.empty(4, m, dtype=wide)  # θ, target, Δ and a sum, in the wide dtype
    rbuf = torch.empty(m, dtype=wt)  # a sum rounded back to the weights' dtype
    still_np, miss_np, kept_np = np.empty(m, bool), np.empty(m, bool), np.empty(m, bool)
    bits_b, bits_t, rbits = bit_view(bf).numpy(), bit_view(tf).numpy(), bit_view(rbuf).numpy()
    neg_zero = _NEG_ZERO.get(bf.element_size())
    exp_bits = _EXP_BITS.get(wt) if dt == wt else None
    fwd, inv, miss_inv, nonzero = [], [], False, False
    for i in range(0, n, _CHUNK):
        j = min(i + _CHUNK, n)
        k, d, bb, tb = j - i, delta[i:j], bits_b[i:j], bits_t[i:j]
        s, r, still, miss = wbuf[3, :k], rbuf[:k], still_np[:k], miss_np[:k]
        # 16-bit weights with Δ in their dtype: torch computes 16-bit ops in float32 and rounds once, the same
        # bits as widening explicitly, in one pass. Valid where the weights are finite (no NaN can arise, so no
        # fill either); a finite Δ had finite inputs (inf or NaN in either gives inf or NaN), so one check on Δ
        # replaces two on the inputs, and a block whose Δ is not finite is recomputed the explicit way.
        fast = exp_bits is not None and wt != wide
        if fast:
            torch.sub(tf[i:j], bf[i:j], out=d)
            fast = _finite(bit_view(d).numpy(), exp_bits)
        neg = neg_zero is None or neg_zero in (int(bb.min()), int(tb.min()))  # −0.0: the smallest pattern
        if neg or not fast:
            np.equal(bb, tb, out=still)
        direct = wt == wide or fast
        if fast:
            bw, tw, dw = bf[i:j], tf[i:j], d
        else:
            bw, tw, dw = _wide_delta(bf[i:j], tf[i:j], d, wbuf[:, :k], still, kept_np[:k])
        kept = None
        if neg:
            kept = np.greater(torch.eq(d, 0).numpy(), still, out=kept_np[:k])  # Δ = 0 where θ moved
        for sign, ref, out, collect in ((1, tb, fwd, True), (-1, bb, inv, inverse_misses)):
            if sign < 0 and not inverse_misses and miss_inv:
                break
            dst = r if direct else s
            if sign > 0:
                torch.add(bw, dw, out=dst)
            else:  # as −Δ is applied, θ + (−Δ): θ − Δ can differ from it in a NaN's sign bit
                torch.add(tw, torch.neg(dw, out=dst), out=dst)
            if not direct:
                r.copy_(s)
            np.not_equal(rbits[:k], ref, out=miss)
            if kept is not None:
                np.logical_or(miss, kept, out=miss)
            if miss.any():
                if collect:
                    out.append(torch.from_numpy(np.flatnonzero(miss) + i))
                miss_inv = miss_inv or sign < 0
        nonzero = nonzero or bool(torch.count_nonzero(d))
    none = torch.zeros(0, dtype=torch.int64)
    return torch.cat(fwd) if fwd else none, torch.cat(inv) if inv else none, miss_inv, nonzero


def _wide_delta(
    b: torch.Tensor,
    t: torch.Tensor,
    d: torch.Tensor,
    wbuf: torch.Tensor,
    still: np.ndarray,
    scratch: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of :func:`_exact_delta` the explicit way: θ and the target widened into ``wbuf`` (rows θ,
    target, Δ, scratch), ``d`` = their difference rounded once, 0 where ``still`` (θ unchanged) and the
    difference is NaN (``inf − inf``); returns the wide θ, target and Δ."""
    wide = wbuf.dtype
    bw = b if b.dtype == wide else wbuf[0].copy_(b)
    tw = t if t.dtype == wide else wbuf[1].copy_(t)
    raw = torch.sub(tw, bw, out=d if d.dtype == wide else wbuf[3])
    if d.dtype != wide:
        d.copy_(raw)
    if np.isnan(raw.numpy(), out=scratch).any():  # where θ is unchanged and finite, t − b is +0 already
        d.masked_fill_(torch.from_numpy(still), 0)
    return bw, tw, d if d.dtype == wide else wbuf[2].copy_(d)


_CHUNK = 1 << 18  # elements per step of the blocked update: cache-sized, no large temporaries
_NEG_ZERO = {2: -(1 << 15), 4: -(1 << 31), 8: -(1 << 63)}


def _plus_blocks(
    theta: torch.Tensor, delta: torch.Tensor, scale: float
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``θ + scale·Δ`` in cache-sized blocks ``(start, end, values)`` through two alternating buffers (a block's
    values stay valid while the next block is computed, and are overwritten by the one after). Computed in the
    wider dtype and cast back; where Δ = 0, θ is kept bit for bit — ``x + 0`` is ``x`` except for ``−0.0``,
    so the select only runs on blocks where θ holds one.

    At scale 1 with Δ in θ's dtype, one ``torch.add`` does it on blocks whose sum is finite: torch adds 16-bit
    floats in float32 and rounds once, the same bits as the explicit widen, add and cast, in one pass instead
    of four (only NaN payloads could come out differently, so blocks with a non-finite sum are recomputed the
    explicit way)."""
    ct = torch.promote_types(torch.promote_types(theta.dtype, delta.dtype), torch.float32)
    tf, df = theta.contiguous().reshape(-1), delta.contiguous().reshape(-1)
    n = tf.numel()
    neg_zero = _NEG_ZERO.get(tf.element_size())
    ti = bit_view(tf).numpy() if neg_zero is not None else None  # numpy's integer min is SIMD
    exp_bits = _EXP_BITS.get(theta.dtype) if scale == 1.0 and theta.dtype == delta.dtype else None
    buf = torch.empty(min(n, _CHUNK), dtype=ct)
    # two output buffers: the writer writes one block on another thread while the next is computed
    obufs = [torch.empty(min(n, _CHUNK), dtype=theta.dtype) for _ in range(1 if n <= _CHUNK else 2)]
    mask = torch.empty(min(n, _CHUNK), dtype=torch.bool)
    for k, i in enumerate(range(0, n, _CHUNK)):
        j = min(i + _CHUNK, n)
        o, m = obufs[k % len(obufs)][: j - i], mask[: j - i]
        fast = exp_bits is not None
        if fast:
            torch.add(tf[i:j], df[i:j], out=o)
            # A finite sum had finite inputs (inf or NaN in either gives inf or NaN), and only NaN payloads could
            # come out differently: one check on the output instead of two on the inputs. Else: recomputed.
            fast = _finite(bit_view(o).numpy(), exp_bits)
        if not fast:
            b = buf[: j - i]
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


_EXP_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}


def _finite(bits: np.ndarray, exp_bits: int) -> bool:
    """Whether every value whose bit patterns ``bits`` (signed integers) holds is finite: a positive inf/NaN is
    a signed pattern ≥ the exponent mask, a negative one an unsigned pattern ≥ sign | exponent mask."""
    if not bits.size:
        return True
    sign = 1 << (8 * bits.itemsize - 1)
    unsigned = bits.view(np.dtype(f"u{bits.itemsize}"))
    return int(bits.max()) < exp_bits and int(unsigned.max()) < sign | exp_bits


def _plus(theta: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """``θ + scale·Δ`` as a new tensor (see :func:`_plus_blocks`)."""
    out = torch.empty(theta.shape, dtype=theta.dtype)
    of = out.view(-1)
    for i, j, block in _plus_blocks(theta, delta, scale):
        of[i:j].copy_(block)
    return out


def _apply_fix(out: torch.Tensor, start: int, payload: Payload) -> None:
    """Set the corrected coordinates that fall in the flat block ``out`` (θ's coordinates ``start`` …
    ``start + len(out)``) to their recorded values."""
    idx, values = payload["fix_index"].numpy(), payload["fix_values"]
    lo, hi = (int(k) for k in np.searchsorted(idx, (start, start + out.numel())))
    if lo < hi and values.dtype == out.dtype:  # a scatter of bit patterns (numpy: no index tensor per block)
        bit_view(out).numpy()[idx[lo:hi] - start] = bit_view(values[lo:hi]).numpy()
    elif lo < hi:
        out[torch.from_numpy(idx[lo:hi] - start)] = values[lo:hi]


def uses_fix(entry: DiffEntry, scale: float, theta_fingerprint: str | None) -> bool:
    """Whether applying ``entry`` uses its exact correction: at scale 1, on the weights it was computed from
    (``theta_fingerprint`` equals its base; ``None``: not verified, so not used)."""
    return (
        bool(entry.fixes)
        and scale == 1.0
        and theta_fingerprint is not None
        and theta_fingerprint == entry.base
    )


def add_delta(theta: torch.Tensor, entry: DiffEntry, scale: float, fix: bool = False) -> torch.Tensor:
    """``theta + scale·Δ`` for one entry (sparse entries touch only their masked coordinates); ``fix``: use the
    exact correction (only when ``theta`` is verified to be the entry's base, see :func:`uses_fix`)."""
    return _add_payload(theta, entry, entry.load(), scale, fix)


def _add_payload(
    theta: torch.Tensor, entry: DiffEntry, payload: Payload, scale: float, fix: bool
) -> torch.Tensor:
    if entry.storage == "zero" and not fix:
        return theta  # Δ = 0: θ as it is, no copy
    if entry.storage == "sparse":  # touch only the masked coordinates
        mask = payload["mask"]
        out = theta.clone(memory_format=torch.contiguous_format)  # the correction indexes it flat
        out[mask] = _plus(theta[mask], payload["values"], scale)
    elif entry.storage == "zero":
        out = theta.clone(memory_format=torch.contiguous_format)
    else:
        out = _plus(theta, decode_payload(entry, payload), scale)
    if fix:
        _apply_fix(out.view(-1), 0, payload)
    return out


def _raise_failed_check(checks: list[concurrent.futures.Future], exc: Exception) -> None:
    """After the arithmetic raised ``exc``: wait for the checks running beside it (they read θ and the read
    buffer, which the caller may reuse next) and raise the first one's error, if any, as the cause to report —
    a corrupt payload (CRC mismatch) can break decoding before its check finishes."""
    concurrent.futures.wait(checks)
    for check in checks:
        error = check.exception()
        if error is not None:
            raise error from exc


def apply_fn(
    name: str, entry: DiffEntry, scale: float, check_base: bool, buffer: ReadBuffer | None = None
) -> Callable[[Callable[[], torch.Tensor]], torch.Tensor | TensorBlocks]:
    """The streaming edit for one tensor: read θ and Δ, check θ's fingerprint and Δ's CRC on a helper thread
    while θ + scale·Δ is computed and written block by block; a failed check aborts the edit.

    The exact correction is used at scale 1 with ``check_base``: a θ that is not the entry's base aborts the
    edit anyway. (A negated entry applies to two bases; its fingerprint is then taken first, to choose.)"""

    def fn(load: Callable[[], torch.Tensor]) -> torch.Tensor | TensorBlocks:
        theta = load()
        checks = []
        bases = entry_bases(entry) if check_base else []
        fix = bool(bases) and uses_fix(entry, scale, entry.base)
        if fix and len(bases) > 1:
            fp = tensor_fingerprint(theta)
            fix = fp == entry.base
            checks.append(concurrent.futures.Future())
            checks[0].set_result(fp)
        elif bases:
            checks.append(beside(tensor_fingerprint, theta))
        deferred = DEFERRED.get(entry.load)
        if deferred is not None:
            payload, verify = deferred(buffer)
            checks.append(beside(verify))
        else:
            payload = entry.load()

        def finish() -> None:
            results = [c.result() for c in checks]  # re-raises a DiffFileError from verify()
            if bases and results[0] not in bases:
                raise BaseMismatchError(mismatch_message([(name, bases[0], results[0])], None))

        if entry.storage != "dense":
            try:
                out = _add_payload(theta, entry, payload, scale, fix)
            except Exception as exc:
                _raise_failed_check(checks, exc)
                raise
            finish()
            return out

        def blocks() -> Iterator[torch.Tensor]:
            try:
                for i, _, block in _plus_blocks(theta, payload["values"], scale):
                    if fix:
                        _apply_fix(block, i, payload)
                    yield block
            except Exception as exc:  # not GeneratorExit: a writer that stops early closes this generator
                _raise_failed_check(checks, exc)
                raise
            finish()

        # _plus_blocks alternates two buffers: a block is written on a second thread while the next is computed
        return TensorBlocks(theta.dtype, tuple(theta.shape), blocks(), lookahead=1)

    return fn
