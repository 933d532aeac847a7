"""Selective layer restoration (SLR): put decoder layers ``[s, e)`` back to reference weights, and choose them.

Post-training narrows a model's outputs (mode collapse). Restoring a contiguous range of decoder layers of the
post-trained model to the pre-trained weights recovers diversity at little quality cost, with no training and
no inference overhead. Embeddings, the final norm and the LM head stay post-trained unless asked (chat tokens
live there), and tied input/output embeddings are never overwritten by accident.

* :func:`restore_layers` edits an in-memory model (a ``PeftModel`` too: the adapters of those layers are
  zeroed or dropped) or streams a checkpoint directory into a restored copy (bounded memory, atomic).
* :func:`search_restoration` scores every range with the Constrained-Random-Character (CRC) proxy — validity
  mass on the allowed characters and the entropy of the distribution renormalised over them, from one forward
  pass per prompt batch (no generation) — applies the rule *V ≥ 0.9 × V(post-trained), then maximal entropy*,
  and compares with the linear-interpolation ("soup") baseline. Layers are swapped by reference, not copied,
  so the 36 ranges of an 8-layer model cost 36 batched forwards.

Example:
    >>> import copy, torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                num_hidden_layers=4, num_attention_heads=2)
    >>> base = transformers.LlamaForCausalLM(cfg)
    >>> post = copy.deepcopy(base)
    >>> with torch.no_grad():
    ...     _ = [p.add_(0.1) for p in post.parameters()]
    >>> report = restore_layers(post, base, "1:3")
    >>> report.layers, torch.equal(post.model.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)
    ([1, 2], True)
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfhooks.core.blocks import find_layers
from hfhooks.core.names import canonical_name, match_name, unwrap_model
from hfhooks.core.params import ParamIndex, UnknownParameterError
from hfhooks.diffs.source import WeightSource
from hfhooks.io.checkpoints import Checkpoint, layer_map, parse_layers
from hfhooks.io.edit import edit_checkpoint

__all__ = [
    "CRCPrompt",
    "RestorationSearch",
    "RestoreReport",
    "crc_prompts",
    "crc_scores",
    "parse_layers",
    "restore_layers",
    "search_restoration",
]

_LM_HEAD = re.compile(r"^(lm_head|embed_out|output|score|classifier)\.")
_EMBED = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings|embeddings|embed_positions)(\.|$)")
_FINAL_NORM = re.compile(r"(^|\.)(norm|ln_f|final_layer_norm|final_layernorm|norm_f|final_norm)\.")


def _category(name: str, layer: int | None) -> str:
    """``layer`` | ``lm_head`` | ``embeddings`` | ``final_norm`` | ``other`` for a canonical name."""
    if layer is not None:
        return "layer"
    if _LM_HEAD.search(name):
        return "lm_head"
    if _EMBED.search(name):
        return "embeddings"
    if _FINAL_NORM.search(name):
        return "final_norm"
    return "other"


@dataclass
class RestoreReport:
    """What :func:`restore_layers` did."""

    layers: list[int]
    restored: list[str]  # canonical names set to the reference
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA module -> "zeroed" | "dropped"
    path: Path | None = None  # the output directory, for checkpoints

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (
            f"RestoreReport(layers={self.layers}, {len(self.restored)} tensors restored, "
            f"{len(self.adapters)} adapters{where})"
        )


def restore_layers(
    target: nn.Module | str | os.PathLike,
    reference: Any,
    layers: str | int | slice | Iterable[int],
    *,
    embeddings: bool = False,
    final_norm: bool = False,
    lm_head: bool = False,
    include: str | Iterable[str] = (),
    adapters: str = "zero",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    fsync: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    allow_inside_source: bool = False,
) -> RestoreReport:
    """Set decoder ``layers`` of ``target`` to ``reference``'s weights.

    Args:
        target: a model (edited in place; wrapped or PEFT models too) or a checkpoint directory (a full model,
            or a PEFT adapter directory, whose adapters of those layers are zeroed / dropped).
        reference: the weights to restore from: a model, a checkpoint directory, or ``{name: tensor}``.
        layers: ``"4:8"``, ``range(4, 8)``, ``[4, 5, 6, 7]``…
        embeddings, final_norm, lm_head: also restore these (default: keep them post-trained). Tied input and
            output embeddings must be restored together or not at all.
        include: extra parameter names / globs / ``re:`` patterns to restore.
        adapters: for LoRA layers inside the range: ``"zero"`` (``lora_B = 0``: the adapter stays, with no
            effect, and save/load round-trips) or ``"drop"`` (unwrap the module / omit its tensors).
        out: for a checkpoint target, the output directory (``out=target`` edits it in place, atomically). It
            may not equal, contain or lie inside ``reference`` or (unless ``allow_inside_source``) ``target``; an
            existing one is replaced only with ``overwrite`` and only if an earlier hfhooks edit wrote it.
        allow_inside_source: let ``out`` be a subdirectory of the target checkpoint (see
            :func:`~hfhooks.io.checkpoints.edit_checkpoint`).
    """
    if adapters not in ("zero", "drop"):
        raise ValueError(f"adapters={adapters!r}: use 'zero' or 'drop'.")
    flags = {"embeddings": embeddings, "final_norm": final_norm, "lm_head": lm_head}
    include = [include] if isinstance(include, str) else list(include)
    if isinstance(target, nn.Module):
        return _restore_model(target, reference, layers, flags, include, adapters, allow_pickle)
    if out is None:
        raise ValueError(
            "Restoring a checkpoint needs out= (a new directory; out=<the checkpoint> edits in place)."
        )
    return _restore_checkpoint(
        Path(target),
        reference,
        layers,
        flags,
        include,
        adapters,
        Path(out),
        dict(
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            fsync=fsync,
            progress=progress,
            allow_inside_source=allow_inside_source,
        ),
        allow_pickle,
    )


def _wanted(
    names: Iterable[str],
    of: Mapping[str, int | None],
    chosen: set[int],
    flags: Mapping[str, bool],
    include: Sequence[str],
) -> list[str]:
    out = []
    for n in names:
        canon = canonical_name(n)
        cat = _category(canon, of[n])
        if (
            (cat == "layer" and of[n] in chosen)
            or flags.get(cat, False)
            or any(match_name(p, canon) for p in include)
        ):
            out.append(n)
    for pat in include:
        if not any(match_name(pat, canonical_name(n)) for n in names):
            raise UnknownParameterError(f"include pattern {pat!r} matches no parameter.")
    return out


def _check_tied(flags: Mapping[str, bool], tied: bool) -> None:
    if tied and flags["embeddings"] != flags["lm_head"]:
        raise ValueError(
            "The input embeddings and the LM head are tied (one tensor): restoring one restores the other. Pass "
            "embeddings=True and lm_head=True together (CLI: --embeddings --lm-head), or neither."
        )


def _restore_model(
    model: nn.Module,
    reference: Any,
    layers: Any,
    flags: Mapping[str, bool],
    include: Sequence[str],
    adapters: str,
    allow_pickle: bool,
) -> RestoreReport:
    from hfhooks.masks.lora import lora_layers

    index = ParamIndex(model)
    blocks = find_layers(model)
    chosen = parse_layers(layers, len(blocks))
    base = unwrap_model(model)
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    in_emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    tied = (
        out_emb is not None
        and in_emb is not None
        and getattr(out_emb, "weight", None) is getattr(in_emb, "weight", object())
    )
    _check_tied(flags, tied)
    of = {}
    prefix = blocks.path + "."
    for n in index.names():
        head = n[len(prefix) :].split(".", 1)[0] if n.startswith(prefix) else ""
        of[n] = int(head) if head.isdigit() else None
    lora_parts = re.compile(
        r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)"
    )
    names = [n for n in index.names() if not lora_parts.search(n)]
    wanted = _wanted(names, of, set(chosen), flags, include)
    ref = WeightSource(reference, allow_pickle)
    missing = [n for n in wanted if n not in ref]
    if missing:
        raise UnknownParameterError(
            f"The reference lacks {len(missing)} tensor(s) to restore: {ref.unknown(missing[0])}"
        )
    for n in wanted:
        if ref.shape(n) != tuple(index.info(n).shape):
            raise ValueError(
                f"Shape mismatch for {n!r}: target {tuple(index.info(n).shape)}, reference {ref.shape(n)}."
            )
    module_names = {id(m): canonical_name(k) for k, m in model.named_modules()}
    in_range = [
        (module_names[id(layer)], layer)
        for layer in lora_layers(model).values()
        if _layer_from(module_names[id(layer)], blocks.path) in set(chosen)
    ]
    if adapters == "zero":  # refuse before anything is modified: a half-restored model is worse than none
        dora = [name for name, layer in in_range if len(getattr(layer, "lora_magnitude_vector", None) or {})]
        if dora:
            raise NotImplementedError(
                f"{dora[0]} (and {len(dora) - 1} more) is a DoRA layer: zeroing lora_B does not remove its "
                "magnitude rescaling, so the layer would not be restored. Use adapters='drop' (unwraps the "
                "adapter), or merge_and_unload() the model first. Nothing was modified."
            )
    with torch.no_grad():
        for n in wanted:
            p = index.param(n)
            p.copy_(ref.get(n).to(device=p.device, dtype=p.dtype))
    report = RestoreReport(chosen, wanted)
    for name, layer in in_range:
        if adapters == "zero":
            with torch.no_grad():
                for key in ("lora_B", "lora_embedding_B"):
                    for sub in getattr(layer, key, {}).values():
                        for p in sub.parameters() if isinstance(sub, nn.Module) else [sub]:
                            p.zero_()
            report.adapters[name] = "zeroed"
        else:
            _unwrap_lora(model, layer)
            report.adapters[name] = "dropped"
    if report.adapters and adapters == "drop":
        _exclude_from_config(model, list(report.adapters))
    return report


def _layer_from(name: str, path: str) -> int | None:
    if not name.startswith(path + "."):
        return None
    head = name[len(path) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _unwrap_lora(model: nn.Module, layer: nn.Module) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is layer:
                setattr(parent, child_name, layer.get_base_layer())
                return


def _exclude_from_config(model: nn.Module, modules: list[str]) -> None:
    """Record dropped modules in the PEFT config's ``exclude_modules`` so a save/load does not re-create them."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    for cfg in configs.values():
        if hasattr(cfg, "exclude_modules"):
            current = cfg.exclude_modules
            current = [current] if isinstance(current, str) else list(current or [])
            cfg.exclude_modules = sorted(set(current) | set(modules))
        else:  # peft < 0.14
            warnings.warn(
                "This peft version has no LoraConfig.exclude_modules (peft ≥ 0.14): the dropped adapters are gone "
                "from this model, but a save_pretrained / from_pretrained round trip re-creates them freshly "
                "initialised (lora_B = 0, so without effect). Upgrade peft to make the drop persistent, or use "
                "adapters='zero'.",
                stacklevel=3,
            )


