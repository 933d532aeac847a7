"""``hfhooks restore`` and ``search-restore``: selective layer restoration of saved checkpoints.

torch, transformers and the restoration code are imported inside the ``run_*`` functions, not here: they take
seconds to import, and ``hfhooks --help`` must start in well under a second.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from hfhooks.cli.common import (
    add_common_flags,
    emit,
    layer_spec,
    note,
    progress_enabled,
    require,
    write_options,
)
from hfhooks.cli.diffs import (
    FLOAT_DTYPES,
    add_write_options,
    check_dir_output,
    checkpoint_files,
    dry_run_report,
)


def run_restore(args: argparse.Namespace) -> int:
    from hfhooks.restoration.restore import restore_layers  # imports torch: only when the command runs

    if not args.in_place:
        check_dir_output(args.output, [args.target, args.reference], args.overwrite)
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
        **write_options(args),
    )
    if args.dry_run:
        target = checkpoint_files(args.target, args.allow_pickle)
        reads = target + checkpoint_files(args.reference, args.allow_pickle)
        changed = list(report.restored) + [f"{m} (adapter {how})" for m, how in report.adapters.items()]
        plan = (
            f"layers {ranges(report.layers)} of TARGET set to REFERENCE's weights, the other tensors copied bytewise"
            + ("; TARGET replaced atomically" if args.in_place else "")
        )
        writes = [{"path": str(report.path), "bytes": sum(r["bytes"] for r in target)}]
        return dry_run_report(args, reads, writes, changed, plan)
    what = f"{len(report.restored)} tensors" + (
        f", {len(report.adapters)} adapters" if report.adapters else ""
    )
    result = {
        "layers": list(report.layers),
        "restored": list(report.restored),
        "adapters": dict(report.adapters),
        "target": args.target,
        "reference": args.reference,
        "output": str(report.path),
    }
    emit(
        args,
        result,
        f"restored layers {ranges(report.layers)} of {args.target} from {args.reference} ({what}) -> {report.path}",
    )
    return 0


def ranges(layers: Sequence[int]) -> str:
    if layers and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"[{layers[0]}, {layers[-1] + 1})"
    return ",".join(map(str, layers))


def _load_prompts(args: argparse.Namespace, tokenizer, vocab_size: int | None = None):
    from hfhooks.restoration.search import crc_prompts, load_crc_prompts

    if args.prompts:
        return load_crc_prompts(
            args.prompts, tokenizer, chat=args.chat, answer_prefix=args.answer_prefix, vocab_size=vocab_size
        )
    if tokenizer is None:
        raise ValueError(
            f"{args.post} has no tokenizer; pass --prompts FILE.jsonl with input_ids and valid ids."
        )
    return crc_prompts(
        tokenizer,
        n=10 if args.n is None else args.n,
        classes=(args.classes or "letters,digits").split(","),
        answer_prefix=args.answer_prefix,
        chat=args.chat,
        seed=args.seed or 0,
    )


def _check_prompt_options(args: argparse.Namespace) -> None:
    """The generator's options cannot act on prompts read from a file: refused, never silently dropped."""
    given = [f"--{k}" for k in ("n", "classes", "seed") if getattr(args, k) is not None]
    if args.prompts and given:
        raise ValueError(
            f"{', '.join(given)} shape the generated prompts and do nothing with --prompts {args.prompts}: "
            "drop them, or drop --prompts."
        )


def run_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hfhooks.io.paths import check_output

    _check_prompt_options(args)
    if args.plot:  # checked before the models load and the search runs (minutes), not after
        require("matplotlib", "matplotlib", "--plot")
    inputs = [args.post, args.base, args.prompts]
    if args.restore_to:
        check_dir_output(args.restore_to, inputs, args.overwrite)
    for side in (args.csv, args.plot):  # side outputs: never an input or inside one, never silently replaced
        if side:
            check_output(side, inputs, overwrite=args.overwrite, same_kind=Path.is_file, kind="file")

    # torch + transformers take seconds to import: only now that the arguments and outputs are checked
    import torch
    import transformers

    from hfhooks.restoration.restore import restore_layers
    from hfhooks.restoration.search import search_restoration

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
    prompts = _load_prompts(args, tokenizer, post.get_input_embeddings().num_embeddings)
    progress = progress_enabled(args)
    with warnings.catch_warnings():  # the low-validity warning is printed below as one stderr line
        warnings.filterwarnings("ignore", "the selected candidate", UserWarning)
        result = search_restoration(
            post,
            base,
            prompts,
            threshold=args.threshold,
            soup=args.soup,
            max_width=args.max_width,
            stride=args.stride,
            min_validity=args.min_validity,
            batch_size=args.batch_size,
            progress=progress,
        )
    best = result.best
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    lines = _search_summary(result, len(prompts), args)
    emit(
        args,
        {"best": best, "best_soup": result.best_soup, "rows": result.rows, "seconds": result.seconds},
        lines,
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
            progress=progress,
        )
        note(args, f"wrote the restored model to {report.path}")
    return 0


