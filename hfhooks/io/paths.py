"""Path safety for every file hfhooks reads or writes: one place that decides what an edit may touch.

The rules (``docs/diffs.md``, "Safety"):

* :func:`check_output` — an output may never equal, contain or lie inside any input (symlinks and ``..``
  resolved); the output itself may not be a symbolic link; an existing output needs ``overwrite``, and
  ``overwrite`` only ever replaces a previous output *of the same kind* (an hfhooks checkpoint directory, an
  hfhooks diff file…), never an arbitrary file or directory.
* :func:`open_regular` — inputs are opened without blocking and refused unless they are regular files, so a
  FIFO, socket or device given as a shard or a diff is an error, never a hang.
* :func:`resolve_inside` — files a checkpoint directory names (shards, index entries, copied config files) must
  resolve inside that directory (or, for a Hugging Face cache snapshot, inside its ``blobs`` store).
* :func:`exclusive_lock` — an ``fcntl.flock`` on a lock file next to a path: two hfhooks processes never edit
  one checkpoint or write one output at the same time.
* :func:`temp_file` / :func:`temp_dir` / :func:`sweep_stale` — recognisable temporaries
  (``.<name>.hfhooks-tmp-<hex>``) that their writer holds an ``flock`` on while alive; the next write to the
  same target removes those nobody holds (PID liveness is not used: PIDs are reused and namespaced).
* :func:`publish` — the final rename: atomic, and without replacing anything unless the caller decided at the
  start that an existing output is to be replaced.
* :func:`save_replacing` — ``torch.save`` over a file a run owns (a checkpoint's ``.pt`` / ``.bin``) through the
  two above: an interrupted write leaves the previous file whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

__all__ = [
    "OutputPathError",
    "check_output",
    "exclusive_lock",
    "open_regular",
    "publish",
    "resolve_inside",
    "save_replacing",
    "sweep_stale",
    "temp_dir",
    "temp_file",
    "write_error",
]

TEMP_MARK = ".hfhooks-tmp-"
_LOCK_SUFFIX = ".hfhooks.lock"
_YOUNG_S = 10.0  # an unlocked, still-empty temporary this young may be one whose writer is about to lock it


class OutputPathError(ValueError):
    """An output path that would destroy or alter an input, or replace something that is not an old output."""


def real(path: str | os.PathLike) -> Path:
    """``path`` with every symlink and ``..`` resolved (also for a path whose tail does not exist yet)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None],
    *,
    overwrite: bool,
    same_kind: Callable[[Path], bool] | None = None,
    kind: str = "output",
    hint: str = "",
) -> bool:
    """Refuse an output that would touch an input or replace something it should not; return whether it exists.

    Args:
        out: the output path (file or directory).
        inputs: every path the command reads (``None`` entries are ignored).
        overwrite: whether an existing output may be replaced.
        same_kind: ``same_kind(out)`` says whether an existing ``out`` is a previous output of this kind (the only
            thing ``overwrite`` may replace). ``None``: an existing output is never replaced.
        kind: what the output is, for messages (``"checkpoint directory"``, ``"diff file"``).
        hint: appended to the "equals an input" message (e.g. how to edit in place).

    Returns:
        Whether ``out`` exists now — decided once, at the start: the final :func:`publish` replaces only if so.
    """
    out = Path(out)
    out_real = real(out)
    for given in inputs:
        if given is None:
            continue
        in_real = real(given)
        if out_real == in_real:
            raise OutputPathError(
                f"The output {out} is the input {given} (both resolve to {in_real}); an edit never overwrites "
                f"its input.{' ' + hint if hint else ''}"
            )
        if _within(out_real, in_real):
            raise OutputPathError(
                f"The output {out} lies inside the input {given} ({out_real} is under {in_real}); write it "
                "somewhere outside every input."
            )
        if _within(in_real, out_real):
            raise OutputPathError(
                f"The output {out} contains the input {given} ({in_real} is under {out_real}); writing it would "
                "destroy the input. Choose an output path that holds no input."
            )
    if out.is_symlink():
        raise OutputPathError(
            f"The output {out} is a symbolic link (to {os.readlink(out)}); hfhooks never writes through or "
            "replaces a link. Give the real path, or remove the link."
        )
    if not os.path.lexists(out):
        return False
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    if same_kind is None or not same_kind(out):
        raise OutputPathError(
            f"{out} exists and is not a previous hfhooks {kind}; --overwrite / overwrite=True only replaces "
            "an earlier output of the same kind. Remove it yourself or choose another path."
        )
    return True


def open_regular(path: str | os.PathLike, *, follow: bool = True) -> int:
    """Open ``path`` read-only and return the descriptor, refusing anything but a regular file.

    The open never blocks (``O_NONBLOCK``: a FIFO with no writer would block a plain ``open()`` forever) and the
    check is made on the opened descriptor, so a path swapped between a check and the open cannot slip through.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = (
                "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else None
            )
            raise OSError(
                errno.EINVAL,
                f"{path} is {what or 'not a regular file'} (mode {stat.filemode(st.st_mode)}); hfhooks only reads "
                "regular files",
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def allowed_roots(directory: Path) -> list[Path]:
    """Where files named by ``directory`` may live: the directory itself and, for a Hugging Face cache snapshot
    (``…/snapshots/<rev>``, whose files are links into ``…/blobs``), that repository's blob store."""
    root = real(directory)
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def resolve_inside(path: Path, directory: Path) -> Path:
    """``path`` (a file named by ``directory``) resolved, or ``OSError`` if it resolves outside ``directory``."""
    resolved = real(path)
    if not any(_within(resolved, r) for r in allowed_roots(directory)):
        raise OSError(
            errno.EXDEV,
            f"{path} resolves to {resolved}, outside the directory {directory}; hfhooks never reads or writes "
            "outside the directories it is given (replace the link by the file)",
        )
    return resolved


_HELD: set[Path] = set()  # targets this process holds exclusive_lock on (flock is per open file: no re-entry)


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{_LOCK_SUFFIX}"


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, what: str = "edited") -> Iterator[None]:
    """Hold an exclusive ``flock`` for ``target`` (on ``.<name>.hfhooks.lock`` next to it) or fail at once.

    The lock file is removed on release; a process that locked a file removed meanwhile notices (the inode at the
    path changed) and takes the new one, so two processes can never both hold the lock.
    """
    target = Path(os.path.abspath(target))
    path = _lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(
                errno.EBUSY,
                f"{target} is being {what} by another hfhooks process (it holds {path}); wait for it to finish",
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # we locked a lock file its previous holder has just removed: take the current one
    _HELD.add(target)
    try:
        yield
    finally:
        _HELD.discard(target)
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def _owning(target: Path, what: str) -> Iterator[None]:
    """Hold ``target``'s exclusive lock unless this process already does (an edit locks before its temp)."""
    if Path(os.path.abspath(target)) in _HELD:
        yield
    else:
        with exclusive_lock(target, what):
            yield


def _temp_name(target: Path) -> Path:
    return target.parent / f".{target.name}{TEMP_MARK}{secrets.token_hex(8)}"


def sweep_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of earlier writes to ``target`` whose writer is gone; return what was removed.

    A writer holds an ``flock`` on its temporary for as long as it runs, so a temporary nobody holds is stale
    (killed writer). Called with ``target``'s exclusive lock held (as :func:`temp_file` / :func:`temp_dir` do),
    no other hfhooks writer of ``target`` can be between creating and locking its temporary, so every unlocked
    one is stale; without that lock a brand-new, still-empty one is left alone for a few seconds.
    """
    target = Path(os.path.abspath(target))
    owner = target in _HELD
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    prefix = f".{target.name}{TEMP_MARK}"
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefix) or entry.is_symlink():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            st = os.fstat(fd)
            empty = st.st_size == 0 if stat.S_ISREG(st.st_mode) else not any(os.scandir(entry))
            if empty and not owner and time.time() - st.st_mtime < _YOUNG_S:
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(entry, ignore_errors=True)
            elif stat.S_ISREG(st.st_mode):
                entry.unlink(missing_ok=True)
            else:
                continue
            removed.append(entry)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def temp_file(target: str | os.PathLike) -> Iterator[tuple[Path, int]]:
    """A locked temporary file next to ``target``: ``(path, fd)`` open for writing, created with the mode the
    umask implies (like ``open()``), removed on error. The caller publishes it with :func:`publish`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _owning(target, "written"):
        sweep_stale(target)
        tmp = _temp_name(target)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until the fd closes: marks the temporary as alive
            yield tmp, fd
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def temp_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A locked temporary directory next to ``target`` (see :func:`temp_file`), removed on error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _owning(target, "written"):
        sweep_stale(target)
        tmp = _temp_name(target)
        tmp.mkdir()
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            os.close(fd)


def _renameat2(a: Path, b: Path, flag: int) -> bool:
    """Linux ``renameat2``; False if the platform or file system does not support ``flag``."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def publish(tmp: Path, out: Path, *, replace: bool) -> Path | None:
    """Move a finished temporary into place. Without ``replace`` it never replaces anything: if ``out`` appeared
    meanwhile it is an error and ``out`` is left alone. With ``replace``, ``out`` is swapped atomically (a
    directory: ``RENAME_EXCHANGE``) and the old one is returned for the caller to remove (``None`` for files)."""
    if not replace:
        try:
            if _renameat2(tmp, out, RENAME_NOREPLACE):
                return None
        except FileExistsError:
            pass
        else:  # no renameat2: hard links refuse an existing name atomically for files
            if tmp.is_dir():
                if not os.path.lexists(out):  # pragma: no cover - non-Linux
                    os.rename(tmp, out)
                    return None
            else:
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, out)
                    tmp.unlink()
                    return None
        raise FileExistsError(
            f"{out} was created by someone else while hfhooks was writing it; it was left alone and nothing was "
            "written. Remove it (or pass --overwrite) and run again."
        )
    if tmp.is_dir() and os.path.isdir(out) and not os.path.islink(out):
        if _renameat2(tmp, out, RENAME_EXCHANGE):
            return tmp  # tmp now holds the old directory
        old = _temp_name(out)  # pragma: no cover - non-Linux
        os.rename(out, old)
        os.rename(tmp, out)
        return old
    os.replace(tmp, out)
    return None


def save_replacing(path: str | os.PathLike, obj: object) -> None:
    """``torch.save(obj, path)`` atomically, replacing ``path``: written to a locked temporary next to it
    (:func:`temp_file`), flushed to stable storage, then renamed over it (:func:`publish`). An interrupted write
    leaves the previous file as it was, and the next write to ``path`` removes the dead writer's temporary."""
    import torch  # only here: the path rules themselves need no torch

    path = Path(path)
    with temp_file(path) as (tmp, fd):
        with os.fdopen(os.dup(fd), "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path, replace=True)


def write_error(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` (e.g. ``ENOSPC`` / ``EFBIG`` from a bare ``os.write``) as an ``OSError`` naming ``path``."""
    code = e.errno
    why = os.strerror(code) if code else str(e)
    if code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
        why += " (the disk or the file-size limit is full; nothing was written under the real name)"
    return OSError(code, f"cannot write {path}: {why}")
