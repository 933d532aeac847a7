"""The ``hfhooks`` command: inspect and edit saved artifacts and checkpoints without writing Python.

Each subcommand group lives in a small ``_add_<group>`` function that registers its parsers; the work itself
is done by the library's pure functions, so the CLI and the Python API can never disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hfhooks._version import __version__

__all__ = ["main"]


def _fmt_shape(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape) or "scalar"


def _mask_info(args: argparse.Namespace) -> int:
    from hfhooks.masks import ParamMask

    mask = ParamMask.load(args.file)
    counts = mask.counts()
    rows = [(n, mask.granularity(n), _fmt_shape(mask.shape(n)), k, t) for n, (k, t) in counts.items()]
    if args.sort == "density":
        rows.sort(key=lambda r: r[3] / r[4] if r[4] else 0.0, reverse=True)
    elif args.sort == "name":
        rows.sort()
    if args.json:
        json.dump(
            {
                "tensors": {
                    n: {"granularity": g, "shape": list(mask.shape(n)), "kept": k, "total": t}
                    for n, g, _, k, t in rows
                },
                "density": mask.density(),
                "metadata": mask.metadata,
            },
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    shown = rows if args.limit is None else rows[: args.limit]
    width = max([len("parameter")] + [len(r[0]) for r in shown])
    print(f"{'parameter':<{width}}  {'granularity':<11}  {'shape':>12}  {'kept':>12}  {'total':>12}  density")
    for name, gran, shape, kept, total in shown:
        print(
            f"{name:<{width}}  {gran:<11}  {shape:>12}  {kept:>12,}  {total:>12,}  {kept / total if total else 0:7.4f}"
        )
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more tensors (use --limit 0 for all)")
    kept = sum(r[3] for r in rows)
    total = sum(r[4] for r in rows)
    print(
        f"{'TOTAL':<{width}}  {'':<11}  {len(rows):>9} t.  {kept:>12,}  {total:>12,}  {mask.density():7.4f}"
    )
    print("\nmetadata:")
    for key, value in sorted(mask.metadata.items()):
        print(f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}")
    return 0


def _add_mask(sub: argparse._SubParsersAction) -> None:
    mask = sub.add_parser(
        "mask", help="inspect saved parameter masks", description="Inspect saved parameter masks."
    )
    msub = mask.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = msub.add_parser(
        "info",
        help="per-tensor density table and metadata of a mask file",
        description="Print a per-tensor density table (granularity, shape, kept/total) and the file's metadata "
        "(score, selection, model fingerprint, hfhooks version). Verifies the file's integrity first.",
    )
    info.add_argument("file", help="a .safetensors mask written by hfhooks (ParamMask.save)")
    info.add_argument(
        "--sort", choices=["file", "name", "density"], default="file", help="row order (default: file order)"
    )
    info.add_argument(
        "--limit",
        type=lambda s: None if int(s) == 0 else int(s),
        default=None,
        help="show at most N tensors (0 = all)",
    )
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_mask_info)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="hfhooks",
        description="Inspect hfhooks artifacts (masks, diffs) and edit saved checkpoints.",
        epilog="Run 'hfhooks COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"hfhooks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_mask(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hfhooks`` console script. Returns the exit code."""
    from hfhooks.artifacts import ArtifactError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ArtifactError as e:
        print(f"hfhooks: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
