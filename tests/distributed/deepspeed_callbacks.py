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
* ``restoration`` / ``restoration_offload`` (bf16 + offload) / ``restoration_variant``: ``LayerRestorationCallback``
  (layer 0 back to the initial weights): module, fp32 masters, checkpoint files and a resumed run's weights;
* ``attribution``: ``AttributionAlignmentCallback`` against the same run under DDP (ZeRO-3: the refusal);
  ``attribution_offload`` (ZeRO-1/2): with bf16 and ``offload_optimizer``; and
  ``double_backprop``: the ZeRO-3 failure the refusal cites, shown with a stock Trainer (no hfhooks);
* ``routing_forget`` / ``routing_retain``: ``GradientRoutingCallback`` (strict, parameter level, its default
  dedicated mask) on forget-only / retain-only data; this rank reports the coordinates those steps must hold
  (forget: the shared ones, retain: the dedicated ones) that moved in the gathered module weights and in the fp32
  masters, the others that changed, the micro-batches the router counted and the hooks left;
  ``routing_leaky``: forget-only with ``strict=False``: weight decay must move shared coordinates there, or the
  strict runs hold them by accident; ``routing_offload``: forget-only, strict, with bf16 and the offload of
  ``offload`` below; ``routing_resumed``: forget-only, strict, resumed from checkpoint-2 (as ``resumed`` below);
  ``routing_activation``: retain-only at ``level="activation"`` (the forward pre-hooks route: no gradient, so no
  Adam state, may reach a dedicated coordinate);
