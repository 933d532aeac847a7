"""Callback state saved with every Trainer checkpoint and restored on ``resume_from_checkpoint``.

A callback that computes something at train start (a saliency mask, NPO's reference log-probabilities, a
dedicated mask) must not compute it again at the *resumed* weights: the resumed run would then train another
mask than the one the checkpoint was trained with. So each hfhooks callback writes its state at ``on_save``
as stamped safetensors artifacts (:func:`hfhooks.io.artifacts.write_artifact`, :meth:`ParamMask.save`) into
``<checkpoint>/hfhooks/`` — deleted with the checkpoint by ``save_total_limit`` rotation — and reads it back at
``on_train_begin`` when ``state.global_step > 0`` (the Trainer restores its ``TrainerState`` from the
checkpoint before ``on_train_begin``). A resumed run whose checkpoint holds no such state is an error, never a
silent recomputation.

Which checkpoint: the callback's ``resume_from`` (a checkpoint directory) if given, else
``args.resume_from_checkpoint`` if it names a directory, else ``<output_dir>/checkpoint-<global_step>`` —
what ``trainer.train(resume_from_checkpoint=True)`` resumes from. The chosen checkpoint's
``trainer_state.json`` must match the resumed state (same step and log history), so the state of another
run's checkpoint is never picked up. ``resume_from=False`` recomputes the state at the resumed weights,
deliberately.

Every state file and mask records the config of the callback that wrote it (``config``: its
:meth:`~hfhooks.core.config.Config.to_dict`, next to the ``hfhooks.version`` stamp of every artifact). On resume
the saved config is compared with the resumed run's: a field that differs raises :class:`CallbackStateError`
naming it, except the config's ``resume_may_differ`` fields (progress bars, where copies are written, end-of-run
checks) and ``resume_from`` itself, which is never recorded.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hfhooks.core.config import Config
from hfhooks.io.artifacts import read_artifact, write_artifact
from hfhooks.masks.mask import ParamMask

__all__ = [
    "STATE_DIR",
    "CallbackStateError",
    "check_same_config",
    "check_same_mask",
    "load_mask",
    "load_state",
    "resumed_checkpoint",
    "save_mask",
    "save_state",
]

STATE_DIR = "hfhooks"
_KIND = "callback_state"

ResumeFrom = str | os.PathLike | bool | None


class CallbackStateError(RuntimeError):
    """A resumed run whose checkpoint does not hold (or does not match) a callback's saved state."""


def _checkpoint(args: Any, state: Any) -> Path:
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def _writable_dir(args: Any, state: Any, owner: str) -> Path | None:
    """``<checkpoint>/hfhooks`` on the process that saves (``args.should_save``); None elsewhere."""
    if not getattr(args, "should_save", True):
        return None
    ckpt = _checkpoint(args, state)
    if not ckpt.is_dir():
        warnings.warn(
            f"{owner}: the checkpoint {ckpt} was not found at on_save, so the callback's state is not saved with "
            "it; resuming from it will raise.",
            stacklevel=3,
        )
        return None
    return ckpt / STATE_DIR


def resumed_checkpoint(args: Any, state: Any, resume_from: ResumeFrom, owner: str) -> Path | None:
    """The checkpoint directory this run resumes from, or ``None`` for a fresh run (or ``resume_from=False``).

    Raises :class:`CallbackStateError` if the directory does not exist or its ``trainer_state.json`` does not
    match the resumed ``state`` (another run's checkpoint at the same step).
    """
    if state.global_step == 0 or resume_from is False:
        return None
    if resume_from is not None and resume_from is not True:
        ckpt = Path(resume_from)
    elif (
        isinstance(getattr(args, "resume_from_checkpoint", None), str)
        and Path(args.resume_from_checkpoint).is_dir()
    ):
        ckpt = Path(args.resume_from_checkpoint)
    else:
        ckpt = _checkpoint(args, state)
    how = (
        f"Pass {owner}(..., resume_from='path/to/checkpoint-{state.global_step}') naming the checkpoint the "
        f"run resumes from, or resume_from=False to recompute the state at the resumed weights (the resumed "
        "run then trains with a different state than the checkpoint did)."
    )
    saved = ckpt / "trainer_state.json"
    if not saved.is_file():
        raise CallbackStateError(
            f"{owner}: the run resumes at step {state.global_step}, but {ckpt} is not its checkpoint (no "
            f"trainer_state.json there). {how}"
        )
    try:
        recorded = json.loads(saved.read_text())
    except ValueError as e:
        raise CallbackStateError(f"{owner}: {saved} is not valid JSON ({e}). {how}") from None
    same_history = json.dumps(recorded.get("log_history")) == json.dumps(state.log_history)  # NaN == NaN here
    if recorded.get("global_step") != state.global_step or not same_history:
        raise CallbackStateError(
            f"{owner}: {ckpt} does not hold the state this run resumed from (step "
            f"{recorded.get('global_step')} vs {state.global_step}, or another log history). {how}"
        )
    return ckpt


