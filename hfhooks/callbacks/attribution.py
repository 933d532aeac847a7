"""``AttributionAlignmentCallback``: add λ·D(attribution, prior) to the loss of any ``Trainer`` run."""

from __future__ import annotations

from transformers import TrainerCallback

from hfhooks.attribution.alignment import AttributionAlignment
from hfhooks.callbacks._guards import refuse_unsupported
from hfhooks.callbacks._logging import add_to_logs

__all__ = ["AttributionAlignmentCallback"]


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
    reentrant checkpointing breaks ``torch.autograd.grad``.
    """

    def __init__(
        self,
        method: str = "grad_x_input",
        prior="rationale",
        distance: str | None = None,
        weight: float = 1.0,
        **kwargs,
    ):
        self.options = dict(method=method, prior=prior, distance=distance, weight=weight, **kwargs)
        self.alignment: AttributionAlignment | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_unsupported(args, "AttributionAlignmentCallback", model=model)
        if getattr(args, "gradient_checkpointing", False):
            gc = getattr(args, "gradient_checkpointing_kwargs", None) or {}
            if gc.get("use_reentrant", True) is not False:
                raise RuntimeError(
                    "Attribution alignment needs torch.autograd.grad inside the forward, which reentrant gradient "
                    "checkpointing breaks. Pass TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': False})."
                )
        if self.alignment is not None:
            self.alignment.detach()
        self.alignment = AttributionAlignment(model, **self.options).attach()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.alignment is not None:
            self.alignment.step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.alignment is not None and logs is not None and "loss" in logs:
            add_to_logs(state, logs, {k: round(v, 6) for k, v in self.alignment.pop_stats().items()})

    def on_train_end(self, args, state, control, **kwargs):
        if self.alignment is not None:
            self.alignment.detach()
