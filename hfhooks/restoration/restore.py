"""Selective layer restoration (SLR): put decoder layers ``[s, e)`` back to reference weights, and choose them.

Post-training narrows a model's outputs (mode collapse). Restoring a contiguous range of decoder layers of the
post-trained model to the pre-trained weights recovers diversity at little quality cost, with no training and
no inference overhead. Embeddings, the final norm and the LM head stay post-trained unless asked (chat tokens
live there), and tied input/output embeddings are never overwritten by accident.

* :func:`restore_layers` edits an in-memory model (a ``PeftModel`` too: the adapters of those layers are
  zeroed or dropped) or streams a checkpoint directory into a restored copy (bounded memory, atomic).
* :func:`~hfhooks.restoration.search.search_restoration` (in :mod:`hfhooks.restoration.search`) chooses the
  range with the Constrained-Random-Character (CRC) proxy.

Example:
    >>> import copy, torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                num_hidden_layers=4, num_attention_heads=2)
    >>> base = transformers.LlamaForCausalLM(cfg)
    >>> post = copy.deepcopy(base)
    >>> with torch.no_grad():
    ...     _ = [p.add_(0.1) for p in post.parameters()]
    >>> report = restore_layers(post, base, "1:3")
    >>> report.layers, torch.equal(post.model.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)
    ([1, 2], True)
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfhooks.core.blocks import find_layers
from hfhooks.core.names import canonical_name, match_name, unwrap_model
from hfhooks.core.params import ParamIndex, UnknownParameterError, copy_full_
from hfhooks.diffs.source import WeightSource
from hfhooks.io.checkpoints import Checkpoint, layer_map, parse_layers
from hfhooks.io.edit import edit_checkpoint

__all__ = ["RestoreReport", "parse_layers", "restore_layers"]

_LM_HEAD = re.compile(r"^(lm_head|embed_out|output|score|classifier)\.")
_EMBED = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings|embeddings|embed_positions)(\.|$)")
_FINAL_NORM = re.compile(r"(^|\.)(norm|ln_f|final_layer_norm|final_layernorm|norm_f|final_norm)\.")


def _category(name: str, layer: int | None) -> str:
    """``layer`` | ``lm_head`` | ``embeddings`` | ``final_norm`` | ``other`` for a canonical name."""
    if layer is not None:
        return "layer"
    if _LM_HEAD.search(name):
        return "lm_head"
    if _EMBED.search(name):
        return "embeddings"
    if _FINAL_NORM.search(name):
        return "final_norm"
    return "other"


@dataclass
class RestoreReport:
    """What :func:`restore_layers` did."""

    layers: list[int]
    restored: list[str]  # canonical names set to the reference
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA module -> "zeroed" | "dropped"
    path: Path | None = None  # the output directory, for checkpoints

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (
            f"RestoreReport(layers={self.layers}, {len(self.restored)} tensors restored, "
            f"{len(self.adapters)} adapters{where})"
        )


def restore_layers(
    target: nn.Module | str | os.PathLike,
    reference: Any,
    layers: str | int | slice | Iterable[int],
    *,
    embeddings: bool = False,
    final_norm: bool = False,
    lm_head: bool = False,
    include: str | Iterable[str] = (),
    adapters: str = "zero",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    fsync: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    allow_inside_source: bool = False,
    dry_run: bool = False,
) -> RestoreReport:
    """Set decoder ``layers`` of ``target`` to ``reference``'s weights.

    Args:
        target: a model (edited in place; wrapped or PEFT models too) or a checkpoint directory (a full model,
            or a PEFT adapter directory, whose adapters of those layers are zeroed / dropped).
        reference: the weights to restore from: a model, a checkpoint directory, or ``{name: tensor}``.
        layers: ``"4:8"``, ``range(4, 8)``, ``[4, 5, 6, 7]``…
        embeddings, final_norm, lm_head: also restore these (default: keep them post-trained). Tied input and
            output embeddings must be restored together or not at all.
        include: extra parameter names / globs / ``re:`` patterns to restore.
        adapters: for LoRA layers inside the range: ``"zero"`` (``lora_B = 0``: the adapter stays, with no
            effect, and save/load round-trips) or ``"drop"`` (unwrap the module / omit its tensors).
        out: for a checkpoint target, the output directory (``out=target`` edits it in place, atomically). It
            may not equal, contain or lie inside ``reference`` or (unless ``allow_inside_source``) ``target``; an
            existing one is replaced only with ``overwrite`` and only if an earlier hfhooks edit wrote it.
        allow_inside_source: let ``out`` be a subdirectory of the target checkpoint (see
            :func:`~hfhooks.io.edit.edit_checkpoint`).
        dry_run: for a checkpoint target, check everything (layers, tied weights, reference names and shapes,
            the output path) and return the report of what would be restored, writing nothing.
    """
    if adapters not in ("zero", "drop"):
        raise ValueError(f"adapters={adapters!r}: use 'zero' or 'drop'.")
    flags = {"embeddings": embeddings, "final_norm": final_norm, "lm_head": lm_head}
    include = [include] if isinstance(include, str) else list(include)
    if isinstance(target, nn.Module):
        if dry_run:
            raise ValueError("dry_run=True applies to checkpoint directories; a model is edited in memory.")
        return _restore_model(target, reference, layers, flags, include, adapters, allow_pickle)
    if out is None:
        raise ValueError(
            "Restoring a checkpoint needs out= (a new directory; out=<the checkpoint> edits in place)."
        )
    return _restore_checkpoint(
        Path(target),
        reference,
        layers,
        flags,
        include,
        adapters,
        Path(out),
        dict(
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            fsync=fsync,
            progress=progress,
            allow_inside_source=allow_inside_source,
            dry_run=dry_run,
        ),
        allow_pickle,
    )


def _wanted(
    names: Iterable[str],
    of: Mapping[str, int | None],
    chosen: set[int],
    flags: Mapping[str, bool],
    include: Sequence[str],
) -> list[str]:
    out = []
    for n in names:
        canon = canonical_name(n)
        cat = _category(canon, of[n])
        if (
            (cat == "layer" and of[n] in chosen)
            or flags.get(cat, False)
            or any(match_name(p, canon) for p in include)
        ):
            out.append(n)
    for pat in include:
        if not any(match_name(pat, canonical_name(n)) for n in names):
            raise UnknownParameterError(f"include pattern {pat!r} matches no parameter.")
    return out


def _check_tied(flags: Mapping[str, bool], tied: bool) -> None:
    if tied and flags["embeddings"] != flags["lm_head"]:
        raise ValueError(
            "The input embeddings and the LM head are tied (one tensor): restoring one restores the other. Pass "
            "embeddings=True and lm_head=True together (CLI: --embeddings --lm-head), or neither."
        )


def _restore_model(
    model: nn.Module,
    reference: Any,
    layers: Any,
    flags: Mapping[str, bool],
    include: Sequence[str],
    adapters: str,
    allow_pickle: bool,
) -> RestoreReport:
    from hfhooks.masks.lora import lora_layers

    index = ParamIndex(model)
    blocks = find_layers(model)
    chosen = parse_layers(layers, len(blocks))
    base = unwrap_model(model)
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    in_emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    tied = (
        out_emb is not None
        and in_emb is not None
        and getattr(out_emb, "weight", None) is getattr(in_emb, "weight", object())
    )
    _check_tied(flags, tied)
    of = {}
    prefix = blocks.path + "."
    for n in index.names():
        head = n[len(prefix) :].split(".", 1)[0] if n.startswith(prefix) else ""
        of[n] = int(head) if head.isdigit() else None
    lora_parts = re.compile(
        r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)"
    )
    names = [n for n in index.names() if not lora_parts.search(n)]
    wanted = _wanted(names, of, set(chosen), flags, include)
    ref = WeightSource(reference, allow_pickle)
    missing = [n for n in wanted if n not in ref]
    if missing:
        raise UnknownParameterError(
            f"The reference lacks {len(missing)} tensor(s) to restore: {ref.unknown(missing[0])}"
        )
    for n in wanted:
        if ref.shape(n) != tuple(index.info(n).shape):
            raise ValueError(
                f"Shape mismatch for {n!r}: target {tuple(index.info(n).shape)}, reference {ref.shape(n)}."
            )
    module_names = {id(m): canonical_name(k) for k, m in model.named_modules()}
    in_range = [
        (module_names[id(layer)], layer)
        for layer in lora_layers(model).values()
        if _layer_from(module_names[id(layer)], blocks.path) in set(chosen)
    ]
    if adapters == "zero":  # refuse before anything is modified: a half-restored model is worse than none
        dora = [name for name, layer in in_range if len(getattr(layer, "lora_magnitude_vector", None) or {})]
        if dora:
            raise NotImplementedError(
                f"{dora[0]} (and {len(dora) - 1} more) is a DoRA layer: zeroing lora_B does not remove its "
                "magnitude rescaling, so the layer would not be restored. Use adapters='drop' (unwraps the "
                "adapter), or merge_and_unload() the model first. Nothing was modified."
            )
    with torch.no_grad():
        for n in wanted:
            copy_full_(index.param(n), ref.get(n))  # a sharded (FSDP2) parameter: this rank's slice
    report = RestoreReport(chosen, wanted)
    for name, layer in in_range:
        if adapters == "zero":
            with torch.no_grad():
                for key in ("lora_B", "lora_embedding_B"):
                    for sub in getattr(layer, key, {}).values():
                        for p in sub.parameters() if isinstance(sub, nn.Module) else [sub]:
                            p.zero_()
            report.adapters[name] = "zeroed"
        else:
            _unwrap_lora(model, layer)
            report.adapters[name] = "dropped"
    if report.adapters and adapters == "drop":
        _exclude_from_config(model, list(report.adapters))
    return report


def _layer_from(name: str, path: str) -> int | None:
    if not name.startswith(path + "."):
        return None
    head = name[len(path) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _unwrap_lora(model: nn.Module, layer: nn.Module) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is layer:
                setattr(parent, child_name, layer.get_base_layer())
                return


def _exclude_from_config(model: nn.Module, modules: list[str]) -> None:
    """Record dropped modules in the PEFT config's ``exclude_modules`` so a save/load does not re-create them."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    for cfg in configs.values():
        if hasattr(cfg, "exclude_modules"):
            current = cfg.exclude_modules
            current = [current] if isinstance(current, str) else list(current or [])
            cfg.exclude_modules = sorted(set(current) | set(modules))
        else:  # peft < 0.14
            warnings.warn(
                "This peft version has no LoraConfig.exclude_modules (peft ≥ 0.14): the dropped adapters are gone "
                "from this model, but a save_pretrained / from_pretrained round trip re-creates them freshly "
                "initialised (lora_B = 0, so without effect). Upgrade peft to make the drop persistent, or use "
                "adapters='zero'.",
                stacklevel=3,
            )