def _missing(path: Path, owner: str, step: int) -> CallbackStateError:
    return CallbackStateError(
        f"{owner}: the run resumes at step {step}, but {path} does not exist — the checkpoint was written "
        f"without this callback (or by hfhooks before it saved callback state). Recomputing the state at the "
        "resumed weights would train with another state than the checkpoint did. Resume from a checkpoint "
        f"saved with {owner}, or pass resume_from=False to recompute it deliberately."
    )


def check_same_config(saved: Mapping[str, Any] | None, config: Config, owner: str, where: Path) -> None:
    """Raise :class:`CallbackStateError` naming the fields where ``config`` differs from the ``saved`` record.

    ``saved`` is the ``config`` metadata of a checkpoint's state file or mask; a file written before configs were
    recorded (``None``) is only warned about — the mask and state checks still apply.
    """
    if saved is None:
        warnings.warn(
            f"{owner}: {where} records no config (written by an older hfhooks), so this resumed run's options "
            "cannot be checked against the checkpoint's.",
            stacklevel=3,
        )
        return
    if not isinstance(saved, Mapping):
        raise CallbackStateError(f"{owner}: {where} holds a config record that is not an object: {saved!r}.")
    differ = config.differs(saved)
    if differ:
        mine = config.to_dict()
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {mine[k]!r}" for k in differ)
        raise CallbackStateError(
            f"{owner}: the checkpoint was trained with other options than this resumed run ({detail}; from "
            f"{where}). Resume with the checkpoint's {type(config).__name__}, or pass resume_from=False to train on "
            "with the new options."
        )


def save_state(
    args: Any,
    state: Any,
    owner: str,
    tensors: Mapping[str, torch.Tensor] | None = None,
    meta: Mapping[str, Any] | None = None,
    config: Config | None = None,
) -> Path | None:
    """Write ``tensors`` and JSON ``meta`` as ``<checkpoint>/hfhooks/<owner>.safetensors`` (atomically).

    ``config`` (the callback's) is recorded as the file's ``config`` metadata; :func:`load_state` checks it.
    """
    folder = _writable_dir(args, state, owner)
    if folder is None:
        return None
    info = {"callback": owner, "global_step": state.global_step, "state": dict(meta or {})}
    if config is not None:
        info["config"] = config.to_dict()
    return write_artifact(folder / f"{owner}.safetensors", dict(tensors or {}), _KIND, info)


def load_state(
    args: Any, state: Any, owner: str, resume_from: ResumeFrom, config: Config | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(tensors, meta)`` saved by :func:`save_state` in the resumed checkpoint; ``None`` for a fresh run.

    With ``config``, the saved config must match it (:func:`check_same_config`)."""
    ckpt = resumed_checkpoint(args, state, resume_from, owner)
    if ckpt is None:
        return None
    path = ckpt / STATE_DIR / f"{owner}.safetensors"
    if not path.is_file():
        raise _missing(path, owner, state.global_step)
    tensors, meta = read_artifact(path, _KIND)
    if meta.get("callback") != owner or meta.get("global_step") != state.global_step:
        raise CallbackStateError(
            f"{path} holds the state of {meta.get('callback')!r} at step {meta.get('global_step')}, not "
            f"{owner!r} at step {state.global_step}."
        )
    if config is not None:
        check_same_config(meta.get("config"), config, owner, path)
    return tensors, meta.get("state", {})


def save_mask(
    args: Any, state: Any, owner: str, mask: ParamMask, model: Any = None, config: Config | None = None
) -> Path | None:
    """Save ``mask`` as ``<checkpoint>/hfhooks/<owner>.mask.safetensors`` (:meth:`ParamMask.save`), recording
    ``config`` (the callback's) as its ``config`` metadata."""
    folder = _writable_dir(args, state, owner)
    if folder is None:
        return None
    extra: dict[str, Any] = {"global_step": state.global_step}
    if config is not None:
        extra["config"] = config.to_dict()
    return mask.save(folder / f"{owner}.mask.safetensors", model=model, **extra)


def load_mask(
    args: Any, state: Any, owner: str, resume_from: ResumeFrom, config: Config | None = None
) -> ParamMask | None:
    """The mask :func:`save_mask` wrote into the resumed checkpoint; ``None`` for a fresh run.

    With ``config``, the config saved with the mask must match it (:func:`check_same_config`)."""
    ckpt = resumed_checkpoint(args, state, resume_from, owner)
    if ckpt is None:
        return None
    path = ckpt / STATE_DIR / f"{owner}.mask.safetensors"
    if not path.is_file():
        raise _missing(path, owner, state.global_step)
    mask = ParamMask.load(path)
    if config is not None:
        check_same_config(mask.metadata.get("config"), config, owner, path)
    return mask


def check_same_mask(given: ParamMask, saved: ParamMask, owner: str, what: str = "mask") -> None:
    """Raise :class:`CallbackStateError` if the mask given to a resumed run differs from the checkpoint's."""
    if given != saved:
        raise CallbackStateError(
            f"{owner}: the {what} given for this resumed run differs from the one the checkpoint was trained with "
            f"({given!r} vs {saved!r}). Pass the same {what}, or resume_from=False to train on with the new one."
        )
