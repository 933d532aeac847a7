"""Reading Hugging Face checkpoints lazily: :class:`Checkpoint`, and layer indices from parameter names.

A :class:`Checkpoint` is a lazy view of a checkpoint directory — ``model.safetensors``, a sharded
``model.safetensors.index.json`` + shards, a PEFT ``adapter_model.safetensors``, or a single ``.safetensors``
file. Headers are parsed and validated up front (a malformed header or index is a :class:`CheckpointError`
naming the file and the problem); tensors are read one at a time, with ``pread`` through the descriptors the
headers were parsed from (a concurrent in-place edit cannot shift the bytes under the cached offsets; see
:mod:`hfhooks.io.safetensors`). :func:`layer_map` and :func:`parse_layers` find decoder layers without a model.
Writing an edited copy is :func:`hfhooks.io.edit.edit_checkpoint`.

Pickled ``pytorch_model.bin`` checkpoints are refused unless ``allow_pickle=True`` (then loaded with
``torch.load(weights_only=True)``).

Example:
    >>> import tempfile, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                num_hidden_layers=2, num_attention_heads=2)
    >>> src = tempfile.mkdtemp() + "/model"
    >>> transformers.LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="8KB")
    >>> ckpt = Checkpoint(src)
    >>> ckpt.kind, len(ckpt.files) > 1
    ('sharded', True)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from hfhooks.core.params import UnknownParameterError, canonical_name
from hfhooks.io import paths
from hfhooks.io.errors import CheckpointError
from hfhooks.io.safetensors import (
    FileHandle,
    ReadBuffer,
    TensorInfo,
    header_layout,
    parse_header,
)

__all__ = [
    "ADAPTER_NAME",
    "INDEX_NAME",
    "PICKLE_INDEX",
    "PICKLE_NAME",
    "WEIGHTS_NAME",
    "Checkpoint",
    "CheckpointError",  # re-exported from hfhooks.io.errors
    "layer_map",
    "parse_layers",
]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_NAME = "adapter_model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class Checkpoint:
    """A lazy, validated view of a Hugging Face checkpoint directory or a single ``.safetensors`` file.

    Supported layouts (first match wins): ``model.safetensors.index.json`` + shards, ``model.safetensors``,
    ``adapter_model.safetensors`` (a PEFT adapter), a lone ``*.safetensors`` file in the directory, a path to a
    ``.safetensors`` file, and — only with ``allow_pickle=True`` — ``pytorch_model.bin`` (+ index), loaded
    with ``torch.load(weights_only=True, mmap=True)``.

    Names are the names stored in the file (for full models, the canonical names of :mod:`hfhooks.core.params`;
    for adapters, :func:`~hfhooks.core.names.canonical_name` of them is what layer lookups use).
    """

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self.kind: str
        self.index_metadata: dict[str, Any] = {}
        self.shard_metadata: dict[Path, dict[str, str]] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._handles: list[FileHandle] = []
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
        elif (d / PICKLE_INDEX).is_file() or (d / PICKLE_NAME).is_file():
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
                parsed, meta = parse_header(fd, file)
            except BaseException:
                os.close(fd)
                raise
            handle = FileHandle(file, fd, header_layout(parsed))
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
                f"{d} holds a pickled checkpoint ({PICKLE_NAME}); loading pickles can run arbitrary code. Convert it "
                "to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) to load it with "
                "torch.load(weights_only=True)."
            )
        if (d / PICKLE_INDEX).is_file():
            weight_map, self.index_metadata = self._read_index(d / PICKLE_INDEX)
            files = sorted({d / f for f in weight_map.values()})
        else:
            files = [d / PICKLE_NAME]
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

    def unchanged_on_disk(self) -> str | None:
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
        # Python would clip an out-of-range bound silently ("4:8" of 6 layers = [4, 5]): a user who asked for
        # layers that do not exist gets an error instead
        for bound in (spec.start, spec.stop):
            if bound is not None and not -num_layers <= bound <= num_layers:
                raise IndexError(
                    f"Layer range {spec.start}:{spec.stop} out of range: the model has {num_layers} layers "
                    f"(0…{num_layers - 1}; a range's end may be {num_layers})."
                )
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
