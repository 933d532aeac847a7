"""Priors: where attributions *should* go, one value per token (or input element) per example.

* :class:`ColumnPrior` — from a dataset column delivered as a tag (0/1 rationale masks or soft distributions);
* :class:`FunctionPrior` — from your function of the batch;
* :class:`ContrastivePrior` — class-aware (CAP's cheap stand-in): the attribution of the gold class's logit
  minus its strongest competitor's, from the model itself or a teacher, detached;
* :class:`HybridPrior` — mean or max of several normalised priors (CAP-Hybrid).

A prior is called with an :class:`AlignmentContext` and returns a tensor shaped like the attributions
(after word pooling, when used). ``tags`` lists the batch tags it needs (they reach it through
:class:`hfhooks.TaggedDataset`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hfhooks.attribution.distances import normalise
from hfhooks.attribution.methods import compute_attribution

__all__ = [
    "AlignmentContext",
    "ColumnPrior",
    "ContrastivePrior",
    "FunctionPrior",
    "HybridPrior",
    "Prior",
    "pool_words",
]


@dataclass
class AlignmentContext:
    """What a prior may look at for one micro-batch."""

    inputs: dict[str, Any]
    labels: torch.Tensor | None
    tags: dict[str, Any]
    outputs: Any
    site: torch.Tensor
    valid: torch.Tensor | None
    model: nn.Module
    word_ids: torch.Tensor | None = None


class Prior:
    """Base class: ``tags`` names the batch tags needed; ``__call__(ctx)`` returns the prior."""

    tags: tuple[str, ...] = ()

    def __call__(self, ctx: AlignmentContext) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ColumnPrior(Prior):
    """The prior stored in tag ``name`` (e.g. a 0/1 rationale mask per token, padded like ``input_ids``)."""

    def __init__(self, name: str = "rationale"):
        self.name = name
        self.tags = (name,)

    def __call__(self, ctx: AlignmentContext) -> torch.Tensor:
        if self.name not in ctx.tags:
            raise RuntimeError(
                f"The prior column {self.name!r} did not reach the model: wrap the dataset in "
                f"hfhooks.TaggedDataset(dataset, tags=[{self.name!r}]) and use data_collator=hfhooks.TaggedCollator()."
            )
        return torch.as_tensor(ctx.tags[self.name]).float()

    def __repr__(self) -> str:
        return f"ColumnPrior({self.name!r})"


class FunctionPrior(Prior):
    """``fn(ctx) -> prior``; ``tags`` lists any batch tags ``fn`` reads from ``ctx.tags``."""

    def __init__(self, fn: Callable[[AlignmentContext], torch.Tensor], tags: Sequence[str] = ()):
        self.fn, self.tags = fn, tuple(tags)

    def __call__(self, ctx: AlignmentContext) -> torch.Tensor:
        return self.fn(ctx).float()


class ContrastivePrior(Prior):
    """Class-aware prior: |attribution of (logit_gold − logit_strongest_competitor)|, detached.

    With ``teacher=None`` the model's own current attribution is used (computed without a graph); with a
    teacher model (same tokenizer), the teacher's. ``method`` is ``grad_x_input`` or ``input_gradient``.
    """

    def __init__(self, teacher: nn.Module | None = None, method: str = "grad_x_input"):
        self.teacher, self.method = teacher, method

    def __call__(self, ctx: AlignmentContext) -> torch.Tensor:
        if ctx.labels is None:
            raise ValueError("ContrastivePrior needs gold labels in the batch.")
        if self.teacher is None:
            logits, site = ctx.outputs["logits"], ctx.site
        else:
            from hfhooks.attribution.sites import AttributionSite

            tsite = AttributionSite(self.teacher)
            with torch.enable_grad(), tsite.capture(ctx.inputs) as cap:
                args = {k: v for k, v in cap.kwargs.items() if k not in ("labels", "num_items_in_batch")}
                logits = self.teacher(**args)["logits"]
                site = cap.tensor
        competitor = logits.detach().clone()
        competitor.scatter_(-1, ctx.labels[:, None].long(), float("-inf"))
        rival = competitor.argmax(-1)
        contrast = logits - logits.gather(-1, rival[:, None])  # per class: logit_c − logit_rival
        attr = compute_attribution(self.method, contrast, site, ctx.labels, create_graph=False)
        attr = attr.pow(2).sum(-1) if self.method == "input_gradient" else attr.sum(-1)
        if ctx.word_ids is not None:
            attr = pool_words(attr, ctx.word_ids)
        return attr.abs().detach()


class HybridPrior(Prior):
    """Mean or max of several priors, each normalised to a distribution over valid positions first."""

    def __init__(self, priors: Sequence[Prior], reduce: str = "mean"):
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce={reduce!r} must be 'mean' or 'max'.")
        if not priors:
            raise ValueError("HybridPrior needs at least one prior.")
        self.priors, self.reduce = list(priors), reduce
        self.tags = tuple(t for p in self.priors for t in p.tags)

    def __call__(self, ctx: AlignmentContext) -> torch.Tensor:
        parts = []
        for p in self.priors:
            x = p(ctx).to(ctx.site.device)
            parts.append(normalise(x, ctx.valid).reshape(x.shape))
        stacked = torch.stack(parts)
        return stacked.mean(0) if self.reduce == "mean" else stacked.amax(0)


def pool_words(attr: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
    """Sum token attributions ``[B, T]`` into words ``[B, W]`` by ``word_ids`` (``-1`` = no word, e.g. special
    tokens), W = max word id + 1. Differentiable."""
    word_ids = word_ids.to(attr.device).long()
    n_words = int(word_ids.max().clamp_min(-1)) + 1
    out = attr.new_zeros(attr.shape[0], max(n_words, 1))
    keep = word_ids >= 0
    return out.scatter_add(1, word_ids.clamp_min(0), attr * keep)
