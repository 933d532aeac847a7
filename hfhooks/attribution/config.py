"""``AlignmentConfig``: the options of :class:`~hfhooks.AttributionAlignment` and its callback."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from hfhooks.attribution.methods import IG_STEPS
from hfhooks.core.config import Config, check_range

__all__ = ["AlignmentConfig"]


@dataclass(kw_only=True)
class AlignmentConfig(Config):
    """How attributions are aligned with a prior (see :class:`~hfhooks.AttributionAlignment` for each option).

    ``prior`` and ``special_token_ids`` may hold objects (a :class:`~hfhooks.attribution.Prior`, a tokenizer):
    a tokenizer is replaced by its ``all_special_ids``; a prior object is recorded by its type name only
    (``{"object": "HybridPrior"}``), so a saved config that holds one is rebuilt by passing the prior again.

    >>> AlignmentConfig(method="input_gradient", distance="rrr", weight=0.5).to_dict()["distance"]
    'rrr'
    >>> AlignmentConfig(fraction=0)
    Traceback (most recent call last):
        ...
    ValueError: AlignmentConfig.fraction=0 must be in (0, 1].
    """

    method: Literal[
        "attention", "grad_x_input_first_order", "input_gradient", "grad_x_input", "integrated_gradients"
    ] = field(default="grad_x_input", metadata={"help": "the attribution method"})
    prior: Any = field(
        default="rationale", metadata={"help": "the prior: a tag name (a ColumnPrior) or a Prior object"}
    )
    distance: Literal["kl", "mse", "cosine", "bce", "rrr"] | None = field(
        default=None, metadata={"help": "D(attribution, prior); None: 'rrr' for input_gradient, else 'kl'"}
    )
    weight: float = field(default=1.0, metadata={"help": "λ, the weight of the alignment term (≥ 0)"})
    every: int = field(default=1, metadata={"help": "add the term on every N-th step only"})
    fraction: float = field(
        default=1.0, metadata={"help": "fraction of each batch's examples that enter the term, in (0, 1]"}
    )
    target: Literal["label", "pred"] = field(
        default="label", metadata={"help": "attribute the gold label's score or the predicted class's"}
    )
    score: Literal["logit", "logprob"] | None = field(
        default=None,
        metadata={"help": "the attributed score; None: 'logprob' for grad_x_input_first_order, else 'logit'"},
    )
    steps: int = field(default=IG_STEPS, metadata={"help": "integrated-gradients steps (≥ 1)"})
    input_key: str | None = field(
        default=None, metadata={"help": "attribute to this input tensor instead of the embeddings"}
    )
    special_token_ids: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "token ids excluded from normalisation besides padding (or the tokenizer)"},
    )
    word_ids: str | None = field(
        default=None, metadata={"help": "tag holding each token's word index, to pool sub-words into words"}
    )
    check_gradient: bool = field(
        default=True, metadata={"help": "verify on the first term that it changes the parameters' gradients"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the fraction sampling"})
    reuse_backward: Literal[True, False, "auto"] = field(
        default="auto",
        metadata={
            "help": "first order with score='logprob', target='label': take ∂s/∂e from the training backward"
        },
    )
    resume_from: str | os.PathLike | bool | None = field(
        default=None,
        metadata={
            "help": "callback: the checkpoint a resumed run restores its state from (default: the one the "
            "Trainer resumes from); False starts afresh",
            "record": False,
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        for name in ("every", "steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                raise ValueError(
                    f"{owner}.{name}={value!r} must be an integer ≥ {0 if name == 'seed' else 1}."
                )
        for name in ("weight", "fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{owner}.{name}={value!r} must be a finite number.")
        check_range(owner, "weight", self.weight, 0, math.inf)
        check_range(owner, "fraction", self.fraction, 0, 1, low_open=True)
        if not isinstance(self.check_gradient, bool):
            raise ValueError(f"{owner}.check_gradient={self.check_gradient!r} must be True or False.")
        if not isinstance(self.reuse_backward, bool | str):  # 1 == True passes the Literal check
            raise ValueError(f"{owner}.reuse_backward={self.reuse_backward!r} must be True, False or 'auto'.")
        for name in ("input_key", "word_ids"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{owner}.{name}={value!r} must be a tag / input name or None.")
        if isinstance(self.prior, str) and not self.prior:
            raise ValueError(f"{owner}.prior='' must name the tag holding the prior (e.g. 'rationale').")
        if self.prior is None or isinstance(self.prior, int | float | bool):
            raise ValueError(f"{owner}.prior={self.prior!r} must be a tag name or a Prior object.")
        ids = self.special_token_ids
        if hasattr(ids, "all_special_ids"):  # a tokenizer: its [CLS], [SEP], <s>, ... ids
            ids = ids.all_special_ids
        if ids is not None:
            try:
                ids = tuple(int(i) for i in ids)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{owner}.special_token_ids={self.special_token_ids!r} must be token ids or a tokenizer."
                ) from None
            self.special_token_ids = ids
        score = self.score or ("logprob" if self.method == "grad_x_input_first_order" else "logit")
        eligible = self.method == "grad_x_input_first_order" and score == "logprob" and self.target == "label"
        if self.reuse_backward is True and not eligible:
            raise ValueError(
                f"{owner}.reuse_backward=True needs method='grad_x_input_first_order', score='logprob', "
                f"target='label' (got method={self.method!r}, score={score!r}, target={self.target!r}): only then "
                "is the attributed score's gradient a multiple of the training loss's."
            )
