"""``RestorationConfig``: the options of :class:`~hfhooks.LayerRestorationCallback`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from hfhooks.core.config import Config

__all__ = ["RestorationConfig"]

WHEN = ("save", "train_end")


@dataclass(kw_only=True)
class RestorationConfig(Config):
    """When and how :class:`~hfhooks.LayerRestorationCallback` restores layers (the reference and the layers
    themselves are the callback's arguments).

    >>> RestorationConfig(when=["train_end", "save"]).when
    ('save', 'train_end')
    """

    when: tuple[Literal["save", "train_end"], ...] = field(
        default=("train_end",),
        metadata={
            "help": "'train_end', 'save' or both: restore the live model at train end / each checkpoint"
        },
    )
    mode: Literal["inplace", "variant"] = field(
        default="inplace",
        metadata={
            "help": "'inplace': replace the weights (live model, checkpoint); 'variant': write a restored copy "
            "next to them"
        },
    )
    variant: str = field(
        default="restored", metadata={"help": "the variant directory's name (mode='variant')"}
    )
    embeddings: bool = field(default=False, metadata={"help": "restore the input embeddings too"})
    final_norm: bool = field(default=False, metadata={"help": "restore the final norm too"})
    lm_head: bool = field(default=False, metadata={"help": "restore the LM head too"})
    adapters: Literal["zero", "drop"] = field(
        default="zero", metadata={"help": "LoRA adapters on restored layers: 'zero' them or 'drop' them"}
    )
    resume_from: str | os.PathLike | bool | None = field(
        default=None,
        metadata={
            "help": "the checkpoint a resumed run checks its settings against (default: the one the Trainer "
            "resumes from); False skips the check",
            "record": False,
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        when = self.when
        if isinstance(when, str):
            when = (when,)
        elif isinstance(when, Iterable):
            when = tuple(when)
        else:
            when = ()
        if not when or not all(isinstance(w, str) and w in WHEN for w in when):
            raise ValueError(f"{owner}.when={self.when!r}: use 'train_end', 'save' or both.")
        self.when = tuple(sorted(set(when)))
        v = self.variant
        if not isinstance(v, str) or not v or "/" in v or os.sep in v or v.startswith(".") or v.strip() != v:
            raise ValueError(f"{owner}.variant={v!r} must be a plain directory name, e.g. 'restored'.")
        for name in ("embeddings", "final_norm", "lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r} must be True or False.")
