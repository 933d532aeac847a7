"""``UnlearningEvalCallback``: UA / RA / TA / MIA (and the gap to Retrain) every N steps of a Trainer run;
``LMUnlearningEvalCallback``: the same for causal LMs with the TOFU / MUSE / MIA metrics."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from hfhooks.trainer.reporting import add_to_logs, evaluation_prefixes, report_before_integrations
from hfhooks.unlearning.config import LMUnlearningEvalConfig, UnlearningEvalConfig
from hfhooks.unlearning.evaluation import average_gap, unlearning_metrics
from hfhooks.unlearning.lm_evaluation import lm_unlearning_metrics

__all__ = ["LMUnlearningEvalCallback", "UnlearningEvalCallback"]


class UnlearningEvalCallback(TrainerCallback):
    """Evaluate UA/RA/TA/MIA (and the gap to a Retrain reference) every ``every`` steps of a Trainer run.

    Metrics are logged through the Trainer (``unlearn/UA`` …, so every reporter sees them) and kept in
    ``history``. The best weights by ``unlearn/gap`` (if ``retrain`` is given, lower is better) or by
    ``select(metrics)`` (higher is better) are kept in CPU memory and, with ``restore_best=True``, loaded back at
    train end. Correct under DDP: all ranks evaluate shards and agree on the numbers.

    Every Trainer evaluation (``eval_strategy``, ``trainer.evaluate()``) adds ``eval_unlearn/UA`` … too (with
    the evaluation's prefix; reused when this callback already evaluated at that step), so they are reported
    and can select the best checkpoint: ``metric_for_best_model="unlearn/gap", greater_is_better=False``. Pass
    ``at_trainer_eval=False`` to evaluate on the ``every`` schedule only.

    Args:
        forget, retain, test: the evaluation sets.
        select: ``metrics -> score`` (higher is better) picking the best weights when no ``retrain`` is given.
        collate: collator for the evaluation sets.
        config: an :class:`~hfhooks.UnlearningEvalConfig` (``every``, ``retrain``, ``restore_best``,
            ``batch_size``, ``at_trainer_eval``); its fields may also be given as keywords.
    """

    reports_metrics = True  # moved ahead of the report_to integrations (see hfhooks/trainer/reporting.py)
    metric_prefix = "unlearn"  # logs ``unlearn/<metric>`` and ``<eval prefix>_unlearn/<metric>``

    def __init__(
        self,
        forget: Any,
        retain: Any,
        test: Any,
        *,
        select: Callable[[dict[str, float]], float] | None = None,
        collate: Callable | None = None,
        config: UnlearningEvalConfig | None = None,
        **options: Any,
    ):
        self.config = UnlearningEvalConfig.resolve(config, options, "UnlearningEvalCallback")
        c = self.config
        self.sets = (forget, retain, test)
        self.every, self.retrain, self.select = c.every, c.retrain, select
        self.restore_best, self.batch_size, self.collate = c.restore_best, c.batch_size, collate
        self.history: list[dict[str, float]] = []
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self._pending: dict[str, float] | None = None
        self.at_trainer_eval = c.at_trainer_eval

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        metrics = unlearning_metrics(model, *self.sets, batch_size=self.batch_size, collate=self.collate)
        if self.retrain is not None:
            metrics["gap"] = average_gap(metrics, self.retrain)
        score = -metrics["gap"] if "gap" in metrics else (self.select(metrics) if self.select else None)
        if score is not None and (self.best is None or score > self.best[0]):
            self.best = (score, step, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        self.history.append({"step": step, **metrics})
        return metrics

    def _metrics_at(self, model: nn.Module, step: int) -> dict[str, float]:
        """The metrics at ``step``: evaluated once per step, whoever asks first."""
        if self.history and self.history[-1]["step"] == step:
            return {k: v for k, v in self.history[-1].items() if k != "step"}
        return self.evaluate(model, step)

    def on_init_end(self, args, state, control, **kwargs):
        report_before_integrations(args)  # for trainer.evaluate() without train()

    def on_train_begin(self, args, state, control, **kwargs):
        report_before_integrations(args)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._pending = self.evaluate(model, state.global_step)
            control.should_log = True

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None:
            return
        prefixes = evaluation_prefixes(logs)
        if (
            prefixes
        ):  # a Trainer evaluation: `logs` is the metrics dict evaluate() returns for best-model selection
            self._add_eval_metrics(state, logs, prefixes, model)
        elif self._pending is not None:
            add_to_logs(
                state, logs, {f"{self.metric_prefix}/{k}": round(v, 4) for k, v in self._pending.items()}
            )
            self._pending = None

    def _add_eval_metrics(self, state, logs: dict, prefixes: list[str], model) -> None:
        if not self.at_trainer_eval or model is None:
            return
        metrics = self._metrics_at(model, state.global_step)
        add_to_logs(
            state, logs, {f"{p}_{self.metric_prefix}/{k}": v for p in prefixes for k, v in metrics.items()}
        )

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        # on_log normally added them already; a Trainer subclass whose evaluate() does not log still gets them
        if metrics is not None and not any(f"_{self.metric_prefix}/" in k for k in metrics):
            self._add_eval_metrics(state, metrics, evaluation_prefixes(metrics) or ["eval"], model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.restore_best and self.best is not None and model is not None:
            model.load_state_dict(self.best[2])


class LMUnlearningEvalCallback(UnlearningEvalCallback):
    """Evaluate :func:`~hfhooks.lm_unlearning_metrics` every ``every`` steps (and at every Trainer evaluation).

    Metrics are logged through the Trainer as ``lm_unlearn/<metric>`` (and ``eval_lm_unlearn/<metric>`` in a
    Trainer evaluation, so ``metric_for_best_model="lm_unlearn/forget_quality"`` can select checkpoints), so
    every ``report_to`` integration sees them; each evaluation is kept in ``history``. With ``select`` set (e.g.
    ``"forget_quality"``), the best step by that metric is ``best_step`` and its weights are kept in CPU memory
    (loaded back at train end with ``restore_best=True``). Correct under DDP: every rank evaluates a shard and
    all ranks get the same numbers.

    Args:
        tokenizer: the model's tokenizer.
        forget, retain, holdout, verbatim, utility: the evaluation sets (see
            :func:`~hfhooks.lm_unlearning_metrics`).
        reference: the retain model's statistics (:func:`~hfhooks.lm_reference`) for forget quality and
            PrivLeak.
        config: an :class:`~hfhooks.LMUnlearningEvalConfig`; its fields may also be given as keywords.
    """

    metric_prefix = "lm_unlearn"

    def __init__(
        self,
        tokenizer: Any,
        forget: Sequence[Mapping[str, Any]],
        retain: Sequence[Mapping[str, Any]] | None = None,
        *,
        holdout: Sequence[Mapping[str, Any]] | None = None,
        verbatim: Sequence[Mapping[str, Any]] | None = None,
        utility: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        reference: Mapping[str, Any] | None = None,
        config: LMUnlearningEvalConfig | None = None,
        **options: Any,
    ):
        self.config = LMUnlearningEvalConfig.resolve(config, options, type(self).__name__)
        c = self.config
        if not forget:
            raise ValueError(f"{type(self).__name__}: the forget set is empty.")
        self.tokenizer, self.forget, self.retain = tokenizer, forget, retain
        self.holdout, self.verbatim, self.utility, self.reference = holdout, verbatim, utility, reference
        self.every, self.restore_best, self.at_trainer_eval = c.every, c.restore_best, c.at_trainer_eval
        self.history: list[dict[str, float]] = []
        self.best = None
        self._pending: dict[str, float] | None = None

    @property
    def best_step(self) -> int | None:
        """The step of the best evaluation by ``config.select`` (``None`` before any, or without ``select``)."""
        return None if self.best is None else self.best[1]

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Compute the metrics at ``step``, record them in ``history`` and update the best step."""
        metrics = lm_unlearning_metrics(
            model,
            self.tokenizer,
            self.forget,
            self.retain,
            holdout=self.holdout,
            verbatim=self.verbatim,
            utility=self.utility,
            reference=self.reference,
            config=self.config,
        )
        name = self.config.select
        if name is not None:
            if name not in metrics:
                raise ValueError(
                    f"{type(self).__name__}: select={name!r} is not among the computed metrics {sorted(metrics)} "
                    "(forget_quality needs reference=lm_reference(...); model_utility needs a retain set)."
                )
            value = metrics[name]
            score = value if self.config.greater_is_better else -value
            if math.isfinite(score) and (self.best is None or score > self.best[0]):
                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                self.best = (score, step, state)
        self.history.append({"step": step, **metrics})
        return metrics
