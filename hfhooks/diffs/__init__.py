"""Weight diffs (task vectors): extract, apply, negate, add, compose, restrict, quantise, TALL masks, LoRA.

A :class:`WeightDiff` is ``Δ = θ_tuned − θ_base`` keyed by canonical parameter names. Applying it computes
``θ + scale·Δ`` in ``float32`` (or wider) and casts back to each tensor's dtype; coordinates where ``Δ = 0``
are left bit-for-bit untouched.

Guarantees:

* **Wrong base refused.** Every entry records a CRC-32 fingerprint of the base tensor it was computed from
  (and of the target). :meth:`WeightDiff.apply` checks it before changing anything and raises
  :class:`BaseMismatchError` naming the tensors that differ (``check_base=False`` applies anyway, e.g. for task
  arithmetic on purpose).
* **Exact and compact.** :meth:`WeightDiff.between` stores Δ in the weights' own dtype plus a sparse exact
  correction (the coordinates where ``base + Δ`` misses the target, with the target's values), so applying it
  to its base reproduces the target bit for bit in every float dtype, and unchanged tensors cost no bytes
  (``exact="both"`` corrects ``target − Δ`` too). The correction holds at scale 1 on the verified base only;
  the flags ``exact`` / ``exact_inverse`` say per tensor what holds, and operations that lose exactness
  (scaling, quantising, masking, adding) drop the correction and clear the flags instead of lying.
* **LoRA stays small.** :meth:`WeightDiff.from_lora` stores each adapted module's ``B``, ``A`` and scaling
  (``factored``), expanded on apply; :meth:`WeightDiff.to_dense` expands on demand.
* **Bounded memory.** Diffs between checkpoint directories stream tensor by tensor into the diff file
  (``out=``); a large diff file is read lazily (``WeightDiff.load(path, lazy=True)``), with each tensor's
  CRC-32 verified as it is read; applying to a checkpoint streams through
  :func:`hfhooks.io.edit.edit_checkpoint`.

File format (an hfhooks artifact of kind ``diff``, readable with plain ``safetensors``):

* dense entry: ``<name>`` holds Δ;
* masked-sparse entry: ``<name>::mask`` (``U8``, the bit-packed mask, big bit order like ``numpy.packbits``)
  and ``<name>::values`` (Δ at the set positions, row-major order);
* zero entry (Δ = 0): no tensors;
* factored entry: ``<name>::lora_B``, ``<name>::lora_A``, ``<name>::scaling`` (Δ = (B·A)·scaling, transposed
  when ``transposed``);
* exact correction (on any entry): ``<name>::fix_gaps`` (16-bit gaps between sorted flat indices) and
  ``<name>::fix_values``; ``::unfix_gaps`` / ``::unfix_values`` for ``−Δ``;
* quantised entry: ``<name>::codes`` (``U8``, codes of ``bits`` bits packed big-endian within each byte),
  ``<name>::range`` (Δ at code 0 and at code ``levels − 1``; Δ = r0 + code·(r1 − r0)/(levels − 1)) and, if
  masked, ``<name>::mask``;
* metadata ``hfhooks.tensors`` = ``{name: {shape, dtype, storage, levels, bits, nnz, transposed, fixes,
  unfixes, fix_dtype, base, target, exact, exact_inverse, changed, crc32}}``, ``hfhooks.diff_format`` (2;
  absent: format 1, still read), plus ``hfhooks.base`` / ``hfhooks.target`` (model fingerprints),
  ``hfhooks.exact``, ``hfhooks.scale``, ``hfhooks.ops`` (how it was made) and ``hfhooks.meta_digest``.

Modules (one concept each; lower ones never import higher ones):

* :mod:`~hfhooks.diffs.entries` — ``DiffEntry``, payloads, fingerprints and CRCs, errors;
* :mod:`~hfhooks.diffs.source` — uniform reads from models, checkpoint directories and state dicts;
* :mod:`~hfhooks.diffs.codec` — one entry ⇄ its stored tensors and metadata (bit and code packing);
* :mod:`~hfhooks.diffs.fileformat` — writing, reading and validating diff files (lazy reads, CRC thread);
* :mod:`~hfhooks.diffs.arithmetic` — Δ between tensors, θ + scale·Δ, the payload maps behind the algebra;
* :mod:`~hfhooks.diffs.lora` — LoRA adapters as diffs;
* :mod:`~hfhooks.diffs.core` — the :class:`WeightDiff` class;
* :mod:`~hfhooks.diffs.merging` — TALL masks and consensus merging.

Example:
    >>> import torch
    >>> base, tuned = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    >>> d = WeightDiff.between(base, tuned, exact="both", progress=False)
    >>> d.exact, sorted(d.names())
    (True, ['bias', 'weight'])
    >>> _ = d.apply(base)
    >>> torch.equal(base.weight, tuned.weight)
    True
    >>> _ = d.negate().apply(base)  # back to where it started
"""

from __future__ import annotations

from hfhooks.diffs.core import WeightDiff
from hfhooks.diffs.entries import STORAGES, BaseMismatchError, DiffFileError, tensor_fingerprint
from hfhooks.diffs.merging import consensus_mask, consensus_merge, tall_masks

__all__ = [
    "STORAGES",
    "BaseMismatchError",
    "DiffFileError",
    "WeightDiff",
    "consensus_mask",
    "consensus_merge",
    "tall_masks",
    "tensor_fingerprint",
]
