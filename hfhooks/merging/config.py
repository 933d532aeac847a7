"""``MergeConfig``: what :func:`hfhooks.merging.merge` computes (the method and its parameters).

>>> MergeConfig(method="ties", density=0.2).normalized
True
>>> MergeConfig(method="task_arithmetic", density=0.5)
Traceback (most recent call last):
    ...
ValueError: MergeConfig.density=0.5: method='task_arithmetic' does not prune, so density would be ignored; drop it or use method='ties', 'dare_linear', 'dare_ties' or 'magnitude_prune'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from hfhooks.core.config import Config

__all__ = ["CONSENSUS_METHODS", "DARE_METHODS", "METHODS", "PRUNING_METHODS", "MergeConfig"]

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "tall", "consensus")
PRUNING_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
DARE_METHODS = ("dare_linear", "dare_ties")
SIGN_METHODS = ("ties", "dare_ties")  # elect a sign per coordinate, then a disjoint (weighted) mean
CONSENSUS_METHODS = ("tall", "consensus")


def _per_model(
    owner: str, name: str, value: float | Sequence[float] | None
) -> tuple[float, ...] | float | None:
    """A float, or one float per tuned model (checked against the number of models in :meth:`per_model`)."""
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            raise ValueError(f"{owner}.{name}={value!r}: use a number or one number per model.")
        return None
    if isinstance(value, int | float):
        values: tuple[float, ...] = (float(value),)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        # float("0.5") would parse a recipe's quoted string: every value must already be a number
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{owner}.{name}={value!r}: use a number or one number per model.")
        values = tuple(float(v) for v in value)
        if not values:
            raise ValueError(f"{owner}.{name}=[]: give a number, or one number per tuned model.")
    else:
        raise ValueError(f"{owner}.{name}={value!r}: use a number or one number per model.")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{owner}.{name}={value!r}: every value must be finite.")
    return values[0] if isinstance(value, int | float) else values


@dataclass(kw_only=True)
class MergeConfig(Config):
    """A merge of tuned models into a base: ``θ = θ_base + λ · combine(prune(θ_t − θ_base), weights)``.

    Per-model values (``weights``, ``density``, ``tall_lambda``) are one number for all models or one per tuned
    model, in the order the models are given. The definitions, and where they follow the papers, peft or
    mergekit, are in ``docs/merging.md``.
    """

    method: Literal[
        "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "tall", "consensus"
    ] = field(default="task_arithmetic", metadata={"help": "the merge method"})
    weights: float | tuple[float, ...] = field(
        default=1.0, metadata={"help": "weight w_t of each task vector (one, or one per tuned model)"}
    )
    density: float | tuple[float, ...] | None = field(
        default=None,
        metadata={
            "help": "fraction of each task vector's coordinates kept (ties, magnitude_prune: the largest |τ|; "
            "dare_*: a seeded random draw); default 1.0 (keep all)"
        },
    )
    lambda_: float = field(default=1.0, metadata={"help": "λ: the merged task vector is scaled by it"})
    normalize: bool | None = field(
        default=None,
        metadata={
            "help": "divide by the sum of the weights (of the models agreeing with the elected sign, for ties "
            "and dare_ties); default: True for ties / dare_ties (the paper's disjoint mean), else False"
        },
    )
    rescale: Literal["inverse", "l1", "none"] = field(
        default="inverse",
        metadata={
            "help": "DARE's rescaling of the kept coordinates: 'inverse' (÷ density: the paper, peft), 'l1' "
            "(match the L1 norm: mergekit), 'none'"
        },
    )
    majority_sign: Literal["sum", "count"] = field(
        default="sum",
        metadata={
            "help": "sign election: sign of the sum of the task vectors ('sum', the paper) or of the count"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of DARE's random draws (per model and tensor name)"})
    tall_lambda: float | tuple[float, ...] = field(
        default=0.4, metadata={"help": "TALL masks' λ_t: keep |τ_t| > λ_t·|τ_MTL − τ_t| (tall, consensus)"}
    )
    k: int = field(default=2, metadata={"help": "consensus: keep coordinates at least k TALL masks keep"})
    task: int | None = field(
        default=None, metadata={"help": "tall: which tuned model (0-based) to reconstruct from τ_MTL"}
    )
    names: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "merge only these tensors (names, globs, re:REGEX); the others are the base's"},
    )
    layers: str | None = field(
        default=None,
        metadata={"help": "merge only these decoder layers ('4:8', '0,3'); the others are the base's"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        self.weights = _per_model(owner, "weights", self.weights)
        self.density = _per_model(owner, "density", self.density)
        self.tall_lambda = _per_model(owner, "tall_lambda", self.tall_lambda)
        if self.weights is None or self.tall_lambda is None:
            raise ValueError(f"{owner}: weights and tall_lambda need a value (a number or one per model).")
        self._check_method_options(owner)
        if isinstance(self.lambda_, bool) or not isinstance(self.lambda_, int | float):
            raise ValueError(f"{owner}.lambda_={self.lambda_!r} must be a number (λ scales the merge).")
        if not math.isfinite(self.lambda_):
            raise ValueError(f"{owner}.lambda_={self.lambda_!r} must be finite.")
        self.lambda_ = float(self.lambda_)
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(
                f"{owner}.normalize={self.normalize!r} must be True, False or None (the default)."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{owner}.seed={self.seed!r} must be an integer.")
        if isinstance(self.names, str):
            self.names = (self.names,)
        elif self.names is not None:
            if not isinstance(self.names, Sequence):
                raise ValueError(
                    f"{owner}.names={self.names!r}: give tensor names, globs or re:REGEX strings."
                )
            self.names = tuple(self.names)
            if not self.names or not all(isinstance(n, str) and n for n in self.names):
                raise ValueError(
                    f"{owner}.names={self.names!r}: give tensor names, globs or re:REGEX strings."
                )
        if self.layers is not None and not isinstance(self.layers, str):
            self.layers = (
                ",".join(str(i) for i in self.layers) if isinstance(self.layers, Sequence) else self.layers
            )
            if not isinstance(self.layers, str):
                raise ValueError(f"{owner}.layers={self.layers!r}: use a range '4:8' or a list '0,3'.")

    def _check_method_options(self, owner: str) -> None:
        """Options a method would ignore are errors, not no-ops."""
        m = self.method
        dens = self.density if isinstance(self.density, tuple) else (self.density,)
        if self.density is not None:
            if m not in PRUNING_METHODS:
                raise ValueError(
                    f"{owner}.density={self.density!r}: method={m!r} does not prune, so density would be "
                    "ignored; drop it or use method='ties', 'dare_linear', 'dare_ties' or 'magnitude_prune'."
                )
            bad = [d for d in dens if not 0.0 < d <= 1.0]
            if bad:
                raise ValueError(f"{owner}.density={self.density!r}: each density must be in (0, 1].")
        if self.rescale != "inverse" and m not in DARE_METHODS:
            raise ValueError(f"{owner}.rescale={self.rescale!r} only applies to dare_linear / dare_ties.")
        if self.majority_sign != "sum" and m not in SIGN_METHODS:
            raise ValueError(
                f"{owner}.majority_sign={self.majority_sign!r} only applies to ties / dare_ties."
            )
        if self.normalize is not None and m in CONSENSUS_METHODS:
            raise ValueError(
                f"{owner}.normalize: method={m!r} sums the task vectors; it has no normalisation."
            )
        tl = self.tall_lambda if isinstance(self.tall_lambda, tuple) else (self.tall_lambda,)
        if any(x < 0 for x in tl):
            raise ValueError(f"{owner}.tall_lambda={self.tall_lambda!r}: λ_t must be ≥ 0.")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"{owner}.k={self.k!r}: use an integer ≥ 0.")
        if m != "consensus" and self.k != 2:
            raise ValueError(f"{owner}.k={self.k!r} only applies to method='consensus'.")
        if m == "tall":
            if isinstance(self.task, bool) or not isinstance(self.task, int):
                raise ValueError(
                    f"{owner}.task={self.task!r}: method='tall' needs task=<index of the tuned model>."
                )
        elif self.task is not None:
            raise ValueError(f"{owner}.task={self.task!r} only applies to method='tall'.")
        if m not in CONSENSUS_METHODS and self.tall_lambda != 0.4:
            raise ValueError(f"{owner}.tall_lambda only applies to method='tall' or 'consensus'.")

    def check_models(self, n: int) -> None:
        """Check the per-model values against ``n`` tuned models, before anything is read: one value for all or
        one per model, ``task`` in range, and weights that can act (a merge whose weights are all 0 is the base;
        ``normalize`` by weights summing to 0 would divide by 0 — mergekit then silently divides by 1)."""
        owner = type(self).__name__
        for key in ("weights", "density", "tall_lambda"):
            self.per_model(key, n)
        if self.method == "tall" and not 0 <= self.task < n:
            raise ValueError(f"{owner}.task={self.task} but {n} tuned model(s) were given (0…{n - 1}).")
        weights = self.per_model("weights", n)
        if all(w == 0 for w in weights):
            raise ValueError(
                f"{owner}.weights={self.weights!r}: every weight is 0, so the merge would be the base itself; "
                "give at least one model a non-zero weight."
            )
        if self.normalized and self.method not in SIGN_METHODS and abs(math.fsum(weights)) < 1e-8:
            raise ValueError(
                f"{owner}.weights={self.weights!r} sum to 0, so normalize=True cannot divide by their sum; use "
                "normalize=False (and lambda_ for the overall scale)."
            )

    def per_model(self, name: str, n: int) -> list[float]:
        """``weights``, ``density`` (default 1.0) or ``tall_lambda`` for ``n`` tuned models."""
        value = getattr(self, name)
        if value is None:
            value = 1.0
        if isinstance(value, tuple):
            if len(value) != n:
                raise ValueError(
                    f"{type(self).__name__}.{name} has {len(value)} values for {n} tuned models: give one number, "
                    f"or exactly one per model."
                )
            return list(value)
        return [float(value)] * n

    @property
    def normalized(self) -> bool:
        """Whether the merged task vector is divided by the (agreeing) weights' sum (see ``normalize``)."""
        if self.normalize is not None:
            return self.normalize
        return self.method in SIGN_METHODS
