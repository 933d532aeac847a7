"""Streaming, atomic reading and writing of Hugging Face safetensors checkpoints.

A :class:`Checkpoint` is a lazy view of a checkpoint directory — ``model.safetensors``, a sharded
``model.safetensors.index.json`` + shards, a PEFT ``adapter_model.safetensors``, or a single ``.safetensors``
file. Headers are parsed and validated up front (a malformed header or index is a :class:`CheckpointError`
naming the file and the problem); tensors are read one at a time, with ``pread`` through the descriptors the
headers were parsed from (a concurrent in-place edit cannot shift the bytes under the cached offsets).

:func:`edit_checkpoint` writes an edited copy without ever holding more than the tensors it is computing:

* every output shard is streamed to disk tensor by tensor — the header is known up front because edits keep
  each tensor's dtype and shape — and unchanged tensors are copied byte for byte by the kernel
  (``os.copy_file_range``), so peak memory is about one source tensor plus one output tensor, whatever the
  size of the model or of its shards;
* everything is written into a temporary directory next to the output and renamed into place at the end. A
  crash or ``SIGKILL`` mid-edit leaves the source untouched and nothing under the output name (the next edit
  of the same output removes the orphaned temporary directory). An in-place edit swaps the directories
  atomically (``renameat2(RENAME_EXCHANGE)`` on Linux): the source files are never re-saved over themselves,
  so a model memory-mapped from them keeps reading consistent bytes;
* each output shard keeps ``{"format": "pt"}`` and records the edit under ``hfhooks.edits`` (also in the
  index), and config / tokenizer / generation files are copied along.

Pickled ``pytorch_model.bin`` checkpoints are refused unless ``allow_pickle=True`` (then loaded with
``torch.load(weights_only=True)``); the output is always safetensors.

Example:
    >>> import tempfile, torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                num_hidden_layers=2, num_attention_heads=2)
    >>> src = tempfile.mkdtemp() + "/model"
    >>> transformers.LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="8KB")
    >>> ckpt = Checkpoint(src)
    >>> ckpt.kind, len(ckpt.files) > 1
    ('sharded', True)
    >>> out = edit_checkpoint(src, src + "-zeroed", {"model.norm.weight": lambda load: torch.zeros_like(load())},
    ...                       record={"op": "example"}, progress=False)
    >>> Checkpoint(out).get("model.norm.weight").abs().sum().item()
    0.0
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import stat
import struct
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.serialization._base import parse_size_to_int, split_state_dict_into_shards_factory

from hfhooks._version import __version__
from hfhooks.core.params import UnknownParameterError, canonical_name
from hfhooks.io import paths
from hfhooks.io.artifacts import ArtifactError

__all__ = [
    "ADAPTER_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "Checkpoint",
    "CheckpointError",
    "ReadBuffer",
    "TensorBlocks",
    "TensorInfo",
    "edit_checkpoint",
    "is_edited_checkpoint",
    "layer_map",
    "parse_layers",
    "read_safetensors_header",
]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_NAME = "adapter_model.safetensors"
_PICKLE_NAME = "pytorch_model.bin"
_PICKLE_INDEX = "pytorch_model.bin.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
_COPY_CHUNK = 64 * 1024 * 1024

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

# Files never copied into a new output directory: weights (rewritten) and training state (stale after an edit).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIP_FILES = {"trainer_state.json"}


class CheckpointError(ArtifactError):
    """A checkpoint that cannot be read safely: missing, malformed header or index, pickled, inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives: its file and absolute byte range (``None`` for pickles)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int | None = None
    end: int | None = None
    # the open file the byte range refers to (see _Handle): reads go through it, never through a re-opened path
    handle: _Handle | None = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    def fileno(self) -> int:
        """A descriptor to read this tensor's bytes from: the shard :class:`Checkpoint` opened (so a concurrent
        in-place edit that swaps the file cannot shift the bytes under the cached offsets), else a fresh open."""
        return self.handle.fileno() if self.handle is not None else -1


