"""``hfhooks merge``: one-pass merges of fine-tuned checkpoints into their base, from flags or a recipe.

torch and the merge code are imported inside :func:`run_merge`: ``hfhooks --help`` must start in well under a
second.
"""

from __future__ import annotations

import argparse

from hfhooks.cli.common import emit, layer_spec, write_options
from hfhooks.cli.diffs import add_write_options, check_dir_output, checkpoint_files, dry_run_report

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "tall", "consensus")
# flag dest -> MergeConfig field; with --config these must stay unset (the recipe holds them)
CONFIG_FLAGS = {
    "method": "method",
    "weights": "weights",
    "density": "density",
    "lam": "lambda_",
    "normalize": "normalize",
    "rescale": "rescale",
    "majority_sign": "majority_sign",
    "seed": "seed",
    "tall_lambda": "tall_lambda",
    "k": "k",
    "task": "task",
    "names": "names",
    "layers": "layers",
}


def _one_or_list(values):
    return None if values is None else (values[0] if len(values) == 1 else tuple(values))


def _plan(args: argparse.Namespace):
    """``(base, tuned, config-or-recipe)`` from ``--config`` or from the positional models and flags."""
    from hfhooks.merging import MergeConfig, load_recipe

    given = [f"--{d.replace('_', '-')}" for d in CONFIG_FLAGS if getattr(args, d) is not None]
    if args.config:
        if args.models or given:
            extra = ", ".join([*given, *(["BASE/TUNED"] if args.models else [])])
            raise ValueError(
                f"--config holds the models and the method's parameters; drop {extra} (or --config)."
            )
        recipe = load_recipe(args.config)
        return recipe.base, recipe.models, recipe
    if len(args.models) < 2:
        raise ValueError("give BASE and at least one TUNED checkpoint (or --config RECIPE).")
    fields = {
        field: getattr(args, dest) for dest, field in CONFIG_FLAGS.items() if getattr(args, dest) is not None
    }
    for key in ("weights", "density", "tall_lambda"):
        if key in fields:
            fields[key] = _one_or_list(fields[key])
    if "names" in fields:
        fields["names"] = tuple(fields["names"])
    return args.models[0], args.models[1:], MergeConfig(**fields)


def run_merge(args: argparse.Namespace) -> int:
    from hfhooks.merging import Recipe, merge

    base, tuned, plan = _plan(args)
    check_dir_output(args.output, [base, *tuned], args.overwrite)
    kwargs = dict(
        out=args.output,
        **write_options(args),
    )
    report = plan.run(**kwargs) if isinstance(plan, Recipe) else merge(base, tuned, config=plan, **kwargs)
    cfg = report.config
    if args.dry_run:
        reads = [r for path in [base, *tuned] for r in checkpoint_files(path, args.allow_pickle)]
        size = sum(r["bytes"] for r in checkpoint_files(base, args.allow_pickle))
        how = (
            f"{cfg.method} of {len(tuned)} model(s) into BASE, λ={cfg.lambda_:g}: {len(report.merged)} tensors "
            f"merged in float32 and written in BASE's dtype, {len(report.copied)} copied from BASE"
        )
        return dry_run_report(args, reads, [{"path": str(report.path), "bytes": size}], report.merged, how)
    result = {
        "output": str(report.path),
        "method": cfg.method,
        "base": base,
        "models": list(tuned),
        "merged": len(report.merged),
        "copied": len(report.copied),
        "config": cfg.to_dict(),
    }
    emit(
        args,
        result,
        f"merged {len(tuned)} model(s) into {base} ({cfg.method}, {len(report.merged)} tensors merged, "
        f"{len(report.copied)} copied) -> {report.path}",
    )
    return 0


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, help="the merge method (default task_arithmetic)")
    p.add_argument("--weights", type=float, nargs="+", help="w_t: one for all models, or one per TUNED")
    p.add_argument("--density", type=float, nargs="+", help="fraction kept (ties, dare_*, magnitude_prune)")
    p.add_argument("--lambda", dest="lam", type=float, help="λ: scale of the merged task vector (default 1)")
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        help="divide by the (agreeing) weights' sum (default: on for ties / dare_ties, off otherwise)",
    )
    p.add_argument("--rescale", choices=["inverse", "l1", "none"], help="DARE rescaling (default inverse)")
    p.add_argument("--majority-sign", choices=["sum", "count"], help="TIES sign election (default sum)")
    p.add_argument("--seed", type=int, help="seed of DARE's draws (default 0)")
    p.add_argument("--tall-lambda", type=float, nargs="+", help="TALL masks' λ_t (default 0.4)")
    p.add_argument("--k", type=int, help="consensus: keep coordinates ≥ k TALL masks keep (default 2)")
    p.add_argument("--task", type=int, help="tall: the TUNED model (0-based) to reconstruct")
    p.add_argument("--names", nargs="+", help="merge only these tensors (names, globs, re:REGEX)")
    p.add_argument("--layers", type=layer_spec, help="merge only these decoder layers, e.g. '4:8' or '0,3'")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge fine-tuned checkpoints into their base (task arithmetic, TIES, DARE, ...)",
        description="Merge the task vectors θ_t − θ_BASE of TUNED checkpoints into BASE in one streaming pass: "
        "no diff file, one tensor of each model in memory at a time (computed in float32, written in BASE's "
        "dtype), the output published only once complete. Methods and their parameters come from flags or "
        "from a YAML/JSON recipe in the style of mergekit's (--config). Definitions: docs/merging.md.",
        epilog="Examples:\n  hfhooks merge base/ math/ code/ --method ties --density 0.2 --lambda 1 -o merged/\n"
        "  hfhooks merge --config recipe.yml -o merged/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="*", metavar="BASE TUNED", help="the base checkpoint, then the tuned ones")
    p.add_argument("--config", help="a YAML or JSON recipe (merge_method, base_model, models, parameters)")
    p.add_argument("-o", "--output", required=True, help="the output checkpoint directory")
    _add_method_flags(p)
    add_write_options(p)
    p.set_defaults(func=run_merge)


__all__ = ["add_parsers", "run_merge"]
