"""Merge recipes: a YAML or JSON file in the style of mergekit's, read into a :class:`Recipe`.

.. code-block:: yaml

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 1.0, density: 0.5}
      - model: ./code
        parameters: {weight: 0.5, density: 0.5}
    parameters: {lambda: 1.0}   # method-wide: lambda, normalize, rescale, majority_sign, seed, tall_lambda, k,
                                # task, names, layers (and weight / density for every model)
    dtype: bfloat16             # optional: must be the base's dtype (the merge is computed in float32)

Keys hfhooks does not know (mergekit's ``slices``, ``tokenizer_source``, per-tensor ``filter`` lists...) are
errors, never ignored. Paths are used as written (relative to the working directory, as mergekit does).
YAML needs PyYAML (a dependency of transformers); JSON needs nothing.

>>> r = load_recipe({"merge_method": "ties", "base_model": "b", "models": [
...     {"model": "t1", "parameters": {"weight": 1.0, "density": 0.5}}, {"model": "t2"}],
...     "parameters": {"lambda": 0.8, "density": 0.3}})
>>> r.base, r.models, r.config.weights, r.config.density, r.config.lambda_
('b', ['t1', 't2'], (1.0, 1.0), (0.5, 0.3), 0.8)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfhooks.merging.config import METHODS, MergeConfig
from hfhooks.merging.merge import MergeReport, merge

__all__ = ["Recipe", "load_recipe"]

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
GLOBAL_KEYS = {
    "lambda": "lambda_",
    "normalize": "normalize",
    "rescale": "rescale",
    "majority_sign": "majority_sign",
    "seed": "seed",
    "tall_lambda": "tall_lambda",
    "k": "k",
    "task": "task",
    "names": "names",
    "layers": "layers",
}
MODEL_KEYS = {"weight": "weights", "density": "density", "tall_lambda": "tall_lambda"}
MODEL_DEFAULTS = {"weight": 1.0, "density": 1.0, "tall_lambda": 0.4}
DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass
class Recipe:
    """A parsed recipe: the base, the tuned models (in order), the config and the dtype it asks to write."""

    base: str
    models: list[str]
    config: MergeConfig
    dtype: str | None = None

    def run(self, out: str | os.PathLike, **kwargs: Any) -> MergeReport:
        """Merge as the recipe says into ``out`` (keywords as :func:`~hfhooks.merging.merge`). A ``dtype`` that
        is not the base's is refused: the merge is computed in float32 and written in the base's dtype."""
        if self.dtype is not None:
            from hfhooks.io.checkpoints import Checkpoint

            with Checkpoint(self.base, allow_pickle=kwargs.get("allow_pickle", False)) as ckpt:
                have = sorted(
                    {
                        str(ckpt.info(n).dtype).removeprefix("torch.")
                        for n in ckpt
                        if ckpt.info(n).dtype.is_floating_point
                    }
                )
            if have != [self.dtype]:
                raise ValueError(
                    f"recipe: dtype={self.dtype!r} but the base's weights are {', '.join(have)}; hfhooks computes "
                    "in float32 and writes the base's dtype: drop dtype, or set it to the base's."
                )
        return merge(self.base, self.models, config=self.config, out=out, **kwargs)


def _read(source: str | os.PathLike) -> dict[str, Any]:
    path = Path(source)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{path}: reading a YAML recipe needs PyYAML (pip install pyyaml), or write the recipe as JSON."
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a recipe is a mapping with merge_method, base_model and models.")
    return dict(data)


def _scalar(where: str, key: str, value: Any) -> Any:
    if isinstance(value, list | Mapping) and key not in ("names",):
        raise ValueError(
            f"{where}: {key}={value!r}: only one value per model is supported (mergekit's per-tensor filter "
            "lists are not); use names= / layers= to merge part of the model."
        )
    return value


def _models(data: Mapping[str, Any]) -> tuple[list[str], dict[str, list[Any]]]:
    """The tuned models' paths and their per-model parameters (``None`` where a model does not set one)."""
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError("recipe: 'models' must be a non-empty list of {model: PATH, parameters: {...}}.")
    paths: list[str] = []
    per: dict[str, list[Any]] = {k: [] for k in MODEL_KEYS}
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
            raise ValueError(
                f"recipe: models[{i}] must be {{model: PATH, parameters: {{...}}}}, got {entry!r}."
            )
        unknown = set(entry) - {"model", "parameters"}
        if unknown:
            raise ValueError(
                f"recipe: models[{i}] has unknown key(s) {sorted(unknown)}; known: model, parameters."
            )
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ValueError(
                f"recipe: models[{i}].parameters={params!r} must be a mapping, e.g. {{weight: 1.0, density: 0.5}}."
            )
        bad = set(params) - set(MODEL_KEYS)
        if bad:
            raise ValueError(
                f"recipe: models[{i}].parameters has unknown key(s) {sorted(bad)}; known: {sorted(MODEL_KEYS)}."
            )
        paths.append(entry["model"])
        for key in MODEL_KEYS:
            per[key].append(_scalar(f"models[{i}]", key, params.get(key)))
    return paths, per


def load_recipe(source: str | os.PathLike | Mapping[str, Any]) -> Recipe:
    """Read a recipe (a ``.yaml`` / ``.yml`` / ``.json`` file, or an already-parsed mapping) into a :class:`Recipe`.

    Per-model ``weight`` / ``density`` / ``tall_lambda`` override the method-wide value under ``parameters``;
    a model that sets neither gets the method's default. Every key is checked; an unknown one is an error.
    """
    data = dict(source) if isinstance(source, Mapping) else _read(source)
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {sorted(unknown)}; hfhooks reads {sorted(TOP_KEYS)}.")
    method = data.get("merge_method", "task_arithmetic")
    if method not in METHODS:
        raise ValueError(f"recipe: merge_method={method!r} is not one of {', '.join(METHODS)}.")
    base = data.get("base_model")
    if not isinstance(base, str):
        raise ValueError(
            "recipe: base_model must be the path of the base checkpoint (every method needs one)."
        )
    paths, per = _models(data)
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"recipe: parameters={params!r} must be a mapping, e.g. {{lambda: 1.0}}.")
    params = dict(params)
    bad = set(params) - set(GLOBAL_KEYS) - set(MODEL_KEYS)
    if bad:
        raise ValueError(
            f"recipe: parameters has unknown key(s) {sorted(bad)}; known: {sorted(set(GLOBAL_KEYS) | set(MODEL_KEYS))}."
        )
    fields: dict[str, Any] = {"method": method}
    for key, name in GLOBAL_KEYS.items():
        if key in params and key not in MODEL_KEYS:
            fields[name] = _scalar("parameters", key, params[key])
    for key, name in MODEL_KEYS.items():
        default = _scalar("parameters", key, params.get(key))
        values = [default if v is None else v for v in per[key]]
        if any(v is not None for v in values):  # a model that sets nothing gets the method's default
            fields[name] = tuple(MODEL_DEFAULTS[key] if v is None else v for v in values)
    given = {k: data[k] for k in ("dtype", "out_dtype") if data.get(k) is not None}
    if len(set(map(str, given.values()))) > 1:  # one of them would be ignored
        raise ValueError(
            f"recipe: dtype={given['dtype']!r} and out_dtype={given['out_dtype']!r} differ; hfhooks computes in "
            "float32 and writes the base's dtype: give one, the base's."
        )
    dtype = next(iter(given.values()), None)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"recipe: dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    return Recipe(base, paths, MergeConfig(**fields), dtype)
