"""Replace or extend a model's loss from hooks, scaled the way the ``Trainer`` expects.

Callbacks never see the batch or the loss, and ``compute_loss_func`` only sees outputs and labels. A forward
pre-hook, though, sees every keyword the Trainer passes (labels, ``num_items_in_batch``, side tags), and a
forward hook may return a modified output. :class:`LossHook` uses both: the pre-hook pops side tags and
records labels; the forward hook calls ``fn(outputs, labels, tags)`` — which returns the new *per-micro-batch
mean* loss — and writes it into ``outputs.loss``.

Scaling. When the Trainer passes ``num_items_in_batch`` (models whose ``forward`` takes ``**kwargs``), it
expects the loss already normalised over the whole accumulated batch and skips its division by the number of
accumulation steps; otherwise it divides by it. The hook therefore rescales a micro-batch mean ``m`` to
``m · items / num_items_in_batch`` in the first case (``items`` = label entries of this micro-batch, counted
as the Trainer counts them: shifted by one for causal LMs, ``-100`` ignored), and leaves it alone in the
second. Either way gradient accumulation and multi-device runs give the same gradients as one big batch.

TRL's fused LM head. TRL's ``SFTTrainer`` calls ``model(..., fused_lm_head=True)``, which returns per-token
label log-probabilities (``log_probs``, ``label_mask``) instead of logits, and computes its loss itself as
``−Σ log_probs / N`` (``N``: label tokens of the accumulated batch, or of this micro-batch), ignoring
``outputs.loss``. On such a forward the hook also writes the new micro-batch mean ``m`` into ``log_probs`` as
``−m`` on each of this micro-batch's ``M`` label tokens (``mode="replace"``; subtracted from them for
``"add"``), so the trainer's loss is ``m · M / N`` — the same scaling as above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hfhooks.core.hooks import HookSet

__all__ = ["LossHook", "count_items", "is_causal_lm", "write_fused_loss"]

LossFn = Callable[[Any, torch.Tensor | None, dict[str, Any]], torch.Tensor]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the Trainer shifts labels for this model when counting items (decoder-only LM heads)."""
    from hfhooks.core.params import unwrap_model

    base = unwrap_model(model)
    return type(base).__name__.endswith(("ForCausalLM", "LMHeadModel")) and not getattr(
        getattr(base, "config", None), "is_encoder_decoder", False
    )


def count_items(labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Label entries that count towards ``num_items_in_batch`` (as ``Trainer._get_num_items_in_batch``)."""
    return (labels[..., 1:] if causal else labels).ne(-100).sum()


def write_fused_loss(outputs: Any, mean: torch.Tensor, mode: str = "replace") -> None:
    """Carry a micro-batch mean loss through a fused-LM-head output (TRL's ``FusedCausalLMOutput``).

    The trainer computes ``−Σ log_probs / N``; ``log_probs`` becomes ``−mean`` on each label token
    (``mode="replace"``) or has it subtracted (``"add"``), so that loss is ``mean · M / N`` for ``M`` label tokens.
    """
    log_probs, mask = outputs.get("log_probs"), outputs.get("label_mask")
    if log_probs is None or mask is None:
        raise ValueError(
            "The model was called with fused_lm_head=True but returned no log_probs/label_mask: hfhooks cannot "
            "place its loss where the trainer reads it. Train without the fused LM head."
        )
    carrier = -mean.to(log_probs.dtype) * mask.to(log_probs.dtype)
    outputs["log_probs"] = carrier if mode == "replace" else log_probs + carrier


class LossHook:
    """Swap a model's loss for ``fn(outputs, labels, tags)`` (or add it) on every forward where ``active()``.

    Args:
        model: the module the Trainer calls (outputs must be a dict-like ``ModelOutput`` or a dict).
        fn: returns the new loss (``mode="replace"``) or an extra term (``mode="add"``) as a mean over this
            micro-batch — a scalar tensor with grad. ``fn`` may also read the forward's kwargs via
            :attr:`inputs` and its ``num_items_in_batch`` via :attr:`num_items` (valid during the call).
        tags: keyword names to pop from the forward's kwargs and hand to ``fn`` (e.g. ``["unlearn"]``).
        pop_labels: also remove ``labels`` before ``forward`` (saves the model computing a loss it discards).
        active: when to apply (default: in training mode only).
        mode: ``"replace"`` the model's loss, or ``"add"`` the term to it (the model's own loss is already in
            the Trainer's scaling; only the added term is rescaled).
    """

    def __init__(
        self,
        model: nn.Module,
        fn: LossFn,
        tags: Sequence[str] = (),
        pop_labels: bool = False,
        active: Callable[[nn.Module], bool] | None = None,
        mode: str = "replace",
    ):
        if mode not in ("replace", "add"):
            raise ValueError(f"mode={mode!r} must be 'replace' or 'add'.")
        self.model, self.fn, self.tags, self.pop_labels, self.mode = model, fn, list(tags), pop_labels, mode
        self.inputs: dict[str, Any] = {}
        self.num_items: Any = None  # the forward's num_items_in_batch, during fn
        self.active = active or (lambda m: m.training)
        self.causal = is_causal_lm(model)
        self._hooks: HookSet | None = None
        self._ctx: dict[str, Any] = {}

    def attach(self) -> LossHook:
        if self.num_hooks:
            raise RuntimeError("LossHook is already attached.")
        self._hooks = HookSet(self, self.model)
        self._hooks.forward_pre_hook(self.model, self._pre, "loss", with_kwargs=True)
        self._hooks.forward_hook(self.model, self._post, "loss", with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None
        self._ctx = {}

    @property
    def num_hooks(self) -> int:
        return len(self._hooks) if self._hooks is not None else 0

    def __enter__(self) -> LossHook:
        return self.attach() if not self.num_hooks else self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        tags = {t: kwargs.pop(t) for t in self.tags if t in kwargs}
        if not self.active(module):
            self._ctx = {}
            return args, kwargs
        labels = kwargs.get("labels")
        if self.pop_labels and labels is not None:
            kwargs.pop("labels")
        self._ctx = {
            "tags": tags,
            "labels": labels,
            "num_items": kwargs.get("num_items_in_batch"),
            "fused": bool(kwargs.get("fused_lm_head", False)),
        }
        self.inputs = dict(kwargs)
        return args, kwargs

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        ctx, self._ctx = self._ctx, {}
        if not ctx:
            return outputs
        self.num_items = ctx["num_items"]
        try:
            loss = self.fn(outputs, ctx["labels"], ctx["tags"])
        finally:
            self.inputs, self.num_items = {}, None
        if loss is None:  # fn chose to skip this micro-batch
            return outputs
        if ctx["fused"]:
            write_fused_loss(outputs, loss, self.mode)
        num_items = ctx["num_items"]
        if num_items is not None and ctx["labels"] is not None:
            items = count_items(ctx["labels"], self.causal).to(loss.device)
            loss = loss * items / torch.as_tensor(num_items, device=loss.device)
        if self.mode == "add":
            if outputs.get("loss") is None:
                raise ValueError("LossHook(mode='add') needs the model to compute its own loss: pass labels.")
            loss = outputs["loss"] + loss
        outputs["loss"] = loss
        return outputs
