"""Forgetting objectives and the SalUn recipe (weight-saliency mask + forgetting objective, hard-frozen).

Each training example carries an ``unlearn`` tag: ``1`` = forget set, ``0`` = retain set. The objective is a
mean over the micro-batch of per-example terms, each example weighted by its number of label tokens
(classification: one label per example; language models: token labels, ``-100`` ignored, shifted by one for
causal LMs) — the Trainer's ``num_items_in_batch`` convention, so accumulation equals one big batch:

================ ============================================== =======================================
objective        forget example                                  retain example (× ``retain_weight`` α)
================ ============================================== =======================================
``random_labels`` CE(x, y′) with a random y′ ≠ y (SalUn's RL)     CE(x, y)
``ga``           −NLL(x, y)  (gradient ascent)                    NLL(x, y)  (α = 0 gives pure GA)
``graddiff``     −NLL(x, y)                                       NLL(x, y)
``npo``          (2/β)·softplus(β·(log πθ(y|x) − log π_ref(y|x)))  NLL(x, y)
================ ============================================== =======================================

For language models NLL is the mean token NLL of the example and log π(y|x) the sum of its token
log-probabilities. NPO's reference log-probabilities are computed once, before training, at the original
weights (:func:`reference_logprobs`) and looked up by an ``example_id`` tag — no second model in memory: the
reference costs 4 bytes per forget example, so NPO's peak memory is GradDiff's (same forward, same loss terms).
On a PeftModel the reference is the adapted model at θ₀ (a fresh adapter: the base model), computed the same way.

SalUn (:func:`salun`): score weights by ``|Σ ∇θ L_f|`` on the forget set at θ₀ in eval mode, keep the top
``ratio`` globally, train with the objective while :class:`~hfhooks.GradientMask` keeps every other coordinate
bit-identical (the reference code's gradient-only masking let weight decay and momentum move them).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hfhooks.core.data import TaggedCollator, TaggedDataset, to_device
from hfhooks.core.loss_hooks import LossHook, is_causal_lm
from hfhooks.freeze.gradient_mask import GradientMask
from hfhooks.masks.mask import ParamMask
from hfhooks.masks.saliency import compute_saliency, model_state_preserved

__all__ = [
    "OBJECTIVES",
    "UnlearningObjective",
    "forget_retain_dataset",
    "objective_hook",
    "reference_logprobs",
    "salun",
    "sequence_logprobs",
]

OBJECTIVES = ("random_labels", "ga", "graddiff", "npo")
FORGET_TAG, ID_TAG = "unlearn", "example_id"


def forget_retain_dataset(forget: Any, retain: Any, forget_repeats: int = 1) -> TaggedDataset:
    """One dataset of forget examples (tag ``unlearn=1``) and retain examples (``0``), each with an
    ``example_id`` (forget examples first, ``0 … len(forget)-1``). ``forget_repeats`` up-samples the forget set."""
    if len(forget) == 0:
        raise ValueError("The forget set is empty: there is nothing to unlearn.")
    examples = [forget[i] for _ in range(forget_repeats) for i in range(len(forget))]
    ids = [i for _ in range(forget_repeats) for i in range(len(forget))]
    examples += [retain[i] for i in range(len(retain))]
    ids += list(range(len(forget), len(forget) + len(retain)))
    flags = [1] * (len(examples) - len(retain)) + [0] * len(retain)
    return TaggedDataset(_ListDataset(examples), tags={FORGET_TAG: flags, ID_TAG: ids})


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _token_terms(
    logits: torch.Tensor, labels: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (sum of token log-probs of the labels, number of label tokens)."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels.ne(-100)
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    dims = tuple(range(1, tok.dim()))
    return tok.sum(dims), valid.sum(dims)


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log π(y|x), number of label tokens)`` per example, for class labels ``[B]`` or token labels ``[B, T]``."""
    if labels.dim() == 1 and logits.dim() == 2:  # classification
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return logp, torch.ones_like(logp)
    return _token_terms(logits, labels, causal)