def _search_summary(result, n_prompts: int, args: argparse.Namespace) -> list[str]:
    """The human-readable result of ``search-restore``: the table, the rule, the selection."""
    best = result.best
    lines = [result.table(top=args.top)]
    lines.append(
        f"\n{len(result.ranges())} ranges, {len(result.soups())} soups, {n_prompts} prompts in "
        f"{result.seconds:.1f}s. Rule: validity ≥ {args.threshold:g} × post ({result.post['validity']:.3f}), "
        "then the highest diversity."
    )
    if best["kind"] == "post":
        lines.append("selected: no restoration (no range keeps validity while adding diversity)")
    else:
        lines.append(
            f"selected: layers [{best['start']}, {best['end']}) — validity {best['validity']:.3f}, diversity "
            f"{best['diversity']:.3f} nats (post-trained: {result.post['validity']:.3f}, "
            f"{result.post['diversity']:.3f})"
        )
    if result.best_soup:
        s = result.best_soup
        lines.append(
            f"best soup: α={s['alpha']:.2f} — validity {s['validity']:.3f}, diversity {s['diversity']:.3f}"
        )
    return lines


def _width(text: str) -> int | float:
    """``--max-width``: an int (layers) or a fraction in (0, 1)."""
    value = float(text)
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: a number of layers ≥ 1 or a fraction in (0, 1)")


def _add_restore_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", action="store_true", help="also restore the input embeddings")
    p.add_argument("--final-norm", action="store_true", help="also restore the final norm")
    p.add_argument(
        "--lm-head", action="store_true", help="also restore the LM head (tied: with --embeddings)"
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
        "--layers",
        required=True,
        type=layer_spec,
        help="decoder layers, e.g. '4:8' (end excluded) or '2,3,7'",
    )
    where = restore.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output", help="the output checkpoint directory")
    where.add_argument("--in-place", action="store_true", help="replace TARGET atomically (other files kept)")
    _add_restore_flags(restore)
    restore.add_argument("--include", nargs="+", help="extra tensors to restore (names, globs, re:REGEX)")
    restore.add_argument(
        "--adapters", choices=["zero", "drop"], default="zero", help="LoRA adapters in range"
    )
    add_write_options(restore)
    restore.set_defaults(func=run_restore)
    _add_search_parser(sub)


def _add_search_parser(sub: argparse._SubParsersAction) -> None:
    search = sub.add_parser(
        "search-restore",
        help="find which layers to restore (CRC proxy over contiguous ranges, coarse to fine)",
        description="Score contiguous ranges [s, e) of restored layers (at most --max-width wide; on a grid of "
        "step --stride, then every range near the best) with the Constrained-Random-"
        "Character proxy (validity = probability mass on the allowed characters; diversity = entropy over "
        "them, renormalised), one forward pass per prompt batch, no generation. Select the range with the "
        "highest diversity among those keeping validity ≥ THRESHOLD × the post-trained model's, and compare "
        "with interpolating the weights (soup). Both checkpoints are loaded in memory.",
        epilog="Example: hfhooks search-restore post/ base/ --plot tradeoff.png --restore-to restored/",
    )
    search.add_argument("post", help="the post-trained checkpoint directory (with its tokenizer)")
    search.add_argument("base", help="the pre-trained checkpoint directory")
    search.add_argument(
        "--prompts",
        help='JSONL prompts, one a line: {"input_ids": [ids], "valid": [ids]} or {"prompt": "text", '
        '"valid": ["a", ...]} (see docs/restoration.md)',
    )
    search.add_argument("--n", type=int, help="generated prompts per class (default 10; the paper used 20)")
    search.add_argument("--classes", help="prompt classes (or literal alphabets; default letters,digits)")
    search.add_argument(
        "--answer-prefix", help="text before the answer character (default: '' in a chat, else ' ')"
    )
    search.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="wrap prompts in the tokenizer's chat template (default: when it has one)",
    )
    search.add_argument("--seed", type=int, help="seed of the generated prompts (default 0)")
    search.add_argument("--threshold", type=float, default=0.9, help="validity floor, × post-trained (0.9)")
    search.add_argument(
        "--soup", type=int, default=11, help="interpolation points for the baseline (default 11; 0 = none)"
    )
    search.add_argument(
        "--max-width",
        type=_width,
        default=0.5,
        help="widest range: layers, or a fraction of them (default 0.5: half the layers, rounded up)",
    )
    search.add_argument(
        "--stride",
        type=int,
        help="coarse grid step, refined around the best range (default round(layers / 10); 1 = every range)",
    )
    search.add_argument(
        "--min-validity",
        type=float,
        default=0.1,
        help="warn when the selection's validity is below this (default 0.1)",
    )
    search.add_argument("--batch-size", type=int, default=64)
    search.add_argument(
        "--dtype", choices=FLOAT_DTYPES, default="float32", help="dtype to load the models in"
    )
    search.add_argument("--top", type=int, default=12, help="table rows to print")
    search.add_argument("--csv", help="write every row to this CSV file")
    search.add_argument("--plot", help="write the validity/diversity plot to this PNG")
    search.add_argument("--restore-to", help="write POST with the selected range restored to this directory")
    search.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --restore-to directory (one hfhooks wrote), --csv or --plot file",
    )
    add_common_flags(search)
    search.set_defaults(func=run_search)
