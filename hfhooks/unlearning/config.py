"""``SalUnConfig``, ``UnlearningEvalConfig`` and ``LMUnlearningEvalConfig``: the options of the unlearning callbacks
and evaluations."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from hfhooks.core.config import Config, check_range
from hfhooks.unlearning.evaluation import METRICS

__all__ = ["LMUnlearningEvalConfig", "SalUnConfig", "UnlearningEvalConfig"]


def _check_int(owner: str, name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}.{name}={value!r} must be an integer ≥ {low}.")


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name}={value!r} must be True or False.")


@dataclass(kw_only=True)
class SalUnConfig(Config):
    """Options of :class:`~hfhooks.SaliencyUnlearningCallback` (SalUn: saliency mask + forgetting objective).

    >>> SalUnConfig(objective="npo", ratio=0.3).ratio
    0.3
    """

    objective: Literal["random_labels", "ga", "graddiff", "npo"] = field(
        default="random_labels",
        metadata={"help": "the forgetting objective (an UnlearningObjective given to the callback sets it)"},
    )
    ratio: float = field(
        default=0.5, metadata={"help": "fraction of weights that may change (SalUn's r), in (0, 1]"}
    )
    retain_weight: float = field(default=1.0, metadata={"help": "α, the weight of the retain term (≥ 0)"})
    batch_size: int = field(
        default=32, metadata={"help": "batch size of the saliency and NPO reference passes"}
    )
    freeze: Literal["hard", "grad", "groups"] = field(
        default="hard", metadata={"help": "how the mask is enforced (see GradientMaskConfig.freeze)"}
    )
    save_mask: str | os.PathLike | None = field(
        default=None, metadata={"help": "also save the mask there (safetensors) once computed"}
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars for the scoring passes"})
    resume_from: str | os.PathLike | bool | None = field(
        default=None,
        metadata={
            "help": "the checkpoint a resumed run reads the mask and NPO reference from (default: the one the "
            "Trainer resumes from); False recomputes both at the resumed weights",
            "record": False,
        },
    )

    # they only shape the passes at a fresh start (a resumed run restores the mask and reference) or the display
    resume_may_differ = frozenset({"batch_size", "save_mask", "progress"})

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float):
            raise ValueError(f"{owner}.ratio={self.ratio!r} must be a number in (0, 1].")
        check_range(owner, "ratio", self.ratio, 0, 1, low_open=True)
        if isinstance(self.retain_weight, bool) or not isinstance(self.retain_weight, int | float):
            raise ValueError(f"{owner}.retain_weight={self.retain_weight!r} must be a number ≥ 0.")
        check_range(owner, "retain_weight", self.retain_weight, 0, math.inf)
        _check_int(owner, "batch_size", self.batch_size, 1)
        _check_bool(owner, "progress", self.progress)


@dataclass(kw_only=True)
class UnlearningEvalConfig(Config):
    """Options of :class:`~hfhooks.UnlearningEvalCallback` (UA / RA / TA / MIA every ``every`` steps).

    >>> UnlearningEvalConfig(every=20).every
    20
    """

    every: int = field(default=50, metadata={"help": "evaluate every N optimizer steps (≥ 1)"})
    retrain: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": f"the Retrain reference's metrics ({', '.join(METRICS)}): adds unlearn/gap, lower is better"
        },
    )
    restore_best: bool = field(
        default=False, metadata={"help": "load the best weights (by gap, or by select) back at train end"}
    )
    batch_size: int = field(default=256, metadata={"help": "evaluation batch size"})
    at_trainer_eval: bool = field(
        default=True, metadata={"help": "add eval_unlearn/* metrics to every Trainer evaluation too"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        _check_int(owner, "every", self.every, 1)
        _check_int(owner, "batch_size", self.batch_size, 1)
        _check_bool(owner, "restore_best", self.restore_best)
        _check_bool(owner, "at_trainer_eval", self.at_trainer_eval)
        if self.retrain is not None:
            if not isinstance(self.retrain, Mapping):
                raise ValueError(f"{owner}.retrain={self.retrain!r} must map {list(METRICS)} to numbers.")
            missing = [k for k in METRICS if k not in self.retrain]
            bad = {
                k: v
                for k, v in self.retrain.items()
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            }
            if missing or bad:
                raise ValueError(
                    f"{owner}.retrain={dict(self.retrain)!r}: needs a finite number for each of {list(METRICS)} "
                    f"(missing {missing}, not finite numbers {sorted(bad)})."
                )
            self.retrain = dict(self.retrain)


@dataclass(kw_only=True)
class LMUnlearningEvalConfig(Config):
    """Options of the LM unlearning evaluation (:func:`~hfhooks.lm_unlearning_metrics`) and of
    :class:`~hfhooks.LMUnlearningEvalCallback`.

    >>> LMUnlearningEvalConfig(select="forget_quality").greater_is_better
    True
    """

    every: int = field(default=50, metadata={"help": "evaluate every N optimizer steps (≥ 1; the callback)"})
    batch_size: int = field(default=8, metadata={"help": "evaluation batch size (forward and generation)"})
    max_new_tokens: int = field(
        default=32, metadata={"help": "greedy generation length for the ROUGE metrics"}
    )
    chat_template: bool = field(
        default=False, metadata={"help": "wrap each question in the tokenizer's chat template (user turn)"}
    )
    generate: bool = field(
        default=True,
        metadata={"help": "generate greedy answers for forget_rouge / retain_rouge (slowest part)"},
    )
    rouge: Literal["recall", "f1"] = field(
        default="recall", metadata={"help": "ROUGE-L of the QA answers: recall (TOFU) or f1"}
    )
    verbatim_rouge: Literal["recall", "f1"] = field(
        default="f1", metadata={"help": "ROUGE-L of MUSE's verbatim memorisation (verbmem)"}
    )
    mia_k: float = field(default=0.4, metadata={"help": "fraction k of Min-K% / Min-K%++, in (0, 1]"})
    select: str | None = field(
        default=None,
        metadata={
            "help": "metric choosing the best step (e.g. forget_quality, model_utility); None: no selection"
        },
    )
    greater_is_better: bool = field(
        default=True, metadata={"help": "whether a higher `select` metric is better"}
    )
    restore_best: bool = field(
        default=False, metadata={"help": "load the best weights (by `select`) back at train end"}
    )
    at_trainer_eval: bool = field(
        default=True, metadata={"help": "add eval_lm_unlearn/* metrics to every Trainer evaluation too"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        for name in ("every", "batch_size", "max_new_tokens"):
            _check_int(owner, name, getattr(self, name), 1)
        for name in ("chat_template", "generate", "greater_is_better", "restore_best", "at_trainer_eval"):
            _check_bool(owner, name, getattr(self, name))
        if isinstance(self.mia_k, bool) or not isinstance(self.mia_k, int | float):
            raise ValueError(f"{owner}.mia_k={self.mia_k!r} must be a number in (0, 1].")
        check_range(owner, "mia_k", self.mia_k, 0, 1, low_open=True)
        if self.select is not None and not isinstance(self.select, str):
            raise ValueError(
                f"{owner}.select={self.select!r} must be a metric name such as 'forget_quality'."
            )
        if self.restore_best and self.select is None:
            raise ValueError(f"{owner}: restore_best=True needs select=<metric> to know which step is best.")
