"""Choosing the layers to restore: the Constrained-Random-Character (CRC) proxy and :func:`search_restoration`.

:func:`crc_prompts` builds prompts that ask for one random character of a set; :func:`crc_scores` measures, from
one forward pass per prompt batch (no generation), the validity mass on the allowed characters and the entropy
of the distribution renormalised over them. :func:`search_restoration` scores every range ``[s, e)`` restored
with :func:`hfhooks.restoration.restore.restore_layers`, applies the rule *V ≥ 0.9 × V(post-trained), then maximal
entropy*, and compares with the linear-interpolation ("soup") baseline. Layers are swapped by reference, not
copied, so the 36 ranges of an 8-layer model cost 36 batched forwards.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfhooks.core.blocks import find_layers
from hfhooks.core.names import unwrap_model
from hfhooks.core.params import ParamIndex

__all__ = [
    "CRCPrompt",
    "CRCScore",
    "RestorationSearch",
    "crc_prompts",
    "crc_scores",
    "load_crc_prompts",
    "search_restoration",
]


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
# in a chat the assistant's turn is the answer: no "Answer:" cue, and no space before the character
_CHAT_TEMPLATE = "Pick one character at random from this set: {chars}. Reply with the character only."


def crc_prompts(
    tokenizer: Any,
    n: int = 20,
    classes: Sequence[str] = ("letters", "digits"),
    set_size: tuple[int, int] = (3, 8),
    template: str | None = None,
    answer_prefix: str | None = None,
    chat: bool | None = None,
    seed: int = 0,
    separator: str = ", ",
) -> list[CRCPrompt]:
    """``n`` CRC prompts per class (letters, digits, or any string of characters), as in the SLR paper.

    Each prompt lists a random subset of the class's characters (joined by ``separator`` into ``template``'s
    ``{chars}``); its valid tokens are the tokens of ``answer_prefix + c`` for each listed ``c``. Tokens that all
    the answers of a prompt share go into the prompt instead (SmolLM2 encodes ``" 7"`` as ``" "``, ``"7"``: the
    space is the prompt's last token and ``"7"`` the answer); a character whose answer is still not one token is
    left out of the valid set, with a warning, and a class left with no prompt is a warning too.

    ``chat`` (default: whether the tokenizer has a chat template) puts the prompt in a user turn of the chat
    template, followed by the assistant's generation prompt — an instruct model then answers the question instead
    of continuing it. ``answer_prefix`` defaults to ``""`` in a chat, ``" "`` otherwise; ``template`` to a
    question without (chat) or with a trailing ``Answer:`` cue.
    """
    chat, prefix = _chat_and_prefix(tokenizer, chat, answer_prefix)
    template = template if template is not None else (_CHAT_TEMPLATE if chat else _TEMPLATE)
    g = torch.Generator().manual_seed(seed)
    out, dropped = [], {}
    for cls in classes:
        alphabet = _CLASSES.get(cls, cls)
        if len(alphabet) < 2:
            raise ValueError(f"Class {cls!r} needs at least two characters.")
        hi = min(set_size[1], len(alphabet))
        lo = min(set_size[0], hi)  # a class smaller than the set size lists all its characters
        for _ in range(n):
            k = int(torch.randint(lo, hi + 1, (1,), generator=g))
            chars = [alphabet[i] for i in torch.randperm(len(alphabet), generator=g)[:k].tolist()]
            prompt, lost = _text_prompt(tokenizer, template.format(chars=separator.join(chars)), chars, chat,
                                        prefix, cls)  # fmt: skip
            dropped.setdefault(cls, set()).update(lost)
            if prompt is not None:
                out.append(prompt)
    if not out:
        raise ValueError("No prompt has a single-token answer; try answer_prefix='' or another tokenizer.")
    for cls, chars in dropped.items():
        if chars:
            kept = sum(p.label == cls for p in out)
            warnings.warn(
                f"crc_prompts: the answers {sorted(chars)} of class {cls!r} (answer_prefix={prefix!r}) are not "
                f"one token after the tokens they share and were left out of the valid sets; {kept} prompts of "
                f"{cls!r} remain" + ("" if kept else " — the class is dropped") + ".",
                UserWarning,
                stacklevel=2,
            )
    return out


def _chat_and_prefix(tokenizer: Any, chat: bool | None, answer_prefix: str | None) -> tuple[bool, str]:
    """``chat`` (default: whether the tokenizer has a chat template) and the answer prefix (default ``""`` in a
    chat, ``" "`` otherwise), as the generated and the JSONL prompts both resolve them."""
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    elif chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat=True (--chat) but the tokenizer has no chat template; pass chat=False (--no-chat)."
        )
    return chat, answer_prefix if answer_prefix is not None else ("" if chat else " ")


def _text_prompt(
    tokenizer: Any, text: str, chars: Sequence[str], chat: bool, prefix: str, label: str
) -> tuple[CRCPrompt | None, list[str]]:
    """``text`` encoded (:func:`_encode_prompt`) with the tokens its answers ``prefix + c`` share appended, as a
    prompt whose valid set is each character's remaining token; and the characters whose answer is not one token
    after the shared ones (left out). ``None`` when no character is left."""
    shared, valid = _answer_tokens(tokenizer, prefix, chars)
    lost = [c for c in chars if c not in valid]
    if not valid:
        return None, lost
    ids = (*_encode_prompt(tokenizer, text, chat), *shared)
    return CRCPrompt(tuple(int(i) for i in ids), tuple(sorted(set(valid.values()))), label), lost


def _encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if not chat:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def _answer_tokens(tokenizer: Any, prefix: str, chars: Sequence[str]) -> tuple[list[int], dict[str, int]]:
    """The tokens every answer ``prefix + c`` starts with, and each character's one remaining token."""
    encoded = {c: list(tokenizer(prefix + c, add_special_tokens=False)["input_ids"]) for c in chars}
    seqs = [e for e in encoded.values() if e]
    shared: list[int] = []
    if seqs:
        for column in zip(*seqs):
            if len(set(column)) > 1:
                break
            shared.append(column[0])
        # each answer keeps at least its last token
        shared = shared[: min(len(e) for e in seqs) - 1]
    valid = {c: e[len(shared)] for c, e in encoded.items() if len(e) == len(shared) + 1}
    return shared, valid


_JSONL_FORMAT = (
    'one JSON object a line, {"input_ids": [int, ...], "valid": [int, ...]} (token ids as the model reads '
    'them) or {"prompt": "text", "valid": ["a", ...]} (characters; needs the tokenizer), "label" optional'
)


def _token_ids(value: Any, key: str, vocab_size: int | None) -> tuple[int, ...]:
    """``value`` as a tuple of token ids: a non-empty list of ints (no bools, floats or strings) in the vocabulary."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key!r} must be a non-empty list of token ids, got {value!r}.")
    bad = [v for v in value if type(v) is not int or v < 0 or (vocab_size is not None and v >= vocab_size)]
    if bad:
        limit = f" (the model's vocabulary has {vocab_size} ids)" if vocab_size is not None else ""
        raise ValueError(f"{key!r} holds {bad[0]!r}, not a token id in [0, vocab size){limit}.")
    return tuple(value)


def _jsonl_prompt(
    row: Any, tokenizer: Any, chat: bool, prefix: str, vocab_size: int | None
) -> tuple[CRCPrompt, list[str] | None]:
    """One JSONL row as a prompt, and the characters of a text row whose answer is not one token (``None``: an
    ``input_ids`` row)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}.")
    unknown = sorted(set(row) - {"input_ids", "valid", "prompt", "label"})
    if unknown or "valid" not in row or ("input_ids" in row) == ("prompt" in row):
        why = (
            f"unknown keys {unknown}"
            if unknown
            else "it needs 'valid' and exactly one of 'input_ids', 'prompt'"
        )
        raise ValueError(f"{why} (keys: {sorted(row)}).")
    label = str(row.get("label", ""))
    if "input_ids" in row:
        valid = _token_ids(row["valid"], "valid", vocab_size)
        if len(set(valid)) != len(valid):
            raise ValueError(f"'valid' lists a token id twice: {list(valid)}.")
        return CRCPrompt(_token_ids(row["input_ids"], "input_ids", vocab_size), valid, label), None
    if tokenizer is None:
        raise ValueError("a 'prompt' row needs the tokenizer next to POST; give 'input_ids' instead.")
    chars = row["valid"]
    if (
        not isinstance(row["prompt"], str)
        or not isinstance(chars, list)
        or not all(isinstance(c, str) for c in chars)
    ):
        raise ValueError("'prompt' must be a string and 'valid' a list of strings (the allowed characters).")
    prompt, lost = _text_prompt(tokenizer, row["prompt"], list(dict.fromkeys(chars)), chat, prefix, label)
    if prompt is None:
        raise ValueError(f"no answer {prefix!r} + c of {chars} is one token: try another --answer-prefix.")
    return prompt, lost


