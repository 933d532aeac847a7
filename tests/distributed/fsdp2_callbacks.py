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
    AttributionAlignment,
    AttributionAlignmentCallback,
    GradientMask,
    GradientMaskCallback,
    GradientRoutingCallback,
    LayerRestorationCallback,
    ParamIndex,
    ParamMask,
    SaliencyUnlearningCallback,
    TaggedCollator,
    TaggedDataset,
    forget_retain_dataset,
    restore_layers,
)
from hfhooks.core.params import fsdp2_unsharded_params

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


def shard(model, **options):
    """What the Trainer's FSDP2 path does on GPU: fully_shard each decoder layer, then the root (``options``:
    fully_shard's, e.g. ``offload_policy``)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
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
    for pair in batches:
        train_step(callback, model, opt, pair, args, state, control)
    callback.on_train_end(args, state, control, model=model, optimizer=opt)


def train_step(callback, model, opt, pair, args, state, control) -> None:
    """One optimizer step as the Trainer takes it: the micro-batches of ``pair`` accumulated, clipping, the
    callback's step events around ``opt.step()``; ``state.global_step`` advanced."""
    callback.on_step_begin(args, state, control, model=model, optimizer=opt)
    for batch in pair:  # gradient accumulation: 2 micro-batches per step
        (model(**batch).loss / len(pair)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    callback.on_pre_optimizer_step(args, state, control, model=model, optimizer=opt)
    opt.step()
    callback.on_optimizer_step(args, state, control, model=model, optimizer=opt)
    opt.zero_grad()
    state.global_step += 1
    callback.on_step_end(args, state, control, model=model, optimizer=opt)


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


class Recorder:
    """Forwards a callback's events and keeps the gathered full weights after every optimizer step."""

    def __init__(self, callback, model):
        self.callback, self.model = callback, model
        self.states = [gathered(model)]

    def __getattr__(self, name):
        return getattr(self.callback, name)

    def on_step_end(self, *args, **kwargs):
        self.callback.on_step_end(*args, **kwargs)
        self.states.append(gathered(self.model))


def gathered(model):
    return {n: full(p).detach().clone() for n, p in ParamIndex(model).items()}


def routing_batches(rank):
    """Label-homogeneous micro-batches of 2 (two per step): forget-only, retain-only, then forget on rank 0 while
    rank 1 is retain (routed per rank before FSDP2 averages them), then forget-only again (Adam's momentum now
    moves every coordinate unless the strict step holds it)."""
    ids, modes = Data().ids, [(1, 1), (0, 0), (1, 0), (1, 1)]

    def micro(step, k):
        rows = ids[step * 8 + rank * 4 + k * 2 :][:2]
        return {"input_ids": rows, "labels": rows, "routing": torch.full((2,), modes[step][rank])}

    return [[micro(step, 0), micro(step, 1)] for step in range(len(modes))]


def offload_options(offload):
    """fully_shard options of the CPU-offload variants. ``pin_memory=False``: pinning needs an accelerator (on a
    CPU-only machine the default raises "Cannot access accelerator device"); which memory FSDP2 copies from does
    not change what the router sees."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    return {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if offload else {}


def offloaded(model) -> bool:
    """Whether FSDP2 keeps every sharded parameter of ``model`` on the CPU between uses (CPU offload active)."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]
    params = [fp for g in groups if g is not None for fp in g.fsdp_params]
    return bool(params) and all(fp.offload_to_cpu for fp in params)


def run_routing(out, offload=False):
    """GradientRoutingCallback (parameter level, strict, its default dedicated mask) around the sharded model:
    per step, on the gathered weights, what the step's mode must not change, and the result against one process
    training the full model on both ranks' micro-batches (FSDP2 averages ranks as that process's loss / 4 does).
    ``offload``: the model sharded with FSDP2's CPU offload (parameters on the CPU between uses)."""
    from hfhooks import dedicated_mask

    world = dist.get_world_size()
    per_rank = [routing_batches(r) for r in range(world)]
    reference_model = tiny()
    expected = dedicated_mask(reference_model, None, 4, 1)
    reference = GradientRoutingCallback(expected)  # the same data, all ranks' micro-batches in one process
    drive(reference, reference_model, [[mb for b in per_rank for mb in b[s]] for s in range(4)], out + "/ref")
    model = shard(tiny(), **offload_options(offload))
    cb = GradientRoutingCallback(mlp_units=4, heads=1)
    recorder = Recorder(cb, model)
    where = os.path.join(out, "routing_offload" if offload else "routing")
    drive(recorder, model, per_rank[dist.get_rank()], where)
    unsharded = fsdp2_unsharded_params(model)
    r = {"status": "ok", "dtensor_params": sum(isinstance(p, DTensor) for p in model.parameters()),
         "offloaded": offloaded(model),
         "hooks_left": hooks_left(model) + cb.router.num_hooks
         + sum(len(p._backward_hooks or {}) for p in unsharded.values()),
         "full_params_hooked": len(unsharded),
         "default_mask_matches": all(torch.equal(cb.dedicated[n], expected[n]) for n in expected)
         and set(cb.dedicated) == set(expected)}  # fmt: skip
    states = recorder.states
    for key, step, dedicated in (("forget", 0, False), ("retain", 1, True), ("forget_again", 3, False)):
        held = changed = 0  # coordinates the step must not change that moved / the others that changed
        for n, before in states[step].items():
            after = states[step + 1][n]
            ded = expected[n] if n in expected else torch.zeros_like(before, dtype=torch.bool)
            frozen = ded if dedicated else ~ded
            held += int((after[frozen].view(torch.int32) != before[frozen].view(torch.int32)).sum())
            changed += int((after[~frozen] != before[~frozen]).sum())
        r[f"{key}_held_moved"], r[f"{key}_changed"] = held, changed
    final, ref = states[-1], gathered(reference_model)
    r["max_diff_vs_reference"] = max(float((final[n] - ref[n]).abs().max()) for n in final)
    r["moved_vs_start"] = sum(int((final[n] != states[0][n]).sum()) for n in final)
    r["digest"] = float(sum(final[n].double().sum() * (i + 1) for i, n in enumerate(sorted(final))))
    return r


def routing_plain_loop(offload=False):
    """The core ``Router`` at the activation level (labels mixed inside every micro-batch) as a context manager in
    a plain loop over the sharded model, against one process training the full model on both ranks' data.
    ``offload``: the model sharded with FSDP2's CPU offload."""
    from hfhooks import Router, dedicated_mask

    world, rank = dist.get_world_size(), dist.get_rank()
    ids = Data().ids
    labels = torch.tensor([1, 0, -1, 0])

    def micro(step, k, r):
        rows = ids[step * 8 + r * 4 + k * 2 :][:2]
        return {"input_ids": rows, "labels": rows, "routing": labels[(step + k + r) % 3 :][:2]}

    def train(model, mask, batches):
        opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)
        with Router(model, mask, level="activation", optimizer=opt) as router:
            for pair in batches:
                for batch in pair:
                    (model(**batch).loss / len(pair)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
                opt.zero_grad()
            counts = dict(router.counts)
        return router, counts

    reference = tiny()
    mask = dedicated_mask(reference, None, 4, 1)
    train(reference, mask, [[micro(s, k, r) for r in range(world) for k in (0, 1)] for s in range(3)])
    model = shard(tiny(), **offload_options(offload))
    initial = gathered(model)
    router, counts = train(model, mask, [[micro(s, k, rank) for k in (0, 1)] for s in range(3)])
    final, ref = gathered(model), gathered(reference)
    unsharded = fsdp2_unsharded_params(model)
    return {"status": "ok", "dtensor_params": sum(isinstance(p, DTensor) for p in model.parameters()),
            "offloaded": offloaded(model),
            "counts": counts, "changed": sum(int((final[n] != initial[n]).sum()) for n in final),
            "max_diff_vs_reference": max(float((final[n] - ref[n]).abs().max()) for n in final),
            "hooks_left": hooks_left(model) + router.num_hooks
            + sum(len(p._backward_hooks or {}) for p in unsharded.values()),
            "digest": float(sum(final[n].double().sum() * (i + 1) for i, n in enumerate(sorted(final))))}  # fmt: skip


def accelerate_fsdp2(state_dict_type: str):
    """(a stand-in for the Accelerator, an FSDP2 plugin) as accelerate's ``save/load_fsdp_*`` helpers take them,
    or a skip result when this accelerate has no FSDP2 plugin (its Trainer cannot write FSDP2 checkpoints)."""
    import inspect
    from types import SimpleNamespace

    import accelerate
    from accelerate import FullyShardedDataParallelPlugin

    if "fsdp_version" not in inspect.signature(FullyShardedDataParallelPlugin).parameters:
        return {"status": "skipped", "reason": f"accelerate {accelerate.__version__} has no FSDP2 plugin "
                "(fsdp_version): its Trainer cannot write FSDP2 checkpoints"}  # fmt: skip
    rank = dist.get_rank()
    acc = SimpleNamespace(process_index=rank, num_processes=dist.get_world_size(), is_fsdp2=True,
                          is_main_process=rank == 0, wait_for_everyone=dist.barrier)  # fmt: skip
    return acc, FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type)