def _restore_checkpoint(
    path: Path,
    reference: Any,
    layers: Any,
    flags: Mapping[str, bool],
    include: Sequence[str],
    adapters: str,
    out: Path,
    write: dict[str, Any],
    allow_pickle: bool,
) -> RestoreReport:
    ckpt = Checkpoint(path, allow_pickle=allow_pickle)
    # the reference is read too: the output may not equal, contain or lie inside it either
    write = {**write, "inputs": [reference] if isinstance(reference, str | os.PathLike) else []}
    block_path, of = layer_map(ckpt.keys())
    if block_path is None:
        raise ValueError(f"{path}: cannot find decoder layers in the tensor names (e.g. {ckpt.keys()[0]!r}).")
    n_layers = 1 + max(i for i in of.values() if i is not None)
    chosen = parse_layers(layers, n_layers)
    record = {"op": "restore_layers", "layers": chosen, "reference": _label(reference), **dict(flags)}
    if ckpt.kind == "adapter":
        targets = [n for n in ckpt if of[n] in set(chosen)]
        b_parts = [n for n in targets if re.search(r"\.lora_(embedding_)?B(\.|$)", canonical_name(n))]
        report = RestoreReport(
            chosen, [], {canonical_name(n).rsplit(".lora_", 1)[0]: "zeroed" for n in b_parts}
        )
        if adapters == "drop":
            report.adapters = {k: "dropped" for k in report.adapters}
            report.path = edit_checkpoint(
                ckpt, out, {}, drop=targets, record={**record, "adapters": "drop"}, **write
            )
        else:
            edits = {n: (lambda load: torch.zeros_like(load())) for n in b_parts}
            report.path = edit_checkpoint(ckpt, out, edits, record={**record, "adapters": "zero"}, **write)
        return report
    cfg = ckpt.config or {}
    lm_arch = any(
        re.search(r"(CausalLM|LMHead|ConditionalGeneration)", a) for a in cfg.get("architectures") or []
    )
    # config.json omits keys equal to PretrainedConfig's defaults (transformers < 5 does; GPT-2 ties this way):
    # a missing tie_word_embeddings means the default, True
    tied = bool(cfg.get("tie_word_embeddings", True)) and lm_arch
    _check_tied(flags, tied)
    wanted = _wanted(ckpt.keys(), of, set(chosen), flags, include)
    ref = WeightSource(reference, allow_pickle)
    missing = [n for n in wanted if n not in ref]
    if missing:
        raise UnknownParameterError(
            f"The reference lacks {len(missing)} tensor(s) to restore: {ref.unknown(missing[0])}"
        )
    edits = {}
    for n in wanted:
        info = ckpt.info(n)
        if ref.shape(n) != info.shape:
            raise ValueError(f"Shape mismatch for {n!r}: target {info.shape}, reference {ref.shape(n)}.")
        ref_info = ref.ckpt.info(n) if ref.ckpt is not None and ref.ckpt.kind != "pickle" else None
        if ref_info is not None and ref_info.dtype == info.dtype:
            edits[n] = lambda load, ref_info=ref_info: ref_info  # byte copy from the reference file
        else:
            edits[n] = lambda load, n=n, dtype=info.dtype: ref.get(n).to(dtype).contiguous()
    report = RestoreReport(chosen, wanted)
    report.path = edit_checkpoint(ckpt, out, edits, record=record, **write, desc="restore")
    return report


