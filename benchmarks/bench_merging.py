"""One-pass merges against mergekit: wall time and peak RSS side by side, outputs checked equal.

Generates a Llama-shaped bfloat16 checkpoint (12 layers × 1024 hidden, 32k vocabulary, ≈ 200 M parameters,
≈ 400 MB in 200 MB shards) and three "fine-tuned" variants (≈ 70 % of the coordinates moved by N(0, 0.002²)),
then runs, each in a fresh subprocess (peak RSS = the kernel's ``VmHWM``, reset after the imports):

* ``task vector``: ``θ_base + 1.0·(θ_1 − θ_base)`` (task arithmetic, one model, λ = 1);
* ``ties (3 models)``: TIES, density 0.3, weights 1, λ = 1;

each with :func:`hfhooks.merging.merge` and with mergekit's ``run_merge`` (its Python API behind
``mergekit-yaml``) on CPU with the options a mergekit user would pass: ``lazy_unpickle=True`` (no effect on
safetensors inputs), default ``out_shard_size`` (5B), no tokenizer copy, no model card, and the recipe's
``dtype: bfloat16`` (the usual recipe; mergekit then computes in bfloat16). A second mergekit run per merge with
``dtype: float32, out_dtype: bfloat16`` does the same arithmetic as hfhooks (float32) and is what the outputs
are checked against: equal everywhere except at coordinates where a model's |τ| ties with its TIES trim
threshold (bfloat16 weights make such ties common; mergekit breaks them with an unstable argsort, hfhooks keeps
the lowest indices, so which tied coordinates survive differs).

Goals (issue 16): hfhooks ≤ 1.0× mergekit's (bfloat16 recipe) wall time and ≤ 0.6× its peak RSS.

Both tools run with the same torch thread count: ``--threads`` (default: every CPU), set as
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in each child and with ``torch.set_num_threads``.

    python benchmarks/bench_merging.py            # ≈ 2 GB of temporary files under --dir (default /tmp)
    python benchmarks/bench_merging.py --threads 1
    python benchmarks/bench_merging.py --quick    # ≈ 100 MB, to check it runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_checkpoints import llama_shapes  # the same Llama-shaped tensor list
from peakrss import peak_kb, reset_peak, status_kb

GOAL_TIME, GOAL_RSS = 1.0, 0.6
MERGES = {
    "task vector": {"method": "task_arithmetic", "models": 1, "params": {}},
    "ties (3 models)": {"method": "ties", "models": 3, "params": {"density": 0.3}},
}
TOOLS = ("hfhooks", "mergekit", "mergekit fp32")


def generate(root: Path, args: argparse.Namespace) -> dict:
    """Write base/ and t0/, t1/, t2/ (base + sparse noise), sharded with huggingface_hub's rule."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab, args.kv_heads)
    meta = {n: torch.empty(s, dtype=torch.bfloat16, device="meta") for n, s in shapes.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=args.shard)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    }  # fmt: skip
    names = ["base", "t0", "t1", "t2"]
    g = torch.Generator().manual_seed(0)
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config, indent=2))
    for file, tensors in split.filename_to_tensors.items():
        shards: dict[str, dict] = {name: {} for name in names}
        for n in tensors:
            w = torch.randn(shapes[n], generator=g).mul_(0.02)
            shards["base"][n] = w.to(torch.bfloat16)
            for t in names[1:]:
                noise = torch.randn(shapes[n], generator=g).mul_(0.002)
                noise.mul_(torch.rand(shapes[n], generator=g) < 0.7)
                shards[t][n] = (w + noise).to(torch.bfloat16)
                del noise
            del w
        for name in names:
            save_file(shards[name], root / name / file, metadata={"format": "pt"})
        del shards
    if split.is_sharded:
        index = {
            "metadata": {"total_size": split.metadata["total_size"]},
            "weight_map": split.tensor_to_filename,
        }
        for name in names:
            (root / name / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    sizes = {n: torch.Size(s).numel() * 2 for n, s in shapes.items()}
    return {
        "parameters": sum(torch.Size(s).numel() for s in shapes.values()),
        "checkpoint_bytes": sum(sizes.values()),
        "shards": len(split.filename_to_tensors),
        "largest_tensor_bytes": max(sizes.values()),
    }


# -- one merge, run in a fresh interpreter -----------------------------------------------------------------------
def run_child(tool: str, merge: str, root: Path, out: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    spec = MERGES[merge]
    tuned = [root / f"t{i}" for i in range(spec["models"])]
    if tool == "hfhooks":
        from hfhooks.merging import merge as hf_merge

        def work():
            hf_merge(root / "base", tuned, spec["method"], out=out, progress=False, **spec["params"])

    else:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        dtypes = (
            {"dtype": "bfloat16"} if tool == "mergekit" else {"dtype": "float32", "out_dtype": "bfloat16"}
        )
        models = [{"model": str(t), "parameters": {"weight": 1.0, **spec["params"]}} for t in tuned]
        conf = MergeConfiguration.model_validate(
            {"merge_method": spec["method"], "base_model": str(root / "base"), "models": models, **dtypes}
        )
        options = MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False, quiet=True)

        def work():
            run_merge(conf, str(out), options)

    import gc

    gc.collect()
    exact = reset_peak()
    start_rss = status_kb("VmRSS")  # imports (torch; mergekit also loads transformers and pydantic)
    t0 = time.perf_counter()
    work()
    seconds = time.perf_counter() - t0
    peak = peak_kb(exact)
    return {"seconds": seconds, "peak_rss_kb": peak, "start_rss_kb": start_rss}


def measure(tool: str, merge: str, root: Path, threads: int) -> dict:
    out = root / f"out-{tool}-{merge}".replace(" ", "_").replace("(", "").replace(")", "")
    child_argv = [sys.executable, __file__, "--child", tool, merge, "--dir", str(root), "--out", str(out)]
    child_argv += ["--threads", str(threads)]
    res = subprocess.run(
        child_argv,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        },
    )
    if res.returncode != 0:
        raise RuntimeError(f"{tool} {merge} failed:\n{res.stderr[-4000:]}")
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "out": str(out)}


