"""``RoutingConfig``: the options of :class:`~hfhooks.Router` and :class:`~hfhooks.GradientRoutingCallback`."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from hfhooks.core.config import Config

__all__ = ["RoutingConfig"]


def _ints(owner: str, name: str, value: object, *, low: int | None = None) -> tuple[int, ...]:
    """``value`` (an iterable of ints) as a tuple; ``ValueError`` naming the field otherwise."""
    try:
        out = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        out = None
    if out is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise ValueError(f"{owner}.{name}={value!r} must be an int or a sequence of ints.")
    if low is not None and any(v < low for v in out):
        raise ValueError(f"{owner}.{name}={value!r}: every index must be ≥ {low}.")
    return out


@dataclass(kw_only=True)
class RoutingConfig(Config):
    """How gradients are routed (see :mod:`hfhooks.routing.router`). :class:`~hfhooks.Router` uses ``level``,
    ``label_name``, ``forget_weights``, ``retain_weights``, ``shared_on_forget`` and ``strict``; the callback
    all of them.

    >>> RoutingConfig(level="activation", mlp_units=[0, 1]).mlp_units
    (0, 1)
    """

    level: Literal["param", "activation"] = field(
        default="param",
        metadata={
            "help": "'param' (SGTM, label-homogeneous micro-batches) or 'activation' (gradient routing)"
        },
    )
    label_name: str = field(default="routing", metadata={"help": "the tag / batch key holding the labels"})
    strict: bool = field(
        default=True,
        metadata={
            "help": "undo momentum / weight-decay drift of coordinates a step's mode must not change (exact "
            "routing); False asks for the leaky behaviour of a single optimizer"
        },
    )
    forget_weights: tuple[float, float] = field(
        default=(1.0, 0.0),
        metadata={"help": "activation level: (dedicated, shared) gradient weights of forget examples"},
    )
    retain_weights: tuple[float, float] = field(
        default=(0.0, 1.0),
        metadata={"help": "activation level: (dedicated, shared) gradient weights of retain examples"},
    )
    shared_on_forget: tuple[str, ...] = field(
        default=(),
        metadata={"help": "patterns of non-dedicated parameters that still learn from forget data"},
    )
    layers: tuple[int, ...] | slice | None = field(
        default=None,
        metadata={"help": "callback: layers of the default dedicated mask (indices or a slice; None = all)"},
    )
    mlp_units: int | tuple[int, ...] = field(
        default=64,
        metadata={"help": "callback: dedicated MLP units per layer (the last N, or these unit indices)"},
    )
    heads: int | tuple[int, ...] = field(
        default=1, metadata={"help": "callback: dedicated attention heads per layer (the last N, or these)"}
    )
    save_mask: str | os.PathLike | None = field(
        default=None,
        metadata={"help": "callback: also save the dedicated mask there (safetensors) when training starts"},
    )
    resume_from: str | os.PathLike | bool | None = field(
        default=None,
        metadata={
            "help": "callback: the checkpoint a resumed run restores the dedicated mask and counters from "
            "(default: the one the Trainer resumes from); False starts afresh",
            "record": False,
        },
    )

    # where an extra copy of the mask is written does not change what the checkpoint trained
    resume_may_differ = frozenset({"save_mask"})

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if not isinstance(self.strict, bool):
            raise ValueError(f"{owner}.strict={self.strict!r} must be True or False.")
        if not isinstance(self.label_name, str) or not self.label_name:
            raise ValueError(f"{owner}.label_name={self.label_name!r} must be a non-empty string.")
        for name in ("forget_weights", "retain_weights"):
            value = getattr(self, name)
            pair = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
            if len(pair) != 2 or not all(
                isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) for w in pair
            ):
                raise ValueError(f"{owner}.{name}={value!r} must be two finite numbers (dedicated, shared).")
            setattr(self, name, tuple(float(w) for w in pair))
        if isinstance(self.shared_on_forget, str) or not isinstance(self.shared_on_forget, Iterable):
            raise ValueError(
                f"{owner}.shared_on_forget={self.shared_on_forget!r} must be a list of name patterns, "
                "e.g. ['*embed_tokens*']."
            )
        self.shared_on_forget = tuple(self.shared_on_forget)
        if not all(isinstance(p, str) for p in self.shared_on_forget):
            raise ValueError(f"{owner}.shared_on_forget={self.shared_on_forget!r} must hold strings.")
        if self.layers is not None and not isinstance(self.layers, slice):
            self.layers = _ints(owner, "layers", self.layers)
        for name in ("mlp_units", "heads"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                if value < 0:
                    raise ValueError(f"{owner}.{name}={value!r} must be ≥ 0 (0 leaves that part out).")
            else:
                setattr(self, name, _ints(owner, name, value, low=0))
        if not self.mlp_units and not self.heads:
            raise ValueError(
                f"{owner}: mlp_units={self.mlp_units!r} and heads={self.heads!r} select no dedicated "
                "parameters; set one of them to a positive value."
            )
