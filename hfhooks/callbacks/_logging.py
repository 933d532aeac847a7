"""Add metrics to a Trainer log event so they reach ``state.log_history`` and the printed logs."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["add_to_logs"]


def add_to_logs(state, logs: dict | None, values: Mapping[str, float]) -> None:
    """Merge ``values`` into ``logs`` (seen by callbacks after this one, e.g. the console printer) and into the
    entry ``Trainer.log`` already appended to ``state.log_history`` (it appends a copy before ``on_log``)."""
    if logs is None or not values:
        return
    logs.update(values)
    if state.log_history:
        state.log_history[-1].update(values)
