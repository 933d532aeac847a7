"""``GradientRoutingCallback``: SGTM / gradient routing inside any ``transformers.Trainer`` run."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from hfhooks.core.hooks import FiniteMonitor
from hfhooks.freeze.deepspeed import require_zero
from hfhooks.masks.mask import ParamMask
from hfhooks.routing.ablation import DEDICATED_SEMANTICS, check_dedicated, dedicated_mask
from hfhooks.routing.config import RoutingConfig
from hfhooks.routing.router import Router
from hfhooks.trainer.guards import (
    refuse_lossless_outputs,
    refuse_step_in_backward,
    refuse_unsupported,
    uses_deepspeed,
)
from hfhooks.trainer.reporting import add_to_logs, report_before_integrations
from hfhooks.trainer.state import ResumeFrom, check_same_mask, load_mask, load_state, save_mask, save_state

__all__ = ["GradientRoutingCallback"]

_OWNER = "GradientRoutingCallback"


class GradientRoutingCallback(TrainerCallback):
    """Route gradients by per-example routing labels during ``Trainer.train()`` (see :mod:`hfhooks.routing.router`).

    Labels travel with the data: wrap the training set in :class:`~hfhooks.TaggedDataset` (its ``routing`` tag
    holds 1 = forget, 0 = retain, -1 = unlabelled) and pass :class:`~hfhooks.TaggedCollator` as the
    ``data_collator``. For parameter-level routing (default) build label-homogeneous micro-batches with
    ``TaggedDataset(..., group_by="routing", batch_size=B)`` and ``per_device_train_batch_size=1``.

    Args:
        dedicated: a mask of dedicated coordinates, or a path to one; default: :func:`dedicated_mask` with the
            config's ``layers``, ``mlp_units`` and ``heads``.
        config: a :class:`~hfhooks.RoutingConfig` — ``level`` (``"param"``: SGTM, or ``"activation"``: gradient
            routing, mixed batches), ``label_name``, ``strict`` (default ``True``: undo momentum / weight-decay
            drift of coordinates a step's mode must not change, so routing is exact; ``False`` asks for the
            leaky behaviour of a single optimizer), the :class:`~hfhooks.Router` weights, the default dedicated
            slices (``layers``, ``mlp_units``, ``heads``), ``save_mask`` (also save the dedicated mask there when
            training starts) and ``resume_from`` (the checkpoint a resumed run restores the dedicated mask and
            batch counters from; ``False`` starts them afresh). Its fields may also be given as keywords.

    The dedicated mask and batch counters are saved with every checkpoint, with the config; a resumed run with
    another config (but ``save_mask``) or another dedicated mask raises.

    Example::

        train = TaggedDataset(ds, tags=["routing"], group_by="routing", batch_size=8)
        trainer = Trainer(model=model, args=TrainingArguments(..., per_device_train_batch_size=1),
                          train_dataset=train, data_collator=TaggedCollator(homogeneous="routing"),
                          callbacks=[GradientRoutingCallback(mlp_units=64, heads=1)])
    """

    reports_metrics = True  # moved ahead of the report_to integrations (see hfhooks/trainer/reporting.py)

    def __init__(
        self,
        dedicated: ParamMask | str | os.PathLike | None = None,
        *,
        config: RoutingConfig | None = None,
        **options: Any,
    ):
        self.config = RoutingConfig.resolve(config, options, _OWNER)
        if dedicated is not None and not isinstance(dedicated, ParamMask):
            dedicated = ParamMask.load(dedicated)
        if dedicated is not None:
            check_dedicated(dedicated, _OWNER)
        self.dedicated = dedicated
        c = self.config
        self.layers, self.mlp_units, self.heads = c.layers, c.mlp_units, c.heads
        self.level, self.label_name, self.strict = c.level, c.label_name, c.strict
        self.save_mask = c.save_mask
        self.router: Router | None = None
        self._finite: FiniteMonitor | None = None
        self.resume_from: ResumeFrom = c.resume_from
        self._given_mask = dedicated is not None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # FSDP2: gradients routed on FSDP2's full parameters, strict steps held on the local shards.
        # DeepSpeed ZeRO-1/2/3: gradient hooks see each micro-batch's full gradient, and strict routing holds
        # the fp32 masters around the step of the torch optimizer DeepSpeed wraps (see hfhooks.routing.router)
        refuse_unsupported(args, _OWNER, model=model, deepspeed=True, fsdp2=True)
        zero = require_zero(model, _OWNER) if uses_deepspeed(args) else None
        refuse_lossless_outputs(args, "GradientRoutingCallback", model, per_example=True)
        if (
            self.strict or self.level == "param"
        ):  # step hooks / gradient hooks that must run before the update
            refuse_step_in_backward(args, "GradientRoutingCallback", optimizer)
        report_before_integrations(args)  # so that routing/* and align/* reach TensorBoard, wandb…
        saved = load_mask(args, state, _OWNER, self.resume_from, config=self.config)
        counts: dict[str, int] = {}
        if saved is not None:  # resumed: the dedicated mask and counters the checkpoint was trained with
            if self._given_mask:
                check_same_mask(self.dedicated, saved, _OWNER, "dedicated mask")
            self.dedicated = saved
            counts = load_state(args, state, _OWNER, self.resume_from, config=self.config)[1].get(
                "counts", {}
            )
        if self.dedicated is None:
            self.dedicated = dedicated_mask(model, self.layers, self.mlp_units, self.heads)
            self.dedicated.metadata["config"] = self.config.to_dict()  # ours: it records what built it
        if self.save_mask is not None and state.is_world_process_zero:
            # saved as what it is: 1 = dedicated (ablated later), never read back as a "1=trainable" mask
            self.dedicated.metadata.setdefault("semantics", DEDICATED_SEMANTICS)
            self.dedicated.save(self.save_mask, model=model, config=self.config.to_dict())
        if self.router is not None:
            self.router.detach()
        self.router = Router(model, self.dedicated, config=self.config)
        self.router.counts.update(counts)
        self.router.attach(optimizer)
        # a NaN/inf loss turns every trainable weight non-finite and the Trainer's console shows loss 0.0: warn
        # (not under ZeRO-3, whose parameters are empty placeholders between forwards: nothing there to check)
        self._finite = FiniteMonitor.for_model(model, _OWNER, state.global_step) if zero != 3 else None

    def on_step_end(self, args, state, control, **kwargs):
        if self._finite is not None:
            self._finite.check()
        if self.router is not None:
            # the window's gradients are gone, stepped or not: a step skipped by fp16's GradScaler (inf/NaN)
            # must not carry its modes into the next window's strict step
            self.router.end_window()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # DeepSpeed stepped inside backward: the snapshot it held for that step is no longer needed
        if self.router is not None:
            self.router.end_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Before the first step changes anything (the router's optimizer pre-hook checks too, for loops
        # whose optimizer the Trainer does not step itself).
        if self.router is not None and self.router.attached and self.router.steps == 0:
            self.router.check_labels_arrived()

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.dedicated is None:
            return
        save_mask(args, state, _OWNER, self.dedicated, model=model, config=self.config)
        counts = dict(self.router.counts) if self.router is not None else {}
        save_state(args, state, _OWNER, meta={"counts": counts}, config=self.config)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.router is not None and logs is not None and "loss" in logs:
            add_to_logs(
                state,
                logs,
                {f"routing/{m}_batches": self.router.counts[m] for m in ("forget", "retain", "unlabelled")},
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self._finite is not None:
            self._finite.flush()
            self._finite = None
        if self.router is not None:
            self.router.detach()