* ``unlearning_scoring`` (and ``unlearning_scoring_offload``, with bf16 and the offload of ``offload``):
  ``SaliencyUnlearningCallback`` scoring its own mask at train begin (ZeRO-3: a global
  top-k over the ranks' partitions), the same checks, plus: the mask is the same on both ranks (hash), equals the
  single-process mask of an unsharded copy, and the run ends bit-identical to one given that mask (the scoring
  pass left nothing in the engine's gradient state);

Writes ``<out>/rank<R>.json``: ``zero1`` / ``zero2`` / ``zero3`` (the trained runs), then the refusals. ZeRO-3 needs ``deepspeed.init_distributed`` after ``TrainingArguments`` and before
the model is built (the Trainer's own setup comes too late for ``zero.Init``).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

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

sys.path.insert(0, str(Path(__file__).parents[1] / "compat"))
from compat_utils import ListData, bert, rationale_rows  # tests/compat is not a package

# On a CPU accelerator DeepSpeed JIT-compiles (g++, ninja) a shared-memory all-reduce at its first init; only its
# inference all-reduce uses it. The compile costs this launch 36 s on an idle 2-core machine, and one killed midway
# leaves ~/.cache/torch_extensions/*/deepspeed_shm_comm/lock behind, on which every later init waits forever (seen
# here: a launch idle for 10 min, and a CI run timed out in this launch). Marked unavailable, DeepSpeed
# communicates through gloo alone.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

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


def train_scoring(out, stage, forget, dataset, offload=False):
    """SalUn scoring its own mask through the engine (ZeRO-3: a global top-k over the ranks' partitions), then
    training; compared with the single-process mask of an unsharded copy, and with a run given that mask as
    ``mask=`` (equal final weights: the scoring pass left no gradient in the engine). ``offload``: bf16 and the
    offload of ``offload`` (the masks are then only compared across ranks: bf16 scores differ from fp32's)."""
    from hfhooks import compute_saliency

    args = training_args(os.path.join(out, "scored"), stage, offload)
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
    if offload:
        result.update(status="ok", hooks_left=hooks_left(model), zero=trainer.accelerator.deepspeed_plugin.zero_stage,
                      mask_hash=mask_hash(cb.mask), density=cb.mask.density())  # fmt: skip
        return result
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


# -- LayerRestorationCallback -----------------------------------------------------------------------------------
def masters(index) -> dict[str, torch.Tensor]:
    """The full fp32 master weights (collective)."""
    return {n: safe_get_full_fp32_param(p).reshape(p.ds_shape if hasattr(p, "ds_id") else p.shape).clone()
            for n, p in index.items()}  # fmt: skip


def differ(a: dict, b: dict, names) -> int:
    """Coordinates of ``names`` whose bits differ between ``a`` and ``b`` (``b`` cast to ``a``'s dtype)."""
    return sum(int((bits(a[n]) != bits(b[n].to(a[n].dtype))).sum()) for n in names)


def _restoration_setup(out, stage, offload=False, **kw):
    args = training_args(out, stage, offload, **kw)
    args.max_steps = 2
    if stage == 3:
        deepspeed.init_distributed(dist_backend="gloo")
    model = tiny(stage)
    index = ParamIndex(model)
    return args, model, index, gather(index)


def restoration(out, stage, data, offload=False):
    """``mode="inplace"``, ``when=("save", "train_end")``: layer 0 restored to the initial weights at the save of
    checkpoint-2 (the last step) and at train end. Reports the coordinates of layer 0 that differ from the
    reference in the gathered module and in the fp32 masters (both fp32 here: compared bit for bit), layer 1's
    trained coordinates; then a fresh Trainer (no callback) resumes from checkpoint-2, which only loads it (no
    step is left): layer 0 must come back restored in the module and the masters (DeepSpeed's shards were
    rewritten), every other tensor as trained. ``offload``: a bf16 module (compared with the reference cast to
    bf16) and fp32 masters in DeepSpeed's CPU buffers (compared with the reference, fp32, bit for bit)."""
    args, model, index, initial = _restoration_setup(out, stage, offload, save_strategy="steps", save_steps=2)
    layer0 = [n for n in index.names() if n.startswith("model.layers.0.")]
    rest = [n for n in index.names() if n not in layer0]
    cb = LayerRestorationCallback(dict(initial), "0:1", when=("save", "train_end"))
    trainer = T.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    live, master = gather(index), masters(index)
    result = {"status": "ok", "zero": trainer.accelerator.deepspeed_plugin.zero_stage, "hooks_left": hooks_left(model),
              "module_layer0": differ(live, initial, layer0), "master_layer0": differ(master, initial, layer0),
              "others_trained": differ(live, initial, rest), "master_vs_module_others": differ(live, master, rest),
              "dtype": str(live[layer0[0]].dtype)}  # fmt: skip
    ckpt = os.path.join(out, "checkpoint-2")
    files = os.path.join(ckpt, "model.safetensors")
    if args.should_save and os.path.exists(files):  # ZeRO-3 saves DeepSpeed's shards alone (no gather option)
        from safetensors.torch import load_file

        saved = load_file(files)
        result["files_layer0"] = differ(saved, initial, layer0)
        result["files_others_vs_live"] = differ(saved, live, rest)
    args = training_args(out, stage, offload)
    args.max_steps = 2
    model = tiny(stage)
    index = ParamIndex(model)
    trainer = T.Trainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=ckpt)
    now, now_master = gather(index), masters(index)
    result.update(resumed_module_layer0=differ(now, initial, layer0), resumed_master_layer0=differ(now_master, initial, layer0),
                  resumed_others_vs_trained=differ(now, live, rest), resumed_master_others=differ(now_master, master, rest))  # fmt: skip
    return result


def restoration_shards_only(out, stage, data):
    """ZeRO-3 with ``save_only_model=True`` and no ``stage3_gather_16bit_weights_on_model_save``: the Trainer
    writes DeepSpeed's shards alone (no model files, no optimizer.pt); ``when="save"`` must restore layer 0 in
    them. Read back with DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` (what zero_to_fp32.py
    consolidates): layer 0 is the reference, the rest the trained masters; the live run keeps its training."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    args, model, index, initial = _restoration_setup(out, stage, save_strategy="steps", save_steps=2,
                                                     save_only_model=True)  # fmt: skip
    layer0 = [n for n in index.names() if n.startswith("model.layers.0.")]
    rest = [n for n in index.names() if n not in layer0]
    cb = LayerRestorationCallback(dict(initial), "0:1", when="save")
    trainer = T.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    live, master = gather(index), masters(index)
    ckpt = os.path.join(out, "checkpoint-2")
    result = {"status": "ok", "model_files": os.path.exists(os.path.join(ckpt, "model.safetensors")),
              "live_layer0_trained": differ(live, initial, layer0), "master_vs_module": differ(live, master, rest)}  # fmt: skip
    torch.distributed.barrier()
    if args.should_save:
        saved = get_fp32_state_dict_from_zero_checkpoint(ckpt)
        result.update(
            shards_layer0=differ(saved, initial, layer0), shards_others_vs_masters=differ(saved, master, rest)
        )
    return result


def restoration_variant(out, stage, data):
    """``mode="variant"`` at train end: ``<output_dir>/restored/`` holds layer 0 restored and the rest as
    trained, while the live model (module and masters) keeps its training."""
    args, model, index, initial = _restoration_setup(out, stage)
    layer0 = [n for n in index.names() if n.startswith("model.layers.0.")]
    rest = [n for n in index.names() if n not in layer0]
    cb = LayerRestorationCallback(dict(initial), "0:1", mode="variant")
    trainer = T.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    live, master = gather(index), masters(index)
    result = {"status": "ok", "hooks_left": hooks_left(model), "live_layer0_trained": differ(live, initial, layer0),
              "master_vs_module": differ(live, master, index.names())}  # fmt: skip
    if args.should_save:
        from safetensors.torch import load_file

        saved = load_file(os.path.join(out, "restored", "model.safetensors"))
        result.update(
            variant_layer0=differ(saved, initial, layer0), variant_others_vs_live=differ(saved, live, rest)
        )
    return result


# -- AttributionAlignmentCallback ------------------------------------------------------------------------------
_ATTRIBUTION_DDP: dict = {}  # the DDP reference runs (stage-independent): trained once, on first use


def _attribution_run(out, weight, deepspeed_stage=None, offload=False):
    """Train the tiny BERT classifier 2 steps with the alignment term (``weight``) under DDP (no stage) or
    ZeRO-``deepspeed_stage`` (``offload``: bf16 and optimizer offload); return the gathered weights, the logged
    terms and the hooks left."""
    kw = {"deepspeed": ds_config(deepspeed_stage, offload)} if deepspeed_stage else {"ddp_backend": "gloo"}
    if offload:
        kw["bf16"] = True
    args = T.TrainingArguments(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                               max_steps=2, learning_rate=5e-2, weight_decay=0.1, max_grad_norm=0.5,
                               optim="adamw_torch", use_cpu=True, report_to=[], logging_steps=1,
                               disable_tqdm=True, seed=0, save_strategy="no", **kw)  # fmt: skip
    if deepspeed_stage == 3:
        deepspeed.init_distributed(dist_backend="gloo")
    model = bert()
    cb = AttributionAlignmentCallback(
        "grad_x_input", prior="rationale", weight=weight, special_token_ids=[0, 2, 3]
    )
    data = TaggedDataset(ListData(rationale_rows()), tags=["rationale"])
    trainer = T.Trainer(
        model=model, args=args, train_dataset=data, data_collator=TaggedCollator(), callbacks=[cb]
    )
    trainer.train()
    terms = [h["align/term"] for h in trainer.state.log_history if "align/term" in h]
    hooks = hooks_left(model) + cb.alignment.num_hooks
    zero = trainer.accelerator.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    return gather(ParamIndex(model)), terms, hooks, cb.alignment._checked, zero


def attribution_reference(out):
    """The DDP runs ``attribution`` compares with (λ=1 and λ=0), trained before any DeepSpeed run: accelerate's
    process-wide state keeps DeepSpeed selected once a DeepSpeed Trainer has run."""
    _ATTRIBUTION_DDP["with"] = _attribution_run(os.path.join(out, "ddp1"), 1.0)
    _ATTRIBUTION_DDP["without"] = _attribution_run(os.path.join(out, "ddp0"), 0.0)


def attribution(out, stage):
    """``AttributionAlignmentCallback`` (grad_x_input, double backprop) under ZeRO-``stage`` against the same
    run under DDP: the largest weight difference, next to the penalty's own effect (DDP with λ=1 vs λ=0)."""
    ref, ref_terms, _, _, ref_zero = _ATTRIBUTION_DDP["with"]
    plain = _ATTRIBUTION_DDP["without"][0]
    try:
        weights, terms, hooks, checked, zero = _attribution_run(os.path.join(out, "ds"), 1.0, stage)
    except RuntimeError as e:
        return {"status": "error", "message": str(e)}
    return {"status": "ok", "terms": terms, "ddp_terms": ref_terms, "hooks_left": hooks, "checked": checked,
            "zero": zero, "reference_zero": ref_zero,
            "max_diff_vs_ddp": max(float((weights[n] - ref[n]).abs().max()) for n in ref),
            "penalty_effect": max(float((plain[n] - ref[n]).abs().max()) for n in ref)}  # fmt: skip


def attribution_offload(out, stage):
    """``AttributionAlignmentCallback`` under ZeRO-``stage`` with bf16 and ``offload_optimizer`` to CPU: trains,
    logs its term, leaves no hook."""
    try:
        _, terms, hooks, checked, zero = _attribution_run(out, 1.0, stage, offload=True)
    except RuntimeError as e:
        return {"status": "error", "message": str(e)}
    return {"status": "ok", "terms": terms, "hooks_left": hooks, "checked": checked, "zero": zero}


def add_input_gradient_penalty(model):
    """Hooks that add the squared input gradient of the logits to the loss, taken inside the model's forward
    (torch.autograd.grad with create_graph=True, as attribution alignment does): double backprop without hfhooks.

    Inside the forward, i.e. before DeepSpeed's engine puts its backward hooks on the outputs it returns (a
    torch.autograd.grad through those would run the engine's backward epilogue, a gradient reduction)."""
    site = {}
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: site.update(out=o))

    def penalize(module, args, kwargs, out):
        (g,) = torch.autograd.grad(out.logits.sum(), site["out"], create_graph=True)
        out.loss = out.loss + g.pow(2).sum()
        return out

    model.register_forward_hook(penalize, with_kwargs=True)


def double_backprop(out, stage):
    """The reason attribution alignment refuses ZeRO-3, shown without hfhooks: a stock Trainer whose loss
    differentiates an input gradient (torch.autograd.grad(create_graph=True) in the forward), under ZeRO-``stage``."""
    args = T.TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=1, optim="adamw_torch",
                               use_cpu=True, report_to=[], logging_strategy="no", disable_tqdm=True,
                               save_strategy="no", deepspeed=ds_config(stage))  # fmt: skip
    if stage == 3:
        deepspeed.init_distributed(dist_backend="gloo")
    model = bert()
    add_input_gradient_penalty(model)
    rows = [{k: v for k, v in r.items() if k != "rationale"} for r in rationale_rows()]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no double backward (any engine)
            T.Trainer(model=model, args=args, train_dataset=ListData(rows)).train()
    except RuntimeError as e:
        return {"status": "error", "message": str(e)}
    return {"status": "ok"}


