"""Structural selectors: the decoder-layer list, MLP hidden units and attention heads of a layer.

Gradient routing, neuron masks and layer restoration all need the same structural facts — which module
list holds the transformer blocks, which rows/columns of which projections make up MLP unit ``j`` or
attention head ``h`` — and every architecture lays them out differently (GPT-2's ``Conv1D`` stores weights
as ``(in, out)``; GPT-NeoX interleaves q/k/v per head; Llama groups KV heads). This module encodes those
facts once. Selections are returned as ``{canonical_name: (axis, indices)}`` slices, which
:meth:`hfhooks.ParamMask.from_slices` turns into row/column masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hfhooks.core.blocks import LayerList, find_layers, layer_of, select_layers
from hfhooks.core.names import unwrap_model
from hfhooks.core.params import ParamIndex

__all__ = [  # LayerList, find_layers, layer_of and select_layers are re-exported from hfhooks.core.blocks
    "LayerList",
    "Slices",
    "attention_head_slices",
    "find_layers",
    "layer_of",
    "mlp_projections",
    "mlp_unit_slices",
    "select_layers",
]

Slices = dict[str, tuple[int, torch.Tensor]]
"""``{canonical parameter name: (axis, LongTensor of indices along that axis)}``."""


# (producers, consumers): producers output the hidden units (Linear rows / Conv1D columns), consumers read
# them (Linear columns / Conv1D rows). Paths are relative to the block.
_MLP_SPECS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),  # Llama, Mistral, Qwen2, Gemma
    (("mlp.c_fc",), ("mlp.c_proj",)),  # GPT-2
    (("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),  # GPT-NeoX, Falcon
    (("intermediate.dense",), ("output.dense",)),  # BERT, RoBERTa
    (("mlp.fc1",), ("mlp.fc2",)),  # Phi
    (("fc1",), ("fc2",)),  # OPT
    (("mlp.fc_in",), ("mlp.fc_out",)),  # GPT-J
    (("mlp.gate_up_proj",), ("mlp.down_proj",)),  # Phi3 (fused gate|up: 2 chunks)
)

# q/k/v/o paths for separate projections; fused layouts are handled below.
_ATTN_SPECS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores weight as (in_features, out_features), the transpose of nn.Linear.
    return type(module).__name__ == "Conv1D"


def _weight(index: ParamIndex, module_path: str) -> tuple[str, nn.Module] | None:
    name = f"{module_path}.weight"
    if name not in index:
        return None
    return name, index.info(name).module


def _units(selection: int | Sequence[int] | torch.Tensor, total: int, what: str) -> torch.Tensor:
    """Indices for "last k" (an int) or an explicit list, validated against ``total``."""
    if isinstance(selection, int):
        if not 0 < selection <= total:
            raise ValueError(f"Cannot select the last {selection} {what}: the layer has {total}.")
        return torch.arange(total - selection, total)
    idx = torch.as_tensor(
        list(selection) if not isinstance(selection, torch.Tensor) else selection, dtype=torch.long
    )
    if idx.numel() == 0:
        raise ValueError(f"Empty selection of {what}.")
    if idx.min() < -total or idx.max() >= total:
        raise ValueError(f"{what} indices {idx.tolist()} out of range for a layer with {total}.")
    return torch.unique(idx % total)


def mlp_projections(model: nn.Module | ParamIndex, layer: int) -> tuple[list[str], list[str]]:
    """Canonical module paths of block ``layer``'s MLP: (producers of the hidden units, consumers of them)."""
    index = model if isinstance(model, ParamIndex) else ParamIndex(model)
    layers = find_layers(index.model)
    prefix = layers.prefix(layer)
    for producers, consumers in _MLP_SPECS:
        paths = [f"{prefix}.{p}" for p in producers], [f"{prefix}.{c}" for c in consumers]
        if all(_weight(index, path) for path in paths[0] + paths[1]):
            return paths
    raise ValueError(
        f"Unrecognised MLP layout in {prefix} ({type(layers.modules[layer]).__name__}). "
        "Known layouts: "
        + "; ".join("+".join(p) + " -> " + "+".join(c) for p, c in _MLP_SPECS)
        + ". Build the slices by hand with ParamMask.from_slices."
    )