def load_crc_prompts(
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    chat: bool | None = None,
    answer_prefix: str | None = None,
    vocab_size: int | None = None,
) -> list[CRCPrompt]:
    """CRC prompts from a JSONL file (the CLI's ``search-restore --prompts``), checked line by line.

    Each non-blank line is ``{"input_ids": [...], "valid": [...]}`` — token ids used as they are (no template,
    no special tokens added), each in ``[0, vocab_size)``, no valid id twice — or ``{"prompt": "...",
    "valid": ["a", ...]}``, encoded as :func:`crc_prompts` encodes its questions: in a user turn of the chat
    template when ``chat`` (default: when the tokenizer has one), each answer ``answer_prefix + c`` (default
    ``""`` in a chat, ``" "`` otherwise), the tokens all answers share appended to the prompt. A character whose
    answer is still not one token is left out with a warning naming the line. ``"label"`` is optional. A
    malformed line raises ``ValueError`` naming ``path:line`` and the expected format; so does an empty file.
    """
    explicit = [
        k
        for k, v in (("chat (--chat)", chat), ("answer_prefix (--answer-prefix)", answer_prefix))
        if v is not None
    ]
    chat, prefix = _chat_and_prefix(tokenizer, chat, answer_prefix)
    prompts, dropped, texts = [], [], 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompt, lost = _jsonl_prompt(json.loads(line), tokenizer, chat, prefix, vocab_size)
            except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{i}: {e} Expected {_JSONL_FORMAT}.") from None
            prompts.append(prompt)
            dropped += [f"{i}:{c!r}" for c in lost or ()]
            texts += lost is not None
    if not prompts:
        raise ValueError(f"{path} holds no prompt. Expected {_JSONL_FORMAT}.")
    if explicit and not texts:  # never silently ignored: they shape text rows only
        warnings.warn(
            f"{path} has only input_ids rows, which are used as they are: {' and '.join(explicit)} do nothing; "
            "drop them.",
            UserWarning,
            stacklevel=2,
        )
    if dropped:
        warnings.warn(
            f"{path}: answers whose tokens are not one after those they share were left out of the valid sets "
            f"(line:character) {dropped[:8]}{'…' if len(dropped) > 8 else ''} (answer_prefix={prefix!r}).",
            UserWarning,
            stacklevel=2,
        )
    return prompts