def _label(obj: Any) -> str:
    if isinstance(obj, str | os.PathLike):
        return str(obj)
    if isinstance(obj, Checkpoint):
        return str(obj.path)
    return type(obj).__name__


# -- the CRC proxy ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CRCPrompt:
    """One Constrained-Random-Character prompt: token ids, and the ids of the characters it allows."""

    input_ids: tuple[int, ...]
    valid: tuple[int, ...]
    label: str = ""

    def __post_init__(self):
        if not self.input_ids or not self.valid:
            raise ValueError("A CRC prompt needs at least one input token and one valid token.")


_CLASSES = {
    "letters": "abcdefghijklmnopqrstuvwxyz",
    "digits": "0123456789",
}
_TEMPLATE = "Pick one character at random from this set: {chars}. Reply with the character only.\nAnswer:"


def crc_prompts(
    tokenizer: Any,
    n: int = 20,
    classes: Sequence[str] = ("letters", "digits"),
    set_size: tuple[int, int] = (3, 8),
    template: str = _TEMPLATE,
    answer_prefix: str = " ",
    chat: bool = False,
    seed: int = 0,
    separator: str = ", ",
) -> list[CRCPrompt]:
    """``n`` CRC prompts per class (letters, digits, or any string of characters), as in the SLR paper.

    Each prompt lists a random subset of the class's characters (joined by ``separator`` into ``template``'s
    ``{chars}``); its valid tokens are the tokens of ``answer_prefix + c`` for each listed ``c`` (characters
    that do not encode to a single token are skipped).
    With ``chat=True`` the prompt goes through the tokenizer's chat template.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for cls in classes:
        alphabet = _CLASSES.get(cls, cls)
        if len(alphabet) < 2:
            raise ValueError(f"Class {cls!r} needs at least two characters.")
        lo, hi = set_size[0], min(set_size[1], len(alphabet))
        for _ in range(n):
            k = int(torch.randint(lo, hi + 1, (1,), generator=g))
            chars = [alphabet[i] for i in torch.randperm(len(alphabet), generator=g)[:k].tolist()]
            text = template.format(chars=separator.join(chars))
            if chat:
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
                )
                ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
            else:
                ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            valid = []
            for c in chars:
                tok = tokenizer(answer_prefix + c, add_special_tokens=False)["input_ids"]
                if len(tok) == 1:
                    valid.append(tok[0])
            if valid:
                out.append(CRCPrompt(tuple(int(i) for i in ids), tuple(sorted(set(valid))), cls))
    if not out:
        raise ValueError("No prompt has a single-token answer; try answer_prefix='' or another tokenizer.")
    return out


@dataclass(frozen=True)
class CRCScore:
    """Mean CRC scores over prompts: validity mass, entropy over the valid set (nats) and its normalised form."""

    validity: float
    diversity: float
    diversity_norm: float


def crc_scores(model: nn.Module, prompts: Sequence[CRCPrompt], batch_size: int = 64) -> CRCScore:
    """Validity ``V = Σ_{t∈valid} p(t|x)`` and diversity ``H`` = entropy of ``p`` restricted to the valid set and
    renormalised, averaged over prompts; one forward pass per batch (left-padded), no generation."""
    if not prompts:
        raise ValueError("crc_scores needs at least one prompt.")
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    vs, hs, hn = [], [], []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                width = max(len(p.input_ids) for p in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                attn = torch.zeros(len(batch), width, dtype=torch.long)
                for i, p in enumerate(batch):
                    ids[i, width - len(p.input_ids) :] = torch.tensor(p.input_ids)
                    attn[i, width - len(p.input_ids) :] = 1
                pos = (attn.cumsum(-1) - 1).clamp(min=0)
                kwargs = {"attention_mask": attn.to(param.device)}
                if attn.min() == 0:
                    kwargs["position_ids"] = pos.to(param.device)
                logits = model(input_ids=ids.to(param.device), **kwargs).logits[:, -1, :].float()
                probs = torch.softmax(logits, dim=-1).cpu()
                valid = torch.zeros_like(probs, dtype=torch.bool)
                for i, p in enumerate(batch):
                    valid[i, list(p.valid)] = True
                mass = (probs * valid).sum(-1)
                q = torch.where(valid, probs, torch.zeros_like(probs)) / mass.clamp_min(1e-30)[:, None]
                ent = -(q * torch.log(q.clamp_min(1e-30))).sum(-1)
                size = valid.sum(-1).float()
                vs.append(mass)
                hs.append(ent)
                hn.append(torch.where(size > 1, ent / torch.log(size.clamp_min(2)), torch.zeros_like(ent)))
    finally:
        model.train(was_training)
    return CRCScore(float(torch.cat(vs).mean()), float(torch.cat(hs).mean()), float(torch.cat(hn).mean()))


# -- the search -------------------------------------------------------------------------------------------------
@dataclass
class RestorationSearch:
    """Scores of every restored range and of the soup baseline, and the range the rule selects.

    ``rows`` are dicts with ``kind`` (``post`` | ``base`` | ``range`` | ``soup``), ``start``/``end`` (ranges),
    ``alpha`` (soups: 0 = post-trained, 1 = base), ``validity``, ``diversity``, ``diversity_norm``, any user
    metric columns, and ``eligible`` (meets the validity constraint).
    """

    rows: list[dict[str, Any]]
    best: dict[str, Any]
    best_soup: dict[str, Any] | None
    rule: tuple[str, str, float]
    num_layers: int
    seconds: float = 0.0

    @property
    def post(self) -> dict[str, Any]:
        return next(r for r in self.rows if r["kind"] == "post")

    def ranges(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == "range"]

    def soups(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == "soup"]

    def table(self, kinds: Sequence[str] = ("post", "base", "range"), top: int | None = None) -> str:
        """A Markdown table (ranges sorted by the objective, eligible ones first)."""
        _constraint, objective, _ = self.rule
        rows = [r for r in self.rows if r["kind"] in kinds]
        rows.sort(key=lambda r: (r["kind"] != "post", r["kind"] != "base", not r["eligible"], -r[objective]))
        if top is not None:
            rows = rows[:top]
        extra = [k for k in rows[0] if k not in _CORE_COLUMNS] if rows else []
        head = ["candidate", "validity", "diversity (nats)", "diversity (norm.)", *extra, "eligible"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            mark = " **←**" if r is self.best else ""
            cells = [
                _candidate(r) + mark,
                f"{r['validity']:.3f}",
                f"{r['diversity']:.3f}",
                f"{r['diversity_norm']:.3f}",
                *[_fmt(r[k]) for k in extra],
                "yes" if r["eligible"] else "no",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike) -> Path:
        import csv

        path = Path(path)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        return path

    def plot(self, path: str | os.PathLike | None = None, title: str | None = None) -> Any:
        """Validity vs diversity: every range, the soup curve, the threshold and the selected range."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        constraint, objective, ratio = self.rule
        fig, ax = plt.subplots(figsize=(7, 5))
        ranges = self.ranges()
        sizes = [r["end"] - r["start"] for r in ranges]
        sc = ax.scatter(
            [r[objective] for r in ranges],
            [r[constraint] for r in ranges],
            c=sizes,
            cmap="viridis",
            s=36,
            label="restored range [s, e)",
        )
        fig.colorbar(sc, ax=ax, label="layers restored (e − s)")
        soups = self.soups()
        if soups:
            ax.plot(
                [r[objective] for r in soups],
                [r[constraint] for r in soups],
                "-o",
                color="tab:orange",
                ms=3,
                label="soup (interpolation)",
            )
        post = self.post
        ax.scatter(
            [post[objective]], [post[constraint]], marker="s", s=80, color="tab:red", label="post-trained"
        )
        base = next((r for r in self.rows if r["kind"] == "base"), None)
        if base:
            ax.scatter(
                [base[objective]], [base[constraint]], marker="^", s=80, color="tab:blue", label="base"
            )
        ax.axhline(
            ratio * post[constraint], ls="--", color="gray", lw=1, label=f"{ratio:g} × post {constraint}"
        )
        b = self.best
        ax.scatter([b[objective]], [b[constraint]], marker="*", s=260, color="gold", edgecolor="k", zorder=5)
        ax.annotate(
            f"selected {_candidate(b)}",
            (b[objective], b[constraint]),
            textcoords="offset points",
            xytext=(-12, 10),
            ha="right",
        )
        ax.set_xlabel(objective.replace("_", " "))
        ax.set_ylabel(constraint)
        ax.set_title(title or f"Layer restoration search ({self.num_layers} layers)")
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


