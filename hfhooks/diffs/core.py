"""The :class:`WeightDiff` class: extraction, access, algebra, narrowing, storage, applying, save / load.

The class is the public face of :mod:`hfhooks.diffs`: it checks arguments, names and bases, and hands the
per-tensor work on — reading inputs to :mod:`~hfhooks.diffs.source`, payload arithmetic to
:mod:`~hfhooks.diffs.arithmetic`, files to :mod:`~hfhooks.diffs.fileformat`, LoRA adapters to
:mod:`~hfhooks.diffs.lora`. :func:`_combine` (``+``, ``-`` and :meth:`~WeightDiff.compose`) lives here
because it builds one ``WeightDiff`` from two.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfhooks.core.params import ParamIndex, UnknownParameterError, canonical_name
from hfhooks.diffs.arithmetic import (
    add_delta,
    apply_fn,
    between_entry,
    mapped_loader,
    mask_payload,
    negate_payload,
    quantize_payload,
    scale_payload,
    sparse_is_smaller,
    sparsify_payload,
    uses_fix,
)
from hfhooks.diffs.codec import stored_tensors
from hfhooks.diffs.entries import (
    INEXACT,
    BaseMismatchError,
    DiffEntry,
    DiffFileError,
    all_flags,
    const_loader,
    decode_payload,
    dense_entry,
    diff_fingerprint,
    dtype_name,
    entry_bases,
    is_changed,
    linear_base,
    mismatch_message,
    progress_bar,
    tensor_fingerprint,
    with_fix,
    without_fix,
)
from hfhooks.diffs.fileformat import RESERVED_META, read_diff, verify_payloads, write_diff
from hfhooks.diffs.lora import lora_from_dir, lora_from_model
from hfhooks.diffs.source import WeightSource, select_names
from hfhooks.io.checkpoints import Checkpoint, layer_map, parse_layers
from hfhooks.io.edit import edit_checkpoint
from hfhooks.io.hub import HubMixin
from hfhooks.io.pipeline import prefetched
from hfhooks.io.safetensors import ReadBuffer
from hfhooks.masks.mask import ParamMask


class WeightDiff(HubMixin):
    """``Δ = θ_tuned − θ_base`` per canonical parameter name, with provenance (see the module docstring).

    Build one with :meth:`between`, :meth:`from_lora`, :meth:`load`, or from ``{name: Δ}`` tensors directly
    (no base fingerprint then). Combine with ``-d``, ``d1 + d2``, ``c * d``, :meth:`compose`; narrow with
    :meth:`restrict` and :meth:`changed_only`; shrink with :meth:`quantize` and :meth:`to_sparse`.
    """

    hub_filename = "diff.safetensors"  # the file from_pretrained / save_pretrained / push_to_hub use

    def __init__(
        self,
        deltas: Mapping[str, torch.Tensor] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ):
        self.entries: dict[str, DiffEntry] = {}
        for name, delta in (deltas or {}).items():
            delta = torch.as_tensor(delta).detach().cpu()
            if not delta.is_floating_point():
                raise ValueError(f"Δ for {name!r} must be a floating-point tensor, got {delta.dtype}.")
            self.entries[name] = dense_entry(delta)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.metadata.setdefault("ops", [])

    @classmethod
    def _of(cls, entries: Mapping[str, DiffEntry], metadata: Mapping[str, Any], op: Any) -> WeightDiff:
        diff = cls(metadata={**metadata, "ops": [*metadata.get("ops", []), op]})
        diff.entries = dict(entries)
        diff._refresh_fingerprints()
        return diff

    def _refresh_fingerprints(self) -> None:
        self.metadata["base"] = diff_fingerprint({n: (e.shape, e.base) for n, e in self.entries.items()})
        self.metadata["target"] = diff_fingerprint({n: (e.shape, e.target) for n, e in self.entries.items()})

    # -- access --------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> torch.Tensor:
        """Dense Δ of one tensor."""
        return self.entry(name).dense()

    def entry(self, name: str) -> DiffEntry:
        if name not in self.entries:
            raise UnknownParameterError(f"{name!r} is not in this diff ({len(self)} tensors).")
        return self.entries[name]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """``{name: dense Δ}`` (everything in memory)."""
        return {n: e.dense() for n, e in self.entries.items()}

    def materialize(self) -> WeightDiff:
        """A copy with every payload loaded into memory (a file-backed diff stops reading its file)."""
        entries = {n: replace(e, load=const_loader(e.load())) for n, e in self.entries.items()}
        diff = WeightDiff._of(entries, self.metadata, "materialize")
        diff.metadata["ops"] = list(self.metadata.get("ops", []))
        return diff

    @property
    def exact(self) -> bool | None:
        """Does ``base + Δ`` reproduce the target bit for bit on every tensor (``None``: not known)?"""
        return all_flags(e.exact for e in self.entries.values())

    @property
    def exact_inverse(self) -> bool | None:
        """Does ``target − Δ`` reproduce the base bit for bit on every tensor?"""
        return all_flags(e.exact_inverse for e in self.entries.values())

    @property
    def changed(self) -> list[str]:
        """Names whose target differs from the base (computed from Δ where the diff does not know)."""
        return [n for n, e in self.entries.items() if is_changed(e)]

    @property
    def unchanged(self) -> list[str]:
        return [n for n, e in self.entries.items() if not is_changed(e)]

    def nbytes(self) -> int:
        """Bytes the stored tensors take (what :meth:`save` writes, without the header)."""
        total = 0
        for n, e in self.entries.items():
            total += sum(t.numel() * t.element_size() for t in stored_tensors(n, e, e.load()).values())
        return total

    def summary(self) -> list[dict[str, Any]]:
        """Per-tensor rows: name, shape, storage, dtype, exact, changed, stored bytes, max |Δ|."""
        rows = []
        for n, e in self.entries.items():
            payload = e.load()
            stored = stored_tensors(n, e, payload)
            delta = decode_payload(e, payload)
            rows.append(
                {
                    "name": n,
                    "shape": list(e.shape),
                    "storage": e.storage,
                    "dtype": dtype_name(e.dtype),
                    "levels": e.levels,
                    "exact": e.exact,
                    "changed": is_changed(e),
                    "bytes": sum(t.numel() * t.element_size() for t in stored.values()),
                    "max_abs": float(delta.abs().max()) if delta.numel() else 0.0,
                }
            )
        return rows

    def __repr__(self) -> str:
        kinds = sorted({e.storage for e in self.entries.values()})
        return (
            f"WeightDiff({len(self)} tensors, {'/'.join(kinds) or 'empty'}, exact={self.exact}, "
            f"scale={self.metadata.get('scale', 1.0)})"
        )

    # -- extraction ----------------------------------------------------------------------------------------
    @classmethod
    def between(
        cls,
        base: Any,
        tuned: Any,
        *,
        names: str | Iterable[str] | None = None,
        dtype: torch.dtype | None = None,
        storage: str = "dense",
        exact: bool | str = True,
        changed_only: bool = False,
        strict: bool = True,
        out: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
        dry_run: bool = False,
    ) -> WeightDiff:
        """``Δ = tuned − base`` for two models, checkpoint directories or state dicts (any mix).

        Args:
            names: only these tensors (names, globs, or ``re:`` regexes); default: all.
            dtype: storage dtype of Δ; default: the weights' own dtype (bf16 Δ for a bf16 checkpoint), so the
                file is about the size of the changed tensors.
            storage: ``"dense"``, ``"sparse"`` (``mask`` = where the weights changed) or ``"auto"`` (per
                tensor, whichever is smaller). A Δ that is zero everywhere is a ``zero`` entry (no bytes).
            exact: store the sparse exact correction — the coordinates where ``base + Δ`` misses ``tuned``
                bit for bit, with ``tuned``'s values there — so that applying at scale 1 to the base
                reproduces ``tuned`` exactly for any dtype. ``"both"``: also the coordinates where
                ``tuned − Δ`` misses the base, so ``−Δ`` undoes it exactly. ``False``: Δ alone; the flags
                then say whether it round-trips.
            changed_only: leave out tensors that did not change (listed under ``metadata["unchanged"]``).
            strict: names present in only one side are an error (``False``: skipped and listed).
            out: stream straight into this diff file (bounded memory for big checkpoints) and return the
                diff backed by it, lazily loaded.
            dry_run: check the sources, names and shapes only and return an empty diff whose
                ``metadata["planned"]`` / ``["planned_numel"]`` list the tensors that would be diffed and
                ``["planned_bytes"]`` estimates the Δ bytes.
        """
        if storage not in ("dense", "sparse", "auto"):
            raise ValueError(f"storage={storage!r}: use 'dense', 'sparse' or 'auto'.")
        if exact not in (True, False, "both"):
            raise ValueError(f"exact={exact!r}: use True (exact apply), 'both' (exact undo too) or False.")
        a, b = WeightSource(base, allow_pickle), WeightSource(tuned, allow_pickle)
        selected = select_names(a.names, names)
        only_a = [n for n in selected if n not in b]
        only_b = [n for n in select_names(b.names, names, quiet=True) if n not in a]
        if (only_a or only_b) and strict:
            n = (only_a or only_b)[0]
            side = "tuned" if only_a else "base"
            msg = b.unknown(n) if only_a else a.unknown(n)
            raise UnknownParameterError(
                f"The models do not have the same parameters: {len(only_a)} only in base, {len(only_b)} only in "
                f"tuned ({n!r} is missing from {side}: {msg}). Pass strict=False to diff the common ones."
            )
        common = [n for n in selected if n in b]
        for n in common:
            if a.shape(n) != b.shape(n):
                raise ValueError(f"Shape mismatch for {n!r}: base {a.shape(n)}, tuned {b.shape(n)}.")
        meta = {
            "ops": [{"op": "between", "base": a.label, "tuned": b.label, "storage": storage, "exact": exact}],
            "scale": 1.0,
            "skipped": sorted(only_a + only_b),
        }
        if dry_run:
            numel = [math.prod(a.shape(n)) for n in common]
            # Δ is stored in the weights' own dtype by default (plus a small exact correction, not estimated)
            size = [torch.tensor([], dtype=dtype or a.dtype(n)).element_size() for n in common]
            planned_bytes = sum(k * s for k, s in zip(numel, size))
            return cls(
                metadata={**meta, "planned": common, "planned_numel": numel, "planned_bytes": planned_bytes}
            )

        def entries() -> Iterator[tuple[str, DiffEntry | None]]:
            for n in common:
                entry = between_entry(a.get(n), b.get(n), dtype, storage, exact, name=n)
                yield n, (None if changed_only and not entry.changed else entry)

        if out is not None:
            # the next tensor is read and diffed on a second thread while this one is written and checksummed;
            # closed here, so a write that fails stops and joins that thread before the error leaves (the
            # traceback keeps write_diff's frames, and with them the generator, alive)
            with contextlib.closing(prefetched(entries())) as items:
                written = write_diff(out, items, meta, common, progress, desc="diff", inputs=[base, tuned])
            return cls.load(written, lazy=True)
        diff = cls(metadata=meta)
        unchanged = []
        for n, entry in progress_bar(entries(), len(common), progress, "diff"):
            if entry is None:
                unchanged.append(n)
            else:
                diff.entries[n] = entry
        diff.metadata["unchanged"] = unchanged
        diff._refresh_fingerprints()
        return diff

    @classmethod
    def from_lora(
        cls,
        model_or_dir: nn.Module | str | os.PathLike,
        adapter: str | None = None,
        *,
        base: Any = None,
        dtype: torch.dtype | None = None,
    ) -> WeightDiff:
        """A LoRA adapter as a diff on the base weights: ``ΔW = s·B·A`` per module, stored factored.

        A module with one 2-D adapter is a ``factored`` entry holding ``B``, ``A`` and ``s`` (the file is about
        the adapter's size), expanded as peft's merge computes it when applied or read; :meth:`to_dense`
        expands it on demand. Summed adapters, convolutions and biases are dense entries.

        ``s`` is the adapter's scaling (``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA; per-module
        ``rank_pattern`` / ``alpha_pattern`` resolved by peft's own rules). Works on a ``PeftModel``
        (``adapter``: one adapter name; default: the active adapters, summed) or an adapter directory
        (``adapter_config.json`` + ``adapter_model.safetensors``; pass ``base=`` — a model or checkpoint — to
        record base fingerprints). A ``lora_B`` bias (``lora_bias=True``) becomes ``s·bias`` on the base bias;
        ``modules_to_save`` copies become dense entries (copy − original; from a directory they need ``base=``).
        ``dtype``: Δ's dtype (default ``float32`` for ``s·B·A``; copies default to the weights' dtype with the
        exact correction). DoRA and adapter tensors of any other kind are refused.
        """
        if isinstance(model_or_dir, nn.Module):
            entries, op = lora_from_model(model_or_dir, adapter, dtype)
        else:
            entries, op = lora_from_dir(Path(model_or_dir), base, dtype)
        return cls._of(entries, {"scale": 1.0}, op)

    # -- algebra -------------------------------------------------------------------------------------------
    # Diffs of one base form a vector space: ``+``, ``-``, unary ``-``, ``c * d``, ``d * c`` and ``d / c`` give
    # the same Δ as the same combination done tensor by tensor, keep the base fingerprint, and record the
    # operation in ``metadata["ops"]``; diffs of different bases are refused (BaseMismatchError).
    def negate(self) -> WeightDiff:
        """``−Δ``: applied to the target, gives back the base (its base and target fingerprints swap). It is
        also ``−1·Δ`` of the original base: it applies there too (task negation) and combines linearly with
        other diffs of that base (``-d1 + d2``)."""
        entries = {}
        for n, e in self.entries.items():
            entries[n] = replace(
                e,
                load=mapped_loader(e, negate_payload),
                base=e.target,
                target=e.base,
                exact=e.exact_inverse,
                exact_inverse=e.exact,
                negated_base=linear_base(e),
                fixes=e.unfixes,
                unfixes=e.fixes,
            )
        diff = WeightDiff._of(entries, self.metadata, "negate")
        diff.metadata["scale"] = _times(self.metadata, -1.0)
        return diff

    def __neg__(self) -> WeightDiff:
        return self.negate()

    def scale(self, c: float) -> WeightDiff:
        """``c·Δ`` (its target is unknown unless ``c == 1``)."""
        return self._scaled(float(c), divide=False)

    def _scaled(self, c: float, divide: bool) -> WeightDiff:
        if c == 1.0:  # exact: entries (and their corrections) unchanged, the operation still recorded
            return WeightDiff._of(
                self.entries, self.metadata, {"op": "divide" if divide else "scale", "c": c}
            )
        if divide and c == 0:
            raise ZeroDivisionError("Cannot divide a diff by 0.")
        if not math.isfinite(c):  # inf·Δ is ±inf / NaN everywhere, Δ / inf is 0: never a useful task vector
            raise ValueError(f"Cannot {'divide' if divide else 'scale'} a diff by {c}: use a finite number.")
        entries = {
            n: replace(
                e,
                load=mapped_loader(e, lambda p, e=e: scale_payload(e, p, c, divide)),
                **INEXACT,  # the exact correction holds at scale 1 only
                changed=e.changed if divide or c != 0 else False,
            )
            for n, e in self.entries.items()
        }
        diff = WeightDiff._of(entries, self.metadata, {"op": "divide" if divide else "scale", "c": c})
        diff.metadata["scale"] = _times(self.metadata, 1 / c if divide else c)
        return diff

    def __mul__(self, c: float) -> WeightDiff:
        if not _is_scalar(c):
            return NotImplemented
        return self.scale(c)

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> WeightDiff:
        """``Δ / c`` (computed as a division, like the same division on the tensors)."""
        if not _is_scalar(c):
            return NotImplemented
        return self._scaled(float(c), divide=True)

    def add(self, other: WeightDiff) -> WeightDiff:
        """``Δ₁ + Δ₂`` for two diffs from the same base (task arithmetic). Mismatched bases are refused."""
        return _linear(self, other, "add")

    def subtract(self, other: WeightDiff) -> WeightDiff:
        """``Δ₁ − Δ₂`` for two diffs from the same base; the result is a diff of that base."""
        return _linear(self, other, "subtract")

    def __add__(self, other: WeightDiff) -> WeightDiff:
        if not isinstance(other, WeightDiff):
            return NotImplemented
        return self.add(other)

    def __sub__(self, other: WeightDiff) -> WeightDiff:
        if not isinstance(other, WeightDiff):
            return NotImplemented
        return self.subtract(other)

    def compose(self, other: WeightDiff) -> WeightDiff:
        """This diff, then ``other`` (taken on top of this one's target): one diff from this base to ``other``'s
        target. Refused if ``other`` was not computed on this diff's target."""
        for n in self.entries.keys() & other.entries.keys():
            ta, bb = self.entries[n].target, other.entries[n].base
            if ta and bb and ta != bb:
                raise BaseMismatchError(
                    f"Cannot compose: {n!r} of the second diff was computed on {bb}, but the first diff ends at "
                    f"{ta}. compose(a, b) needs b computed on a's target; for two diffs of one base, use add()."
                )
        return _combine(self, other, "compose", lambda x, y: x + y, lambda a, b: (a.base, b.target))

    # -- narrowing -----------------------------------------------------------------------------------------
    def restrict(
        self,
        *,
        layers: str | Iterable[int] | slice | None = None,
        names: str | Iterable[str] | None = None,
        mask: ParamMask | None = None,
    ) -> WeightDiff:
        """Keep only some of Δ: decoder ``layers`` (by index; embeddings, final norm and heads dropped),
        ``names`` (names, globs or ``re:`` regexes), and/or the coordinates a :class:`~hfhooks.ParamMask`
        keeps (masked-sparse storage; names the mask does not list are dropped)."""
        keep = list(self.entries)
        ops: dict[str, Any] = {"op": "restrict"}
        if names is not None:
            names = names if isinstance(names, str) else list(names)
            if not names:  # select_names would keep nothing: an empty diff that silently applies as a no-op
                raise ValueError("restrict(names=[]) selects no tensor; pass names=None to keep them all.")
            keep = select_names(keep, names)
            ops["names"] = names
        if layers is not None:
            path, of = layer_map(keep)
            if path is None:
                raise ValueError(
                    "These tensor names have no decoder-layer structure; restrict by names instead."
                )
            wanted = set(parse_layers(layers, 1 + max(i for i in of.values() if i is not None)))
            keep = [n for n in keep if of[n] in wanted]
            ops["layers"] = sorted(wanted)
            if not keep:
                raise ValueError(f"No tensor of this diff is in layers {sorted(wanted)} of {path}.")
        entries = {n: self.entries[n] for n in keep}
        if mask is not None:
            hit = [n for n in entries if n in mask]
            if not hit:
                raise UnknownParameterError(
                    f"The mask names none of this diff's tensors (mask: {len(mask)} tensors, e.g. "
                    f"{next(iter(mask), '?')!r}; diff: e.g. {next(iter(entries), '?')!r})."
                )
            masked = {}
            for n in hit:
                e = entries[n]
                if tuple(mask.shape(n)) != e.shape:
                    raise ValueError(f"Mask shape {mask.shape(n)} does not match Δ {e.shape} for {n!r}.")
                bits = mask[n]
                full = bool(bits.all())
                masked[n] = (
                    e
                    if full
                    else replace(
                        e,
                        load=mapped_loader(e, lambda p, e=e, bits=bits: mask_payload(e, p, bits)),
                        storage="quantized" if e.storage == "quantized" else "sparse",
                        **INEXACT,
                        changed=None,
                        transposed=False,  # a former factored entry's values are Δ itself now
                    )
                )
            entries = masked
            ops["mask"] = {"tensors": len(hit), "density": round(mask.density(), 6)}
        dropped = [n for n in self.entries if n not in entries]
        diff = WeightDiff._of(entries, self.metadata, ops)
        diff.metadata["dropped"] = dropped
        return diff

    def changed_only(self) -> WeightDiff:
        """Only the tensors that changed; the others are listed in ``metadata["unchanged"]``."""
        unchanged = self.unchanged
        entries = {n: e for n, e in self.entries.items() if n not in set(unchanged)}
        diff = WeightDiff._of(entries, self.metadata, "changed_only")
        diff.metadata["unchanged"] = sorted(set(self.metadata.get("unchanged", [])) | set(unchanged))
        return diff

    # -- storage -------------------------------------------------------------------------------------------
    def quantize(self, levels: int = 16, names: str | Iterable[str] | None = None) -> WeightDiff:
        """Per-tensor min–max quantisation of Δ to ``levels`` (2–256) evenly spaced values.

        Codes take ``1``, ``2``, ``4`` or ``8`` bits (16 levels: 8× smaller than ``float32``). Zeros are not
        preserved in dense tensors (the grid spans [min, max]); masked-sparse entries keep exact zeros off the
        mask. The result is not exact (``exact = None``).
        """
        if not isinstance(levels, int) or not 2 <= levels <= 256:
            raise ValueError(f"levels={levels!r}: use an integer from 2 to 256.")
        chosen = set(select_names(list(self.entries), names)) if names is not None else set(self.entries)
        entries = {}
        for n, e in self.entries.items():
            if n not in chosen:
                entries[n] = e
                continue
            entries[n] = replace(
                e,
                load=mapped_loader(e, lambda p, e=e: quantize_payload(e, p, levels)),
                storage="quantized",
                levels=levels,
                **INEXACT,
                transposed=False,  # codes of Δ itself, whatever the entry's storage was
            )
        return WeightDiff._of(entries, self.metadata, {"op": "quantize", "levels": levels})

    def to_sparse(self) -> WeightDiff:
        """Masked-sparse storage with mask = (Δ ≠ 0); lossless (quantised entries are decoded first)."""
        entries = {
            n: replace(
                e,
                load=mapped_loader(e, lambda p, e=e: sparsify_payload(e, p)),
                storage="sparse",
                levels=None,
                transposed=False,  # a former factored entry's flag: sparse values are stored as Δ itself
            )
            for n, e in self.entries.items()
        }
        return WeightDiff._of(entries, self.metadata, "to_sparse")

    def to_auto(self) -> WeightDiff:
        """Per tensor the smallest of its storage (dense or factored) and masked-sparse storage, and no bytes
        (``zero``) where Δ is zero (``storage="auto"`` of :meth:`between`); reads each Δ once, one tensor at a
        time, to decide. Lossless: exact corrections are kept."""
        entries = {}
        for n, e in self.entries.items():
            if e.storage in ("dense", "factored"):
                delta = e.dense()
                if not bool(delta.ne(0).any()):
                    e = replace(
                        e, load=mapped_loader(e, lambda p: with_fix(p, {})), storage="zero", transposed=False
                    )
                elif sparse_is_smaller(delta, limit=self._stored_bytes(n, e)):
                    load = mapped_loader(e, lambda p, e=e: sparsify_payload(e, p))
                    e = replace(e, load=load, storage="sparse", transposed=False)
            entries[n] = e
        return WeightDiff._of(entries, self.metadata, "to_auto")

    @staticmethod
    def _stored_bytes(name: str, e: DiffEntry) -> int:
        """Bytes of Δ's own tensors (the exact correction costs the same in every storage)."""
        e = replace(e, fixes=0, unfixes=0)
        return sum(
            t.numel() * t.element_size() for t in stored_tensors(name, e, without_fix(e.load())).values()
        )

    def to_dense(self) -> WeightDiff:
        """Dense storage (lossless; a factored LoRA Δ is expanded, an exact correction kept)."""
        entries = {
            n: replace(
                e,
                load=mapped_loader(e, lambda p, e=e: with_fix(p, {"values": decode_payload(e, p)})),
                storage="dense",
                levels=None,
                transposed=False,
            )
            for n, e in self.entries.items()
        }
        return WeightDiff._of(entries, self.metadata, "to_dense")

    # -- applying ------------------------------------------------------------------------------------------
    def apply(
        self,
        target: Any,
        scale: float = 1.0,
        *,
        out: str | os.PathLike | None = None,
        check_base: bool = True,
        overwrite: bool = False,
        max_shard_size: int | str | None = None,
        fsync: bool = False,
        allow_pickle: bool = False,
        progress: bool = True,
        dry_run: bool = False,
    ) -> Any:
        """``θ ← θ + scale·Δ`` on a model (in place; returns it) or a checkpoint directory (streamed into
        ``out``; pass ``out=target`` for an atomic in-place edit; returns the output path).

        With ``check_base`` (default) every tensor's fingerprint must match the diff's base before anything
        changes — :class:`BaseMismatchError` otherwise. Coordinates where Δ is zero stay bit-identical.
        ``dry_run`` (checkpoints only): check names, shapes and the output path, return it, write nothing.
        """
        if isinstance(target, nn.Module):
            return self._apply_model(target, float(scale), check_base)
        if out is None:
            raise ValueError(
                "Applying to a checkpoint needs out= (a new directory; out=<the checkpoint> edits it in place)."
            )
        ckpt = Checkpoint(target, allow_pickle=allow_pickle)
        stored = {canonical_name(n): n for n in ckpt} if ckpt.kind == "adapter" else None
        edits, buffer = {}, ReadBuffer()  # Δ of one tensor at a time, read into one reused buffer
        for name, entry in self.entries.items():
            key = stored.get(name, name) if stored else name
            if key not in ckpt:
                raise UnknownParameterError(f"Cannot apply the diff: {ckpt.unknown_message(name)}")
            if ckpt.info(key).shape != entry.shape:
                raise ValueError(
                    f"Shape mismatch for {name!r}: diff {entry.shape}, checkpoint {ckpt.info(key).shape}."
                )
            edits[key] = apply_fn(name, entry, float(scale), check_base, buffer)
        record = {"op": "apply_diff", "scale": float(scale), "tensors": len(edits), "diff": self._describe()}
        return edit_checkpoint(
            ckpt,
            Path(out),
            edits,
            record=record,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            fsync=fsync,
            progress=progress,
            desc="apply diff",
            inputs=[self.metadata.get("path")],
            dry_run=dry_run,  # the diff file, when the output could destroy it
        )

    def _apply_model(self, model: nn.Module, scale: float, check_base: bool) -> nn.Module:
        index = ParamIndex(model)
        params: dict[str, tuple[nn.Parameter, DiffEntry]] = {}
        for name, entry in self.entries.items():
            info = index.info(name)
            if tuple(info.shape) != entry.shape:
                raise ValueError(
                    f"Shape mismatch for {name!r}: diff {entry.shape}, model {tuple(info.shape)}."
                )
            if info.name in params:  # tied weights named twice: one update only
                if params[info.name][1] is not entry:
                    raise ValueError(
                        f"{name!r} is tied to {info.name!r}; the diff must name only one of them."
                    )
                continue
            params[info.name] = (info.param, entry)
        fixed: set[str] = set()  # parameters verified to be their entry's base: the exact correction applies
        if check_base:
            bad = []
            for n, (p, e) in params.items():
                if entry_bases(e):
                    fp = tensor_fingerprint(p)
                    if fp not in entry_bases(e):
                        bad.append((n, entry_bases(e)[0], fp))
                    elif uses_fix(e, scale, fp):
                        fixed.add(n)
            if bad:
                raise BaseMismatchError(mismatch_message(bad, len(params)))
        # All or nothing: every Δ is read — and so verified — before the first parameter changes. A lazily
        # loaded diff checks each stored tensor's CRC-32 as it is read, so a corrupt entry would otherwise raise
        # after the earlier parameters were updated. Verifying first costs a second read of the diff but only
        # one tensor's memory at a time; a snapshot to undo from would cost a copy of every parameter the diff
        # touches (the whole model for a full diff), and holding every decoded Δ would cost the whole diff —
        # what lazy=True exists to avoid.
        verify_payloads(e for _, e in params.values())
        done = 0
        with torch.no_grad():
            for name, (param, entry) in params.items():
                try:
                    new = add_delta(param.detach().cpu(), entry, scale, fix=name in fixed)
                except DiffFileError as e:  # it verified a moment ago: the file was rewritten meanwhile
                    raise DiffFileError(
                        f"{e} The diff file changed while it was being applied: {done} of {len(params)} "
                        f"parameters (those before {name!r}) were already updated; reload the model."
                    ) from None
                param.copy_(new.to(param.device))
                done += 1
        return model

    def _describe(self) -> dict[str, Any]:
        return {
            "tensors": len(self),
            "base": self.metadata.get("base"),
            "ops": self.metadata.get("ops", [])[-4:],
        }

    # -- I/O -----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, progress: bool = False, **extra: Any) -> Path:
        """Write the diff as a safetensors artifact (streamed tensor by tensor; atomic). Returns the path."""
        meta = {**{k: v for k, v in self.metadata.items() if k not in RESERVED_META}, **extra}
        items = ((n, e) for n, e in self.entries.items())
        return write_diff(path, items, meta, list(self.entries), progress, desc="save diff")

    @classmethod
    def load(cls, path: str | os.PathLike, *, lazy: bool = False) -> WeightDiff:
        """Load a diff file, verifying it. ``lazy=True`` reads tensors on demand (each CRC-checked as read)
        — for diffs too big for memory; otherwise the whole file's digest is verified up front."""
        entries, metadata = read_diff(Path(path), lazy)
        diff = cls(metadata=metadata)
        diff.entries = entries
        return diff


def _is_scalar(c: object) -> bool:
    return isinstance(c, numbers.Real) and not isinstance(c, bool)


def _times(metadata: Mapping[str, Any], c: float) -> float | None:
    """The diff-level ``scale`` record after multiplying by ``c`` (``None`` stays unknown: a sum has none)."""
    prev = metadata.get("scale", 1.0)
    return None if prev is None else c * float(prev)


def _linear(a: WeightDiff, b: WeightDiff, op: str) -> WeightDiff:
    """``a + b`` or ``a − b`` for diffs of one base (negated diffs count as diffs of their original base)."""
    for n in a.entries.keys() & b.entries.keys():
        fa, fb = linear_base(a.entries[n]), linear_base(b.entries[n])
        if fa and fb and fa != fb:
            raise BaseMismatchError(
                f"Cannot {op} diffs from different bases: {n!r} has base {fa} in one and {fb} in the other. "
                "For a diff taken on top of another (base → mid → top), use compose()."
            )
    sign = -1.0 if op == "subtract" else 1.0
    return _combine(
        a,
        b,
        op,
        (lambda x, y: x - y) if sign < 0 else (lambda x, y: x + y),
        lambda ea, eb: (linear_base(ea) or linear_base(eb), None),
        lambda eb: mapped_loader(eb, negate_payload) if sign < 0 else eb.load,
    )


def _combine(
    a: WeightDiff,
    b: WeightDiff,
    op: str,
    value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    fingerprints: Callable[[DiffEntry, DiffEntry], tuple[str | None, str | None]],
    only_b: Callable[[DiffEntry], Callable[[], Any]] | None = None,
) -> WeightDiff:
    """One diff from two, entry by entry: ``value(Δa, Δb)`` where both have a tensor; an entry of one side
    alone is kept (``only_b`` maps the second side's payload, e.g. negates it for ``a − b``)."""
    entries: dict[str, DiffEntry] = {}
    linear = op in ("add", "subtract")
    for n in [*a.entries, *(n for n in b.entries if n not in a.entries)]:
        ea, eb = a.entries.get(n), b.entries.get(n)
        if ea is None or eb is None:
            e = ea or eb
            if eb is not None and only_b is not None:
                e = replace(e, load=only_b(e))
            if linear:  # a vector of its (linear) base now; where it lands is unknown
                e = replace(
                    e,
                    load=mapped_loader(e, without_fix),
                    base=linear_base(e),
                    negated_base=None,
                    **INEXACT,
                )
            entries[n] = e
            continue
        if ea.shape != eb.shape:
            raise ValueError(f"Cannot {op} diffs: {n!r} is {ea.shape} in one and {eb.shape} in the other.")
        dt = torch.promote_types(ea.dtype, eb.dtype)
        base, target = fingerprints(ea, eb)
        entries[n] = DiffEntry(
            ea.shape,
            dt,
            "dense",
            lambda ea=ea, eb=eb, dt=dt: {"values": value(ea.dense().to(dt), eb.dense().to(dt))},
            base=base,
            target=target,
        )
    meta = {k: v for k, v in a.metadata.items() if k not in ("unchanged", "dropped", "skipped")}
    diff = WeightDiff._of(entries, meta, {"op": op, "with": b.metadata.get("ops", [])[-4:]})
    diff.metadata["scale"] = None
    return diff