@dataclass(frozen=True)
class CRCScore:
    """Mean CRC scores over prompts: validity mass, entropy over the valid set (nats) and its normalised form."""

    validity: float
    diversity: float
    diversity_norm: float


@dataclass(frozen=True)
class _Batch:
    """A left-padded batch of prompts, ready for the model, and the mask of its valid tokens."""

    input_ids: torch.Tensor
    kwargs: dict[str, Any]
    valid: list[list[int]]


def _encode(batch: Sequence[CRCPrompt], model: nn.Module) -> _Batch:
    param = next(model.parameters())
    width = max(len(p.input_ids) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    attn = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p.input_ids) :] = torch.tensor(p.input_ids)
        attn[i, width - len(p.input_ids) :] = 1
    kwargs: dict[str, Any] = {"attention_mask": attn.to(param.device)}
    if attn.min() == 0:
        kwargs["position_ids"] = ((attn.cumsum(-1) - 1).clamp(min=0)).to(param.device)
    accepted = inspect.signature(unwrap_model(model).forward).parameters
    if "use_cache" in accepted:  # no KV cache to build: one forward per batch, no generation
        kwargs["use_cache"] = False
    # only the last position's logits are needed: skip the LM head elsewhere (a quarter of a small LM's compute)
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in accepted:
            kwargs[name] = 1
            break
    return _Batch(ids.to(param.device), kwargs, [list(p.valid) for p in batch])


