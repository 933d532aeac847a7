"""Side labels that reach hooks through a stock ``Trainer``: tagged datasets, a collator, a kwargs pre-hook.

Hooks need per-example data the model's ``forward`` does not take (routing labels, forget/retain flags,
attribution priors). The Trainer drops dataset columns that ``forward`` does not accept — for
``datasets.Dataset`` up front, for other datasets by filtering each *dict* example in a collator wrapper.
:class:`TaggedDataset` therefore yields :class:`Tagged` items (not dicts), which pass that filter untouched;
:class:`TaggedCollator` collates the features with the usual collator and adds the tags as tensors; a forward
pre-hook (:func:`pop_kwargs_hook`) pops them from the model's kwargs before ``forward`` runs. Users never need
``remove_unused_columns=False``.

Trainers that only accept a ``datasets.Dataset`` (TRL's ``SFTTrainer``) cannot take a :class:`TaggedDataset`:
there the tags stay ordinary columns, kept with ``remove_unused_columns=False``, and
``TaggedCollator(trl_collator, columns=["unlearn"])`` pulls them out of each example before the trainer's own
collator sees it (a column missing from an example is refused, naming the option that dropped it).

``TaggedDataset(..., group_by="routing", batch_size=8)`` yields whole micro-batches whose examples share a
tag value (label-homogeneous batches for parameter-level gradient routing); train it with
``per_device_train_batch_size=1``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hfhooks.core.hooks import HookSet

__all__ = ["MODEL_INPUTS", "Tagged", "TaggedCollator", "TaggedDataset", "pop_kwargs_hook", "to_device"]

MODEL_INPUTS = (
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "labels", "label", "label_ids",
    "pixel_values", "inputs_embeds", "decoder_input_ids", "decoder_attention_mask",
)  # fmt: skip
"""Common model input names, for ``TaggedCollator(keep=MODEL_INPUTS)`` (pass only these, as the Trainer would)."""


@dataclass(frozen=True)
class Tagged:
    """One example (or a homogeneous group of examples) plus its side tags. Not a dict, on purpose."""

    features: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    tags: Mapping[str, Any]


class TaggedDataset(torch.utils.data.Dataset):
    """Wrap ``dataset`` so each item carries tags that survive the Trainer's column pruning.

    Args:
        dataset: any map-style dataset of dict examples (``datasets.Dataset`` included).
        tags: ``{tag name: per-example values}``; or names of columns of ``dataset`` to move into tags
            (e.g. ``tags=["routing"]``).
        group_by: a tag name; with ``batch_size``, items become groups of ``batch_size`` examples sharing
            that tag's value (shuffled within each value with ``seed``; the last partial group is kept).
        batch_size: examples per group (``group_by`` only).
        seed: shuffling seed for grouping.
    """

    def __init__(
        self,
        dataset: Any,
        tags: Mapping[str, Sequence[Any]] | Sequence[str],
        group_by: str | None = None,
        batch_size: int | None = None,
        seed: int = 0,
    ):
        self.dataset = dataset
        if isinstance(tags, Mapping):
            self.columns: tuple[str, ...] = ()
            self.tags = {k: list(v) for k, v in tags.items()}
        else:
            self.columns = tuple(tags)
            self.tags = {c: [dataset[i][c] for i in range(len(dataset))] for c in self.columns}
        for name, values in self.tags.items():
            if len(values) != len(dataset):
                raise ValueError(
                    f"Tag {name!r} has {len(values)} values for a dataset of {len(dataset)} examples."
                )
        if (group_by is None) != (batch_size is None):
            raise ValueError(
                "Pass both group_by and batch_size (homogeneous groups), or neither (single examples)."
            )
        if group_by is not None and group_by not in self.tags:
            raise ValueError(f"group_by={group_by!r} is not a tag; tags are {sorted(self.tags)}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be ≥ 1.")
        self.group_by, self.batch_size = group_by, batch_size
        self.groups: list[list[int]] | None = None
        if group_by is not None:
            rng = random.Random(seed)
            by_value: dict[Any, list[int]] = {}
            for i, v in enumerate(self.tags[group_by]):
                by_value.setdefault(_hashable(v), []).append(i)
            self.groups = []
            for _, idx in sorted(by_value.items(), key=lambda kv: str(kv[0])):
                rng.shuffle(idx)
                self.groups.extend(idx[s : s + batch_size] for s in range(0, len(idx), batch_size))
            rng.shuffle(self.groups)

    def __len__(self) -> int:
        return len(self.groups) if self.groups is not None else len(self.dataset)

    def _features(self, i: int) -> Mapping[str, Any]:
        ex = self.dataset[i]
        return {k: v for k, v in ex.items() if k not in self.columns} if self.columns else ex

    def __getitem__(self, i: int) -> Tagged:
        if self.groups is None:
            return Tagged(self._features(i), {k: v[i] for k, v in self.tags.items()})
        idx = self.groups[i]
        return Tagged(
            [self._features(j) for j in idx], {k: [v[j] for j in idx] for k, v in self.tags.items()}
        )


def _hashable(v: Any) -> Any:
    return v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v


class TaggedCollator:
    """Collate :class:`Tagged` items: features via ``base`` (default ``transformers.default_data_collator``),
    tags stacked into tensors under their own names.

    Group items (from ``TaggedDataset(group_by=..., batch_size=...)``) are flattened; several groups in one
    batch must share the grouping value, otherwise the batch is refused (train groups with
    ``per_device_train_batch_size=1``). String fields are dropped; with ``keep`` (e.g. :data:`MODEL_INPUTS`)
    only those features are passed on, as the Trainer's column pruning would.

    Per-token tags (rationale masks, word ids) must line up with ``input_ids`` after the base collator pads
    them (e.g. ``DataCollatorWithPadding``). A 1-D tag is padded to the batch's ``input_ids`` width when each
    example's tag is as long as its own ``input_ids``, when its examples differ in length, or when it is named
    in ``pad_tags``; the pad value is ``pad_tags[name]`` (default ``0``; use ``-1`` for word ids), on
    ``padding_side`` (default: the base collator's tokenizer's side, else right).

    ``columns`` (e.g. ``["unlearn"]``) also accepts plain dict examples — a ``datasets.Dataset`` that a trainer
    such as TRL's ``SFTTrainer`` hands over as is: those columns become tags, the rest goes to ``base``
    (e.g. TRL's ``DataCollatorForLanguageModeling``). Train with ``remove_unused_columns=False``, or the Trainer
    drops the columns before they reach the collator.
    """

    def __init__(
        self,
        base: Callable[[list], dict] | None = None,
        keep: Sequence[str] | None = None,
        homogeneous: str | None = None,
        pad_tags: Mapping[str, int | float] | None = None,
        padding_side: str | None = None,
        columns: Sequence[str] = (),
    ):
        if isinstance(columns, str):
            raise TypeError(f"columns={columns!r} must be a sequence of column names, e.g. [{columns!r}].")
        self.columns = tuple(columns)
        if base is None:
            from transformers import default_data_collator

            base = default_data_collator
        if padding_side is None:  # follow the tokenizer that pads input_ids
            padding_side = getattr(getattr(base, "tokenizer", None), "padding_side", None) or "right"
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r} must be 'right' or 'left' (as the tokenizer's).")
        self.base, self.homogeneous = base, homogeneous
        self.keep = set(keep) if keep is not None else None
        self.pad_tags, self.padding_side = dict(pad_tags or {}), padding_side

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        if not items:
            raise ValueError("Empty batch.")
        if self.columns:
            items = [it if isinstance(it, Tagged) else self._from_columns(it) for it in items]
        if not all(isinstance(it, Tagged) for it in items):
            raise TypeError(
                "TaggedCollator got plain examples: wrap the dataset in hfhooks.TaggedDataset so side labels survive "
                "the Trainer's column pruning; or, for a trainer that requires a datasets.Dataset (TRL's), name the "
                "side-label columns: TaggedCollator(<the trainer's collator>, columns=[...]) with "
                "remove_unused_columns=False."
            )
        feats: list[Mapping[str, Any]] = []
        tags: dict[str, list[Any]] = {}
        for it in items:
            group = it.features if isinstance(it.features, Sequence) else [it.features]
            feats.extend(group)
            for k, v in it.tags.items():
                tags.setdefault(k, []).extend(v if isinstance(it.features, Sequence) else [v])
        if self.homogeneous is not None:
            values = {_hashable(v) for v in tags.get(self.homogeneous, [])}
            if len(values) > 1:
                raise ValueError(
                    f"A batch mixes {self.homogeneous!r} values {sorted(map(str, values))}; parameter-level routing needs "
                    "label-homogeneous micro-batches: use TaggedDataset(group_by=..., batch_size=B) with "
                    "per_device_train_batch_size=1, or activation-level routing for mixed batches."
                )
        batch = dict(self.base([{k: v for k, v in f.items() if self._keeps(k, v)} for f in feats]))
        width = batch["input_ids"].shape[-1] if isinstance(batch.get("input_ids"), torch.Tensor) else None
        for k, v in tags.items():
            rows = [torch.as_tensor(x) for x in v]
            ragged = len({tuple(r.shape) for r in rows}) > 1
            lengths = [len(f["input_ids"]) if "input_ids" in f else None for f in feats]
            per_token = all(r.dim() == 1 and r.numel() == n for r, n in zip(rows, lengths, strict=True))
            short = width is not None and rows[0].shape[-1:] != (width,)
            if ragged or (short and (per_token or k in self.pad_tags)):
                batch[k] = self._pad(k, rows, width)
            else:
                batch[k] = torch.stack(rows)
        return batch

    def _from_columns(self, example: Mapping[str, Any]) -> Tagged:
        missing = [c for c in self.columns if c not in example]
        if missing:
            raise KeyError(
                f"TaggedCollator(columns={list(self.columns)}): the example has no column {missing} (its keys: "
                f"{sorted(example)}). The Trainer drops dataset columns the model's forward does not take: pass "
                "remove_unused_columns=False (TrainingArguments / TRL's SFTConfig) so they reach the collator; "
                "TRL's packing (SFTConfig(packing=True)) also drops them — set packing=False."
            )
        return Tagged(
            {k: v for k, v in example.items() if k not in self.columns}, {c: example[c] for c in self.columns}
        )

    def _pad(self, name: str, rows: list[torch.Tensor], width: int | None) -> torch.Tensor:
        if any(r.dim() != 1 for r in rows):
            raise ValueError(
                f"Tag {name!r} has examples of different shapes {sorted({tuple(r.shape) for r in rows})}; only "
                "per-token (1-D) tags can be padded."
            )
        longest = max(r.numel() for r in rows)
        target = width if width is not None else longest
        if longest > target:
            raise ValueError(
                f"Tag {name!r} has an example of length {longest}, longer than input_ids ({target}): tags must "
                "be per token of the tokenized input (truncate them with the text)."
            )
        value = self.pad_tags.get(name, 0)
        dtype = rows[0].dtype  # keep it (a bool mask stays bool) unless the pad value does not fit
        if (dtype == torch.bool and value not in (0, 1)) or (
            not dtype.is_floating_point and not float(value).is_integer()
        ):
            dtype = torch.result_type(rows[0], value)
        out = torch.full((len(rows), target), value, dtype=dtype)
        for i, r in enumerate(rows):
            if self.padding_side == "right":
                out[i, : r.numel()] = r
            else:
                out[i, target - r.numel() :] = r
        return out

    def _keeps(self, key: str, value: Any) -> bool:
        if self.keep is not None:
            return key in self.keep
        return not isinstance(value, str) and not (
            isinstance(value, (list, tuple)) and value and isinstance(value[0], str)
        )


def pop_kwargs_hook(
    hooks: HookSet,
    module: nn.Module,
    names: Sequence[str],
    sink: Callable[[dict[str, Any]], None],
    target: str = "tags",
) -> Any:
    """Register (through ``hooks``) a forward pre-hook on ``module`` that pops ``names`` from its kwargs and hands
    them to ``sink``.

    ``sink`` receives ``{name: value}`` for the names present (an empty dict when none are). Returns the hook
    handle. Tags must be passed as keyword arguments, as the Trainer does (``model(**inputs)``).
    """

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        found = {n: kwargs.pop(n) for n in names if n in kwargs}
        sink(found)
        return args, kwargs

    return hooks.forward_pre_hook(module, hook, target, with_kwargs=True)


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor in a (nested) batch of dicts / lists / tuples to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
