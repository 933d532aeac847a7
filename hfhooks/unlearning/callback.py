"""``SaliencyUnlearningCallback``: SalUn (saliency mask + forgetting objective) inside a stock ``Trainer``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from hfhooks.core.data import TaggedCollator
from hfhooks.core.params import ParamIndex
from hfhooks.freeze.deepspeed import finish_outside_backward, full_shape, require_zero, zero_stage
from hfhooks.freeze.gradient_mask import GradientMask
from hfhooks.masks.lora import lora_layers, lora_unit_mask, lora_unit_saliency
from hfhooks.masks.mask import ParamMask
from hfhooks.masks.saliency import compute_saliency, shard_slices
from hfhooks.trainer.guards import (
    has_dtensors,
    has_fused_lm_head,
    refuse_lossless_outputs,
    refuse_step_in_backward,
    refuse_unsupported,
    uses_deepspeed,
)
from hfhooks.trainer.state import (
    CallbackStateError,
    ResumeFrom,
    check_same_mask,
    load_mask,
    load_state,
    save_mask,
    save_state,
)
from hfhooks.unlearning.config import SalUnConfig
from hfhooks.unlearning.objectives import UnlearningObjective, objective_hook, reference_logprobs

__all__ = ["SaliencyUnlearningCallback"]


class SaliencyUnlearningCallback(TrainerCallback):
    """SalUn in any Trainer run: a weight-saliency mask on the forget set, then a forgetting objective.

    At ``on_train_begin`` (original weights θ₀, eval mode) the callback scores weights by ``|Σ ∇θ L_f|`` over
    ``forget`` and keeps the top ``ratio`` globally — or uses ``mask`` — then enforces it with the hard-freeze
    guarantee and swaps the model's loss for the objective. Train on
    :func:`~hfhooks.forget_retain_dataset` ``(forget, retain)`` with ``data_collator=TaggedCollator(...)``.
    Under DDP (and DeepSpeed ZeRO-1/2) every rank scores the whole forget set and rank 0's scores are broadcast,
    so all ranks hold the same mask. Under FSDP2 and ZeRO-3 every rank scores the whole forget set on its own
    shards / partitions only, and the top-k is global (:meth:`~hfhooks.ParamMask.from_sharded_scores`): every
    rank gets the same mask, the one a single process would select from the full scores. On a PeftModel with LoRA adapters the mask is over output units (see
    :func:`~hfhooks.masks.lora.lora_unit_saliency`): the adapted base weights are scored, the top ``ratio`` of their
    output units keep trainable ``lora_B`` rows, the others' ``lora_B`` rows stay zero.

    Args:
        forget: the forget set (map-style dataset of dict examples), for the mask and NPO's reference.
        objective: an :class:`~hfhooks.UnlearningObjective` (its ``name`` and ``retain_weight`` then fill the
            config's), or the objective's name — a config field.
        mask: a precomputed mask (or its path) instead of scoring.
        collate: collator for forget examples (default: ``transformers.default_data_collator``).
        config: a :class:`~hfhooks.SalUnConfig` — ``objective``, ``ratio`` (fraction of weights that may change,
            SalUn's r; 0.5 by default), ``retain_weight`` (α when ``objective`` is a name), ``batch_size`` (of
            the scoring and NPO reference passes), ``freeze`` (``hard`` default; see
            :class:`~hfhooks.GradientMask`), ``save_mask`` (save the mask there once computed), ``progress`` and
            ``resume_from`` (the checkpoint to read the saved mask and NPO reference from on
            ``resume_from_checkpoint``; ``False`` recomputes both at the resumed weights). Its fields may also
            be given as keywords.

    Resuming: the mask, NPO's reference log-probabilities and the random-label generator are saved with every
    checkpoint (``<checkpoint>/hfhooks/``, with the config) and restored on
    ``trainer.train(resume_from_checkpoint=...)``, so a resumed run trains exactly the θ₀ mask and equals the
    uninterrupted one. A checkpoint without them, or one trained with another config (but ``batch_size``,
    ``save_mask``, ``progress``), raises :class:`~hfhooks.trainer.state.CallbackStateError`; it is never
    re-scored silently at the resumed weights.
    """

    def __init__(
        self,
        forget: Any,
        *,
        objective: UnlearningObjective | str | None = None,
        mask: ParamMask | str | os.PathLike | None = None,
        collate: Callable | None = None,
        config: SalUnConfig | None = None,
        **options: Any,
    ):
        if isinstance(objective, UnlearningObjective):
            if options.get("retain_weight", objective.retain_weight) != objective.retain_weight:
                raise ValueError(
                    f"SaliencyUnlearningCallback: retain_weight={options['retain_weight']!r} contradicts the "
                    f"objective's retain_weight={objective.retain_weight!r}; set it on the UnlearningObjective."
                )
            options = {**options, "objective": objective.name, "retain_weight": objective.retain_weight}
        elif objective is not None:
            options = {**options, "objective": objective}
        self.config = SalUnConfig.resolve(config, options, "SaliencyUnlearningCallback")
        c = self.config
        self.forget, self.ratio, self.freeze, self.batch_size = forget, c.ratio, c.freeze, c.batch_size
        self.objective = (
            objective
            if isinstance(objective, UnlearningObjective)
            else UnlearningObjective(c.objective, retain_weight=c.retain_weight)
        )
        self.mask = mask if mask is None or isinstance(mask, ParamMask) else ParamMask.load(mask)
        self._given_mask = self.mask is not None  # given: verified on resume; computed: restored on resume
        self.resume_from: ResumeFrom = c.resume_from
        self.collate = collate or TaggedCollator().base
        self.save_mask, self.progress = c.save_mask, c.progress
        self.freezer: GradientMask | None = None
        self.hook = None
        self._own_reference = False

    def _compute_mask(self, model, optimizer=None) -> ParamMask:
        loader = torch.utils.data.DataLoader(self.forget, batch_size=self.batch_size, collate_fn=self.collate)
        lora = bool(lora_layers(model))
        if (
            lora
        ):  # a fresh adapter's own weights score 0 (B = 0): score the adapted base weights' output units
            scores = lora_unit_saliency(model, loader, progress=self.progress)
        else:
            scores = compute_saliency(
                model,
                loader,
                "grad_abs_sum",
                progress=self.progress,
                after_backward=lambda: finish_outside_backward(optimizer),  # ZeRO-3: the engine's epilogue
            )
        if not lora and (has_dtensors(model) or zero_stage(model) == 3):
            # FSDP2 / ZeRO-3: each rank holds the scores of its shards / partitions; the top-k is global (summed
            # histograms: no score leaves its rank) and every rank assembles the same full mask
            local = shard_slices(model, scores) if has_dtensors(model) else scores
            shapes = {n: full_shape(p) for n, p in ParamIndex(model).items()}
            mask = ParamMask.from_sharded_scores(local, self.ratio, shapes)
            mask.metadata.update(scores.metadata)
            mask.metadata["config"] = self.config.to_dict()
            return mask
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in scores.values():  # identical masks on every rank, whatever the float noise
                torch.distributed.broadcast(t, src=0)
        if lora:
            mask = lora_unit_mask(model, scores, self.ratio)
            others = [n for n, p in ParamIndex(model).items() if p.requires_grad and n not in mask]
            if others:
                warnings.warn(
                    f"SaliencyUnlearningCallback on LoRA: {len(others)} trainable non-LoRA parameters (e.g. "
                    f"{others[:3]}, modules_to_save) are outside the unit mask and stay frozen. Pass mask=... to "
                    "train them.",
                    stacklevel=3,
                )
            mask.metadata["config"] = self.config.to_dict()
            return mask
        mask = ParamMask.from_scores(scores, self.ratio)
        mask.metadata.update(scores.metadata)
        mask.metadata["config"] = self.config.to_dict()  # the options that produced it travel with it
        return mask

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_unsupported(args, "SaliencyUnlearningCallback", fsdp2=True, model=model, deepspeed=True)
        refuse_step_in_backward(args, "SaliencyUnlearningCallback", optimizer)
        refuse_lossless_outputs(args, "SaliencyUnlearningCallback", model, per_example=True, loss="per_token")
        if self.objective.name == "random_labels" and has_fused_lm_head(model):
            raise ValueError(
                "SaliencyUnlearningCallback(objective='random_labels') needs class logits, but this model's forward "
                "is TRL's fused LM head (SFTTrainer), which returns only label log-probabilities. Use "
                "objective='ga', 'graddiff' or 'npo'."
            )
        if getattr(args, "label_smoothing_factor", 0) > 0:  # checked before the (costly) saliency pass
            raise ValueError(
                f"SaliencyUnlearningCallback does not support label_smoothing_factor={args.label_smoothing_factor}: "
                "the Trainer then removes `labels` from the model's inputs and replaces the model's loss with a "
                "label-smoothed cross-entropy on every example, so the forget/retain objective would neither see "
                "the labels nor act. Set label_smoothing_factor=0."
            )
        if uses_deepspeed(args):  # checked before the (costly) saliency pass
            require_zero(model, "SaliencyUnlearningCallback")
        self._detach()
        restored = self._restore(args, state)
        sharded = "FSDP2" if has_dtensors(model) else "DeepSpeed" if uses_deepspeed(args) else None
        if not restored and self.mask is None and sharded and lora_layers(model):
            raise RuntimeError(
                f"SaliencyUnlearningCallback cannot score a LoRA unit mask under {sharded} (the unit scores of "
                "sharded base weights are not gathered). Compute the mask first — this callback under DDP or one "
                "process with save_mask=... — and pass mask=... here."
            )
        if not restored:
            if self.mask is None:
                self.mask = self._compute_mask(model, optimizer)
                if self.save_mask is not None and state.is_world_process_zero:
                    self.mask.save(self.save_mask, model=model, config=self.config.to_dict())
            if self.objective.name == "npo" and (self.objective.reference is None or self._own_reference):
                # NPO's reference is this run's θ₀: recomputed at every fresh train start, never reused from
                # another model (a resumed run restores the checkpoint's instead, see _restore)
                self.objective.reference = reference_logprobs(
                    model, self.forget, self.collate, self.batch_size, self.progress
                )
                self._own_reference = True
        if hasattr(self.forget, "__len__"):  # a given or restored reference may be stale
            self.objective.check_reference(len(self.forget), self._OWNER)
        self.freezer = GradientMask(model, self.mask, freeze=self.freeze).attach(optimizer)
        self.hook = objective_hook(model, self.objective).attach()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # DeepSpeed stepped inside backward; the hard freeze writes the frozen coordinates back now
        if self.freezer is not None and self.freezer.zero_stage:
            self.freezer.after_step()

    _OWNER = "SaliencyUnlearningCallback"

    def _restore(self, args, state) -> bool:
        """Load the mask, NPO reference and random-label generator saved with the resumed checkpoint.

        Returns False for a fresh run (or ``resume_from=False``); raises if a resumed checkpoint lacks them.
        """
        saved_mask = load_mask(args, state, self._OWNER, self.resume_from, config=self.config)
        if saved_mask is None:
            return False
        tensors, meta = load_state(args, state, self._OWNER, self.resume_from, config=self.config)
        if self._given_mask:
            check_same_mask(self.mask, saved_mask, self._OWNER)
        else:
            self.mask = saved_mask
        if meta.get("objective") != self.objective.name:
            raise CallbackStateError(
                f"{self._OWNER}: the checkpoint was trained with objective {meta.get('objective')!r}, this run "
                f"uses {self.objective.name!r}. Resume with the same objective, or pass resume_from=False."
            )
        if "npo_reference" in tensors:
            if self.objective.reference is not None and not self._own_reference:
                if not torch.equal(self.objective.reference.cpu(), tensors["npo_reference"]):
                    raise CallbackStateError(
                        f"{self._OWNER}: the NPO reference given for this resumed run differs from the one the "
                        "checkpoint was trained with. Pass the same reference, or resume_from=False."
                    )
            else:
                self.objective.reference = tensors["npo_reference"]
                self._own_reference = True
        if "generator" in tensors:  # random_labels: continue the label stream where the checkpoint left it
            self.objective.set_rng_state(tensors["generator"])
        return True

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.mask is None:
            return
        save_mask(args, state, self._OWNER, self.mask, model=model, config=self.config)
        tensors = {"generator": self.objective.get_rng_state()}
        if self.objective.name == "npo" and self.objective.reference is not None:
            tensors["npo_reference"] = self.objective.reference
        meta = {"objective": self.objective.name, "ratio": self.ratio}
        save_state(args, state, self._OWNER, tensors, meta, config=self.config)

    def _detach(self) -> dict[str, int]:
        moved = {}
        if self.freezer is not None:
            moved = self.freezer.moved() if self.freeze != "grad" else {}
            self.freezer.detach()
            self.freezer = None
        if self.hook is not None:
            self.hook.detach()
            self.hook = None
        return moved

    def on_train_end(self, args, state, control, **kwargs):
        moved = self._detach()
        if moved:
            raise RuntimeError(
                f"Frozen coordinates moved during unlearning (a bug in hfhooks; please report): {moved}"
            )
