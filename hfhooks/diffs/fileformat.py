"""Diff files: streaming, atomic writes; eager (digest-verified) or lazy (CRC-per-tensor) reads.

:func:`write_diff` streams entries into a safetensors artifact of kind ``diff`` one tensor at a time behind a
reserved header; :func:`read_diff` validates a file and returns the entries :class:`~hfhooks.diffs.WeightDiff` is built from, either
loading everything (whole-file digest) or backing each entry by a :class:`_LazyReader` that checks each stored
tensor's CRC-32 as it is read. The one-thread CRC pool lets :func:`hfhooks.diffs.arithmetic.apply_fn` verify
a lazily read Δ while the update is computed. Per-entry encoding is :mod:`hfhooks.diffs.codec`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hfhooks._version import __version__
from hfhooks.diffs.codec import (
    DIFF_FORMAT,
    PART_SEP,
    decode_entry_meta,
    entry_meta,
    payload_from,
    stored_tensors,
)
from hfhooks.diffs.entries import (
    DiffEntry,
    DiffFileError,
    Payload,
    all_flags,
    const_loader,
    diff_fingerprint,
    progress_bar,
    tensor_crc,
)
from hfhooks.io.artifacts import (
    FORMAT_VERSION,
    ArtifactError,
    artifact_digest,
    decode_metadata,
    metadata_digest,
    read_artifact,
    reraise_as,
)
from hfhooks.io.paths import check_output, publish, temp_file, write_error
from hfhooks.io.safetensors import (
    DTYPE_CODES,
    ReadBuffer,
    TensorInfo,
    copy_range,
    crc32,
    read_safetensors_header,
    tensor_bytes,
    write_all,
)

RESERVED_META = (
    "tensors",
    "kind",
    "version",
    "format_version",
    "diff_format",
    "digest",
    "meta_digest",
    "path",
)


class _DataFile(Mapping[str, torch.Tensor]):
    """The data section of a file being written, from byte ``base`` on; tensors are read back one at a time
    (a lazy mapping, so the artifact digest never needs more than one tensor in memory)."""

    def __init__(self, fd: int, base: int):
        self.fd, self.base = fd, base
        self.infos: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self.size = 0
        self._buffer = torch.empty(0, dtype=torch.uint8)
        os.lseek(fd, base, os.SEEK_SET)

    def add(self, name: str, t: torch.Tensor) -> str:
        data = tensor_bytes(t)
        write_all(self.fd, data)
        self.infos[name] = (t.dtype, tuple(t.shape), self.size, self.size + data.nbytes)
        self.size += data.nbytes
        return f"{crc32(data):08x}"

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor ``name`` read back into one reused buffer (no fresh pages per tensor): valid until the
        next read, which is all the digest, reading one tensor at a time, needs."""
        dtype, shape, start, end = self.infos[name]
        if self._buffer.numel() < end - start:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # free the old buffer before growing
            self._buffer = torch.empty(end - start, dtype=torch.uint8)
        view, got = memoryview(self._buffer.numpy())[: end - start], 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], self.base + start + got)
            if n <= 0:
                raise OSError("the file being written ended early")
            got += n
        data = self._buffer[: end - start]
        return data.view(dtype).reshape(shape) if len(view) else torch.empty(shape, dtype=dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)


def _header_bytes(metadata: Mapping[str, str], data: _DataFile) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    for name, (dtype, shape, start, end) in data.infos.items():
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [start, end]}
    return json.dumps(header, separators=(",", ":")).encode()


