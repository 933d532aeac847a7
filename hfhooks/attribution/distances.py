"""Distances between attributions and priors, over valid positions (padding and special tokens excluded).

Distribution distances (``kl``, ``mse``, ``cosine``, ``bce``) first turn both sides into non-negative
distributions over the valid positions of each example (:func:`normalise`: absolute value, then L1). ``kl`` is
KL(prior ‖ attribution): attribution mass is pulled onto every position the prior supports. ``rrr`` is Right
for the Right Reasons: ``Σ A ⊙ attr`` where ``A`` marks *irrelevant* positions and ``attr`` holds squared
input gradients (method ``input_gradient``), so any attribution on annotated-irrelevant inputs is penalised.
All return the mean over examples.
"""

from __future__ import annotations

import torch

__all__ = ["DISTANCES", "distance", "normalise"]

DISTANCES = ("kl", "mse", "cosine", "bce", "rrr")
_EPS = 1e-8


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def normalise(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``|x|`` restricted to ``valid`` and L1-normalised per example (flattened over non-batch dims)."""
    x = x.float().abs()
    if valid is not None:
        x = x * valid.to(x.device).expand_as(x).to(x.dtype)
    x = _flat(x)
    return x / x.sum(-1, keepdim=True).clamp_min(_EPS)


def distance(
    name: str, attr: torch.Tensor, prior: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over examples of the distance ``name`` between attributions and priors of the same shape."""
    if name not in DISTANCES:
        raise ValueError(f"distance={name!r} is not one of {DISTANCES}.")
    prior = prior.to(attr.device, torch.float32)
    if prior.shape != attr.shape:
        try:
            prior = prior.expand_as(attr)
        except RuntimeError:
            raise ValueError(
                f"Prior shape {tuple(prior.shape)} does not match attribution shape {tuple(attr.shape)}: priors must "
                "have one value per token (after word pooling) or per input element, padded like the inputs."
            ) from None
    if valid is not None:
        valid = valid.to(attr.device).bool().expand_as(attr)
    if name == "rrr":
        mask = prior if valid is None else prior * valid
        return _flat(mask * attr.float()).sum(-1).mean()
    q = normalise(attr, valid)
    p = normalise(prior, valid)
    if name == "kl":
        return (p * (torch.log(p.clamp_min(_EPS)) - torch.log(q.clamp_min(_EPS)))).sum(-1).mean()
    if name == "mse":
        n = _flat(valid).sum(-1).clamp_min(1) if valid is not None else q.shape[-1]
        return ((q - p).pow(2).sum(-1) * n).mean()  # scale-free: per-position squared error × positions
    if name == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(q, p, dim=-1, eps=_EPS)).mean()
    # bce: attribution scaled to [0, 1] by its max, against a 0/1 (or soft) prior mask
    a = _flat(attr.float()).abs()
    a = a / a.amax(-1, keepdim=True).clamp_min(_EPS)
    target = _flat(prior).clamp(0, 1)
    per = torch.nn.functional.binary_cross_entropy(a.clamp(_EPS, 1 - _EPS), target, reduction="none")
    if valid is not None:
        v = _flat(valid).float()
        return ((per * v).sum(-1) / v.sum(-1).clamp_min(1)).mean()
    return per.mean(-1).mean()
