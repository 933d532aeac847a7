"""Unlearning fictitious facts from a tiny Llama with stock ``transformers.Trainer`` runs (CPU, no downloads).

What it does:
 1. generates fictitious facts — countries and their capitals, people with a birthplace, a job and a pet —
    each stated by several paraphrase templates (the answer is always the last word); for every fact one
    template is held out of training (the *paraphrase* probe: knowledge, not a memorised string);
 2. builds a word-level vocabulary and trains a tiny ``LlamaForCausalLM`` (from a config) on the other
    templates with a stock ``Trainer`` (ORIGINAL); and a Retrain model on the retain facts only (the reference);
 3. picks 10 % of the facts as the forget set and unlearns them from the original with a stock ``Trainer``,
    ``forget_retain_dataset(forget, retain)`` and ``TaggedCollator(base=pad_collate)``:
      - GA        ``SaliencyUnlearningCallback(objective=UnlearningObjective("ga", retain_weight=0), mask=all)``
      - GradDiff  ``UnlearningObjective("graddiff", retain_weight=1)``, mask = all weights
      - NPO       ``UnlearningObjective("npo", retain_weight=1)`` (NPO + retain NLL), mask = all weights
      - SalUn-NPO the same NPO objective under a SalUn saliency mask (``ratio=0.5``, ``grad_abs_sum`` on the
        forget set at θ₀) — hard-frozen outside the mask, checked bit-for-bit below;
    the unlearning examples carry loss on the answer word only; the retain term uses as many retain examples
    as there are forget examples (re-drawn per method from the same seed);
 4. reports, for forget and retain facts, the mean NLL of the answer word and exact match (greedy next token
    = the answer), on the trained templates and on the held-out paraphrases; then a relearning attack
    (``relearn_attack``: fine-tune on the forget set, steps until forget exact match ≥ 50 %).

Run: ``python examples/unlearning_lm_demo.py --out outputs/unlearning_lm`` (≈ 4 min on 2 shared CPU cores) or
``--quick`` (≈ 1–2 min). Results: ``docs/unlearning.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from hfhooks import (
    ParamMask,
    SaliencyUnlearningCallback,
    TaggedCollator,
    UnlearningObjective,
    forget_retain_dataset,
    relearn_attack,
)

RELATIONS = {  # relation: templates; "{s}" subject, "{a}" answer (always last, before the full stop)
    "capital": [
        "the capital of {s} is {a} .",
        "{s} has its capital in {a} .",
        "the seat of government of {s} is {a} .",
        "travellers to {s} arrive in its capital {a} .",
    ],
    "birthplace": [
        "{s} was born in {a} .",
        "the birthplace of {s} is {a} .",
        "{s} comes from the city of {a} .",
        "as a child {s} lived in {a} .",
    ],
    "job": [
        "{s} works as a {a} .",
        "the job of {s} is {a} .",
        "by profession {s} is a {a} .",
        "{s} earns a living as a {a} .",
    ],
    "pet": [
        "{s} has a pet {a} .",
        "the pet of {s} is a {a} .",
        "at home {s} keeps a {a} .",
        "{s} takes care of a {a} .",
    ],
}
JOBS = [
    "baker",
    "pilot",
    "nurse",
    "farmer",
    "painter",
    "judge",
    "sailor",
    "miner",
    "tailor",
    "poet",
    "chemist",
    "dancer",
]
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "goldfish", "hamster", "ferret", "lizard", "pony"]
SPECIAL = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2


def fictional_names(n: int, rng: random.Random, suffixes: tuple[str, ...]) -> list[str]:
    onsets, vowels = (
        [
            "b",
            "d",
            "f",
            "g",
            "k",
            "l",
            "m",
            "n",
            "p",
            "r",
            "s",
            "t",
            "v",
            "z",
            "br",
            "dr",
            "gr",
            "kr",
            "tr",
            "qu",
            "sh",
            "th",
        ],
        ["a", "e", "i", "o", "u", "ai", "ei", "ou"],
    )
    names: set[str] = set()
    while len(names) < n:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((1, 2))))
        names.add((word + rng.choice(suffixes)).capitalize())
    return sorted(names)


def make_facts(n_countries: int, n_people: int, seed: int) -> list[dict]:
    """Facts ``{subject, relation, answer, heldout}``; ``heldout`` is the template index kept out of training."""
    rng = random.Random(seed)
    pool = fictional_names(
        2 * n_countries + n_people + 20, rng, ("ia", "land", "stan", "or", "en", "ar", "is")
    )
    rng.shuffle(pool)
    countries, capitals = pool[:n_countries], pool[n_countries : 2 * n_countries]
    cities, people = pool[2 * n_countries : 2 * n_countries + 20], pool[2 * n_countries + 20 :]
    facts = [{"subject": c, "relation": "capital", "answer": a} for c, a in zip(countries, capitals)]
    for p in people:
        facts.append({"subject": p, "relation": "birthplace", "answer": rng.choice(cities)})
        facts.append({"subject": p, "relation": "job", "answer": rng.choice(JOBS)})
        facts.append({"subject": p, "relation": "pet", "answer": rng.choice(PETS)})
    for f in facts:
        f["heldout"] = rng.randrange(len(RELATIONS[f["relation"]]))
    return facts


class Vocab:
    def __init__(self, facts: list[dict]):
        words = set()
        for f in facts:
            for t in RELATIONS[f["relation"]]:
                words.update(t.format(s=f["subject"], a=f["answer"]).split())
        self.itos = SPECIAL + sorted(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def encode(self, text: str) -> list[int]:
        return [BOS, *(self.stoi[w] for w in text.split()), EOS]


def example(vocab: Vocab, fact: dict, template: int, answer_only: bool) -> dict:
    """One sentence; labels on every token (training) or on the answer word only (unlearning, probes)."""
    ids = vocab.encode(RELATIONS[fact["relation"]][template].format(s=fact["subject"], a=fact["answer"]))
    pos = len(ids) - 3  # [..., answer, ".", <eos>]
    labels = [-100] * len(ids) if answer_only else list(ids)
    if answer_only:
        labels[pos] = ids[pos]
    return {"input_ids": ids, "labels": labels, "answer_pos": pos}


def sentences(vocab: Vocab, facts: list[dict], which: str, answer_only: bool) -> list[dict]:
    """``which="train"``: every template but the held-out one; ``"heldout"``: only the held-out one."""
    out = []
    for f in facts:
        n = len(RELATIONS[f["relation"]])
        templates = [f["heldout"]] if which == "heldout" else [t for t in range(n) if t != f["heldout"]]
        out += [example(vocab, f, t, answer_only) for t in templates]
    return out


def pad_collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (PAD), ``attention_mask`` (0) and ``labels`` (-100)."""
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), n), PAD, dtype=torch.long)
    att = torch.zeros((len(features), n), dtype=torch.long)
    lab = torch.full((len(features), n), -100, dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.as_tensor(f["input_ids"])
        att[i, :k] = 1
        lab[i, :k] = torch.as_tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


@torch.no_grad()
def probe(model, data: list[dict]) -> dict[str, float]:
    """Mean NLL of the answer word and exact match (% greedy next token = answer) at its position."""
    model.eval()
    nll, hits = [], []
    for s in range(0, len(data), 256):
        chunk = data[s : s + 256]
        batch = pad_collate(chunk)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, ex in enumerate(chunk):
            p = ex["answer_pos"]
            logp = torch.log_softmax(logits[i, p - 1].float(), -1)
            nll.append(-float(logp[ex["input_ids"][p]]))
            hits.append(int(logp.argmax()) == ex["input_ids"][p])
    return {"nll": sum(nll) / len(nll), "em": 100.0 * sum(hits) / len(hits)}


def targs(out: Path, name: str, epochs: float, lr: float, batch: int, seed: int, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out / "trainer" / name), num_train_epochs=epochs, learning_rate=lr,
        per_device_train_batch_size=batch, seed=seed, use_cpu=True, report_to=[], logging_strategy="no",
        save_strategy="no", disable_tqdm=True, **kw,
    )  # fmt: skip


