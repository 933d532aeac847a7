"""Launched by tests/compat/test_deepspeed.py under `torchrun --nproc_per_node 2` (gloo, CPU): one launch for ZeRO-1, 2, 3.

A stock ``Trainer`` with ``TrainingArguments(deepspeed={...zero_optimization.stage: N...}, use_cpu=True)`` and a
torch AdamW (weight decay 0.1, gradient accumulation 2, clipping 0.5) trains a tiny Llama:

* ``gradient_mask``: ``GradientMaskCallback`` (hard freeze); this rank reports the frozen coordinates that moved in
  the gathered module weights, in the fp32 masters, and the non-zero Adam state on them, the trainable ones that
  changed, and the hooks left;
* ``grad_only``: the same with ``freeze="grad"`` (hooks only, no write-back): weight decay must move frozen
  coordinates there, or the write-back above is not what holds them;
* ``unlearning``: ``SaliencyUnlearningCallback`` with a precomputed mask, the same checks;
* ``resumed``: ``GradientMaskCallback`` resumed from a checkpoint saved at step 2 (DeepSpeed's own shards);
* ``offload``: ``GradientMaskCallback`` with ``offload_optimizer`` (ZeRO-3: and ``offload_param``) to CPU, and
  bf16 mixed precision (a bf16 module, fp32 masters);
* ``routing_forget`` / ``routing_retain``: ``GradientRoutingCallback`` (strict, parameter level, its default
  dedicated mask) on forget-only / retain-only data; this rank reports the coordinates those steps must hold
  (forget: the shared ones, retain: the dedicated ones) that moved in the gathered module weights and in the fp32
  masters, the others that changed, the micro-batches the router counted and the hooks left;
  ``routing_leaky``: forget-only with ``strict=False``: weight decay must move shared coordinates there, or the
  strict runs hold them by accident; ``routing_offload``: forget-only, strict, with bf16 and the offload of
  ``offload`` below; ``routing_resumed``: forget-only, strict, resumed from checkpoint-2 (as ``resumed`` below);
  ``routing_activation``: retain-only at ``level="activation"`` (the forward pre-hooks route: no gradient, so no
  Adam state, may reach a dedicated coordinate);
* refusals (``unlearning_scoring``, ``attribution``, ``restoration``): the message.

Writes ``<out>/rank<R>.json``: ``zero1`` / ``zero2`` / ``zero3`` (the trained runs), then the refusals. ZeRO-3 needs ``deepspeed.init_distributed`` after ``TrainingArguments`` and before
the model is built (the Trainer's own setup comes too late for ``zero.Init``).
"""

