"""Unlearning evaluation: UA / RA / TA / MIA-efficacy, the average gap to Retrain, and a relearning attack.

Definitions (SalUn, classification; compare every method against **Retrain** = trained without D_f):

* ``UA`` = 100 − accuracy on the forget set D_f; ``RA`` = accuracy on the retain set D_r; ``TA`` = test accuracy;
* ``MIA`` (efficacy): the feature is the softmax confidence of the true class; an ``SVC(C=3, rbf,
  gamma="auto")`` is trained on members = ``|test|`` examples of D_r vs non-members = the test set; MIA is the
  percentage of D_f predicted *non-member*;
* ``gap`` = mean |method − Retrain| over the four.

All numbers are percentages. Under ``torch.distributed`` every rank evaluates a strided shard and the counts and
MIA features are gathered, so every rank returns the same, complete result.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from hfhooks.core.data import TaggedCollator, to_device
from hfhooks.masks.saliency import model_state_preserved

__all__ = [
    "METRICS",
    "average_gap",
    "mia_efficacy",
    "rank_and_world",
    "relearn_attack",
    "true_class_confidence",
    "unlearning_metrics",
]

METRICS = ("UA", "RA", "TA", "MIA")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised ``torch.distributed`` group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def true_class_confidence(
    model: nn.Module, dataset: Any, batch_size: int = 256, collate: Callable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probability of the true class, correct?) for every example, in dataset order.

    Runs in eval mode (restored after); under ``torch.distributed`` each rank scores a strided shard and the
    results are gathered.
    """
    rank, world = rank_and_world()
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    collate = collate or TaggedCollator().base
    device = next(model.parameters()).device
    conf, correct = [], []
    with model_state_preserved(model):
        model.eval()
        for batch in torch.utils.data.DataLoader(shard, batch_size=batch_size, collate_fn=collate):
            batch = to_device(dict(batch), device)
            labels = batch.pop("labels")
            logits = model(**batch)["logits"].float()
            probs = logits.softmax(-1)
            conf.append(probs.gather(-1, labels[:, None]).squeeze(-1).cpu())
            correct.append((logits.argmax(-1) == labels).cpu())
    conf_t = torch.cat(conf) if conf else torch.empty(0)
    corr_t = torch.cat(correct) if correct else torch.empty(0, dtype=torch.bool)
    if world > 1:
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, (conf_t, corr_t))
        order = torch.cat([torch.arange(r, len(dataset), world) for r in range(world)])
        conf_t = torch.empty(len(dataset))
        corr_t = torch.empty(len(dataset), dtype=torch.bool)
        conf_t[order] = torch.cat([p[0] for p in parts])
        corr_t[order] = torch.cat([p[1] for p in parts])
    return conf_t, corr_t


def mia_efficacy(member: torch.Tensor, nonmember: torch.Tensor, target: torch.Tensor) -> float:
    """% of ``target`` confidences an SVC (trained on members vs non-members) predicts as non-members."""
    try:
        from sklearn.svm import SVC
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("MIA-efficacy needs scikit-learn: pip install 'hfhooks[benchmarks]'.") from e
    for name, t in (("member", member), ("non-member", nonmember), ("target", target)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"MIA-efficacy got non-finite {name} confidences: the model produces NaN/inf logits (it diverged; "
                "lower the learning rate or check the objective)."
            )
    x = torch.cat([member, nonmember]).double().numpy()[:, None]
    y = [1] * len(member) + [0] * len(nonmember)
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    pred = clf.predict(target.double().numpy()[:, None])
    return float(100.0 * (pred == 0).mean())


def unlearning_metrics(
    model: nn.Module,
    forget: Any,
    retain: Any,
    test: Any,
    batch_size: int = 256,
    collate: Callable | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """``{"UA", "RA", "TA", "MIA"}`` in percent (see the module docstring). ``seed`` picks the ``|test|``
    retain examples used as MIA members."""
    f_conf, f_ok = true_class_confidence(model, forget, batch_size, collate)
    r_conf, r_ok = true_class_confidence(model, retain, batch_size, collate)
    t_conf, t_ok = true_class_confidence(model, test, batch_size, collate)
    g = torch.Generator().manual_seed(seed)
    members = r_conf[torch.randperm(len(r_conf), generator=g)[: len(t_conf)]]
    return {
        "UA": 100.0 - 100.0 * float(f_ok.float().mean()),
        "RA": 100.0 * float(r_ok.float().mean()),
        "TA": 100.0 * float(t_ok.float().mean()),
        "MIA": mia_efficacy(members, t_conf, f_conf),
    }


def average_gap(
    method: Mapping[str, float], retrain: Mapping[str, float], keys: tuple[str, ...] = METRICS
) -> float:
    """Mean absolute difference to the Retrain reference over ``keys``."""
    missing = [k for k in keys if k not in method or k not in retrain]
    if missing:
        raise KeyError(f"average_gap: metrics {missing} missing; both dicts need {list(keys)}.")
    return sum(abs(method[k] - retrain[k]) for k in keys) / len(keys)


def relearn_attack(
    model: nn.Module,
    forget: Any,
    evaluate: Callable[[nn.Module], float],
    threshold: float,
    steps: int = 200,
    eval_every: int = 5,
    lr: float = 1e-3,
    batch_size: int = 32,
    collate: Callable | None = None,
    higher_is_recovered: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tune a *copy* of ``model`` on ``forget`` and report how many steps it takes to recover.

    ``evaluate(model) -> float`` measures the forget capability (e.g. forget accuracy, or minus forget loss);
    recovery is ``evaluate ≥ threshold`` (``≤`` if ``higher_is_recovered`` is False). Adam at ``lr``, batches
    cycled with a seeded shuffle. Returns ``{"steps_to_recover": int | None, "curve": [(step, value), ...]}``;
    ``None`` means not recovered within ``steps``. The original model is untouched.
    """
    attacked = copy.deepcopy(model)
    attacked.train()
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        forget, batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate or TaggedCollator().base
    )
    opt = torch.optim.Adam([p for p in attacked.parameters() if p.requires_grad], lr=lr)
    device = next(attacked.parameters()).device

    def recovered(v: float) -> bool:
        return v >= threshold if higher_is_recovered else v <= threshold

    value = evaluate(attacked)
    curve = [(0, value)]
    if recovered(value):
        return {"steps_to_recover": 0, "curve": curve}
    batches = itertools.cycle(loader)
    for step in range(1, steps + 1):
        attacked.train()
        loss = attacked(**to_device(next(batches), device))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            value = evaluate(attacked)
            curve.append((step, value))
            if recovered(value):
                return {"steps_to_recover": step, "curve": curve}
    return {"steps_to_recover": None, "curve": curve}