def _restore_checkpoint(
    path: Path,
    reference: Any,
    layers: Any,
    flags: Mapping[str, bool],
    include: Sequence[str],
    adapters: str,
    out: Path,
    write: dict[str, Any],
    allow_pickle: bool,
) -> RestoreReport:
    ckpt = Checkpoint(path, allow_pickle=allow_pickle)
    # the reference is read too: the output may not equal, contain or lie inside it either
    write = {**write, "inputs": [reference] if isinstance(reference, str | os.PathLike) else []}
    block_path, of = layer_map(ckpt.keys())
    if block_path is None:
        raise ValueError(f"{path}: cannot find decoder layers in the tensor names (e.g. {ckpt.keys()[0]!r}).")
    n_layers = 1 + max(i for i in of.values() if i is not None)
    chosen = parse_layers(layers, n_layers)
    record = {"op": "restore_layers", "layers": chosen, "reference": _label(reference), **dict(flags)}
    if ckpt.kind == "adapter":
        targets = [n for n in ckpt if of[n] in set(chosen)]
        b_parts = [n for n in targets if re.search(r"\.lora_(embedding_)?B(\.|$)", canonical_name(n))]
        report = RestoreReport(
            chosen, [], {canonical_name(n).rsplit(".lora_", 1)[0]: "zeroed" for n in b_parts}
        )
        if adapters == "drop":
            report.adapters = {k: "dropped" for k in report.adapters}
            report.path = edit_checkpoint(
                ckpt, out, {}, drop=targets, record={**record, "adapters": "drop"}, **write
            )
        else:
            edits = {n: (lambda load: torch.zeros_like(load())) for n in b_parts}
            report.path = edit_checkpoint(ckpt, out, edits, record={**record, "adapters": "zero"}, **write)
        return report
    cfg = ckpt.config or {}
    lm_arch = any(
        re.search(r"(CausalLM|LMHead|ConditionalGeneration)", a) for a in cfg.get("architectures") or []
    )
    # config.json omits keys equal to PretrainedConfig's defaults (transformers < 5 does; GPT-2 ties this way):
    # a missing tie_word_embeddings means the default, True
    tied = bool(cfg.get("tie_word_embeddings", True)) and lm_arch
    _check_tied(flags, tied)
    wanted = _wanted(ckpt.keys(), of, set(chosen), flags, include)
    ref = WeightSource(reference, allow_pickle)
    missing = [n for n in wanted if n not in ref]
    if missing:
        raise UnknownParameterError(
            f"The reference lacks {len(missing)} tensor(s) to restore: {ref.unknown(missing[0])}"
        )
    edits = {}
    for n in wanted:
        info = ckpt.info(n)
        if ref.shape(n) != info.shape:
            raise ValueError(f"Shape mismatch for {n!r}: target {info.shape}, reference {ref.shape(n)}.")
        ref_info = ref.ckpt.info(n) if ref.ckpt is not None and ref.ckpt.kind != "pickle" else None
        if ref_info is not None and ref_info.dtype == info.dtype:
            edits[n] = lambda load, ref_info=ref_info: ref_info  # byte copy from the reference file
        else:
            edits[n] = lambda load, n=n, dtype=info.dtype: ref.get(n).to(dtype).contiguous()
    report = RestoreReport(chosen, wanted)
    report.path = edit_checkpoint(ckpt, out, edits, record=record, **write, desc="restore")
    return report


def _label(obj: Any) -> str:
    if isinstance(obj, str | os.PathLike):
        return str(obj)
    if isinstance(obj, Checkpoint):
        return str(obj.path)
    return type(obj).__name__
