"""Self-describing safetensors artifacts: stamping, integrity digest, atomic writes, clean read errors.

Every file hfhooks writes (masks, diffs) is a plain safetensors file whose ``__metadata__`` says what it is
(``hfhooks.kind``), who wrote it (``hfhooks.version``), and carries a SHA-256 digest over all other metadata
and every tensor's bytes. Reading verifies the digest, so a truncated, bit-flipped or hand-edited file is a
clear :class:`ArtifactError`, never a silently different mask. Writes go to a temporary file in the target
directory and are renamed into place, so an interrupted save never leaves half a file under the real name; the
temporary is named ``.<name>.hfhooks-tmp-<hex>`` and locked by its writer, so the next save to the same path removes
one a killed writer left (see :mod:`hfhooks.io.paths`).

The helpers mask and diff files share live here too: bit packing (``numpy.packbits`` order), the digest of
the metadata alone that lazy diff reads check, and re-raising an :class:`ArtifactError` as a file-kind error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from hfhooks._version import __version__
from hfhooks.core.names import unwrap_model
from hfhooks.core.params import ParamIndex
from hfhooks.io.errors import ArtifactError, CheckpointError
from hfhooks.io.header import FORMAT_VERSION  # torch-free: the CLI reads artifacts without torch
from hfhooks.io.paths import check_output, publish, temp_file, write_error
from hfhooks.io.safetensors import read_safetensors_header

__all__ = [
    "FORMAT_VERSION",
    "ArtifactError",
    "model_fingerprint",
    "read_artifact",
    "sniff_pickle",
    "write_artifact",
]

_DIGEST = "hfhooks.digest"
_META_DIGEST = "hfhooks.meta_digest"  # diff files: a digest of the metadata alone, checkable without the data
_STAMP_KEYS = {"hfhooks.kind", "hfhooks.version", "hfhooks.format_version", _DIGEST}


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """A fingerprint of a model's architecture: canonical names and shapes (not values, not dtypes).

    Two models with the same fingerprint accept the same masks. Stored in artifacts as provenance.
    """
    index = model if hasattr(model, "shapes") else ParamIndex(model)
    h = hashlib.sha256()
    n = 0
    for name, shape in sorted(index.shapes().items()):
        h.update(f"{name}:{list(shape)};".encode())
        n += int(torch.Size(shape).numel())
    cfg = getattr(unwrap_model(index.model), "config", None)
    return {
        "sha256": h.hexdigest()[:16],
        "num_tensors": len(index),
        "num_parameters": n,
        "model_type": getattr(cfg, "model_type", type(unwrap_model(index.model)).__name__),
    }


def _metadata_bytes(metadata: Mapping[str, str], skip: set[str]) -> bytes:
    return json.dumps({k: v for k, v in sorted(metadata.items()) if k not in skip}).encode()


def artifact_digest(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over an artifact's metadata (its digest left out) and tensors, in name order."""
    h = hashlib.sha256()
    h.update(_metadata_bytes(metadata, {_DIGEST}))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # reshape: 0-d tensors too
    return h.hexdigest()


def metadata_digest(metadata: Mapping[str, str]) -> str:
    """SHA-256 over the metadata alone (both digests left out): lets a lazy reader trust the header."""
    return hashlib.sha256(_metadata_bytes(metadata, {_DIGEST, _META_DIGEST})).hexdigest()


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A 0/1 tensor as ``U8`` bytes, 8 elements a byte, big bit order (``numpy.packbits``), zero-padded."""
    return torch.from_numpy(np.packbits(bits.reshape(-1).numpy().astype(bool), bitorder="big"))


_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # big bit order: the first element is the high bit
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def bits_as_bytes(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` bits of :func:`pack_bits` output as a flat ``uint8`` tensor of 0/1, on ``packed``'s
    device (no padding check: for masks already validated). One byte per element, transient by design:
    callers unpack one tensor at a time."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=count, bitorder="big"))
    shifts = _BIT_SHIFTS.to(packed.device)
    return packed.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and_(1).reshape(-1)[:count]


def count_ones(packed: torch.Tensor) -> int:
    """How many bits are set in ``packed`` (a ``uint8`` tensor), without unpacking it."""
    if packed.device.type != "cpu":
        packed = packed.cpu()
    return int(_POPCOUNT[packed.numpy()].sum(dtype=np.int64))


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` bits of :func:`pack_bits` output as a flat bool tensor; ``ValueError`` if there
    are too few bytes or a padding bit is set."""
    bits = np.unpackbits(packed.numpy(), bitorder="big")
    if bits.size < count or bits[count:].any():
        raise ValueError("bit-packed mask has the wrong length or non-zero padding")
    return torch.from_numpy(bits[:count].astype(bool))


@contextlib.contextmanager
def reraise_as(error: type[ArtifactError]) -> Iterator[None]:
    """Re-raise an :class:`ArtifactError` (e.g. from :func:`read_artifact`) as ``error``, same message."""
    try:
        yield
    except error:
        raise
    except ArtifactError as e:
        raise error(str(e)) from None


