"""``LayerRestorationCallback``: restore decoder layers to reference weights at train end and/or at each save."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

from hfhooks.core.blocks import find_layers, layer_of
from hfhooks.core.params import ParamIndex
from hfhooks.diffs.source import WeightSource
from hfhooks.freeze.deepspeed import gathered, require_zero
from hfhooks.io.artifacts import model_fingerprint
from hfhooks.io.paths import save_replacing
from hfhooks.restoration.config import RestorationConfig
from hfhooks.restoration.deepspeed import restore_live, restore_shards
from hfhooks.restoration.restore import RestoreReport, parse_layers, restore_layers
from hfhooks.trainer.guards import fsdp_version, has_dtensors, refuse_unsupported, uses_deepspeed
from hfhooks.trainer.state import CallbackStateError, ResumeFrom, load_state, save_state

__all__ = ["LayerRestorationCallback"]

_OWNER = "LayerRestorationCallback"


def _gathers_16bit(args) -> bool:
    """ZeRO-3's ``stage3_gather_16bit_weights_on_model_save``: whether ``save_model`` writes model files."""
    config = getattr(args, "hf_deepspeed_config", None)
    return bool(config and config.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save"))


class LayerRestorationCallback(TrainerCallback):
    """Selective layer restoration wired into ``Trainer.train()`` (see :func:`hfhooks.restore_layers`).

    Args:
        reference: the weights to restore from — the pre-trained model, its checkpoint directory, or
            ``{name: tensor}``.
        layers: the decoder layers, e.g. ``"4:8"`` or ``range(4, 8)``.
        config: a :class:`~hfhooks.RestorationConfig` with the options below; they may also be given as
            keywords.
        when: ``"train_end"``, ``"save"`` or both (a tuple).
        mode: ``"inplace"`` — at train end the live model is restored (what ``trainer.save_model()`` writes
            afterwards); at a save the checkpoint's weights are replaced atomically (optimizer and trainer
            state are kept, so a resume continues from the restored weights). ``"variant"`` — the trained
            weights are left alone and a restored copy is written next to them: ``<checkpoint>/<variant>/`` at
            each save, ``<output_dir>/<variant>/`` at train end.
        variant: the variant directory's name.
        embeddings, final_norm, lm_head, adapters: as in :func:`hfhooks.restore_layers`.
        resume_from: the checkpoint a resumed run checks its settings against (default: the one the Trainer
            resumes from); ``False`` skips the check.

    Resuming: the config and the reference's identity and layers are saved with every checkpoint and a resumed
    run with other settings, or from a checkpoint without them, raises.

    FSDP2 (``fully_shard``): each rank restores its shards; ``mode="variant"`` gathers the weights to save them;
    in-place checkpoint restores also rewrite ``pytorch_model_fsdp.bin``, what an FSDP run resumes from
    (``state_dict_type="FULL_STATE_DICT"``, the Trainer's default; sharded checkpoints are refused).

    Checkpoint edits stream shard by shard (bounded memory) and run on the processes that save
    (``args.should_save``: the main process, or each node's with ``save_on_each_node``); the live model is
    restored on every process. Each edit's :class:`~hfhooks.restoration.restore.RestoreReport` is kept in
    ``callback.reports``.

    With ``push_to_hub=True`` the Trainer uploads a checkpoint *before* its ``on_save`` event, so the checkpoint
    is restored at ``on_push_begin`` instead, before any file is copied or uploaded. Pushes must carry restored
    weights, so ``push_to_hub=True`` needs ``mode="inplace"`` with ``"train_end"`` in ``when`` (what
    ``trainer.push_to_hub()`` uploads after training is the live model) and, unless ``hub_strategy="end"``,
    ``"save"`` too (the checkpoints pushed during training); other combinations are refused at train start.

    DeepSpeed ZeRO-1/2/3: the live model is restored in the module's parameters and the fp32 master weights, and
    each checkpoint's DeepSpeed shards (``global_step*/``, what a resume loads) are rewritten with the restored
    layers (``mode="inplace"``); the optimizer state is kept. See :mod:`hfhooks.restoration.deepspeed`.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[LayerRestorationCallback("path/to/base", "4:8", when=("save", "train_end"),
                                                              mode="variant")])
    """

    def __init__(
        self,
        reference: Any,
        layers: str | int | slice | Iterable[int],
        *,
        config: RestorationConfig | None = None,
        **options: Any,
    ):
        self.config = c = RestorationConfig.resolve(config, options, _OWNER)
        if isinstance(reference, str | os.PathLike) and not Path(reference).exists():
            raise FileNotFoundError(f"Reference checkpoint {reference} does not exist.")
        self.when = set(c.when)
        self.reference, self.layers, self.mode, self.variant = reference, layers, c.mode, c.variant
        self.options = {"embeddings": c.embeddings, "final_norm": c.final_norm, "lm_head": c.lm_head}
        self.adapters = c.adapters
        self.reports: list[RestoreReport] = []
        self._restored: set[Path] = set()  # checkpoints already edited (at on_push_begin, before on_save)
        self._training = False
        self._zero: int | None = None  # the DeepSpeed ZeRO stage (2 for ZeRO-1/2), None without DeepSpeed
        self._sharded = False  # FSDP2 (set at train begin)
        self.resume_from: ResumeFrom = c.resume_from

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_unsupported(
            args,
            "LayerRestorationCallback",
            model=model,
            fsdp2=True,  # FSDP2: DTensor-aware copies; checkpoint restores: see _check_fsdp2_save
            instead="Train with DDP or a single process, or restore the saved checkpoint afterwards: "
            "hfhooks restore CHECKPOINT BASE --layers 4:8 -o RESTORED.",
            deepspeed=True,  # ZeRO-1/2/3: the masters and DeepSpeed's shards too (hfhooks.restoration.deepspeed)
        )
        self._zero = require_zero(model, _OWNER) if uses_deepspeed(args) else None
        if self._zero is not None and "save" in self.when:
            self._check_zero_saves(args)
        self._sharded = fsdp_version(args, model) == 2 or has_dtensors(model)
        if self._sharded and "save" in self.when:
            self._check_fsdp2_save(args)
        if getattr(args, "push_to_hub", False):
            self._check_push(args)
        saved = load_state(args, state, _OWNER, self.resume_from, config=self.config)  # checks the config
        if saved is not None and json.loads(json.dumps(self._settings())) != saved[1]:
            raise CallbackStateError(
                f"{_OWNER}: the checkpoint was trained with {saved[1]}, this resumed run has {self._settings()}. "
                "Resume with the same reference and layers, or pass resume_from=False."
            )
        self._restored, self._training = set(), True

    def _settings(self) -> dict:
        """What the config does not hold: the reference's identity and the layers."""
        ref = self.reference
        if isinstance(ref, str | os.PathLike):
            ref = str(Path(ref).resolve())
        elif isinstance(ref, torch.nn.Module):
            ref = {"model": model_fingerprint(ref)}
        else:  # {name: tensor}: its names and shapes
            ref = {"tensors": sorted((k, list(v.shape)) for k, v in dict(ref).items())}
        return {"reference": ref, "layers": repr(self.layers)}

    def _check_fsdp2_save(self, args) -> None:
        """Under FSDP2 the Trainer writes each checkpoint's weights twice: ``model.safetensors`` (only with
        ``state_dict_type="FULL_STATE_DICT"``, the Trainer's default) and accelerate's ``pytorch_model_fsdp.bin``
        (``pytorch_model_fsdp_0/``, sharded, otherwise), which is what ``resume_from_checkpoint`` loads."""
        config = getattr(args, "fsdp_config", None) or {}
        default = "FULL_STATE_DICT" if getattr(args, "fsdp", None) else os.environ.get("FSDP_STATE_DICT_TYPE")
        kind = str(config.get("state_dict_type", default or "SHARDED_STATE_DICT")).upper()
        if "FULL_STATE_DICT" not in kind:
            raise RuntimeError(
                f"LayerRestorationCallback(when=...'save'...) under FSDP2 with state_dict_type={kind!r}: the "
                "Trainer then writes no model.safetensors into its checkpoints, only the sharded "
                "pytorch_model_fsdp_0/ (torch.distributed.checkpoint), which this callback does not edit. Pass "
                "TrainingArguments(fsdp_config={..., 'state_dict_type': 'FULL_STATE_DICT'}), or use "
                "when='train_end'."
            )

    def _check_push(self, args) -> None:
        strategy = str(getattr(getattr(args, "hub_strategy", None), "value", args.hub_strategy))
        if strategy != "end" and not hasattr(TrainerCallback, "on_push_begin"):
            raise ValueError(
                "LayerRestorationCallback cannot restore checkpoints before the Trainer pushes them with this "
                "transformers version (no on_push_begin event): use hub_strategy='end', or upgrade transformers."
            )
        needed = {"train_end"} if strategy == "end" else {"train_end", "save"}
        if self.mode != "inplace" or not needed <= self.when:
            raise ValueError(
                f"LayerRestorationCallback(mode={self.mode!r}, when={tuple(sorted(self.when))}) with "
                f"push_to_hub=True (hub_strategy={strategy!r}) would upload unrestored weights: "
                + (
                    "mode='variant' keeps the trained weights as the model the Trainer pushes. "
                    if self.mode != "inplace"
                    else "the Trainer pushes the live model at trainer.push_to_hub() and, unless "
                    "hub_strategy='end', each checkpoint as it is saved. "
                )
                + f"Use mode='inplace', when={tuple(sorted(needed))}, or push_to_hub=False and upload the "
                "restored directory yourself (huggingface_hub.upload_folder)."
            )

    def _check_zero_saves(self, args) -> None:
        """DeepSpeed: refuse checkpoint restorations that could not reach every copy of the weights."""
        if self.mode == "variant" and self._zero == 3 and not _gathers_16bit(args):
            raise ValueError(
                "LayerRestorationCallback(mode='variant', when='save') under ZeRO-3 needs the checkpoint's model "
                "files, which the Trainer writes only with zero_optimization.stage3_gather_16bit_weights_on_model_save"
                "=true (else it saves DeepSpeed's partitioned shards alone). Set it in the DeepSpeed config, or "
                "use when='train_end'."
            )
        strategy = str(
            getattr(getattr(args, "hub_strategy", None), "value", getattr(args, "hub_strategy", ""))
        )
        if getattr(args, "push_to_hub", False) and strategy in ("checkpoint", "all_checkpoints"):
            raise ValueError(
                f"LayerRestorationCallback under DeepSpeed with push_to_hub=True and hub_strategy={strategy!r}: the "
                "Trainer uploads the checkpoint folder, DeepSpeed's shards included, before on_save, where only the "
                "main process runs, while the shards are restored at on_save by every rank. Use "
                "hub_strategy='every_save' or 'end' (model files only, restored before the upload)."
            )

    def _touchable(self, model) -> dict[str, torch.nn.Parameter]:
        """The parameters restoration may touch: those of the chosen layers, and the non-layer ones if
        embeddings / final_norm / lm_head are asked for."""
        index, blocks = ParamIndex(model), find_layers(model)
        chosen = set(parse_layers(self.layers, len(blocks)))
        extra = any(self.options.values())
        return {
            n: p
            for n, p in index.items()
            if layer_of(n, blocks) in chosen or (extra and layer_of(n, blocks) is None)
        }

    def _checkpoint(self, args, state) -> Path:
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"

    def on_push_begin(self, args, state, control, **kwargs):
        # Trainer._save_checkpoint pushes (_push_from_checkpoint) before it calls on_save: restore the checkpoint
        # now so that the files copied and uploaded are the restored ones. Only the main process pushes.
        if "save" not in self.when or not args.should_save or not self._training:
            return  # trainer.push_to_hub() after training: on_train_end already restored the live model
        ckpt = self._checkpoint(args, state)
        if ckpt.is_dir() and ckpt.resolve() not in self._restored and self._has_model_files(ckpt):
            self._restore_checkpoint(ckpt)

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        if "save" in self.when:
            ckpt = self._checkpoint(args, state)
            if args.should_save and not ckpt.is_dir():
                warnings.warn(
                    f"LayerRestorationCallback: {ckpt} was not found; nothing restored.", stacklevel=2
                )
            elif args.should_save and ckpt.resolve() not in self._restored and self._has_model_files(ckpt):
                self._restore_checkpoint(ckpt)
            if self._zero is not None and self.mode == "inplace" and self._saves_shards(args):
                # DeepSpeed's own shards are what a resumed run loads (collective: every rank)
                restore_shards(ckpt, model, optimizer, self.reference, self.layers,
                               self._touchable(model), self.options, main=args.should_save)  # fmt: skip
        # after an in-place edit of the checkpoint
        save_state(args, state, _OWNER, meta=self._settings(), config=self.config)

    def _saves_shards(self, args) -> bool:
        """Whether the Trainer writes DeepSpeed's shards (global_step*/) into checkpoints: unless
        save_only_model=True — but ZeRO-3 without stage3_gather_16bit_weights_on_model_save writes them even then,
        in place of the model files. Read from the arguments, so every rank decides alike (a collective follows)."""
        return not args.save_only_model or (self._zero == 3 and not _gathers_16bit(args))

    def _has_model_files(self, ckpt: Path) -> bool:
        """Under ZeRO-3 without stage3_gather_16bit_weights_on_model_save the Trainer writes DeepSpeed's shards
        alone (no model files; they are restored by restore_shards); otherwise the model files must be there."""
        if self._zero != 3:
            return True
        return any((ckpt / f).is_file() for f in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME))

    def _restore_checkpoint(self, ckpt: Path) -> None:
        out = ckpt if self.mode == "inplace" else ckpt / self.variant
        report = restore_layers(
            ckpt,
            self.reference,
            self.layers,
            out=out,
            overwrite=True,
            allow_inside_source=self.mode == "variant",  # <checkpoint>/<variant>/ lives inside the checkpoint
            adapters=self.adapters,
            progress=False,
            **self.options,
        )
        if self._sharded and self.mode == "inplace":
            _restore_fsdp_file(ckpt, self.reference, report.restored)
        self._restored.add(ckpt.resolve())
        self.reports.append(report)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._training = False
        if "train_end" not in self.when or model is None:
            return
        if self.mode == "inplace":
            if self._zero is not None:  # the module's weights and the fp32 masters (ZeRO-3: gathered)
                report = restore_live(model, self.reference, self.layers, self._touchable(model), self.adapters,
                                      self.options)  # fmt: skip
            else:
                report = restore_layers(
                    model, self.reference, self.layers, adapters=self.adapters, **self.options
                )
            self.reports.append(report)
            return
        # variant: restore, save a copy, then put the trained weights back (only what restoration touches).
        # Under ZeRO-3 the whole model is gathered meanwhile, as save_model does with
        # stage3_gather_16bit_weights_on_model_save; the masters are not touched.
        with gathered(model.parameters() if self._zero == 3 else ()):
            self.reports.append(self._save_variant(args, model))

    def _save_variant(self, args, model) -> RestoreReport:
        index = ParamIndex(model)
        before = {n: p.detach().clone() for n, p in self._touchable(model).items()}
        report = restore_layers(model, self.reference, self.layers, adapters="zero", **self.options)
        try:
            out = Path(args.output_dir) / self.variant
            if self._sharded:  # every rank gathers its shards (a collective); the saving ones write
                if _save_gathered(model, out, args):
                    report.path = out
            elif args.should_save:
                model.save_pretrained(out)
                report.path = out
        finally:
            with torch.no_grad():
                for n, value in before.items():
                    index.param(n).copy_(value)
        return report


