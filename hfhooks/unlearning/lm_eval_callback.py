"""``LMUnlearningEvalCallback``: TOFU / MUSE / MIA metrics of a causal LM every N steps of a Trainer run."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from hfhooks.unlearning.config import LMUnlearningEvalConfig
from hfhooks.unlearning.eval_callback import UnlearningEvalCallback
from hfhooks.unlearning.lm_evaluation import lm_unlearning_metrics

__all__ = ["LMUnlearningEvalCallback"]


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
        forget, retain, holdout, verbatim: the evaluation sets (see :func:`~hfhooks.lm_unlearning_metrics`).
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
        reference: Mapping[str, Any] | None = None,
        config: LMUnlearningEvalConfig | None = None,
        **options: Any,
    ):
        self.config = LMUnlearningEvalConfig.resolve(config, options, type(self).__name__)
        c = self.config
        if not forget:
            raise ValueError(f"{type(self).__name__}: the forget set is empty.")
        self.tokenizer, self.forget, self.retain = tokenizer, forget, retain
        self.holdout, self.verbatim, self.reference = holdout, verbatim, reference
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
