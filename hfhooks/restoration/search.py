"""Choosing the layers to restore: the Constrained-Random-Character (CRC) proxy and :func:`search_restoration`.

:func:`crc_prompts` builds prompts that ask for one random character of a set; :func:`crc_scores` measures, from
one forward pass per prompt batch (no generation), the validity mass on the allowed characters and the entropy
of the distribution renormalised over them. :func:`search_restoration` scores every range ``[s, e)`` restored
with :func:`hfhooks.restoration.restore.restore_layers`, applies the rule *V ≥ 0.9 × V(post-trained), then maximal
entropy*, and compares with the linear-interpolation ("soup") baseline. Layers are swapped by reference, not
copied, so the 36 ranges of an 8-layer model cost 36 batched forwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfhooks.core.blocks import find_layers
from hfhooks.core.names import unwrap_model
from hfhooks.core.params import ParamIndex

__all__ = ["CRCPrompt", "CRCScore", "RestorationSearch", "crc_prompts", "crc_scores", "search_restoration"]


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