def _save_gathered(model: torch.nn.Module, out: Path, args) -> bool:
    """Save a sharded (FSDP2) model's full weights to ``out``; call on every rank. True where it was written."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # gathered to CPU on rank 0 only, unless each node's main process saves (save_on_each_node)
    on_rank0 = not getattr(args, "save_on_each_node", False)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_rank0))
    if not args.should_save:
        return False
    model.save_pretrained(out, state_dict=state)
    return True


FSDP_FULL_FILE = "pytorch_model_fsdp.bin"  # accelerate's FSDP_MODEL_NAME: what an FSDP run resumes from


def _restore_fsdp_file(ckpt: Path, reference: Any, names: list[str]) -> None:
    """Restore ``names`` in the checkpoint's ``pytorch_model_fsdp.bin`` too, atomically.

    Under FSDP (``state_dict_type="FULL_STATE_DICT"``) ``resume_from_checkpoint`` loads this full state dict
    (accelerate's ``load_fsdp_model``), not ``model.safetensors``: restoring only the latter would let a resumed
    run continue from the unrestored layers. The file is a ``torch.save``-d dict; tensors are written in place
    in a copy-on-write memory map, so tied weights (one storage) follow, and the new file replaces the old one
    only once fully written.
    """
    path = ckpt / FSDP_FULL_FILE
    if not path.is_file():
        raise RuntimeError(
            f"LayerRestorationCallback: {ckpt} has no {FSDP_FULL_FILE}, the file an FSDP run resumes from, so "
            "a resumed run would load unrestored layers. Save with TrainingArguments(fsdp_config={..., "
            "'state_dict_type': 'FULL_STATE_DICT'}), or use mode='variant'."
        )
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    missing = [n for n in names if n not in state]
    if missing:
        raise RuntimeError(
            f"LayerRestorationCallback: {path} lacks {len(missing)} restored tensor(s), e.g. {missing[0]!r}: "
            "it was not written from this model; nothing in it was changed."
        )
    source = WeightSource(reference)
    with torch.no_grad():
        for n in names:
            state[n].copy_(source.get(n).to(state[n].dtype))
    save_replacing(path, state)
