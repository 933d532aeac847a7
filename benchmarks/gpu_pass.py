"""GPU pass (issue #12): every callback through the real engines, bf16 on CUDA, peak memory per rank.

A prepared script, never a CI dependency. For each engine — FSDP2 through the Trainer's own accelerate path
(``fsdp="full_shard", fsdp_config={"version": 2}``: on CUDA the parameters become DTensors), DeepSpeed ZeRO-2 and
ZeRO-3 (``bf16=True``) — and each callback, a stock ``Trainer`` trains a Llama built from a config (4 layers,
hidden 256; no download) for 3 steps, then every rank checks, on the gathered full weights (and DeepSpeed's fp32
masters): the coordinates that must hold did not move, no hfhooks hook is left, and the callback acted (trained
coordinates changed; SalUn's scored mask hashes the same on every rank; restored layers equal the reference).
``torch.cuda.max_memory_allocated()`` (``--device cpu``: peak RSS) is reset and recorded per case.

    PYTHONPATH=$PWD python benchmarks/gpu_pass.py --out /tmp/gpu_pass      # one GPU: world size 1 per engine
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/gpu_pass.py --out /tmp/gp --nproc 2 --device cpu  # smoke

Launch it with plain ``python`` (not torchrun): this driver starts one ``torchrun --nproc_per_node N`` per engine: a fresh
process per engine, since accelerate keeps the engine it selected process-wide, and one that hangs or dies costs
only its own cells (``--timeout`` per engine). It writes ``<out>/<engine>/rank<R>.json``, ``<out>/gpu_pass.md``
(engine × callback: ok / error, moved, hooks, peak MB per rank), ``<out>/results.json`` and exits 1 when a check fails. On CPU
accelerate runs ``fsdp=`` as plain DDP (the table says so) and DeepSpeed runs with ``DS_ACCELERATOR=cpu``, gloo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers as T
from torch.distributed.tensor import DTensor

from hfhooks import (
    FORGET,
    AttributionAlignmentCallback,
    GradientMaskCallback,
    GradientRoutingCallback,
    LayerRestorationCallback,
    ParamIndex,
    ParamMask,
    SaliencyUnlearningCallback,
    TaggedCollator,
    TaggedDataset,
    forget_retain_dataset,
    installed_hooks,
)

ENGINES = ("fsdp2", "zero2", "zero3")
CASES = ("gradient_mask", "unlearning_scoring", "routing_strict", "attribution", "restoration")
EXPECTED_REFUSALS = {
    ("zero3", "attribution")
}  # documented: double backprop through ZeRO-3 (docs/compatibility.md)
VOCAB, SEQ = 512, 32


# -- worker (one rank of one engine) ----------------------------------------------------------------------------
def training_args(a, out, **kw):
    engine = {"fsdp": "full_shard",
              "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}  # fmt: skip
    if a.engine.startswith("zero"):
        zero = {"stage": int(a.engine[-1])}
        engine = {"deepspeed": {"zero_optimization": zero, "bf16": {"enabled": "auto"},
                                "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "gradient_clipping": "auto", "train_batch_size": "auto"}}  # fmt: skip
    return T.TrainingArguments(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                               max_steps=3, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5,
                               optim="adamw_torch", bf16=True, use_cpu=a.device == "cpu", report_to=[],
                               disable_tqdm=True, seed=0, save_strategy="no",
                               **{"logging_strategy": "no", **engine, **kw})  # fmt: skip


def build(a, classifier=False):
    """The Llama (ZeRO-3: built after ``deepspeed.init_distributed``, so transformers partitions it at init)."""
    if a.engine == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if a.device == "cuda" else "gloo")
    torch.manual_seed(0)  # the same initial weights on every rank
    # eager attention: the fused SDPA kernels have no double backward (attribution alignment needs one)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, num_labels=2,
                        attn_implementation="eager")  # fmt: skip
    # no pad_token_id while building: under ZeRO-3's zero.Init, transformers' init of the padding row indexes the
    # rank's empty placeholder (IndexError on rank 1, seen with 5.24); the classifier reads it only in forward
    model = (T.LlamaForSequenceClassification if classifier else T.LlamaForCausalLM)(cfg)
    model.config.pad_token_id = 0
    return model


def full_weights(a, model) -> dict:
    """name -> the full module weight on CPU (collective): DTensors gathered, ZeRO-3 partitions gathered."""
    out = {}
    for n, p in ParamIndex(model).items():
        if a.engine == "zero3" and hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                out[n] = p.detach().cpu().clone()
        else:
            out[n] = (p.full_tensor() if isinstance(p, DTensor) else p.detach()).cpu().clone()
    return out


def masters(a, model) -> dict:
    """DeepSpeed's full fp32 master weights (collective); none for FSDP2, whose parameters are the masters."""
    if not a.engine.startswith("zero"):
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).reshape(p.ds_shape if hasattr(p, "ds_id") else p.shape).cpu()
            for n, p in ParamIndex(model).items()}  # fmt: skip


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def count(now: dict, then: dict, select: dict | None, changed: bool = False) -> int:
    """Coordinates (``select[name]`` True; all where ``select`` has no entry) whose bits differ (``then`` cast to
    ``now``'s dtype: under DeepSpeed bf16 the engine casts the module and builds its masters from that)."""
    total = 0
    for n, x in now.items():
        y = then[n].to(x.dtype)
        sel = select[n].cpu() if select is not None and n in select else None  # masks may live on the GPU
        diff = bits(x) != bits(y) if not changed else x != y
        total += int(diff[sel].sum() if sel is not None else diff.sum())
    return total


