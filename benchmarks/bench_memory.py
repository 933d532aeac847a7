"""Peak memory of a stock ``Trainer`` step with each hfhooks callback, against a plain Trainer.

A Llama-shaped model (≈0.3B parameters, random init from a config; ``--quick``: ≈4M) trains for a few steps
(batch 1, short sequences, AdamW) in a *fresh subprocess per scenario*, in bf16 and fp32:

* ``plain`` — no callback (the reference);
* ``hard50`` — ``GradientMaskCallback(freeze="hard")``, a random 50 % element mask over every parameter;
* ``hard90`` — ``GradientMaskCallback(freeze="hard")``, 90 % of the tensors entirely frozen (the rest trainable);
* ``route_forget`` / ``route_retain`` — ``GradientRoutingCallback`` (strict, the default; 64 MLP units + 1 head
  per layer), every step forget-only (the strict snapshot holds the shared coordinates) / retain-only;
* ``salun`` — ``SaliencyUnlearningCallback`` (GradDiff, ratio 0.5, hard freeze), scoring included; the child
  also measures the scoring pass alone (``compute_saliency``) and the top-k (``ParamMask.from_scores``);
* ``graddiff`` / ``npo`` — the unlearning objective's loss hook on a forget/retain set, NPO with its
  precomputed reference log-probabilities;
* ``maskload`` — ``ParamMask.load`` of a 50 % element mask file of the model (peak RSS added by loading).

Peak RSS is the kernel's high-water mark (``VmHWM``), reset (``/proc/self/clear_refs``) once the model is built,
so every figure is "peak during training − RSS after building the model" plus the model itself. Where CUDA is
available the model trains on the GPU and ``torch.cuda.max_memory_allocated`` is reported too. Goals (issue #13):
hard freeze ≤ 1.05× plain (bf16 and fp32); strict routing ≤ 1.05× plain; SalUn scoring ≤ one fp32 buffer per
scored parameter (4 B, plus the transient gradient of the largest tensor and 128 MB of fixed backward
workspace); NPO ≤ 1.05× GradDiff; mask loading
≤ 2× the file size. A projected table scales the measured extra bytes per parameter to 7B and 70B models.

    python benchmarks/bench_memory.py            # ≈ 17 min on 2 CPU cores (bf16 matmuls), ≈ 7 GB RAM at most
    python benchmarks/bench_memory.py --quick    # smoke run, ≈ 2-3 min
    python benchmarks/bench_memory.py --optim adamw_torch --scenarios hard50   # another optimizer, a subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCENARIOS = ("plain", "hard50", "hard90", "route_forget", "route_retain", "salun", "graddiff", "npo")
RESULTS = Path(__file__).parent / "results" / "memory.json"
MB = 2**20


# -- measurement helpers (child) ----------------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def reset_peak() -> int:
    """Reset the RSS high-water mark to the current RSS (Linux ≥ 4.0); returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak() -> int:
    return _status("VmHWM")


