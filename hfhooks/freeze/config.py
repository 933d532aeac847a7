"""``GradientMaskConfig``: the options of :class:`~hfhooks.GradientMask` and :class:`~hfhooks.GradientMaskCallback`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from hfhooks.core.config import Config

__all__ = ["GradientMaskConfig"]


@dataclass(kw_only=True)
class GradientMaskConfig(Config):
    """How a :class:`~hfhooks.ParamMask` is enforced (see :mod:`hfhooks.freeze.gradient_mask`).

    >>> GradientMaskConfig(freeze="grad").to_dict()
    {'freeze': 'grad', 'others': 'freeze', 'verify': True, 'check_finite': True}
    """

    freeze: Literal["hard", "grad", "groups"] = field(
        default="hard",
        metadata={
            "help": "'hard': masked-out coordinates are restored after every step and their optimizer state "
            "zeroed (bit-identical); 'groups': also drop fully frozen parameters from the optimizer; 'grad': "
            "mask gradients only (weight decay and momentum may still move them)"
        },
    )
    others: Literal["freeze", "train"] = field(
        default="freeze",
        metadata={
            "help": "parameters the mask does not name: 'freeze' (do not train) or 'train' (left alone)"
        },
    )
    verify: bool = field(
        default=True,
        metadata={
            "help": "callback: check at train end that frozen coordinates are bit-identical (hard/groups)"
        },
    )
    check_finite: bool = field(
        default=True, metadata={"help": "warn once if trainable weights turn NaN / inf"}
    )
    resume_from: str | os.PathLike | bool | None = field(
        default=None,
        metadata={
            "help": "callback: the checkpoint whose saved mask a resumed run is checked against (default: the "
            "one the Trainer resumes from); False skips the check",
            "record": False,
        },
    )

    # only the end-of-run check and a warning: a resumed run may switch them
    resume_may_differ = frozenset({"verify", "check_finite"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("verify", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GradientMaskConfig.{name}={getattr(self, name)!r} must be True or False.")
