"""``AttributionAlignment``: add λ·D(attribution, prior) to a model's loss, from hooks, in any training loop.

During each training forward a pre-hook decides whether this step is due (every ``every`` steps), captures the
attribution site, and forces SDPA's math kernel when the method needs double backprop; a forward hook
computes the differentiable attribution, the prior and the distance, and adds ``weight × term`` to the
model's loss through :class:`~hfhooks.loss_hooks.LossHook` (so gradient accumulation and
``num_items_in_batch`` scaling stay right). On the first term the hook checks that it really sends gradient to
the trainable parameters — penalties computed without ``create_graph`` are silent no-ops in published code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hfhooks.attribution.distances import DISTANCES, distance
from hfhooks.attribution.methods import METHODS, compute_attribution, needs_double_backprop
from hfhooks.attribution.priors import AlignmentContext, ColumnPrior, Prior, pool_words
from hfhooks.attribution.sites import AttributionSite
from hfhooks.loss_hooks import LossHook

__all__ = ["AttributionAlignment"]


class AttributionAlignment:
    """Pull the model's attributions toward a prior while it trains.

    Args:
        model: the model the training loop calls (classification logits ``[B, C]``).
        method: one of :data:`~hfhooks.attribution.methods.METHODS`.
        prior: a :class:`~hfhooks.attribution.priors.Prior`, or a tag name (``ColumnPrior``).
        distance: one of ``kl`` (default), ``mse``, ``cosine``, ``bce``, ``rrr`` (default for ``input_gradient``).
        weight: λ.
        every: add the term on every ``every``-th step only (``step`` is advanced by the callback, or by you).
        fraction: fraction of each batch's examples that enter the term. It does *not* reduce cost (attributions
            are computed for the whole batch); use ``every`` for that.
        target / score: what is attributed (see :func:`~hfhooks.attribution.methods.target_scores`).
        steps: integrated-gradients steps.
        input_key: attribute to this input tensor instead of the embeddings (e.g. ``"pixel_values"``).
        special_token_ids: token ids excluded from normalisation besides padding, or the tokenizer itself
            (its ``all_special_ids``). Default: the config's pad/bos/eos/sep/cls ids — BERT configs carry only
            the pad id, so pass the tokenizer;
            a ``special_tokens_mask`` tag, if present, is used as well.
        word_ids: tag holding each token's word index (``-1`` for none) to pool sub-words into words.
        check_gradient: verify on the first term that it changes the parameters' gradients.
        seed: for ``fraction`` sampling.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "grad_x_input",
        prior: Prior | str = "rationale",
        distance: str | None = None,
        weight: float = 1.0,
        every: int = 1,
        fraction: float = 1.0,
        target: str = "label",
        score: str = "logit",
        steps: int = 4,
        input_key: str | None = None,
        special_token_ids: Sequence[int] | Any | None = None,
        word_ids: str | None = None,
        check_gradient: bool = True,
        seed: int = 0,
    ):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}.")
        distance = distance or ("rrr" if method == "input_gradient" else "kl")
        if distance not in DISTANCES:
            raise ValueError(f"distance={distance!r} is not one of {DISTANCES}.")
        if every < 1 or not 0 < fraction <= 1 or steps < 1:
            raise ValueError(f"every={every} must be ≥ 1, fraction={fraction} in (0, 1], steps={steps} ≥ 1.")
        self.model, self.method, self.distance, self.weight = model, method, distance, float(weight)
        self.prior = ColumnPrior(prior) if isinstance(prior, str) else prior
        self.every, self.fraction, self.target, self.score, self.steps = every, fraction, target, score, steps
        self.word_ids, self.check_gradient = word_ids, check_gradient
        self.site = AttributionSite(model, input_key)
        if hasattr(special_token_ids, "all_special_ids"):  # a tokenizer: its [CLS], [SEP], <s>, ... ids
            special_token_ids = special_token_ids.all_special_ids
        self.special_ids = torch.tensor(
            list(special_token_ids) if special_token_ids is not None else self._config_special_ids()
        )
        self.step = 0
        self.stats = {"terms": 0, "term_sum": 0.0, "loss_sum": 0.0}
        self._generator = torch.Generator().manual_seed(seed)
        self._checked = False
        self._rerunning = False
        self._stack: contextlib.ExitStack | None = None
        self._cap = None
        self._handles: list = []
        tags = [*self.prior.tags, "special_tokens_mask", *([word_ids] if word_ids else [])]
        self._loss = LossHook(model, self._term, tags=tags, mode="add", active=self._active)

    def _config_special_ids(self) -> list[int]:
        from hfhooks.params import unwrap_model

        cfg = getattr(unwrap_model(self.model), "config", None)
        ids = {
            getattr(cfg, k, None)
            for k in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")
        }
        return sorted(i for i in ids if isinstance(i, int))

    # -- lifecycle ------------------------------------------------------------------------------------------
    def attach(self) -> AttributionAlignment:
        if self._handles:
            raise RuntimeError("AttributionAlignment is already attached.")
        self._loss.attach()  # first: its pre-hook pops the tags before _open copies the kwargs
        self._handles.append(self.model.register_forward_pre_hook(self._open, with_kwargs=True))
        return self

    def detach(self) -> None:
        self._close()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._loss.detach()

    @property
    def num_hooks(self) -> int:
        return len(self._handles) + self._loss.num_hooks

    def __enter__(self) -> AttributionAlignment:
        return self.attach() if not self._handles else self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- per forward ----------------------------------------------------------------------------------------
    def _active(self, module: nn.Module) -> bool:
        return module.training and not self._rerunning and self.step % self.every == 0

    def _open(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._rerunning:  # integrated gradients re-running the model from inside _term
            return None
        self._close()  # a forward that raised never reached _term: drop its capture
        if not self._active(module):
            return None
        self._stack = contextlib.ExitStack()
        cap = self._stack.enter_context(
            self.site.capture(
                kwargs, attention=self.method == "attention", math_sdpa=needs_double_backprop(self.method)
            )
        )
        self._cap = cap
        kwargs.update(cap.kwargs)
        return args, kwargs

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self._cap = None, None

    def _rerun(self, point: torch.Tensor) -> torch.Tensor:
        self._rerunning = True
        try:
            return self._cap.rerun(point)
        finally:
            self._rerunning = False

    def _valid(self, inputs: dict[str, Any], tags: dict[str, Any], shape: torch.Size) -> torch.Tensor | None:
        if not self.site.token_level:
            return None
        ids = inputs.get("input_ids")
        valid = torch.ones(shape, dtype=torch.bool)
        if inputs.get("attention_mask") is not None:
            valid &= inputs["attention_mask"].bool().cpu()
        if ids is not None and self.special_ids.numel():
            valid &= ~torch.isin(ids.cpu(), self.special_ids)
        if "special_tokens_mask" in tags:
            valid &= ~torch.as_tensor(tags["special_tokens_mask"]).bool()
        return valid

    def _term(self, outputs: Any, labels: torch.Tensor | None, tags: dict[str, Any]) -> torch.Tensor | None:
        cap = self._cap
        if cap is None or cap.tensor is None:
            self._close()
            return None
        try:
            inputs = self._loss.inputs
            attentions = outputs.get("attentions") if hasattr(outputs, "get") else None
            attr = compute_attribution(
                self.method, outputs["logits"], cap.tensor, labels, self.target, self.score, attentions,
                self.site.query_positions(inputs), self._rerun, self.steps, create_graph=True,
            )  # fmt: skip
            attr = self.site.reduce(attr, self.method)
            valid = self._valid(inputs, tags, attr.shape[:2]) if attr.dim() >= 2 else None
            word_ids = torch.as_tensor(tags[self.word_ids]) if self.word_ids else None
            if word_ids is not None:
                attr = pool_words(attr, word_ids)
                valid = pool_words(valid.float().to(attr.device), word_ids) > 0 if valid is not None else None
            ctx = AlignmentContext(inputs, labels, tags, outputs, cap.tensor, valid, self.model, word_ids)
            prior = self.prior(ctx).to(attr.device)
            rows = self._rows(attr.shape[0], attr.device)
            if valid is not None:
                valid = valid.to(attr.device)
            term = distance(self.distance, attr[rows], prior[rows] if prior.shape[0] == attr.shape[0] else prior,
                            valid[rows] if valid is not None else None)  # fmt: skip
            if self.check_gradient and not self._checked:
                self._verify_gradient(term)
            self.stats["terms"] += 1
            self.stats["term_sum"] += float(term.detach())
            if outputs.get("loss") is not None:
                self.stats["loss_sum"] += float(outputs["loss"].detach())
            return self.weight * term
        finally:
            self._close()

    def _rows(self, n: int, device: torch.device) -> torch.Tensor:
        if self.fraction >= 1:
            return torch.arange(n, device=device)
        k = max(1, round(self.fraction * n))
        return torch.randperm(n, generator=self._generator)[:k].sort().values.to(device)

    def _verify_gradient(self, term: torch.Tensor) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        if not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
            raise RuntimeError(
                f"The attribution term ({self.method}, {self.distance}) sends no gradient to any trainable parameter: "
                "it would be a silent no-op. Check that the prior is not identical to the attributions, that the "
                "method is differentiable for this model, and that trainable parameters lie between the site and "
                "the logits."
            )
        self._checked = True

    def pop_stats(self) -> dict[str, float]:
        """Mean term (before λ) and its share of the total loss since the last call; resets the counters."""
        n = self.stats["terms"]
        if not n:
            return {}
        term = self.stats["term_sum"] / n
        loss = self.stats["loss_sum"] / n
        self.stats = {"terms": 0, "term_sum": 0.0, "loss_sum": 0.0}
        total = loss + self.weight * term
        return {"align/term": term, "align/share": (self.weight * term / total) if total else 0.0}