class _Handle:
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
                infos, _ = _parse_header(fd, self.path)
            except BaseException:
                os.close(fd)
                raise
            if _layout(infos) != self.layout:
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


def _layout(infos: Mapping[str, TensorInfo]) -> dict[str, tuple[Any, ...]]:
    return {n: (i.dtype, i.shape, i.start, i.end) for n, i in infos.items()}


@dataclass(frozen=True)
class TensorBlocks:
    """A tensor an edit produces block by block: flat, contiguous pieces in order, written as they come.

    Lets an edit stream a large tensor through a small reused buffer instead of materialising it. The blocks
    must add up to exactly ``shape`` × ``dtype``; an exception raised while producing them aborts the edit.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    blocks: Iterable[torch.Tensor]


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
        return _parse_header(fd, path)
    finally:
        os.close(fd)


def _parse_header(fd: int, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
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


class Checkpoint:
    """A lazy, validated view of a Hugging Face checkpoint directory or a single ``.safetensors`` file.

    Supported layouts (first match wins): ``model.safetensors.index.json`` + shards, ``model.safetensors``,
    ``adapter_model.safetensors`` (a PEFT adapter), a lone ``*.safetensors`` file in the directory, a path to a
    ``.safetensors`` file, and — only with ``allow_pickle=True`` — ``pytorch_model.bin`` (+ index), loaded
    with ``torch.load(weights_only=True, mmap=True)``.

    Names are the names stored in the file (for full models, the canonical names of :mod:`hfhooks.core.params`;
    for adapters, :func:`~hfhooks.core.params.canonical_name` of them is what layer lookups use).
    """

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self.kind: str
        self.index_metadata: dict[str, Any] = {}
        self.shard_metadata: dict[Path, dict[str, str]] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._handles: list[_Handle] = []
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory.")
        try:
            if self.path.is_dir():
                self.dir = self.path
                self._discover()
            else:  # a file given explicitly (a FIFO or device is refused when it is opened)
                self.dir = self.path.parent
                self._load_files([self.path], "single", confine=False)
        except BaseException:
            self.close()
            raise

    def _inside(self, file: Path) -> None:
        """Refuse a file of the directory (shard, index) that resolves outside it (a symlink elsewhere)."""
        try:
            paths.resolve_inside(file, self.dir)
        except OSError as e:
            raise CheckpointError(e.strerror) from None

    # -- discovery -------------------------------------------------------------------------------------------
    def _discover(self) -> None:
        d = self.dir
        if (d / INDEX_NAME).is_file():
            self._load_index(d / INDEX_NAME, "sharded")
        elif (d / WEIGHTS_NAME).is_file():
            self._load_files([d / WEIGHTS_NAME], "single")
        elif (d / ADAPTER_NAME).is_file():
            self._load_files([d / ADAPTER_NAME], "adapter")
        elif (d / _PICKLE_INDEX).is_file() or (d / _PICKLE_NAME).is_file():
            self._load_pickle()
        else:
            lone = sorted(d.glob("*.safetensors"))
            if len(lone) == 1:
                self._load_files(lone, "single")
            else:
                found = ", ".join(sorted(p.name for p in d.iterdir())[:8]) or "an empty directory"
                raise CheckpointError(
                    f"{d} holds no checkpoint: expected {WEIGHTS_NAME}, {INDEX_NAME} (+ shards) or {ADAPTER_NAME}; "
                    f"found {found}."
                )

    def _load_files(self, files: list[Path], kind: str, confine: bool = True) -> None:
        self.kind = kind
        self.files = files
        for file in files:
            if confine:
                self._inside(file)
            try:
                fd = paths.open_regular(file)
            except OSError as e:
                raise CheckpointError(f"{file}: cannot read: {e.strerror or e}") from None
            try:
                parsed, meta = _parse_header(fd, file)
            except BaseException:
                os.close(fd)
                raise
            handle = _Handle(file, fd, _layout(parsed))
            self._handles.append(handle)
            infos = {n: dataclasses.replace(i, handle=handle) for n, i in parsed.items()}
            self.shard_metadata[file] = meta
            for name, info in infos.items():
                if name in self._infos:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} also appears in {self._infos[name].file}."
                    )
                self._infos[name] = info

    def _read_index(self, index_path: Path) -> tuple[dict[str, str], dict[str, Any]]:
        self._inside(index_path)
        try:
            fd = paths.open_regular(index_path)
            with os.fdopen(fd, "rb") as f:
                index = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{index_path}: not a readable JSON index: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: the index has no 'weight_map' object (or it is empty).")
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file:
                raise CheckpointError(f"{index_path}: weight_map[{name!r}] = {file!r} is not a file name.")
            parts = Path(file).parts
            if Path(file).is_absolute() or ".." in parts or "\\" in file:
                raise CheckpointError(
                    f"{index_path}: weight_map[{name!r}] = {file!r} points outside the checkpoint directory."
                )
        meta = index.get("metadata") or {}
        if not isinstance(meta, dict):
            raise CheckpointError(
                f"{index_path}: 'metadata' must be a JSON object, got {type(meta).__name__}."
            )
        return weight_map, meta

    def _load_index(self, index_path: Path, kind: str) -> None:
        weight_map, self.index_metadata = self._read_index(index_path)
        files = sorted({self.dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not os.path.lexists(f)]  # a FIFO is refused when opened
        if missing:
            raise CheckpointError(f"{index_path} lists shard(s) that do not exist: {', '.join(missing[:5])}.")
        self._load_files(files, kind)
        for name, file in weight_map.items():
            info = self._infos.get(name)
            if info is None or info.file != self.dir / file:
                where = f"it is in {info.file.name}" if info else "no shard holds it"
                raise CheckpointError(f"{index_path}: the index puts {name!r} in {file}, but {where}.")
        extra = sorted(set(self._infos) - set(weight_map))
        if extra:
            raise CheckpointError(
                f"{index_path}: shards hold tensors the index does not list (e.g. {extra[0]!r}); the index is stale."
            )
        # a weight file the index does not list is never read, and an edit does not carry it over: say so
        stem = index_path.name[: -len(".index.json")].removesuffix(".safetensors")
        listed = {f.name for f in files}
        unlisted = sorted(
            p.name
            for p in self.dir.glob(f"{stem}*.safetensors")
            if p.name not in listed and not p.name.startswith(".")
        )
        if unlisted:
            warnings.warn(
                f"{self.dir} holds {len(unlisted)} weight file(s) its index {index_path.name} does not list "
                f"({', '.join(unlisted[:3])}): they are ignored (not read, and not copied by an edit). Remove "
                "them, or fix the index if they belong to the checkpoint.",
                stacklevel=3,
            )

    def _load_pickle(self) -> None:
        d = self.dir
        if not self.allow_pickle:
            raise CheckpointError(
                f"{d} holds a pickled checkpoint ({_PICKLE_NAME}); loading pickles can run arbitrary code. Convert it "
                "to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) to load it with "
                "torch.load(weights_only=True)."
            )
        if (d / _PICKLE_INDEX).is_file():
            weight_map, self.index_metadata = self._read_index(d / _PICKLE_INDEX)
            files = sorted({d / f for f in weight_map.values()})
        else:
            files = [d / _PICKLE_NAME]
        self.kind, self.files, self._pickled = "pickle", files, {}
        seen: dict[int, str] = {}
        for file in files:
            self._inside(file)
            try:
                os.close(paths.open_regular(file))  # torch.load opens by name: refuse a FIFO before it blocks
            except OSError as e:
                raise CheckpointError(f"{file}: cannot read: {e.strerror or e}") from None
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(
                    f"{file}: cannot be loaded with torch.load(weights_only=True): {e}"
                ) from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{file}: expected a state dict, got {type(state).__name__}.")
            for name, t in state.items():
                if not isinstance(t, torch.Tensor):
                    continue
                key = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
                if t.numel() and key in seen:  # tied weights: keep the first name, like save_pretrained
                    continue
                seen[key] = name
                self._pickled[name] = t
                self._infos[name] = TensorInfo(name, file, t.dtype, tuple(t.shape))

    # -- access ----------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names, in file order (shard by shard)."""
        return list(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        """:class:`TensorInfo` of ``name``; unknown names raise :class:`UnknownParameterError` with the nearest."""
        try:
            return self._infos[name]
        except KeyError:
            raise UnknownParameterError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        import difflib

        close = difflib.get_close_matches(name, list(self._infos), n=3, cutoff=0.5)
        hint = f" Nearest: {', '.join(close)}." if close else f" It holds {len(self)} tensors."
        return f"{self.path} has no tensor {name!r}.{hint}"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: i.shape for n, i in self._infos.items()}

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(i.nbytes for i in self._infos.values())

    def read(self, name: str, buffer: ReadBuffer) -> torch.Tensor:
        """Load one tensor into ``buffer`` (valid until the buffer's next read); :meth:`get` for pickles."""
        info = self.info(name)
        if self._pickled is not None or info.start is None:
            return self.get(name)
        return buffer.read(info)

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (copy-on-write: editing it never touches the file)."""
        info = self.info(name)
        if self._pickled is not None:
            return self._pickled[name].clone()
        # read through the descriptor the header came from (a fresh buffer: the tensor owns its memory)
        return ReadBuffer().read(info)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` one at a time, in file order."""
        for name in self._infos:
            yield name, self.get(name)

    @property
    def config(self) -> dict[str, Any] | None:
        """The directory's ``config.json`` (``adapter_config.json`` for adapters) as a dict, if present."""
        file = self.dir / ("adapter_config.json" if self.kind == "adapter" else "config.json")
        if not file.is_file():
            return None
        try:
            cfg = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not valid JSON: {e}") from None
        return cfg if isinstance(cfg, dict) else None

    def canonical_names(self) -> dict[str, str]:
        """``{canonical name: stored name}`` (identity for full models; strips PEFT prefixes for adapters)."""
        return {canonical_name(n): n for n in self._infos}

    def close(self) -> None:
        """Close the shard files and drop cached pickled tensors. A later read re-opens the shard and checks
        that its header is unchanged (a shard replaced meanwhile is a :class:`CheckpointError`)."""
        for handle in self._handles:
            handle.close()
        if self._pickled is not None:
            self._pickled.clear()

    def _unchanged_on_disk(self) -> str | None:
        """Why the files at this checkpoint's paths are no longer the ones it opened (``None`` if they are)."""
        for handle in self._handles:
            if handle.fd < 0:
                continue
            try:
                now = os.stat(handle.path)
            except OSError:
                return f"{handle.path} was removed"
            was = os.fstat(handle.fd)
            if (now.st_ino, now.st_dev) != (was.st_ino, was.st_dev):
                return f"{handle.path} was replaced"
        return None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.path)!r}, {self.kind}, {len(self)} tensors in {len(self.files)} file(s))"
        )


