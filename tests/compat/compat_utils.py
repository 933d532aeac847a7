"""Scenarios and checks for the compatibility matrix (``tests/compat``, rendered by ``scripts/compat_matrix.py``).

Every matrix test is tagged ``@pytest.mark.compat(callback=..., setup=...)`` (optionally ``variant="..."`` for
a further test in the same cell, ``expect="error"`` for a refusal). The keys are :data:`CALLBACKS` and
:data:`SETUPS`; ``tests/conftest.py`` copies the marker into the JUnit XML (``compat_callback`` /
``compat_setup`` / ``compat_variant`` / ``compat_expect`` properties, and ``compat_versions``), and a refusal
test records the message it checked with :func:`refused` (or ``record_property("compat_error", message)``).
A passing refusal test renders as ✗ with that message, any other passing test as ✓.

Each ✓ scenario (:func:`run_scenario`) trains a tiny model for a few steps in a stock ``transformers.Trainer``
with one hfhooks callback, under one setup, and returns measured facts (JSON-friendly, so the torchrun script
can hand them back): hooks hfhooks left behind, frozen coordinates that moved, coordinates that trained, and
per-callback evidence that the callback acted. :func:`check_result` asserts all of them. New setups (FSDP2 in
``test_fsdp2.py``) plug in by adding their ``TrainingArguments`` overrides / model wrapping and tagging their
tests with the same marker.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T
from torch import nn

from hfhooks import (
    AttributionAlignmentCallback,
    GradientMaskCallback,
    GradientRoutingCallback,
    LayerRestorationCallback,
    ParamIndex,
    ParamMask,
    SaliencyUnlearningCallback,
    TaggedCollator,
    TaggedDataset,
    UnlearningObjective,
    dedicated_mask,
    forget_retain_dataset,
)
from hfhooks.freeze.gradient_mask import innermost_optimizer
from hfhooks.routing.router import FORGET, RETAIN

CALLBACKS = ("gradient_mask", "routing", "unlearning", "attribution", "restoration")
"""Matrix rows (marker ``callback=``)."""

SETUPS = ("single", "peft", "ddp", "fsdp2", "compile", "grad_ckpt", "bf16", "gpu_bf16", "zero1", "zero2", "zero3",
          "fsdp1")  # fmt: skip
"""Matrix columns (marker ``setup=``)."""

COMPILE_BACKEND = "aot_eager"
"""torch.compile backend of the ``compile`` column: Dynamo + AOTAutograd (the parts that decide whether hooks,
tensor hooks and the backward graph behave), without Inductor's C++ code generation, which takes ~40 s per
tiny model on two CPU cores."""

VOCAB, HIDDEN, LAYERS = 48, 32, 2
LORA_TARGETS = ("q_proj", "v_proj")


# -- setups ----------------------------------------------------------------------------------------------------
def setup_args(setup: str) -> dict[str, Any]:
    """``TrainingArguments`` overrides that select ``setup`` (the model-side part is :func:`prepare_model`)."""
    return {
        "single": {},
        "peft": {},
        "ddp": {"ddp_backend": "gloo"},
        "compile": {"torch_compile": True, "torch_compile_backend": COMPILE_BACKEND},
        "grad_ckpt": {
            "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
        },
        "bf16": {"bf16": True},
        "gpu_bf16": {"bf16": True, "use_cpu": False},
    }[setup]


def training_args(out: Path, setup: str, **overrides: Any) -> T.TrainingArguments:
    """Small, deterministic ``TrainingArguments`` for ``setup`` (AdamW with weight decay, clipping)."""
    args: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=3,
        learning_rate=5e-2,
        weight_decay=0.1,
        max_grad_norm=0.5,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    args.update(setup_args(setup))
    args.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.TrainingArguments(**args)


def llama(seed: int = 0) -> T.LlamaForCausalLM:
    """A tiny Llama (GQA, gated MLP), deterministic weights, dropout-free."""
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                        tie_word_embeddings=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.LlamaForCausalLM(cfg)


def bert(seed: int = 0) -> T.BertForSequenceClassification:
    """A tiny BERT classifier (one layer, no dropout)."""
    torch.manual_seed(seed)
    cfg = T.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       num_labels=2, max_position_embeddings=32)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.BertForSequenceClassification(cfg)


def prepare_model(model: nn.Module, setup: str, targets=LORA_TARGETS, modules_to_save=None) -> nn.Module:
    """Wrap ``model`` for ``setup`` (PEFT: LoRA r=2 on ``targets``); other setups are TrainingArguments only."""
    if setup != "peft":
        return model
    import peft

    cfg = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=list(targets),
                          modules_to_save=modules_to_save)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, cfg)


# -- data ------------------------------------------------------------------------------------------------------
class ListData(torch.utils.data.Dataset):
    """A map-style dataset over a list of dict examples."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def lm_rows(n: int = 16, seq: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def rationale_rows(n: int = 8, length: int = 7) -> list[dict[str, torch.Tensor]]:
    """Classification examples with a token-level ``rationale`` prior on positions 2–3 and uneven padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (n, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    rows = []
    for i in range(n):
        mask = torch.zeros(length, dtype=torch.long)
        mask[: length - (i % 3)] = 1
        rationale = torch.zeros(length)
        rationale[2:4] = 1.0
        rows.append({"input_ids": ids[i] * mask, "attention_mask": mask, "labels": torch.tensor(i % 2),
                     "rationale": rationale})  # fmt: skip
    return rows


# -- measuring -------------------------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{canonical name: detached CPU copy}`` of every parameter (trainable or not)."""
    return {n: p.detach().cpu().clone() for n, p in ParamIndex(model).items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor: equality of bits (so -0.0 ≠ 0.0 and NaN == NaN)."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view(
        {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def moved(before: torch.Tensor, after: torch.Tensor, where: torch.Tensor | None = None) -> int:
    """Number of coordinates (within boolean ``where``, default all) whose bits differ."""
    diff = _bits(before.cpu()) != _bits(after.detach().cpu())
    if where is not None:
        diff = diff & where.cpu().expand(diff.shape)
    return int(diff.sum())


def digest(model: nn.Module) -> str:
    """SHA-256 of all parameters (canonical order): equal digests = bit-identical weights across ranks."""
    h = hashlib.sha256()
    for name, p in sorted(snapshot(model).items()):
        h.update(name.encode())
        h.update(_bits(p.float() if p.dtype == torch.bfloat16 else p).numpy().tobytes())
    return h.hexdigest()


def _origin(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__module__", None) or type(fn).__module__ or ""


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")
_OPTIMIZER_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")


def _hook_dicts(model: nn.Module, optimizer: Any = None) -> Iterator[tuple[str, dict]]:
    for name, module in model.named_modules(remove_duplicate=False):
        for attr in _MODULE_HOOKS:
            yield f"module {name or '<root>'}.{attr}", getattr(module, attr, None) or {}
    for name, param in model.named_parameters(remove_duplicate=False):
        for attr in _TENSOR_HOOKS:
            yield f"tensor {name}.{attr}", getattr(param, attr, None) or {}
    import torch.nn.modules.module as mm

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):  # fmt: skip
        yield f"global {attr}", getattr(mm, attr, {})
    if optimizer is not None:
        opt = innermost_optimizer(optimizer)
        for attr in _OPTIMIZER_HOOKS:
            yield f"optimizer {type(opt).__name__}.{attr}", getattr(opt, attr, None) or {}


def hook_census(model: nn.Module, optimizer: Any = None) -> dict[str, int]:
    """Number of registered hooks per location (module / parameter / global / optimizer), non-empty only."""
    return {where: len(d) for where, d in _hook_dicts(model, optimizer) if len(d)}


def hfhooks_hooks(model: nn.Module, optimizer: Any = None) -> list[str]:
    """Every hook still registered whose function was defined in the ``hfhooks`` package."""
    return [
        f"{where}: {getattr(fn, '__qualname__', fn)!s}"
        for where, d in _hook_dicts(model, optimizer)
        for fn in list(d.values())
        if _origin(fn).split(".")[0] == "hfhooks"
    ]


class HookProbe(T.TrainerCallback):
    """Records the hook census at ``on_train_begin`` — after the Trainer wrapped the model and built the
    optimizer, before any hfhooks callback (put this probe first) installed its hooks."""

    def __init__(self):
        self.before: dict[str, int] | None = None
        self.optimizer = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.before, self.optimizer = hook_census(model, optimizer), optimizer


def hooks_report(probe: HookProbe, model: nn.Module) -> dict[str, Any]:
    """What hfhooks left after training: hooks of hfhooks origin, and the census difference to the probe."""
    after = hook_census(model, probe.optimizer)
    before = probe.before or {}
    changed = {k: [before.get(k, 0), after.get(k, 0)] for k in set(before) | set(after)
               if before.get(k, 0) != after.get(k, 0)}  # fmt: skip
    return {"hfhooks_hooks_left": hfhooks_hooks(model, probe.optimizer), "census_changed": changed}


def train(model: nn.Module, args: T.TrainingArguments, dataset, callback, collator=None) -> T.Trainer:
    """Run a stock Trainer with ``[HookProbe(), callback]``; the probe is ``trainer.probe``."""
    probe = HookProbe()
    trainer = T.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                        callbacks=[probe, callback])  # fmt: skip
    trainer.probe = probe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


# -- scenarios ---------------------------------------------------------------------------------------------
def random_mask(model: nn.Module, ratio: float = 0.5, seed: int = 1) -> ParamMask:
    """An element mask over the *trainable* parameters (1 = may train)."""
    g = torch.Generator().manual_seed(seed)
    return ParamMask.from_scores(
        {n: torch.rand(p.shape, generator=g) for n, p in ParamIndex(model).items() if p.requires_grad}, ratio
    )


def _frozen_and_trained(before, model, keep: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(frozen coordinates that moved, allowed coordinates that moved); names missing in ``keep`` are frozen."""
    frozen = trained = 0
    for name, p in ParamIndex(model).items():
        k = keep.get(name, torch.zeros(p.shape, dtype=torch.bool)).cpu()
        frozen += moved(before[name], p, ~k)
        trained += moved(before[name], p, k)
    return frozen, trained


def scenario_gradient_mask(setup: str, out: Path, **extra: Any) -> dict[str, Any]:
    model = prepare_model(llama(), setup)
    mask = random_mask(model)
    before = snapshot(model)
    cb = GradientMaskCallback(mask)
    trainer = train(
        model, training_args(out, setup, gradient_accumulation_steps=2, **extra), ListData(lm_rows()), cb
    )
    frozen, trained = _frozen_and_trained(before, model, mask.to_dict())
    return {"frozen_moved": frozen, "trained": trained, "callback_hooks": 0 if cb.enforcer is None else -1,
            "evidence": {"masked_tensors": len(mask)}, **_finish(trainer, model)}  # fmt: skip


def _routing_data(label: int) -> TaggedDataset:
    rows = lm_rows(16, 8, seed=2 + label)
    return TaggedDataset(
        ListData(rows), tags={"routing": [label] * len(rows)}, group_by="routing", batch_size=2
    )


def scenario_routing(setup: str, out: Path, **extra: Any) -> dict[str, Any]:
    """Two phases with ``strict=True``: forget-only steps may move only dedicated coordinates, then
    retain-only steps may move only shared ones (and the retain forward zeroes dedicated activations)."""
    peft_kw = {"modules_to_save": ["mlp"]} if setup == "peft" else {}
    model = prepare_model(llama(), setup, **peft_kw)
    ded = dedicated_mask(model, mlp_units=8, heads=0 if setup == "peft" else 1)
    frozen = trained = 0
    evidence: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for phase, label in (("forget", FORGET), ("retain", RETAIN)):
        before = snapshot(model)
        cb = GradientRoutingCallback(ded, strict=True)
        args = training_args(out / phase, setup, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             max_steps=2, **extra)  # fmt: skip
        trainer = train(model, args, _routing_data(label), cb, TaggedCollator(homogeneous="routing"))
        index = ParamIndex(model)
        may = {}
        for n, p in index.items():
            d = ded[n].cpu().expand(p.shape) if n in ded else torch.zeros(p.shape, dtype=torch.bool)
            may[n] = (d if label == FORGET else ~d) & p.requires_grad
        f, t = _frozen_and_trained(before, model, may)
        frozen, trained = frozen + f, trained + t
        evidence[f"{phase}_trained"] = t
        evidence[f"{phase}_batches"] = cb.router.counts[phase]
        evidence["callback_hooks"] = evidence.get("callback_hooks", 0) + cb.router.num_hooks
        phase_report = _finish(trainer, model)
        report = {
            "hfhooks_hooks_left": report.get("hfhooks_hooks_left", []) + phase_report["hfhooks_hooks_left"],
            "census_changed": {**report.get("census_changed", {}), **phase_report["census_changed"]},
            "digest": phase_report["digest"],
        }
    return {"frozen_moved": frozen, "trained": trained, "callback_hooks": evidence.pop("callback_hooks"),
            "evidence": evidence, **report}  # fmt: skip


class CountingObjective(UnlearningObjective):
    """An :class:`UnlearningObjective` that counts forget / retain examples it was applied to."""

    def __call__(self, logits, labels, forget, example_id=None, causal=False):
        self.seen = getattr(self, "seen", {"forget": 0, "retain": 0})
        self.seen["forget"] += int(forget.sum())
        self.seen["retain"] += int((1 - forget.long()).sum())
        return super().__call__(logits, labels, forget, example_id, causal)


def _lm_nll(model: nn.Module, rows: list[dict[str, torch.Tensor]]) -> float:
    base = getattr(model, "_orig_mod", model)
    device = next(base.parameters()).device
    was = base.training
    base.eval()
    with torch.no_grad():
        ids = torch.stack([r["input_ids"] for r in rows]).to(device)
        loss = float(base(input_ids=ids, labels=ids).loss)
    base.train(was)
    return loss


def scenario_unlearning(setup: str, out: Path, **extra: Any) -> dict[str, Any]:
    model = prepare_model(llama(), setup)
    rows = lm_rows(12, 8, seed=3)
    forget, retain = rows[:4], rows[4:]
    before = snapshot(model)
    nll_before = _lm_nll(model, forget)
    objective = CountingObjective("graddiff", retain_weight=1.0)
    cb = SaliencyUnlearningCallback(forget, objective=objective, ratio=0.3, batch_size=4, progress=False)
    args = training_args(out, setup, max_steps=4, learning_rate=5e-2, **extra)
    trainer = train(model, args, forget_retain_dataset(forget, retain), cb, TaggedCollator())
    frozen, trained = _frozen_and_trained(before, model, cb.mask.to_dict())
    nll_after = _lm_nll(model, forget)
    hooks = (0 if cb.freezer is None else -1) + (0 if cb.hook is None else -1)
    return {"frozen_moved": frozen, "trained": trained, "callback_hooks": hooks,
            "evidence": {"seen": objective.seen, "forget_nll_before": nll_before, "forget_nll_after": nll_after,
                         "mask_density": cb.mask.density()},
            **_finish(trainer, model)}  # fmt: skip


def scenario_attribution(setup: str, out: Path, **extra: Any) -> dict[str, Any]:
    targets = ("query", "value")
    model = prepare_model(bert(), setup, targets=targets, modules_to_save=["classifier"])
    before = snapshot(model)
    cb = AttributionAlignmentCallback(
        "grad_x_input", prior="rationale", weight=1.0, special_token_ids=[0, 2, 3]
    )
    data = TaggedDataset(ListData(rationale_rows()), tags=["rationale"])
    trainer = train(model, training_args(out, setup, max_steps=2, **extra), data, cb, TaggedCollator())
    terms = [h["align/term"] for h in trainer.state.log_history if "align/term" in h]
    trainable = {
        n: torch.ones(p.shape, dtype=torch.bool) for n, p in ParamIndex(model).items() if p.requires_grad
    }
    frozen, trained = _frozen_and_trained(before, model, trainable)
    return {"frozen_moved": frozen, "trained": trained, "callback_hooks": cb.alignment.num_hooks,
            "evidence": {"terms": terms, "gradient_checked": cb.alignment._checked},
            **_finish(trainer, model)}  # fmt: skip


def scenario_restoration(setup: str, out: Path, **extra: Any) -> dict[str, Any]:
    """Train, then restore layer 0 to the pre-training weights at each save (checkpoint edited in place) and at
    train end (live model); layer 1 keeps its training."""
    base = llama()
    reference = {n: p.detach().clone() for n, p in base.state_dict().items()}
    model = prepare_model(base, setup)
    before = snapshot(model)
    cb = LayerRestorationCallback(reference, "0:1", when=("save", "train_end"))
    args = training_args(out, setup, save_strategy="steps", save_steps=3, save_only_model=True, **extra)
    trainer = train(model, args, ListData(lm_rows()), cb)
    index = ParamIndex(model)
    layer0 = re.compile(r"^model\.layers\.0\.")
    restored_live = sum(
        moved(reference[n], p) for n, p in index.items() if layer0.match(n) and n in reference
    )
    effective_live = _effective_layer0_mismatch(model, reference)
    layer1_trained = sum(moved(before[n], p) for n, p in index.items() if n.startswith("model.layers.1."))
    ckpt_mismatch = None
    if trainer.args.process_index == 0:
        ckpt_mismatch = _checkpoint_layer0_mismatch(Path(args.output_dir) / "checkpoint-3", reference, cb)
    return {"frozen_moved": restored_live + effective_live, "trained": layer1_trained, "callback_hooks": 0,
            "evidence": {"reports": len(cb.reports), "adapters": sum(len(r.adapters) for r in cb.reports),
                         "checkpoint_mismatch": ckpt_mismatch},
            **_finish(trainer, model)}  # fmt: skip


def _effective_layer0_mismatch(model: nn.Module, reference: dict[str, torch.Tensor]) -> int:
    """Coordinates of layer-0 LoRA layers whose effective weight (W + s·B·A) differs from the reference."""
    from hfhooks.core.params import canonical_name
    from hfhooks.masks.lora import lora_layers

    bad = 0
    names = {id(m): n for n, m in model.named_modules()}
    for layer in lora_layers(model).values():
        name = names[id(layer)]
        if ".layers.0." not in name:
            continue
        w = layer.base_layer.weight
        for adapter in layer.lora_A:
            delta = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight * layer.scaling[adapter]
            bad += moved(reference[canonical_name(f"{name}.weight")], (w + delta).detach())
    return bad


def _checkpoint_layer0_mismatch(ckpt: Path, reference: dict[str, torch.Tensor], cb) -> int:
    """Layer-0 tensors of the saved checkpoint that differ from the reference (adapters: nonzero lora_B)."""
    from hfhooks.io.checkpoints import Checkpoint

    if not any(r.path is not None and Path(r.path) == ckpt for r in cb.reports):
        return -1  # the save-time edit did not happen
    saved = Checkpoint(ckpt)
    bad = 0
    for name in saved:
        if ".layers.0." not in name:
            continue
        t = saved.get(name)
        if "lora_B" in name:
            bad += int((t != 0).sum())
        elif "lora_" not in name:
            bad += moved(reference[name], t)
    return bad


def _finish(trainer: T.Trainer, model: nn.Module) -> dict[str, Any]:
    return {**hooks_report(trainer.probe, model), "digest": digest(model)}


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "gradient_mask": scenario_gradient_mask,
    "routing": scenario_routing,
    "unlearning": scenario_unlearning,
    "attribution": scenario_attribution,
    "restoration": scenario_restoration,
}


def run_scenario(callback: str, setup: str, out: Path, **extra: Any) -> dict[str, Any]:
    """Train ``callback``'s scenario under ``setup`` (``extra``: more TrainingArguments overrides); return the
    measured facts (see :func:`check_result`)."""
    return SCENARIOS[callback](setup, Path(out), **extra)


def check_result(callback: str, r: dict[str, Any]) -> None:
    """Assert a scenario's facts: no hooks left, nothing frozen moved, something trained, the callback acted."""
    assert r["hfhooks_hooks_left"] == [], f"hooks left by hfhooks: {r['hfhooks_hooks_left']}"
    assert r["census_changed"] == {}, f"hook counts changed by training: {r['census_changed']}"
    assert r["callback_hooks"] == 0, "the callback still holds live hooks"
    assert r["frozen_moved"] == 0, f"{r['frozen_moved']} frozen / restored coordinates moved"
    assert r["trained"] > 0, "nothing trained: the check would pass vacuously"
    ev = r["evidence"]
    if callback == "gradient_mask":
        assert ev["masked_tensors"] > 0
    elif callback == "routing":
        assert ev["forget_trained"] > 0 and ev["retain_trained"] > 0, ev
        assert ev["forget_batches"] > 0 and ev["retain_batches"] > 0, ev
    elif callback == "unlearning":
        assert ev["seen"]["forget"] > 0 and ev["seen"]["retain"] > 0, ev
        assert ev["forget_nll_after"] > ev["forget_nll_before"], (
            f"the forget set did not get less likely: {ev}"
        )
    elif callback == "attribution":
        assert ev["gradient_checked"], "the alignment term was never checked to send gradient"
        assert ev["terms"] and all(t > 0 for t in ev["terms"]), f"no alignment term logged: {ev}"
    elif callback == "restoration":
        assert ev["reports"] >= 1, ev
        if ev["checkpoint_mismatch"] is not None:
            assert ev["checkpoint_mismatch"] == 0, (
                f"the saved checkpoint's layer 0 is not the reference: {ev}"
            )


# -- refusals --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def refused(request: pytest.FixtureRequest, exc: type[BaseException], match: str) -> Iterator[None]:
    """``pytest.raises(exc, match=match)`` that records the message it checked for the matrix (✗ cell)."""
    with pytest.raises(exc, match=match) as info:
        yield
    request.node.user_properties.append(("compat_error", str(info.value)))


def scenario_routing_mixed(setup: str, out: Path, **extra: Any) -> dict[str, Any]:
    """Forget and retain micro-batches mixed in one run with ``strict=True``: under DDP one rank's micro-batch
    can be *forget* while the other's is *retain* in the same step; ranks must still agree bit for bit."""
    model = prepare_model(llama(), setup)
    ded = dedicated_mask(model, mlp_units=8, heads=1)
    rows = lm_rows(32, 8, seed=5)
    labels = [FORGET if i % 2 else RETAIN for i in range(len(rows))]
    data = TaggedDataset(ListData(rows), tags={"routing": labels}, group_by="routing", batch_size=2)
    cb = GradientRoutingCallback(ded, strict=True)
    args = training_args(out, setup, per_device_train_batch_size=1, max_steps=6, **extra)
    trainer = train(model, args, data, cb, TaggedCollator(homogeneous="routing"))
    return {
        "counts": dict(cb.router.counts),
        "callback_hooks": cb.router.num_hooks,
        **_finish(trainer, model),
    }


def torchrun_once(
    tmp_path_factory: Any, script: Path, name: str, timeout: int = 500, env: dict[str, str] | None = None
) -> list[dict]:
    """Both ranks' JSON results of ``torchrun --nproc_per_node 2 script --out DIR`` (``env``: extra environment):
    one launch per test session, shared by pytest-xdist workers through a file lock (the launch is the slow
    part)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import free_port
    from filelock import FileLock

    # under xdist the base is <session>/popen-gwN, so the session directory is its parent
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared / "lock")):
        if not (shared / "rank1.json").exists():
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
                   "--out", str(shared)]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return [json.loads((shared / f"rank{r}.json").read_text()) for r in (0, 1)]
