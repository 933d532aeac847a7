"""``AttributionAlignmentCallback``: add λ·D(attribution, prior) to the loss of any ``Trainer`` run."""

from __future__ import annotations

import contextlib
from typing import Any

from transformers import TrainerCallback

from hfhooks.attribution.alignment import AttributionAlignment
from hfhooks.attribution.config import AlignmentConfig
from hfhooks.attribution.methods import needs_double_backprop
from hfhooks.core.hooks import FiniteMonitor
from hfhooks.trainer.guards import (
    deepspeed_zero_stage,
    has_fused_lm_head,
    refuse_lossless_outputs,
    refuse_unsupported,
)
from hfhooks.trainer.reporting import add_to_logs, report_before_integrations
from hfhooks.trainer.state import ResumeFrom, load_state, save_state

__all__ = ["AttributionAlignmentCallback"]

_OWNER = "AttributionAlignmentCallback"
_FIELDS = tuple(f for f in AlignmentConfig.__dataclass_fields__ if f != "resume_from")
_ZERO3_REASON = (
    "under ZeRO-3 (verified with deepspeed 0.19.8) the attribution's gradient is a second graph through the model "
    "(torch.autograd.grad inside the forward), and ZeRO-3 gathers each module's partitioned parameters only "
    "around that module's own forward and backward: the training backward through the attribution's graph "
    "finds them released (empty) and fails with a shape error, for double-backprop and first-order methods "
    "alike"
)
_ZERO0_REASON = (
    "only ZeRO-1 and ZeRO-2 are verified, and this run's stage is 0 or could not be read (from "
    "TrainingArguments(deepspeed=...), ACCELERATE_DEEPSPEED_ZERO_STAGE, or the model's parameters)"
)
_ZERO12_INSTEAD = (
    "ZeRO-1 and ZeRO-2 (full parameters on every rank) are supported: set zero_optimization.stage to 1 or 2, or "
    "train with DDP (torchrun --nproc_per_node N your_script.py)."
)


