"""Layer restoration under DeepSpeed ZeRO-1/2/3: restore the weights where DeepSpeed keeps them.

Under ZeRO a weight lives in the module's parameter (ZeRO-3: partitioned across ranks), in the fp32 master the
optimizer steps (partitioned in every stage) and, once saved, in DeepSpeed's own checkpoint shards
(``<checkpoint>/global_step*/``), which are what ``resume_from_checkpoint`` loads — not the ``model.safetensors``
the Trainer writes next to them. So:

* the live model (:func:`restore_live`) is restored in the module's parameters (ZeRO-3: gathered, rank 0's write
  kept) *and* in the fp32 masters, so that a later ``save_model`` / ``save_checkpoint`` or further training
  starts from the restored weights. The optimizer state (Adam moments) is kept, as without DeepSpeed, where
  the torch optimizer's state is not touched either;
* a checkpoint (:func:`restore_shards`) has its DeepSpeed shards rewritten: each rank writes its ZeRO
  optimizer's ``state_dict()`` taken while its masters hold the restored values (then puts the trained masters
  back), and the main process rewrites the restored tensors of the module-states file (ZeRO-1/2; ZeRO-3 loads
  the module from the masters). Each file is replaced atomically (``hfhooks.io.paths.save_replacing``: a
  temporary file, then a rename); the optimizer state in them is the saved one (kept, as the checkpoint's
  ``optimizer.pt`` is without DeepSpeed).

Verified with deepspeed 0.19.8 (the shard names and the ``optimizer_state_dict`` / ``module`` keys are those of
``DeepSpeedEngine.save_checkpoint``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfhooks.core.names import canonical_name
from hfhooks.core.params import ParamIndex
from hfhooks.diffs.source import WeightSource
from hfhooks.freeze import deepspeed as ds
from hfhooks.io.paths import save_replacing
from hfhooks.restoration.restore import RestoreReport, restore_layers

__all__ = ["restore_live", "restore_shards"]

_LORA_B = re.compile(r"\.lora_(embedding_)?B\.")


def _targets(
    index: ParamIndex, report: RestoreReport, names: Iterable[str], reference: Any
) -> dict[str, Any]:
    """``{name: full fp32 value}`` of every master restoration sets: the restored tensors (the reference, in
    fp32) and the zeroed LoRA ``B`` matrices of the restored layers."""
    ref = WeightSource(reference)
    out: dict[str, Any] = {n: ref.get(n).float().clone() for n in report.restored}
    if any(v == "zeroed" for v in report.adapters.values()):
        for n in names:
            if _LORA_B.search(n):
                out[n] = torch.zeros(ds.full_shape(index.param(n)), dtype=torch.float32)
    return out


def restore_live(
    model: nn.Module,
    reference: Any,
    layers: Any,
    names: Iterable[str],
    adapters: str,
    options: Mapping[str, bool],
) -> RestoreReport:
    """Restore ``layers`` of a DeepSpeed-managed ``model`` in its parameters and fp32 masters (collective:
    every rank runs it). ``names``: the parameters restoration may touch (those of the chosen layers, and the
    non-layer ones when ``options`` ask for them); only they are gathered under ZeRO-3."""
    index = ParamIndex(model)
    names = list(names)
    with ds.gathered([index.param(n) for n in names], modify=True):
        report = restore_layers(model, reference, layers, adapters=adapters, **options)
    for n, value in _targets(index, report, names, reference).items():
        ds.set_full_master(index.param(n), value.reshape(ds.full_shape(index.param(n))))
    return report


def _shard_dir(ckpt: Path) -> Path:
    latest = ckpt / "latest"
    if not latest.is_file():
        raise FileNotFoundError(
            f"{ckpt} has no DeepSpeed 'latest' file: DeepSpeed's checkpoint shards (what resume_from_checkpoint "
            "loads) were not saved there (save_only_model=True?), so they cannot be restored. Nothing else is "
            "affected: the model files are restored."
        )
    return ckpt / latest.read_text().strip()


def restore_shards(
    ckpt: Path,
    model: nn.Module,
    optimizer: Any,
    reference: Any,
    layers: Any,
    names: Iterable[str],
    options: Mapping[str, bool],
    main: bool,
) -> list[Path]:
    """Rewrite DeepSpeed's checkpoint shards in ``ckpt`` so that a resumed run loads the restored ``layers``,
    leaving the live model as it was (collective: every rank runs it; ``main``: this process also rewrites the
    module-states file). Returns the files this rank rewrote. ``optimizer``: the Trainer's (accelerate's
    wrapper of DeepSpeed's ZeRO optimizer); ``names`` and ``options`` as in :func:`restore_live`.

    The live weights are restored (:func:`restore_live`), the shards written from them, and the trained weights
    put back, bit for bit, in the module and the masters. LoRA adapters of the restored layers are zeroed.
    Memory: the restored tensors are held about three times on every rank meanwhile (the trained module values,
    the trained masters in fp32, the reference in fp32).
    """
    zero = ds.zero_optimizer(optimizer)
    if zero is None:
        raise RuntimeError(
            f"No DeepSpeed ZeRO optimizer in {type(optimizer).__name__}: cannot rewrite its shards."
        )
    shard_dir = _shard_dir(ckpt)
    index, names = ParamIndex(model), list(names)
    params = [index.param(n) for n in names]
    with ds.gathered(params):
        module = {n: p.detach().clone() for n, p in zip(names, params)}
    masters = {n: ds.full_master(p) for n, p in zip(names, params)}  # collective reads
    rank = torch.distributed.get_rank(group=getattr(zero, "dp_process_group", None))
    written: list[Path] = []
    try:
        report = restore_live(model, reference, layers, names, "zero", options)
        for path in sorted(shard_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt")):
            saved = torch.load(path, map_location="cpu", weights_only=False)
            saved["optimizer_state_dict"] = zero.state_dict()  # the restored masters, the saved moments
            save_replacing(path, saved)
            written.append(path)
        if not written:
            raise FileNotFoundError(
                f"{shard_dir}: no optimizer-state shard of rank {rank} (*zero_pp_rank_{rank}_*_optim_states.pt)."
            )
        if main:
            written += _rewrite_module_states(shard_dir, index, report, names)
    finally:  # the run goes on with its trained weights
        with ds.gathered(params, modify=True), torch.no_grad():
            for n, p in zip(names, params):
                p.copy_(module[n])
        for n, p in zip(names, params):
            if masters[n] is not None:
                ds.set_full_master(p, masters[n])
    return written


def _rewrite_module_states(
    shard_dir: Path, index: ParamIndex, report: RestoreReport, names: list[str]
) -> list[Path]:
    """ZeRO-1/2: put the restored tensors (the live module's, restored) into ``mp_rank_*_model_states.pt``,
    which DeepSpeed loads into the module on resume. ZeRO-3's module-states files hold no weights (the module
    is loaded from the masters): entries whose shape is not the tensor's are left alone."""
    changed = set(report.restored) | {n for n in names if _LORA_B.search(n)}
    written = []
    for path in sorted(shard_dir.glob("mp_rank_*_model_states.pt")):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        module = saved.get("module") or {}
        hits = 0
        for key in list(module):
            name = canonical_name(key)
            if name not in changed:
                continue
            live = index.param(name).detach()
            if tuple(module[key].shape) == tuple(live.shape):
                module[key] = live.to(dtype=module[key].dtype, device="cpu").clone()
                hits += 1
        if hits:
            save_replacing(path, saved)
            written.append(path)
    return written