@dataclass
class UnlearningObjective:
    """A forgetting objective (see the module docstring) as a loss over one micro-batch.

    Args:
        name: one of :data:`OBJECTIVES`.
        retain_weight: α, the weight of the retain term (0 disables it).
        beta: NPO's inverse temperature β (default 0.1, as in the NPO paper).
        num_classes: for ``random_labels`` (taken from the logits if omitted).
        seed: seed of the random-label generator.
    """

    name: str = "random_labels"
    retain_weight: float = field(default=1.0, metadata={"help": "α: weight of the retain term"})
    beta: float = field(default=0.1, metadata={"help": "NPO inverse temperature β"})
    num_classes: int | None = None
    seed: int = 0
    reference: torch.Tensor | None = field(default=None, repr=False)  # NPO: ref log-probs by example_id

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective {self.name!r} is not one of {OBJECTIVES}.")
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight={self.retain_weight} must be ≥ 0.")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0.")
        self._generator = torch.Generator().manual_seed(self.seed)

    def get_rng_state(self) -> torch.Tensor:
        """State of the random-label generator (saved with checkpoints, so a resumed run draws the same labels)."""
        return self._generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore a state from :meth:`get_rng_state`."""
        self._generator.set_state(state)

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        forget: torch.Tensor,
        example_id: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Token-weighted mean over the micro-batch of per-example terms; ``forget`` is 0/1 per example."""
        if labels is None:
            raise ValueError("Unlearning objectives need labels in the batch.")
        classification = labels.dim() == 1 and logits.dim() == 2
        if self.name == "random_labels" and not classification:
            raise ValueError(
                "random_labels needs a classification model (logits [B, C], labels [B]); use ga, graddiff or npo for LMs."
            )
        logp, n_tok = sequence_logprobs(logits, labels, causal)
        forget_term = None
        if self.name == "random_labels":
            c = self.num_classes or logits.shape[-1]
            shift = torch.randint(1, c, labels.shape, generator=self._generator).to(labels.device)
            wrong = (labels + shift) % c
            forget_term = F.cross_entropy(logits.float(), wrong, reduction="none")
        return self._combine(logp, n_tok, forget, example_id, forget_term)

    def from_logprobs(
        self,
        logp: torch.Tensor,
        n_tok: torch.Tensor,
        forget: torch.Tensor,
        example_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The objective from per-example summed label log-probabilities ``logp`` over ``n_tok`` label tokens.

        For forwards that return log-probabilities instead of logits (TRL's fused LM head); ``ga``, ``graddiff``
        and ``npo`` only (``random_labels`` needs the logits).
        """
        if self.name == "random_labels":
            raise ValueError(
                "random_labels needs classification logits; this forward returns only label log-probabilities "
                "(e.g. TRL's fused LM head). Use objective='ga', 'graddiff' or 'npo'."
            )
        return self._combine(logp, n_tok, forget, example_id, None)

    def check_reference(self, forget_size: int, what: str = "NPO") -> None:
        """Raise unless :attr:`reference` holds one log-probability per forget example (``forget_size``): a
        reference of another length was computed for another forget set, and its values would be looked up
        for the wrong examples."""
        if self.name == "npo" and self.reference is not None and len(self.reference) != forget_size:
            raise ValueError(
                f"{what}: the NPO reference holds {len(self.reference)} log-probabilities but the forget set has "
                f"{forget_size} examples: it was computed for another forget set (stale). Compute it for this one "
                "with reference_logprobs(model, forget), or set objective.reference = None to have it computed."
            )

    def _reference_for(self, example_id: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
        """``log π_ref`` per example of the micro-batch (retain examples: any value, their term is not used).

        A forget example whose id has no reference entry is an error, not a clamped look-up: it means the
        reference belongs to another (shorter) forget set. Retain ids (``len(forget)`` and up) are clamped only
        so that the gather stays in range; ``torch.where`` discards their value.
        """
        ref = self.reference.to(example_id.device)
        ids = example_id.long()
        outside = (ids < 0) | (ids >= len(ref))
        if bool((outside & forget).any()):  # one host sync per micro-batch
            bad = ids[outside & forget].tolist()
            raise ValueError(
                f"NPO: forget examples with example_id {bad[:5]} have no reference log-probability (the reference "
                f"holds {len(ref)}, ids 0 … {len(ref) - 1}): the reference is stale, computed for another forget "
                "set. Recompute it with reference_logprobs(model, forget) on the forget set the training data "
                "was built from (forget_retain_dataset(forget, retain))."
            )
        return ref[ids.clamp(0, max(len(ref) - 1, 0))]

    def _combine(
        self,
        logp: torch.Tensor,
        n_tok: torch.Tensor,
        forget: torch.Tensor,
        example_id: torch.Tensor | None,
        forget_term: torch.Tensor | None,
    ) -> torch.Tensor:
        forget = forget.to(logp.device).bool()
        nll = -logp / n_tok.clamp_min(1)  # mean token NLL (or CE for classification)
        retain_term = self.retain_weight * nll
        if self.name in ("ga", "graddiff"):
            forget_term = -nll
            if self.name == "ga" and self.retain_weight == 0:
                retain_term = torch.zeros_like(nll)
        elif self.name == "npo":
            if self.reference is None or example_id is None:
                raise ValueError(
                    "NPO needs reference log-probabilities (reference_logprobs) and an example_id tag."
                )
            ref = self._reference_for(example_id.to(logp.device), forget)
            forget_term = (2.0 / self.beta) * F.softplus(self.beta * (logp - ref))
        per_example = torch.where(forget, forget_term, retain_term)
        # Token-weighted mean: example i counts n_i times (its label tokens; 1 for classification), matching
        # the Trainer's num_items_in_batch so gradient accumulation equals one big batch.
        weight = n_tok.to(per_example.dtype)
        return (per_example * weight).sum() / weight.sum().clamp_min(1)


@torch.no_grad()
def reference_logprobs(
    model: nn.Module,
    forget: Any,
    collate: Callable | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """``log π_ref(y|x)`` of every forget example at the current weights (eval mode), in dataset order."""
    causal = is_causal_lm(model)
    collate = collate or TaggedCollator().base
    device = next(model.parameters()).device
    out = []
    with model_state_preserved(model):
        model.eval()
        loader = torch.utils.data.DataLoader(forget, batch_size=batch_size, collate_fn=collate)
        for batch in tqdm(loader, desc="NPO reference", disable=not progress, leave=False):
            batch = to_device(dict(batch), device)
            labels = batch.pop("labels")
            logits = model(**batch)["logits"]
            # One example at a time: the fp32 log-softmax is then [T, V], not [B, T, V] (a batch of 32 × 512
            # tokens × a 128k vocabulary would be 8 GB), and per-row results equal the batched ones.
            for i in range(logits.shape[0]):
                out.append(sequence_logprobs(logits[i : i + 1], labels[i : i + 1], causal)[0].cpu())
    return torch.cat(out)


def objective_hook(model: nn.Module, objective: UnlearningObjective) -> LossHook:
    """A :class:`LossHook` that replaces the model's loss with ``objective`` (tags ``unlearn``, ``example_id``)."""
    causal = is_causal_lm(model)

    def fn(outputs: Any, labels: torch.Tensor, tags: Mapping[str, Any]) -> torch.Tensor:
        if labels is None and FORGET_TAG in tags:
            # The Trainer pops `labels` before forward when it computes the loss itself from the logits; that loss
            # then replaces whatever the model returns, so the objective could not act even with the labels.
            raise RuntimeError(
                "The unlearning objective's loss hook saw no labels in the model's forward although the batch is "
                "tagged: the Trainer removes `labels` from the inputs and computes its own loss from the logits "
                "when TrainingArguments(label_smoothing_factor>0) or Trainer(compute_loss_func=...) is set, and "
                "that loss would replace the forget/retain objective. Unlearn with label_smoothing_factor=0 and "
                "without compute_loss_func (put any extra term into the objective instead)."
            )
        if FORGET_TAG not in tags:
            raise RuntimeError(
                "No 'unlearn' tags reached the model: build the training set with hfhooks.forget_retain_dataset(...) "
                "and pass data_collator=hfhooks.TaggedCollator(); with a datasets.Dataset that has an 'unlearn' "
                "column (e.g. in TRL's SFTTrainer), pass data_collator=hfhooks.TaggedCollator(<the trainer's "
                "collator>, columns=['unlearn']) and remove_unused_columns=False."
            )
        if outputs.get("logits") is None and outputs.get("log_probs") is not None:
            # TRL's fused LM head: per-token label log-probs (zero on ignored positions), no logits
            logp, mask = outputs["log_probs"], outputs["label_mask"]
            return objective.from_logprobs(
                logp.float().sum(-1), mask.sum(-1), torch.as_tensor(tags[FORGET_TAG]), tags.get(ID_TAG)
            )
        return objective(
            outputs["logits"], labels, torch.as_tensor(tags[FORGET_TAG]), tags.get(ID_TAG), causal
        )

    return LossHook(model, fn, tags=[FORGET_TAG, ID_TAG])


def salun(
    model: nn.Module,
    forget: Any,
    retain: Any,
    objective: UnlearningObjective | str = "random_labels",
    ratio: float = 0.5,
    mask: ParamMask | None = None,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    collate: Callable | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ParamMask:
    """SalUn without a Trainer: compute (or use) the saliency mask, then unlearn in place. Returns the mask.

    ``optimizer`` builds the optimizer from parameters (default: SGD lr 0.013, momentum 0.9, weight decay 5e-4,
    the reference defaults). Forget and retain examples are shuffled together each epoch.
    """
    objective = UnlearningObjective(objective) if isinstance(objective, str) else objective
    base_collate = collate or TaggedCollator().base
    if mask is None:
        loader = torch.utils.data.DataLoader(forget, batch_size=batch_size, collate_fn=base_collate)
        mask = ParamMask.from_scores(
            compute_saliency(model, loader, "grad_abs_sum", progress=progress), ratio
        )
    own_reference = objective.name == "npo" and objective.reference is None
    if own_reference:  # computed for this run only: reset afterwards so a reused objective never goes stale
        objective.reference = reference_logprobs(model, forget, base_collate, progress=progress)
    objective.check_reference(len(forget), "salun")
    data = forget_retain_dataset(forget, retain)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=g, collate_fn=TaggedCollator(base_collate)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        optimizer(params) if optimizer else torch.optim.SGD(params, lr=0.013, momentum=0.9, weight_decay=5e-4)
    )
    device = next(model.parameters()).device
    model.train()
    with GradientMask(model, mask).attach(opt), objective_hook(model, objective):
        for batch in tqdm(itertools.chain.from_iterable(loader for _ in range(epochs)), total=epochs * len(loader),
                          desc=f"SalUn ({objective.name})", disable=not progress, leave=False):  # fmt: skip
            loss = model(**to_device(batch, device))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    if own_reference:
        objective.reference = None
    return mask
