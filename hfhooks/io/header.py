"""Read and verify hfhooks artifacts with plain Python and numpy — no torch.

``hfhooks mask info`` must start in well under a second, and importing torch alone takes about 1.5 s, so this
module reads a safetensors file the way the format is specified (8-byte little-endian header length, a JSON
header, then the tensors' bytes back to back) and recomputes the artifact digest of
:mod:`hfhooks.io.artifacts` byte for byte: SHA-256 over the JSON of the sorted metadata without the digest,
then for each tensor in name order ``\\0name\\0torch.<dtype>\\0[shape]\\0`` followed by its raw bytes.
The tests check that both implementations accept the same valid files and reject the same bit flips.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfhooks.io.errors import ArtifactError

__all__ = ["ArtifactError", "HeaderEntry", "read_header", "read_verified"]

# safetensors dtype code -> (the torch dtype's repr, which the digest hashes; bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("torch.float64", 8),
    "F32": ("torch.float32", 4),
    "F16": ("torch.float16", 2),
    "BF16": ("torch.bfloat16", 2),
    "I64": ("torch.int64", 8),
    "I32": ("torch.int32", 4),
    "I16": ("torch.int16", 2),
    "I8": ("torch.int8", 1),
    "U8": ("torch.uint8", 1),
    "BOOL": ("torch.bool", 1),
    "U16": ("torch.uint16", 2),
    "U32": ("torch.uint32", 4),
    "U64": ("torch.uint64", 8),
    "F8_E4M3": ("torch.float8_e4m3fn", 1),
    "F8_E5M2": ("torch.float8_e5m2", 1),
}
FORMAT_VERSION = "1"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_STAMP_KEYS = {"hfhooks.kind", "hfhooks.version", "hfhooks.format_version", "hfhooks.digest"}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header: dtype code (``"F32"``), shape, absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """``({name: HeaderEntry}, __metadata__)`` of a safetensors file, validated (lengths, JSON, dtypes, byte
    ranges that tile the data section exactly); :class:`ArtifactError` saying what is wrong otherwise."""
    path = Path(path)

    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{path} is not a readable safetensors file (truncated or corrupt?): {why}")

    if not path.is_file():  # a FIFO would block the read; a directory cannot be read
        what = "not a regular file (a FIFO, device or directory)" if path.exists() else "no such file"
        raise ArtifactError(f"{path}: {what}.")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes is too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise bad(f"header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("the header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    entries: dict[str, HeaderEntry] = {}
    for name, e in header.items():
        dtype, shape, offsets = (
            (e.get(k) for k in ("dtype", "shape", "data_offsets"))
            if isinstance(e, dict)
            else (None, None, None)
        )
        if dtype not in DTYPES:
            raise bad(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise bad(f"tensor {name!r} has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dtype][1]:
            raise bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not hold a {dtype} {shape}")
        entries[name] = HeaderEntry(dtype, tuple(shape), 8 + n + offsets[0], 8 + n + offsets[1])
    cursor = 8 + n
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != cursor:
            raise bad(f"tensor {name!r} does not start where the previous one ends (overlap or gap)")
        cursor = e.end
    if cursor != size:
        raise bad(f"the data section ends at byte {cursor} but the file has {size} bytes")
    return entries, metadata


def read_verified(
    path: str | os.PathLike, kind: str
) -> tuple[dict[str, bytes], dict[str, HeaderEntry], dict]:
    """Read an hfhooks artifact of ``kind`` and verify its digest without torch.

    Returns ``(data, entries, metadata)``: each tensor's raw bytes, its header entry, and the decoded
    ``hfhooks.*`` metadata (prefix stripped, JSON values decoded; stamp keys kept as strings) — the same
    metadata :func:`hfhooks.io.artifacts.read_artifact` returns. Raises :class:`ArtifactError` otherwise.
    """
    path = Path(path)
    entries, metadata = read_header(path)  # a pickle fails here: its first 8 bytes are no header length
    found = metadata.get("hfhooks.kind")
    if found is None:
        raise ArtifactError(
            f"{path} is a safetensors file but not an hfhooks artifact; expected a {kind} file."
        )
    if found != kind:
        raise ArtifactError(f"{path} is an hfhooks {found!r} file, not a {kind!r} file.")
    if metadata.get("hfhooks.format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {metadata.get('hfhooks.format_version')!r}; this hfhooks reads "
            f"{FORMAT_VERSION!r}. Upgrade hfhooks to read files written by newer versions."
        )
    h = hashlib.sha256(
        json.dumps({k: v for k, v in sorted(metadata.items()) if k != "hfhooks.digest"}).encode()
    )
    data: dict[str, bytes] = {}
    with open(path, "rb") as f:
        for name in sorted(entries):
            e = entries[name]
            f.seek(e.start)
            data[name] = f.read(e.end - e.start)
            h.update(f"\0{name}\0{DTYPES[e.dtype][0]}\0{list(e.shape)}\0".encode())
            h.update(data[name])
    if metadata.get("hfhooks.digest") != h.hexdigest():
        raise ArtifactError(
            f"{path} failed its integrity check (digest mismatch): the file was modified or corrupted."
        )
    decoded: dict[str, Any] = {}
    for key, value in metadata.items():
        if key.startswith("hfhooks."):
            try:
                decoded[key[8:]] = value if key in _STAMP_KEYS else json.loads(value)
            except (ValueError, RecursionError):
                raise ArtifactError(f"{path}: metadata {key!r} is not valid JSON.") from None
    return data, entries, decoded