def layer_map(names: Iterable[str]) -> tuple[str | None, dict[str, int | None]]:
    """The block-list path and each name's decoder-layer index, inferred from parameter names alone.

    Works without a model (checkpoints, diffs): the known block paths of :mod:`hfhooks.core.layers` are tried first
    (``model.layers``, ``transformer.h``…), then the most common ``<path>.<int>.`` prefix. Names are made
    canonical first (PEFT adapter names work). Names outside the block list map to ``None``.

    >>> layer_map(["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"])[1]
    {'model.embed_tokens.weight': None, 'model.layers.1.mlp.up_proj.weight': 1}
    """
    from hfhooks.core.blocks import LAYER_PATHS

    names = list(names)
    canon = {n: canonical_name(n) for n in names}
    counts: dict[str, set[int]] = {}
    for c in canon.values():
        for m in re.finditer(r"\.(\d+)\.", "." + c):
            if m.start():  # the path before ".<int>."
                counts.setdefault(c[: m.start() - 1], set()).add(int(m.group(1)))
    path = next((p for p in LAYER_PATHS if p in counts), None)
    if path is None:
        multi = [(len(v), p) for p, v in counts.items() if len(v) > 1]
        path = max(multi)[1] if multi else None
    out: dict[str, int | None] = {}
    for n, c in canon.items():
        idx = None
        if path is not None and c.startswith(path + "."):
            head = c[len(path) + 1 :].split(".", 1)[0]
            idx = int(head) if head.isdigit() else None
        out[n] = idx
    return path, out


