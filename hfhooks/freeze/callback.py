"""``GradientMaskCallback``: only masked-in coordinates train, in any ``transformers.Trainer`` run."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from hfhooks.freeze.config import GradientMaskConfig
from hfhooks.freeze.deepspeed import require_zero
from hfhooks.freeze.gradient_mask import GradientMask
from hfhooks.masks.mask import ParamMask
from hfhooks.trainer.guards import refuse_step_in_backward, refuse_unsupported, uses_deepspeed
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
        config: a :class:`~hfhooks.GradientMaskConfig` (``freeze``, ``others``, ``verify``, ``check_finite``,
            ``resume_from``); its fields may also be given as keywords, which replace the config's.

    The mask is saved with every checkpoint (``<checkpoint>/hfhooks/``, with the config that trained it); a
    resumed run raises if its mask or config differs from the one the checkpoint was trained with (except
    ``verify`` / ``check_finite``), or if the checkpoint holds none.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[GradientMaskCallback("salun_mask.safetensors", freeze="hard")])
        trainer.train()
    """

    def __init__(
        self,
        mask: ParamMask | str | os.PathLike,
        *,
        config: GradientMaskConfig | None = None,
        **options: Any,
    ):
        self.config = GradientMaskConfig.resolve(config, options, "GradientMaskCallback")
        self.mask = mask if isinstance(mask, ParamMask) else ParamMask.load(mask)
        self.freeze, self.others, self.verify = self.config.freeze, self.config.others, self.config.verify
        self.resume_from: ResumeFrom = self.config.resume_from
        self.enforcer: GradientMask | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_unsupported(args, "GradientMaskCallback", fsdp2=True, model=model, deepspeed=True)
        if uses_deepspeed(args):
            require_zero(model, "GradientMaskCallback")
        refuse_step_in_backward(args, "GradientMaskCallback", optimizer)
        saved = load_mask(args, state, "GradientMaskCallback", self.resume_from, config=self.config)
        if saved is not None:
            check_same_mask(self.mask, saved, "GradientMaskCallback")
        if self.enforcer is not None:
            self.enforcer.detach()
        self.enforcer = GradientMask(model, self.mask, config=self.config).attach(optimizer)
        if self.enforcer.finite is not None:  # name the Trainer's step in the non-finite warning
            self.enforcer.finite.step_offset = state.global_step

    def on_optimizer_step(self, args, state, control, **kwargs):
        # DeepSpeed stepped inside backward (accelerate's backward ends each accumulation window with
        # engine.step()); the Trainer's optimizer.step() is a no-op there, so the write-back runs now.
        if self.enforcer is not None and self.enforcer.zero_stage:
            self.enforcer.after_step()

    def on_save(self, args, state, control, model=None, **kwargs):
        save_mask(args, state, "GradientMaskCallback", self.mask, model=model, config=self.config)

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