def hooks_left(model, cb) -> int:
    n = len(installed_hooks(model)) + sum(len(p._backward_hooks or {}) for p in model.parameters())
    return n + sum(getattr(getattr(cb, k, None), "num_hooks", 0) for k in ("router", "alignment", "mask"))


def lm_rows(n=64):
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def mask_hash(mask) -> str:
    h = hashlib.sha256()
    for n in sorted(mask.names()):
        h.update(n.encode() + mask.packed(n).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def train(a, case, make, classifier=False, **args_kw) -> tuple:
    """Build, capture the initial weights, train with ``make(model, initial) -> (callback, data, collator)``."""
    args = training_args(a, os.path.join(a.out, a.engine, case), **args_kw)
    model = build(a, classifier)
    initial = full_weights(a, model)
    cb, data, collator = make(model, initial)
    trainer = T.Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[cb])
    trainer.train()
    now, master = full_weights(a, model), masters(a, model)
    result = {"status": "ok", "hooks_left": hooks_left(model, cb), "dtype": str(next(iter(now.values())).dtype),
              "dtensor_params": sum(type(p).__name__ == "DTensor" for p in model.parameters())}  # fmt: skip
    return result, cb, trainer, initial, now, master


def held(result, now, master, initial, frozen, trainable, master_reference=None):
    """Record what must hold (``frozen``) and what trained (``trainable``), in the module and the masters.

    DeepSpeed builds its fp32 masters from the module it cast to bf16: a held master coordinate keeps the bf16
    rounding of its initial value (``master_reference`` overrides: restoration writes the fp32 reference)."""
    if master_reference is None:
        master_reference = {n: t.to(now[n].dtype).float() for n, t in initial.items()}
    result["module_moved"] = count(now, initial, frozen)
    result["master_moved"] = count(master, master_reference, frozen) if master else None
    result["moved"] = result["module_moved"] + (result["master_moved"] or 0)
    result["changed"] = count(now, initial, trainable, changed=True)
    result["acted"] = result["changed"] > 0
    return result


def case_gradient_mask(a):
    def make(model, initial):  # a random 40 % trainable mask over the full shapes
        g = torch.Generator().manual_seed(1)
        cb = GradientMaskCallback(
            ParamMask.from_scores({n: torch.rand(t.shape, generator=g) for n, t in initial.items()}, 0.4)
        )
        return cb, lm_rows(), None

    r, cb, _, initial, now, master = train(a, "gradient_mask", make)
    keep = {n: cb.mask[n] for n in cb.mask.names()}
    return held(r, now, master, initial, {n: ~k for n, k in keep.items()}, keep)


def case_unlearning_scoring(a):
    rows = lm_rows()
    forget = rows[:16]

    def make(model, initial):
        cb = SaliencyUnlearningCallback(forget, objective="graddiff", ratio=0.5, batch_size=4, progress=False)
        return cb, forget_retain_dataset(forget, rows[16:]), TaggedCollator()

    r, cb, _, initial, now, master = train(a, "unlearning_scoring", make)
    keep = {n: cb.mask[n] for n in cb.mask.names()}
    r.update(mask_hash=mask_hash(cb.mask), density=round(cb.mask.density(), 4))
    return held(r, now, master, initial, {n: ~k for n, k in keep.items()}, keep)


