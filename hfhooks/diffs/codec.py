"""How one entry is stored in a diff file: its tensors (``<name>``, ``::mask``, ``::values``, ``::codes``,
``::range``) and its ``hfhooks.tensors`` metadata record — encoding, and decoding with validation.

Kept apart from :mod:`hfhooks.diffs.fileformat` (which writes and reads whole files) because it is pure: no
file access, just payload ⇄ stored tensors and metadata ⇄ :class:`~hfhooks.diffs.entries.DiffEntry`. Masks
are bit-packed like mask files (:func:`hfhooks.io.artifacts.pack_bits`); quantised codes of 1, 2, 4 or 8 bits
are packed big-endian within each byte.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hfhooks.diffs.entries import (
    STORAGES,
    DiffEntry,
    DiffFileError,
    Payload,
    const_loader,
    dtype_name,
    parse_dtype,
)
from hfhooks.io.artifacts import pack_bits, unpack_bits

PART_SEP = "::"


def _code_bits(levels: int) -> int:
    return next(b for b in (1, 2, 4, 8) if (1 << b) >= levels)


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    c = codes.reshape(-1).to(torch.uint8)
    pad = -c.numel() % per
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    c = c.reshape(-1, per).to(torch.int32)
    shifts = torch.tensor([8 - bits * (i + 1) for i in range(per)], dtype=torch.int32)
    return (c << shifts).sum(1).to(torch.uint8)


def _unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per = 8 // bits
    if packed.numel() != -(-count // per):
        raise ValueError(f"expected {-(-count // per)} bytes of {bits}-bit codes, got {packed.numel()}")
    shifts = torch.tensor([8 - bits * (i + 1) for i in range(per)], dtype=torch.int32)
    codes = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count]


def stored_tensors(name: str, entry: DiffEntry, payload: Payload) -> dict[str, torch.Tensor]:
    """The tensors a file holds for one entry."""
    out: dict[str, torch.Tensor] = {}
    if entry.storage == "dense":
        out[name] = payload["values"].contiguous()
    elif entry.storage == "factored":
        out[name + PART_SEP + "lora_A"] = payload["lora_A"].contiguous()
        out[name + PART_SEP + "lora_B"] = payload["lora_B"].contiguous()
        out[name + PART_SEP + "scaling"] = payload["scaling"].to(torch.float64).reshape(())
    elif entry.storage != "zero":
        if payload.get("mask") is not None:
            out[name + PART_SEP + "mask"] = pack_bits(payload["mask"])
        if entry.storage == "sparse":
            out[name + PART_SEP + "values"] = payload["values"].contiguous()
        else:
            out[name + PART_SEP + "codes"] = _pack_codes(payload["codes"], _code_bits(entry.levels))
            out[name + PART_SEP + "range"] = payload["range"].to(entry.dtype)
    for key, count in (("fix", entry.fixes), ("unfix", entry.unfixes)):
        if count:
            idx = payload[key + "_index"]
            gaps = torch.diff(idx, prepend=idx.new_zeros(1))  # ≤ 2¹⁶ − 1: fillers were added where needed
            out[name + PART_SEP + key + "_gaps"] = gaps.to(torch.int32).to(torch.int16)  # wraps: u16 bits
            out[name + PART_SEP + key + "_values"] = payload[key + "_values"].contiguous()
    return out


def entry_meta(e: DiffEntry, crcs: dict[str, str], nnz: int | None) -> dict[str, Any]:
    """The JSON metadata one entry is stored under (shape, dtype, storage, part CRCs, ``nnz``)."""
    info: dict[str, Any] = {
        "shape": list(e.shape),
        "dtype": dtype_name(e.dtype),
        "storage": e.storage,
        "base": e.base,
        "target": e.target,
        "exact": e.exact,
        "exact_inverse": e.exact_inverse,
        "changed": e.changed,
        "crc32": crcs,
    }
    if e.negated_base is not None:
        info["negated_base"] = e.negated_base
    if nnz is not None:
        info["nnz"] = nnz
    if e.storage == "quantized":
        info["levels"], info["bits"] = e.levels, _code_bits(e.levels)
    if e.storage == "factored":
        info["transposed"] = e.transposed
    if e.fixes or e.unfixes:
        info["fixes"], info["unfixes"], info["fix_dtype"] = e.fixes, e.unfixes, dtype_name(e.fix_dtype)
    return info


DIFF_FORMAT = 2  # 2: Δ in the weights' dtype with exact corrections, zero and factored entries; 1: before
_V1_STORAGES = ("dense", "sparse", "quantized")

Shapes = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def decode_entry_meta(
    name: str, info: Any, shapes: Shapes, version: int = DIFF_FORMAT
) -> tuple[DiffEntry, list[str]]:
    """The :class:`DiffEntry` (without payload) and its stored part names, from an entry's metadata in a file
    of diff format ``version``; ``ValueError`` naming the problem when the metadata does not match the file's
    tensors (or uses what its format version cannot hold)."""
    if not isinstance(info, dict):
        raise ValueError("metadata entry is not an object")
    shape, storage = info.get("shape"), info.get("storage")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ValueError(f"invalid shape {shape!r}")
    if math.prod(shape) >= 1 << 48:
        raise ValueError(f"shape {shape} is implausibly large")
    allowed = STORAGES if version >= 2 else _V1_STORAGES
    if storage not in allowed:
        raise ValueError(f"storage {storage!r} is not one of {allowed} (diff format {version})")
    dtype = parse_dtype(info.get("dtype"))
    for flag in ("exact", "exact_inverse", "changed", "transposed"):
        if info.get(flag) not in (True, False, None):
            raise ValueError(f"{flag} must be true, false or null, got {info.get(flag)!r}")
    for fp in ("base", "target", "negated_base"):
        if info.get(fp) is not None and not isinstance(info.get(fp), str):
            raise ValueError(f"{fp} fingerprint must be a string or null")
    shape = tuple(shape)
    levels, parts = _value_parts(name, info, storage, dtype, shape, shapes)
    fixes, unfixes, fix_dtype = _fix_parts(name, info, shape, version, parts)
    for part, (want_dtype, want_shape) in parts.items():
        if part not in shapes:
            raise ValueError(f"the file lacks tensor {part!r}")
        got_dtype, got_shape = shapes[part]
        if got_dtype != want_dtype or tuple(got_shape) != want_shape:
            raise ValueError(
                f"{part!r} is {dtype_name(got_dtype)} {tuple(got_shape)}, expected {dtype_name(want_dtype)} {want_shape}"
            )
    crcs = info.get("crc32")
    if (
        not isinstance(crcs, dict)
        or set(crcs) != set(parts)
        or not all(isinstance(v, str) for v in crcs.values())
    ):
        raise ValueError("crc32 must map each stored tensor to its checksum")
    entry = DiffEntry(
        shape,
        dtype,
        storage,
        const_loader({}),
        base=info.get("base"),
        target=info.get("target"),
        exact=info.get("exact"),
        exact_inverse=info.get("exact_inverse"),
        changed=info.get("changed"),
        levels=levels,
        negated_base=info.get("negated_base"),
        fixes=fixes,
        unfixes=unfixes,
        fix_dtype=fix_dtype,
        transposed=bool(info.get("transposed")),
    )
    return entry, list(parts)


def _value_parts(
    name: str, info: dict[str, Any], storage: str, dtype: torch.dtype, shape: tuple[int, ...], shapes: Shapes
) -> tuple[int | None, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """``(levels, {part: (dtype, shape)})`` of the tensors that hold an entry's Δ."""
    numel = math.prod(shape)
    if storage == "dense":
        return None, {name: (dtype, shape)}
    if storage == "zero":
        return None, {}
    if storage == "factored":
        return None, _factor_parts(name, shape, bool(info.get("transposed")), shapes)
    nnz = info.get("nnz")
    masked = name + PART_SEP + "mask" in shapes
    if masked and (type(nnz) is not int or not 0 <= nnz <= numel):
        raise ValueError(f"nnz {nnz!r} is not a count between 0 and {numel}")
    count = nnz if masked else numel
    parts = {}
    if masked:
        parts[name + PART_SEP + "mask"] = (torch.uint8, (-(-numel // 8),))
    if storage == "sparse":
        if not masked:
            raise ValueError("sparse storage needs a ::mask tensor")
        parts[name + PART_SEP + "values"] = (dtype, (count,))
        return None, parts
    levels = info.get("levels")
    if type(levels) is not int or not 2 <= levels <= 256:
        raise ValueError(f"levels {levels!r} must be an integer from 2 to 256")
    if info.get("bits") != _code_bits(levels):
        raise ValueError(f"bits {info.get('bits')!r} does not match {levels} levels")
    parts[name + PART_SEP + "codes"] = (torch.uint8, (-(-count // (8 // _code_bits(levels))),))
    parts[name + PART_SEP + "range"] = (dtype, (2,))
    return levels, parts


def _factor_parts(
    name: str, shape: tuple[int, ...], transposed: bool, shapes: Shapes
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The parts of a factored entry: ``lora_B`` (m, r) and ``lora_A`` (r, n) with ``(m, n)`` = Δ's shape
    (reversed when ``transposed``), in a floating dtype, and the float64 scalar ``scaling``."""
    a, b = name + PART_SEP + "lora_A", name + PART_SEP + "lora_B"
    if a not in shapes or b not in shapes:
        raise ValueError("factored storage needs ::lora_A and ::lora_B tensors")
    (a_dtype, a_shape), (b_dtype, b_shape) = shapes[a], shapes[b]
    if not a_dtype.is_floating_point or not b_dtype.is_floating_point:
        raise ValueError("LoRA factors must be floating-point tensors")
    out_shape = tuple(reversed(shape)) if transposed else shape
    if len(a_shape) != 2 or len(b_shape) != 2 or len(shape) != 2 or a_shape[0] != b_shape[1]:
        raise ValueError(f"LoRA factors {tuple(b_shape)} · {tuple(a_shape)} do not multiply")
    if (b_shape[0], a_shape[1]) != out_shape:
        raise ValueError(f"LoRA factors {tuple(b_shape)} · {tuple(a_shape)} do not give Δ's shape {shape}")
    return {
        a: (a_dtype, tuple(a_shape)),
        b: (b_dtype, tuple(b_shape)),
        name + PART_SEP + "scaling": (torch.float64, ()),
    }


def _fix_parts(
    name: str, info: dict[str, Any], shape: tuple[int, ...], version: int, parts: dict
) -> tuple[int, int, torch.dtype | None]:
    """``(fixes, unfixes, fix_dtype)`` of an entry's exact corrections, their parts added to ``parts``:
    ``::fix_gaps`` / ``::unfix_gaps`` (I16 holding unsigned 16-bit gaps between sorted flat indices, the first
    from 0) and ``::fix_values`` / ``::unfix_values``."""
    counts = {"fix": info.get("fixes", 0), "unfix": info.get("unfixes", 0)}
    if counts == {"fix": 0, "unfix": 0} and info.get("fix_dtype") is None:
        return 0, 0, None
    numel = math.prod(shape)
    if version < 2:
        raise ValueError(f"diff format {version} has no exact corrections, yet the entry lists {counts}")
    fix_dtype = parse_dtype(info.get("fix_dtype"))
    for key, count in counts.items():
        if type(count) is not int or not 0 <= count <= numel:
            raise ValueError(f"{key}es {count!r} is not a count between 0 and {numel}")
        if count:
            parts[name + PART_SEP + key + "_gaps"] = (torch.int16, (count,))
            parts[name + PART_SEP + key + "_values"] = (fix_dtype, (count,))
    return counts["fix"], counts["unfix"], fix_dtype


def payload_from(entry: DiffEntry, name: str, parts: Mapping[str, torch.Tensor], path: Path) -> Payload:
    """An entry's payload from the tensors stored for it (unpacking bit-packed masks and codes, checking the
    exact correction's indices)."""
    try:
        payload = _value_payload(entry, name, parts)
        for key, count in (("fix", entry.fixes), ("unfix", entry.unfixes)):
            if count:
                gaps = parts[name + PART_SEP + key + "_gaps"].to(torch.int64) & 0xFFFF
                if bool((gaps[1:] == 0).any()):
                    raise ValueError(f"the exact correction {key!r} lists a coordinate twice")
                idx = torch.cumsum(gaps, 0)
                if int(idx[-1]) >= entry.numel():
                    raise ValueError(f"the exact correction {key!r} reaches past the tensor's end")
                payload[key + "_index"] = idx
                payload[key + "_values"] = parts[name + PART_SEP + key + "_values"]
        return payload
    except ValueError as e:
        raise DiffFileError(f"{path}: tensor {name!r}: {e}") from None


def _value_payload(entry: DiffEntry, name: str, parts: Mapping[str, torch.Tensor]) -> Payload:
    if entry.storage == "dense":
        return {"values": parts[name]}
    if entry.storage == "zero":
        return {}
    if entry.storage == "factored":
        return {k: parts[name + PART_SEP + k] for k in ("lora_A", "lora_B", "scaling")}
    numel = entry.numel()
    payload: Payload = {}
    if name + PART_SEP + "mask" in parts:
        payload["mask"] = unpack_bits(parts[name + PART_SEP + "mask"], numel).reshape(entry.shape)
        count = int(payload["mask"].sum())
        if (name + PART_SEP + "values" in parts and parts[name + PART_SEP + "values"].numel() != count) or (
            entry.storage == "quantized"
            and parts[name + PART_SEP + "codes"].numel() != -(-count // (8 // _code_bits(entry.levels)))
        ):
            raise ValueError(f"the mask sets {count} bits but the stored values do not match")
    else:
        count = numel
    if entry.storage == "sparse":
        payload["values"] = parts[name + PART_SEP + "values"]
    else:
        codes = _unpack_codes(parts[name + PART_SEP + "codes"], _code_bits(entry.levels), count)
        if count and int(codes.max()) >= entry.levels:
            raise ValueError(f"a code exceeds levels - 1 = {entry.levels - 1}")
        payload["codes"] = codes
        payload["range"] = parts[name + PART_SEP + "range"]
    return payload