def parse_layers(spec: str | int | slice | Iterable[int], num_layers: int) -> list[int]:
    """Normalise a layer selection to sorted indices: ``"4:8"`` (Python slice, end excluded), ``"2,5,-1"``,
    an int, a ``slice``/``range`` or indices (negative ones count from the end).

    >>> parse_layers("2:5", 8), parse_layers("-2:", 8), parse_layers("0,7", 8)
    ([2, 3, 4], [6, 7], [0, 7])
    """
    if isinstance(spec, str):
        text = spec.strip()
        if ":" in text:
            parts = text.split(":")
            if len(parts) > 3:
                raise ValueError(f"Layer range {spec!r}: use 'start:end' (end excluded).")
            try:
                spec = slice(*[int(p) if p.strip() else None for p in parts])
            except ValueError:
                raise ValueError(f"Layer range {spec!r}: use integers, e.g. '4:8'.") from None
        else:
            try:
                spec = [int(p) for p in text.split(",") if p.strip()]
            except ValueError:
                raise ValueError(
                    f"Layer list {spec!r}: use integers, e.g. '2,3,5' or a range '4:8'."
                ) from None
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, slice):
        out = list(range(num_layers))[spec]
    else:
        out = []
        for i in spec:
            if not -num_layers <= int(i) < num_layers:
                raise IndexError(
                    f"Layer {i} out of range: the model has {num_layers} layers (0…{num_layers - 1})."
                )
            out.append(int(i) % num_layers)
        out = sorted(set(out))
    if not out:
        raise ValueError(f"The layer selection {spec!r} is empty for a model with {num_layers} layers.")
    return out


