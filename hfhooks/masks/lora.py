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

import importlib.util
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfhooks.core.params import ParamIndex, canonical_name
from hfhooks.masks.mask import ParamMask

__all__ = [
    "adapter_delta_weights",
    "adapter_lora_factors",
    "adapter_module_copies",
    "lora_aware_mask",
    "lora_delta_weights",
    "lora_layers",
    "lora_scaling",
    "lora_unit_mask",
    "lora_unit_saliency",
    "modules_to_save_copies",
]


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
    unreachable: list[str] = []
    for name in mask:
        info = index.info(name)
        if info.param.requires_grad:
            keep = keep | _only(mask, name)
            continue
        layer = wrapped.get(id(info.module))
        if layer is None or not name.endswith(".weight"):
            if bool(mask.vector(name).any()):
                unreachable.append(name)  # it cannot move, so its "may train" coordinates cannot act
            continue
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
    _check_unreachable(index, unreachable, acting=len(result) > 0)
    result.metadata = dict(mask.metadata, lora_mapped=True)
    return result


def _check_unreachable(index: ParamIndex, unreachable: list[str], acting: bool) -> None:
    """Refuse (nothing acts) or warn about (part acts) mask entries that let frozen, non-adapted weights train.

    Such entries typically come from a mask built on the base model before PEFT wrapped it (TRL's
    ``SFTTrainer(peft_config=...)`` wraps after the callbacks were built): their coordinates can never move.
    """
    if not unreachable:
        return
    adapted = sorted(_adapted_weights(index))
    where = f" (LoRA adapts {adapted[:4]}{'…' if len(adapted) > 4 else ''})" if adapted else ""
    count = f"{len(unreachable)} parameter{'s' if len(unreachable) > 1 else ''}"
    msg = (
        f"The mask lets {count} train (e.g. {unreachable[0]!r}) that are frozen under PEFT and wrapped by "
        f"no LoRA adapter{where}, so those entries cannot act. Build the mask on the PeftModel "
        "that trains (with TRL: after SFTTrainer(peft_config=...) wrapped it, from trainer.model), add the "
        "modules to LoraConfig(target_modules=...) or modules_to_save, or train without PEFT."
    )
    if not acting:
        raise ValueError(f"{msg} No entry of the mask reaches a trainable parameter: it would do nothing.")
    warnings.warn(msg, stacklevel=3)


# -- SalUn on a LoRA adapter ------------------------------------------------------------------------------------
def _adapted_weights(index: ParamIndex) -> dict[str, int]:
    """``{canonical base weight name: its output-unit axis}`` for every 2-D weight a linear LoRA adapter wraps."""
    names = {id(p): n for n, p in index.items()}
    out = {}
    for layer in lora_layers(index.model).values():
        weight = getattr(layer.get_base_layer(), "weight", None)
        active = [a for a in layer.active_adapters if a in getattr(layer, "lora_A", {})]
        if weight is not None and weight.dim() == 2 and active and id(weight) in names:
            out[names[id(weight)]] = 1 if getattr(layer, "fan_in_fan_out", False) else 0
    return out


