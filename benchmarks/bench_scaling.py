"""Per-rank memory of SalUn scoring and of the hard freeze at 1 vs 2 ranks, under FSDP2 and DeepSpeed ZeRO-3.

Each configuration is a fresh ``torchrun --nproc_per_node {1,2}`` launch (gloo, CPU) of this file in worker mode;
every rank reports its own peak RSS (``VmHWM``), the part of it above the RSS it had once the libraries were
imported, right before the weights are allocated (the model's and the operation's memory: the interpreter, torch
and transformers weigh the same at any number of ranks), and the part added by the operation itself. The model is a Llama-shaped ``LlamaForCausalLM`` of ~214M fp32 parameters (hidden 768, 32
layers, vocabulary 8 192: the decoder layers hold 94 % of them, as in an LLM), so that weights dominate; one batch of 1×16 tokens.

* ``salun``: ``SaliencyUnlearningCallback.on_train_begin`` scoring its own mask (ratio 0.5) over 2 forget
  batches — FSDP2: each rank scores its shards; ZeRO-3: each rank its partitions, through the engine built by a
  stock ``Trainer``; a global top-k either way (summed histograms). The peak is read when the mask is built.
* ``freeze``: ``GradientMaskCallback(freeze="hard")`` with a 50 % element mask over every parameter, 2 training
  steps (AdamW). FSDP2: the callback's events driven around a ``fully_shard``-ed model (as the Trainer calls them;
  on CPU accelerate runs FSDP as DDP); ZeRO-3: a stock ``Trainer``.

Goal: per-rank memory (above the post-import RSS) of SalUn scoring at 2 ranks ≤ 0.6× the 1-rank figure, under
FSDP2 and under ZeRO-3. The hard-freeze rows are reported for comparison.

    python benchmarks/bench_scaling.py            # 8 launches, ≈ 4-6 min on 2 loaded cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from peakrss import reset_peak, status_kb

GOAL = 0.6
VOCAB, TOKENS = 8192, 16


def config():
    import transformers as T

    return T.LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=32,
                         num_attention_heads=12, num_key_value_heads=4)  # fmt: skip


class Data:
    """8 examples of 16 tokens (map-style)."""

    def __init__(self, n=8):
        import torch

        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, TOKENS), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def half_mask(model):
    """A 50 % element mask over every parameter, built one tensor at a time (no score tensor at all)."""
    import torch

    from hfhooks import ParamIndex, ParamMask

    g = torch.Generator().manual_seed(1)
    bits = {}
    for n, p in ParamIndex(model).items():
        bits[n] = torch.rand(getattr(p, "ds_shape", p.shape), generator=g) < 0.5
    return ParamMask(bits)


class Stop(Exception):
    """Raised by the probe once the measured phase is over."""


def probe_callback(result: dict):
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # after SalUn's (callbacks run in order)
            if result.get("stop_at_begin"):
                result["peak_kb"] = status_kb("VmHWM")
                raise Stop

    return Probe()


def before_probe(result: dict):
    """First in the callback list: the engine is built, the operation has not started."""
    from transformers import TrainerCallback

    class Before(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            result["before_kb"] = status_kb("VmRSS")

    return Before()


def zero3(op: str, out: str, result: dict) -> None:
    import deepspeed
    import torch
    import transformers as T

    from hfhooks import (
        GradientMaskCallback,
        SaliencyUnlearningCallback,
        TaggedCollator,
        forget_retain_dataset,
    )

    # no JIT compile of DeepSpeed's shared-memory all-reduce (inference only; a compile killed midway leaves a
    # lock every later init waits on: see tests/distributed/deepspeed_callbacks.py)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    # DeepSpeed's defaults keep up to 1e9 gathered parameters live between uses (the whole model here); 1e6 makes
    # it release each layer's gathered weights after use, the setting a run that needs ZeRO-3's memory uses.
    # Its default reduce / prefetch buckets (5e8 / 5e7 elements: up to 2 GB fp32) are per-rank buffers that do not
    # shrink with more ranks; a memory-bound run sets them small too (measured: +2.2 GB per rank at the defaults).
    zero = {
        "stage": 3,
        "stage3_max_live_parameters": 1e6,
        "stage3_max_reuse_distance": 1e6,
        "reduce_bucket_size": 5e6,
        "stage3_prefetch_bucket_size": 5e6,
    }
    ds = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}  # fmt: skip
    args = T.TrainingArguments(output_dir=out, per_device_train_batch_size=1, max_steps=2, use_cpu=True,
                               optim="adamw_torch", report_to=[], logging_strategy="no", save_strategy="no",
                               disable_tqdm=True, deepspeed=ds)  # fmt: skip
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    result["imported_kb"] = status_kb("VmRSS")
    model = T.AutoModelForCausalLM.from_config(config())  # under zero.Init: partitioned as it is built
    data = Data()
    if op == "salun":
        forget = [data[i] for i in range(2)]
        cb = SaliencyUnlearningCallback(forget, objective="graddiff", ratio=0.5, batch_size=1, progress=False)
        dataset, collator = forget_retain_dataset(forget, [data[i] for i in range(2, 8)]), TaggedCollator()
        result["stop_at_begin"] = True
    else:
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            mask = half_mask(model)
        cb, dataset, collator = GradientMaskCallback(mask, freeze="hard"), data, None
    trainer = T.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                        callbacks=[before_probe(result), cb, probe_callback(result)])  # fmt: skip
    result["reset"] = reset_peak()  # the engine is built inside train(): counted, as it is at any rank count
    with contextlib.suppress(Stop):
        trainer.train()
    result.setdefault("peak_kb", status_kb("VmHWM"))


def fsdp2(op: str, out: str, result: dict) -> None:
    import torch
    import transformers as T
    from torch.distributed.fsdp import fully_shard

    from hfhooks import GradientMaskCallback, SaliencyUnlearningCallback

    args = T.TrainingArguments(output_dir=out, use_cpu=True, report_to=[], max_steps=2, fsdp="full_shard",
                               fsdp_config={"version": 2})  # fmt: skip
    state, control = T.TrainerState(), T.TrainerControl()
    torch.manual_seed(0)
    with torch.device("meta"):  # FSDP2's large-model path: no rank ever holds the full model
        model = T.LlamaForCausalLM(config())
    data = Data()
    cb = None if op == "salun" else GradientMaskCallback(half_mask(model), freeze="hard")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    result["imported_kb"] = status_kb("VmRSS")  # every library loaded, no weight allocated yet
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # values do not matter here, only that they are finite and not all equal
            p.to_local().normal_(0, 0.02)
        for b in model.buffers():  # the rotary inverse frequencies
            b.copy_(
                1.0 / (10000 ** (torch.arange(0, b.numel() * 2, 2, dtype=torch.float32) / (b.numel() * 2)))
            )
    result["reset"] = reset_peak()
    result["before_kb"] = status_kb("VmRSS")
    if op == "salun":
        cb = SaliencyUnlearningCallback([data[i] for i in range(2)], objective="graddiff", ratio=0.5,
                                        batch_size=1, progress=False)  # fmt: skip
        cb.on_train_begin(args, state, control, model=model, optimizer=None)
        result["peak_kb"] = status_kb("VmHWM")
        result["density"] = cb.mask.density()
        return
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    result["before_kb"] = status_kb("VmRSS")
    cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    for step in range(2):
        batch = data.ids[step : step + 1]
        model(input_ids=batch, labels=batch).loss.backward()
        cb.on_pre_optimizer_step(args, state, control, model=model, optimizer=opt)
        opt.step()
        cb.on_optimizer_step(args, state, control, model=model, optimizer=opt)
        opt.zero_grad()
        state.global_step = step + 1
    cb.on_train_end(args, state, control, model=model, optimizer=opt)
    result["peak_kb"] = status_kb("VmHWM")


def worker(engine: str, op: str, out: str) -> None:
    import torch.distributed as dist

    if engine == "fsdp2":
        dist.init_process_group("gloo")
    result: dict = {}
    t0 = time.perf_counter()
    (fsdp2 if engine == "fsdp2" else zero3)(op, out, result)
    result["seconds"] = time.perf_counter() - t0
    result.pop("stop_at_begin", None)
    rank = dist.get_rank()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(engine: str, op: str, ranks: int, port: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        # a fixed mmap threshold: freed tensors go back to the OS, so RSS follows live memory (glibc's dynamic
        # threshold would keep freed blocks of up to 32 MB in the heap and count them at every later peak)
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(Path(__file__).parents[1]), MALLOC_MMAP_THRESHOLD_="1048576")  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(port), __file__, "--worker", engine, op, out]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{engine}/{op}/{ranks} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def mb(rows: list[dict], key: str, minus: str | None = None) -> float:
    """The largest per-rank figure in MB (``key`` minus ``minus``)."""
    return max(r[key] - (r[minus] if minus else 0) for r in rows) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=3, metavar=("ENGINE", "OP", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--engines", default="fsdp2,zero3")
    p.add_argument("--ops", default="salun,freeze")
    p.add_argument("--out", default="benchmarks/results/bench_scaling.json")
    a = p.parse_args()
    if a.worker:
        worker(*a.worker)
        return 0
    engines, ops = a.engines.split(","), a.ops.split(",")
    rows, port, t0 = {}, 29600 + os.getpid() % 300, time.perf_counter()
    for engine in engines:
        for op in ops:
            for ranks in (1, 2):
                port += 1
                res = rows[f"{engine}/{op}/{ranks}"] = launch(engine, op, ranks, port)
                print(f"{engine:6} {op:7} ranks={ranks}: peak RSS {mb(res, 'peak_kb'):6.0f} MB per rank, "
                      f"{mb(res, 'peak_kb', 'imported_kb'):6.0f} MB above imports, "
                      f"{mb(res, 'peak_kb', 'before_kb'):6.0f} MB added by the operation "
                      f"({max(r['seconds'] for r in res):.0f} s)", flush=True)  # fmt: skip
    print("\n| engine | operation | per-rank peak RSS, 1 rank → 2 ranks | above imports, 1 → 2 | ratio | "
          "added by the operation, 1 → 2 | goal (ratio above imports) |\n|---|---|---|---|---|---|---|")  # fmt: skip
    failed = False
    for engine in engines:
        for op in ops:
            one, two = rows[f"{engine}/{op}/1"], rows[f"{engine}/{op}/2"]
            ratio = mb(two, "peak_kb", "imported_kb") / mb(one, "peak_kb", "imported_kb")
            goal = ""
            if op == "salun":
                ok = ratio <= GOAL
                failed |= not ok
                goal = f"≤ {GOAL}× {'PASS' if ok else 'FAIL'}"
            print(f"| {engine} | {op} | {mb(one, 'peak_kb'):.0f} → {mb(two, 'peak_kb'):.0f} MB | "
                  f"{mb(one, 'peak_kb', 'imported_kb'):.0f} → {mb(two, 'peak_kb', 'imported_kb'):.0f} MB | "
                  f"**{ratio:.2f}×** | {mb(one, 'peak_kb', 'before_kb'):.0f} → {mb(two, 'peak_kb', 'before_kb'):.0f} MB"
                  f" | {goal} |")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; {'FAIL' if failed else 'PASS'}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