def new_model(vocab: Vocab, args) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab.itos), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def pretrain(model, data: list[dict], out: Path, name: str, args) -> float:
    t = time.perf_counter()
    ta = targs(out, name, args.epochs, 3e-3, 32, args.seed, lr_scheduler_type="cosine", warmup_steps=20)
    trainer = Trainer(model=model, args=ta, train_dataset=data, data_collator=pad_collate)
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
    trainer.train()
    return time.perf_counter() - t


def methods(args) -> dict[str, tuple[UnlearningObjective, float]]:
    """name: (objective, mask ratio); ratio 1 = no mask (every weight may change)."""
    npo = {"retain_weight": 1.0, "beta": 0.1}
    return {
        "GA": (UnlearningObjective("ga", retain_weight=0.0), 1.0),
        "GradDiff": (UnlearningObjective("graddiff", retain_weight=1.0), 1.0),
        "NPO": (UnlearningObjective("npo", **npo), 1.0),
        f"SalUn-NPO (r={args.ratio:g})": (UnlearningObjective("npo", **npo), args.ratio),
    }


class StopWhenForgotten(TrainerCallback):
    """Stop training once exact match on ``data`` is ≤ ``target`` (checked every ``every`` optimizer steps)."""

    def __init__(self, data: list[dict], target: float, every: int):
        self.data, self.target, self.every = data, target, every
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and self.stopped_at is None:
            training = model.training
            if probe(model, self.data)["em"] <= self.target:
                self.stopped_at = state.global_step
                control.should_training_stop = True
            model.train(training)