def run_routing_resumed(out):
    """GradientRoutingCallback resumed under FSDP2 as the Trainer resumes it: checkpoint-2 written at step 2
    (model and optimizer with accelerate's SHARDED_STATE_DICT — DCP, its FSDP2 default — the trainer state, then
    on_save), the run killed there; a fresh process state — a fresh ``fully_shard``-ed model and optimizer
    loaded from the checkpoint, a fresh callback given only the config — trains steps 3-4. The interrupted run
    was given a dedicated mask other than the config's default, so only the checkpoint's mask resumes it right.
    Reported: the resumed result against the uninterrupted run (bit for bit), its counters, the shared
    coordinates the resumed forget step held, hooks left."""
    from hfhooks import dedicated_mask

    got = accelerate_fsdp2("SHARDED_STATE_DICT")
    if isinstance(got, dict):
        return got
    acc, plugin = got
    from accelerate.utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer

    rank = dist.get_rank()
    batches = routing_batches(rank)
    mask = dedicated_mask(tiny(), None, 8, 2)  # not the config's default (4 units, 1 head)

    def train(where, dedicated=None, resume=None, save_at=None):
        model = shard(tiny())
        opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)
        args, state, control = fsdp2_args(where), T.TrainerState(), T.TrainerControl()
        if resume is not None:  # Trainer._load_from_checkpoint, _load_optimizer_and_scheduler, trainer_state
            load_fsdp_model(plugin, acc, model, resume)
            load_fsdp_optimizer(plugin, acc, opt, model, resume)
            state = T.TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
        state.is_world_process_zero = state.is_local_process_zero = rank == 0
        cb = GradientRoutingCallback(dedicated, mlp_units=4, heads=1)
        cb.on_train_begin(args, state, control, model=model, optimizer=opt)
        r = {"dedicated_is_given": cb.dedicated == mask}
        for pair in batches[state.global_step :]:
            before = gathered(model)
            train_step(cb, model, opt, pair, args, state, control)
            # the last step is forget-only: no shared coordinate may move (held by the router)
            if state.global_step == len(batches):
                after = gathered(model)
                r["last_step_held_moved"] = sum(
                    int((after[n][~mask[n]].view(torch.int32) != before[n][~mask[n]].view(torch.int32)).sum())
                    if n in mask else int((after[n] != before[n]).sum()) for n in after)  # fmt: skip
                r["last_step_changed"] = sum(int((after[n] != before[n]).sum()) for n in after)
            # Trainer._save_checkpoint, then on_save; the run is killed after it
            if state.global_step == save_at:
                ckpt = os.path.join(where, f"checkpoint-{save_at}")
                save_fsdp_model(plugin, acc, model, ckpt)
                save_fsdp_optimizer(plugin, acc, opt, model, ckpt)
                if rank == 0:
                    state.save_to_json(os.path.join(ckpt, "trainer_state.json"))
                dist.barrier()
                cb.on_save(args, state, control, model=model)
                dist.barrier()
                r["checkpoint"] = ckpt
                return r
        cb.on_train_end(args, state, control, model=model, optimizer=opt)
        unsharded = fsdp2_unsharded_params(model)
        r.update(weights=gathered(model), counts=dict(cb.router.counts),
                 hooks_left=hooks_left(model) + cb.router.num_hooks
                 + sum(len(p._backward_hooks or {}) for p in unsharded.values()),
                 dtensor_params=sum(isinstance(p, DTensor) for p in model.parameters()))  # fmt: skip
        return r

    straight = train(os.path.join(out, "routing_straight"), dedicated=mask)
    where = os.path.join(out, "routing_resumed")
    saved = train(where, dedicated=mask, save_at=2)
    resumed = train(where, resume=saved["checkpoint"])  # no mask given: the checkpoint's must be used
    a, b, start = straight.pop("weights"), resumed.pop("weights"), gathered(tiny())
    return {"status": "ok", "dtensor_params": resumed["dtensor_params"], "hooks_left": resumed["hooks_left"],
            "straight_hooks_left": straight["hooks_left"],
            "resumed_with_checkpoint_mask": resumed["dedicated_is_given"],
            "counts": resumed["counts"], "straight_counts": straight["counts"],
            "held_moved": resumed["last_step_held_moved"], "changed": resumed["last_step_changed"],
            "straight_held_moved": straight["last_step_held_moved"],
            "differing_vs_straight": sum(int((a[n].view(torch.int32) != b[n].view(torch.int32)).sum()) for n in a),
            "trained": sum(int((b[n] != start[n]).sum()) for n in b),
            "digest": float(sum(b[n].double().sum() * (i + 1) for i, n in enumerate(sorted(b))))}  # fmt: skip


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