def write_diff(
    path: str | os.PathLike,
    items: Iterable[tuple[str, DiffEntry | None]],
    meta: Mapping[str, Any],
    names: Sequence[str],
    progress: bool,
    desc: str,
    inputs: Iterable[Any] = (),
) -> Path:
    """Stream entries into a diff file, atomically.

    The file is written under a locked ``.<name>.hfhooks-tmp-<hex>`` temporary (a killed writer's is removed by
    the next write to the same path) and renamed into place; an existing file is replaced only if it is an
    hfhooks diff, and ``path`` may not equal or lie inside any of ``inputs`` (the checkpoints it is computed from).

    Tensors are written straight into the data section behind a reserved header (one pass, one tensor in
    memory); the header — which needs every tensor's offsets, CRCs and exactness — is written last, padded with
    spaces (valid JSON) to the reserved size. A header that outgrows its reservation is rewritten in front of a
    copy of the data (slower, still correct).
    """
    path = Path(path)
    existed = check_output(
        path,
        [p for p in inputs if isinstance(p, str | os.PathLike)],
        overwrite=True,
        same_kind=_is_diff_file,
        kind="diff file",
    )
    with temp_file(path) as (tmp, fd):
        try:
            _stream_diff(path, tmp, fd, items, meta, names, progress, desc)
        except OSError as e:  # ENOSPC / EFBIG from a bare os.write: name the file
            raise write_error(e, path) from None
        publish(tmp, path, replace=existed)
    read_diff(path, lazy=True)  # what was written reads back: header, digests, every entry's metadata
    return path


def _is_diff_file(path: Path) -> bool:
    try:
        return read_safetensors_header(path)[1].get("hfhooks.kind") == "diff"
    except (ArtifactError, OSError):
        return False


def _stream_diff(
    path: Path,
    tmp: Path,
    fd: int,
    items: Iterable[tuple[str, DiffEntry | None]],
    meta: Mapping[str, Any],
    names: Sequence[str],
    progress: bool,
    desc: str,
) -> None:
    """The body of :func:`write_diff`: entries into the open temporary ``tmp`` (``fd``), header last."""
    reserve = 65536 + sum(2048 + 24 * len(n) for n in names) + 4 * len(json.dumps(meta, default=str))
    reserve += -reserve % 8
    data = _DataFile(fd, 8 + reserve)
    infos: dict[str, dict[str, Any]] = {}
    per_base: dict[str, tuple[tuple[int, ...], str | None]] = {}
    per_target: dict[str, tuple[tuple[int, ...], str | None]] = {}
    unchanged: list[str] = list(meta.get("unchanged", []))
    for name, entry in progress_bar(items, len(names), progress, desc):
        if entry is None:
            unchanged.append(name)
            continue
        if PART_SEP in name:
            raise ValueError(f"Tensor name {name!r} contains {PART_SEP!r}, which diff files reserve.")
        payload = entry.load()
        stored = stored_tensors(name, entry, payload)
        crcs = {k: data.add(k, v) for k, v in sorted(stored.items())}
        nnz = int(payload["mask"].sum()) if payload.get("mask") is not None else None
        infos[name] = entry_meta(entry, crcs, nnz)
        per_base[name] = (entry.shape, entry.base)
        per_target[name] = (entry.shape, entry.target)
        del payload, stored
    full_meta = {k: v for k, v in meta.items() if k not in RESERVED_META}
    full_meta.update(
        {
            "base": diff_fingerprint(per_base),
            "target": diff_fingerprint(per_target),
            "exact": all_flags(i["exact"] for i in infos.values()),
            "exact_inverse": all_flags(i["exact_inverse"] for i in infos.values()),
            "unchanged": unchanged,
            "tensors": infos,
        }
    )
    metadata = {
        "format": "pt",
        "hfhooks.kind": "diff",
        "hfhooks.version": __version__,
        "hfhooks.format_version": FORMAT_VERSION,
        "hfhooks.diff_format": json.dumps(DIFF_FORMAT),  # entry encodings; files without it are format 1
    }
    for key, value in full_meta.items():
        metadata[f"hfhooks.{key}"] = json.dumps(value)
    metadata["hfhooks.meta_digest"] = json.dumps(metadata_digest(metadata))
    metadata["hfhooks.digest"] = artifact_digest(metadata, data)
    raw = _header_bytes(metadata, data)
    if len(raw) <= reserve:
        os.pwrite(fd, reserve.to_bytes(8, "little") + raw + b" " * (reserve - len(raw)), 0)
    else:  # pragma: no cover - only with enormous metadata
        raw += b" " * (-len(raw) % 8)
        with temp_file(path) as (tmp2, fd2):
            write_all(fd2, memoryview(len(raw).to_bytes(8, "little") + raw))
            copy_range(fd, fd2, 8 + reserve, data.size)
            os.replace(tmp2, tmp)


