"""Where a diff's tensors come from: one read interface over models, checkpoint directories and state dicts.

:class:`WeightSource` lets :meth:`WeightDiff.between <hfhooks.diffs.WeightDiff.between>`, LoRA diffs and
:mod:`hfhooks.restoration.restore` read any mix of an ``nn.Module`` (or ``ParamIndex``), a (sharded) checkpoint
directory read tensor by tensor, or a ``{name: tensor}`` mapping without caring which. :func:`select_names` picks
tensors by name, glob or ``re:`` regex (the rules of :mod:`hfhooks.core.params`) and names the nearest on a miss.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hfhooks.core.names import match_name
from hfhooks.core.params import ParamIndex, UnknownParameterError
from hfhooks.io.checkpoints import Checkpoint
from hfhooks.io.safetensors import ReadBuffer


class WeightSource:
    """Uniform read access to a model, a checkpoint directory or a ``{name: tensor}`` mapping."""

    def __init__(self, obj: Any, allow_pickle: bool = False):
        self.obj = obj
        self.index: ParamIndex | None = None
        self.ckpt: Checkpoint | None = None
        self.buffer = ReadBuffer()  # checkpoint tensors are read into it: each valid until the next get()
        if isinstance(obj, nn.Module):
            self.index = ParamIndex(obj)
            self.names = self.index.names()
            self.label = type(obj).__name__
        elif isinstance(obj, ParamIndex):
            self.index = obj
            self.names = obj.names()
            self.label = type(obj.model).__name__
        elif isinstance(obj, Checkpoint | str | os.PathLike):
            self.ckpt = obj if isinstance(obj, Checkpoint) else Checkpoint(obj, allow_pickle=allow_pickle)
            self.names = self.ckpt.keys()
            self.label = str(self.ckpt.path)
        elif isinstance(obj, Mapping):
            self.names = list(obj)
            self.label = "state dict"
        else:
            raise TypeError(
                f"Expected a model, a checkpoint directory or a {{name: tensor}} mapping, got {type(obj).__name__}."
            )

    @property
    def streaming(self) -> bool:
        return self.ckpt is not None

    def __contains__(self, name: str) -> bool:
        if self.index is not None:
            return name in self.index
        return name in (self.ckpt if self.ckpt is not None else self.obj)

    def shape(self, name: str) -> tuple[int, ...]:
        if self.index is not None:
            return tuple(self.index.info(name).shape)
        if self.ckpt is not None:
            return self.ckpt.info(name).shape
        return tuple(self.obj[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's dtype, without reading its values."""
        if self.index is not None:
            return self.index.param(name).dtype
        if self.ckpt is not None:
            return self.ckpt.info(name).dtype
        return torch.as_tensor(self.obj[name]).dtype

    def get(self, name: str) -> torch.Tensor:
        """The tensor (read-only use: for models this is the live parameter's data; from a checkpoint it is
        valid until the next ``get``)."""
        if self.index is not None:
            return self.index.param(name).detach().cpu()
        if self.ckpt is not None:
            return self.ckpt.read(name, self.buffer)
        return torch.as_tensor(self.obj[name]).detach().cpu()

    def unknown(self, name: str) -> str:
        if self.index is not None:
            return self.index.unknown_message(name)
        if self.ckpt is not None:
            return self.ckpt.unknown_message(name)
        return f"{name!r} is not in the state dict ({len(self.names)} tensors)."


def select_names(
    names: Sequence[str], patterns: str | Iterable[str] | None, quiet: bool = False
) -> list[str]:
    """The names matching any of ``patterns`` (exact names, globs or ``re:`` regexes), in order;
    every pattern must match something unless ``quiet``."""
    if patterns is None:
        return list(names)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    keep = []
    for pat in patterns:
        hit = [n for n in names if match_name(pat, n)]
        if not hit and not quiet:
            import difflib

            close = difflib.get_close_matches(pat, list(names), n=3, cutoff=0.5)
            raise UnknownParameterError(
                f"{pat!r} matches no tensor." + (f" Nearest: {', '.join(close)}." if close else "")
            )
        keep.extend(h for h in hit if h not in keep)
    return [n for n in names if n in set(keep)]
