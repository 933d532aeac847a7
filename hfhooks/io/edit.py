"""Atomic, streaming edits of a checkpoint: :func:`edit_checkpoint` and the steps it is made of.

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

Example:
    >>> import tempfile, torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                num_hidden_layers=2, num_attention_heads=2)
    >>> src = tempfile.mkdtemp() + "/model"
    >>> transformers.LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="8KB")
    >>> out = edit_checkpoint(src, src + "-zeroed", {"model.norm.weight": lambda load: torch.zeros_like(load())},
    ...                       record={"op": "example"}, progress=False)
    >>> Checkpoint(out).get("model.norm.weight").abs().sum().item()
    0.0
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from hfhooks._version import __version__
from hfhooks.io import paths
from hfhooks.io.checkpoints import INDEX_NAME, PICKLE_INDEX, WEIGHTS_NAME, Checkpoint
from hfhooks.io.errors import CheckpointError
from hfhooks.io.safetensors import COPY_CHUNK, ReadBuffer, ShardWriter, TensorBlocks, TensorInfo

__all__ = ["Loader", "edit_checkpoint", "is_edited_checkpoint"]


# Files never copied into a new output directory: weights (rewritten) and training state (stale after an edit).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


_SKIP_FILES = {"trainer_state.json"}


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
        max_shard_size=max_shard_size,  # "5GB" or bytes: the factory parses sizes itself
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
        shutil.copyfileobj(fin, fout, COPY_CHUNK)
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
    dry_run: bool = False,
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
        dry_run: make every check a real edit makes before writing (output path, names, shard plan), then
            return the output path without locking, writing or creating anything.

    Safety: the output is locked (``fcntl.flock`` on ``.<name>.hfhooks.lock`` next to it) for the whole edit, so
    a second edit of the same checkpoint or output fails at once instead of racing; whether an existing output is
    replaced is decided at the start, and the final rename never replaces anything created meanwhile.
    """

    src = source if isinstance(source, Checkpoint) else Checkpoint(source, allow_pickle=allow_pickle)
    others = [p for p in inputs if p is not None]
    out_path, in_place, existed = _resolve_output(src, out, others, overwrite, allow_inside_source)
    drop = set(drop)
    for name in [*edits, *drop]:
        src.info(name)  # unknown names fail before anything is written
    names = [n for n in src if n not in drop]
    if not names:
        raise ValueError("The edit would drop every tensor of the checkpoint.")
    plan = _plan_shards(src, names, max_shard_size)
    edit_record = {"hfhooks_version": __version__, "source": str(src.path), **dict(record or {})}
    if dry_run:
        return out_path

    with paths.exclusive_lock(out_path, "edited" if in_place else "written"):
        if in_place and (why := src.unchanged_on_disk()):
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
            _carry_files(src, tmp, in_place, copy_files)
            if fsync:
                _fsync_dir(tmp)
            src.close()
            old = paths.publish(tmp, out_path, replace=in_place or existed)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            if fsync:
                _fsync_dir(out_path.parent)
    return out_path


def _resolve_output(
    src: Checkpoint,
    out: str | os.PathLike | None,
    others: list[str | os.PathLike],
    overwrite: bool,
    allow_inside_source: bool,
) -> tuple[Path, bool, bool]:
    """Where the edit goes: ``(output directory, in place?, did it exist?)``, every path rule checked."""
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
    return out_path, in_place, existed


def _carry_files(src: Checkpoint, tmp: Path, in_place: bool, copy_files: bool | Iterable[str]) -> None:
    """Bring the source directory's other files into the new one: all of them in place (optimizer and trainer
    state stay with the checkpoint), else config / tokenizer files (or the ``copy_files`` named)."""
    weight_files = set(src.files) | {src.dir / INDEX_NAME, src.dir / PICKLE_INDEX}
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
        writer = ShardWriter(tmp / file_name, [src.info(n) for n in tensors], meta)
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