# -- writing ---------------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in safetensors order (little-endian, C-contiguous) as a memoryview, no copy if CPU."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if sys.byteorder != "little" and flat.element_size() > 1:  # pragma: no cover - big-endian hosts
        flat = flat.clone().view(torch.uint8).reshape(-1, flat.element_size()).flip(1).reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class _ShardWriter:
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
        expected = self.entries[self.position]
        total = 0
        for block in blocks.blocks:
            if block.dtype != expected.dtype:
                raise ValueError(
                    f"The edit of {name!r} produced a {block.dtype} block; expected {expected.dtype}."
                )
            data = tensor_bytes(block)
            write_all(self.fd, data)
            total += data.nbytes
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
        n = os.write(fd, data[:_COPY_CHUNK])
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
        chunk = os.pread(src_fd, min(_COPY_CHUNK, count - copied), offset + copied)
        if not chunk:
            raise CheckpointError(f"source file ended early while copying {count} bytes (truncated?)")
        write_all(dst_fd, memoryview(chunk))
        copied += len(chunk)


def _plan_shards(
    source: Checkpoint, names: list[str], max_shard_size: int | str | None
) -> list[tuple[str, list[str]]]:
    """Output file names and their tensors: the source layout, or a fresh split (huggingface_hub's rule)."""
    if max_shard_size is None:
        if source.kind == "pickle":
            max_shard_size = "5GB"
        else:
            by_file: dict[str, list[str]] = {}
            for n in names:
                by_file.setdefault(source.info(n).file.name, []).append(n)
            if source.kind == "single" and source.path.is_file():
                return [(WEIGHTS_NAME, names)]
            return list(by_file.items())
    pattern = "adapter_model{suffix}.safetensors" if source.kind == "adapter" else "model{suffix}.safetensors"
    split = split_state_dict_into_shards_factory(
        {n: source.info(n) for n in names},
        get_storage_size=lambda info: info.nbytes,
        filename_pattern=pattern,
        max_shard_size=parse_size_to_int(max_shard_size)
        if isinstance(max_shard_size, str)
        else max_shard_size,
    )
    order = {n: i for i, n in enumerate(names)}
    return [(file, sorted(ts, key=order.__getitem__)) for file, ts in split.filename_to_tensors.items()]


