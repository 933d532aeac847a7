"""The base of every hfhooks config dataclass: validation of ``Literal`` fields, ``to_dict`` / ``from_dict``.

Each method's config (``GradientMaskConfig``, ``RoutingConfig``, ...) is a keyword-only dataclass whose fields
carry ``metadata={"help": ...}`` (peft / TRL style). ``Config.__post_init__`` checks every ``Literal[...]`` field
against its allowed values, so a subclass only adds its range checks; errors name the bad value, the allowed
ones and the field. ``to_dict`` holds what an artifact's metadata records (JSON values only: fields marked
``metadata={"record": False}`` — datasets, callables, models — are left out, and paths become strings).

>>> from dataclasses import dataclass, field
>>> from typing import Literal
>>> @dataclass(kw_only=True)
... class Demo(Config):
...     mode: Literal["a", "b"] = field(default="a", metadata={"help": "which way"})
>>> Demo(mode="c")
Traceback (most recent call last):
    ...
ValueError: Demo.mode='c' is not one of 'a', 'b' (which way).
>>> Demo.from_dict(Demo(mode="b").to_dict())
Demo(mode='b')
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

__all__ = ["Config", "check_range"]

C = TypeVar("C", bound="Config")


def _literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of ``Literal[...]`` (also inside ``Optional`` / unions), else ``None``."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    choices: list[Any] = []
    for arg in typing.get_args(tp):
        sub = _literal_choices(arg)
        if sub is None and arg is not type(None):
            return None  # a union with a non-literal member (e.g. ``str | Literal[...]``): not checked here
        choices.extend(sub or (None,))
    return tuple(choices) or None


def check_range(
    owner: str, name: str, value: float, low: float, high: float, *, low_open: bool = False
) -> None:
    """Raise ``ValueError`` naming ``owner.name`` unless ``low (<|<=) value <= high``."""
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{owner}.{name}={value!r} must be in {bracket}{low}, {high}].")


@dataclasses.dataclass(kw_only=True)
class Config:
    """Base of the config dataclasses; see the module docstring."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = _literal_choices(hints.get(f.name))
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                allowed = ", ".join(repr(c) for c in choices)
                why = f" ({f.metadata['help']})" if f.metadata.get("help") else ""
                raise ValueError(f"{type(self).__name__}.{f.name}={value!r} is not one of {allowed}{why}.")

    def to_dict(self) -> dict[str, Any]:
        """The recorded fields as JSON values (what saved artifacts store as ``config``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("record", True):
                continue
            value = getattr(self, f.name)
            out[f.name] = os.fspath(value) if isinstance(value, os.PathLike) else value
        return out

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error naming the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}."
            )
        return cls(**data)

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{field: help text}``, for docs and ``--help`` output."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
