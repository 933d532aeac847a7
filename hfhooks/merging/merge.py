""":func:`merge`: one-pass merges of tuned models into a base, streamed tensor by tensor.

From checkpoint directories (sharded or not) the output is written by :func:`hfhooks.io.edit.edit_checkpoint`:
each tensor read, computed (in ``float32``) and written in blocks (:func:`~hfhooks.merging.methods.merge_blocks`),
no diff file, the output published atomically only once complete, and never equal to, inside or holding an
input. Models and ``{name: tensor}`` mappings
work too (the result is then returned as a state dict).

Example:
    >>> import copy, tempfile, torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                num_hidden_layers=2, num_attention_heads=2)
    >>> root = tempfile.mkdtemp()
    >>> base = transformers.LlamaForCausalLM(cfg)
    >>> base.save_pretrained(f"{root}/base")
    >>> tuned = copy.deepcopy(base)
    >>> _ = torch.nn.init.zeros_(tuned.model.norm.weight)
    >>> tuned.save_pretrained(f"{root}/tuned")
    >>> report = merge(f"{root}/base", [f"{root}/tuned"], method="task_arithmetic", lambda_=0.5,
    ...                out=f"{root}/merged", progress=False)
    >>> from hfhooks.io.checkpoints import Checkpoint
    >>> Checkpoint(report.path).get("model.norm.weight")[:3].tolist()
    [0.5, 0.5, 0.5]
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hfhooks.diffs.source import WeightSource, select_names
from hfhooks.io import paths
from hfhooks.io.checkpoints import layer_map, parse_layers
from hfhooks.io.edit import edit_checkpoint, is_edited_checkpoint
from hfhooks.io.safetensors import TensorBlocks
from hfhooks.merging.config import MergeConfig
from hfhooks.merging.methods import Reader, Scratch, merge_blocks, merge_tensors, tensor_reader

__all__ = ["MergeReport", "merge"]


@dataclass
class MergeReport:
    """What :func:`merge` did: the output (a directory, or ``state_dict`` for in-memory inputs), which tensors
    were merged and which were copied from the base (outside ``names`` / ``layers``, or not floating-point)."""

    config: MergeConfig
    merged: list[str]
    copied: list[str]
    path: Path | None = None
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def _layer_names(names: list[str], spec: str) -> list[str]:
    block_path, of = layer_map(names)
    if block_path is None:
        raise ValueError(f"layers={spec!r}: no decoder layers found in the base's tensor names; use names=.")
    chosen = set(parse_layers(spec, 1 + max(i for i in of.values() if i is not None)))
    return [n for n in names if of[n] in chosen]


def plan_names(
    base: WeightSource, tuned: Sequence[WeightSource], config: MergeConfig
) -> tuple[list[str], list[str]]:
    """``(merged, copied)``: the base's floating tensors selected by ``names`` / ``layers``, checked present with
    the same shape in every tuned model, and the rest (copied from the base)."""
    names = list(base.names)
    chosen = select_names(names, config.names) if config.names is not None else names
    if config.layers is not None:
        in_layers = set(_layer_names(names, config.layers))
        chosen = [n for n in chosen if n in in_layers]
        if not chosen:
            raise ValueError(
                f"names={config.names!r} and layers={config.layers!r} select no tensor together."
            )
    merged = [n for n in chosen if base.dtype(n).is_floating_point]
    if not merged:
        raise ValueError("No floating-point tensor to merge (names / layers select only integer buffers).")
    for t, src in enumerate(tuned):
        missing = [n for n in merged if n not in src]
        if missing:
            raise ValueError(
                f"Tuned model {t} ({src.label}) lacks {len(missing)} tensor(s) the base has, e.g. "
                f"{src.unknown(missing[0])} Merge models of the same architecture, or narrow with names= / layers=."
            )
        bad = [n for n in merged if tuple(src.shape(n)) != tuple(base.shape(n))]
        if bad:
            raise ValueError(
                f"Tuned model {t} ({src.label}): {bad[0]!r} has shape {tuple(src.shape(bad[0]))}, the base "
                f"{tuple(base.shape(bad[0]))} ({len(bad)} tensor(s) differ)."
            )
        ints = [n for n in merged if not src.dtype(n).is_floating_point]
        if ints:
            raise ValueError(
                f"Tuned model {t} ({src.label}): {ints[0]!r} is {src.dtype(ints[0])} where the base's is "
                f"{base.dtype(ints[0])} ({len(ints)} tensor(s)); only floating-point weights are merged. Narrow "
                "with names= / layers=, or pass the model it was meant to be."
            )
        extra = [n for n in src.names if n not in base]
        if extra:
            warnings.warn(
                f"Tuned model {t} ({src.label}) has {len(extra)} tensor(s) the base lacks (e.g. {extra[0]!r}); "
                "they are not in the merged model.",
                stacklevel=3,
            )
    keep = set(merged)
    return merged, [n for n in names if n not in keep]


def block_reader(src: WeightSource, name: str) -> Reader:
    """Read tensor ``name`` of ``src`` block by block: from a safetensors checkpoint, ``pread`` of just the
    block's bytes into the source's reused buffer (no file pages mapped, no full-size copy); otherwise views of
    the in-memory tensor."""
    info = src.ckpt.info(name) if src.ckpt is not None else None
    if info is None or info.start is None:  # a model, a state dict or a pickled checkpoint: already in memory
        return tensor_reader(src.get(name))
    size = info.nbytes // max(1, math.prod(info.shape))
    buffer = src.buffer

    def read(lo: int, hi: int) -> torch.Tensor:
        part = dataclasses.replace(
            info, shape=(hi - lo,), start=info.start + lo * size, end=info.start + hi * size
        )
        return buffer.read(part)

    return read


def _path_of(obj: Any) -> str | os.PathLike | None:
    if isinstance(obj, str | os.PathLike):
        return obj
    ckpt = getattr(obj, "path", None)
    return ckpt if isinstance(ckpt, Path) else None


def _write_checkpoint(
    base: WeightSource,
    tuned: Sequence[Any],
    tuned_srcs: list[WeightSource],
    out: str | os.PathLike,
    edits: dict[str, Any],
    cfg: MergeConfig,
    dry_run: bool,
    write: dict[str, Any],
) -> Path:
    """Stream the merged checkpoint into ``out`` with :func:`edit_checkpoint` (never over an input)."""
    # edit_checkpoint reads out=<the base> as "in place": a merge never replaces an input, so refuse it here
    others = [_path_of(t) for t in tuned]
    paths.check_output(
        out,
        [base.ckpt.path, *others],
        overwrite=write["overwrite"],
        same_kind=is_edited_checkpoint,
        kind="checkpoint directory",
    )
    record = {
        "op": "merge",
        "config": cfg.to_dict(),
        "base": base.label,
        "models": [s.label for s in tuned_srcs],
    }
    return edit_checkpoint(
        base.ckpt, out, edits, record=record, desc="merging", inputs=others, dry_run=dry_run, **write
    )


def merge(
    base: Any,
    tuned: Sequence[Any],
    method: str | None = None,
    *,
    config: MergeConfig | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    fsync: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    dry_run: bool = False,
    **options: Any,
) -> MergeReport:
    """Merge ``tuned`` models into ``base`` in one pass; return a :class:`MergeReport`.

    Args:
        base: a checkpoint directory (or ``.safetensors`` file), a :class:`~hfhooks.io.checkpoints.Checkpoint`,
            an ``nn.Module`` or a ``{name: tensor}`` mapping.
        tuned: the fine-tuned models (same kinds, any mix), one task vector ``θ_t − θ_base`` each.
        method: ``"task_arithmetic"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``,
            ``"tall"`` or ``"consensus"`` (a :class:`MergeConfig` field, like every keyword in ``options``:
            ``weights``, ``density``, ``lambda_``, ``normalize``, ``rescale``, ``majority_sign``, ``seed``,
            ``tall_lambda``, ``k``, ``task``, ``names``, ``layers``).
        config: a :class:`MergeConfig` (``method`` and ``options`` replace its fields).
        out: the output checkpoint directory (required when ``base`` is a checkpoint; refused otherwise: the
            merged state dict is returned in ``report.state_dict``). Never an input, inside one or holding one.
        overwrite: replace an existing ``out`` that an earlier hfhooks edit wrote.
        max_shard_size: re-shard the output (default: the base's layout).
        fsync / progress / allow_pickle / dry_run: as :func:`~hfhooks.io.edit.edit_checkpoint`; ``dry_run``
            checks the inputs, names and output path and writes nothing.

    Tensors outside ``names`` / ``layers`` and non-floating tensors are the base's, byte for byte. Each merged
    tensor is computed in ``float32`` (``float64`` for ``float64`` weights) and written in the base's dtype.
    """
    if method is not None:
        options["method"] = method
    cfg = MergeConfig.resolve(config, options, "merge")
    if isinstance(tuned, str | os.PathLike | Mapping) or not isinstance(tuned, Sequence):
        raise TypeError(
            f"tuned must be a list of models or checkpoints, got {type(tuned).__name__}: pass [tuned]."
        )
    if not tuned:
        raise ValueError("Nothing to merge: tuned is empty.")
    base_src = WeightSource(base, allow_pickle=allow_pickle)
    tuned_srcs = [WeightSource(t, allow_pickle=allow_pickle) for t in tuned]
    cfg.check_models(len(tuned_srcs))  # before anything is read
    for what, src in [("The base", base_src), *((f"Tuned model {t}", s) for t, s in enumerate(tuned_srcs))]:
        if src.ckpt is not None and src.ckpt.kind == "adapter":  # its names would merely all be "missing"
            raise ValueError(
                f"{what} ({src.label}) is a PEFT adapter directory, not a checkpoint: merge the adapter "
                "into the base first (peft's merge_and_unload(), or WeightDiff.from_lora(ADAPTER, base=BASE)"
                ".apply(BASE, out=DIR)) and pass that directory."
            )
    merged, copied = plan_names(base_src, tuned_srcs, cfg)

    report = MergeReport(cfg, merged, copied)
    if base_src.streaming:
        if out is None:
            raise ValueError(
                "merge: pass out=<directory> for the merged checkpoint (it never replaces the base)."
            )
        scratch = Scratch()  # block buffers shared by every tensor

        def edit(name: str):
            def blocks(load) -> TensorBlocks:
                # the base is read block by block too: edit_checkpoint's whole-tensor load() is never called
                info = base_src.ckpt.info(name)
                readers = [block_reader(s, name) for s in tuned_srcs]
                out = merge_blocks(
                    block_reader(base_src, name), readers, info.shape, info.dtype, cfg, name, scratch=scratch
                )
                return TensorBlocks(info.dtype, info.shape, out)

            return blocks

        edits = {name: edit(name) for name in merged}
        write = dict(max_shard_size=max_shard_size, overwrite=overwrite, fsync=fsync, progress=progress)
        report.path = _write_checkpoint(base_src, tuned, tuned_srcs, out, edits, cfg, dry_run, write)
        return report
    if out is not None:
        raise ValueError(
            "merge: out= needs a checkpoint directory as base; save the model with save_pretrained() first, or "
            "drop out= to get the merged state dict in report.state_dict."
        )
    if not dry_run:
        state = {name: base_src.get(name).clone() for name in copied}
        for name in merged:
            state[name] = merge_tensors(base_src.get(name), [s.get(name) for s in tuned_srcs], cfg, name)
        report.state_dict = {name: state[name] for name in base_src.names}
    return report
