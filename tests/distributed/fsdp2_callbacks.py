"""Launched by tests/compat/test_fsdp2.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Every callback around a model sharded with FSDP2 (``fully_shard`` on each decoder layer and the root: parameters
become sharded DTensors), its events driven in the Trainer's order (see :func:`drive`). Supported callbacks
train and this rank reports frozen coordinates moved / trained coordinates changed / hooks left; unsupported
ones must refuse with a message, which is reported. Also the core ``GradientMask`` in a plain loop over a
``fully_shard``-ed model. Writes ``<out>/rank<R>.json``.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
import transformers as T
from torch.distributed.tensor import DTensor

from hfhooks import (
    AttributionAlignmentCallback,
    GradientMask,
    GradientMaskCallback,
    GradientRoutingCallback,
    LayerRestorationCallback,
    ParamIndex,
    ParamMask,
    SaliencyUnlearningCallback,
    TaggedCollator,
    forget_retain_dataset,
)

VOCAB = 48


class Data(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, 10), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny():
    torch.manual_seed(0)  # same init on every rank
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return T.LlamaForCausalLM(cfg)


def random_mask(model, ratio=0.4):
    g = torch.Generator().manual_seed(1)
    return ParamMask.from_scores(
        {n: torch.rand(p.shape, generator=g) for n, p in ParamIndex(model).items()}, ratio
    )


def full(p):
    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def hooks_left(model) -> int:
    n = 0
    for p in model.parameters():
        n += len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    for m in model.modules():
        n += sum(1 for h in m._forward_pre_hooks.values() if "hfhooks" in getattr(h, "__module__", ""))
        n += sum(1 for h in m._forward_hooks.values() if "hfhooks" in getattr(h, "__module__", ""))
    return n


def compare(model, initial, mask):
    moved = changed = 0
    for n, p in ParamIndex(model).items():
        now, keep = full(p), mask[n]
        moved += int((now[~keep].view(torch.int32) != initial[n][~keep].view(torch.int32)).sum())
        changed += int((now[keep] != initial[n][keep]).sum())
    return moved, changed


def fsdp2_args(out):
    """TrainingArguments that select FSDP2 — what the callbacks' guards read."""
    return T.TrainingArguments(output_dir=out, use_cpu=True, report_to=[], max_steps=3, fsdp="full_shard",
                               fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})  # fmt: skip


