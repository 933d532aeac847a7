"""``GradientMaskCallback``: only masked-in coordinates train, in any ``transformers.Trainer`` run."""

from __future__ import annotations

import os

from transformers import TrainerCallback

from hfhooks.freeze.gradient_mask import GradientMask, check_freeze_args
from hfhooks.masks.mask import ParamMask
from hfhooks.trainer.guards import refuse_step_in_backward, refuse_unsupported
from hfhooks.trainer.state import ResumeFrom, check_same_mask, load_mask, save_mask

__all__ = ["GradientMaskCallback"]


class GradientMaskCallback(TrainerCallback):
    """Enforce a :class:`~hfhooks.ParamMask` during ``Trainer.train()`` (see :class:`~hfhooks.GradientMask`).

    Hooks are installed at ``on_train_begin`` — after the Trainer has created the optimizer, wrapped the model
    and loaded any checkpoint it resumes from — and all removed at ``on_train_end``, or, when an exception ends
    ``train()`` before that, as soon as the run is seen to be over (see :mod:`hfhooks.core.hooks`). With
    ``freeze="hard"`` (default) the callback also checks at the end that no frozen coordinate moved, and raises
    if one did. It warns once if trainable weights turn NaN / inf (a non-finite loss or gradient).

    Args:
        mask: a :class:`ParamMask` (1 = may train) or the path of a saved mask.
        freeze: ``"hard"`` | ``"groups"`` | ``"grad"`` (see :mod:`hfhooks.freeze.gradient_mask`).
        others: ``"freeze"`` (default: parameters the mask does not name do not train) or ``"train"``.
        verify: check at train end that frozen coordinates are bit-identical (``hard``/``groups`` only).
        resume_from: the checkpoint whose saved mask a resumed run is checked against (default: the one the
            Trainer resumes from); ``False`` skips the check.

    The mask is saved with every checkpoint (``<checkpoint>/hfhooks/``); a resumed run raises if its mask
    differs from the one the checkpoint was trained with, or if the checkpoint holds none.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[GradientMaskCallback("salun_mask.safetensors")])
        trainer.train()
    """

    def __init__(
        self,
        mask: ParamMask | str | os.PathLike,
        freeze: str = "hard",
        others: str = "freeze",
        verify: bool = True,
        resume_from: ResumeFrom = None,
    ):
        self.mask = mask if isinstance(mask, ParamMask) else ParamMask.load(mask)
        self.freeze, self.others, self.verify = freeze, others, verify
        self.enforcer: GradientMask | None = None
        self.resume_from = resume_from
        check_freeze_args(freeze, others)  # fail at construction, not at train time

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_unsupported(args, "GradientMaskCallback", fsdp2=True, model=model)
        refuse_step_in_backward(args, "GradientMaskCallback", optimizer)
        saved = load_mask(args, state, "GradientMaskCallback", self.resume_from)
        if saved is not None:
            check_same_mask(self.mask, saved, "GradientMaskCallback")
        if self.enforcer is not None:
            self.enforcer.detach()
        self.enforcer = GradientMask(model, self.mask, self.freeze, self.others).attach(optimizer)
        if self.enforcer.finite is not None:  # name the Trainer's step in the non-finite warning
            self.enforcer.finite.step_offset = state.global_step

    def on_save(self, args, state, control, model=None, **kwargs):
        save_mask(args, state, "GradientMaskCallback", self.mask, model=model)

    def on_train_end(self, args, state, control, **kwargs):
        if self.enforcer is None:
            return
        moved = self.enforcer.moved() if self.verify and self.freeze != "grad" else {}
        self.enforcer.detach()
        self.enforcer = None
        if moved:
            raise RuntimeError(
                f"Frozen coordinates moved during training (a bug in hfhooks; please report): {moved}"
            )