def case_routing_strict(a):
    """Forget-only data: the strict step must hold every shared (non-dedicated) coordinate."""
    rows = lm_rows()

    def make(model, initial):
        data = TaggedDataset(rows, tags={"routing": [FORGET] * len(rows)})
        return GradientRoutingCallback(mlp_units=16, heads=1, strict=True), data, TaggedCollator()

    r, cb, _, initial, now, master = train(a, "routing_strict", make)
    ded = {n: cb.dedicated[n] if n in cb.dedicated else torch.zeros(t.shape, dtype=torch.bool)
           for n, t in initial.items()}  # fmt: skip
    r["counts"] = {str(k): v for k, v in dict(cb.router.counts).items()}
    return held(r, now, master, initial, {n: ~d for n, d in ded.items()}, ded)


def case_attribution(a):
    ids = torch.randint(1, VOCAB, (32, SEQ), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": torch.tensor(i % 2),
             "rationale": (torch.arange(SEQ) < 8).float()} for i in range(32)]  # fmt: skip

    def make(model, initial):
        cb = AttributionAlignmentCallback(
            "grad_x_input", prior="rationale", weight=1.0, special_token_ids=[0]
        )
        return cb, TaggedDataset(rows, tags=["rationale"]), TaggedCollator()

    if a.engine == "zero3":
        # the refusal comes at train begin, where the Trainer calls it (after the engine's init: a stock bf16
        # ZeRO-3 run of this classifier stops before, in DeepSpeed, since zero.Init leaves `score` fp32)
        args = training_args(a, os.path.join(a.out, a.engine, "attribution"))
        model = build(a, classifier=True)
        make(model, None)[0].on_train_begin(args, T.TrainerState(), T.TrainerControl(), model=model)
        return {"status": "ok", "moved": 0, "changed": 0, "acted": False, "hooks_left": 0}
    r, _, trainer, initial, now, _ = train(a, "attribution", make, classifier=True, logging_steps=1,
                                           logging_strategy="steps")  # fmt: skip
    terms = [h["align/term"] for h in trainer.state.log_history if "align/term" in h]
    r.update(terms=terms, moved=0, changed=count(now, initial, None, changed=True))
    r["acted"] = bool(terms) and all(math.isfinite(t) for t in terms) and r["changed"] > 0
    return r


def case_restoration(a):
    def make(model, initial):
        return LayerRestorationCallback(dict(initial), "0:1"), lm_rows(), None

    r, _, _, initial, now, master = train(a, "restoration", make)
    layer0 = {n: n.startswith("model.layers.0.") for n in initial}
    sel = {n: torch.full(t.shape, v) for (n, t), v in zip(initial.items(), layer0.values())}
    r = held(r, now, master, initial, sel, {n: ~s for n, s in sel.items()}, master_reference=initial)
    r["restored_equal_reference"] = r["moved"] == 0
    return r


def worker(a):
    rank, cuda = int(os.environ["RANK"]), a.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    sys.path.insert(0, str(Path(__file__).parent))
    from peakrss import peak_kb, reset_peak

    results = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "world_size": int(os.environ["WORLD_SIZE"]),
    }
    for case in a.cases.split(","):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            exact = reset_peak()
        began = time.perf_counter()
        try:
            r = globals()[f"case_{case}"](a)
        except Exception as e:  # reported in the table; the other cases go on
            where = traceback.extract_tb(e.__traceback__)[-1]
            r = {"status": "error", "message": f"{type(e).__name__}: {e}"[:600],
                 "where": f"{where.filename}:{where.lineno}", "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        r["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_kb(exact) / 1024, 1)
        r["seconds"] = round(time.perf_counter() - began, 1)
        results[case] = r
        print(f"[rank {rank}] {a.engine}/{case}: {r['status']} ({r['seconds']} s) {r.get('message', '')[:300]}",
              flush=True)  # fmt: skip
        # written after each case: a later hang keeps the results so far
        Path(a.out, a.engine, f"rank{rank}.json").write_text(json.dumps(results, indent=1, default=str))
    if torch.distributed.is_initialized():  # exiting with live gloo threads can abort ("terminate called…")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# -- driver ------------------------------------------------------------------------------------------------------
