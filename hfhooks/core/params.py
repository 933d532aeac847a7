"""``ParamIndex``: canonical parameter names resolved to the live parameters, and selectors over them.

Every mask, score and diff in hfhooks is keyed by the *canonical* name of a parameter: its name in the
unwrapped base model (``model.layers.3.mlp.up_proj.weight``). Training wraps models in layers of containers
that rename parameters (DDP adds ``module.``, ``torch.compile`` adds ``_orig_mod.``, PEFT adds
``base_model.model.`` and ``.base_layer``, FSDP1 and activation checkpointing add their own segments).
Research code that keyed masks by whatever ``named_parameters()`` printed at the time silently stopped
applying them once the model was wrapped; :class:`ParamIndex` resolves canonical names to the live
``Parameter`` objects once, when hooks are attached, and fails loudly on names it does not know.

Example:
    >>> import transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                num_hidden_layers=2, num_attention_heads=2)
    >>> index = ParamIndex(transformers.LlamaForCausalLM(cfg))
    >>> index.param("model.layers.1.mlp.up_proj.weight").shape
    torch.Size([32, 16])
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hfhooks.core.blocks import find_layers, layer_of, select_layers
from hfhooks.core.names import canonical_name, match_name, unwrap_model

__all__ = [
    "ParamIndex",
    "ParamInfo",
    "UnknownParameterError",
    "bit_view",
    "canonical_name",  # re-exported from hfhooks.core.names
    "copy_full_",
    "fsdp2_reshard",
    "fsdp2_unsharded_params",
    "is_dtensor",
    "local_tensor",
    "shard_like",
    "unwrap_model",  # re-exported from hfhooks.core.names
]

_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit pattern as integers of the same width (a view: writing it writes ``t``), for exact compares
    and masks that hold for inf, NaN and signed zeros."""
    return t.view(_BIT_VIEWS[t.element_size()])


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2 ``fully_shard`` or tensor parallel), without importing DTensor."""
    return type(t).__name__ == "DTensor"


def copy_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write the full-size ``value`` into ``param`` in place (call under ``torch.no_grad()``).

    A DTensor parameter (FSDP2 ``fully_shard``, tensor parallel) gets its local shard overwritten with this
    rank's slice of ``value``, cut locally (``src_data_rank=None``: no communication, so each rank may call it
    on its own; every rank must pass the same ``value``). ``value`` is cast to the parameter's dtype and device.
    """
    value = value.to(device=param.device, dtype=param.dtype)
    local_tensor(param).copy_(shard_like(value, param))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (same storage: writing it writes ``t``), anything
    else itself."""
    return t.to_local() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full-size tensor laid out like ``param`` (``full`` itself for ordinary tensors).

    Under FSDP2 a parameter is a DTensor sharded across ranks; a mask over it must be sharded the same way.
    Every rank holds the same full tensor, so the slice is cut locally (``src_data_rank=None``: no
    communication).
    """
    if not is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def fsdp2_reshard(model: nn.Module) -> list[nn.Module]:
    """Reshard every ``fully_shard``-ed module of ``model`` (public ``FSDPModule.reshard()``: local, no
    communication) and return them (empty without FSDP2).

    ``fully_shard`` does not reshard the root after forward, so after a forward outside training (an evaluation,
    a baseline loss) the root's module attributes hold full copies whose storage FSDP2 frees and refills at will:
    the optimizer never steps them, and reading them later may read freed memory. Whatever holds on to
    parameters (masks, snapshots, monitors) must look after this call, when every attribute is the sharded
    DTensor the optimizer steps.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return []
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.reshard()
    return modules


def fsdp2_unsharded_params(model: nn.Module) -> dict[nn.Parameter, nn.Parameter]:
    """``{sharded DTensor parameter: the full parameter FSDP2 computes with}`` for every parameter of
    ``model`` that ``fully_shard`` manages (empty for a model without FSDP2).

    FSDP2 runs forward and backward on one unsharded ``nn.Parameter`` per sharded parameter, created at its
    first all-gather and reused by every later one; autograd accumulates the *full* gradient of each
    micro-batch there, before the reduce-scatter. A gradient hook that must see each micro-batch on its own,
    before ranks are averaged, belongs on that tensor: the sharded parameter only ever receives the
    reduce-scattered, accumulated gradient. Found through the public ``FSDPModule.unshard()`` /
    ``reshard()`` (one parameter group at a time: peak memory is one group's full size), so this is a
    collective call: every rank must make it.

    Every group is left sharded (see :func:`fsdp2_reshard`).
    """
    pairs: dict[nn.Parameter, nn.Parameter] = {}
    for module in fsdp2_reshard(model):
        before = dict(module.named_parameters(remove_duplicate=False))
        module.unshard()  # while unsharded, the module's attributes hold the unsharded parameters
        try:
            for name, param in module.named_parameters(remove_duplicate=False):
                if param is not before[name] and is_dtensor(before[name]):
                    pairs[before[name]] = param
        finally:
            module.reshard()
    return pairs


class UnknownParameterError(KeyError):
    """A canonical name (or pattern) that matches nothing in the model; the message lists the nearest names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ParamInfo:
    """Where a canonical parameter lives in the (wrapped) model."""

    name: str  # canonical name
    full_name: str  # name as printed by the wrapped model's named_parameters()
    param: nn.Parameter
    module: nn.Module  # the module that owns the parameter directly (e.g. an nn.Linear or Conv1D)
    aliases: tuple[str, ...] = ()  # other canonical names of the same tensor (tied weights)

    @property
    def shape(self) -> torch.Size:
        """The parameter's real shape (DeepSpeed ZeRO-3 keeps it in ``ds_shape``: ``.shape`` is a placeholder)."""
        return getattr(self.param, "ds_shape", self.param.shape)


class ParamIndex:
    """Canonical name ⇄ live parameter map for one model, built once.

    Tied weights appear once, under the first name ``named_parameters()`` yields; the other names resolve as
    aliases. Under PEFT ``modules_to_save`` the trainable copy is the live parameter for the canonical name.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._infos: dict[str, ParamInfo] = {}
        self._alias: dict[str, str] = {}
        self._by_full: dict[str, str] = {}
        by_tensor: dict[int, str] = {}
        entries = [
            (f"{mod_name}.{p_name}" if mod_name else p_name, param, module)
            for mod_name, module in model.named_modules(remove_duplicate=False)
            for p_name, param in module.named_parameters(recurse=False, remove_duplicate=False)
        ]
        # PEFT modules_to_save: the trainable copy is the live parameter of the canonical name; the shadowed
        # original is skipped (if it is tied to another name, e.g. lm_head, that name keeps it as its own).
        copied = {canonical_name(f) for f, _, _ in entries if "original_module" not in f.split(".")}
        for full, param, module in entries:
            canon = canonical_name(full)
            if "original_module" in full.split(".") and canon in copied:
                continue
            if id(param) in by_tensor and by_tensor[id(param)] != canon:
                first = by_tensor[id(param)]
                self._alias[canon] = first
                info = self._infos[first]
                if canon not in info.aliases:
                    self._infos[first] = ParamInfo(
                        info.name, info.full_name, info.param, info.module, (*info.aliases, canon)
                    )
                continue
            by_tensor[id(param)] = canon
            self._infos[canon] = ParamInfo(canon, full, param, module)
            self._by_full[full] = canon

    # -- lookups -------------------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._infos or name in self._alias)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def names(self) -> list[str]:
        """Canonical names, in the model's registration order."""
        return list(self._infos)

    def info(self, name: str) -> ParamInfo:
        """Resolve a canonical name (or an alias of a tied weight) to its :class:`ParamInfo`."""
        if name in self._infos:
            return self._infos[name]
        if name in self._alias:
            return self._infos[self._alias[name]]
        canon = canonical_name(name)
        if canon != name and canon in self:
            return self.info(canon)
        raise UnknownParameterError(self.unknown_message(name))

    def param(self, name: str) -> nn.Parameter:
        """The live ``Parameter`` for a canonical name."""
        return self.info(name).param

    def resolves(self, name: str) -> bool:
        """Whether ``name`` (canonical, an alias of a tied weight, or as printed by the wrapped model) names a
        parameter of the model."""
        if name in self or name in self._by_full:
            return True
        canon = canonical_name(name)
        return canon != name and canon in self

    def canonical(self, name: str) -> str:
        """Canonical name for a name as printed by the wrapped model, a canonical name, or an alias."""
        if name in self._by_full:
            return self._by_full[name]
        return self.info(name).name

    def items(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, info in self._infos.items():
            yield name, info.param

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(i.shape) for n, i in self._infos.items()}

    def unknown_message(self, name: str) -> str:
        """The error message for an unknown parameter name, with the closest known names as hints."""
        close = difflib.get_close_matches(name, list(self._infos), n=3, cutoff=0.5)
        hint = (
            f" Nearest matches: {', '.join(close)}."
            if close
            else f" The model has {len(self)} parameters, e.g. {next(iter(self._infos), '?')}."
        )
        return f"Unknown parameter name {name!r}.{hint} Names are canonical (unwrapped base-model) names; see hfhooks.ParamIndex(model).names()."

    # -- selection -----------------------------------------------------------------------------------------
    def select(
        self,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        layers: Iterable[int] | slice | None = None,
        trainable_only: bool = False,
    ) -> list[str]:
        """Canonical names matching any ``include`` pattern and no ``exclude`` pattern.

        Patterns are globs (``*.mlp.*``) or regular expressions (``re:layers\\.[0-3]\\.``); a plain name
        matches itself. ``layers`` keeps only parameters of those decoder layers (see :func:`find_layers`).
        A pattern that matches nothing raises :class:`UnknownParameterError` naming the nearest parameters,
        because a selector that silently selects nothing is how masks end up never applied.
        """
        names = self.names()
        if trainable_only:
            names = [n for n in names if self._infos[n].param.requires_grad]
        if include is not None:
            keep: list[str] = []
            for pat in _as_list(include):
                # a tied weight's alias (lm_head.weight sharing the embedding) selects its canonical name
                alias = self._alias.get(pat)
                hit = [n for n in names if match_name(pat, n) or n == alias]
                if not hit:
                    raise UnknownParameterError(self.unknown_message(pat))
                keep.extend(h for h in hit if h not in keep)
            names = [n for n in names if n in set(keep)]
        for pat in _as_list(exclude or []):
            names = [n for n in names if not match_name(pat, n)]
        if layers is not None:
            blocks = find_layers(self.model)
            wanted = set(select_layers(blocks, layers))
            names = [n for n in names if layer_of(n, blocks) in wanted]
            if not names:
                raise UnknownParameterError(
                    f"No parameter matches include={include!r} within layers {sorted(wanted)} of {blocks.path}; "
                    "parameters outside the block list (embeddings, final norm, heads) have no layer."
                )
        return names


def _as_list(x: str | Iterable[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)
