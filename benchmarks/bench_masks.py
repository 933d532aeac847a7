"""Masks: global top-k memory and time, mask file size, and saliency scoring overhead.

(a) Global top-k (ratio 0.5) over 100M fp32 scores in ~200 tensors of varying size: ``ParamMask.from_scores``
    (radix select, no concatenation) against the SalUn reference (``torch.cat`` of every score, ``argsort``
    of it, ``argsort`` of that for the ranks, one mask per tensor). Each method runs in its own fresh
    subprocess that builds the scores, records its RSS baseline, then runs the method while a thread samples
    RSS every 5 ms; the peak is the larger of the sampled peak and the kernel's high-water mark
    (``getrusage`` ru_maxrss) — minus the baseline. Both produce bool masks (the reference stored int64),
    and the reference uses a *stable* argsort so that both select exactly the same elements (checked by
    a SHA-256 of the masks). Goal: ≥ 5× less peak additional memory.
(b) Size of a saved mask over a ~20M-parameter tiny Llama against a BOOL safetensors file, an int64
    ``torch.save`` (what the SalUn code saved) and the ideal ``numel / 8``. Goal: ≤ 1.02 × numel/8 + header.
(c) ``compute_saliency(score="grad_abs_sum")`` over N batches of a small Llama against a plain forward +
    backward over the same batches (eval mode, ``zero_grad(set_to_none=True)`` between batches), repeated
    in interleaved pairs (ABBA order); reports the median of the per-pair time ratios. Goal: ≤ 1.15×.
    Cross-check robust to other processes' load: batch-level pairs milliseconds apart inside one
    compute_saliency call (plain steps on an identical model copy), plus the call's fixed cost amortised.

    python benchmarks/bench_masks.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_masks.py --quick    # 10M scores, fewer repetitions

Results are printed as a table and written to benchmarks/results/bench_masks.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psutil
import torch

GOAL_MEMORY = 5.0  # at least this many times less peak memory than the argsort reference
GOAL_FILE = 1.02  # mask file ≤ GOAL_FILE × numel/8 + header
GOAL_SALIENCY = 1.15  # saliency time ≤ GOAL_SALIENCY × plain forward+backward
MB = 1 << 20


# -- (a) top-k: one subprocess per method ---------------------------------------------------------------------


def make_scores(total: int, n_tensors: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n_tensors`` fp32 tensors of log-uniformly varying size (multiples of 128 elements) summing to ``total``."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.empty(n_tensors).uniform_(0.0, 8.0, generator=g))  # sizes span ~3000×
    rows = (weights / weights.sum() * (total // 128)).long().clamp_min(1)
    rows[-1] += total // 128 - int(rows.sum())  # the last tensor absorbs the rounding
    assert int(rows.min()) > 0 and int(rows.sum()) * 128 == total
    return {f"layers.{i}.weight": torch.rand(int(r), 128, generator=g) for i, r in enumerate(rows)}


def salun_reference(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """The SalUn code path: concatenate, argsort, argsort the permutation into ranks, threshold the ranks."""
    all_elements = -torch.cat([t.flatten() for t in scores.values()])
    threshold_index = round(len(all_elements) * ratio)
    positions = torch.argsort(all_elements, stable=True)  # stable: same tie-breaking as ParamMask.from_scores
    del all_elements
    ranks = torch.argsort(positions)
    del positions
    masks, start = {}, 0
    for name, tensor in scores.items():
        n = tensor.numel()
        masks[name] = (ranks[start : start + n] < threshold_index).reshape(tensor.shape)
        start += n
    return masks


def _rss() -> int:
    return psutil.Process().memory_info().rss


class PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, _rss(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, _rss())
        return self.peak


def topk_worker(method: str, total: int, n_tensors: int, ratio: float) -> dict:
    from hfhooks import ParamMask

    torch.set_num_threads(2)
    scores = make_scores(total, n_tensors)
    gc.collect()
    base = _rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    if method == "hfhooks":
        mask = ParamMask.from_scores(scores, ratio)
        masks = {n: mask.vector(n) for n in mask}
    else:
        masks = salun_reference(scores, ratio)
    seconds = time.perf_counter() - t0
    sampled = sampler.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss is the process's all-time high: usable only if the method set a new one.
    kernel = maxrss if maxrss > maxrss_before else 0
    h = hashlib.sha256()
    for name in scores:
        h.update(masks[name].numpy().tobytes())
    return {
        "method": method,
        "seconds": seconds,
        "baseline_mb": base / MB,
        "peak_additional_mb": (max(sampled, kernel) - base) / MB,
        "sampled_peak_additional_mb": (sampled - base) / MB,
        "output_mb": sum(m.numel() for m in masks.values()) / MB,
        "kept": int(sum(int(m.sum()) for m in masks.values())),
        "sha256": h.hexdigest(),
    }


def bench_topk(args) -> dict:
    results = {}
    for method in ("hfhooks", "salun_reference"):
        cmd = [sys.executable, __file__, "--worker", method, "--total", str(args.total)]
        cmd += ["--tensors", str(args.tensors)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
        print(f"  top-k {method}: {results[method]['seconds']:.1f} s", flush=True)
    ours, ref = results["hfhooks"], results["salun_reference"]
    assert ours["sha256"] == ref["sha256"], "the two methods selected different elements"
    assert ours["kept"] == round(0.5 * args.total)
    memory_ratio = ref["peak_additional_mb"] / max(ours["peak_additional_mb"], 1e-9)
    return {
        **results,
        "total": args.total,
        "tensors": args.tensors,
        "same_selection": True,
        "memory_ratio": memory_ratio,
        "time_ratio": ours["seconds"] / ref["seconds"],
        "goal_memory_ratio": GOAL_MEMORY,
        "pass": memory_ratio >= GOAL_MEMORY,
    }


# -- (b) file size --------------------------------------------------------------------------------------------


def tiny_llama(vocab: int, hidden: int, intermediate: int, layers: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg)


def bench_file_size(args) -> dict:
    from safetensors.torch import save_file

    from hfhooks import ParamIndex, ParamMask

    model = tiny_llama(32000, 256, 688, 4)
    index = ParamIndex(model)
    g = torch.Generator().manual_seed(1)
    mask = ParamMask.from_scores({n: torch.rand(p.shape, generator=g) for n, p in index.items()}, 0.5)
    dense = mask.to_dict()
    numel = sum(t.numel() for t in dense.values())
    with tempfile.TemporaryDirectory() as tmp:
        ours = Path(tmp) / "mask.safetensors"
        t0 = time.perf_counter()
        mask.save(ours, model=model)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert ParamMask.load(ours) == mask
        load_s = time.perf_counter() - t0
        with open(ours, "rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
        sizes = {"hfhooks (bit-packed U8)": ours.stat().st_size}
        save_file(dense, str(Path(tmp) / "bool.safetensors"))
        sizes["BOOL safetensors"] = (Path(tmp) / "bool.safetensors").stat().st_size
        buf = io.BytesIO()
        torch.save({n: t.long() for n, t in dense.items()}, buf)
        sizes["int64 torch.save (SalUn)"] = buf.getbuffer().nbytes
    ideal = numel / 8
    limit = GOAL_FILE * ideal + header
    return {
        "numel": numel,
        "tensors": len(dense),
        "ideal_bytes": ideal,
        "header_bytes": header,
        "sizes": sizes,
        "save_s": save_s,
        "load_s": load_s,
        "limit_bytes": limit,
        "pass": sizes["hfhooks (bit-packed U8)"] <= limit,
    }


# -- (c) saliency overhead ------------------------------------------------------------------------------------


def bench_saliency(args) -> dict:
    from hfhooks import compute_saliency

    model = tiny_llama(args.vocab, 256, 688, 4)
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, args.vocab, (8, 128), generator=g)
        batches.append({"input_ids": ids, "labels": ids})

    def plain() -> None:
        model.eval()
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def saliency() -> None:
        compute_saliency(model, batches, score="grad_abs_sum", progress=False)

    runs = {"plain": plain, "saliency": saliency}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.reps):
        order = ("plain", "saliency") if r % 2 == 0 else ("saliency", "plain")  # ABBA
        for name in order:
            gc.collect()
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    ratios = [s / p for s, p in zip(times["saliency"], times["plain"])]
    median_ratio = statistics.median(ratios)

    # Cross-check that other processes' load cannot skew: batch-level pairs milliseconds apart. A generator feeds
    # compute_saliency; before yielding each batch it runs the plain step on an identical copy of the model
    # (the saliency hooks sit on the original), then times until compute_saliency asks for the next batch
    # (= its forward, backward and gradient folding for that batch). What is left of the call's wall time is
    # its fixed per-call cost (setup, score buffers, final abs), amortised over the N batches.
    twin = copy.deepcopy(model)
    plain_steps: list[float] = []
    saliency_steps: list[float] = []

    def stream():
        for i in range(args.interleave):
            batch = batches[i % len(batches)]
            twin.eval()
            twin.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            twin(**batch).loss.backward()
            plain_steps.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            yield batch
            saliency_steps.append(time.perf_counter() - t1)

    t0 = time.perf_counter()
    compute_saliency(model, stream(), score="grad_abs_sum", progress=False)
    fixed = time.perf_counter() - t0 - sum(plain_steps) - sum(saliency_steps)
    step_ratios = [s / p for s, p in zip(saliency_steps, plain_steps)]
    med_plain, med_sal = statistics.median(plain_steps), statistics.median(saliency_steps)
    n = args.batches
    interleaved_ratio = (n * med_sal + fixed) / (n * med_plain)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "batches": args.batches,
        "batch_shape": [8, 128],
        "reps": args.reps,
        "plain_s": times["plain"],
        "saliency_s": times["saliency"],
        "median_plain_s": statistics.median(times["plain"]),
        "median_saliency_s": statistics.median(times["saliency"]),
        "pair_ratios": ratios,
        "median_ratio": median_ratio,
        "goal_ratio": GOAL_SALIENCY,
        "pass": median_ratio <= GOAL_SALIENCY,
        "interleaved": {
            "steps": args.interleave,
            "plain_step_s": plain_steps,
            "saliency_step_s": saliency_steps,
            "median_step_ratio": statistics.median(step_ratios),
            "fixed_per_call_s": fixed,
            "estimated_ratio_over_n_batches": interleaved_ratio,
            "pass": interleaved_ratio <= GOAL_SALIENCY,
        },
    }


# -- report ---------------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10M scores, fewer batches and repetitions")
    p.add_argument("--total", type=int, default=None, help="number of scores for (a) (default 100M)")
    p.add_argument("--tensors", type=int, default=None, help="number of score tensors for (a) (default 200)")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary of the (c) model")
    p.add_argument("--batches", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="interleaved plain/saliency pairs for (c)")
    p.add_argument("--interleave", type=int, default=None, help="batch-level pairs for the (c) cross-check")
    p.add_argument("--out", default="benchmarks/results/bench_masks.json")
    p.add_argument("--worker", choices=("hfhooks", "salun_reference"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(2)
    args.total = args.total or (10_000_000 if args.quick else 100_000_000)
    args.total -= args.total % 128
    args.tensors = args.tensors or (50 if args.quick else 200)
    args.batches = args.batches or (1 if args.quick else 2)
    args.reps = args.reps or (5 if args.quick else 7)
    args.interleave = args.interleave or (6 if args.quick else 10)
    if args.worker:
        print(json.dumps(topk_worker(args.worker, args.total, args.tensors, 0.5)))
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    load_start = os.getloadavg()
    print("(a) top-k ...", flush=True)
    topk = bench_topk(args)
    print("(b) file size ...", flush=True)
    files = bench_file_size(args)
    print("(c) saliency ...", flush=True)
    sal = bench_saliency(args)

    cpu = platform.processor() or platform.machine()
    print(
        f"\nhfhooks mask benchmarks — torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs ({cpu}), {time.perf_counter() - started:.0f} s, "
        f"load average at start {load_start[0]:.2f}"
    )
    ours, ref = topk["hfhooks"], topk["salun_reference"]
    print(
        f"\n(a) global top-k, ratio 0.5, {args.total / 1e6:.0f}M fp32 scores in {args.tensors} tensors "
        f"({args.total * 4 / MB:.0f} MB of scores; bool masks out: {ours['output_mb']:.0f} MB)"
    )
    print(f"{'method':<42} {'time':>8} {'peak additional RSS':>20}")
    print(
        f"{'ParamMask.from_scores (radix select)':<42} {ours['seconds']:>6.1f} s {ours['peak_additional_mb']:>17.0f} MB"
    )
    print(
        f"{'SalUn reference (cat + 2× argsort)':<42} {ref['seconds']:>6.1f} s {ref['peak_additional_mb']:>17.0f} MB"
    )
    if args.total < 100_000_000:
        print(
            "(fewer than 100M scores: the fixed ~80 MB of per-chunk temporaries weigh more; goal set for 100M)"
        )
    print(
        f"memory: {topk['memory_ratio']:.1f}× less (goal ≥ {GOAL_MEMORY:.0f}×) {verdict(topk['pass'])};  "
        f"time: {topk['time_ratio']:.2f}× the reference;  identical selection: {topk['same_selection']}"
    )

    ideal = files["ideal_bytes"]
    print(
        f"\n(b) mask file, tiny Llama ({files['numel'] / 1e6:.1f}M parameters, {files['tensors']} tensors, "
        f"density 0.5); ideal numel/8 = {ideal / MB:.2f} MB, header {files['header_bytes'] / 1024:.1f} KB"
    )
    print(f"{'format':<30} {'size':>12} {'× ideal':>9}")
    for name, size in files["sizes"].items():
        print(f"{name:<30} {size / MB:>9.2f} MB {size / ideal:>8.3f}×")
    ours_size = files["sizes"]["hfhooks (bit-packed U8)"]
    print(
        f"hfhooks file = {ours_size:,} B ≤ {GOAL_FILE} × numel/8 + header = {files['limit_bytes']:,.0f} B "
        f"{verdict(files['pass'])}  (save {files['save_s']:.2f} s, load+verify {files['load_s']:.2f} s)"
    )

    print(
        f"\n(c) saliency (grad_abs_sum) vs plain forward+backward: Llama 4×256, vocab {args.vocab} "
        f"({sal['params'] / 1e6:.1f}M params), {sal['batches']} batches of 8×128, {sal['reps']} interleaved pairs"
    )
    print(f"{'run':<34} {'median time':>12}")
    print(f"{'plain forward+backward (eval)':<34} {sal['median_plain_s']:>10.2f} s")
    print(f"{'compute_saliency':<34} {sal['median_saliency_s']:>10.2f} s")
    print(
        f"median pair ratio {sal['median_ratio']:.3f}× (goal ≤ {GOAL_SALIENCY}×) {verdict(sal['pass'])};  "
        f"pair ratios {', '.join(f'{r:.2f}' for r in sal['pair_ratios'])}"
    )
    il = sal["interleaved"]
    print(
        f"cross-check, {il['steps']} batch-level pairs inside one call: median step ratio "
        f"{il['median_step_ratio']:.3f}×, fixed cost {il['fixed_per_call_s'] * 1000:.0f} ms per call → "
        f"{il['estimated_ratio_over_n_batches']:.3f}× over {sal['batches']} batches {verdict(il['pass'])}"
    )
    load = os.getloadavg()
    print(f"(load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "worker"}
    out.write_text(
        json.dumps(
            {
                "config": config,
                "torch": torch.__version__,
                "cpus": os.cpu_count(),
                "load_average_start_end": [load_start, os.getloadavg()],
                "topk": topk,
                "file_size": files,
                "saliency": sal,
                "pass": bool(topk["pass"] and files["pass"] and sal["pass"]),
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