import argparse
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported (by transformers' integration)

import deepspeed
import torch
import transformers as T
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from hfhooks import (
    FORGET,
    RETAIN,
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
)
from hfhooks.freeze.deepspeed import optimizer_state_keys

VOCAB = 48


class Data(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, 10), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def ds_config(stage: int, offload: bool = False) -> dict:
    zero = {"stage": stage}
    extra = {}
    if (
        offload
    ):  # masters and optimizer state (ZeRO-3: and the parameters) in CPU memory, stepped by torch AdamW
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
        extra["zero_force_ds_cpu_optimizer"] = False  # else DeepSpeedCPUAdam, a compiled op
        extra["bf16"] = {"enabled": True}  # and mixed precision: bf16 module, fp32 masters
    return {"zero_optimization": zero, **extra, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto"}  # fmt: skip


def training_args(out, stage, offload=False, **kw):
    if offload:
        kw["bf16"] = True
    return T.TrainingArguments(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                               max_steps=3, learning_rate=5e-2, weight_decay=0.1, max_grad_norm=0.5,
                               optim="adamw_torch", use_cpu=True, report_to=[], logging_strategy="no",
                               disable_tqdm=True, seed=0, deepspeed=ds_config(stage, offload),
                               **{"save_strategy": "no", **kw})  # fmt: skip


def tiny(stage):
    torch.manual_seed(0)  # same init on every rank
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return T.LlamaForCausalLM(cfg)


def random_mask(index, ratio=0.4):
    g = torch.Generator().manual_seed(1)
    return ParamMask.from_scores({n: torch.rand(p.shape, generator=g) for n, p in index.items()}, ratio)


def hooks_left(model) -> int:
    return sum(len(p._backward_hooks or {}) for p in model.parameters())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def compare(trainer, index, initial, mask) -> dict:
    """Frozen coordinates moved in the gathered weights and the fp32 masters, non-zero Adam state on them, and
    trainable coordinates changed (collective: every rank runs it). Under bf16 the engine casts the module to
    bf16 and builds the masters from that: both are compared with the bf16 rounding of the initial weights."""
    keys = optimizer_state_keys(trainer.optimizer)
    moved = master_moved = state_nonzero = changed = 0
    for name, p in index.items():
        keep = mask[name]
        with deepspeed.zero.GatheredParameters([p]):
            now = p.detach().clone()
        then = initial[name].to(now.dtype)
        master = safe_get_full_fp32_param(p).reshape(now.shape)
        moved += int((bits(now[~keep]) != bits(then[~keep])).sum())
        master_moved += int((bits(master[~keep]) != bits(then[~keep].float())).sum())
        changed += int((now[keep] != then[keep]).sum())
        for key in keys:
            state_nonzero += int(
                safe_get_full_optimizer_state(p, key).reshape(now.shape)[~keep].count_nonzero()
            )
    return {"moved": moved, "master_moved": master_moved, "state_nonzero": state_nonzero, "changed": changed,
            "state_keys": keys, "dtype": str(now.dtype)}  # fmt: skip


def gather(index) -> dict[str, torch.Tensor]:
    """The module's full weights (collective)."""
    out = {}
    for name, p in index.items():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def train(out, stage, make_callback, dataset, collator=None, offload=False, resume=False):
    """Train 3 steps; ``resume``: save checkpoint-2 on the way, then a fresh model and Trainer resume from it."""
    args = training_args(
        out, stage, offload, **({"save_strategy": "steps", "save_steps": 2} if resume else {})
    )
    if stage == 3:
        deepspeed.init_distributed(dist_backend="gloo")
    model = tiny(stage)
    index = ParamIndex(model)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        initial = {n: p.detach().clone() for n, p in index.items()}
        mask = random_mask(index)
    cb = make_callback(mask)
    trainer = T.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[cb])
    try:
        trainer.train()
        if resume:  # DeepSpeed loads the module, masters and optimizer state before the callback attaches
            uninterrupted = gather(index)
            args = training_args(
                out, stage, offload
            )  # fresh: accelerate builds one DeepSpeed plugin per args
            model = tiny(stage)
            index = ParamIndex(model)
            trainer = T.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                callbacks=[make_callback(mask)])  # fmt: skip
            trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    except RuntimeError as e:
        return {"status": "error", "message": str(e)}
    result = compare(trainer, index, initial, mask)
    if resume:  # the resumed run ends where the uninterrupted one did: checkpoint-2 was really loaded
        now = gather(index)
        result["equals_uninterrupted"] = all(torch.equal(now[n], uninterrupted[n]) for n in now)
    result.update(
        status="ok", hooks_left=hooks_left(model), zero=trainer.accelerator.deepspeed_plugin.zero_stage
    )
    return result