def stage_cases(stage: int, out: str, data, forget, tagged) -> dict:
    """The cases run under ZeRO-``stage``: name -> a thunk returning this rank's result."""
    where = os.path.join(out, f"zero{stage}")

    def unlearn(mask):
        return SaliencyUnlearningCallback(forget, objective="graddiff", mask=mask, progress=False)

    def grad_only(mask):
        return GradientMaskCallback(mask, freeze="grad")

    def at(name):
        return os.path.join(where, name)

    cases = {
        "gradient_mask": lambda: train(at("gm"), stage, GradientMaskCallback, data),
        "grad_only": lambda: train(at("go"), stage, grad_only, data),
        "unlearning": lambda: train(at("un"), stage, unlearn, tagged, TaggedCollator()),
        "offload": lambda: train(at("off"), stage, GradientMaskCallback, data, offload=True),
        "resumed": lambda: train(at("res"), stage, GradientMaskCallback, data, resume=True),
        # refusals are read from the arguments (and the model) at train begin
        "unlearning_scoring": lambda: train_scoring(at("score"), stage, forget, tagged),
        "unlearning_scoring_offload": lambda: train_scoring(at("scoreo"), stage, forget, tagged, True),
        "attribution": lambda: attribution(at("attr"), stage),
        "double_backprop": lambda: double_backprop(at("dbp"), stage),
        "restoration": lambda: restoration(at("rest"), stage, data),
        "restoration_variant": lambda: restoration_variant(at("restv"), stage, data),
        "restoration_offload": lambda: restoration(at("resto"), stage, data, offload=True),
        "routing_forget": lambda: train_routing(at("rf"), stage, "forget"),
        "routing_retain": lambda: train_routing(at("rr"), stage, "retain"),
        "routing_leaky": lambda: train_routing(at("rl"), stage, "forget", strict=False),
        "routing_offload": lambda: train_routing(at("ro"), stage, "forget", offload=True),
        "routing_resumed": lambda: train_routing(at("rs"), stage, "forget", resume=True),
        "routing_activation": lambda: train_routing(at("ra"), stage, "retain", level="activation"),
    }
    if stage in (1, 2):
        cases["attribution_offload"] = lambda: attribution_offload(at("attro"), stage)
    if stage == 3:
        cases["restoration_shards_only"] = lambda: restoration_shards_only(at("rests"), stage, data)
    return cases


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="1,2,3")
    a = parser.parse_args()
    out, data = a.out, Data()
    forget = [data[i] for i in range(8)]
    tagged = forget_retain_dataset(forget, [data[i] for i in range(8, 32)])
    results, seconds = {}, {}
    attribution_reference(os.path.join(out, "attribution_ddp"))
    for stage in map(int, a.stages.split(",")):
        results[f"zero{stage}"] = r = {}
        for key, run in stage_cases(stage, out, data, forget, tagged).items():
            began = time.perf_counter()
            r[key] = run()
            seconds[f"zero{stage}/{key}"] = round(time.perf_counter() - began, 1)  # to find the slow cases
    rank = int(os.environ["RANK"])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, f"seconds{rank}.json"), "w") as f:
        json.dump(seconds, f, indent=1)
    if torch.distributed.is_initialized():  # exiting with live gloo threads can abort ("terminate called…")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
