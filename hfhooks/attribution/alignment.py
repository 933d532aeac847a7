"""``AttributionAlignment``: add λ·D(attribution, prior) to a model's loss, from hooks, in any training loop.

During each training forward a pre-hook decides whether this step is due (every ``every`` steps), captures the
attribution site, and forces SDPA's math kernel when the method needs double backprop; a forward hook
computes the differentiable attribution, the prior and the distance, and adds ``weight × term`` to the
model's loss through :class:`~hfhooks.core.loss_hooks.LossHook` (so gradient accumulation and
``num_items_in_batch`` scaling stay right). On the first term the hook checks that it really sends gradient to
the trainable parameters — penalties computed without ``create_graph`` are silent no-ops in published code.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from hfhooks.attribution.config import AlignmentConfig
from hfhooks.attribution.distances import distance
from hfhooks.attribution.methods import (
    compute_attribution,
    needs_double_backprop,
    target_scores,
)
from hfhooks.attribution.priors import AlignmentContext, ColumnPrior, pool_words
from hfhooks.attribution.sites import AttributionSite
from hfhooks.core.hooks import HookSet
from hfhooks.core.loss_hooks import LossHook, count_items
from hfhooks.core.params import is_dtensor

__all__ = ["AttributionAlignment"]

# AlignmentConfig's fields this mechanism uses (resume_from belongs to the callback)
_FIELDS = tuple(f for f in AlignmentConfig.__dataclass_fields__ if f != "resume_from")


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
        target / score: what is attributed (see :func:`~hfhooks.attribution.methods.target_scores`). ``score``
            defaults to ``"logprob"`` (the gold label's log-probability, whose gradient the loss already
            computes) for first order and to ``"logit"`` for the other methods.
        steps: integrated-gradients steps (midpoint rule; the default converges, see
            :data:`~hfhooks.attribution.methods.IG_STEPS`).
        input_key: attribute to this input tensor instead of the embeddings (e.g. ``"pixel_values"``).
        special_token_ids: token ids excluded from normalisation besides padding, or the tokenizer itself
            (its ``all_special_ids``). Default: the config's pad/bos/eos/sep/cls ids — BERT configs carry only
            the pad id, so pass the tokenizer;
            a ``special_tokens_mask`` tag, if present, is used as well.
        word_ids: tag holding each token's word index (``-1`` for none) to pool sub-words into words.
        check_gradient: verify on the first term that it changes the parameters' gradients.
        seed: for ``fraction`` sampling.
        reuse_backward: first order with ``score="logprob"`` and ``target="label"``: take ∂s/∂e from the
            training backward instead of an extra backward (close to a plain step's cost). ``"auto"`` (default)
            does so whenever those hold; ``True`` insists (``ValueError`` otherwise); ``False`` never. The model's
            loss must be the mean negative log-likelihood of the labels (checked every step; otherwise the extra
            backward is used) and be what the training loop backpropagates. The first such step also computes
            ∂s/∂e the slow way and compares: if they differ (another loss term on the embeddings), ``"auto"``
            warns and keeps the extra backward from then on, ``True`` raises.
        config: an :class:`~hfhooks.AlignmentConfig` holding the options above (``method`` may still be given
            first, positionally); keywords given as well replace its fields.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | None = None,
        *,
        config: AlignmentConfig | None = None,
        **options: Any,
    ):
        if method is not None:
            options = {"method": method, **options}
        self.config = AlignmentConfig.resolve(config, options, "AttributionAlignment", only=_FIELDS)
        c = self.config
        method, prior, target, word_ids = c.method, c.prior, c.target, c.word_ids
        distance = c.distance or ("rrr" if method == "input_gradient" else "kl")
        self.model, self.method, self.distance, self.weight = model, method, distance, float(c.weight)
        self.prior = ColumnPrior(prior) if isinstance(prior, str) else prior
        score = c.score or ("logprob" if method == "grad_x_input_first_order" else "logit")
        self.every, self.fraction, self.target, self.score, self.steps = (
            c.every,
            c.fraction,
            target,
            score,
            c.steps,
        )
        self.word_ids, self.check_gradient = word_ids, c.check_gradient
        reuse_backward = c.reuse_backward
        eligible = method == "grad_x_input_first_order" and score == "logprob" and target == "label"
        self.reuse_backward = reuse_backward is True or (reuse_backward == "auto" and eligible)
        self._reuse_strict = reuse_backward is True
        self.reused = 0  # terms whose ∂s/∂e came from the training backward
        self._reuse_checked = False
        self.site = AttributionSite(model, c.input_key)
        special_token_ids = c.special_token_ids  # a tokenizer was replaced by its ids in the config
        self.special_ids = torch.tensor(
            list(special_token_ids) if special_token_ids is not None else self._config_special_ids()
        )
        self.step = 0
        self.stats = {"terms": 0, "term_sum": 0.0, "loss_sum": 0.0}
        self._generator = torch.Generator().manual_seed(c.seed)
        self._checked = False
        self._rerunning = False
        self._stack: contextlib.ExitStack | None = None
        self._cap = None
        self._hooks: HookSet | None = None
        tags = [*self.prior.tags, "special_tokens_mask", *([word_ids] if word_ids else [])]
        self._loss = LossHook(model, self._term, tags=tags, mode="add", active=self._active)

    def _config_special_ids(self) -> list[int]:
        from hfhooks.core.params import unwrap_model

        cfg = getattr(unwrap_model(self.model), "config", None)
        ids = {
            getattr(cfg, k, None)
            for k in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")
        }
        return sorted(i for i in ids if isinstance(i, int))

    # -- lifecycle ------------------------------------------------------------------------------------------
    def attach(self) -> AttributionAlignment:
        if self._hooks is not None:
            raise RuntimeError("AttributionAlignment is already attached.")
        if self.method == "integrated_gradients" and any(is_dtensor(p) for p in self.model.parameters()):
            raise RuntimeError(
                "AttributionAlignment(method='integrated_gradients') does not support FSDP2 (fully_shard): its "
                f"{self.steps} re-runs of the model inside each training forward run the sharded modules' "
                "forward hooks again within one training step, which FSDP2's backward is not built for: the "
                "training backward then crashes the process (a segfault, measured with torch 2.13). Use "
                "method='grad_x_input' or 'input_gradient' (double backprop, supported under FSDP2), or train "
                "with DDP."
            )
        self._loss.attach()  # first: its pre-hook pops the tags before _open copies the kwargs
        self._hooks = HookSet(self, self.model)
        self._hooks.forward_pre_hook(self.model, self._open, "attribution site", with_kwargs=True)
        return self

    def detach(self) -> None:
        self._close()
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None
        self._loss.detach()

    @property
    def num_hooks(self) -> int:
        return (len(self._hooks) if self._hooks is not None else 0) + self._loss.num_hooks

    def __enter__(self) -> AttributionAlignment:
        return self.attach() if self._hooks is None else self

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
            with _gathered_through_backward(self.model):
                return self._term_of(cap, outputs, labels, tags)
        finally:
            self._close()

    def _term_of(
        self, cap: Any, outputs: Any, labels: torch.Tensor | None, tags: dict[str, Any]
    ) -> torch.Tensor | None:
        """The weighted term of this forward (``None`` when it is deferred to the backward)."""
        inputs = self._loss.inputs
        if self.reuse_backward and self._checked and self._can_reuse(outputs, labels, cap.tensor):
            self._defer(outputs, labels, tags, inputs, cap.tensor)
            return None  # the term's gradient is added in the backward, at the site
        attentions = outputs.get("attentions") if hasattr(outputs, "get") else None
        try:
            attr = compute_attribution(
                self.method, outputs["logits"], cap.tensor, labels, self.target, self.score, attentions,
                self.site.query_positions(inputs), self._rerun, self.steps, create_graph=True,
            )  # fmt: skip
        except RuntimeError as e:
            if "not have been used in the graph" in str(e) and _is_compiled(self.model):
                raise RuntimeError(
                    "Attribution alignment cannot take attributions from a model compiled with an AOTAutograd "
                    "backend (inductor, aot_eager): the embedding output is compiled away. Compile with "
                    "backend='eager' (torch.compile(model, backend='eager') or TrainingArguments("
                    "torch_compile_backend='eager')), or train uncompiled."
                ) from e
            raise
        term = self._distance(attr, outputs, labels, tags, inputs, cap.tensor)
        if self.check_gradient and not self._checked:
            self._verify_gradient(term)
        self._checked = True
        self._count(term, outputs)
        return self.weight * term

    def _distance(self, attr, outputs, labels, tags, inputs, site) -> torch.Tensor:
        """D(reduced attribution, prior) over the valid positions of the sampled rows."""
        attr = self.site.reduce(attr, self.method)
        target = self._target(attr.shape, outputs, labels, tags, inputs, site)
        return self._distance_to(attr, *target)

    def _target(self, shape, outputs, labels, tags, inputs, site):
        """(prior, valid positions, word ids) for reduced attributions of ``shape`` (needs the forward's graph
        for model-derived priors)."""
        valid = self._valid(inputs, tags, shape[:2]) if len(shape) >= 2 else None
        word_ids = torch.as_tensor(tags[self.word_ids]) if self.word_ids else None
        if word_ids is not None and valid is not None:
            valid = pool_words(valid.float().to(site.device), word_ids) > 0
        ctx = AlignmentContext(inputs, labels, tags, outputs, site, valid, self.model, word_ids)
        return self.prior(ctx), valid, word_ids

    def _distance_to(self, attr, prior, valid, word_ids) -> torch.Tensor:
        if word_ids is not None:
            attr = pool_words(attr, word_ids)
        prior = prior.to(attr.device)
        rows = self._rows(attr.shape[0], attr.device)
        if valid is not None:
            valid = valid.to(attr.device)
        return distance(self.distance, attr[rows], prior[rows] if prior.shape[0] == attr.shape[0] else prior,
                        valid[rows] if valid is not None else None)  # fmt: skip

    def _count(self, term: torch.Tensor, outputs: Any) -> None:
        self.stats["terms"] += 1
        self.stats["term_sum"] += float(term.detach())
        if outputs.get("loss") is not None:
            self.stats["loss_sum"] += float(outputs["loss"].detach())

    # -- first order from the training backward (reuse_backward) ---------------------------------------------
    def _can_reuse(self, outputs: Any, labels: torch.Tensor | None, site: torch.Tensor) -> bool:
        """The model's loss is mean −log p(label) over the batch: then ∂loss/∂e_i = −(1/B)·∂s_i/∂e_i."""
        loss = outputs.get("loss") if hasattr(outputs, "get") else None
        logits = outputs.get("logits") if hasattr(outputs, "get") else None
        if loss is None or not loss.requires_grad or logits is None or labels is None or logits.dim() != 2:
            return False
        if (
            not site.requires_grad or site.grad_fn is None
        ):  # a detached leaf: no backward reaches it by itself
            return False
        with torch.no_grad():
            nll = -target_scores(logits, labels, "label", "logprob").mean()
        return bool(torch.allclose(loss.detach().float(), nll, rtol=1e-5, atol=1e-7))

    def _defer(self, outputs, labels, tags, inputs, site) -> None:
        """Hook the backward: read c = ∂root/∂loss, then at the site turn G = ∂root/∂e into ∂s/∂e = −(B/c)·G,
        build the term from it and add c·k·λ·∂term/∂e to the gradient flowing on into the embeddings."""
        loss, batch = outputs["loss"], site.shape[0]
        state: dict[str, Any] = {"c": None}
        num_items = self._loss.num_items
        k = 1.0
        if num_items is not None and labels is not None:  # the scaling LossHook gives an added term
            k = float(count_items(labels, self._loss.causal)) / float(num_items)
        exact = None
        if not self._reuse_checked:  # once: the slow ∂s/∂e, to check the reconstruction against
            s = target_scores(outputs["logits"], labels, "label", "logprob").sum()
            (exact,) = torch.autograd.grad(s, site, retain_graph=True)
        # the prior now, while the forward's graph is whole (the backward frees it as it goes)
        shape = site.shape[:-1] if self.site.token_level else site.shape
        prior, valid, word_ids = self._target(shape, outputs, labels, tags, inputs, site)
        # the hooks below hold only graph-free tensors: a closure on `site` that reached back into the graph
        # (outputs, a prior with grad) would be a cycle through C++ autograd nodes that is never freed
        target = (prior.detach(), valid, word_ids)
        detached = site.detach()
        stat = {"loss": outputs["loss"].detach()}

        def on_loss(grad: torch.Tensor) -> None:
            state["c"] = grad.detach()

        def on_site(grad: torch.Tensor) -> torch.Tensor:
            c = state["c"]
            if c is None:
                raise RuntimeError(
                    "Attribution alignment: the backward reached the embeddings without passing through the "
                    "model's loss — the training loop computed its own loss (label smoothing, compute_loss_func), "
                    "so a term added to the model's loss would be ignored as well. Train with the model's own loss "
                    "(label_smoothing_factor=0, no compute_loss_func)."
                )
            if float(c) == 0.0:
                return grad
            g = grad.detach().float() * (-batch / c.float())
            if exact is not None:
                if not torch.allclose(
                    g, exact.float(), rtol=1e-3, atol=1e-6 * float(exact.abs().max()) + 1e-12
                ):
                    why = (
                        "the gradient reaching the embeddings is not the model loss's alone (another loss term "
                        "depends on them), so ∂s/∂e cannot be recovered from it"
                    )
                    if self._reuse_strict:
                        raise RuntimeError(f"reuse_backward=True: {why}. Use reuse_backward=False.")
                    warnings.warn(
                        f"AttributionAlignment: {why}; taking the extra backward from now on.", stacklevel=2
                    )
                    self.reuse_backward = False
                    g = exact.float()  # this step's term is still exact
                self._reuse_checked = True
            with torch.enable_grad():
                e = detached.float().requires_grad_(True)
                term = self._distance_to(self.site.reduce(g * e, self.method), *target)
                (dterm,) = torch.autograd.grad(term, e)
            self._count(term, stat)
            self.reused += 1
            return grad + (c * k * self.weight * dterm).to(grad.dtype)

        self._hooks.tensor_hook(loss, on_loss, "loss")  # both hooks die with this step's graph
        self._hooks.tensor_hook(site, on_site, "attribution site")

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


