"""What every ``hfhooks`` command shares: exit codes, ``--json`` / ``-q`` flags, output, progress, optional deps.

Only the standard library is imported here: ``hfhooks --help`` must start in well under a second, and torch
or transformers alone take seconds to import.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK = 0  # the command did its work
EXIT_ERROR = 1  # an error in the work: a refused or corrupt input, an I/O error, an hfhooks error
EXIT_USAGE = 2  # a usage error: unknown command or flag, a bad flag value (argparse's own convention)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what shells report)

EXIT_CODES_HELP = """exit codes:
  0    ok
  1    error in the work: a refused or corrupt input, an I/O error, an hfhooks error
  2    usage error: unknown command or flag, a bad flag value
  130  interrupted (Ctrl-C): inputs untouched, no output written"""


class MissingDependencyError(RuntimeError):
    """An optional dependency a flag needs is not installed (checked before the long work starts)."""


def add_common_flags(p: argparse.ArgumentParser, *, quiet: bool = True) -> None:
    """``--json`` (one JSON document on stdout, nothing else there) and ``-q/--quiet`` (no progress bar).

    Every command takes both, so scripts can pass them uniformly; ``quiet=False`` marks a command that has no
    progress bar to silence (its ``-q`` is accepted and changes nothing)."""
    p.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout (messages go to stderr)"
    )
    why = "no progress bar" if quiet else "accepted for uniformity: this command shows no progress bar"
    p.add_argument("-q", "--quiet", action="store_true", help=why)


def add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the inputs and the output path like a real run, print what would be read and written, "
        "write nothing",
    )


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars only on rank 0 of a distributed launch (``RANK`` / ``LOCAL_RANK`` unset or 0), never with
    ``-q``: with N processes, N bars on one terminal would garble it."""
    if getattr(args, "quiet", False):
        return False
    return all(os.environ.get(var, "0").strip() in ("", "0") for var in ("RANK", "LOCAL_RANK"))


def write_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments every checkpoint-writing command passes through unchanged (``merge``, ``apply``,
    ``restore``): overwrite, shard size, fsync, pickle policy, progress and dry run."""
    return {
        "overwrite": args.overwrite,
        "max_shard_size": args.max_shard_size,
        "fsync": args.fsync,
        "allow_pickle": args.allow_pickle,
        "progress": progress_enabled(args),
        "dry_run": args.dry_run,
    }


def emit(args: argparse.Namespace, result: dict[str, Any], lines: Sequence[str] | str) -> None:
    """The command's result: ``result`` as JSON under ``--json``, else the human-readable ``lines``."""
    if getattr(args, "json", False):
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(lines if isinstance(lines, str) else "\n".join(lines))


def note(args: argparse.Namespace, message: str) -> None:
    """A message beside the result: on stdout normally, on stderr under ``--json`` (stdout holds only JSON)."""
    print(message, file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def require(module: str, pip: str, flag: str) -> None:
    """Fail before any long work if ``flag`` needs ``module`` and it is not installed (cheap: no import)."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{flag} needs {module}, which is not installed: pip install {pip}")


def fmt_shape(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape) or "scalar"


def limit(text: str) -> int | None:
    """``--limit N``: at most N rows, 0 = all; a negative or non-integer value is a usage error (exit 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (0 = all)") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative; pass a row count, or 0 for all")
    return None if n == 0 else n


def layer_spec(text: str) -> str:
    """``--layers``: ``'4:8'`` (end excluded) or ``'2,3,7'``; a malformed value is a usage error (exit 2). Whether
    the layers exist is checked against the checkpoint later (exit 1)."""
    parts = text.split(":") if ":" in text else text.split(",")
    ok = 1 <= len(parts) <= (3 if ":" in text else len(parts)) and all(
        p.strip().lstrip("-").isdigit() or (":" in text and not p.strip()) for p in parts
    )
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is not a layer range '4:8' or list '2,3,7' of integers")
    return text


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # huggingface_hub's shard-size units


def shard_size(text: str) -> str:
    """``--max-shard-size``: a number and a unit (KB, MB, GB, TB: what huggingface_hub's sharding accepts), e.g.
    ``2GB``; anything else is a usage error (exit 2) instead of a failure after the inputs were read."""
    value, unit = text.strip()[:-2].strip(), text.strip()[-2:].upper()
    try:
        ok = unit in _SIZE_UNITS and float(value) > 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size such as 500MB or 2GB (units: KB, MB, GB, TB)"
        )
    return text


def file_size(path: Any) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
