"""LoRA-aware mask mapping: masks on frozen base weights expressed over the adapter weights that train.

Under LoRA the effective weight is ``W + s·B·A`` and only ``A`` (r × in) and ``B`` (out × r) train. An
*element* mask on ``W`` cannot be enforced through ``A`` and ``B`` — every entry of ``B·A`` depends on whole
rows and columns — and a published unlearning port silently did nothing this way. *Neuron* masks map exactly:

* frozen **rows** of ``W`` (output units) ⇔ the same rows of ``B`` frozen *at zero*: row ``i`` of ``B·A`` is
  ``B[i]·A``, so it stays zero whatever ``A`` does;
* frozen **columns** of ``W`` (input units) ⇔ the same columns of ``A`` frozen at zero.

A freshly initialised adapter has ``B = 0``; its frozen ``A`` columns are zeroed at attach, which leaves the
model's function unchanged because ``B·A = 0``. Adapters that already carry a non-zero delta on the frozen
rows/columns are refused, since freezing them there would not freeze the effective weight.
"""

from __future__ import annotations

import torch
from torch import nn

from hfhooks.masks import ParamMask
from hfhooks.params import ParamIndex

__all__ = ["lora_aware_mask", "lora_layers"]


def lora_layers(model: nn.Module) -> dict[int, nn.Module]:
    """``{id(base layer): PEFT LoRA layer}`` for every LoRA-wrapped module of ``model``."""
    out = {}
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "lora_A"):
            out[id(base)] = module
    return out


def _adapter_params(
    layer: nn.Module, names: dict[int, str]
) -> list[tuple[str, str, nn.Parameter, nn.Parameter]]:
    out = []
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise NotImplementedError(
                "DoRA adapters rescale whole weight columns through a learned magnitude, so a neuron mask on the "
                "base weight cannot be enforced through them. Use plain LoRA, or mask the adapter weights directly."
            )
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        out.append((names[id(a)], names[id(b)], a, b))
    return out


def lora_aware_mask(model: nn.Module | ParamIndex, mask: ParamMask) -> ParamMask:
    """Rewrite entries of ``mask`` that fall on frozen, LoRA-wrapped base weights onto their adapters.

    Entries on trainable parameters are kept. Entries on frozen parameters that no adapter wraps are dropped
    (they cannot move). All-ones entries make the adapter fully trainable; all-zero entries freeze it; row /
    column entries map as described in the module docstring. Partial element masks on a LoRA base weight raise
    ``ValueError`` explaining the alternatives. Without PEFT this returns ``mask`` unchanged.
    """
    index = model if isinstance(model, ParamIndex) else ParamIndex(model)
    mask.validate(index)
    wrapped = lora_layers(index.model)
    frozen_in_mask = [n for n in mask if not index.param(n).requires_grad]
    if not frozen_in_mask:
        return mask
    names = {id(p): n for n, p in index.items()}
    entries: dict[str, torch.Tensor] = {}
    slices: dict[str, tuple[int, torch.Tensor]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    keep = ParamMask({})
    for name in mask:
        info = index.info(name)
        if info.param.requires_grad:
            keep = keep | _only(mask, name)
            continue
        layer = wrapped.get(id(info.module))
        if layer is None or not name.endswith(".weight"):
            continue  # frozen and not adapted: it cannot move, the mask holds trivially
        bits = mask.vector(name)
        gran = mask.granularity(name)
        for a_name, b_name, a, b in _adapter_params(layer, names):
            shapes[a_name], shapes[b_name] = tuple(a.shape), tuple(b.shape)
            if bool(bits.all()) or not bool(bits.any()):
                value = bool(bits.all())
                entries[a_name] = torch.full(a.shape, value)
                entries[b_name] = torch.full(b.shape, value)
                continue
            if gran == "element":
                raise ValueError(
                    f"An element mask on {name!r} (a frozen LoRA base weight) cannot be enforced: LoRA trains "
                    "B·A, which changes every coordinate of the weight. Use a row/column (neuron) mask, which "
                    "maps exactly onto lora_B rows / lora_A columns; or compute the mask over the LoRA "
                    "parameters (compute_saliency(..., params='trainable')); or merge the adapter "
                    "(merge_and_unload) and train the weight itself."
                )
            # nn.Linear weight is (out, in); with fan_in_fan_out (GPT-2 Conv1D) it is (in, out).
            out_axis = 1 if getattr(layer, "fan_in_fan_out", False) else 0
            dropped = (~bits).nonzero().flatten()
            if (gran == "row") == (out_axis == 0):  # frozen output units -> rows of B
                if bool(b.detach()[dropped].ne(0).any()):
                    raise ValueError(
                        f"lora_B rows {dropped.tolist()[:8]}… of {b_name!r} are non-zero, so freezing them would not "
                        f"freeze those output units of {name!r} (lora_A still trains). Apply the mask to a freshly "
                        "initialised adapter (lora_B = 0)."
                    )
                slices[b_name] = (0, (bits).nonzero().flatten())
                entries[a_name] = torch.ones(a.shape, dtype=torch.bool)
            else:  # frozen input units -> columns of A
                with torch.no_grad():
                    if bool((b.detach().float() @ a.detach().float()[:, dropped]).ne(0).any()):
                        raise ValueError(
                            f"The adapter on {name!r} already changes input columns {dropped.tolist()[:8]}…; freezing "
                            "them in lora_A would not freeze the weight. Apply the mask to a freshly initialised "
                            "adapter (lora_B = 0)."
                        )
                    a[:, dropped] = 0  # function-preserving: B·A is zero on these columns
                slices[a_name] = (1, bits.nonzero().flatten())
                entries[b_name] = torch.ones(b.shape, dtype=torch.bool)
    mapped = ParamMask(entries) | ParamMask.from_slices(slices, shapes) if slices else ParamMask(entries)
    result = keep | mapped
    result.metadata = dict(mask.metadata, lora_mapped=True)
    return result


def _only(mask: ParamMask, name: str) -> ParamMask:
    """The single entry ``name`` of ``mask`` as its own mask (granularity preserved)."""
    gran = mask.granularity(name)
    if gran == "element":
        return ParamMask({name: mask[name]})
    return ParamMask.from_slices(
        {name: (0 if gran == "row" else 1, mask.vector(name).nonzero().flatten())}, {name: mask.shape(name)}
    )