@contextlib.contextmanager
def _gathered_through_backward(model: nn.Module):
    """Under FSDP2, keep the parameters gathered through the backward passes taken inside the forward.

    The term differentiates an attribution that is itself a gradient: its graph holds the gathered (unsharded)
    parameters that the attribution's backward used. FSDP2 reshards a module after its backward (its
    post-backward hook, and the root's final callback, fire inside ``torch.autograd.grad`` too), which frees
    that storage; the training backward then reads freed memory (a segfault on CPU, measured; see
    tests/distributed/fsdp2_callbacks.py). Holding the gathered parameters until the training backward, whose
    own post-backward hooks reshard as usual, keeps the graph valid and costs one module's gathered
    parameters per module until then — what ``reshard_after_forward=False`` costs anyway.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        FSDPModule = ()
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    before = [_reshards_after_backward(m) for m in modules]
    for m in modules:
        m.set_reshard_after_backward(False, recurse=False)
        m.unshard()  # a module resharded after its forward: the term's graph reaches inside it (attention)
    try:
        yield
    finally:
        for m, flag in zip(modules, before, strict=True):
            m.set_reshard_after_backward(flag, recurse=False)


def _reshards_after_backward(module: nn.Module) -> bool:
    """FSDP2's ``reshard_after_backward`` of ``module`` (torch has a setter, no getter: read its param groups;
    ``True``, the default, if their layout changes)."""
    try:
        groups = module._get_fsdp_state()._fsdp_param_groups
    except AttributeError:
        return True
    return all(getattr(g, "reshard_after_backward", True) for g in groups)


def _is_compiled(model: nn.Module) -> bool:
    """``torch.compile(model)`` (an ``OptimizedModule``) or ``model.compile()`` anywhere in the module tree."""
    return any(
        hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )
