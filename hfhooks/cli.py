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
    from hfhooks.masks.mask import ParamMask

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


# -- diffs -----------------------------------------------------------------------------------------------------
def _dtype(name: str):
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise argparse.ArgumentTypeError(f"{name!r} is not a floating-point dtype (e.g. float32, float64)")
    return dtype


def _layer_names(path: str, layers: str) -> list[str]:
    from hfhooks.io.checkpoints import Checkpoint, layer_map, parse_layers

    names = Checkpoint(path).keys()
    block_path, of = layer_map(names)
    if block_path is None:
        raise ValueError(f"{path}: no decoder layers found in the tensor names; use --names instead.")
    chosen = set(parse_layers(layers, 1 + max(i for i in of.values() if i is not None)))
    return [n for n in names if of[n] in chosen]


def _diff(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from hfhooks.diffs import WeightDiff
    from hfhooks.io.paths import temp_dir

    progress = not args.quiet
    _check_diff_output(args.output, [args.base, args.tuned], args.overwrite)
    if (Path(args.tuned) / "adapter_config.json").is_file():
        diff = WeightDiff.from_lora(args.tuned, base=args.base, dtype=args.dtype)
        if args.changed_only:
            diff = diff.changed_only()
        if args.layers:
            diff = diff.restrict(layers=args.layers)
        if args.names:
            diff = diff.restrict(names=args.names)
        diff = diff.quantize(args.quantize) if args.quantize else diff
        diff = diff.to_sparse() if args.storage == "sparse" else diff
        diff.save(args.output)
        _print_diff_summary(WeightDiff.load(args.output, lazy=True), args.output)
        return 0
    names = list(args.names or [])
    if args.layers:
        names = names + [n for n in _layer_names(args.base, args.layers) if n not in names]
    kwargs = dict(
        names=names or None,
        dtype=args.dtype,
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
    _print_diff_summary(diff, args.output)
    return 0


def _is_diff_file(path) -> bool:
    """Whether ``path`` is an hfhooks diff file (the only thing ``diff --overwrite`` may replace)."""
    from hfhooks.io.checkpoints import CheckpointError
    from hfhooks.io.safetensors import read_safetensors_header

    try:
        return read_safetensors_header(path)[1].get("hfhooks.kind") == "diff"
    except (CheckpointError, OSError):
        return False


def _check_diff_output(output: str, inputs: Sequence[str], overwrite: bool) -> None:
    from hfhooks.io.paths import check_output

    check_output(output, inputs, overwrite=overwrite, same_kind=_is_diff_file, kind="diff file")


def _print_diff_summary(diff, path) -> None:
    import os

    kinds = sorted({e.storage for e in diff.entries.values()})
    print(
        f"wrote {path}: {len(diff)} tensors ({'/'.join(kinds) or 'none'}), {os.path.getsize(path):,} bytes, "
        f"exact={json.dumps(diff.exact)}, changed={len(diff.changed)}, unchanged={len(diff.metadata.get('unchanged', []))}"
    )


def _diff_info(args: argparse.Namespace) -> int:
    from hfhooks.diffs import WeightDiff

    diff = WeightDiff.load(args.file, lazy=args.lazy)
    rows = diff.summary()
    if args.json:
        json.dump(
            {
                "tensors": rows,
                "exact": diff.exact,
                "exact_inverse": diff.exact_inverse,
                "metadata": {k: v for k, v in diff.metadata.items() if k != "path"},
            },
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    shown = rows if args.limit is None else rows[: args.limit]
    width = max([len("tensor")] + [len(r["name"]) for r in shown])
    print(
        f"{'tensor':<{width}}  {'shape':>12}  {'storage':<9}  {'dtype':<8}  {'exact':<5}  {'bytes':>12}  max|Δ|"
    )
    for r in shown:
        storage = r["storage"] + (f"/{r['levels']}" if r["levels"] else "")
        print(
            f"{r['name']:<{width}}  {_fmt_shape(r['shape']):>12}  {storage:<9}  {r['dtype']:<8}  "
            f"{json.dumps(r['exact']):<5}  {r['bytes']:>12,}  {r['max_abs']:.3g}"
        )
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more tensors (use --limit 0 for all)")
    print(
        f"{'TOTAL':<{width}}  {len(rows):>10} t.  {'':<9}  {'':<8}  {json.dumps(diff.exact):<5}  {sum(r['bytes'] for r in rows):>12,}"
    )
    print("\nmetadata:")
    for key in ("base", "target", "scale", "exact", "exact_inverse", "ops", "unchanged", "dropped"):
        if key in diff.metadata:
            value = diff.metadata[key]
            text = json.dumps(value)
            print(f"  {key}: {text if len(text) < 200 else text[:197] + '...'}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from hfhooks.diffs import WeightDiff

    if not args.in_place:
        _check_dir_output(args.output, [args.diff, args.target], args.overwrite)
    diff = WeightDiff.load(args.diff, lazy=True)
    out = diff.apply(
        args.target,
        scale=args.scale,
        out=args.target if args.in_place else args.output,
        check_base=not args.no_check_base,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        fsync=args.fsync,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    print(f"applied {args.diff} ({len(diff)} tensors, scale {args.scale:g}) to {args.target} -> {out}")
    return 0


def _add_diff(sub: argparse._SubParsersAction) -> None:
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
    diff.add_argument("--layers", help="only these decoder layers, e.g. '0:4' or '0,1,5'")
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
        type=_dtype,
        default=None,
        help="storage dtype of Δ (default float32; float64 for bit-exact fp32)",
    )
    diff.add_argument(
        "--quantize", type=int, metavar="LEVELS", help="per-tensor min–max quantisation (2–256 levels)"
    )
    diff.add_argument(
        "--allow-pickle", action="store_true", help="accept pytorch_model.bin (weights_only=True)"
    )
    diff.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (only an hfhooks diff file)"
    )
    diff.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    diff.set_defaults(func=_diff)

    info = sub.add_parser(
        "diff-info",
        help="per-tensor table and provenance of a diff file",
        description="Print a per-tensor table (shape, storage, dtype, exactness, size, max |Δ|) and the diff's "
        "provenance (base / target fingerprints, scale, the operations that made it). Verifies the file first.",
    )
    info.add_argument("file", help="a diff file written by hfhooks")
    info.add_argument(
        "--limit",
        type=lambda s: None if int(s) == 0 else int(s),
        default=None,
        help="at most N rows (0 = all)",
    )
    info.add_argument("--lazy", action="store_true", help="verify tensors as they are read (for huge diffs)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_diff_info)

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
    _add_write_options(apply)
    apply.set_defaults(func=_apply)


def _check_dir_output(output: str, inputs: Sequence[str], overwrite: bool) -> None:
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


def _add_write_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output directory (only one an earlier hfhooks edit wrote)",
    )
    p.add_argument("--max-shard-size", help="re-shard the output (e.g. 2GB); default: the source's layout")
    p.add_argument("--fsync", action="store_true", help="flush to stable storage before the final rename")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (weights_only=True)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


# -- restoration -----------------------------------------------------------------------------------------------
def _restore(args: argparse.Namespace) -> int:
    from hfhooks.restoration.restore import restore_layers

    if not args.in_place:
        _check_dir_output(args.output, [args.target, args.reference], args.overwrite)
    report = restore_layers(
        args.target,
        args.reference,
        args.layers,
        embeddings=args.embeddings,
        final_norm=args.final_norm,
        lm_head=args.lm_head,
        include=args.include or (),
        adapters=args.adapters,
        out=args.target if args.in_place else args.output,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        fsync=args.fsync,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    what = f"{len(report.restored)} tensors" + (
        f", {len(report.adapters)} adapters" if report.adapters else ""
    )
    print(
        f"restored layers {_ranges(report.layers)} of {args.target} from {args.reference} ({what}) -> {report.path}"
    )
    return 0


def _ranges(layers: Sequence[int]) -> str:
    if layers and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"[{layers[0]}, {layers[-1] + 1})"
    return ",".join(map(str, layers))


def _add_restore_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", action="store_true", help="also restore the input embeddings")
    p.add_argument("--final-norm", action="store_true", help="also restore the final norm")
    p.add_argument(
        "--lm-head", action="store_true", help="also restore the LM head (tied: with --embeddings)"
    )


def _add_restore(sub: argparse._SubParsersAction) -> None:
    restore = sub.add_parser(
        "restore",
        help="restore decoder layers of a checkpoint to reference weights (streaming, atomic)",
        description="Selective layer restoration: copy decoder layers [s, e) of REFERENCE (the pre-trained "
        "model) into TARGET (the post-trained one) and write the result. Embeddings, final norm and LM head stay "
        "post-trained unless asked; tied embeddings are never overwritten by accident. For a PEFT adapter "
        "directory, the adapters of those layers are zeroed (or dropped). Memory stays bounded; the output "
        "appears only when complete.",
        epilog="Example: hfhooks restore post/ base/ --layers 4:8 -o restored/",
    )
    restore.add_argument("target", help="the post-trained checkpoint directory (or adapter directory)")
    restore.add_argument("reference", help="the checkpoint to restore from (pre-trained)")
    restore.add_argument(
        "--layers", required=True, help="decoder layers, e.g. '4:8' (end excluded) or '2,3,7'"
    )
    where = restore.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output", help="the output checkpoint directory")
    where.add_argument("--in-place", action="store_true", help="replace TARGET atomically (other files kept)")
    _add_restore_flags(restore)
    restore.add_argument("--include", nargs="+", help="extra tensors to restore (names, globs, re:REGEX)")
    restore.add_argument(
        "--adapters", choices=["zero", "drop"], default="zero", help="LoRA adapters in range"
    )
    _add_write_options(restore)
    restore.set_defaults(func=_restore)


def _load_prompts(args: argparse.Namespace, tokenizer):
    from hfhooks.restoration.search import CRCPrompt, crc_prompts

    if not args.prompts:
        if tokenizer is None:
            raise ValueError(
                f"{args.post} has no tokenizer; pass --prompts FILE.jsonl with input_ids and valid ids."
            )
        return crc_prompts(
            tokenizer,
            n=args.n,
            classes=args.classes.split(","),
            answer_prefix=args.answer_prefix,
            chat=args.chat,
            seed=args.seed,
        )
    prompts = []
    with open(args.prompts, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if "input_ids" in row:
                    ids, valid = row["input_ids"], row["valid"]
                else:
                    if tokenizer is None:
                        raise ValueError("text prompts need a tokenizer next to POST")
                    ids = tokenizer(row["prompt"])["input_ids"]
                    valid = [
                        tok[0]
                        for c in row["valid"]
                        if len(
                            tok := tokenizer(args.answer_prefix + c, add_special_tokens=False)["input_ids"]
                        )
                        == 1
                    ]
                prompts.append(
                    CRCPrompt(tuple(map(int, ids)), tuple(map(int, valid)), str(row.get("label", "")))
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f'{args.prompts}:{i}: expected {{"input_ids": [...], "valid": [...]}} or '
                    f'{{"prompt": "...", "valid": ["a", ...]}}: {e}'
                ) from None
    return prompts


def _search_restore(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    import transformers

    from hfhooks.io.paths import check_output
    from hfhooks.restoration.restore import restore_layers
    from hfhooks.restoration.search import search_restoration

    inputs = [args.post, args.base, args.prompts]
    if args.restore_to:
        _check_dir_output(args.restore_to, inputs, args.overwrite)
    for side in (args.csv, args.plot):  # side outputs: never an input or inside one, never silently replaced
        if side:
            check_output(side, inputs, overwrite=args.overwrite, same_kind=Path.is_file, kind="file")
    transformers.utils.logging.set_verbosity_error()
    # from_pretrained takes `dtype` from transformers 4.56 on; older releases only know `torch_dtype`
    modern = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit()) >= (4, 56)
    load = {"local_files_only": True, "dtype" if modern else "torch_dtype": getattr(torch, args.dtype)}
    post = transformers.AutoModelForCausalLM.from_pretrained(args.post, **load)
    base = transformers.AutoModelForCausalLM.from_pretrained(args.base, **load)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.post, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    prompts = _load_prompts(args, tokenizer)
    result = search_restoration(
        post,
        base,
        prompts,
        threshold=args.threshold,
        soup=args.soup,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    best = result.best
    if args.json:
        json.dump(
            {"best": best, "best_soup": result.best_soup, "rows": result.rows, "seconds": result.seconds},
            sys.stdout,
            indent=2,
        )
        print()
    else:
        print(result.table(top=args.top))
        print(
            f"\n{len(result.ranges())} ranges, {len(result.soups())} soups, {len(prompts)} prompts in "
            f"{result.seconds:.1f}s. Rule: validity ≥ {args.threshold:g} × post ({result.post['validity']:.3f}), "
            "then the highest diversity."
        )
        if best["kind"] == "post":
            print("selected: no restoration (no range keeps validity while adding diversity)")
        else:
            print(
                f"selected: layers [{best['start']}, {best['end']}) — validity {best['validity']:.3f}, diversity "
                f"{best['diversity']:.3f} nats (post-trained: {result.post['validity']:.3f}, {result.post['diversity']:.3f})"
            )
        if result.best_soup:
            s = result.best_soup
            print(
                f"best soup: α={s['alpha']:.2f} — validity {s['validity']:.3f}, diversity {s['diversity']:.3f}"
            )
    if args.csv:
        result.to_csv(args.csv)
    if args.plot:
        result.plot(args.plot)
    if args.restore_to and best["kind"] == "range":
        report = restore_layers(
            args.post,
            args.base,
            range(best["start"], best["end"]),
            out=args.restore_to,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
        print(f"wrote the restored model to {report.path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _add_search(sub: argparse._SubParsersAction) -> None:
    search = sub.add_parser(
        "search-restore",
        help="find which layers to restore (CRC proxy over every contiguous range)",
        description="Score every contiguous range [s, e) of restored layers with the Constrained-Random-"
        "Character proxy (validity = probability mass on the allowed characters; diversity = entropy over "
        "them, renormalised), one forward pass per prompt batch, no generation. Select the range with the "
        "highest diversity among those keeping validity ≥ THRESHOLD × the post-trained model's, and compare "
        "with interpolating the weights (soup). Both checkpoints are loaded in memory.",
        epilog="Example: hfhooks search-restore post/ base/ --plot tradeoff.png --restore-to restored/",
    )
    search.add_argument("post", help="the post-trained checkpoint directory (with its tokenizer)")
    search.add_argument("base", help="the pre-trained checkpoint directory")
    search.add_argument("--prompts", help="JSONL prompts: {input_ids, valid} or {prompt, valid: [chars]}")
    search.add_argument("--n", type=int, default=20, help="generated prompts per class (default 20)")
    search.add_argument("--classes", default="letters,digits", help="prompt classes (or literal alphabets)")
    search.add_argument("--answer-prefix", default=" ", help="text before the answer character (default ' ')")
    search.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--threshold", type=float, default=0.9, help="validity floor, × post-trained (0.9)")
    search.add_argument(
        "--soup", type=int, default=21, help="interpolation points for the baseline (0 = none)"
    )
    search.add_argument("--batch-size", type=int, default=64)
    search.add_argument("--dtype", default="float32", help="dtype to load the models in")
    search.add_argument("--top", type=int, default=12, help="table rows to print")
    search.add_argument("--csv", help="write every row to this CSV file")
    search.add_argument("--plot", help="write the validity/diversity plot to this PNG")
    search.add_argument("--restore-to", help="write POST with the selected range restored to this directory")
    search.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --restore-to directory (one hfhooks wrote), --csv or --plot file",
    )
    search.add_argument("--json", action="store_true", help="machine-readable output")
    search.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    search.set_defaults(func=_search_restore)


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
    _add_diff(sub)
    _add_restore(sub)
    _add_search(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hfhooks`` console script. Returns the exit code."""
    from hfhooks.io.artifacts import ArtifactError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # an interrupted edit leaves its inputs intact and nothing under the output name: say so in one line
        print("hfhooks: interrupted (inputs untouched, no output written)", file=sys.stderr)
        return 130
    except (ArtifactError, ValueError, KeyError, IndexError, OSError, NotImplementedError) as e:
        # user errors (bad files, wrong base, unknown names, existing outputs): one clean line, exit 2
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"hfhooks: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