def read_diff(path: Path, lazy: bool) -> tuple[dict[str, DiffEntry], dict[str, Any]]:
    """A diff file's entries and metadata (``lazy``: payloads are read when used), checking its kind, format
    version, metadata digest and entries; :class:`DiffFileError` naming the problem otherwise."""

    def bad(why: str) -> DiffFileError:
        return DiffFileError(f"{path}: {why}")

    if lazy:
        with reraise_as(DiffFileError):
            header, raw_meta = read_safetensors_header(path)
        if raw_meta.get("hfhooks.kind") != "diff":
            found = raw_meta.get("hfhooks.kind")
            raise bad(f"not an hfhooks diff file (hfhooks.kind = {found!r}).")
        if raw_meta.get("hfhooks.format_version") != FORMAT_VERSION:
            raise bad(
                f"format_version {raw_meta.get('hfhooks.format_version')!r}; this hfhooks reads {FORMAT_VERSION!r}."
            )
        if raw_meta.get("hfhooks.meta_digest") != json.dumps(metadata_digest(raw_meta)):
            raise bad("failed its metadata integrity check (the header was modified or corrupted).")
        with reraise_as(DiffFileError):  # the stamp and digests land in meta too: RESERVED_META drops them
            meta = decode_metadata(path, raw_meta)
        shapes = {n: (i.dtype, i.shape) for n, i in header.items()}
        reader = _LazyReader(path)
    else:
        with reraise_as(DiffFileError):
            tensors, meta = read_artifact(path, "diff")
        if meta.get("meta_digest") != metadata_digest(_raw_metadata(path)):
            raise bad("failed its metadata integrity check.")
        shapes = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
        reader = None
    info = meta.pop("tensors", None)
    if not isinstance(info, dict):
        raise bad("'hfhooks.tensors' metadata is missing or not an object.")
    version = meta.get("diff_format", 1)  # absent: written before format 2 (read by the same rules, narrower)
    if type(version) is not int or not 1 <= version <= DIFF_FORMAT:
        raise bad(f"diff format {version!r}; this hfhooks reads formats 1 to {DIFF_FORMAT}. Upgrade hfhooks.")
    claimed: set[str] = set()
    metadata = {k: v for k, v in meta.items() if k not in RESERVED_META}
    if not isinstance(metadata.get("ops"), list):
        metadata["ops"] = []
    entries: dict[str, DiffEntry] = {}
    for name, entry_info in info.items():
        if (
            PART_SEP in name
        ):  # "<name>::mask" etc. are the stored parts of entry <name>: never an entry itself
            raise bad(
                f"tensor name {name!r} contains {PART_SEP!r}, which diff files reserve for the parts of an entry "
                "(hfhooks never writes such a name; the file was edited or made by another tool)."
            )
        try:
            entry, parts = decode_entry_meta(name, entry_info, shapes, version)
        except (ValueError, TypeError, KeyError) as e:
            raise bad(f"tensor {name!r}: {e}") from None
        claimed.update(parts)
        if reader is None:
            # The whole-file digest already matched; the per-tensor CRCs are checked too, as the lazy reader
            # does, so both readers accept exactly the same files (a file whose digest was recomputed after an
            # edit still fails here).
            for part in parts:
                if tensor_crc(tensors[part]) != entry_info["crc32"][part]:
                    raise bad(f"tensor {part!r} failed its CRC-32 check (corrupted or edited file).")
            payload = payload_from(entry, name, {p: tensors[p] for p in parts}, path)
            entries[name] = replace(entry, load=const_loader(payload))
        else:
            entries[name] = replace(entry, load=reader.loader(entry, name, parts, entry_info["crc32"]))
    extra = sorted(set(shapes) - claimed)
    if extra:
        raise bad(f"holds tensors its metadata does not describe (e.g. {extra[0]!r}).")
    metadata["path"] = str(path)
    return entries, metadata