def _batch_scores(model: nn.Module, batch: _Batch) -> torch.Tensor:
    """``(prompts, 3)``: validity, entropy and normalised entropy of each prompt of ``batch``."""
    logits = model(input_ids=batch.input_ids, **batch.kwargs).logits[:, -1, :].float()
    probs = torch.softmax(logits, dim=-1).cpu()
    valid = torch.zeros_like(probs, dtype=torch.bool)
    for i, v in enumerate(batch.valid):
        valid[i, v] = True
    mass = (probs * valid).sum(-1)
    q = torch.where(valid, probs, torch.zeros_like(probs)) / mass.clamp_min(1e-30)[:, None]
    ent = -(q * torch.log(q.clamp_min(1e-30))).sum(-1)
    size = valid.sum(-1).float()
    norm = torch.where(size > 1, ent / torch.log(size.clamp_min(2)), torch.zeros_like(ent))
    return torch.stack([mass, ent, norm], dim=1)


def _mean_score(per_prompt: Sequence[torch.Tensor]) -> CRCScore:
    v, h, hn = torch.cat(list(per_prompt)).mean(0).tolist()
    return CRCScore(float(v), float(h), float(hn))


def crc_scores(model: nn.Module, prompts: Sequence[CRCPrompt], batch_size: int = 64) -> CRCScore:
    """Validity ``V = Σ_{t∈valid} p(t|x)`` and diversity ``H`` = entropy of ``p`` restricted to the valid set and
    renormalised, averaged over prompts; one forward pass per batch (left-padded), no generation."""
    if not prompts:
        raise ValueError("crc_scores needs at least one prompt.")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _mean_score(
                [
                    _batch_scores(model, _encode(prompts[i : i + batch_size], model))
                    for i in range(0, len(prompts), batch_size)
                ]
            )
    finally:
        model.train(was_training)


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
    warnings: list[str] = field(default_factory=list)

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
    max_width: int | float | None = None,
    stride: int | None = None,
    min_validity: float = 0.1,
    reuse: bool = True,
    batch_size: int = 64,
    progress: bool = True,
) -> RestorationSearch:
    """Score contiguous ranges ``[s, e)`` of restored layers and pick one.

    Rule: among the candidates whose ``rule[0]`` column (validity) is ≥ ``threshold`` × the post-trained
    model's, take the one with the highest ``rule[1]`` (diversity); the post-trained model itself is a
    candidate, so there is always an answer. ``metric(model)`` adds columns (a float becomes ``metric``) and
    may stand in for either side of the rule (e.g. ``rule=("quality", "diversity")``). ``soup`` α values
    (0 = post-trained … 1 = base) score the interpolation baseline (``soup=0`` skips it). Neither model is
    changed (layers are swapped by reference and put back).

    Candidates: ranges at most ``max_width`` layers wide (an int, or a fraction of the layer count; ``None``:
    all). ``stride`` > 1 searches coarse to fine: first the ranges whose ends lie on a grid of step ``stride``,
    then every range within ``stride − 1`` layers of the best coarse one at both ends (default: ``round(L / 10)``,
    so up to 14 layers every range is scored). ``reuse`` skips recomputing what a range shares with others: layers
    before ``s`` are the post-trained model's, and ``[s, e)`` shares its base layers with the widest range from
    ``s`` (their outputs on each batch are kept and replayed), so a range costs the ``L − e`` layers after it.
    A selection whose validity is below ``min_validity`` is a ``UserWarning`` (also in ``result.warnings``): the
    prompts then hardly elicit an allowed character and the diversity among them means little.
    """
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    post_blocks, base_blocks = find_layers(post), find_layers(base)
    n = len(post_blocks)
    if len(base_blocks) != n:
        raise ValueError(f"post has {n} layers but base has {len(base_blocks)}.")
    width = _width(max_width, n)
    stride = max(1, round(n / 10)) if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride={stride} must be ≥ 1.")
    stride = min(stride, width)
    container = unwrap_model(post).get_submodule(post_blocks.path)
    swap = _Swap(post, container, list(container), list(base_blocks.modules), reuse)
    batches = [_encode(prompts[i : i + batch_size], post) for i in range(0, len(prompts), batch_size)]
    constraint, objective = rule

    def score(model: nn.Module, **row: Any) -> dict[str, Any]:
        with _evaluating(model):
            return _row(_mean_score([_batch_scores(model, b) for b in batches]), row, metric, model)

    rows = [score(post, kind="post", start=None, end=None, alpha=0.0)]
    rows.append(score(base, kind="base", start=None, end=None, alpha=1.0))
    for key in (constraint, objective):
        if key not in rows[0]:
            raise KeyError(f"rule column {key!r} is not a score; columns: {sorted(rows[0])}.")
    floor = threshold * rows[0][constraint]
    coarse = _grid_ranges(n, width, stride)
    bar = tqdm(total=len(coarse) + soup, desc="restoration search", disable=not progress, leave=False)
    rows.extend(swap.rows(coarse, batches, metric, bar))
    if stride > 1:
        ranges = [r for r in rows if r["kind"] == "range"]
        eligible = [r for r in ranges if r[constraint] >= floor]
        center = (
            max(eligible, key=lambda r: r[objective])
            if eligible
            else max(ranges, key=lambda r: r[constraint])
        )
        fine = _neighbours((center["start"], center["end"]), n, width, stride, set(coarse))
        bar.total += len(fine)
        rows.extend(swap.rows(fine, batches, metric, bar))
    if soup:
        rows.extend(_soup_rows(post, base, soup, score, bar))
    bar.close()
    for r in rows:
        r["eligible"] = bool(r[constraint] >= floor)
    best = max(
        (r for r in rows if r["kind"] in ("post", "range") and r["eligible"]), key=lambda r: r[objective]
    )
    soups = [r for r in rows if r["kind"] == "soup" and r["eligible"]]
    best_soup = max(soups, key=lambda r: r[objective]) if soups else None
    notes = _low_validity(best, min_validity)
    return RestorationSearch(
        rows, best, best_soup, (constraint, objective, threshold), n, time.perf_counter() - t0, notes
    )


