"""``hfhooks diff``, ``diff-info`` and ``apply``: extract, inspect and apply weight diffs (task vectors).

torch and the diff machinery are imported inside each ``run_*`` function, not here: ``hfhooks --help`` and
every ``--help`` must start in well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from hfhooks.cli.common import (
    add_common_flags,
    add_dry_run,
    emit,
    file_size,
    fmt_shape,
    layer_spec,
    limit,
    note,
    progress_enabled,
    shard_size,
    write_options,
)

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _layer_names(path: str, layers: str) -> list[str]:
    from hfhooks.io.checkpoints import Checkpoint, layer_map, parse_layers

    names = Checkpoint(path).keys()
    block_path, of = layer_map(names)
    if block_path is None:
        raise ValueError(f"{path}: no decoder layers found in the tensor names; use --names instead.")
    chosen = set(parse_layers(layers, 1 + max(i for i in of.values() if i is not None)))
    return [n for n in names if of[n] in chosen]


def _is_diff_file(path) -> bool:
    """Whether ``path`` is an hfhooks diff file (the only thing ``diff --overwrite`` may replace)."""
    from hfhooks.io.header import ArtifactError, read_header

    try:
        return read_header(path)[1].get("hfhooks.kind") == "diff"
    except (ArtifactError, OSError):
        return False


def check_dir_output(output: str, inputs: Sequence[str], overwrite: bool) -> None:
    """``-o`` of a checkpoint edit: never an input (use --in-place), inside one or holding one; an existing one
    only with --overwrite and only if an earlier hfhooks edit wrote it."""
    from hfhooks.io.edit import is_edited_checkpoint
    from hfhooks.io.paths import check_output

    check_output(
        output,
        inputs,
        overwrite=overwrite,
        same_kind=is_edited_checkpoint,
        kind="checkpoint directory",
        hint="To edit it in place, pass --in-place instead of -o.",
    )


def checkpoint_files(path: str, allow_pickle: bool = False) -> list[dict]:
    """``[{path, bytes}]`` of a checkpoint's weight files (what an edit reads)."""
    from hfhooks.io.checkpoints import Checkpoint

    ckpt = Checkpoint(path, allow_pickle=allow_pickle)
    return [{"path": str(f), "bytes": file_size(f)} for f in ckpt.files]


def dry_run_report(args, reads: list[dict], writes: list[dict], changed: list[str], plan: str) -> int:
    """Print (or emit as JSON) what a real run would read and write; nothing has been written."""
    result = {"dry_run": True, "reads": reads, "writes": writes, "tensors_changed": changed, "plan": plan}
    lines = ["dry run: nothing written", "would read:"]
    lines += [f"  {r['path']} ({r['bytes']:,} bytes)" for r in reads]
    lines.append("would write:")
    lines += [f"  {w['path']}" + (f" (~{w['bytes']:,} bytes)" if w.get("bytes") else "") for w in writes]
    lines.append(
        f"tensors changed: {len(changed)}"
        + (f" ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})" if changed else "")
    )
    lines.append(f"plan: {plan}")
    emit(args, result, lines)
    return 0