def shard(model):
    """What the Trainer's FSDP2 path does on GPU: fully_shard each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def drive(callback, model, batches, out):
    """The Trainer's event sequence around a fully_shard-ed model, by hand.

    On CPU accelerate runs ``TrainingArguments(fsdp=...)`` as plain DDP (its FSDP path needs an accelerator), so
    a real FSDP2 run of a callback on CPU has to drive the callback's events itself — exactly as the Trainer
    calls them: train begin (after the optimizer exists and the model is sharded), micro-batches with
    accumulation, clipping, pre/post optimizer step, step end, train end.
    """
    args = fsdp2_args(out)
    state, control = T.TrainerState(), T.TrainerControl()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)
    callback.on_train_begin(args, state, control, model=model, optimizer=opt)
    for step, pair in enumerate(batches):
        callback.on_step_begin(args, state, control, model=model, optimizer=opt)
        for batch in pair:  # gradient accumulation: 2 micro-batches per step
            (model(**batch).loss / len(pair)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        callback.on_pre_optimizer_step(args, state, control, model=model, optimizer=opt)
        opt.step()
        callback.on_optimizer_step(args, state, control, model=model, optimizer=opt)
        opt.zero_grad()
        state.global_step = step + 1
        callback.on_step_end(args, state, control, model=model, optimizer=opt)
    callback.on_train_end(args, state, control, model=model, optimizer=opt)


def run_trained(name, out, callback_factory, batches):
    model = tiny()
    mask = random_mask(model)
    initial = {n: p.detach().clone() for n, p in ParamIndex(model).items()}
    cb, mask = callback_factory(mask)
    model = shard(model)
    drive(cb, model, batches, os.path.join(out, name))
    moved, changed = compare(model, initial, mask)
    dtensors = sum(isinstance(p, DTensor) for p in model.parameters())
    return {"status": "ok", "moved": moved, "changed": changed, "hooks_left": hooks_left(model),
            "dtensor_params": dtensors}  # fmt: skip


def run_refused(name, out, callback):
    model = shard(tiny())
    try:
        drive(callback, model, [], os.path.join(out, name))
    except RuntimeError as e:
        return {"status": "error", "message": str(e)}
    return {"status": "trained without error"}


def mask_hash(mask) -> str:
    import hashlib

    h = hashlib.sha256()
    for n in sorted(mask.names()):
        h.update(n.encode() + mask.packed(n).numpy().tobytes())
    return h.hexdigest()


def run_scoring(out, forget, batches):
    """SalUn scoring its own mask on the sharded model (global top-k over the ranks' shards), then training.

    The mask is compared with the one a single process computes from an unsharded copy of the model, and with
    ``ParamMask.from_scores`` over this run's own scores gathered in full."""
    from torch.distributed.tensor import DTensor as DT

    from hfhooks import compute_saliency

    reference = tiny()
    loader = torch.utils.data.DataLoader(forget, batch_size=4, collate_fn=TaggedCollator().base)
    single = ParamMask.from_scores(compute_saliency(reference, loader, progress=False), 0.5)
    model = tiny()
    initial = {n: p.detach().clone() for n, p in ParamIndex(model).items()}
    model = shard(model)
    local = compute_saliency(model, loader, progress=False)
    index = ParamIndex(model)
    gathered = {n: DT.from_local(s, index.param(n).device_mesh, index.param(n).placements,
                                 shape=index.param(n).shape, stride=index.param(n).stride()).full_tensor()
                for n, s in local.items()}  # fmt: skip
    from_full = ParamMask.from_scores(gathered, 0.5)
    cb = SaliencyUnlearningCallback(forget, objective="graddiff", ratio=0.5, batch_size=4, progress=False)
    drive(cb, model, batches, os.path.join(out, "unlearn_scoring"))
    moved, changed = compare(model, initial, cb.mask)
    return {"status": "ok", "moved": moved, "changed": changed, "hooks_left": hooks_left(model),
            "dtensor_params": sum(isinstance(p, DTensor) for p in model.parameters()),
            "mask_hash": mask_hash(cb.mask), "equals_single_process": cb.mask == single,
            "equals_full_scores": cb.mask == from_full, "density": cb.mask.density()}  # fmt: skip


def plain_loop():
    """The core API on a model sharded by hand with fully_shard (no Trainer)."""
    from torch.distributed.fsdp import fully_shard

    model = tiny()
    mask = random_mask(model)
    initial = {n: p.detach().clone() for n, p in ParamIndex(model).items()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)
    data = Data()
    with GradientMask(model, mask).attach(opt) as gm:
        for step in range(3):
            batch = data.ids[8 * step : 8 * step + 8]
            model(input_ids=batch, labels=batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
        local_moved = sum(gm.moved().values())
    moved, changed = compare(model, initial, mask)
    return {"status": "ok", "moved": moved, "changed": changed, "local_moved": local_moved,
            "hooks_left": hooks_left(model) + gm.num_hooks}  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    results = {"gradient_mask_core": plain_loop()}

    def gm(mask):
        return GradientMaskCallback(mask), mask

    data = Data()
    lm_batches = [[{"input_ids": data.ids[i : i + 4], "labels": data.ids[i : i + 4]} for i in (8 * s, 8 * s + 4)]
                  for s in range(3)]  # fmt: skip
    results["gradient_mask"] = run_trained("gm", out, gm, lm_batches)

    forget = [data[i] for i in range(8)]
    retain = [data[i] for i in range(8, 32)]
    tagged, collate = forget_retain_dataset(forget, retain), TaggedCollator()
    order = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13]  # forget and retain examples in every micro-batch
    unlearn_batches = [[collate([tagged[j] for j in order[4 * k : 4 * k + 2]]),
                        collate([tagged[j] for j in order[4 * k + 2 : 4 * k + 4]])] for k in range(3)]  # fmt: skip

    def unlearn(mask):
        return SaliencyUnlearningCallback(forget, objective="graddiff", mask=mask, progress=False), mask

    results["unlearning"] = run_trained("unlearn", out, unlearn, unlearn_batches)
    results["unlearning_scoring"] = run_scoring(out, forget, unlearn_batches)
    results["routing"] = run_refused("routing", out, GradientRoutingCallback(mlp_units=4, heads=1))
    results["attribution"] = run_refused("attribution", out, AttributionAlignmentCallback())
    results["restoration"] = run_refused("restoration", out, LayerRestorationCallback({}, "0:1"))
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    if dist.is_initialized():  # exiting with live gloo threads can abort ("terminate called…")
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