def unlearn(original, objective, ratio, forget, retain_pool, target, out: Path, name: str, args):
    """One unlearning run on a copy of ``original`` with a stock Trainer. Returns (model, info)."""
    model = copy.deepcopy(original)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    # "matched": as many retain examples as forget examples (same draw for every method);
    # "all": every retain example, the forget set up-sampled (forget_repeats) to about the same count
    repeats = 1
    if not objective.retain_weight:
        retain = []
    elif args.retain == "matched":
        retain = random.Random(args.seed + 2).sample(retain_pool, len(forget))
    else:
        retain, repeats = retain_pool, max(1, round(len(retain_pool) / len(forget)))
    callback = SaliencyUnlearningCallback(
        forget, objective=copy.deepcopy(objective), ratio=ratio,
        mask=ParamMask.full(model) if ratio >= 1 else None, collate=pad_collate, progress=False,
    )  # fmt: skip
    stop = StopWhenForgotten(forget, target, args.check_every)
    ta = targs(out, name.split()[0], args.unlearn_epochs, args.unlearn_lr, 8, args.seed,
               lr_scheduler_type="constant", weight_decay=0.0)  # fmt: skip
    trainer = Trainer(
        model=model, args=ta, train_dataset=forget_retain_dataset(forget, retain, forget_repeats=repeats),
        data_collator=TaggedCollator(base=pad_collate), callbacks=[callback, stop],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    t = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t
    if ratio < 1:  # the hard-freeze guarantee: weights outside the mask are bit-identical to the original
        for n, q in model.named_parameters():
            outside = ~callback.mask[n]
            assert torch.equal(q.detach()[outside], before[n][outside]), f"{n} moved outside the mask"
    steps = stop.stopped_at or trainer.state.global_step
    return model, {"time_s": secs, "steps": steps, "forgotten": stop.stopped_at is not None,
                   "mask_density": callback.mask.density()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/unlearning_lm")
    p.add_argument("--quick", action="store_true", help="fewer facts (≈ 1-2 min)")
    p.add_argument("--countries", type=int, default=40)
    p.add_argument("--people", type=int, default=80)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epochs", type=float, default=60.0, help="ORIGINAL / Retrain training epochs")
    p.add_argument("--forget-frac", type=float, default=0.1)
    p.add_argument("--unlearn-epochs", type=float, default=10.0, help="at most; see --check-every")
    p.add_argument("--unlearn-lr", type=float, default=3e-4)
    p.add_argument(
        "--check-every", type=int, default=2, help="steps between forget-EM checks (stopping rule)"
    )
    p.add_argument("--ratio", type=float, default=0.5, help="SalUn mask ratio")
    p.add_argument("--retain", choices=["matched", "all"], default="matched", help="retain examples per run")
    p.add_argument("--relearn-steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)"
    )
    args = p.parse_args()
    if args.quick:
        args.countries, args.people, args.epochs, args.relearn_steps = 20, 40, 60.0, 40
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()

    # 1. facts, vocabulary, forget / retain split (by fact)
    facts = make_facts(args.countries, args.people, args.seed)
    vocab = Vocab(facts)
    rng = random.Random(args.seed + 1)
    order = list(range(len(facts)))
    rng.shuffle(order)
    n_f = max(1, round(args.forget_frac * len(facts)))
    forget_facts = [facts[i] for i in sorted(order[:n_f])]
    retain_facts = [facts[i] for i in sorted(order[n_f:])]
    probes = {
        "forget": sentences(vocab, forget_facts, "train", True),
        "forget (paraphrase)": sentences(vocab, forget_facts, "heldout", True),
        "retain": sentences(vocab, retain_facts, "train", True),
        "retain (paraphrase)": sentences(vocab, retain_facts, "heldout", True),
    }

    # 2. ORIGINAL (all facts) and Retrain (retain facts only), stock Trainer
    original = new_model(vocab, args)
    t_orig = pretrain(original, sentences(vocab, facts, "train", False), out, "original", args)
    retrain = new_model(vocab, args)
    t_retrain = pretrain(retrain, sentences(vocab, retain_facts, "train", False), out, "retrain", args)

    # 3. unlearning runs, each from a copy of the original, stock Trainer + callbacks; every method stops as soon
    #    as its forget exact match has fallen to Retrain's (the same stopping rule and step budget for all)
    forget = probes["forget"]  # answer-only labels
    target = probe(retrain, forget)["em"]
    models = {"Original": original, "Retrain": retrain}
    info = {"Original": {"time_s": t_orig}, "Retrain": {"time_s": t_retrain}}
    for name, (objective, ratio) in methods(args).items():
        model, info[name] = unlearn(
            original, objective, ratio, forget, probes["retain"], target, out, name, args
        )
        models[name] = model

    # 4. probes and a relearning attack
    def forget_em(m) -> float:
        return probe(m, forget)["em"]

    rows = {}
    for name, model in models.items():
        attack = relearn_attack(
            model, forget, forget_em, threshold=50.0, steps=args.relearn_steps, eval_every=5, lr=1e-3,
            batch_size=8, collate=pad_collate, seed=args.seed,
        )  # fmt: skip
        rows[name] = {k: probe(model, data) for k, data in probes.items()}
        rows[name].update(info[name], relearn_steps=attack["steps_to_recover"])

    n_params = sum(q.numel() for q in original.parameters())
    header = (
        f"tiny Llama ({args.layers} layers × {args.hidden}, {n_params:,} params, word vocab {len(vocab.itos)}); "
        f"{len(facts)} facts ({len(forget_facts)} forget / {len(retain_facts)} retain), "
        f"{len(probes['forget']) + len(probes['retain'])} training sentences, {len(probes['forget (paraphrase)']) + len(probes['retain (paraphrase)'])} held-out paraphrases; "
        f"original/Retrain {args.epochs:g} epochs; unlearning: AdamW lr {args.unlearn_lr:g}, batch 8, "
        f"until forget EM ≤ Retrain's ({target:.1f} %), checked every {args.check_every} steps, at most {args.unlearn_epochs:g} epochs"
    )  # fmt: skip
    table = format_table(rows, list(probes), args.relearn_steps)
    total = time.perf_counter() - t0
    print("\n" + header + "\n")
    print(table)
    salun_name = list(methods(args))[-1]
    print(f"\nwall time {total:.0f} s; {salun_name} mask density {rows[salun_name]['mask_density']:.3f}, "
          "weights outside the mask bit-identical to the original: checked")  # fmt: skip
    results = {
        "config": vars(args), "header": header, "table": table, "rows": rows, "wall_s": total,
        "forget_facts": forget_facts,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'}")


def format_table(rows: dict, cols: list[str], relearn_steps: int) -> str:
    lines = [
        "| model | " + " | ".join(f"{c}: EM % / NLL" for c in cols)
        + " | unlearning steps | relearn steps to EM ≥ 50 % | time s |",
        "|---|" + "---:|" * (len(cols) + 3),
    ]  # fmt: skip
    for name, r in rows.items():
        cells = [f"{r[c]['em']:.1f} / {r[c]['nll']:.2f}" for c in cols]
        steps = r["relearn_steps"]
        relearn = "0" if steps == 0 else (f"> {relearn_steps}" if steps is None else str(steps))
        unl = "—" if "steps" not in r else f"{r['steps']}" + ("" if r["forgotten"] else " (not reached)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {unl} | {relearn} | {r['time_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
