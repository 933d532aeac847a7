"""The dedicated parameters of gradient routing, and what is done with them after training.

:func:`dedicated_mask` builds the mask of dedicated coordinates (in selected layers, the last ``k`` MLP hidden
units and the last ``h`` attention heads), :func:`check_dedicated` refuses a mask with the opposite meaning,
:func:`ablate` zeroes (or re-initialises) the dedicated slices, and :func:`calibrate_logits` trains only the
LM-head bias so that trivial bias shifts do not masquerade as retained knowledge (:func:`load_logit_bias`
restores a calibrated bias). The training-time mechanism is :class:`hfhooks.routing.router.Router`.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hfhooks.core.blocks import find_layers, select_layers
from hfhooks.core.data import to_device
from hfhooks.core.layers import attention_head_slices, mlp_unit_slices
from hfhooks.core.names import unwrap_model
from hfhooks.core.params import ParamIndex
from hfhooks.io.checkpoints import Checkpoint
from hfhooks.masks.mask import ParamMask
from hfhooks.masks.saliency import model_state_preserved

__all__ = [
    "DEDICATED_SEMANTICS",
    "ablate",
    "calibrate_logits",
    "check_dedicated",
    "dedicated_mask",
    "load_logit_bias",
]


DEDICATED_SEMANTICS = "1=dedicated"
"""``ParamMask.metadata["semantics"]`` of a dedicated mask: a 1 marks a coordinate that holds the forget domain
(and is zeroed by :func:`ablate`) — not a trainable one. Saved into the mask file and checked where it is used."""


def dedicated_mask(
    model: nn.Module | ParamIndex,
    layers: Iterable[int] | slice | None = None,
    mlp_units: int | Sequence[int] = 64,
    heads: int | Sequence[int] = 1,
) -> ParamMask:
    """Row/column mask (1 = dedicated) of the last ``mlp_units`` MLP units and last ``heads`` heads per layer.

    ``layers`` selects blocks (default: all); ``mlp_units=0`` / ``heads=0`` leave that part out.
    """
    index = model if isinstance(model, ParamIndex) else ParamIndex(model)
    slices: dict[str, tuple[int, torch.Tensor]] = {}
    chosen = select_layers(find_layers(index.model), layers)
    for layer in chosen:
        if mlp_units:
            slices.update(mlp_unit_slices(index, layer, mlp_units))
        if heads:
            slices.update(attention_head_slices(index, layer, heads))
    if not slices:
        raise ValueError("No dedicated parameters selected: set mlp_units and/or heads to a positive value.")
    mask = ParamMask.from_slices(slices, index)
    as_json = lambda x: x if isinstance(x, int) else list(x)  # noqa: E731
    mask.metadata["routing"] = {"mlp_units": as_json(mlp_units), "heads": as_json(heads), "layers": chosen}
    mask.metadata["semantics"] = DEDICATED_SEMANTICS
    return mask


def check_dedicated(mask: ParamMask, what: str) -> ParamMask:
    """Refuse a mask whose recorded meaning is not "1 = dedicated" where a dedicated mask is needed.

    A mask from :func:`dedicated_mask` (or a file it was saved to) says ``semantics="1=dedicated"``; a mask
    built by hand carries no semantics and is taken as given. A ``"1=trainable"`` mask (SalUn, GradientMask)
    marks the coordinates that *may change*: ablating it would zero the wrong half of the model. Files saved by
    hfhooks versions before the dedicated semantics existed say ``"1=trainable"`` but keep the
    ``metadata["routing"]`` record of :func:`dedicated_mask`, which identifies them.
    """
    semantics = mask.metadata.get("semantics")
    if semantics in (None, DEDICATED_SEMANTICS) or "routing" in mask.metadata:
        return mask
    raise ValueError(
        f"{what} needs a dedicated mask (1 = dedicated coordinate, semantics {DEDICATED_SEMANTICS!r}), but this "
        f"mask's semantics is {semantics!r}: a 1 there marks a coordinate that may change (a SalUn or "
        "GradientMask mask), the opposite meaning. Build the dedicated mask with hfhooks.dedicated_mask(...) or "
        "load the one GradientRoutingCallback(save_mask=...) wrote; if this mask really marks dedicated "
        f"coordinates, set mask.metadata['semantics'] = {DEDICATED_SEMANTICS!r}."
    )


@torch.no_grad()
def ablate(
    model: nn.Module, dedicated: ParamMask, how: str = "zero", generator: torch.Generator | None = None
) -> int:
    """Zero (``how="zero"``) or re-initialise (``"reinit"``: N(0, std of the rest of each tensor)) the
    dedicated coordinates in place. Returns the number of coordinates changed."""
    if how not in ("zero", "reinit"):
        raise ValueError(f"how={how!r} must be 'zero' or 'reinit'.")
    check_dedicated(dedicated, "ablate")
    changed = 0
    index = model if isinstance(model, ParamIndex) else ParamIndex(model)
    dedicated = dedicated.canonical(index)  # a tied-weight alias is the shared tensor
    for name, param in dedicated.validate(index).items():
        sel = dedicated[name].to(param.device)
        if how == "zero":
            param.data.masked_fill_(sel, 0)
        else:
            rest = param.detach()[~sel]
            std = float(rest.float().std()) if rest.numel() > 1 else 0.02
            noise = (
                torch.randn(param.shape, generator=generator, dtype=torch.float32).to(
                    param.device, param.dtype
                )
                * std
            )
            param.data.copy_(torch.where(sel, noise, param.data))
        changed += int(sel.sum())
    return changed


def calibrate_logits(
    model: nn.Module,
    data: Mapping[str, tuple[Iterable[Any], float]],
    steps: int = 300,
    lr: float = 1e-2,
    progress: bool = True,
) -> list[float]:
    """Train only the LM-head bias on a weighted sum of losses (e.g. forget + β·adjacent + α·retain).

    ``data`` maps a name to ``(dataloader, weight)``; each step takes one batch of each. If the output layer
    has no bias (Llama, GPT-2) a zero bias is added to it. ``save_pretrained`` saves it (as ``lm_head.bias``),
    but ``from_pretrained`` of an architecture without an LM-head bias drops it, so a ``UserWarning`` says so:
    after loading, put it back with :func:`load_logit_bias` (``load_logit_bias(model, path)``). Every other
    parameter's ``requires_grad`` and the modules' training flags are restored. Returns the total loss per step.
    """
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            "calibrate_logits needs a model whose get_output_embeddings() is an nn.Linear LM head."
        )
    added = head.bias is None
    if added:
        head.bias = nn.Parameter(
            torch.zeros(head.out_features, dtype=head.weight.dtype, device=head.weight.device)
        )
    params = list(model.parameters())
    iters = {k: itertools.cycle(dl) for k, (dl, _) in data.items()}
    history: list[float] = []
    device = head.weight.device
    with model_state_preserved(model, params):
        model.eval()
        for p in params:
            p.requires_grad_(p is head.bias)
        opt = torch.optim.Adam([head.bias], lr=lr)
        for _ in tqdm(range(steps), desc="calibrate logits", disable=not progress, leave=False):
            total = sum(w * model(**to_device(next(iters[k]), device)).loss for k, (_, w) in data.items())
            opt.zero_grad()
            total.backward()
            opt.step()
            history.append(float(total.detach()))
    head.bias.grad = None
    if added:
        name = _head_bias_name(base, head)
        warnings.warn(
            f"calibrate_logits added an LM-head bias ({name!r}) that {type(base).__name__} does not have: "
            "save_pretrained writes it, but from_pretrained drops it (an unexpected key), so a reloaded model "
            "would lose the calibration. After loading, call hfhooks.load_logit_bias(model, path).",
            stacklevel=2,
        )
    return history


def _head_bias_name(base: nn.Module, head: nn.Module) -> str:
    prefix = next((n for n, m in base.named_modules() if m is head), "lm_head")
    return f"{prefix}.bias"


def load_logit_bias(model: nn.Module, path: str | os.PathLike) -> nn.Parameter:
    """Put the LM-head bias :func:`calibrate_logits` added back into ``model`` after ``from_pretrained(path)``.

    Architectures without an LM-head bias (Llama, GPT-2, …) drop the saved ``lm_head.bias`` when loading; this
    reads it from the checkpoint directory ``path`` (``model.safetensors`` or its sharded index) and installs it,
    so the reloaded logits equal the calibrated ones. Raises ``KeyError`` if the checkpoint holds no such bias
    and ``ValueError`` if the model already has a different one or the shape does not fit.

    Example::

        model = AutoModelForCausalLM.from_pretrained(path)
        hfhooks.load_logit_bias(model, path)
    """
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            "load_logit_bias needs a model whose get_output_embeddings() is an nn.Linear LM head."
        )
    name = _head_bias_name(base, head)
    with Checkpoint(path) as ckpt:
        if name not in ckpt:
            raise KeyError(f"{path} holds no {name!r}: it was not saved from a calibrate_logits model.")
        bias = ckpt.get(name)
    if tuple(bias.shape) != (head.out_features,):
        raise ValueError(
            f"{name} in {path} has shape {tuple(bias.shape)}; the head has {head.out_features} outputs."
        )
    bias = bias.to(device=head.weight.device, dtype=head.weight.dtype)
    if head.bias is not None:
        if not torch.equal(head.bias.detach(), bias):
            raise ValueError(f"{name} of the model differs from the one in {path}; not overwriting it.")
        return head.bias
    head.bias = nn.Parameter(bias, requires_grad=head.weight.requires_grad)
    return head.bias
