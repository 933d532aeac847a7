"""``GradientMaskCallback``: only masked-in coordinates train, in any ``transformers.Trainer`` run."""

from __future__ import annotations

import os

from transformers import TrainerCallback

from hfhooks.callbacks._guards import refuse_step_in_backward, refuse_unsupported
from hfhooks.freeze import GradientMask, check_freeze_args
from hfhooks.masks import ParamMask

__all__ = ["GradientMaskCallback"]


class GradientMaskCallback(TrainerCallback):
    """Enforce a :class:`~hfhooks.ParamMask` during ``Trainer.train()`` (see :class:`~hfhooks.GradientMask`).

    Hooks are installed at ``on_train_begin`` — after the Trainer has created the optimizer, wrapped the model
    and loaded any checkpoint it resumes from — and all removed at ``on_train_end``. With ``freeze="hard"``
    (default) the callback also checks at the end that no frozen coordinate moved, and raises if one did.

    Args:
        mask: a :class:`ParamMask` (1 = may train) or the path of a saved mask.
        freeze: ``"hard"`` | ``"groups"`` | ``"grad"`` (see :mod:`hfhooks.freeze`).
        others: ``"freeze"`` (default: parameters the mask does not name do not train) or ``"train"``.
        verify: check at train end that frozen coordinates are bit-identical (``hard``/``groups`` only).

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
    ):
        self.mask = mask if isinstance(mask, ParamMask) else ParamMask.load(mask)
        self.freeze, self.others, self.verify = freeze, others, verify
        self.enforcer: GradientMask | None = None
        check_freeze_args(freeze, others)  # fail at construction, not at train time

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_unsupported(args, "GradientMaskCallback", fsdp2=True, model=model)
        refuse_step_in_backward(args, "GradientMaskCallback", optimizer)
        if self.enforcer is not None:
            self.enforcer.detach()
        self.enforcer = GradientMask(model, self.mask, self.freeze, self.others).attach(optimizer)

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
