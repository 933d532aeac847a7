"""Model merging: one-pass, streaming merges of fine-tuned models into their base.

:func:`merge` (and ``hfhooks merge``) combines the task vectors ``τ_t = θ_t − θ_base`` of several fine-tuned
models — task arithmetic, TIES, DARE (linear and TIES), magnitude pruning, TALL-masked and consensus merges —
reading checkpoint directories tensor by tensor and writing the result with the bounded-memory, atomic
:func:`hfhooks.io.edit.edit_checkpoint`. No diff file is written; diffs stay available in :mod:`hfhooks.diffs`
for those who want to save, inspect or compose them.

Modules (lower ones never import higher ones):

* :mod:`~hfhooks.merging.config` — :class:`MergeConfig`, the method and its parameters;
* :mod:`~hfhooks.merging.methods` — the methods on one tensor (:func:`merge_tensors`, pruning, sign election);
* :mod:`~hfhooks.merging.merge` — :func:`merge`, streaming over checkpoints, models and state dicts;
* :mod:`~hfhooks.merging.recipe` — YAML / JSON recipes in the style of mergekit's (:func:`load_recipe`).

Definitions, sources and where peft and mergekit differ: ``docs/merging.md``.
"""

from __future__ import annotations

from hfhooks.merging.config import METHODS, MergeConfig
from hfhooks.merging.merge import MergeReport, merge
from hfhooks.merging.methods import dare_keep_mask, magnitude_mask, merge_tensors
from hfhooks.merging.recipe import Recipe, load_recipe

__all__ = [
    "METHODS",
    "MergeConfig",
    "MergeReport",
    "Recipe",
    "dare_keep_mask",
    "load_recipe",
    "magnitude_mask",
    "merge",
    "merge_tensors",
]