_CORE_COLUMNS = {"kind", "start", "end", "alpha", "validity", "diversity", "diversity_norm", "eligible"}


def _candidate(r: Mapping[str, Any]) -> str:
    if r["kind"] == "range":
        return f"[{r['start']}, {r['end']})"
    if r["kind"] == "soup":
        return f"soup α={r['alpha']:.2f}"
    return r["kind"]


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def search_restoration(
    post: nn.Module,
    base: nn.Module,
    prompts: Sequence[CRCPrompt],
    *,
    metric: Callable[[nn.Module], float | Mapping[str, float]] | None = None,
    rule: tuple[str, str] = ("validity", "diversity"),
    threshold: float = 0.9,
    soup: int = 21,
    max_width: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> RestorationSearch:
    """Score every contiguous range ``[s, e)`` of restored layers and pick one.

    Rule: among the candidates whose ``rule[0]`` column (validity) is ≥ ``threshold`` × the post-trained
    model's, take the one with the highest ``rule[1]`` (diversity); the post-trained model itself is a
    candidate, so there is always an answer. ``metric(model)`` adds columns (a float becomes ``metric``) and
    may stand in for either side of the rule (e.g. ``rule=("quality", "diversity")``). ``soup`` α values
    (0 = post-trained … 1 = base) score the interpolation baseline (``soup=0`` skips it). Neither model is
    changed (layers are swapped by reference and put back).
    """
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    post_blocks, base_blocks = find_layers(post), find_layers(base)
    n = len(post_blocks)
    if len(base_blocks) != n:
        raise ValueError(f"post has {n} layers but base has {len(base_blocks)}.")
    container = unwrap_model(post).get_submodule(post_blocks.path)
    originals = list(container)
    constraint, objective = rule

    def score(model: nn.Module, **row: Any) -> dict[str, Any]:
        s = crc_scores(model, prompts, batch_size)
        out = {**row, "validity": s.validity, "diversity": s.diversity, "diversity_norm": s.diversity_norm}
        if metric is not None:
            m = metric(model)
            out.update(
                {"metric": float(m)} if isinstance(m, int | float) else {k: float(v) for k, v in m.items()}
            )
        return out

    ranges = [
        (s, e) for s in range(n) for e in range(s + 1, n + 1) if max_width is None or e - s <= max_width
    ]
    rows = [score(post, kind="post", start=None, end=None, alpha=0.0)]
    rows.append(score(base, kind="base", start=None, end=None, alpha=1.0))
    bar = tqdm(total=len(ranges) + soup, desc="restoration search", disable=not progress, leave=False)
    try:
        for s, e in ranges:
            for i in range(n):
                container[i] = base_blocks.modules[i] if s <= i < e else originals[i]
            rows.append(score(post, kind="range", start=s, end=e, alpha=None))
            bar.update()
    finally:
        for i in range(n):
            container[i] = originals[i]
    if soup:
        rows.extend(_soup_rows(post, base, soup, score, bar))
    bar.close()
    for key in (constraint, objective):
        if key not in rows[0]:
            raise KeyError(f"rule column {key!r} is not a score; columns: {sorted(rows[0])}.")
    floor = threshold * rows[0][constraint]
    for r in rows:
        r["eligible"] = bool(r[constraint] >= floor)
    candidates = [r for r in rows if r["kind"] in ("post", "range") and r["eligible"]]
    best = max(candidates, key=lambda r: r[objective])
    soups = [r for r in rows if r["kind"] == "soup" and r["eligible"]]
    best_soup = max(soups, key=lambda r: r[objective]) if soups else None
    return RestorationSearch(
        rows, best, best_soup, (constraint, objective, threshold), n, time.perf_counter() - t0
    )


def _soup_rows(
    post: nn.Module, base: nn.Module, count: int, score: Callable[..., dict[str, Any]], bar: Any
) -> list[dict[str, Any]]:
    """θ_α = (1 − α)·θ_post + α·θ_base for ``count`` α values in [0, 1], on a working copy of ``post``."""
    import copy

    work = copy.deepcopy(unwrap_model(post))
    if hasattr(work, "merge_and_unload") or any("lora_A" in n for n, _ in work.named_parameters()):
        raise ValueError(
            "The soup baseline needs plain models: merge LoRA adapters first (merge_and_unload())."
        )
    w_index, b_index, p_index = ParamIndex(work), ParamIndex(base), ParamIndex(post)
    pairs = [
        (w_index.param(n), p_index.param(n).detach(), b_index.param(n).detach()) for n in w_index.names()
    ]
    rows = []
    with torch.no_grad():
        for alpha in torch.linspace(0, 1, count).tolist() if count > 1 else [0.5]:
            for w, p, b in pairs:
                w.copy_(torch.lerp(p.float(), b.float(), alpha).to(w.dtype))
            rows.append(score(work, kind="soup", start=None, end=None, alpha=float(alpha)))
            bar.update()
    del work
    return rows