class AttributionAlignmentCallback(TrainerCallback):
    """Attribution alignment in a stock Trainer (see :class:`~hfhooks.attribution.AttributionAlignment`).

    Priors from dataset columns travel as tags: wrap the training set in :class:`~hfhooks.TaggedDataset`
    (``tags=["rationale"]``) and pass :class:`~hfhooks.TaggedCollator` (with a padding ``base`` collator). The term
    (before λ) and its share of the loss are logged as ``align/term`` and ``align/share``.

    Example::

        cb = AttributionAlignmentCallback(method="grad_x_input", prior="rationale", distance="kl", weight=0.5)
        Trainer(model, args, train_dataset=TaggedDataset(ds, tags=["rationale"]),
                data_collator=TaggedCollator(DataCollatorWithPadding(tok)), callbacks=[cb]).train()

    Gradient checkpointing must be non-reentrant (``gradient_checkpointing_kwargs={"use_reentrant": False}``):
    reentrant checkpointing breaks ``torch.autograd.grad``. With it, methods that need double backprop keep SDPA's
    math kernel for the whole step, so that the backward's recomputation matches the forward.

    DeepSpeed: ZeRO-1 and ZeRO-2 are supported (the weights trained equal those of a DDP run); ZeRO-3 is
    refused (and stage 0, unverified): it gathers each module's partitioned parameters only around that module's own forward and
    backward, and the training backward through the attribution's graph finds them released.

    ``torch_compile=True`` works with ``torch_compile_backend="eager"`` only: AOTAutograd backends (``inductor``,
    ``aot_eager``…) hide the embedding output inside the compiled graph, so no attribution can be taken there;
    the callback refuses them with that alternative.

    FSDP2 (``fully_shard``) works for every method but ``integrated_gradients`` (refused): while the term is
    built the sharded modules stay gathered until their backward (see docs/attribution.md).

    Options: ``method`` (may be given first, positionally) and the other fields of
    :class:`~hfhooks.AlignmentConfig` — pass ``config=AlignmentConfig(...)`` or the same fields as keywords. They
    are validated when the callback is built.

    Resuming: the options (the config), the token-sampling generator and the reuse decision are saved with every checkpoint
    (``<checkpoint>/hfhooks/``) and restored on ``resume_from_checkpoint``; other options than the checkpoint's,
    or a checkpoint without them, raise (``resume_from=False`` starts afresh; ``resume_from=PATH`` names the
    checkpoint when it is not the Trainer's ``output_dir/checkpoint-<step>``).
    """

    reports_metrics = True  # moved ahead of the report_to integrations (see hfhooks/trainer/reporting.py)

    def __init__(self, method: str | None = None, *, config: AlignmentConfig | None = None, **options: Any):
        if method is not None:
            options = {"method": method, **options}
        # validated here, not when training starts: a bad option fails where it is written
        self.config = AlignmentConfig.resolve(config, options, _OWNER)
        self.resume_from: ResumeFrom = self.config.resume_from
        self.alignment: AttributionAlignment | None = None
        self._finite: FiniteMonitor | None = None
        self._hold_math_sdpa = False
        self._sdpa: contextlib.ExitStack | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The alignment options (the config's fields but ``resume_from``)."""
        return {f: getattr(self.config, f) for f in _FIELDS}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # ZeRO-1/2 keep full parameters and reduce gradients from AccumulateGrad hooks, which the attribution's
        # torch.autograd.grad (taken w.r.t. the site, inside the forward) never runs; ZeRO-3 cannot (see reason)
        stage = deepspeed_zero_stage(args, model)
        refuse_unsupported(
            args,
            "AttributionAlignmentCallback",
            model=model,
            fsdp2=True,  # FSDP2: see alignment._gathered_through_backward
            deepspeed=True if stage in (1, 2) else _ZERO3_REASON if stage == 3 else _ZERO0_REASON,
            instead=_ZERO12_INSTEAD if stage in (0, 3) else None,
        )
        if has_fused_lm_head(model):
            raise ValueError(
                "AttributionAlignmentCallback aligns attributions of classification logits [batch, classes], but "
                "this model's forward is TRL's fused LM head (SFTTrainer / DPOTrainer train a causal LM and read "
                "label log-probabilities, never logits). Train a ...ForSequenceClassification model with "
                "transformers.Trainer instead."
            )
        refuse_lossless_outputs(args, "AttributionAlignmentCallback", model, per_example=True, loss="logits")
        report_before_integrations(args)  # so that routing/* and align/* reach TensorBoard, wandb…
        if getattr(args, "gradient_checkpointing", False):
            gc = getattr(args, "gradient_checkpointing_kwargs", None) or {}
            if gc.get("use_reentrant", True) is not False:
                raise RuntimeError(
                    "Attribution alignment needs torch.autograd.grad inside the forward, which reentrant gradient "
                    "checkpointing breaks. Pass TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': False})."
                )
        backend = getattr(args, "torch_compile_backend", None) or "inductor"
        if getattr(args, "torch_compile", False) and backend != "eager":
            raise RuntimeError(
                f"AttributionAlignmentCallback does not support torch.compile with the {backend!r} backend: "
                "AOTAutograd compiles the embedding output away, so no attribution can be taken from it (and "
                "compiled graphs have no double backward). Pass TrainingArguments(torch_compile_backend='eager'), "
                "or train with torch_compile=False."
            )
        # the backward recomputes checkpointed layers outside the forward's math-SDPA context: hold it all step
        self._hold_math_sdpa = bool(getattr(args, "gradient_checkpointing", False)) and needs_double_backprop(
            self.options["method"]
        )
        if self.alignment is not None:
            self.alignment.detach()
        self.alignment = AttributionAlignment(model, config=self.config)
        saved = load_state(args, state, _OWNER, self.resume_from, config=self.config)
        if saved is not None:
            self._restore(*saved)
        self.alignment.attach()
        # a NaN/inf loss turns every trainable weight non-finite and the Trainer's console shows loss 0.0: warn
        self._finite = FiniteMonitor.for_model(model, _OWNER, state.global_step)

    def _restore(self, tensors: dict, meta: dict) -> None:
        # the options were compared with the checkpoint's by load_state (check_same_config)
        # the generator samples attributed tokens (fraction < 1): continue its stream where the checkpoint left it
        self.alignment._generator.set_state(tensors["generator"])
        self.alignment.reuse_backward = meta["reuse_backward"]
        self.alignment.reused = meta["reused"]

    def on_save(self, args, state, control, **kwargs):
        if self.alignment is None:
            return
        meta = {"reuse_backward": self.alignment.reuse_backward, "reused": self.alignment.reused}
        tensors = {"generator": self.alignment._generator.get_state()}
        save_state(args, state, _OWNER, tensors, meta, config=self.config)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.alignment is not None:
            self.alignment.step = state.global_step
            if self._hold_math_sdpa and self._sdpa is None:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                self._sdpa = contextlib.ExitStack()
                self._sdpa.enter_context(sdpa_kernel(SDPBackend.MATH))

    def on_step_end(self, args, state, control, **kwargs):
        self._release_sdpa()
        if self._finite is not None:
            self._finite.check()

    def _release_sdpa(self) -> None:
        if self._sdpa is not None:
            self._sdpa.close()
            self._sdpa = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.alignment is not None and logs is not None and "loss" in logs:
            add_to_logs(state, logs, {k: round(v, 6) for k, v in self.alignment.pop_stats().items()})

    def on_train_end(self, args, state, control, **kwargs):
        self._release_sdpa()
        if self._finite is not None:
            self._finite.flush()
            self._finite = None
        if self.alignment is not None:
            self.alignment.detach()