def _threshold_ties(root: Path, n: str, models: int, density: float):
    """Coordinates where some model's |τ| equals its TIES trim threshold: which of those tied values are kept is
    an arbitrary choice (mergekit's unstable argsort) or a documented one (hfhooks: lowest index first)."""
    import torch

    from hfhooks.io.checkpoints import Checkpoint

    with Checkpoint(root / "base") as cb:
        base = cb.get(n).float()
    tied = torch.zeros(base.shape, dtype=torch.bool)
    for t in range(models):
        with Checkpoint(root / f"t{t}") as ct:
            a = (ct.get(n).float() - base).abs().reshape(-1)
        k = max(1, int(density * a.numel()))
        thr = torch.kthvalue(a, a.numel() - k + 1).values
        tied |= (a == thr).reshape(base.shape)
    return tied


def compare(a: Path, b: Path, root: Path, merge: str) -> dict:
    """Max |Δ| and the fraction of elements that differ between two merged checkpoints; for TIES also the
    differences outside the coordinates tied at a trim threshold (the only place the two may disagree)."""
    from hfhooks.io.checkpoints import Checkpoint

    spec = MERGES[merge]
    worst, differ, total, untied = 0.0, 0, 0, 0
    with Checkpoint(a) as x, Checkpoint(b) as y:
        if set(x) != set(y):
            raise AssertionError(f"tensor names differ: {sorted(set(x) ^ set(y))[:5]}")
        for n in x:
            d = (x.get(n).float() - y.get(n).float()).abs()
            worst = max(worst, float(d.max()) if d.numel() else 0.0)
            bad = d > 0
            differ += int(bad.sum())
            total += d.numel()
            if "density" in spec["params"] and bool(bad.any()):
                bad &= ~_threshold_ties(root, n, spec["models"], spec["params"]["density"])
            untied += int(bad.sum())
    return {"max_abs": worst, "fraction_differing": differ / max(total, 1), "differing_untied": untied}