def write_artifact(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], kind: str, meta: Mapping[str, Any]
) -> Path:
    """Write ``tensors`` with stamped metadata to ``path`` atomically; ``meta`` values are stored as JSON."""
    path = Path(path)
    reserved = sorted(k for k in meta if f"hfhooks.{k}" in _STAMP_KEYS)
    if reserved:
        raise ValueError(f"Metadata keys {reserved} are reserved for the hfhooks stamp; rename them.")
    metadata = {
        "format": "pt",
        "hfhooks.kind": kind,
        "hfhooks.version": __version__,
        "hfhooks.format_version": FORMAT_VERSION,
    }
    for key, value in meta.items():
        metadata[f"hfhooks.{key}"] = json.dumps(value)  # insertion order kept (e.g. a mask's tensor order)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata[_DIGEST] = artifact_digest(metadata, tensors)
    # saving over an earlier artifact of the same kind is what save() means; anything else (a model shard, a
    # symlink, a directory) is refused rather than destroyed
    existed = check_output(
        path, (), overwrite=True, same_kind=lambda p: _is_artifact(p, kind), kind=f"{kind} file"
    )
    data = memoryview(save(tensors, metadata=metadata))
    with temp_file(path) as (tmp, fd):  # locked while we write: a killed save's temp is removed by the next
        try:
            while data.nbytes:
                data = data[os.write(fd, data[: 1 << 30]) :]
        except OSError as e:  # ENOSPC / EFBIG: name the file, not a bare errno
            raise write_error(e, path) from None
        publish(tmp, path, replace=existed)
    return path


def _is_artifact(path: Path, kind: str) -> bool:
    """Whether ``path`` is an hfhooks artifact of ``kind`` (header only; what a save may replace)."""
    try:
        return read_safetensors_header(path)[1].get("hfhooks.kind") == kind
    except (CheckpointError, OSError):
        return False


def sniff_pickle(path: str | os.PathLike) -> str | None:
    """What kind of pickle ``path`` is (``"a Python pickle"``, ``"a torch.save() zip archive (a pickle)"``), or
    ``None`` when it is not one — including every file whose first bytes are a plausible safetensors header.

    A safetensors file starts with its header length as 8 little-endian bytes, so a header of 640, 896, 1,152
    or 1,408 bytes (mod 65,536) starts ``\\x80\\x02`` … ``\\x80\\x05`` — a pickle protocol marker — and one of
    19,280 bytes (mod 65,536) starts ``PK``. Such a file is safetensors when that length fits in the file and the header
    opens with ``{``; only otherwise do the magic bytes decide. (A pickle that passed for safetensors here
    would still be rejected by safetensors' own parser, which never executes anything.)
    """
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return None
    if head.startswith(b"PK"):
        return "a torch.save() zip archive (a pickle)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "a Python pickle"
    return None


def read_artifact(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify an artifact of ``kind``; return its tensors and its decoded ``hfhooks.*`` metadata.

    Raises :class:`ArtifactError` with a message saying what is wrong (missing, pickle, truncated or corrupt,
    not an hfhooks file, another kind, a newer format, digest mismatch) — never a bare parser exception.
    """
    path = Path(path)
    if not path.is_file():
        what = "not a regular file (a FIFO, device or directory)" if path.exists() else "no such file"
        raise ArtifactError(f"{path}: {what}.")
    pickled = sniff_pickle(path)
    if pickled:
        raise ArtifactError(
            f"{path} is {pickled}, not safetensors. hfhooks never unpickles masks or diffs (pickles can run code); "
            "convert the tensors yourself and save them with hfhooks (e.g. ParamMask(...).save(path))."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # safetensors raises SafetensorError, OSError, or a Rust PanicException
        raise ArtifactError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None
    found = metadata.get("hfhooks.kind")
    if found is None:
        sample = ", ".join(list(tensors)[:3]) or "no tensors"
        raise ArtifactError(
            f"{path} is a safetensors file but not an hfhooks artifact (no 'hfhooks.kind' metadata; tensors: "
            f"{sample}). Expected an hfhooks {kind} file."
        )
    if found != kind:
        raise ArtifactError(f"{path} is an hfhooks {found!r} file, not a {kind!r} file.")
    version = metadata.get("hfhooks.format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {version!r}; this hfhooks ({__version__}) reads {FORMAT_VERSION!r}. "
            "Upgrade hfhooks to read files written by newer versions."
        )
    if metadata.get(_DIGEST) != artifact_digest(metadata, tensors):
        raise ArtifactError(
            f"{path} failed its integrity check (digest mismatch): the file was modified or corrupted."
        )
    return tensors, decode_metadata(path, metadata)


def decode_metadata(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """``hfhooks.*`` metadata without the prefix, JSON-decoded (the stamp keys are kept as strings)."""
    decoded: dict[str, Any] = {}
    for key, value in metadata.items():
        if not key.startswith("hfhooks."):
            continue
        short = key[len("hfhooks.") :]
        if key in _STAMP_KEYS:
            decoded[short] = value
            continue
        try:
            decoded[short] = json.loads(value)
        except (ValueError, RecursionError):  # RecursionError: absurdly deeply nested JSON
            raise ArtifactError(f"{path}: metadata {key!r} is not valid JSON.") from None
    return decoded