def trimmed_reset_peak() -> int:
    """:func:`reset_peak` after handing glibc's freed heap pages back to the kernel (``malloc_trim``), so that
    pages an earlier phase freed but glibc kept resident are neither in the base nor silently reused by the
    next phase. Without it, a phase measured after another can under-report its transients by what the first left
    behind (the bf16 plain backward after the scoring pass read 187 MB without it, 207-210 MB with it)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return reset_peak()


def _config(quick: bool):
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=4096, max_position_embeddings=128)  # fmt: skip
    return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=256)  # fmt: skip


def _model(args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(_config(args.quick), dtype=dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    return model


def _examples(n: int, seq: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def _trainer(args, model, dataset, callbacks, collator, tmp):
    import torch
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=tmp, per_device_train_batch_size=1, max_steps=args.steps, learning_rate=1e-4,
        weight_decay=0.01, save_strategy="no", report_to=[], logging_steps=10_000, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        **({"optim": args.optim} if args.optim else {}),
    )  # fmt: skip
    return Trainer(
        model=model, args=targs, train_dataset=dataset, data_collator=collator, callbacks=callbacks
    )


# -- scenarios (child) ----------------------------------------------------------------------------------------
def _hard_mask(model, kind: str):
    import torch

    from hfhooks import ParamIndex, ParamMask

    index = ParamIndex(model)
    g = torch.Generator().manual_seed(0)
    names = index.names()
    if kind == "hard50":
        return ParamMask({n: torch.rand(tuple(index.info(n).shape), generator=g) < 0.5 for n in names})
    frozen = set(names[: round(0.9 * len(names))])  # 90 % of the tensors entirely frozen, the rest trainable
    return ParamMask({n: torch.full(tuple(index.info(n).shape), n not in frozen) for n in names})


def _scoring_phase(model, forget, out: dict) -> None:
    """Peak added by the SalUn scoring pass alone, and by the top-k that turns scores into a mask."""
    import gc

    import torch

    from hfhooks import ParamMask, TaggedCollator, compute_saliency

    loader = torch.utils.data.DataLoader(forget, batch_size=1, collate_fn=TaggedCollator().base)
    # A process's first backward sets up kernels and workspaces once (not a per-parameter cost): warm up first.
    first = TaggedCollator().base(forget[:1])
    model(**{k: v.to(model.device) for k, v in first.items()}).loss.backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    base = trimmed_reset_peak()
    scores = compute_saliency(model, loader, "grad_abs_sum", progress=False)
    out["scoring_extra"] = peak() - base
    out["scored_params"] = sum(t.numel() for t in scores.values())
    out["largest_tensor_bytes"] = max(p.numel() * p.element_size() for p in model.parameters())

    # The same forward + backward passes with every gradient freed as it arrives and no score buffers: what any
    # backward over these batches needs (activations, one gradient in flight, the framework's workspace — on
    # CPU a bf16 matmul's backward upcasts its operands to fp32). Scoring minus this = what scoring holds.
    def drop(p) -> None:
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(drop) for p in model.parameters() if p.requires_grad]
    training = model.training
    model.eval()  # as compute_saliency scores
    gc.collect()
    base = trimmed_reset_peak()
    for batch in loader:
        model(**{k: v.to(model.device) for k, v in batch.items()}).loss.backward()
    out["backward_extra"] = peak() - base
    for h in hooks:
        h.remove()
    model.train(training)
    base = reset_peak()
    mask = ParamMask.from_scores(scores, 0.5)
    out["topk_extra"] = peak() - base
    del scores, mask
    gc.collect()


def _run_child(args) -> dict:
    import torch

    from hfhooks import (
        FORGET,
        RETAIN,
        GradientMaskCallback,
        GradientRoutingCallback,
        SaliencyUnlearningCallback,
        TaggedCollator,
        TaggedDataset,
        UnlearningObjective,
        forget_retain_dataset,
        reference_logprobs,
    )
    from hfhooks.unlearning.objectives import objective_hook

    out: dict = {}
    model = _model(args)
    vocab = model.config.vocab_size
    out["params"] = sum(p.numel() for p in model.parameters())
    n = args.steps
    data = _examples(n, args.seq, vocab, 1)
    collator, callbacks, hook = None, [], None
    if args.scenario in ("hard50", "hard90"):
        callbacks = [GradientMaskCallback(_hard_mask(model, args.scenario), freeze="hard")]
    elif args.scenario.startswith("route"):
        label = FORGET if args.scenario == "route_forget" else RETAIN
        data = TaggedDataset(data, tags={"routing": [label] * n}, group_by="routing", batch_size=1)
        collator = TaggedCollator(homogeneous="routing")
        callbacks = [GradientRoutingCallback(mlp_units=64, heads=1)]  # strict=True: the default
    elif args.scenario in ("salun", "graddiff", "npo"):
        forget, retain = data, _examples(n, args.seq, vocab, 2)
        data, collator = forget_retain_dataset(forget, retain), TaggedCollator()
        if args.scenario == "salun":
            _scoring_phase(model, forget, out)
            callbacks = [SaliencyUnlearningCallback(forget, objective="graddiff", ratio=0.5, batch_size=1,
                                                    progress=False)]  # fmt: skip
        else:
            objective = UnlearningObjective(args.scenario, retain_weight=1.0)
            if args.scenario == "npo":  # the reference: 4 bytes per forget example, no second model
                objective.reference = reference_logprobs(model, forget, batch_size=1, progress=False)
            hook = objective_hook(model, objective).attach()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out["rss_model"] = reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        _trainer(args, model, data, callbacks, collator, tmp).train()
    out["peak_rss"] = peak()
    if torch.cuda.is_available():
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    if hook is not None:
        hook.detach()
    return out


def _run_maskload(args) -> dict:
    import torch

    from hfhooks import ParamMask

    path = Path(args.mask_file)
    if args.scenario == "masksave":
        model = _model(args)
        _hard_mask(model, "hard50").save(path)
        return {"file_bytes": path.stat().st_size}
    warm = path.with_name("warm.safetensors")  # a first, tiny load imports what loading needs lazily
    ParamMask({"w": torch.ones(8, dtype=torch.bool)}).save(warm)
    ParamMask.load(warm)
    base = reset_peak()
    mask = ParamMask.load(path)
    return {"load_extra": peak() - base, "file_bytes": path.stat().st_size, "tensors": len(mask)}


# -- parent -------------------------------------------------------------------------------------------------
def _child(args, scenario: str, dtype: str, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--child", scenario, "--dtype", dtype, "--steps", str(args.steps),
           "--seq", str(args.seq), *(["--quick"] if args.quick else []),
           *(["--optim", args.optim] if args.optim else []), *extra]  # fmt: skip
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{scenario} ({dtype}) failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _table(rows: dict, dtypes: list[str]) -> tuple[list[str], list[tuple[str, bool]]]:
    lines, goals = [], []
    for dtype in dtypes:
        plain = rows[(dtype, "plain")]
        lines.append(f"\n{dtype}: {plain['params'] / 1e6:.0f}M parameters, plain Trainer peak "
                     f"{plain['peak_rss'] / MB:.0f} MB (model after build {plain['rss_model'] / MB:.0f} MB)")  # fmt: skip
        lines.append(
            f"{'scenario':<14}{'peak MB':>10}{'× plain':>9}{'extra B/param':>15}{'CUDA peak MB':>14}"
        )
        for s in (s for s in SCENARIOS if (dtype, s) in rows):
            r = rows[(dtype, s)]
            ref = rows[(dtype, "graddiff")] if s == "npo" else plain
            ratio = r["peak_rss"] / ref["peak_rss"]
            r["ratio"], r["extra_per_param"] = ratio, (r["peak_rss"] - plain["peak_rss"]) / plain["params"]
            cuda = f"{r['cuda_peak'] / MB:.0f}" if "cuda_peak" in r else "-"
            label = f"{ratio:.3f}" + ("ᴳ" if s == "npo" else "")
            lines.append(
                f"{s:<14}{r['peak_rss'] / MB:>10.0f}{label:>9}{r['extra_per_param']:>15.2f}{cuda:>14}"
            )
            if s in ("hard50", "hard90", "route_forget", "route_retain", "npo"):
                goals.append((f"{dtype} {s} peak ≤ 1.05× {'GradDiff' if s == 'npo' else 'plain'}: {ratio:.3f}×",
                              ratio <= 1.05))  # fmt: skip
        if (dtype, "salun") not in rows:
            continue
        sal = rows[(dtype, "salun")]
        # one fp32 buffer per scored parameter + the gradient of one tensor in flight + the backward pass's
        # fixed workspace (autograd / oneDNN, independent of the model's size)
        limit = 4 * sal["scored_params"] + sal["largest_tensor_bytes"] + 128 * MB
        lines.append(f"SalUn scoring pass: +{sal['scoring_extra'] / MB:.0f} MB = "
                     f"{sal['scoring_extra'] / sal['scored_params']:.2f} B per scored parameter; top-k (mask "
                     f"selection): +{sal['topk_extra'] / MB:.0f} MB")  # fmt: skip
        goals.append((f"{dtype} SalUn scoring ≤ 4 B/scored param + largest gradient + 128 MB: "
                       f"{sal['scoring_extra'] / MB:.0f} MB ≤ {limit / MB:.0f} MB", sal["scoring_extra"] <= limit))  # fmt: skip
        if "backward_extra" in sal:  # what scoring holds beyond a plain backward over the same batches
            held = sal["scoring_extra"] - sal["backward_extra"]
            lines.append(f"  the same backward passes, each gradient freed, no buffers: +{sal['backward_extra'] / MB:.0f} MB; "
                         f"scoring holds {held / MB:.0f} MB more = {held / sal['scored_params']:.2f} B per scored parameter")  # fmt: skip
            goals.append((f"{dtype} SalUn scoring − plain backward ≤ one fp32 buffer per scored parameter (4 B): "
                          f"{held / sal['scored_params']:.2f} B", held <= 4 * sal["scored_params"]))  # fmt: skip
    if ("mask", "maskload") not in rows:
        return lines, goals
    load = rows[("mask", "maskload")]
    goals.append((f"mask loading ≤ 2× file size: +{load['load_extra'] / MB:.1f} MB for a "
                  f"{load['file_bytes'] / MB:.1f} MB file ({load['load_extra'] / load['file_bytes']:.2f}×)",
                  load["load_extra"] <= 2 * load["file_bytes"]))  # fmt: skip
    return lines, goals


def _projection(rows: dict, dtypes: list[str]) -> list[str]:
    """Extra GB over a plain Trainer at 7B / 70B, scaled from the measured extra bytes per parameter."""
    lines = ["\nprojected extra memory over a plain Trainer (measured B/param × parameters):",
             f"{'dtype':<6}{'scenario':<14}{'B/param':>9}{'7B GB':>9}{'70B GB':>9}"]  # fmt: skip
    for dtype in dtypes:
        for s in (s for s in SCENARIOS[1:] if (dtype, s) in rows):
            b = rows[(dtype, s)]["extra_per_param"]
            lines.append(f"{dtype:<6}{s:<14}{b:>9.2f}{b * 7e9 / 1e9:>9.1f}{b * 70e9 / 1e9:>9.1f}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ≈4M-parameter model: smoke run")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument(
        "--steps", type=int, default=2, help="optimizer steps per scenario (AdamW states exist from step 1)"
    )
    ap.add_argument("--seq", type=int, default=16, help="tokens per example")
    ap.add_argument(
        "--scenarios",
        nargs="+",
        choices=[*SCENARIOS[1:], "maskload"],
        default=[*SCENARIOS[1:], "maskload"],
        help="run only these (plain, and GradDiff for NPO, are added as references); default: all",
    )
    ap.add_argument(
        "--optim",
        help="TrainingArguments.optim, e.g. adamw_torch (default: the Trainer's, adamw_torch_fused)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    ap.add_argument("--mask-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.scenario = args.child
        run = _run_maskload if args.child in ("masksave", "maskload") else _run_child
        print(json.dumps(run(args)))
        return 0
    rows: dict = {}
    t0 = time.perf_counter()
    for dtype in args.dtypes:
        wanted = {"plain", *args.scenarios, *(["graddiff"] if "npo" in args.scenarios else [])}
        for s in (s for s in SCENARIOS if s in wanted):
            rows[(dtype, s)] = r = _child(args, s, dtype)
            print(f"  {dtype} {s}: peak {r['peak_rss'] / MB:.0f} MB ({r['seconds']} s)", flush=True)
    if "maskload" in args.scenarios:
        with tempfile.TemporaryDirectory() as tmp:
            mask_file = ["--mask-file", str(Path(tmp) / "mask.safetensors")]
            _child(args, "masksave", "bf16", mask_file)
            rows[("mask", "maskload")] = _child(args, "maskload", "bf16", mask_file)
    lines, goals = _table(rows, args.dtypes)
    lines += _projection(rows, args.dtypes)
    print("\n".join(lines))
    print()
    for text, ok in goals:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; {platform.platform()}; {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({f"{d}/{s}": r for (d, s), r in rows.items()}, indent=1))
    return 0 if all(ok for _, ok in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
