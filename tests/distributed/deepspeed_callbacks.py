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
* ``unlearning_scoring``: ``SaliencyUnlearningCallback`` scoring its own mask at train begin (ZeRO-3: a global
  top-k over the ranks' partitions), the same checks, plus: the mask is the same on both ranks (hash), equals the
  single-process mask of an unsharded copy, and the run ends bit-identical to one given that mask (the scoring
  pass left nothing in the engine's gradient state);
* refusals (``routing``, ``attribution``, ``restoration``): the message.

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
    AttributionAlignmentCallback,
    GradientMaskCallback,
    GradientRoutingCallback,
    LayerRestorationCallback,
    ParamIndex,
    ParamMask,
    SaliencyUnlearningCallback,
    TaggedCollator,
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


def train(out, stage, make_callback, dataset, collator=None, offload=False, resume=False, keep_weights=False):
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
    if keep_weights:
        result["weights"] = gather(index)
    return result


def mask_hash(mask) -> str:
    import hashlib

    h = hashlib.sha256()
    for n in sorted(mask.names()):
        h.update(n.encode() + mask.packed(n).numpy().tobytes())
    return h.hexdigest()


def train_scoring(out, stage, forget, dataset):
    """SalUn scoring its own mask through the engine (ZeRO-3: a global top-k over the ranks' partitions), then
    training; compared with the single-process mask of an unsharded copy, and with a run given that mask as
    ``mask=`` (equal final weights: the scoring pass left no gradient in the engine)."""
    from hfhooks import compute_saliency

    args = training_args(os.path.join(out, "scored"), stage)
    if stage == 3:
        deepspeed.init_distributed(dist_backend="gloo")
    model = tiny(stage)
    index = ParamIndex(model)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        initial = {n: p.detach().clone() for n, p in index.items()}
    reference = T.LlamaForCausalLM(model.config)
    assert not any(hasattr(p, "ds_id") for p in reference.parameters())
    reference.load_state_dict(initial)
    # two scoring batches: the engine's epilogue after each backward is exercised twice
    loader = torch.utils.data.DataLoader(forget, batch_size=4, collate_fn=TaggedCollator().base)
    single = ParamMask.from_scores(compute_saliency(reference, loader, progress=False), 0.5)
    cb = SaliencyUnlearningCallback(forget, objective="graddiff", ratio=0.5, batch_size=4, progress=False)
    trainer = T.Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=TaggedCollator(), callbacks=[cb]
    )
    try:
        trainer.train()
    except RuntimeError as e:
        return {"status": "error", "message": str(e)}
    result = compare(trainer, index, initial, cb.mask)
    scored = gather(index)
    given = train(os.path.join(out, "given"), stage,
                  lambda _: SaliencyUnlearningCallback(forget, objective="graddiff", mask=single, progress=False),
                  dataset, TaggedCollator(), keep_weights=True)  # fmt: skip
    result.update(status="ok", hooks_left=hooks_left(model), zero=trainer.accelerator.deepspeed_plugin.zero_stage,
                  mask_hash=mask_hash(cb.mask), equals_single_process=cb.mask == single,
                  density=cb.mask.density(), given_status=given["status"],
                  equals_given_mask_run=all(torch.equal(scored[n], given["weights"][n]) for n in scored)
                  if given["status"] == "ok" else False)  # fmt: skip
    return result


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
        r["unlearning_scoring"] = train_scoring(os.path.join(where, "score"), stage, forget, tagged)
        r["routing"] = refused(where, stage, GradientRoutingCallback(mlp_units=4, heads=1))
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
