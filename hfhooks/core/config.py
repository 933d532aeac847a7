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

A callback takes its config or the same fields as keywords (:meth:`Config.resolve`); an unknown keyword is a
``TypeError`` naming the allowed ones:

>>> Demo.resolve(Demo(mode="b"), {}, "DemoCallback")
Demo(mode='b')
>>> Demo.resolve(None, {"mode": "b"}, "DemoCallback")
Demo(mode='b')
>>> Demo.resolve(None, {"mdoe": "b"}, "DemoCallback")
Traceback (most recent call last):
    ...
TypeError: DemoCallback() got an unexpected keyword argument 'mdoe'; its options are: mode (or pass config=Demo(...)).
>>> Demo(mode="a").differs(Demo(mode="b").to_dict())
['mode']
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Literal, TypeVar

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


def _to_json(value: Any) -> Any:
    """``value`` as JSON: paths as strings, tuples as lists, slices as ``{"slice": [start, stop, step]}``, and
    objects that have no JSON form (a tokenizer, a prior) as ``{"object": "TypeName"}`` — recorded so that a
    resumed run notices another kind of object, but not rebuildable by :meth:`Config.from_dict`."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, slice):
        return {"slice": [value.start, value.stop, value.step]}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _to_json(v) for k, v in value.items()}
    return {"object": type(value).__name__}


def _from_json(cls_name: str, name: str, value: Any) -> Any:
    """Undo :func:`_to_json` for one field (slices); an ``{"object": ...}`` record cannot be rebuilt."""
    if isinstance(value, dict) and set(value) == {"slice"}:
        return slice(*value["slice"])
    if isinstance(value, dict) and set(value) == {"object"}:
        raise ValueError(
            f"{cls_name}.{name} was a {value['object']} object, which a saved config cannot rebuild: pass "
            f"{cls_name}.from_dict({{..., {name!r}: <the object>}}) with the object itself."
        )
    return value


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
    """Base of the config dataclasses; see the module docstring.

    ``resume_may_differ`` names the fields a resumed run may change without invalidating what the checkpoint
    holds (where copies are written, progress bars...): :meth:`differs` ignores them.
    """

    resume_may_differ: ClassVar[frozenset[str]] = frozenset()

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
            out[f.name] = _to_json(value)
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
        return cls(**{k: _from_json(cls.__name__, k, v) for k, v in data.items()})

    @classmethod
    def resolve(
        cls: type[C],
        config: C | None,
        options: Mapping[str, Any],
        owner: str,
        only: Collection[str] | None = None,
    ) -> C:
        """The config an object runs with: ``config`` (default: ``cls()``) with ``options`` replacing fields.

        ``options`` are the keywords given to ``owner`` besides ``config``; a name that is no field of ``cls``
        (or not in ``only``, the fields ``owner`` uses) is a ``TypeError`` naming the allowed ones. The result is
        validated (``dataclasses.replace`` runs ``__post_init__`` again), so a bad option raises where the object
        is built.
        """
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"{owner}(config=...) takes a {cls.__name__}, got {type(config).__name__}.")
        known = [f.name for f in dataclasses.fields(cls) if f.init and (only is None or f.name in only)]
        unknown = [k for k in options if k not in known]
        if unknown:
            s = "s" if len(unknown) > 1 else ""
            raise TypeError(
                f"{owner}() got an unexpected keyword argument{s} {', '.join(map(repr, unknown))}; its options "
                f"are: {', '.join(known)} (or pass config={cls.__name__}(...))."
            )
        if config is None:
            return cls(**options)
        return dataclasses.replace(config, **options) if options else config

    def differs(self, saved: Mapping[str, Any]) -> list[str]:
        """The recorded fields whose value in ``saved`` (a :meth:`to_dict` record) differs from this config's,
        except :attr:`resume_may_differ`. A field ``saved`` lacks (written before the field existed) counts
        as differing only when this config's value is not the field's default."""
        mine, out = self.to_dict(), []
        defaults = {
            f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(self)
        }
        for name, value in mine.items():
            if name in self.resume_may_differ:
                continue
            if name in saved:
                if json.dumps(saved[name], sort_keys=True) != json.dumps(value, sort_keys=True):
                    out.append(name)
            elif value != _to_json(defaults[name]):
                out.append(name)
        return out

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{field: help text}``, for docs and ``--help`` output."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