def _raw_metadata(path: Path) -> dict[str, str]:
    return read_safetensors_header(path)[1]


class _LazyReader:
    """Reads a diff file's entries on demand with ``safe_open``, checking each tensor's CRC-32.

    ``load()`` verifies before returning. :data:`DEFERRED` maps it to the same read with the checks
    returned as a callable, so :meth:`WeightDiff.apply` can run them on a helper thread (the CRC-32
    releases the GIL) while the update is computed.
    """

    def __init__(self, path: Path):
        self.path = path
        self._infos: dict[str, TensorInfo] | None = None

    def info(self, part: str) -> TensorInfo:
        """Where a stored tensor lives in the file (the header is parsed once, on first use)."""
        if self._infos is None:
            self._infos = read_safetensors_header(self.path)[0]
        return self._infos[part]

    def loader(
        self, entry: DiffEntry, name: str, parts: list[str], crcs: Mapping[str, str]
    ) -> Callable[[], Payload]:
        def read(buffer: ReadBuffer | None = None) -> tuple[Payload, Callable[[], None]]:
            from safetensors import safe_open

            tensors = {}
            # A dense Δ's values (the bulk of the bytes) may be checked later, on a helper thread; every other
            # part (masks, codes, the exact correction's indices) is checked before it is decoded.
            deferred = {name} if entry.storage == "dense" and name in parts else set()
            try:
                if buffer is not None and deferred:  # no page faults on a memory map
                    for part in parts:  # the small correction parts get buffers of their own
                        tensors[part] = (buffer if part == name else ReadBuffer()).read(self.info(part))
                else:
                    with safe_open(str(self.path), framework="pt") as f:
                        for part in parts:
                            tensors[part] = f.get_tensor(part)
            except Exception as e:
                raise DiffFileError(f"{self.path}: cannot read {name!r}: {e}") from None

            def verify(which: Iterable[str]) -> None:
                for part in which:
                    if tensor_crc(tensors[part]) != crcs[part]:
                        raise DiffFileError(
                            f"{self.path}: tensor {part!r} failed its CRC-32 check (corrupted file)."
                        )

            verify([p for p in parts if p not in deferred])
            return payload_from(entry, name, tensors, self.path), lambda: verify(deferred)

        def load() -> Payload:
            payload, verify = read()
            verify()
            return payload

        DEFERRED[load] = read
        return load


DEFERRED: weakref.WeakKeyDictionary[
    Callable[[], Payload], Callable[[], tuple[Payload, Callable[[], None]]]
] = weakref.WeakKeyDictionary()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child inherits the pool but not its thread: every submit would wait forever


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def worker_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The shared one-thread pool that computes CRCs while the next tensor is read."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfhooks-crc")
    return _POOL


def beside(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    """``fn(*args)`` on the shared worker thread (:func:`worker_pool`), as a future. Once the interpreter began
    shutting down (an ``atexit`` handler, a thread still running after the main one returned),
    ``concurrent.futures`` refuses new work: ``fn`` then runs here, now, and the future holds its outcome."""
    try:
        return worker_pool().submit(fn, *args)
    except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
        done: concurrent.futures.Future = concurrent.futures.Future()
        try:
            done.set_result(fn(*args))
        except Exception as e:  # kept for .result(), as the pool would
            done.set_exception(e)
        return done


def verify_payloads(entries: Iterable[DiffEntry]) -> None:
    """Read every entry's payload once and drop it, so every check a read makes (CRC-32s, mask and code
    decoding) has passed before anything is changed. One tensor in memory at a time; a file-backed entry is
    read into one reused buffer."""
    buffer = ReadBuffer()
    for entry in entries:
        deferred = DEFERRED.get(entry.load)
        if deferred is not None:
            _, verify = deferred(buffer)
            verify()
        else:
            entry.load()