def verdict(engine: str, case: str, ranks: list[dict]) -> tuple[bool, str]:
    """Whether the cell passes, and its text."""
    missing = [str(i) for i, r in enumerate(ranks) if case not in r]
    if missing:  # a rank that hung or died: never a pass, an expected refusal included
        return False, f"FAIL: no result from rank(s) {', '.join(missing)} (see the launch's output below)"
    rs = [r[case] for r in ranks]
    if (engine, case) in EXPECTED_REFUSALS:
        ok = all(
            r["status"] == "error" and "ZeRO-3" in r["message"] for r in rs
        )  # hfhooks' refusal, no other
        return ok, ("refused as documented: " if ok else "NOT refused: ") + rs[0].get("message", "")[:120]
    if any(r["status"] != "ok" for r in rs):
        return False, "error: " + next(r for r in rs if r["status"] != "ok").get("message", "")[:200]
    same_mask = len({r.get("mask_hash") for r in rs}) == 1
    ok = same_mask and all(r["moved"] == 0 and r["hooks_left"] == 0 and r["acted"] for r in rs)
    if engine == "fsdp2" and ranks[0].get("device") != "cpu":  # on CUDA the real FSDP2 path makes DTensors
        ok = ok and all(r["dtensor_params"] > 0 for r in rs)
    extra = f", mask {rs[0]['mask_hash']} on all ranks" if "mask_hash" in rs[0] and same_mask else ""
    extra += ", mask DIFFERS across ranks" if not same_mask else ""
    extra += f", {rs[0]['dtensor_params']} DTensor params" if engine == "fsdp2" else ""
    return ok, f"{'ok' if ok else 'FAIL'}: changed {rs[0]['changed']}, {rs[0]['dtype']}{extra}"


def launch(a, engine: str) -> str:
    """One torchrun for ``engine``; returns the tail of its output."""
    os.makedirs(os.path.join(a.out, engine), exist_ok=True)
    for stale in Path(a.out, engine).glob("rank*.json"):  # a cell must come from this launch
        stale.unlink()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if a.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc), "--master_port",
           str(29500 + ENGINES.index(engine) + 7), __file__, "--worker", "--engine", engine, "--out", a.out,
           "--device", a.device, "--cases", a.cases]  # fmt: skip
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
        return f"rc {p.returncode}\n" + (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        return f"timed out after {a.timeout} s\n" + str(e.stdout or "")[-3000:]


def driver(a) -> int:
    rows, failed, notes, everything = [], 0, [], {}
    for engine in a.engines.split(","):
        began = time.perf_counter()
        tail = launch(a, engine)
        print(f"{engine}: {round(time.perf_counter() - began)} s, {tail.splitlines()[0]}", flush=True)
        files = sorted(Path(a.out, engine).glob("rank*.json"))
        ranks = everything[engine] = [json.loads(f.read_text()) for f in files]
        if len(ranks) < a.nproc:
            ranks += [{}] * (a.nproc - len(ranks))
            notes.append(f"{engine}: {len(files)} of {a.nproc} ranks wrote results; launch: {tail[-1500:]}")
        for case in a.cases.split(","):
            ok, text = verdict(engine, case, ranks)
            failed += not ok
            cells = [r.get(case, {}) for r in ranks]
            peaks = " / ".join(str(c.get("peak_mb", "–")) for c in cells)
            moved = max((c.get("moved", 0) for c in cells), default=0)
            hooks = max((c.get("hooks_left", 0) for c in cells), default=0)
            rows.append(f"| {engine} | {case} | {text.replace('|', '/')} | {moved} | {hooks} | {peaks} |")
    device = next((r.get("device") for r in ranks if r.get("device")), a.device)
    memory = "torch.cuda.max_memory_allocated" if a.device == "cuda" else "peak RSS (VmHWM)"
    lines = [
        f"GPU pass: device {device}, {a.nproc} rank(s) per engine, bf16; peak MB = {memory} per rank.",
        "",
    ]
    if a.device == "cpu":
        lines += [
            "On CPU accelerate runs `fsdp=` as plain DDP: the fsdp2 row shows the plumbing, not FSDP2.",
            "",
        ]
    lines += [
        "| engine | callback | result | moved | hooks left | peak MB (per rank) |",
        "|---|---|---|---|---|---|",
    ]
    text = "\n".join(lines + rows + [""] + notes) + "\n"
    Path(a.out, "gpu_pass.md").write_text(text)
    Path(a.out, "results.json").write_text(json.dumps(everything, indent=1))  # every rank of every engine
    print(text + f"{failed} cell(s) failed" if failed else text + "all cells passed")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--nproc", type=int, default=1, help="ranks per engine (one GPU: 1; NCCL needs a GPU per rank)"
    )
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--timeout", type=int, default=300, help="seconds per engine launch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.out = os.path.abspath(a.out)
    if not a.worker:
        return driver(a)
    if a.engine.startswith("zero"):
        import deepspeed

        if a.device == "cpu":  # else a JIT compile of an op only inference uses (see deepspeed_callbacks.py)
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    worker(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
