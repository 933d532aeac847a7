"""``UnlearningEvalCallback``: UA / RA / TA / MIA (and the gap to Retrain) every N steps of a Trainer run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from hfhooks.callbacks._logging import add_to_logs
from hfhooks.evaluation import average_gap, unlearning_metrics

__all__ = ["UnlearningEvalCallback"]


class UnlearningEvalCallback(TrainerCallback):
    """Evaluate UA/RA/TA/MIA (and the gap to a Retrain reference) every ``every`` steps of a Trainer run.

    Metrics are logged through the Trainer (``unlearn/UA`` …, so every reporter sees them) and kept in
    ``history``. The best weights by ``unlearn/gap`` (if ``retrain`` is given, lower is better) or by
    ``select(metrics)`` (higher is better) are kept in CPU memory and, with ``restore_best=True``, loaded back at
    train end. Correct under DDP: all ranks evaluate shards and agree on the numbers.
    """

    def __init__(
        self,
        forget: Any,
        retain: Any,
        test: Any,
        every: int = 50,
        retrain: Mapping[str, float] | None = None,
        select: Callable[[dict[str, float]], float] | None = None,
        restore_best: bool = False,
        batch_size: int = 256,
        collate: Callable | None = None,
    ):
        if every < 1:
            raise ValueError(f"every={every} must be ≥ 1.")
        self.sets = (forget, retain, test)
        self.every, self.retrain, self.select = every, retrain, select
        self.restore_best, self.batch_size, self.collate = restore_best, batch_size, collate
        self.history: list[dict[str, float]] = []
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self._pending: dict[str, float] | None = None

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        metrics = unlearning_metrics(model, *self.sets, batch_size=self.batch_size, collate=self.collate)
        if self.retrain is not None:
            metrics["gap"] = average_gap(metrics, self.retrain)
        score = -metrics["gap"] if "gap" in metrics else (self.select(metrics) if self.select else None)
        if score is not None and (self.best is None or score > self.best[0]):
            self.best = (score, step, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        self.history.append({"step": step, **metrics})
        return metrics

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._pending = self.evaluate(model, state.global_step)
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is not None and logs is not None:
            add_to_logs(state, logs, {f"unlearn/{k}": round(v, 4) for k, v in self._pending.items()})
            self._pending = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.restore_best and self.best is not None and model is not None:
            model.load_state_dict(self.best[2])