# -- attribution alignment ------------------------------------------------------------------------------------
def tiny_classifier():
    torch.manual_seed(0)  # same init on every rank
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0,
                        attn_implementation="eager")  # fmt: skip
    return T.LlamaForSequenceClassification(cfg)


def rationale_batch(start, n=4):
    """``n`` examples with a 0/1 rationale over their first 4 tokens (the prior), as TaggedCollator batches them."""
    data = Data()
    rows = [{"input_ids": data.ids[i], "attention_mask": torch.ones(10, dtype=torch.long),
             "labels": torch.tensor(i % 2), "rationale": (torch.arange(10) < 4).float()}
            for i in range(start, start + n)]  # fmt: skip
    tagged = TaggedDataset(rows, tags=["rationale"])
    return TaggedCollator()([tagged[i] for i in range(n)])


def attribution_gradients():
    """One backward of loss + λ·term through a fully_shard-ed classifier vs. the same model unsharded, for each
    method supported under FSDP2: the gathered gradients must match (both ranks see the same batch, so FSDP's
    averaged gradient is the single-process one)."""
    import copy

    from torch.distributed.fsdp import fully_shard

    batch, worst = rationale_batch(0), {}
    for method in ("grad_x_input", "input_gradient", "grad_x_input_first_order", "attention"):
        model = tiny_classifier()
        ref = copy.deepcopy(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        for m in (model, ref):
            m.train()
            with AttributionAlignment(m, method, prior="rationale", weight=10.0, special_token_ids=[0]) as al:
                m(**batch)["loss"].backward()
                assert al.pop_stats()["align/term"] > 0
        rel = 0.0
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            rel = max(rel, float((full(p.grad) - q.grad).abs().max() / (q.grad.abs().max() + 1e-12)))
        worst[method] = rel
    return {"status": "ok", "worst_relative_difference": worst}


class RecordingAlignment(AttributionAlignmentCallback):
    """Records the logged term of each step (what on_log would put into the Trainer's logs)."""

    terms: list

    def on_step_end(self, args, state, control, **kwargs):
        self.terms.append(self.alignment.pop_stats().get("align/term"))
        return super().on_step_end(args, state, control, **kwargs)


def run_attribution(out, weight, method="grad_x_input"):
    model = shard(tiny_classifier())
    model.train()
    cb = RecordingAlignment(method, prior="rationale", weight=weight, special_token_ids=[0])
    cb.terms = []
    batches = [[rationale_batch(0), rationale_batch(4)]] * 4  # the same batch: the term must fall
    drive(cb, model, batches, os.path.join(out, f"attribution_{method}_{weight}"))
    dtensors = sum(isinstance(p, DTensor) for p in model.parameters())
    return {"status": "ok", "terms": cb.terms, "hooks_left": hooks_left(model) + cb.alignment.num_hooks,
            "dtensor_params": dtensors, "reused": cb.alignment.reused}  # fmt: skip


# -- layer restoration ----------------------------------------------------------------------------------------
def layer0(model):
    return {n: full(p).clone() for n, p in ParamIndex(model).items()}


def run_restoration(out, lm_batches):
    """Train a fully_shard-ed model with LayerRestorationCallback(reference, "0:1") (train end, in place; then
    mode="variant"): layer 0 must equal the reference bit for bit on every rank, the rest must have trained."""
    results = {}
    for mode in ("inplace", "variant"):
        reference = tiny()  # the initial weights (same seed)
        model = shard(tiny())
        cb = LayerRestorationCallback(reference, "0:1", mode=mode)
        where = os.path.join(out, f"restore_{mode}")
        drive(cb, model, lm_batches, where)
        now, ref = layer0(model), dict(ParamIndex(reference).items())
        if mode == "variant":  # the live model keeps the trained weights; the copy on disk is restored
            dist.barrier()
            saved = T.LlamaForCausalLM.from_pretrained(os.path.join(where, "restored"))
            now, live = dict(ParamIndex(saved).items()), now
            results["variant_live_layer0_trained"] = any(
                not torch.equal(live[n], ref[n]) for n in live if n.startswith("model.layers.0.")
            )
            results["variant_layers_above_match_live"] = all(
                torch.equal(now[n].detach(), live[n]) for n in live if not n.startswith("model.layers.0.")
            )
        restored = [n for n in now if n.startswith("model.layers.0.")]
        results[mode] = {
            "status": "ok",
            "restored_bitwise": all(
                torch.equal(now[n].detach().view(torch.int32), ref[n].detach().view(torch.int32))
                for n in restored
            ),
            "restored": len(restored),
            "others_trained": sum(
                not torch.equal(now[n].detach(), ref[n].detach()) for n in now if n not in restored
            ),
            "hooks_left": hooks_left(model),
            "dtensor_params": sum(isinstance(p, DTensor) for p in model.parameters()),
        }
    return results


def restoration_checkpoints(out, lm_batches):
    """LayerRestorationCallback(when="save") on checkpoints laid out as the Trainer writes them under FSDP2
    (FULL_STATE_DICT): model.safetensors (Trainer.save_model) *and* accelerate's pytorch_model_fsdp.bin
    (save_fsdp_model), the file a resumed run loads (load_fsdp_model). checkpoint-1: restoring model.safetensors
    alone (restore_layers) leaves what a resume loads trained — why the callback restores both; then
    mode="variant" writes checkpoint-1/restored/. checkpoint-2: mode="inplace" — a resume loads restored layers."""
    got = accelerate_fsdp2("FULL_STATE_DICT")
    if isinstance(got, dict):
        return got
    acc, plugin = got
    from accelerate.utils import load_fsdp_model, save_fsdp_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank = dist.get_rank()
    reference, model = tiny(), shard(tiny())
    where = os.path.join(out, "resume")
    drive(T.TrainerCallback(), model, lm_batches[:1], where)

    def checkpoint(step):  # what Trainer._save_checkpoint writes under FSDP2
        ckpt = os.path.join(where, f"checkpoint-{step}")
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(ckpt, state_dict=state)  # Trainer.save_model
        save_fsdp_model(plugin, acc, model, ckpt)  # for resuming
        dist.barrier()
        return ckpt

    def resumed(ckpt):  # what Trainer._load_from_checkpoint does under FSDP
        fresh = shard(tiny())
        load_fsdp_model(plugin, acc, fresh, ckpt)
        return full(fresh.get_parameter(name))

    def on_save(cb, step):
        args, state = fsdp2_args(where), T.TrainerState()
        cb.on_train_begin(args, state, T.TrainerControl(), model=model)
        state.global_step = step
        cb.on_save(args, state, T.TrainerControl(), model=model)
        dist.barrier()

    name = "model.layers.0.mlp.up_proj.weight"
    ref, above = reference.get_parameter(name), name.replace(".0.", ".1.")
    ckpt1, ckpt2 = checkpoint(1), checkpoint(2)
    on_save(LayerRestorationCallback(reference, "0:1", when="save", mode="variant"), 1)
    copy = T.LlamaForCausalLM.from_pretrained(os.path.join(ckpt1, "restored"))
    if rank == 0:
        restore_layers(ckpt1, reference, "0:1", out=ckpt1, overwrite=True, progress=False)
    dist.barrier()
    on_save(LayerRestorationCallback(reference, "0:1", when="save"), 2)
    saved2 = T.LlamaForCausalLM.from_pretrained(ckpt2)
    return {"checkpoint_trained": not torch.equal(full(model.get_parameter(name)), ref),
            "variant_restored": torch.equal(copy.get_parameter(name), ref),
            "variant_keeps_other_layers": torch.equal(copy.get_parameter(above), full(model.get_parameter(above))),
            "safetensors_only_restored": torch.equal(T.LlamaForCausalLM.from_pretrained(ckpt1).get_parameter(name),
                                                     ref),
            "safetensors_only_resumed_restored": torch.equal(resumed(ckpt1), ref),
            "inplace_safetensors_restored": torch.equal(saved2.get_parameter(name), ref),
            "inplace_resumed_restored": torch.equal(resumed(ckpt2), ref),
            "inplace_resumed_keeps_other_layers": torch.equal(
                full(load_into_fresh(plugin, acc, ckpt2).get_parameter(above)), full(model.get_parameter(above))),
            "files": sorted(os.listdir(ckpt2))}  # fmt: skip


def load_into_fresh(plugin, acc, ckpt):
    from accelerate.utils import load_fsdp_model

    fresh = shard(tiny())
    load_fsdp_model(plugin, acc, fresh, ckpt)
    return fresh


def start_ig_crash_demo():
    """Rank 0 starts tests/distributed/fsdp2_ig_crash.py (a process of its own: it is expected to segfault) while
    the other cases run."""
    import subprocess
    import sys

    if int(os.environ["RANK"]) != 0:
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MASTER_", "LOCAL_"))}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp2_ig_crash.py")
    return subprocess.Popen([sys.executable, script], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)  # fmt: skip