def warm(root: Path) -> None:
    for f in sorted(root.rglob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def report(results: dict, checks: dict, info: dict, threads: int) -> bool:
    ok = True
    print(f"\ncheckpoint: {info['parameters'] / 1e6:.0f} M parameters, {info['checkpoint_bytes'] / 1e6:.0f} MB bf16, "
          f"{info['shards']} shards; largest tensor {info['largest_tensor_bytes'] / 1e6:.0f} MB")  # fmt: skip
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; torch threads {threads} for both tools\n"
    )
    head = (
        f"{'merge':<17} {'tool':<14} {'time s':>8} {'peak RSS MB':>12} {'(imports)':>10} {'time ×mk':>9} "
        f"{'RSS ×mk':>8}  verdict"
    )
    print(head + "\n" + "-" * len(head))
    for merge in MERGES:
        mk = results[(merge, "mergekit")]
        for tool in TOOLS:
            r = results[(merge, tool)]
            tr, rr = r["seconds"] / mk["seconds"], r["peak_rss_kb"] / mk["peak_rss_kb"]
            verdict = ""
            if tool == "hfhooks":
                good = tr <= GOAL_TIME and rr <= GOAL_RSS
                ok &= good
                verdict = f"{'PASS' if good else 'FAIL'} (goals ≤ {GOAL_TIME}× time, ≤ {GOAL_RSS}× RSS)"
            print(f"{merge:<17} {tool:<14} {r['seconds']:>8.2f} {r['peak_rss_kb'] / 1024:>12.0f} "
                  f"{r['start_rss_kb'] / 1024:>10.0f} {tr:>9.2f} "
                  f"{rr:>8.2f}  {verdict}")  # fmt: skip
    print()
    for (merge, other), c in checks.items():
        same = other == "mergekit fp32"
        good = c["differing_untied"] == 0  # equal everywhere but where trim-threshold ties are broken
        if same:
            ok &= good
        tag = ("PASS" if good else "FAIL") if same else "info (mergekit computes in bf16)"
        print(f"{merge:<17} hfhooks vs {other:<14} max|Δ| {c['max_abs']:.3g}, "
              f"{100 * c['fraction_differing']:.4f} % of elements differ, {c['differing_untied']} outside "
              f"trim-threshold ties  {tag}")  # fmt: skip
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir in /tmp)")
    p.add_argument("--quick", action="store_true", help="≈ 100 MB checkpoint, to check the script runs")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both tools")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(
            json.dumps(run_child(args.child[0], args.child[1], Path(args.dir), Path(args.out), args.threads))
        )
        return
    args.hidden, args.intermediate, args.layers, args.vocab, args.kv_heads, args.shard = (
        (512, 1408, 6, 32000, 4, "50MB") if args.quick else (1024, 2816, 12, 32000, 4, "200MB")
    )
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_merging_"))
    try:
        t0 = time.perf_counter()
        info = generate(root, args)
        print(f"generated in {time.perf_counter() - t0:.0f}s under {root}")
        warm(root)
        results, checks = {}, {}
        for merge in MERGES:
            for tool in TOOLS:
                results[(merge, tool)] = measure(tool, merge, root, args.threads)
                print(f"  {merge} / {tool}: {results[(merge, tool)]['seconds']:.1f}s", flush=True)
            for other in ("mergekit fp32", "mergekit"):
                ours, theirs = Path(results[(merge, "hfhooks")]["out"]), Path(results[(merge, other)]["out"])
                checks[(merge, other)] = compare(ours, theirs, root, merge)
        ok = report(results, checks, info, args.threads)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
