"""The safetensors format, streamed: header parsing, tensor reads through ``pread``, and a shard writer.

:func:`read_safetensors_header` parses and validates a file's header (a malformed one is a
:class:`~hfhooks.io.errors.CheckpointError` naming the file and the problem) into :class:`TensorInfo` records that
keep the descriptor the header was read from, so a concurrent in-place edit cannot shift the bytes under the
cached offsets. :class:`ReadBuffer` reads one tensor at a time; :class:`ShardWriter` streams one output file
tensor by tensor behind a header planned up front, copying unchanged tensors byte for byte in the kernel
(:func:`copy_range`). :mod:`hfhooks.io.checkpoints` (directories of shards) and :mod:`hfhooks.diffs` build on it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hfhooks.io import paths
from hfhooks.io.errors import CheckpointError

__all__ = [
    "COPY_CHUNK",
    "DTYPE_CODES",
    "FileHandle",
    "ReadBuffer",
    "ShardWriter",
    "TensorBlocks",
    "TensorInfo",
    "copy_range",
    "header_layout",
    "parse_header",
    "read_safetensors_header",
    "tensor_bytes",
    "write_all",
]

_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
COPY_CHUNK = 64 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        _DTYPES[_code] = getattr(torch, _attr)
DTYPE_CODES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives: its file and absolute byte range (``None`` for pickles)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int | None = None
    end: int | None = None
    # the open file the byte range refers to (see FileHandle): reads go through it, never through a re-opened path
    handle: FileHandle | None = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    def fileno(self) -> int:
        """A descriptor to read this tensor's bytes from: the shard :class:`Checkpoint` opened (so a concurrent
        in-place edit that swaps the file cannot shift the bytes under the cached offsets), else a fresh open."""
        return self.handle.fileno() if self.handle is not None else -1


class FileHandle:
    """One shard a :class:`Checkpoint` opened: the descriptor its header was parsed from, kept for every read.

    An in-place edit replaces shard files by rename, so the inode behind this descriptor keeps the bytes the
    cached offsets describe. After :meth:`close` a read re-opens the path and re-validates the header: a shard
    changed meanwhile is an error, never shifted bytes.
    """

    def __init__(self, path: Path, fd: int, layout: dict[str, tuple[Any, ...]]):
        self.path, self.fd, self.layout = path, fd, layout

    def fileno(self) -> int:
        if self.fd < 0:
            fd = paths.open_regular(self.path)
            try:
                infos, _ = parse_header(fd, self.path)
            except BaseException:
                os.close(fd)
                raise
            if header_layout(infos) != self.layout:
                os.close(fd)
                raise CheckpointError(
                    f"{self.path} changed on disk since the checkpoint was opened (another edit?); open it again."
                )
            self.fd = fd
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def header_layout(infos: Mapping[str, TensorInfo]) -> dict[str, tuple[Any, ...]]:
    """What a parsed header says about each tensor (dtype, shape, byte range): equal layouts, same bytes."""
    return {n: (i.dtype, i.shape, i.start, i.end) for n, i in infos.items()}


@dataclass(frozen=True)
class TensorBlocks:
    """A tensor an edit produces block by block: flat, contiguous pieces in order, written as they come.

    Lets an edit stream a large tensor through a small reused buffer instead of materialising it. The blocks
    must add up to exactly ``shape`` × ``dtype``; an exception raised while producing them aborts the edit.
    ``lookahead``: how many further blocks may be pulled while a block is still being written (``0``: the next
    block overwrites it; ``1``: two buffers alternate, so the writer writes one on a second thread while the
    next is computed).
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    blocks: Iterable[torch.Tensor]
    lookahead: int = 0


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -- reading ---------------------------------------------------------------------------------------------------
def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ``({name: TensorInfo}, __metadata__)``.

    Checks everything a reader relies on — header length, JSON, dtypes, shapes, that every tensor's byte range
    matches its shape and that the ranges tile the data section exactly — and raises :class:`CheckpointError`
    saying what is wrong. Tensors are returned in file order. A FIFO or other non-regular file is refused
    before anything is read from it.
    """
    path = Path(path)
    try:
        fd = paths.open_regular(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return parse_header(fd, path)
    finally:
        os.close(fd)


def parse_header(fd: int, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """:func:`read_safetensors_header` of an open file (read with ``pread``: the descriptor can be shared)."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid safetensors file: {why}")

    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise bad(f"{size} bytes is too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise bad(f"header length {n} exceeds the file ({size} bytes) or the 100 MB limit")
        raw = b""
        while len(raw) < n:
            chunk = os.pread(fd, n - len(raw), 8 + len(raw))
            if not chunk:
                raise bad("the file ended inside its header")
            raw += chunk
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("the header is not valid UTF-8 JSON (truncated or corrupt?)") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings")
    base = 8 + n
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype = _DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
        if dtype is None:
            raise bad(f"tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise bad(f"tensor {name!r} has invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * _itemsize(dtype):
            raise bad(
                f"tensor {name!r}: {end - begin} bytes do not hold a {entry['dtype']} tensor of {shape}"
            )
        infos.append(TensorInfo(name, path, dtype, tuple(shape), base + begin, base + end))
    infos.sort(key=lambda i: (i.start, i.end))
    cursor = base
    for info in infos:
        if info.start != cursor:
            raise bad(f"tensor {info.name!r} does not start where the previous one ends (overlap or gap)")
        cursor = info.end
    if cursor != size:
        raise bad(f"the data section ends at byte {cursor} but the file has {size} bytes (truncated?)")
    return {i.name: i for i in infos}, metadata


class ReadBuffer:
    """A grow-only byte buffer that tensors are read into with ``pread``, reused from one read to the next.

    Reading a large tensor through safetensors' memory map costs a page fault per 4 KiB on first touch, and a
    fresh buffer per tensor costs the same in anonymous faults; reading into one reused buffer avoids both
    (about 5× faster on a warm page cache). A tensor from :meth:`read` is only valid until the next
    :meth:`read` on the same buffer.
    """

    def __init__(self) -> None:
        self._data = torch.empty(0, dtype=torch.uint8)

    def read(self, info: TensorInfo) -> torch.Tensor:
        """Tensor ``info`` (which must have a byte range), read into this buffer."""
        n = info.end - info.start
        if self._data.numel() < n:
            self._data = torch.empty(0, dtype=torch.uint8)  # free the old buffer before growing
            self._data = torch.empty(n, dtype=torch.uint8)
        view = self._data[:n]
        fd = info.fileno()
        own = (
            fd < 0
        )  # a TensorInfo without a handle (parsed by read_safetensors_header): open it for this read
        if own:
            try:
                fd = paths.open_regular(info.file)
            except OSError as e:
                raise CheckpointError(f"{info.file}: cannot read: {e.strerror or e}") from None
        try:
            mv, done = memoryview(view.numpy()), 0
            while done < n:
                got = os.preadv(fd, [mv[done:]], info.start + done)
                if got <= 0:
                    raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}.")
                done += got
        finally:
            if own:
                os.close(fd)
        return view.view(info.dtype).reshape(info.shape) if n else torch.empty(info.shape, dtype=info.dtype)


# -- checksums -------------------------------------------------------------------------------------------------
try:  # zlib-ng's CRC-32 (SIMD folding): the same checksum, 2-4x zlib's speed here; zlib where it is missing
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; a platform without its wheel still works
    from zlib import crc32 as _crc32


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    """The standard CRC-32 (zlib's) of ``data``, continuing from ``value``; releases the GIL on large buffers."""
    return _crc32(data, value)


# -- writing ---------------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in safetensors order (little-endian, C-contiguous) as a memoryview, no copy if CPU."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if sys.byteorder != "little" and flat.element_size() > 1:  # pragma: no cover - big-endian hosts
        flat = flat.clone().view(torch.uint8).reshape(-1, flat.element_size()).flip(1).reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardWriter:
    """Streams one safetensors file: the header first (planned entries), then each tensor's bytes in order."""

    def __init__(self, path: Path, entries: list[TensorInfo], metadata: Mapping[str, str]):
        self.path, self.entries = path, entries
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        for e in entries:
            end = offset + e.nbytes
            header[e.name] = {
                "dtype": DTYPE_CODES[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [offset, end],
            }
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section, as safetensors does
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides the mode
        self.position = 0
        write_all(self.fd, memoryview(struct.pack("<Q", len(raw)) + raw))

    def _next(self, nbytes: int) -> None:
        expected = self.entries[self.position]
        if nbytes != expected.nbytes:  # pragma: no cover - guarded by edit_checkpoint's dtype/shape check
            raise RuntimeError(f"{expected.name}: wrote {nbytes} bytes, planned {expected.nbytes}")
        self.position += 1

    def write(self, t: torch.Tensor) -> None:
        data = tensor_bytes(t)
        self._next(data.nbytes)
        write_all(self.fd, data)

    def write_blocks(self, name: str, blocks: TensorBlocks) -> None:
        """Write the blocks as they come; with ``blocks.lookahead`` ≥ 1 each block is written on a second
        thread while the next one is computed (``os.write`` releases the GIL), at most one write in flight."""
        expected = self.entries[self.position]
        total = 0
        overlap = blocks.lookahead >= 1
        with (
            concurrent.futures.ThreadPoolExecutor(1, "hfhooks-write")
            if overlap
            else contextlib.nullcontext() as pool
        ):
            pending: concurrent.futures.Future | None = None
            try:
                for block in blocks.blocks:
                    if block.dtype != expected.dtype:
                        raise ValueError(
                            f"The edit of {name!r} produced a {block.dtype} block; expected {expected.dtype}."
                        )
                    data = tensor_bytes(block)
                    if pending is not None:
                        pending.result()  # the block before this one is written: its buffer may be reused next
                        pending = None
                    if overlap:
                        try:
                            pending = pool.submit(write_all, self.fd, data)
                        except RuntimeError:  # the interpreter is shutting down: no new work for threads
                            overlap = False
                    if not overlap:
                        write_all(self.fd, data)
                    total += data.nbytes
            finally:
                if pending is not None:  # never leave a write running behind an error (the fd closes next)
                    concurrent.futures.wait([pending])
            if pending is not None:
                pending.result()
        if total != expected.nbytes:
            raise ValueError(f"The edit of {name!r} produced {total} bytes; expected {expected.nbytes}.")
        self.position += 1

    def copy(self, info: TensorInfo) -> None:
        """Copy a tensor's bytes from its source file (kernel-side when possible, never through Python memory)."""
        self._next(info.end - info.start)
        src = info.fileno()
        if src >= 0:  # the descriptor the source checkpoint parsed the offsets from
            copy_range(src, self.fd, info.start, info.end - info.start)
            return
        src = paths.open_regular(info.file)
        try:
            copy_range(src, self.fd, info.start, info.end - info.start)
        finally:
            os.close(src)

    def close(self, fsync: bool) -> None:
        try:
            if fsync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)


def write_all(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    data = data.cast("B") if data.format != "B" else data
    while data.nbytes:  # os.write may write less (e.g. at most 2 GiB per call on Linux)
        n = os.write(fd, data[:COPY_CHUNK])
        data = data[n:]


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src_fd`` to the current position of ``dst_fd``
    (``copy_file_range`` in the kernel where it can, else chunked ``pread`` / ``write``)."""
    copied = 0
    if hasattr(os, "copy_file_range"):
        try:
            while copied < count:
                n = os.copy_file_range(src_fd, dst_fd, count - copied, offset + copied)
                if n == 0:
                    break
                copied += n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
    while copied < count:  # portable fallback, chunked
        chunk = os.pread(src_fd, min(COPY_CHUNK, count - copied), offset + copied)
        if not chunk:
            raise CheckpointError(f"source file ended early while copying {count} bytes (truncated?)")
        write_all(dst_fd, memoryview(chunk))
        copied += len(chunk)