def mlp_unit_slices(model: nn.Module | ParamIndex, layer: int, units: int | Sequence[int] = 64) -> Slices:
    """Rows/columns that make up MLP hidden units of block ``layer``.

    ``units`` is the number of *last* units (the SGTM convention) or explicit unit indices. Unit ``j`` is row
    ``j`` of each up/gate projection (and its bias), and column ``j`` of the down projection; GPT-2's
    ``Conv1D`` weights are transposed accordingly, and a fused gate|up projection contributes both halves.
    """
    index = model if isinstance(model, ParamIndex) else ParamIndex(model)
    producers, consumers = mlp_projections(index, layer)
    prod = [_weight(index, p) for p in producers]
    cons = [_weight(index, c) for c in consumers]
    fused = producers[0].endswith("mlp.gate_up_proj")
    name0, mod0 = prod[0]
    width = index.info(name0).shape[1 if _is_conv1d(mod0) else 0] // (2 if fused else 1)
    idx = _units(units, width, "MLP units")
    out: Slices = {}
    for name, mod in prod:
        rows = torch.cat([idx, idx + width]) if fused else idx
        out[name] = (1 if _is_conv1d(mod) else 0, rows)
        bias = name[: -len("weight")] + "bias"
        if bias in index:
            out[bias] = (0, rows)
    for name, mod in cons:
        out[name] = (0 if _is_conv1d(mod) else 1, idx)
    return out


def _head_config(index: ParamIndex) -> tuple[int, int, int | None]:
    cfg = getattr(unwrap_model(index.model), "config", None)
    n_q = getattr(cfg, "num_attention_heads", None)
    if n_q is None:
        raise ValueError("The model has no config.num_attention_heads; pass slices explicitly.")
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    head_dim = getattr(cfg, "head_dim", None)
    return int(n_q), int(n_kv), int(head_dim) if head_dim else None


def _spans(heads: torch.Tensor, size: int, offset: int = 0) -> torch.Tensor:
    return (offset + heads[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def attention_head_slices(
    model: nn.Module | ParamIndex, layer: int, heads: int | Sequence[int] = 1
) -> Slices:
    """Rows of q/k/v (and their biases) and columns of the output projection for attention heads.

    ``heads`` is the number of *last* query heads or explicit query-head indices. Under grouped-query
    attention a key/value head is included only when every query head that reads it is selected (otherwise
    it is shared with heads that stay general-purpose). GPT-2's fused ``c_attn`` and GPT-NeoX's per-head
    interleaved ``query_key_value`` are handled.
    """
    index = model if isinstance(model, ParamIndex) else ParamIndex(model)
    layers = find_layers(index.model)
    prefix = layers.prefix(layer)
    n_q, n_kv, head_dim = _head_config(index)
    q_heads = _units(heads, n_q, "attention heads")
    group = n_q // n_kv
    kv_heads = torch.tensor(
        [
            j
            for j in range(n_kv)
            if all(h in set(q_heads.tolist()) for h in range(j * group, (j + 1) * group))
        ],
        dtype=torch.long,
    )

    def with_bias(out: Slices, name: str, axis: int, idx: torch.Tensor) -> None:
        if idx.numel():
            out[name] = (axis, idx)
            bias = name[: -len("weight")] + "bias"
            if bias in index:
                out[bias] = (0, idx)

    for q, k, v, o in _ATTN_SPECS:
        found = [_weight(index, f"{prefix}.{p}") for p in (q, k, v, o)]
        if any(x is None for x in found):
            continue
        d = head_dim or index.info(found[0][0]).shape[0] // n_q
        out: Slices = {}
        with_bias(out, found[0][0], 0, _spans(q_heads, d))
        with_bias(out, found[1][0], 0, _spans(kv_heads, d))
        with_bias(out, found[2][0], 0, _spans(kv_heads, d))
        out[found[3][0]] = (1, _spans(q_heads, d))
        return out
    fused = _weight(index, f"{prefix}.attn.c_attn")  # GPT-2: Conv1D (H, 3H), columns [q | k | v]
    proj = _weight(index, f"{prefix}.attn.c_proj")
    if fused and proj:
        hidden = index.info(fused[0]).shape[0]
        d = head_dim or hidden // n_q
        cols = torch.cat([_spans(q_heads, d, off) for off in (0, hidden, 2 * hidden)])
        with_bias(out := {}, fused[0], 1 if _is_conv1d(fused[1]) else 0, cols)
        out[proj[0]] = (0 if _is_conv1d(proj[1]) else 1, _spans(q_heads, d))
        return out
    fused = _weight(index, f"{prefix}.attention.query_key_value")  # GPT-NeoX: rows [h: q_h|k_h|v_h]
    proj = _weight(index, f"{prefix}.attention.dense")
    if fused and proj:
        d = head_dim or index.info(fused[0]).shape[0] // (3 * n_q)
        with_bias(out := {}, fused[0], 0, _spans(q_heads, 3 * d))
        out[proj[0]] = (1, _spans(q_heads, d))
        return out
    raise ValueError(
        f"Unrecognised attention layout in {prefix} ({type(layers.modules[layer]).__name__}). Known: separate "
        "q/k/v/o projections (Llama, BERT, OPT, GPT-J), GPT-2 c_attn/c_proj, GPT-NeoX query_key_value/dense. "
        "Build the slices by hand with ParamMask.from_slices."
    )
