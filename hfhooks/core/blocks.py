"""The transformer block list: where a model keeps its decoder (or encoder) layers, and layer selections.

:func:`find_layers` locates the block list through any wrapper, :func:`layer_of` maps a canonical parameter
name to its block, :func:`select_layers` normalises a user's layer selection. :data:`LAYER_PATHS` are the known
block paths, also used by :func:`hfhooks.io.checkpoints.layer_map` to find layers from names alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from hfhooks.core.names import canonical_name, unwrap_model

__all__ = ["LAYER_PATHS", "LayerList", "find_layers", "layer_of", "select_layers"]


# Canonical paths of the decoder/encoder block list, most common first.
LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi3, OLMo
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.layers",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "encoder.layer",  # BertModel
    "model.decoder.layers",  # OPT
    "model.language_model.layers",
    "transformer.layers",
    "distilbert.transformer.layer",
    "layers",
    "h",
)


@dataclass(frozen=True)
class LayerList:
    """The transformer block list of a model: its canonical path and the block modules in order."""

    path: str
    modules: tuple[nn.Module, ...]

    def __len__(self) -> int:
        return len(self.modules)

    def prefix(self, i: int) -> str:
        """Canonical module path of block ``i`` (negative indices count from the end)."""
        n = len(self.modules)
        if not -n <= i < n:
            raise IndexError(
                f"Layer {i} out of range: the model has {n} layers ({self.path}.0 … {self.path}.{n - 1})."
            )
        return f"{self.path}.{i % n}"


def find_layers(model: nn.Module) -> LayerList:
    """Locate the transformer block list (works through DDP, compile, PEFT and checkpoint wrappers).

    Known paths are tried first; otherwise the ``nn.ModuleList`` of same-class blocks holding the most
    parameters is taken. Raises ``ValueError`` if the model has no such list.
    """
    base = unwrap_model(model)
    candidates: dict[str, nn.ModuleList] = {}
    for name, mod in base.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            candidates.setdefault(canonical_name(name), mod)
    for path in LAYER_PATHS:
        if path in candidates:
            return LayerList(path, tuple(candidates[path]))
    best, best_n = None, 0
    for path, mod in candidates.items():
        if len({type(m) for m in mod}) != 1:
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > best_n:
            best, best_n = path, n
    if best is None:
        raise ValueError(
            f"Could not find the transformer block list of {type(base).__name__}: no nn.ModuleList of "
            f"identical blocks. Pass explicit parameter names or patterns instead of layer indices."
        )
    return LayerList(best, tuple(candidates[best]))


def layer_of(name: str, layers: LayerList) -> int | None:
    """Block index of canonical parameter ``name`` (``None`` for embeddings, final norm, heads)."""
    prefix = layers.path + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def select_layers(layers: LayerList, spec: Iterable[int] | slice | None) -> list[int]:
    """Normalise a layer selection (indices, negative indices, a slice, or ``None`` = all) to sorted indices."""
    n = len(layers)
    if spec is None:
        return list(range(n))
    if isinstance(spec, slice):
        return list(range(n))[spec]
    for i in spec:
        layers.prefix(i)  # raises a clear IndexError when out of range
    return sorted({i % n for i in spec})
