"""``hfhooks mask info``: a mask file's per-tensor density table and metadata — without importing torch.

The mask file is read and its digest verified by :mod:`hfhooks.io.header` (plain Python + numpy), and bits are
counted with ``numpy.unpackbits``: importing torch alone would cost ~1.5 s, several times the whole command.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from hfhooks.cli.common import add_common_flags, emit, fmt_shape, limit

_AXIS = {"row": 0, "column": 1}  # the axis a row/column mask's bits run along (as hfhooks.masks.mask)
_KNOWN_SEMANTICS = ("1=trainable", "1=dedicated")


def mask_counts(path: str) -> tuple[list[tuple[str, str, list[int], int, int]], dict[str, Any]]:
    """``([(name, granularity, shape, kept, total)], metadata)`` of a mask file, in the saved order, after the
    checks :meth:`hfhooks.ParamMask.load` makes (digest, metadata consistent with the stored bits)."""
    import numpy as np  # ~0.1 s; only this command needs it

    from hfhooks.io.header import ArtifactError, read_verified

    data, entries, meta = read_verified(path, "mask")
    if meta.get("semantics") not in _KNOWN_SEMANTICS:
        raise ArtifactError(
            f"{path}: mask semantics {meta.get('semantics')!r}; this hfhooks reads {_KNOWN_SEMANTICS}."
        )
    info = meta.pop("tensors", None)
    if not isinstance(info, dict) or set(info) != set(entries):
        raise ArtifactError(f"{path}: 'hfhooks.tensors' metadata does not list exactly the stored tensors.")
    rows = []
    for name, row in info.items():
        shape, gran = row.get("shape"), row.get("granularity")
        if (
            gran not in ("element", *_AXIS)
            or not isinstance(shape, list)
            or (gran != "element" and len(shape) < 2)
        ):
            raise ArtifactError(f"{path}: tensor {name!r}: invalid granularity {gran!r} or shape {shape!r}")
        length = math.prod(shape) if gran == "element" else shape[_AXIS[gran]]
        bits = np.unpackbits(np.frombuffer(data[name], dtype=np.uint8), bitorder="big")
        if entries[name].dtype != "U8" or bits.size < length or bits[length:].any():
            raise ArtifactError(f"{path}: tensor {name!r}: wrong byte count or non-zero padding bits")
        ones = int(np.count_nonzero(bits[:length]))
        if row.get("ones") != ones:
            raise ArtifactError(
                f"{path}: tensor {name!r}: holds {ones} ones but its metadata says {row.get('ones')!r}"
            )
        total = math.prod(shape)
        kept = ones if gran == "element" else (ones * (total // length) if length else 0)
        rows.append((name, gran, shape, kept, total))
    return rows, meta


def run_info(args: argparse.Namespace) -> int:
    rows, meta = mask_counts(args.file)
    if args.sort == "density":
        rows.sort(key=lambda r: r[3] / r[4] if r[4] else 0.0, reverse=True)
    elif args.sort == "name":
        rows.sort()
    kept, total = sum(r[3] for r in rows), sum(r[4] for r in rows)
    density = kept / total if total else 0.0
    result = {
        "file": args.file,
        "tensors": {n: {"granularity": g, "shape": s, "kept": k, "total": t} for n, g, s, k, t in rows},
        "kept": kept,
        "total": total,
        "density": density,
        "metadata": meta,
    }
    shown = rows if args.limit is None else rows[: args.limit]
    width = max([len("parameter")] + [len(r[0]) for r in shown])
    lines = [
        f"{'parameter':<{width}}  {'granularity':<11}  {'shape':>12}  {'kept':>12}  {'total':>12}  density"
    ]
    for name, gran, shape, k, t in shown:
        lines.append(
            f"{name:<{width}}  {gran:<11}  {fmt_shape(shape):>12}  {k:>12,}  {t:>12,}  {k / t if t else 0:7.4f}"
        )
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more tensors (use --limit 0 for all)")
    lines.append(
        f"{'TOTAL':<{width}}  {'':<11}  {len(rows):>9} t.  {kept:>12,}  {total:>12,}  {density:7.4f}"
    )
    lines.append("\nmetadata:")
    for key, value in sorted(meta.items()):
        lines.append(f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}")
    emit(args, result, lines)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    mask = sub.add_parser(
        "mask", help="inspect saved parameter masks", description="Inspect saved parameter masks."
    )
    msub = mask.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = msub.add_parser(
        "info",
        help="per-tensor density table and metadata of a mask file",
        description="Print a per-tensor density table (granularity, shape, kept/total) and the file's metadata "
        "(score, selection, model fingerprint, hfhooks version). Verifies the file's integrity first.",
        epilog="Example: hfhooks mask info mask.safetensors --sort density --limit 10",
    )
    info.add_argument("file", help="a .safetensors mask written by hfhooks (ParamMask.save)")
    info.add_argument(
        "--sort", choices=["file", "name", "density"], default="file", help="row order (default: file order)"
    )
    info.add_argument("--limit", type=limit, default=None, help="show at most N tensors (0 = all)")
    add_common_flags(info, quiet=False)
    info.set_defaults(func=run_info)
