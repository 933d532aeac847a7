"""Where attributions are taken: the input-embedding output (tokens) or a raw input tensor (pixels).

:class:`AttributionSite` captures the site tensor during a forward (making it part of the autograd graph even
when the embedding layer is frozen, e.g. under LoRA), asks for attention weights when needed, forces SDPA's
math kernel for methods that need double backprop (the fused CPU/GPU kernels have no double backward), and
can re-run the model from a modified site (integrated gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hfhooks.core.hooks import HookSet
from hfhooks.core.names import unwrap_model

__all__ = ["AttributionSite", "Capture"]

_ENCODERS = {
    "bert",
    "roberta",
    "distilbert",
    "electra",
    "deberta",
    "deberta-v2",
    "albert",
    "xlm-roberta",
    "mpnet",
}


@dataclass
class Capture:
    """State of one captured forward."""

    kwargs: dict[str, Any]
    tensor: torch.Tensor | None = None
    rerun: Callable[[torch.Tensor], torch.Tensor] | None = None
    hooks: HookSet | None = None


class AttributionSite:
    """The attribution site of ``model``: embeddings if it has ``get_input_embeddings()``, else ``input_key``."""

    def __init__(self, model: nn.Module, input_key: str | None = None):
        self.model = model
        base = unwrap_model(model)
        emb = (
            base.get_input_embeddings()
            if hasattr(base, "get_input_embeddings") and input_key is None
            else None
        )
        if emb is None and input_key is None:
            raise ValueError(
                f"{type(base).__name__} has no get_input_embeddings(); pass input_key= the name of the input tensor "
                "to attribute to (e.g. 'pixel_values')."
            )
        self.embeddings, self.input_key = emb, input_key
        cfg = getattr(base, "config", None)
        self.encoder = getattr(cfg, "model_type", None) in _ENCODERS

    @property
    def token_level(self) -> bool:
        return self.embeddings is not None

    def query_positions(self, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """Query token per example for attention attributions: [CLS] (encoders) or the last real token."""
        ids = kwargs.get("input_ids")
        if ids is None or self.encoder:
            return None
        mask = kwargs.get("attention_mask")
        if mask is None:
            return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        return (mask.long().cumsum(-1).argmax(-1)).to(ids.device)

    @contextlib.contextmanager
    def capture(
        self, kwargs: dict[str, Any], attention: bool = False, math_sdpa: bool = False
    ) -> Iterator[Capture]:
        """Prepare ``kwargs`` for a forward that records the site; use ``cap.kwargs`` for the call."""
        cap = Capture(dict(kwargs))
        cap.hooks = HookSet(cap, self.model, name="AttributionSite.capture")
        if attention:
            cap.kwargs["output_attentions"] = True
        if self.token_level:

            def grab(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
                if cap.tensor is not None:
                    return None  # a re-run from inputs_embeds: keep the first capture
                if not out.requires_grad:  # frozen embeddings: make the output a leaf we can differentiate
                    out = out.detach().requires_grad_(True)
                cap.tensor = out
                return out

            cap.hooks.forward_hook(self.embeddings, grab, "embeddings")

            def rerun(point: torch.Tensor) -> torch.Tensor:
                args = {
                    k: v
                    for k, v in cap.kwargs.items()
                    if k not in ("input_ids", "labels", "output_attentions")
                }
                return self.model(inputs_embeds=point, **args)["logits"]

        else:
            if self.input_key not in cap.kwargs:
                raise KeyError(f"Input {self.input_key!r} is not in the batch (keys: {sorted(cap.kwargs)}).")
            x = cap.kwargs[self.input_key]
            if not x.requires_grad:
                x = (
                    x.detach().float().requires_grad_(True)
                    if not x.is_floating_point()
                    else x.detach().requires_grad_(True)
                )
            cap.kwargs[self.input_key] = cap.tensor = x

            def rerun(point: torch.Tensor) -> torch.Tensor:
                args = {k: v for k, v in cap.kwargs.items() if k not in ("labels", "output_attentions")}
                args[self.input_key] = point
                return self.model(**args)["logits"]

        cap.rerun = rerun
        ctx = contextlib.nullcontext()
        if math_sdpa:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel(SDPBackend.MATH)
        try:
            with ctx:
                yield cap
        finally:
            cap.hooks.close()

    def reduce(self, attr: torch.Tensor, method: str) -> torch.Tensor:
        """Per-token values for token sites (sum over the embedding dimension; ``input_gradient``: squared norm);
        element-wise for raw inputs (``input_gradient``: squared gradient)."""
        if method == "attention":
            return attr
        if method == "input_gradient":
            sq = attr.pow(2)
            return sq.sum(-1) if self.token_level else sq
        return attr.sum(-1) if self.token_level else attr