def finish_ig_crash_demo(proc):
    if proc is None:
        return {"status": "rank 0 only"}
    stdout, _ = proc.communicate(timeout=300)
    return {"status": "ok", "returncode": proc.returncode, "stdout": stdout}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    ig_crash = start_ig_crash_demo()
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
    results["routing"] = run_routing(out)
    results["routing_core_activation"] = routing_plain_loop()
    results["routing_resumed"] = run_routing_resumed(out)
    results["routing_offload"] = run_routing(out, offload=True)
    results["routing_core_activation_offload"] = routing_plain_loop(offload=True)
    results["attribution_gradients"] = attribution_gradients()
    results["attribution"] = run_attribution(out, weight=5.0)
    results["attribution_unweighted"] = run_attribution(out, weight=0.0)  # the same run without the penalty
    # first order: after the first term, ∂s/∂e is read from the training backward (reuse_backward)
    results["attribution_first_order"] = run_attribution(out, 5.0, "grad_x_input_first_order")
    results["attribution_first_order_unweighted"] = run_attribution(out, 0.0, "grad_x_input_first_order")
    results["attribution_integrated_gradients"] = run_refused(
        "attribution_ig", out, AttributionAlignmentCallback("integrated_gradients", prior="rationale")
    )
    results["attribution_ig_crash"] = finish_ig_crash_demo(ig_crash)
    results["restoration"] = run_restoration(out, lm_batches)
    results["restoration_checkpoints"] = restoration_checkpoints(out, lm_batches)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    if dist.is_initialized():  # exiting with live gloo threads can abort ("terminate called…")
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