def _low_validity(best: Mapping[str, Any], min_validity: float) -> list[str]:
    """The warning (issued, and returned for ``result.warnings``) when the selection's validity is too low."""
    if best["validity"] >= min_validity:
        return []
    note = (
        f"the selected candidate ({_candidate(best)}) has validity {best['validity']:.3f} < "
        f"min_validity={min_validity:g}: the prompts hardly elicit an allowed character, so diversity among "
        "them means little and neither does the selection. Put the prompts in the post-training format "
        "(chat template, answer prefix) or pass your own."
    )
    warnings.warn(note, UserWarning, stacklevel=3)
    return [note]


def _width(max_width: int | float | None, n: int) -> int:
    """``max_width`` in layers: ``None`` = all, an int, or a float in (0, 1] = that fraction of ``n`` (rounded up)."""
    if max_width is None:
        return n
    if isinstance(max_width, float) and 0 < max_width <= 1:
        return max(1, math.ceil(max_width * n))
    if isinstance(max_width, int) and max_width >= 1:
        return min(max_width, n)
    raise ValueError(f"max_width={max_width!r}: pass a number of layers ≥ 1 or a fraction in (0, 1].")


def _grid_ranges(n: int, width: int, stride: int) -> list[tuple[int, int]]:
    points = sorted({*range(0, n, stride), n})
    return [(s, e) for s in points for e in points if s < e and e - s <= width]