def lora_unit_saliency(
    model: nn.Module, dataloader: Any, loss_fn: Any = None, progress: bool = True
) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency for a LoRA adapter, per output unit of each adapted base weight.

    Scoring the adapter's own weights is degenerate on a fresh adapter: ``lora_B = 0`` makes every ``lora_A``
    gradient exactly zero, so a top-k over them is decided by tie order. Instead the *base* weights ``W`` the
    adapters wrap are scored (``|Σ_b ∇W|``, SalUn's score, at the current weights) and summed per output unit:
    ``{W's name: score per output unit}`` (rows of ``W``; columns for ``fan_in_fan_out`` / GPT-2 ``Conv1D``).
    Output units map exactly onto rows of ``lora_B`` (:func:`lora_unit_mask`). Memory: one fp32 score per
    adapted base weight while scoring.
    """
    from hfhooks.masks.saliency import Scores, compute_saliency

    index = ParamIndex(model)
    adapted = _adapted_weights(index)
    if not adapted:
        raise ValueError("The model has no linear LoRA adapter: score it with compute_saliency(...) instead.")
    scores = compute_saliency(
        model, dataloader, "grad_abs_sum", loss_fn=loss_fn, params=list(adapted), progress=progress
    )
    units = {n: scores[n].sum(dim=1 - axis) for n, axis in adapted.items()}
    return Scores(units, metadata=dict(scores.metadata, granularity="output units of LoRA-adapted weights"))


def lora_unit_mask(model: nn.Module, unit_scores: Mapping[str, torch.Tensor], ratio: float) -> ParamMask:
    """Keep the top ``ratio`` of output units (globally) by :func:`lora_unit_saliency`, expressed over the
    adapter: the kept units' ``lora_B`` rows train, the others stay zero (so those outputs of ``W + s·B·A``
    never change), every ``lora_A`` trains. Trainable non-LoRA parameters (``modules_to_save``) are frozen."""
    index = ParamIndex(model)
    adapted = _adapted_weights(index)
    keep = ParamMask.from_scores(unit_scores, ratio)  # 1-D scores: a top-k over units
    slices = {n: (adapted[n], keep[n].nonzero().flatten()) for n in unit_scores}
    mask = lora_aware_mask(index, ParamMask.from_slices(slices, index))
    mask.metadata.update(getattr(unit_scores, "metadata", {}), unit_ratio=ratio)
    return mask


def _only(mask: ParamMask, name: str) -> ParamMask:
    """The single entry ``name`` of ``mask`` as its own mask (granularity preserved)."""
    gran = mask.granularity(name)
    if gran == "element":
        return ParamMask({name: mask[name]})
    return ParamMask.from_slices(
        {name: (0 if gran == "row" else 1, mask.vector(name).nonzero().flatten())}, {name: mask.shape(name)}
    )


# -- LoRA adapters as weight deltas ----------------------------------------------------------------------------
_DORA = (
    "DoRA adapters rescale weight columns by a learned magnitude, so their effect is not s·B·A; merge the "
    "adapter (merge_and_unload) and diff the merged model against the base instead."
)


def _pattern_key(keys: list[str], module: str) -> str:
    """peft's ``get_pattern_key`` without peft (the rule of current peft releases): the first key that matches
    the end of the module name as a regular expression, at a dot boundary; ``module`` itself if none does."""
    return next((k for k in keys if re.match(rf"(.*\.)?({k})$", module)), module)


def lora_scaling(config: Mapping[str, Any], module: str) -> float:
    r"""PEFT's scaling ``s`` for ``module`` from an adapter config: ``lora_alpha / r`` (``/ √r`` with rsLoRA),
    with ``rank_pattern`` / ``alpha_pattern`` overrides resolved exactly as the installed peft resolves them
    when it loads the adapter (keys are regular expressions, e.g. ``"q_proj|v_proj"``; the first matching key
    wins, in the config's order).

    peft ≥ 0.14 exposes ``peft.utils.other.get_pattern_key`` and looks up the rank and the alpha separately;
    peft 0.13 (the oldest supported) matched ``.*\.{key}$`` over the rank keys followed by the alpha keys and
    used the one winning key for both — reproduced here, since that is how peft 0.13 scales the adapter.
    """
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:  # peft 0.13 has no get_pattern_key; without peft, use the current rule
        get_pattern_key = None if importlib.util.find_spec("peft") is not None else _pattern_key
    if get_pattern_key is not None:
        r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), r)
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), alpha)
    else:  # peft 0.13: one key from both patterns (peft/tuners/lora/model.py, _create_and_replace)
        keys = [*rank_pattern, *alpha_pattern]
        key = next((k for k in keys if re.match(rf".*\.{k}$", module)), module)
        r, alpha = rank_pattern.get(key, r), alpha_pattern.get(key, alpha)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def lora_delta_weights(
    model: nn.Module, adapter: str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{canonical base weight name: (ΔW, base tensor)}`` for every LoRA module of a ``PeftModel``.

    ``ΔW = s·B·A`` per module and adapter (``adapter``: one name; default: the active adapters, summed), with
    the layer's own scaling (rsLoRA and rank/alpha patterns included), transposed for ``fan_in_fan_out``
    (GPT-2's ``Conv1D``) and ``(B·A)ᵀ`` for embeddings; a ``lora_B`` bias adds ``s·bias`` to the base bias.
    A and B are never combined separately. DoRA raises ``NotImplementedError``.
    """
    module_names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    used: set[str] = set()
    layers = lora_layers(model)

    def add(key: str, delta: torch.Tensor, base: torch.Tensor) -> None:
        prev = out.get(key)
        out[key] = ((prev[0] + delta) if prev else delta.contiguous(), base.detach())

    for layer in layers.values():
        for name in [adapter] if adapter is not None else list(layer.active_adapters):
            if name not in getattr(layer, "lora_A", {}) and name not in getattr(
                layer, "lora_embedding_A", {}
            ):
                continue
            if getattr(layer, "use_dora", {}).get(name, False):
                raise NotImplementedError(_DORA)
            used.add(name)
            prefix = canonical_name(module_names[id(layer)])
            base_layer, s = layer.get_base_layer(), layer.scaling[name]
            if name in getattr(layer, "lora_A", {}):
                a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
                if a.dim() != 2:  # convolutions and other layouts: PEFT's own formula
                    delta = layer.get_delta_weight(name).detach().to(dtype)
                else:
                    delta = (b.to(dtype) @ a.to(dtype)) * s
                    delta = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
                bias = getattr(layer.lora_B[name], "bias", None)
                if bias is not None:  # lora_bias=True: the merge adds s·bias to the base bias
                    if getattr(base_layer, "bias", None) is None:
                        raise ValueError(
                            f"{prefix}: the adapter has a lora_B bias (lora_bias=True) but the base layer has no "
                            "bias, so the adapter cannot be expressed as (or merged into) a weight diff."
                        )
                    add(f"{prefix}.bias", bias.detach().to(dtype).cpu() * s, base_layer.bias)
            else:  # nn.Embedding: lora_embedding_A is (r, num_embeddings), lora_embedding_B (dim, r)
                a, b = layer.lora_embedding_A[name].detach(), layer.lora_embedding_B[name].detach()
                delta = (b.to(dtype) @ a.to(dtype)).T * s
            add(f"{prefix}.weight", delta.cpu(), base_layer.weight)
    if adapter is not None and layers and adapter not in used:
        raise ValueError(f"Adapter {adapter!r} is on no LoRA layer of this model.")
    return out


def modules_to_save_copies(
    model: nn.Module, adapter: str | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{canonical name: (original tensor, trainable copy)}`` for PEFT ``modules_to_save`` wrappers."""
    out = {}
    for full, module in model.named_modules():
        if type(module).__name__ != "ModulesToSaveWrapper":
            continue
        name = adapter or module.active_adapter
        name = name[0] if isinstance(name, list | tuple) else name
        if name not in module.modules_to_save:
            continue
        for p_name, p in module.modules_to_save[name].named_parameters():
            orig = module.original_module.get_parameter(p_name)
            out[canonical_name(f"{full}.{p_name}")] = (orig.detach().cpu(), p.detach().cpu())
    return out


def _read_adapter(path: Path) -> tuple[dict[str, Any], Any]:
    from hfhooks.io.checkpoints import Checkpoint, CheckpointError

    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a PEFT adapter directory (no adapter_config.json).")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        found = cfg.get("peft_type") if isinstance(cfg, dict) else cfg
        raise CheckpointError(f"{cfg_file}: not a LoRA adapter config (peft_type={found!r}).")
    if cfg.get("use_dora"):
        raise NotImplementedError(_DORA)
    return cfg, Checkpoint(path)


_LORA_PART = re.compile(
    r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?\.(weight|bias)$"
)
_LORA_EMBEDDING = re.compile(r"^(.*)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")


def _classify(cfg: Mapping[str, Any], stored: str) -> tuple[str, str, str] | None:
    """``(module, part, weight|bias)`` for a LoRA tensor, ``("", module, "copy")`` for a whole replacement
    tensor — a ``modules_to_save`` copy, or a base layer peft saved along (``save_embedding_layers``, e.g. when
    embeddings are targeted) — and ``None`` for anything else."""
    name = canonical_name(stored)
    m = _LORA_PART.match(name)
    if m:
        return m.group(1), m.group(2), m.group(3)
    m = _LORA_EMBEDDING.match(name)
    if m:
        return m.group(1), m.group(2), "weight"
    module = name.rpartition(".")[0]
    saved = cfg.get("modules_to_save") or []
    if ".base_layer." in stored or any(module == k or module.endswith("." + k) for k in saved):
        return "", module, "copy"  # peft's rule for modules_to_save: the module name ends with the key
    return None


def adapter_module_copies(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{canonical name: tensor}`` of the whole tensors a saved LoRA adapter carries besides its LoRA
    matrices: ``modules_to_save`` copies (saved under the original parameter names) and base layers saved with
    the adapter (``…base_layer.weight``, e.g. embeddings). peft loads them over the base's parameters."""
    cfg, ckpt = _read_adapter(Path(path))
    return {
        canonical_name(n): ckpt.get(n)
        for n in ckpt
        if (c := _classify(cfg, n)) is not None and c[2] == "copy"
    }


def adapter_lora_factors(
    path: str | os.PathLike,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]:
    """``{canonical base weight name: (B, A, scaling, transposed)}`` for the linear and embedding modules of a
    saved LoRA adapter, as stored (``ΔW = (B·A)·scaling``, transposed for ``fan_in_fan_out`` and embeddings) —
    the factored form of :func:`adapter_delta_weights`, for diffs that keep an adapter's size."""
    cfg, ckpt = _read_adapter(Path(path))
    modules: dict[str, dict[str, str]] = {}
    for stored in ckpt:
        kind = _classify(cfg, stored)
        if kind is not None and kind[2] == "weight":
            modules.setdefault(kind[0], {})[kind[1]] = stored
    out = {}
    for module, parts in sorted(modules.items()):
        for a_key, b_key, transposed in (
            ("lora_A", "lora_B", bool(cfg.get("fan_in_fan_out"))),
            ("lora_embedding_A", "lora_embedding_B", True),
        ):
            if a_key in parts and b_key in parts:
                a, b = ckpt.get(parts[a_key]), ckpt.get(parts[b_key])
                if a.dim() == 2 and b.dim() == 2:
                    out[f"{module}.weight"] = (b, a, lora_scaling(cfg, module), transposed)
    return out


def adapter_delta_weights(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """``{canonical base weight name: ΔW}`` from a saved LoRA adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``), without building the model. Linear and embedding adapters; a ``lora_B``
    bias (``lora_bias=True``) gives ``s·bias`` on the base bias, as peft's merge adds it.

    ``modules_to_save`` copies are whole replacement tensors, not deltas: they are left to
    :func:`adapter_module_copies` (:meth:`WeightDiff.from_lora <hfhooks.diffs.WeightDiff.from_lora>` diffs them
    against the base). Any other tensor in the adapter is refused (``NotImplementedError``) rather than dropped.
    """
    from hfhooks.io.checkpoints import CheckpointError

    path = Path(path)
    cfg, ckpt = _read_adapter(path)
    modules: dict[str, dict[str, str]] = {}
    for stored in ckpt:
        kind = _classify(cfg, stored)
        if kind is None:
            raise NotImplementedError(
                f"{path}: the adapter holds {stored!r}, which is neither a LoRA matrix, a lora_B bias nor a "
                "modules_to_save copy; hfhooks cannot express it as a weight diff. Load the adapter with peft, "
                "merge it (merge_and_unload) and diff the merged model against the base instead."
            )
        module, part, what = kind
        if what != "copy":
            modules.setdefault(module, {})[part if what == "weight" else part + ".bias"] = stored
    if not modules and not adapter_module_copies(path):
        raise CheckpointError(f"{path}: the adapter holds no lora_A / lora_B tensors.")
    out = {}
    for module, parts in sorted(modules.items()):
        s = lora_scaling(cfg, module)
        if "lora_A" in parts and "lora_B" in parts:
            a, b = ckpt.get(parts["lora_A"]).to(dtype), ckpt.get(parts["lora_B"]).to(dtype)
            if a.dim() != 2 or b.dim() != 2:
                raise NotImplementedError(
                    f"{module}: only linear LoRA adapters can be read from a directory."
                )
            delta = (b @ a) * s
            delta = delta.T if cfg.get("fan_in_fan_out") else delta
        elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
            a, b = (
                ckpt.get(parts["lora_embedding_A"]).to(dtype),
                ckpt.get(parts["lora_embedding_B"]).to(dtype),
            )
            delta = (b @ a).T * s
        else:
            raise CheckpointError(f"{path}: {module} has only one of its two LoRA matrices.")
        out[f"{module}.weight"] = delta.contiguous()
        if "lora_B.bias" in parts:
            out[f"{module}.bias"] = (ckpt.get(parts["lora_B.bias"]).to(dtype) * s).contiguous()
    return out