def run_diff(args: argparse.Namespace) -> int:
    import shutil

    import torch  # the diff is computed with torch; imported here so --help stays fast

    from hfhooks.core.names import match_name
    from hfhooks.diffs import WeightDiff
    from hfhooks.io.paths import check_output, temp_dir

    progress = progress_enabled(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    check_output(
        args.output,
        [args.base, args.tuned],
        overwrite=args.overwrite,
        same_kind=_is_diff_file,
        kind="diff file",
    )
    lora = (Path(args.tuned) / "adapter_config.json").is_file()
    names = list(args.names or [])
    if args.layers and not lora:  # --layers and --names together: the named tensors of those layers
        in_layers = _layer_names(args.base, args.layers)
        names = [n for n in in_layers if not names or any(match_name(p, n) for p in names)]
        if not names:
            raise ValueError(f"--names {' '.join(args.names)} selects no tensor of --layers {args.layers}.")
    if args.dry_run:
        return _diff_dry_run(args, lora, names, dtype)
    if lora:
        return _diff_lora(args, dtype)
    kwargs = dict(
        names=names or None,
        dtype=dtype,
        storage=args.storage,
        changed_only=args.changed_only,
        allow_pickle=args.allow_pickle,
        progress=progress,
    )
    if not args.quantize:
        diff = WeightDiff.between(args.base, args.tuned, out=args.output, **kwargs)
    else:  # stream the exact diff to a scratch file, then quantise it tensor by tensor into the output
        out = Path(args.output)
        # a locked, recognisable scratch directory next to the output: a killed run's is removed by the next
        with temp_dir(out) as tmp:
            try:
                exact = WeightDiff.between(args.base, args.tuned, out=tmp / "exact.safetensors", **kwargs)
                exact.quantize(args.quantize).save(out, progress=progress)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        diff = WeightDiff.load(out, lazy=True)
    return _diff_summary(args, diff, args.output)


def _diff_dry_run(args: argparse.Namespace, lora: bool, names: list[str], dtype) -> int:
    """``diff --dry-run``: every check of a real run, then the plan (files read, the output, its size)."""

    from hfhooks.diffs import WeightDiff

    if lora:
        reads = [
            {"path": str(f), "bytes": file_size(f)} for f in sorted(Path(args.tuned).iterdir()) if f.is_file()
        ]
        reads += checkpoint_files(args.base, args.allow_pickle)
        return dry_run_report(args, reads, [{"path": args.output}], [], "ΔW = s·B·A per LoRA module of TUNED")
    plan = WeightDiff.between(
        args.base,
        args.tuned,
        names=names or None,
        dtype=dtype,
        storage=args.storage,
        allow_pickle=args.allow_pickle,
        dry_run=True,
    )
    common = plan.metadata["planned"]
    estimate = plan.metadata["planned_bytes"]
    reads = checkpoint_files(args.base, args.allow_pickle) + checkpoint_files(args.tuned, args.allow_pickle)
    how = (
        f"Δ = TUNED − BASE for {len(common)} tensors, {args.storage} storage"
        + (f", quantised to {args.quantize} levels" if args.quantize else "")
        + (", unchanged tensors left out" if args.changed_only else "")
    )
    return dry_run_report(args, reads, [{"path": args.output, "bytes": estimate}], common, how)


def _diff_lora(args: argparse.Namespace, dtype) -> int:
    """``diff`` of a LoRA adapter directory: ΔW = s·B·A per module, narrowed and stored as asked."""
    from hfhooks.diffs import WeightDiff

    diff = WeightDiff.from_lora(args.tuned, base=args.base, dtype=dtype)
    if args.changed_only:
        diff = diff.changed_only()
    if args.layers:
        diff = diff.restrict(layers=args.layers)
    if args.names:
        diff = diff.restrict(names=args.names)
    diff = diff.quantize(args.quantize) if args.quantize else diff
    if args.storage != "dense":  # a LoRA Δ is computed dense: store it as asked
        diff = diff.to_sparse() if args.storage == "sparse" else diff.to_auto()
    diff.save(args.output)
    return _diff_summary(args, WeightDiff.load(args.output, lazy=True), args.output)


def _diff_summary(args: argparse.Namespace, diff, path) -> int:
    kinds = sorted({e.storage for e in diff.entries.values()})
    # stored tensors that did not change, and those --changed-only left out of the file
    unchanged = sorted(set(diff.unchanged) | set(diff.metadata.get("unchanged", [])))
    result = {
        "output": str(path),
        "tensors": len(diff),
        "storage": kinds,
        "bytes": os.path.getsize(path),
        "exact": diff.exact,
        "changed": len(diff.changed),
        "unchanged": len(unchanged),
    }
    emit(
        args,
        result,
        f"wrote {path}: {len(diff)} tensors ({'/'.join(kinds) or 'none'}), {result['bytes']:,} bytes, "
        f"exact={json.dumps(diff.exact)}, changed={len(diff.changed)}, unchanged={len(unchanged)}",
    )
    return 0


def run_diff_info(args: argparse.Namespace) -> int:
    from hfhooks.diffs import WeightDiff  # imports torch: only when the command runs

    diff = WeightDiff.load(args.file, lazy=args.lazy)
    rows = diff.summary()
    result = {
        "tensors": rows,
        "exact": diff.exact,
        "exact_inverse": diff.exact_inverse,
        "metadata": {k: v for k, v in diff.metadata.items() if k != "path"},
    }
    shown = rows if args.limit is None else rows[: args.limit]
    width = max([len("tensor")] + [len(r["name"]) for r in shown])
    lines = [
        f"{'tensor':<{width}}  {'shape':>12}  {'storage':<9}  {'dtype':<8}  {'exact':<5}  {'bytes':>12}  max|Δ|"
    ]
    for r in shown:
        storage = r["storage"] + (f"/{r['levels']}" if r["levels"] else "")
        lines.append(
            f"{r['name']:<{width}}  {fmt_shape(r['shape']):>12}  {storage:<9}  {r['dtype']:<8}  "
            f"{json.dumps(r['exact']):<5}  {r['bytes']:>12,}  {r['max_abs']:.3g}"
        )
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more tensors (use --limit 0 for all)")
    lines.append(
        f"{'TOTAL':<{width}}  {len(rows):>10} t.  {'':<9}  {'':<8}  {json.dumps(diff.exact):<5}  "
        f"{sum(r['bytes'] for r in rows):>12,}"
    )
    lines.append("\nmetadata:")
    for key in ("base", "target", "scale", "exact", "exact_inverse", "ops", "unchanged", "dropped"):
        if key in diff.metadata:
            text = json.dumps(diff.metadata[key])
            lines.append(f"  {key}: {text if len(text) < 200 else text[:197] + '...'}")
    emit(args, result, lines)
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from hfhooks.diffs import WeightDiff  # imports torch: only when the command runs

    if not args.in_place:
        check_dir_output(args.output, [args.diff, args.target], args.overwrite)
    diff = WeightDiff.load(args.diff, lazy=True)
    out = diff.apply(
        args.target,
        scale=args.scale,
        out=args.target if args.in_place else args.output,
        check_base=not args.no_check_base,
        **write_options(args),
    )
    if args.dry_run:
        reads = [
            {"path": args.diff, "bytes": file_size(args.diff)},
            *checkpoint_files(args.target, args.allow_pickle),
        ]
        size = sum(r["bytes"] for r in reads[1:])
        plan = (
            f"TARGET + {args.scale:g}·Δ for {len(diff)} tensors, the others copied bytewise; "
            + (
                "each tensor's base fingerprint checked while writing"
                if not args.no_check_base
                else "base not checked"
            )
            + ("; TARGET replaced atomically" if args.in_place else "")
        )
        return dry_run_report(args, reads, [{"path": str(out), "bytes": size}], sorted(diff.entries), plan)
    result = {
        "diff": args.diff,
        "tensors": len(diff),
        "scale": args.scale,
        "target": args.target,
        "output": str(out),
    }
    emit(
        args,
        result,
        f"applied {args.diff} ({len(diff)} tensors, scale {args.scale:g}) to {args.target} -> {out}",
    )
    return 0


def add_write_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output directory (only one an earlier hfhooks edit wrote)",
    )
    p.add_argument(
        "--max-shard-size",
        type=shard_size,
        help="re-shard the output (e.g. 2GB); default: the source's layout",
    )
    p.add_argument("--fsync", action="store_true", help="flush to stable storage before the final rename")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (weights_only=True)")
    add_dry_run(p)
    add_common_flags(p)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    diff = sub.add_parser(
        "diff",
        help="extract a weight diff (task vector) between two checkpoints",
        description="Write Δ = TUNED − BASE as an hfhooks diff file (safetensors), streaming tensor by tensor: "
        "memory stays bounded whatever the model size. TUNED may also be a PEFT LoRA adapter directory "
        "(ΔW = s·B·A per module). The file records the base's fingerprint, so applying it to other weights is "
        "refused, and whether BASE + Δ reproduces TUNED bit for bit.",
        epilog="Example: hfhooks diff base/ tuned/ -o task.safetensors --changed-only --storage auto",
    )
    diff.add_argument("base", help="the base checkpoint directory (or .safetensors file)")
    diff.add_argument("tuned", help="the tuned checkpoint directory, or a LoRA adapter directory")
    diff.add_argument("-o", "--output", required=True, help="the diff file to write (.safetensors)")
    diff.add_argument("--layers", type=layer_spec, help="only these decoder layers, e.g. '0:4' or '0,1,5'")
    diff.add_argument("--names", nargs="+", help="only these tensors (names, globs, or re:REGEX)")
    diff.add_argument("--changed-only", action="store_true", help="leave out tensors that did not change")
    diff.add_argument(
        "--storage",
        choices=["dense", "sparse", "auto"],
        default="dense",
        help="dense Δ, masked-sparse (mask of changed coordinates + values), or per tensor the smaller one",
    )
    diff.add_argument(
        "--dtype",
        choices=FLOAT_DTYPES,
        default=None,
        help="storage dtype of Δ (default: the weights' own dtype, plus a sparse exact correction)",
    )
    diff.add_argument(
        "--quantize", type=_levels, metavar="LEVELS", help="per-tensor min–max quantisation (2–256 levels)"
    )
    diff.add_argument(
        "--allow-pickle", action="store_true", help="accept pytorch_model.bin (weights_only=True)"
    )
    diff.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (only an hfhooks diff file)"
    )
    add_dry_run(diff)
    add_common_flags(diff)
    diff.set_defaults(func=run_diff)

    info = sub.add_parser(
        "diff-info",
        help="per-tensor table and provenance of a diff file",
        description="Print a per-tensor table (shape, storage, dtype, exactness, size, max |Δ|) and the diff's "
        "provenance (base / target fingerprints, scale, the operations that made it). Verifies the file first.",
        epilog="Example: hfhooks diff-info task.safetensors --limit 20",
    )
    info.add_argument("file", help="a diff file written by hfhooks")
    info.add_argument("--limit", type=limit, default=None, help="at most N rows (0 = all)")
    info.add_argument("--lazy", action="store_true", help="verify tensors as they are read (for huge diffs)")
    add_common_flags(info, quiet=False)
    info.set_defaults(func=run_diff_info)

    apply = sub.add_parser(
        "apply",
        help="apply a diff to a checkpoint directory (streaming, atomic)",
        description="Write TARGET + SCALE·Δ to a new checkpoint directory, shard by shard with bounded memory; the "
        "output appears only when complete. The target must be the diff's base (checked tensor by tensor) unless "
        "--no-check-base.",
        epilog="Example: hfhooks apply task.safetensors base/ -o edited/ --scale 0.5",
    )
    apply.add_argument("diff", help="a diff file written by hfhooks")
    apply.add_argument("target", help="the checkpoint directory to apply it to")
    where = apply.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output", help="the output checkpoint directory")
    where.add_argument("--in-place", action="store_true", help="replace TARGET atomically (other files kept)")
    apply.add_argument(
        "--scale", type=float, default=1.0, help="multiply Δ by this (default 1; -1 removes it)"
    )
    apply.add_argument(
        "--no-check-base", action="store_true", help="apply even if TARGET is not the diff's base"
    )
    add_write_options(apply)
    apply.set_defaults(func=run_apply)


def _levels(text: str) -> int:
    """``--quantize LEVELS``: an integer from 2 to 256 (a bad value is a usage error, exit 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 2 <= n <= 256:
        raise argparse.ArgumentTypeError(f"{n} levels: use 2 to 256")
    return n


__all__ = ["add_parsers", "check_dir_output", "checkpoint_files", "dry_run_report", "note"]