def _neighbours(
    center: tuple[int, int], n: int, width: int, stride: int, done: set[tuple[int, int]]
) -> list[tuple[int, int]]:
    s0, e0 = center
    return [
        (s, e)
        for s in range(max(0, s0 - stride + 1), min(n, s0 + stride))
        for e in range(max(s + 1, e0 - stride + 1), min(n, e0 + stride - 1) + 1)
        if e - s <= width and (s, e) not in done
    ]


def _row(
    s: CRCScore, row: dict[str, Any], metric: Callable[[nn.Module], Any] | None, model: nn.Module
) -> dict[str, Any]:
    out = {**row, "validity": s.validity, "diversity": s.diversity, "diversity_norm": s.diversity_norm}
    if metric is not None:
        m = metric(model)
        out.update(
            {"metric": float(m)} if isinstance(m, int | float) else {k: float(v) for k, v in m.items()}
        )
    return out


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _detached(out: Any) -> Any:
    """A copy of a layer's output (tensors cloned: a later layer may not change what is replayed)."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple | list):
        return type(out)(_detached(o) for o in out)
    return out


class _Stand(nn.Module):
    """Stands in for a decoder layer: returns its known output on the current batch (``replay``), or runs it and
    hands a copy of the output to ``record``. Other attributes are the layer's (models read some, e.g. the
    attention type)."""

    def __init__(self, layer: nn.Module, replay: Any = None, record: Callable[[Any], None] | None = None):
        super().__init__()
        self.layer = layer
        self.replay, self.record = replay, record

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.replay is not None:
            return self.replay
        out = self.layer(*args, **kwargs)
        self.record(_detached(out))
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(self.layer, name)


class _Swap:
    """Scores ranges by swapping base layers into ``post``'s layer container (by reference), batch by batch."""

    def __init__(self, post: nn.Module, container: Any, originals: list, base: list, reuse: bool):
        self.post, self.container, self.originals, self.base, self.reuse = (
            post,
            container,
            originals,
            base,
            reuse,
        )

    def rows(self, ranges: list[tuple[int, int]], batches: list[_Batch], metric: Any, bar: Any) -> list[dict]:
        """One row per range: its CRC scores (and ``metric`` columns); the layers are put back afterwards."""
        n, scores = len(self.originals), {r: [] for r in ranges}
        starts: dict[int, list[int]] = {}
        for s, e in ranges:
            starts.setdefault(s, []).append(e)
        try:
            with _evaluating(self.post):
                for k, batch in enumerate(batches):
                    post_out: dict[int, Any] = {}
                    if self.reuse:  # record the post-trained layers' outputs on this batch
                        self._set([_Stand(m, record=functools.partial(post_out.__setitem__, i)) for i, m in
                                   enumerate(self.originals)])  # fmt: skip
                        _batch_scores(self.post, batch)
                    for s, ends in starts.items():
                        base_out: dict[int, Any] = {}
                        for j, e in enumerate(sorted(ends, reverse=True)):  # the widest first: it records
                            self._set([self._layer(i, s, e, post_out, base_out, j == 0) for i in range(n)])
                            scores[(s, e)].append(_batch_scores(self.post, batch))
                            bar.update(k == len(batches) - 1)
            rows = []
            for s, e in ranges:
                self._set([self.base[i] if s <= i < e else self.originals[i] for i in range(n)])
                row = dict(kind="range", start=s, end=e, alpha=None)
                rows.append(_row(_mean_score(scores[(s, e)]), row, metric, self.post))
            return rows
        finally:
            self._set(self.originals)

    def _layer(self, i: int, s: int, e: int, post_out: dict, base_out: dict, widest: bool) -> nn.Module:
        if i >= e:
            return self.originals[i]
        if not self.reuse:
            return self.base[i] if i >= s else self.originals[i]
        if i < s:
            return _Stand(self.originals[i], replay=post_out[i])
        if widest:
            return _Stand(self.base[i], record=functools.partial(base_out.__setitem__, i))
        return _Stand(self.base[i], replay=base_out[i])

    def _set(self, layers: Sequence[nn.Module]) -> None:
        for i, m in enumerate(layers):
            self.container[i] = m


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
