"""Faithfulness of token attributions: comprehensiveness, sufficiency (ERASER AOPC) and deletion / insertion.

For each example, tokens are ranked by attribution (valid positions only: padding and special tokens stay).

* **comprehensiveness** at k %: ``p(y|x) − p(y|x without its top-k % tokens)`` — high when the top tokens matter;
* **sufficiency** at k %: ``p(y|x) − p(y|only its top-k % tokens)`` — low when the top tokens suffice;
* AOPC averages over ``k ∈ {1, 5, 10, 20, 50}`` (ERASER);
* **deletion** / **insertion** curves: ``p(y|·)`` as tokens are removed (inserted) in attribution order; report
  the area under each (lower deletion AUC and higher insertion AUC are better).

Removing a token replaces it with ``replace_id`` (default: the tokenizer's mask / pad id from the config) and
keeps the attention mask, so sequence length and positions do not change. Always report these next to
shortcut-shifted accuracy: a model trained toward a prior can game attribution metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["AOPC_KS", "deletion_insertion", "faithfulness"]

AOPC_KS = (0.01, 0.05, 0.10, 0.20, 0.50)


@torch.no_grad()
def _prob(model: nn.Module, ids: torch.Tensor, batch: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    args = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    logits = model(input_ids=ids, **args)["logits"].float()
    return logits.softmax(-1).gather(-1, labels[:, None]).squeeze(-1)


def _order(attr: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Indices of valid positions by descending attribution; invalid positions last."""
    scores = attr.float().masked_fill(~valid, float("-inf"))
    return torch.argsort(scores, dim=-1, descending=True, stable=True)


def _apply(
    ids: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    replace_id: int,
    keep_top: bool,
    valid: torch.Tensor,
) -> torch.Tensor:
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    top = rank < counts[:, None]
    drop = (~top & valid) if keep_top else (top & valid)
    return ids.masked_fill(drop, replace_id)


def _valid(batch: dict[str, Any], special_ids: Sequence[int]) -> torch.Tensor:
    ids = batch["input_ids"]
    valid = (
        batch["attention_mask"].bool()
        if "attention_mask" in batch
        else torch.ones_like(ids, dtype=torch.bool)
    )
    if special_ids:
        valid &= ~torch.isin(ids, torch.tensor(list(special_ids), device=ids.device))
    return valid


def faithfulness(
    model: nn.Module,
    batch: dict[str, Any],
    attributions: torch.Tensor,
    replace_id: int,
    special_ids: Sequence[int] = (),
    ks: Sequence[float] = AOPC_KS,
) -> dict[str, float]:
    """``{"comprehensiveness", "sufficiency"}`` (AOPC over ``ks``) and per-k values, averaged over examples."""
    labels = batch["labels"]
    ids = batch["input_ids"]
    valid = _valid(batch, special_ids)
    order = _order(attributions, valid)
    n_valid = valid.sum(-1)
    full = _prob(model, ids, batch, labels)
    out: dict[str, float] = {}
    comp, suff = [], []
    for k in ks:
        counts = (n_valid.float() * k).ceil().long().clamp_min(1)
        c = (full - _prob(model, _apply(ids, order, counts, replace_id, False, valid), batch, labels)).mean()
        s = (full - _prob(model, _apply(ids, order, counts, replace_id, True, valid), batch, labels)).mean()
        out[f"comprehensiveness@{int(k * 100)}"] = float(c)
        out[f"sufficiency@{int(k * 100)}"] = float(s)
        comp.append(float(c))
        suff.append(float(s))
    out["comprehensiveness"] = sum(comp) / len(comp)
    out["sufficiency"] = sum(suff) / len(suff)
    return out


def deletion_insertion(
    model: nn.Module,
    batch: dict[str, Any],
    attributions: torch.Tensor,
    replace_id: int,
    special_ids: Sequence[int] = (),
    points: int = 11,
) -> dict[str, Any]:
    """Deletion and insertion curves (``points`` fractions from 0 to 1) and their areas (trapezoid rule)."""
    labels, ids = batch["labels"], batch["input_ids"]
    valid = _valid(batch, special_ids)
    order = _order(attributions, valid)
    n_valid = valid.sum(-1)
    fracs = torch.linspace(0, 1, points)
    deletion, insertion = [], []
    for f in fracs:
        counts = (n_valid.float() * f).round().long()
        deletion.append(
            float(_prob(model, _apply(ids, order, counts, replace_id, False, valid), batch, labels).mean())
        )
        insertion.append(
            float(_prob(model, _apply(ids, order, counts, replace_id, True, valid), batch, labels).mean())
        )
    auc = lambda ys: float(torch.trapezoid(torch.tensor(ys), fracs))  # noqa: E731
    return {"fractions": fracs.tolist(), "deletion": deletion, "insertion": insertion,
            "deletion_auc": auc(deletion), "insertion_auc": auc(insertion)}  # fmt: skip
