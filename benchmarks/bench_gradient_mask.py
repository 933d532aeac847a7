"""Step time of a stock Trainer with GradientMaskCallback / GradientRoutingCallback vs. no callback.

All three configurations run in one process, interleaved in rounds (A, B, C, A, B, C, ...) from the same
initial weights and data, so machine noise hits them alike. Step time is measured between ``on_step_begin``
and ``on_step_end`` by a timing callback present in every configuration; the first steps of each run are
warm-up and dropped. Reports the median step time and its ratio to the plain Trainer.

Goals (issue 3): GradientMaskCallback(freeze="hard") ≤ 1.05×, GradientRoutingCallback ≤ 1.10×.

    python benchmarks/bench_gradient_mask.py            # full (a few minutes on 2 cores)
    python benchmarks/bench_gradient_mask.py --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers as T
from transformers.utils import logging as hf_logging

from hfhooks import (
    GradientMaskCallback,
    GradientRoutingCallback,
    ParamIndex,
    ParamMask,
    TaggedCollator,
    TaggedDataset,
    dedicated_mask,
)


class StepTimer(T.TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def build(args):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
    )  # fmt: skip
    return T.LlamaForCausalLM(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (1: less noise between steps on a shared machine)",
    )
    p.add_argument("--out", default="benchmarks/results/bench_gradient_mask.json")
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds = 6, 2
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    model0 = build(args)
    state0 = {k: v.clone() for k, v in model0.state_dict().items()}
    index = ParamIndex(model0)
    g = torch.Generator().manual_seed(1)
    salun_like = ParamMask.from_scores({n: torch.rand(q.shape, generator=g) for n, q in index.items()}, 0.5)
    dedicated = dedicated_mask(model0, mlp_units=64, heads=1)
    n_examples = args.batch * (args.steps + 2) * 2
    ids = torch.randint(0, args.vocab, (n_examples, args.seq), generator=g)
    labels = [(i % 3) - 1 for i in range(n_examples)]  # forget / retain / unlabelled in equal parts
    examples = [{"input_ids": ids[i], "labels": ids[i]} for i in range(n_examples)]
    data = TaggedDataset(examples, tags={"routing": labels}, group_by="routing", batch_size=args.batch)
    tagged = TaggedCollator(homogeneous="routing")

    def untagged(items):
        return {k: v for k, v in tagged(items).items() if k != "routing"}

    configs = {
        "plain Trainer": (lambda: [], untagged),
        "GradientMaskCallback(hard, 50% element mask)": (
            lambda: [GradientMaskCallback(salun_like)],
            untagged,
        ),
        "GradientRoutingCallback(SGTM, k=64, h=1)": (lambda: [GradientRoutingCallback(dedicated)], tagged),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        for name, (callbacks, collator) in configs.items():
            model = build(args)
            model.load_state_dict(state0)
            timer = StepTimer()
            targs = T.TrainingArguments(
                output_dir="/tmp/hfhooks-bench", per_device_train_batch_size=1, gradient_accumulation_steps=1,
                max_steps=args.steps, learning_rate=1e-4, weight_decay=0.01, max_grad_norm=1.0, use_cpu=True,
                report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=r,
            )  # fmt: skip
            T.Trainer(
                model=model,
                args=targs,
                train_dataset=data,
                data_collator=collator,
                callbacks=[timer, *callbacks()],
            ).train()
            times[name].extend(timer.times[2:])  # drop warm-up steps
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    base = statistics.median(times["plain Trainer"])
    goals = {"plain Trainer": None, **dict(zip(list(configs)[1:], (1.05, 1.10)))}
    n_params = sum(q.numel() for q in model0.parameters())
    print(f"\nLlama {args.layers}×{args.hidden}, {n_params / 1e6:.1f}M params, batch {args.batch}×{args.seq} tokens, "
          f"AdamW, {len(times['plain Trainer'])} timed steps per config, torch {torch.__version__} ({args.threads} threads), {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"{'configuration':<46} {'median step':>12} {'ratio':>7} {'goal':>6}  result")
    results = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = med / base
        goal = goals[name]
        verdict = "" if goal is None else ("PASS" if ratio <= goal else "FAIL")
        print(
            f"{name:<46} {med * 1000:>9.1f} ms {ratio:>6.3f}× {'' if goal is None else f'≤{goal:.2f}':>6}  {verdict}"
        )
        results[name] = {"median_step_s": med, "ratio": ratio, "goal": goal, "steps": len(ts)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