def train_routing(out, stage, mode, strict=True, offload=False, resume=False, level="param"):
    """Train 3 steps (2 micro-batches each) on data routed ``mode`` ("forget" / "retain") with the callback's
    default dedicated mask (under ZeRO-3 built from the partitioned model's real shapes); ``resume``: save
    checkpoint-2 on the way, then a fresh model, callback and Trainer resume from it."""
    saving = {"save_strategy": "steps", "save_steps": 2} if resume else {}
    args = training_args(out, stage, offload, **saving)
    if stage == 3:
        deepspeed.init_distributed(dist_backend="gloo")
    model = tiny(stage)
    index = ParamIndex(model)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        initial = {n: p.detach().clone() for n, p in index.items()}
    data = Data()
    label = {"forget": FORGET, "retain": RETAIN}[mode]
    tagged = TaggedDataset([data[i] for i in range(len(data))], tags={"routing": [label] * len(data)})
    cb = GradientRoutingCallback(mlp_units=4, heads=1, strict=strict, level=level)
    trainer = T.Trainer(
        model=model, args=args, train_dataset=tagged, data_collator=TaggedCollator(), callbacks=[cb]
    )
    try:
        trainer.train()
        if resume:  # the callback restores its dedicated mask and counters from checkpoint-2
            uninterrupted = gather(index)
            model = tiny(stage)
            index = ParamIndex(model)
            cb = GradientRoutingCallback(mlp_units=4, heads=1, strict=strict)
            trainer = T.Trainer(model=model, args=training_args(out, stage, offload), train_dataset=tagged,
                                data_collator=TaggedCollator(), callbacks=[cb])  # fmt: skip
            trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    except RuntimeError as e:
        return {"status": "error", "message": str(e)}
    # forward pre-hooks hfhooks left (DeepSpeed's own ZeRO-3 hooks stay on the modules)
    ours = sum(getattr(h, "__module__", "").startswith("hfhooks") for m in model.modules()
               for h in m._forward_pre_hooks.values())  # fmt: skip
    keys = optimizer_state_keys(trainer.optimizer)
    result = {}
    moved = master_moved = changed = state_nonzero = 0
    for name, p in index.items():
        shape = initial[name].shape
        dedicated = cb.dedicated[name] if name in cb.dedicated else torch.zeros(shape, dtype=torch.bool)
        held = ~dedicated if mode == "forget" else dedicated  # what a step of that mode must not change
        with deepspeed.zero.GatheredParameters([p]):
            now = p.detach().clone()
        master = safe_get_full_fp32_param(p).reshape(shape)
        # bf16: the engine casts the module, and builds the masters from it
        then = initial[name].to(now.dtype)
        moved += int((bits(now[held]) != bits(then[held])).sum())
        master_moved += int((bits(master[held]) != bits(then[held].float())).sum())
        changed += int((now[~held] != then[~held]).sum())
        # zero gradient on every step: zero Adam state, or the gradient hooks did not reach DeepSpeed
        for key in keys:
            state_nonzero += int(safe_get_full_optimizer_state(p, key).reshape(shape)[held].count_nonzero())
    if resume:  # the resumed run ends where the uninterrupted one did: checkpoint-2 was really loaded
        ended = gather(index)
        result["equals_uninterrupted"] = all(torch.equal(ended[n], uninterrupted[n]) for n in ended)
    return result | {"status": "ok", "moved": moved, "master_moved": master_moved, "changed": changed,
            "state_keys": keys, "state_nonzero": state_nonzero,
            "held": sum(int(cb.dedicated[n].sum()) for n in cb.dedicated), "counts": dict(cb.router.counts),
            "steps": cb.router.steps, "hooks_left": hooks_left(model) + cb.router.num_hooks + ours,
            "zero": trainer.accelerator.deepspeed_plugin.zero_stage, "dtype": str(now.dtype)}  # fmt: skip


def refused(out, stage, callback):
    """What the callback says at train begin under this DeepSpeed setup (the Trainer's arguments)."""
    args = training_args(out, stage)
    try:
        callback.on_train_begin(args, T.TrainerState(), T.TrainerControl(), model=tiny(0), optimizer=None)
    except RuntimeError as e:
        return {"status": "error", "message": str(e)}
    return {"status": "trained without error"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="1,2,3")
    a = parser.parse_args()
    out, data = a.out, Data()
    forget = [data[i] for i in range(8)]
    tagged = forget_retain_dataset(forget, [data[i] for i in range(8, 32)])

    def unlearn(mask):
        return SaliencyUnlearningCallback(forget, objective="graddiff", mask=mask, progress=False)

    def grad_only(mask):
        return GradientMaskCallback(mask, freeze="grad")

    results = {}
    for stage in map(int, a.stages.split(",")):
        where = os.path.join(out, f"zero{stage}")
        results[f"zero{stage}"] = r = {
            "gradient_mask": train(os.path.join(where, "gm"), stage, GradientMaskCallback, data),
            "grad_only": train(os.path.join(where, "go"), stage, grad_only, data),
            "unlearning": train(os.path.join(where, "un"), stage, unlearn, tagged, TaggedCollator()),
            "offload": train(os.path.join(where, "off"), stage, GradientMaskCallback, data, offload=True),
            "resumed": train(os.path.join(where, "res"), stage, GradientMaskCallback, data, resume=True),
        }
        # refusals are read from the arguments (and the model) at train begin
        r["unlearning_scoring"] = refused(where, stage, SaliencyUnlearningCallback(forget, progress=False))
        r["routing_forget"] = train_routing(os.path.join(where, "rf"), stage, "forget")
        r["routing_retain"] = train_routing(os.path.join(where, "rr"), stage, "retain")
        r["routing_leaky"] = train_routing(os.path.join(where, "rl"), stage, "forget", strict=False)
        r["routing_offload"] = train_routing(os.path.join(where, "ro"), stage, "forget", offload=True)
        r["routing_resumed"] = train_routing(os.path.join(where, "rs"), stage, "forget", resume=True)
        r["routing_activation"] = train_routing(
            os.path.join(where, "ra"), stage, "retain", level="activation"
        )
        r["attribution"] = refused(where, stage, AttributionAlignmentCallback())
        r["restoration"] = refused(where, stage, LayerRestorationCallback({}, "0:1"))
    rank = int(os.environ["RANK"])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    if torch.distributed.is_initialized():  # exiting with live gloo threads can abort ("terminate called…")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
