"""Callback metrics in the Trainer's logs: the console, ``state.log_history`` and the ``report_to`` integrations.

``Trainer.log(logs)`` calls every callback's ``on_log`` with the same ``logs`` dict, in the order of
``trainer.callback_handler.callbacks``: ``DefaultFlowCallback``, then the ``report_to`` integrations
(TensorBoard, wandb, MLflow…), then the callbacks the user passed, then the console printer. A metric a user
callback adds to ``logs`` is therefore printed but never reaches TensorBoard or wandb, which have already
written that step. :func:`report_before_integrations` moves hfhooks' metric-logging callbacks ahead of the
integrations once training starts, so that what they add to ``logs`` is reported like the loss.

For evaluations, ``Trainer.evaluate`` calls ``self.log(metrics)`` with the metrics dict itself, then
``on_evaluate``, then returns that dict, which selects the best checkpoint (``metric_for_best_model``): an
hfhooks callback that adds ``eval_…`` metrics in ``on_log`` makes them reportable *and* selectable.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["add_to_logs", "callback_handler", "evaluation_prefixes", "report_before_integrations"]


def add_to_logs(state, logs: dict | None, values: Mapping[str, float]) -> None:
    """Merge ``values`` into ``logs`` (seen by callbacks after this one: the console printer and, once
    :func:`report_before_integrations` has run, the ``report_to`` integrations) and into the entry
    ``Trainer.log`` already appended to ``state.log_history`` (it appends a copy before ``on_log``)."""
    if logs is None or not values:
        return
    logs.update(values)
    if state.log_history:
        state.log_history[-1].update(values)


def evaluation_prefixes(logs: Mapping[str, Any]) -> list[str]:
    """The metric prefixes (``eval``, ``eval_<dataset>``…) of an evaluation's ``logs``; empty for other logs.

    ``Trainer.evaluate`` always reports ``<prefix>_runtime`` (its speed metrics); the end-of-training log's
    ``train_runtime`` is not an evaluation.
    """
    return [k[: -len("_runtime")] for k in logs if k.endswith("_runtime") and k != "train_runtime"]


def callback_handler() -> Any:
    """The ``transformers.trainer_callback.CallbackHandler`` dispatching the event being handled, or ``None``.

    There is no public route from a callback to its Trainer: ``CallbackHandler.call_event`` passes the model,
    tokenizer, optimizer, scheduler and dataloaders, never the Trainer or the handler itself. So this looks for
    the handler as ``self`` of the ``call_event`` frame on the call stack (the same in transformers 4.46 to 5.x).
    Call it only from inside a callback event.
    """
    from transformers.trainer_callback import CallbackHandler

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold their locals: do not keep the stack alive


def report_before_integrations(args: Any) -> bool:
    """Move hfhooks callbacks that log metrics ahead of the ``report_to`` integrations of the running Trainer.

    Their relative order, and every other callback's, is kept. Call from a callback event (``on_train_begin``).
    The handler's list is replaced, not mutated, so the event being dispatched goes on over the old one. Returns
    False, with a warning, if the handler cannot be found (metrics then reach the console and
    ``state.log_history`` only).
    """
    from transformers.integrations import get_reporting_integration_callbacks

    # transformers 4.x iterates report_to without a None check (TrainingArguments turns None into a list)
    reporters = tuple(get_reporting_integration_callbacks(getattr(args, "report_to", None) or []))
    if not reporters:
        return True
    handler = callback_handler()
    if handler is None:
        warnings.warn(
            "hfhooks could not find the Trainer's CallbackHandler, so its metrics (routing/*, align/*, unlearn/*) "
            "reach the console and trainer.state.log_history but not the report_to integrations.",
            stacklevel=3,
        )
        return False
    callbacks = list(handler.callbacks)
    first = next((i for i, cb in enumerate(callbacks) if isinstance(cb, reporters)), None)
    if first is None:
        return True
    ours = [cb for cb in callbacks[first:] if getattr(cb, "reports_metrics", False)]
    if ours:
        rest = [cb for cb in callbacks[first:] if not any(cb is o for o in ours)]
        handler.callbacks = callbacks[:first] + ours + rest
    return True