def _is_copied_file(path: Path, skip: set[str]) -> bool:
    name = path.name
    return (
        (path.is_file() or path.is_symlink())
        and name not in skip
        and name not in _SKIP_FILES
        and not name.endswith(".index.json")
        and not name.endswith(_WEIGHT_SUFFIXES)
        and not name.startswith(".")
    )


def _copy_file(src: Path, dst: Path, directory: Path) -> None:
    """Copy one non-weight file of ``directory`` into a new output, never reading outside ``directory``.

    A symlink resolving inside the directory (or a Hugging Face cache snapshot's blob store) is copied as the
    file it points to; one resolving elsewhere is recreated as a link to the same absolute target, unread (its
    target is not copied into the output). Non-regular files (FIFOs, sockets) are refused.
    """
    if src.is_symlink():
        try:
            paths.resolve_inside(src, directory)
        except OSError:
            os.symlink(os.path.realpath(src), dst)
            return
    try:
        fd = paths.open_regular(src)
    except OSError as e:
        raise CheckpointError(f"{src}: cannot copy it into the output: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)
    shutil.copystat(src, dst)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Carry one entry of a checkpoint directory into its in-place replacement, without following links: a
    symlink is recreated as the same link (same directory, so relative links keep their meaning), a directory is
    rebuilt entry by entry, a file is hard-linked (copied where links are not possible)."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISDIR(st.st_mode):
        dst.mkdir()
        for child in os.scandir(src):
            _link_or_copy(Path(child.path), dst / child.name)
        shutil.copystat(src, dst, follow_symlinks=False)
    else:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(
                    f"{src} is not a regular file and cannot be hard-linked into the edited checkpoint; remove it."
                ) from None
            shutil.copy2(src, dst, follow_symlinks=False)


def is_edited_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory an hfhooks edit wrote (what ``overwrite`` may replace), or an
    empty directory."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(path.iterdir()):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = Checkpoint(path)
        try:
            meta = (
                ckpt.index_metadata if ckpt.index_metadata else next(iter(ckpt.shard_metadata.values()), {})
            )
            return bool(meta.get("hfhooks.edits"))
        finally:
            ckpt.close()
    except (CheckpointError, OSError):
        return False


Loader = Callable[[], torch.Tensor]


def edit_checkpoint(
    source: str | os.PathLike | Checkpoint,
    out: str | os.PathLike | None,
    edits: Mapping[str, Callable[[Loader], torch.Tensor]],
    *,
    drop: Iterable[str] = (),
    record: Mapping[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    copy_files: bool | Iterable[str] = True,
    fsync: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    desc: str = "editing",
    inputs: Iterable[str | os.PathLike | None] = (),
    allow_inside_source: bool = False,
) -> Path:
    """Write ``source`` with some tensors replaced, streaming and atomically; return the output directory.

    Args:
        source: a checkpoint directory (or file), or an open :class:`Checkpoint`.
        out: the output directory (must not exist unless ``overwrite=True``); ``None`` edits ``source`` in
            place — the new files are written next to it and the directories are swapped at the end, and
            every non-weight file (optimizer state, trainer state…) is kept.
        edits: ``{name: fn}``; ``fn(load)`` returns the new tensor, where ``load()`` reads the source tensor on
            demand into a buffer reused for the next tensor (so it is valid until this edit's result has been
            written; ``.clone()`` it to keep it). The result must keep the source tensor's dtype and shape; it may also be the
            :class:`TensorInfo` of a tensor in another safetensors file, whose bytes are then copied without
            loading them, or :class:`TensorBlocks` streamed as computed. Tensors not named are copied bytewise.
        drop: names to leave out of the output.
        record: what the edit was (stored as JSON under ``hfhooks.edits`` in every shard and in the index).
        max_shard_size: re-shard the output (e.g. ``"2GB"``); default: keep the source's file layout.
        overwrite: replace an existing ``out`` (atomically, like an in-place edit) — only a checkpoint directory
            an earlier hfhooks edit wrote (or an empty directory); anything else is refused.
        copy_files: copy the source directory's other files (config, tokenizer, generation config; not
            training state) into a new output — ``True``, ``False``, or explicit file names.
        fsync: flush every file to stable storage before the rename (slower; survives power loss too).
        progress: show a tqdm progress bar (bytes written).
        allow_pickle: accept a pickled ``pytorch_model.bin`` source (read with ``weights_only=True``).
        inputs: the other paths the edit reads (a reference checkpoint, a diff file): the output may not equal,
            contain or lie inside any of them, nor inside ``source`` (symlinks and ``..`` resolved).
        allow_inside_source: let ``out`` be a subdirectory of the source directory (``LayerRestorationCallback``'s
            ``<checkpoint>/<variant>/``); it still may not equal or contain any input. Only the source's top-level
            files are read, so the new subdirectory never becomes part of what is read.

    Safety: the output is locked (``fcntl.flock`` on ``.<name>.hfhooks.lock`` next to it) for the whole edit, so
    a second edit of the same checkpoint or output fails at once instead of racing; whether an existing output is
    replaced is decided at the start, and the final rename never replaces anything created meanwhile.
    """

    src = source if isinstance(source, Checkpoint) else Checkpoint(source, allow_pickle=allow_pickle)
    others = [p for p in inputs if p is not None]
    in_place = out is None or (
        src.path.is_dir() and not Path(out).is_symlink() and paths.real(out) == paths.real(src.dir)
    )
    if in_place:  # out=None, or out=<the checkpoint> (the Python API's documented spelling of in place)
        if not src.path.is_dir():
            raise ValueError(f"In-place edits need a checkpoint directory; {src.path} is a file. Pass out=.")
        if src.dir.is_symlink():
            raise paths.OutputPathError(
                f"{src.dir} is a symbolic link; an in-place edit would replace the link, not the checkpoint. "
                f"Edit the real directory ({paths.real(src.dir)})."
            )
        out_path = src.dir
        existed = paths.check_output(out_path, others, overwrite=True, same_kind=lambda p: True)
    else:
        out_path = Path(out)
        # with allow_inside_source the source may hold the output, but not lie inside it
        if allow_inside_source and src.path.is_dir() and paths.real(out_path) in paths.real(src.dir).parents:
            raise paths.OutputPathError(f"The output {out_path} contains the input {src.dir}.")
        existed = paths.check_output(
            out_path,
            [*([] if allow_inside_source and src.path.is_dir() else [src.path]), *others],
            overwrite=overwrite,
            same_kind=is_edited_checkpoint,
            kind="checkpoint directory",
        )
    drop = set(drop)
    for name in [*edits, *drop]:
        src.info(name)  # unknown names fail before anything is written
    names = [n for n in src if n not in drop]
    if not names:
        raise ValueError("The edit would drop every tensor of the checkpoint.")
    plan = _plan_shards(src, names, max_shard_size)
    edit_record = {"hfhooks_version": __version__, "source": str(src.path), **dict(record or {})}

    with paths.exclusive_lock(out_path, "edited" if in_place else "written"):
        if in_place and (why := src._unchanged_on_disk()):
            raise CheckpointError(
                f"{src.dir} changed since it was opened ({why}: another edit finished meanwhile); open it again "
                "so this edit does not undo that one."
            )
        if not in_place and os.path.lexists(out_path) != existed:
            raise FileExistsError(f"{out_path} was created or removed by someone else meanwhile; run again.")
        with paths.temp_dir(out_path) as tmp:
            try:
                _write_edit(src, tmp, plan, names, edits, edit_record, fsync, progress, desc)
            except OSError as e:
                raise paths.write_error(e, out_path) from None
            weight_files = set(src.files) | {src.dir / INDEX_NAME, src.dir / _PICKLE_INDEX}
            if in_place:
                for entry in src.dir.iterdir():
                    if entry not in weight_files and not os.path.lexists(tmp / entry.name):
                        _link_or_copy(entry, tmp / entry.name)
            elif copy_files and src.path.is_dir():
                wanted = None if copy_files is True else set(copy_files)
                for entry in sorted(src.dir.iterdir()):
                    if wanted is not None and entry.name not in wanted:
                        continue
                    if entry in weight_files or (wanted is None and not _is_copied_file(entry, set())):
                        continue
                    if (entry.is_file() or entry.is_symlink()) and not os.path.lexists(tmp / entry.name):
                        _copy_file(entry, tmp / entry.name, src.dir)
            if fsync:
                _fsync_dir(tmp)
            src.close()
            old = paths.publish(tmp, out_path, replace=in_place or existed)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            if fsync:
                _fsync_dir(out_path.parent)
    return out_path


def _write_edit(
    src: Checkpoint,
    tmp: Path,
    plan: list[tuple[str, list[str]]],
    names: list[str],
    edits: Mapping[str, Callable[[Loader], torch.Tensor]],
    edit_record: dict[str, Any],
    fsync: bool,
    progress: bool,
    desc: str,
) -> None:
    """Write the edited shards (and the index) of ``src`` into the temporary directory ``tmp``."""
    from tqdm.auto import tqdm

    total = sum(src.info(n).nbytes for n in names)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False)
    weight_map: dict[str, str] = {}
    shard_meta_base = next(iter(src.shard_metadata.values()), {}) if src.shard_metadata else {}
    buffer = ReadBuffer()  # every edit's load() reads into it: valid until the edit's result is written
    for file_name, tensors in plan:
        src_file = src.info(tensors[0]).file
        meta = dict(src.shard_metadata.get(src_file, shard_meta_base))
        history = _history(meta.get("hfhooks.edits"))
        meta.update({"format": "pt", "hfhooks.edits": json.dumps([*history, edit_record])})
        writer = _ShardWriter(tmp / file_name, [src.info(n) for n in tensors], meta)
        try:
            for name in tensors:
                info = src.info(name)
                fn = edits.get(name)
                if fn is not None:
                    new = fn(lambda name=name: src.read(name, buffer))
                    ok = isinstance(new, torch.Tensor | TensorInfo | TensorBlocks) and (
                        tuple(new.shape) == info.shape and new.dtype == info.dtype
                    )
                    if not ok:
                        got = (
                            f"{new.dtype} {tuple(new.shape)}" if hasattr(new, "dtype") else type(new).__name__
                        )
                        raise ValueError(
                            f"The edit of {name!r} returned {got}; it must keep the source's {info.dtype} "
                            f"{info.shape}."
                        )
                    if isinstance(new, TensorInfo):
                        if new.start is None:
                            raise ValueError(
                                f"The edit of {name!r} returned a TensorInfo with no byte range."
                            )
                        writer.copy(new)  # bytes of another file, copied by the kernel
                    elif isinstance(new, TensorBlocks):
                        writer.write_blocks(name, new)  # written as computed: no full-size output
                    else:
                        writer.write(new)
                    del new
                elif info.start is None:  # pickled source: no byte range to copy
                    writer.write(src.get(name))
                else:
                    writer.copy(info)
                weight_map[name] = file_name
                bar.update(info.nbytes)
        finally:
            writer.close(fsync)
    bar.close()
    if len(plan) > 1:
        index_meta = {k: v for k, v in src.index_metadata.items() if k != "hfhooks.edits"}
        index_meta["total_size"] = total
        index_meta["hfhooks.edits"] = [*_history(src.index_metadata.get("hfhooks.edits")), edit_record]
        index_name = "adapter_model.safetensors.index.json" if src.kind == "adapter" else INDEX_NAME
        (tmp / index_name).write_text(
            json.dumps({"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
            + "\n"
        )


def _history(raw: Any) -> list[Any]:
    if isinstance(raw, list):
        return raw
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            value = json.loads(raw)
            return value if isinstance(value, list) else []
    return []
