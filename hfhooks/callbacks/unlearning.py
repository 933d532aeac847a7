"""``SaliencyUnlearningCallback``: SalUn (saliency mask + forgetting objective) inside a stock ``Trainer``."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from hfhooks.callbacks._guards import fsdp_version, has_dtensors, refuse_step_in_backward, refuse_unsupported
from hfhooks.data import TaggedCollator
from hfhooks.freeze import GradientMask, check_freeze_args
from hfhooks.masks import ParamMask
from hfhooks.saliency import compute_saliency
from hfhooks.unlearning import UnlearningObjective, objective_hook, reference_logprobs

__all__ = ["SaliencyUnlearningCallback"]


class SaliencyUnlearningCallback(TrainerCallback):
    """SalUn in any Trainer run: a weight-saliency mask on the forget set, then a forgetting objective.

    At ``on_train_begin`` (original weights θ₀, eval mode) the callback scores weights by ``|Σ ∇θ L_f|`` over
    ``forget`` and keeps the top ``ratio`` globally — or uses ``mask`` — then enforces it with the hard-freeze
    guarantee and swaps the model's loss for the objective. Train on
    :func:`~hfhooks.forget_retain_dataset` ``(forget, retain)`` with ``data_collator=TaggedCollator(...)``.
    Under DDP every rank scores the whole forget set and rank 0's scores are broadcast, so all ranks hold the
    same mask. On a PeftModel the mask covers the trainable (LoRA) parameters.

    Args:
        forget: the forget set (map-style dataset of dict examples), for the mask and NPO's reference.
        objective: an :class:`~hfhooks.UnlearningObjective` or its name (``random_labels``, ``ga``,
            ``graddiff``, ``npo``).
        ratio: fraction of weights that may change (SalUn's r; 0.5 by default).
        mask: a precomputed mask (or its path) instead of scoring.
        retain_weight: α when ``objective`` is given by name.
        collate: collator for forget examples (default: ``transformers.default_data_collator``).
        batch_size: batch size for scoring and the NPO reference pass.
        freeze: freeze mode (``hard`` default; see :class:`~hfhooks.GradientMask`).
        save_mask: save the mask there (safetensors) once computed.
    """

    def __init__(
        self,
        forget: Any,
        objective: UnlearningObjective | str = "random_labels",
        ratio: float = 0.5,
        mask: ParamMask | str | os.PathLike | None = None,
        retain_weight: float = 1.0,
        collate: Callable | None = None,
        batch_size: int = 32,
        freeze: str = "hard",
        save_mask: str | os.PathLike | None = None,
        progress: bool = True,
    ):
        check_freeze_args(freeze, "freeze")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio={ratio} must be in (0, 1]: the fraction of weights allowed to change.")
        self.forget, self.ratio, self.freeze, self.batch_size = forget, ratio, freeze, batch_size
        self.objective = (
            UnlearningObjective(objective, retain_weight=retain_weight)
            if isinstance(objective, str)
            else objective
        )
        self.mask = mask if mask is None or isinstance(mask, ParamMask) else ParamMask.load(mask)
        self.collate = collate or TaggedCollator().base
        self.save_mask, self.progress = save_mask, progress
        self.freezer: GradientMask | None = None
        self.hook = None
        self._own_reference = False

    def _compute_mask(self, model) -> ParamMask:
        loader = torch.utils.data.DataLoader(self.forget, batch_size=self.batch_size, collate_fn=self.collate)
        scores = compute_saliency(model, loader, "grad_abs_sum", progress=self.progress)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in scores.values():  # identical masks on every rank, whatever the float noise
                torch.distributed.broadcast(t, src=0)
        mask = ParamMask.from_scores(scores, self.ratio)
        mask.metadata.update(scores.metadata)
        return mask

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_unsupported(args, "SaliencyUnlearningCallback", fsdp2=True, model=model)
        refuse_step_in_backward(args, "SaliencyUnlearningCallback", optimizer)
        if getattr(args, "label_smoothing_factor", 0) > 0:  # checked before the (costly) saliency pass
            raise ValueError(
                f"SaliencyUnlearningCallback does not support label_smoothing_factor={args.label_smoothing_factor}: "
                "the Trainer then removes `labels` from the model's inputs and replaces the model's loss with a "
                "label-smoothed cross-entropy on every example, so the forget/retain objective would neither see "
                "the labels nor act. Set label_smoothing_factor=0."
            )
        if self.mask is None and (fsdp_version(args) == 2 or has_dtensors(model)):
            raise RuntimeError(
                "SaliencyUnlearningCallback cannot score saliency under FSDP2 (gradients are sharded, the top-k "
                "must be global). Compute the mask first — this callback under DDP or one process with "
                "save_mask=..., or hfhooks.compute_saliency + ParamMask.from_scores — and pass mask=... here."
            )
        self._detach()
        if self.mask is None:
            self.mask = self._compute_mask(model)
            if self.save_mask is not None and state.is_world_process_zero:
                self.mask.save(self.save_mask, model=model)
        if self.objective.name == "npo" and (self.objective.reference is None or self._own_reference):
            # NPO's reference is this run's θ₀: recomputed at every train start, never reused from another model
            self.objective.reference = reference_logprobs(
                model, self.forget, self.collate, self.batch_size, self.progress
            )
            self._own_reference = True
        self.freezer = GradientMask(model, self.mask, self.freeze).attach(optimizer)
        self.hook = objective_hook(model, self.objective).attach()

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
