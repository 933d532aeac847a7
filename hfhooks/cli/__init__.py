"""The ``hfhooks`` command: inspect and edit saved artifacts and checkpoints without writing Python.

One module per command group (``masks``: ``mask info``; ``diffs``: ``diff``, ``diff-info``, ``apply``;
``restore``: ``restore``, ``search-restore``; ``merge``: ``merge``) registers its parsers; ``common`` holds the conventions every
command follows (``--json``, ``-q``, exit codes, rank-0 progress, optional-dependency checks). The work itself
is done by the library's functions, so the CLI and the Python API cannot disagree.

Start-up: building the parser imports only argparse and these modules; each command imports torch and the rest
inside its ``run_*`` function, so ``hfhooks --help`` and every ``--help`` start in well under a second, and
``hfhooks mask info`` never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from hfhooks._version import __version__
from hfhooks.cli import diffs, masks, merge, restore
from hfhooks.cli.common import (
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    MissingDependencyError,
)

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="hfhooks",
        description="Inspect hfhooks artifacts (masks, diffs) and edit saved checkpoints. Every command takes "
        "--json (one JSON document on stdout); apply, restore, merge and diff take --dry-run.",
        epilog="Run 'hfhooks COMMAND --help' for a command's options.\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hfhooks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    masks.add_parsers(sub)
    diffs.add_parsers(sub)
    restore.add_parsers(sub)
    merge.add_parsers(sub)
    return parser


def _is_work_error(e: BaseException) -> bool:
    """Errors of the work, reported in one line with exit 1: bad or refused inputs and outputs, I/O errors,
    and every hfhooks exception (whatever its base class)."""
    if isinstance(
        e, ValueError | KeyError | IndexError | OSError | NotImplementedError | MissingDependencyError
    ):
        return True
    return type(e).__module__.startswith("hfhooks.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hfhooks`` console script. Returns the exit code: 0 ok, 1 error in the work,
    2 usage error (argparse exits with 2 itself), 130 interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    # DeepSpeed, when installed, prints its accelerator choice to stdout at its first import (accelerate imports
    # it to unwrap models), which would corrupt --json output. The CLI never runs DeepSpeed: name an accelerator
    # for the command, and put the environment back after it (main() may run inside someone's process).
    named = "DS_ACCELERATOR" in os.environ
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        # an interrupted edit leaves its inputs intact and nothing under the output name: say so in one line
        print("hfhooks: interrupted (inputs untouched, no output written)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if not _is_work_error(e):
            raise  # a bug: keep the traceback
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"hfhooks: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if not named:
            os.environ.pop("DS_ACCELERATOR", None)


if __name__ == "__main__":
    raise SystemExit(main())
