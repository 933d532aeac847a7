"""Selective gradient masking (SGTM) on a bilingual toy corpus: remove one language, then attack the result.

A tiny Llama is trained from scratch, with a stock ``transformers.Trainer``, on short templated stories in two
languages: language A (English-like, the *retain* domain) and language B (a deterministic pseudo-language with
its own words and verb-final word order, the *forget* domain). Methods, each at label recall 1.0 and 0.6
(recall = share of the language-B training stories labelled *forget*; the rest stay unlabelled and train the
whole model, like undiscovered forget data; a fixed share of language-A stories is labelled *retain*):

* ``none``   — no intervention: train on everything;
* ``filter`` — data filtering: drop the labelled language-B stories, keep the unlabelled ones;
* ``sgtm``   — selective gradient masking: :class:`hfhooks.GradientRoutingCallback` with parameter-level routing
  (labelled forget batches update only the dedicated slices, labelled retain batches run with the dedicated
  activations zeroed and never update them), then :func:`hfhooks.ablate` and :func:`hfhooks.calibrate_logits`;
* ``sgtm+shared`` — the same, but forget batches also train the token embeddings, norms and LM head, as the
  reference SGTM code does (``shared_on_forget``; hfhooks' default trains only the dedicated slices);
* ``ga``     — fine-tuning-based unlearning for comparison: gradient ascent on the labelled language-B stories
  plus a descent term on language-A stories, applied to the ``none`` model and stopped early (see ``--ga-*``).

Each model is evaluated by the mean token cross-entropy on held-out language-A (retain), language-B (forget) and
code-switched (adjacent) stories: raw → ablated → calibrated. Finally a fine-tuning attack trains each unlearned
model on language-B stories (same optimiser, learning rate and batches for every model) and counts the steps
until the forget loss is back within ``--recover-margin`` nats of the no-intervention model's.

Run:

    python examples/routing_demo.py --quick --out outputs/routing              # ≈ 1.5 min on 2 CPU cores
    python examples/routing_demo.py --out outputs/routing                      # ≈ 15–20 min, one seed
    python examples/routing_demo.py --quick --seeds 0 1 2 --threads 1 --out outputs/routing --docs  # docs/routing.md

Artifacts in ``--out``: ``results.json`` (every number, per seed), ``routing_tradeoff.png`` and the dedicated
mask of the last SGTM run (``dedicated.safetensors``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

# OpenMP threads that busy-wait between the many small kernels of a tiny model made training 20–40× slower on a
# shared 2-core machine (measured); passive waiting keeps 2 threads useful there. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

import hfhooks
from hfhooks import (
    FORGET,
    RETAIN,
    UNLABELLED,
    GradientRoutingCallback,
    TaggedCollator,
    TaggedDataset,
    ablate,
    calibrate_logits,
    dedicated_mask,
)

# ----------------------------------------------------------------------------------------------------------------
# 1. A bilingual corpus: the same story content rendered in language A or language B
# ----------------------------------------------------------------------------------------------------------------
NAMES = ["lily", "tom", "mia", "ben", "sue", "max", "anna", "sam", "zoe", "leo"]  # shared, like real names
SLOTS = {
    slot: words.split(" ")
    for slot, words in {
        "animal": "cat dog bird frog fish bear duck rabbit fox mouse owl pig horse lion sheep bee",
        "adj": "big small red little blue shiny soft old funny green kind brave pink tiny tall yellow",
        "place": "park garden forest house river school beach hill farm town lake zoo",
        "obj": "ball kite box cake hat boat car flower book toy stick apple cup drum bell shoe",
        "verb": "play run jump sing dance swim read paint climb hide",
        "feeling": "happy sad scared excited tired proud",
        "rel": "mom dad friend sister brother teacher",
    }.items()
}
# (language A, language B) sentence templates. B is verb-final, puts adjectives after nouns, marks the topic
# with "si" and objects with "ko", and has its own function words.
OPENINGS = [
    ("once upon a time there was a {adj} {animal} named {name} .", "velo naru {name} si {animal} {adj} mo tesa ."),
    ("{name} was a {adj} {animal} who lived in the {place} .", "{name} si {place} ne dovu {animal} {adj} tesa ."),
]  # fmt: skip
MIDDLES = [
    ("{name} liked to {verb} in the {place} .", "{name} si {place} ne {verb} lisa ."),
    ("one day {name} found a {adj2} {obj} .", "mira sol {name} si {obj} {adj2} ko rupa ."),
    ("{name} had a {obj} and a {rel} .", "{name} si {obj} ya {rel} ko hadu ."),
]
TURNS = [
    ("{name} showed the {obj} to the {rel} .", "{name} si {rel} ta {obj} ko veni ."),
    ("the {rel} said let us {verb} !", "{rel} si gomu {verb} da !"),
    ("{name} felt very {feeling} .", "{name} si hoto {feeling} pira ."),
]
ENDINGS = [("the end .", "fina ."), ("{name} was {feeling} .", "{name} si {feeling} tesa .")]
SENTENCES = (OPENINGS, MIDDLES, TURNS, ENDINGS)
SPECIALS = ["<pad>", "<bos>", "<eos>"]


class Bilingual:
    """The two languages: A's content words map one-to-one to generated language-B words (fixed, seed-free)."""

    def __init__(self):
        a_words = sorted({w for ws in SLOTS.values() for w in ws})
        templates = [t for group in SENTENCES for pair in group for t in pair]
        fixed = {w for t in templates for w in t.split() if not w.startswith("{")}
        rng = random.Random(1234)  # the language itself never depends on the experiment seed
        self.to_b: dict[str, str] = {}
        for w in a_words:
            while True:
                b = "".join(
                    rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.choice((2, 3)))
                )
                if b not in fixed and b not in self.to_b.values() and b not in a_words:
                    self.to_b[w] = b
                    break
        words = fixed | set(a_words) | set(self.to_b.values()) | set(NAMES)
        self.vocab = {w: i for i, w in enumerate(SPECIALS + sorted(words))}
        self.pad, self.bos, self.eos = (self.vocab[s] for s in SPECIALS)
        # longest story, code-switched ones included: the longest template of either language per sentence
        self.max_len = 2 + sum(max(len(t.split()) for pair in group for t in pair) for group in SENTENCES)

    def content(self, rng: random.Random) -> dict:
        c = {k: rng.choice(v) for k, v in SLOTS.items()}
        c["adj2"], c["name"] = rng.choice(SLOTS["adj"]), rng.choice(NAMES)
        c["choice"] = [rng.randrange(len(group)) for group in SENTENCES]
        return c

    def render(self, c: dict, langs: str) -> list[str]:
        """``langs``: one letter per sentence, ``A`` or ``B`` (``"AAAA"``, ``"BBBB"``, or code-switched)."""
        words: list[str] = []
        for group, pick, lang in zip(SENTENCES, c["choice"], langs):
            template = group[pick][lang == "B"]
            for w in template.split():
                if w.startswith("{"):
                    value = c[w[1:-1]]
                    words.append(self.to_b.get(value, value) if lang == "B" else value)
                else:
                    words.append(w)
        return words

    def encode(self, words: list[str]) -> dict[str, torch.Tensor]:
        ids = [self.bos, *(self.vocab[w] for w in words), self.eos]
        n = len(ids)
        ids += [self.pad] * (self.max_len - n)
        input_ids = torch.tensor(ids)
        attention_mask = (torch.arange(self.max_len) < n).long()
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def corpus(self, n: int, kind: str, rng: random.Random) -> list[dict[str, torch.Tensor]]:
        """``kind``: ``"A"`` (retain), ``"B"`` (forget) or ``"mix"`` (code-switched, sentence by sentence)."""
        out = []
        for _ in range(n):
            langs = "".join(rng.choice("AB") for _ in SENTENCES) if kind == "mix" else kind * len(SENTENCES)
            out.append(self.encode(self.render(self.content(rng), langs)))
        return out


def stack(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def batches(
    examples: list[dict], size: int, rng: random.Random | None = None
) -> list[dict[str, torch.Tensor]]:
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    return [stack([examples[i] for i in order[s : s + size]]) for s in range(0, len(order), size)]


# ----------------------------------------------------------------------------------------------------------------
# 2. Settings
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    layers: int = 6
    hidden: int = 128
    heads: int = 4
    intermediate: int = 512
    n_retain: int = 1200  # language-A training stories
    n_forget: int = 600  # language-B training stories
    n_eval: int = 256  # held-out stories per evaluation set
    batch_size: int = 16
    epochs: float = 3.0
    lr: float = 3e-3
    weight_decay: float = 0.1
    retain_label_frac: float = 0.2  # share of language-A stories labelled RETAIN (the paper: 10–25 %)
    mlp_units: int = 64  # dedicated MLP units per layer
    dedicated_heads: int = 1  # dedicated attention heads per layer
    calib_steps: int = 200
    calib_lr: float = 1e-2
    calib_batches: int = 8  # batches of 32 per calibration loss
    ga_lr: float = 1e-4
    ga_retain_weight: float = 1.0
    ga_max_steps: int = 300
    ga_eval_every: int = 10
    attack_lr: float = 2e-4  # as in the paper
    attack_steps: int = 400  # cap
    attack_eval_every: int = 10  # after step 50; every step up to 10, every 5 up to 50
    recover_margin: float = 0.25  # nats above the no-intervention forget loss


QUICK = dict(layers=2, hidden=64, intermediate=256, n_retain=1000, n_forget=500, n_eval=128, mlp_units=32,
             epochs=2.0, ga_max_steps=150, attack_steps=150)  # fmt: skip

# SGTM variants: which non-dedicated parameters forget batches may still train (``shared_on_forget``).
VARIANTS = {
    "sgtm": [],  # hfhooks' default: forget batches train the dedicated coordinates only
    "sgtm+shared": ["*embed_tokens*", "*norm*", "lm_head*"],  # as the reference SGTM code does by default
}


# ----------------------------------------------------------------------------------------------------------------
# 3. Training, evaluation, calibration, unlearning, attack
# ----------------------------------------------------------------------------------------------------------------
def new_model(lang: Bilingual, s: Settings, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(lang.vocab), hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        num_key_value_heads=s.heads, intermediate_size=s.intermediate, max_position_embeddings=64,
        pad_token_id=lang.pad, bos_token_id=lang.bos, eos_token_id=lang.eos, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def train(
    model, examples, s: Settings, seed: int, routing: list[int] | None = None, callbacks=(), progress=False
):
    """Train with a stock Trainer. With ``routing`` labels: label-homogeneous micro-batches (SGTM)."""
    steps_per_epoch = math.ceil(len(examples) / s.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, num_train_epochs=s.epochs, learning_rate=s.lr, weight_decay=s.weight_decay,
            lr_scheduler_type="cosine", warmup_steps=max(1, int(0.05 * steps_per_epoch * s.epochs)),
            per_device_train_batch_size=1 if routing is not None else s.batch_size,
            logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=seed,
            disable_tqdm=not progress, dataloader_num_workers=0,
        )  # fmt: skip
        if routing is None:
            trainer = Trainer(model=model, args=args, train_dataset=examples)
        else:
            data = TaggedDataset(
                examples, tags={"routing": routing}, group_by="routing", batch_size=s.batch_size, seed=seed
            )
            trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks),
                              data_collator=TaggedCollator(homogeneous="routing"))  # fmt: skip
        if not progress:
            trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
        trainer.train()
    return model


@torch.no_grad()
def mean_loss(model, data: dict[str, torch.Tensor], batch_size: int = 128) -> float:
    """Mean token cross-entropy (nats) over the non-padding next-token targets of ``data``."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(data["input_ids"]), batch_size):
        ids, att, lab = (data[k][s : s + batch_size] for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        target = lab[:, 1:]
        total += float(
            F.cross_entropy(
                logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum"
            )
        )
        count += int((target != -100).sum())
    return total / count


def evaluate(model, evals: dict[str, dict]) -> dict[str, float]:
    return {name: mean_loss(model, data) for name, data in evals.items()}


class CachedHead(nn.Module):
    """The LM head over cached final hidden states of a frozen, eval-mode body.

    ``calibrate_logits`` trains only the output bias with everything else frozen, so the body's output does not
    change during calibration: computing it once makes each calibration step a single matmul. The head module is
    shared with the model, so the calibrated bias lands in the model itself.
    """

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.head = model.get_output_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        logits = self.head(hidden)[:, :-1]
        return SimpleNamespace(
            loss=F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        )


@torch.no_grad()
def cached(model, data: list[dict]) -> list[dict]:
    model.eval()
    return [
        {"hidden": model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state,
         "labels": b["labels"]}
        for b in data
    ]  # fmt: skip


def calibrate(model, forget: list[dict], retain: list[dict], s: Settings) -> None:
    """Logit calibration (in place): train the LM-head bias on forget + retain loss (ALGORITHMS.md §2)."""
    # the demo never saves its models: the added bias need not survive from_pretrained
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="calibrate_logits added an LM-head bias")
        calibrate_logits(
            CachedHead(model),
            {"forget": (cached(model, forget), 1.0), "retain": (cached(model, retain), 1.0)},
            steps=s.calib_steps, lr=s.calib_lr, progress=False,
        )  # fmt: skip


def gradient_ascent(model, forget: list[dict], retain: list[dict], cal: tuple, val: dict, target: float,
                    s: Settings, seed: int) -> dict:  # fmt: skip
    """Gradient ascent on forget + descent on retain, stopped once the *calibrated* validation forget loss
    reaches ``target`` (so bias shifts alone cannot satisfy it) or the retain loss has risen by 0.5 nats."""
    g = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.ga_lr, weight_decay=0.0)
    retain0 = mean_loss(model, val["retain"])
    log = []
    for step in range(1, s.ga_max_steps + 1):
        model.train()
        f, r = g.choice(forget), g.choice(retain)
        loss = -model(**f).loss + s.ga_retain_weight * model(**r).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % s.ga_eval_every == 0 or step == s.ga_max_steps:
            probe = copy.deepcopy(model)
            calibrate(probe, *cal, s)
            forget_cal, retain_now = mean_loss(probe, val["forget"]), mean_loss(model, val["retain"])
            log.append({"step": step, "val_forget_calibrated": forget_cal, "val_retain": retain_now})
            if forget_cal >= target:
                return {"steps": step, "stopped": "target reached", "log": log}
            if retain_now > retain0 + 0.5:
                return {"steps": step, "stopped": "retain loss +0.5 nats", "log": log}
    return {"steps": s.ga_max_steps, "stopped": "step cap", "log": log}


def attack(model, forget: list[dict], test_forget: dict, threshold: float, s: Settings, seed: int) -> dict:
    """Fine-tune on forget data; return the first evaluated step with forget loss ≤ threshold (None: not in cap)."""
    g = random.Random(seed)  # same batch order for every model
    opt = torch.optim.AdamW(model.parameters(), lr=s.attack_lr, weight_decay=0.0)
    curve = [(0, mean_loss(model, test_forget))]
    if curve[0][1] <= threshold:
        return {"steps": 0, "curve": curve}
    for step in range(1, s.attack_steps + 1):
        model.train()
        loss = model(**g.choice(forget)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step <= 10 or (step <= 50 and step % 5 == 0) or step % s.attack_eval_every == 0:
            curve.append((step, mean_loss(model, test_forget)))
            if curve[-1][1] <= threshold:
                return {"steps": step, "curve": curve}
    return {"steps": None, "curve": curve}


# ----------------------------------------------------------------------------------------------------------------
# 4. One seed
# ----------------------------------------------------------------------------------------------------------------
def run_seed(
    seed: int, s: Settings, recalls: list[float], variants: list[str], out: Path, progress: bool, log
) -> dict:
    set_seed(seed)
    lang = Bilingual()
    rng = random.Random(seed)
    retain, forget = lang.corpus(s.n_retain, "A", rng), lang.corpus(s.n_forget, "B", rng)
    evals = {k: stack(lang.corpus(s.n_eval, k, rng)) for k in ("A", "B", "mix")}
    evals = {"retain": evals["A"], "forget": evals["B"], "adjacent": evals["mix"]}
    val = {"retain": stack(lang.corpus(s.n_eval, "A", rng)), "forget": stack(lang.corpus(s.n_eval, "B", rng))}
    n_r = round(s.retain_label_frac * len(retain))
    retain_labels = [RETAIN] * n_r + [UNLABELLED] * (len(retain) - n_r)
    rng.shuffle(retain_labels)
    forget_order = list(range(len(forget)))
    rng.shuffle(forget_order)  # the first round(recall · n) stories in this order are the labelled ones

    def labelled_forget(recall: float) -> list[dict]:
        return [forget[i] for i in forget_order[: round(recall * len(forget))]]

    cal_retain = batches([e for e, lab in zip(retain, retain_labels) if lab == RETAIN], 32, rng)[
        : s.calib_batches
    ]
    res: dict = {"seed": seed, "runs": {}, "timing_s": {}}

    def record(key: str, stage: str, model) -> dict:
        losses = evaluate(model, evals)
        res["runs"].setdefault(key, {})[stage] = losses
        log(f"  {key:<12} {stage:<11} retain {losses['retain']:.3f}  forget {losses['forget']:.3f}  "
            f"adjacent {losses['adjacent']:.3f}")  # fmt: skip
        return losses

    def timed(name: str, t0: float) -> None:
        res["timing_s"][name] = round(time.time() - t0, 1)

    # (a) no intervention
    t0 = time.time()
    none = train(new_model(lang, s, seed), retain + forget, s, seed, progress=progress)
    timed("train none", t0)
    record("none", "raw", none)
    cal_forget_all = batches(labelled_forget(1.0), 32, rng)[: s.calib_batches]
    control = copy.deepcopy(none)
    mask = dedicated_mask(control, mlp_units=s.mlp_units, heads=s.dedicated_heads)
    ablate(control, mask)  # control: the same ablation on a model trained without routing
    record("none", "ablated", control)
    calibrate(control, cal_forget_all, cal_retain, s)
    record("none", "calibrated", control)
    del control

    models: dict[str, nn.Module] = {}
    for recall in recalls:
        cal_forget = batches(labelled_forget(recall), 32, rng)[: s.calib_batches]
        # (b) data filtering: drop the labelled forget stories
        t0 = time.time()
        labelled = set(forget_order[: round(recall * len(forget))])
        kept = retain + [e for i, e in enumerate(forget) if i not in labelled]
        model = train(new_model(lang, s, seed), kept, s, seed, progress=progress)
        timed(f"train filter@{recall}", t0)
        key = f"filter@{recall}"
        record(key, "raw", model)
        calibrate(model, cal_forget, cal_retain, s)
        record(key, "calibrated", model)
        models[key] = model

        # (c) SGTM: route, ablate, calibrate
        forget_labels = [FORGET if i in labelled else UNLABELLED for i in range(len(forget))]
        for variant in variants:
            t0 = time.time()
            model = new_model(lang, s, seed)
            dedicated = dedicated_mask(model, mlp_units=s.mlp_units, heads=s.dedicated_heads)
            # strict: momentum and weight decay never move the coordinates a step's mode must not change
            callback = GradientRoutingCallback(
                dedicated,
                save_mask=out / "dedicated.safetensors",
                shared_on_forget=VARIANTS[variant],
                strict=True,
            )
            train(model, retain + forget, s, seed, routing=retain_labels + forget_labels, callbacks=[callback],
                  progress=progress)  # fmt: skip
            key = f"{variant}@{recall}"
            timed(f"train {key}", t0)
            res["runs"][key] = {"routed_batches": dict(callback.router.counts)}
            record(key, "raw", model)
            ablate(model, dedicated)
            record(key, "ablated", model)
            calibrate(model, cal_forget, cal_retain, s)
            record(key, "calibrated", model)
            models[key] = model

    # (d) gradient ascent from the no-intervention model, on all labelled forget stories (its best case)
    t0 = time.time()
    top = max(recalls)
    target_key = f"filter@{top}"
    target = mean_loss(models[target_key], val["forget"])  # calibrated filter model = "never saw language B"
    ga_model = copy.deepcopy(none)
    ga_forget = batches(labelled_forget(top), s.batch_size, rng)
    ga_retain = batches(retain, s.batch_size, rng)
    cal_forget = batches(labelled_forget(top), 32, rng)[: s.calib_batches]
    ga = gradient_ascent(ga_model, ga_forget, ga_retain, (cal_forget, cal_retain), val, target, s, seed)
    timed("gradient ascent", t0)
    key = f"ga@{top}"
    res["runs"][key] = {"ga": {**ga, "target_val_forget": target, "target_from": f"{target_key} calibrated"}}
    log(f"  {key}: gradient ascent stopped after {ga['steps']} steps ({ga['stopped']})")
    record(key, "raw", ga_model)
    calibrate(ga_model, cal_forget, cal_retain, s)
    record(key, "calibrated", ga_model)
    models[key] = ga_model

    # (e) fine-tuning attack on forget data, same lr / batches / threshold for every starting point
    threshold = res["runs"]["none"]["raw"]["forget"] + s.recover_margin
    res["attack_threshold"] = threshold
    attack_data = batches(forget, s.batch_size, rng)
    for key, model in models.items():
        t0 = time.time()
        a = attack(model, attack_data, evals["forget"], threshold, s, seed)
        timed(f"attack {key}", t0)
        res["runs"][key]["attack"] = a
        log(
            f"  attack {key:<11} steps to recover: {a['steps'] if a['steps'] is not None else f'> {s.attack_steps}'}"
        )
    res["dedicated_fraction"] = {
        "mlp_units": s.mlp_units / s.intermediate, "heads": s.dedicated_heads / s.heads,
        "parameters": sum(k for k, _ in mask.counts().values()) / sum(p.numel() for p in none.parameters()),
    }  # fmt: skip
    return res


# ----------------------------------------------------------------------------------------------------------------
# 5. Reporting
# ----------------------------------------------------------------------------------------------------------------
STAGES = ("raw", "ablated", "calibrated")


def agg(values: list[float | None], fmt: str = "{:.3f}") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    text = fmt.format(statistics.mean(vals))
    if len(vals) > 1:
        text += "±" + fmt.format(statistics.stdev(vals))
    return text


def table(results: list[dict], s: Settings) -> str:
    keys = list(results[0]["runs"])
    head = ["method", "recall", "retain raw", "abl", "cal", "forget raw", "abl", "cal", "attack steps"]
    rows = []
    for key in keys:
        method, recall = ([*key.split("@"), "—"])[:2]
        if method == "none":
            recall = "—"
        cells = [method, recall]
        for metric in ("retain", "forget"):
            for stage in STAGES:
                cells.append(agg([r["runs"][key].get(stage, {}).get(metric) for r in results]))
        steps = [
            r["runs"][key].get("attack", {}).get("steps", 0 if method == "none" else None) for r in results
        ]
        capped = [r["runs"][key].get("attack") and r["runs"][key]["attack"]["steps"] is None for r in results]
        if method == "none":
            cell = "0"
        elif all(capped):
            cell = f"> {s.attack_steps}"
        else:
            cell = agg([float(x) for x in steps if x is not None], "{:.0f}")
            if any(capped):
                cell += f" ({sum(capped)} seed(s) > {s.attack_steps})"
        cells.append(cell)
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def attack_ratio(sgtm: dict, ga: dict, s: Settings) -> dict:
    """SGTM / GA steps-to-recover; a lower bound when SGTM did not recover within the cap."""
    a, b = sgtm["attack"]["steps"], ga["attack"]["steps"]
    if b is None or b == 0:
        return {"ratio": None, "lower_bound": False, "text": f"n/a (GA: {b if b is not None else '> cap'})"}
    if a is None:
        return {
            "ratio": s.attack_steps / b,
            "lower_bound": True,
            "text": f"> {s.attack_steps}/{b} = > {s.attack_steps / b:.1f}×",
        }
    return {"ratio": a / b, "lower_bound": False, "text": f"{a}/{b} = {a / b:.1f}×"}


def plot(results: list[dict], s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    def is_partial(key: str) -> bool:  # dashed lines for label recall < 1
        return "@" in key and float(key.split("@")[1]) < 1.0

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = {
        "none": "black",
        "filter": "tab:blue",
        "sgtm": "tab:red",
        "sgtm+shared": "tab:orange",
        "ga": "tab:green",
    }
    markers = {"raw": "o", "ablated": "x", "calibrated": "s"}
    r0 = results[0]
    for key in r0["runs"]:
        method = key.split("@")[0]
        pts = []
        for stage in STAGES:
            vals = [r["runs"][key][stage] for r in results if stage in r["runs"][key]]
            if vals:
                pts.append(
                    (
                        stage,
                        statistics.mean(v["retain"] for v in vals),
                        statistics.mean(v["forget"] for v in vals),
                    )
                )
        if method == "ga":  # gradient ascent starts from the no-intervention model
            none_raw = (
                statistics.mean(r["runs"]["none"]["raw"]["retain"] for r in results),
                statistics.mean(r["runs"]["none"]["raw"]["forget"] for r in results),
            )
            pts.insert(0, ("start", *none_raw))
        style = "--" if is_partial(key) else "-"
        for (_, x0, y0), (_, x1, y1) in itertools.pairwise(pts):
            ax.annotate(
                "",
                (x1, y1),
                (x0, y0),
                arrowprops={"arrowstyle": "->", "color": colors[method], "ls": style, "alpha": 0.6},
            )
        for stage, x, y in pts:
            if stage in markers:
                ax.scatter(x, y, color=colors[method], marker=markers[stage], s=40)
        ax.annotate(key if method != "none" else "none (ablation control)", (pts[-1][1], pts[-1][2]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8, color=colors[method])  # fmt: skip
    for stage, m in markers.items():
        ax.scatter([], [], color="gray", marker=m, label=stage)
    ax.set_xlabel("retain loss (language A, nats/token) →  worse")
    ax.set_ylabel("forget loss (language B, nats/token) →  better removed")
    ax.set_yscale("log")
    ax.set_title("retain / forget trade-off (mean over seeds)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    for key in r0["runs"]:
        if "attack" not in r0["runs"][key]:
            continue
        curve = r0["runs"][key]["attack"]["curve"]
        bx.plot([c[0] for c in curve], [c[1] for c in curve], color=colors[key.split("@")[0]],
                ls="--" if is_partial(key) else "-", label=key)  # fmt: skip
    bx.axhline(r0["attack_threshold"], color="black", ls=":", label="recovery threshold")
    bx.set_xlabel(f"fine-tuning attack steps (lr {s.attack_lr:g}, batch {s.batch_size}, language B only)")
    bx.set_ylabel("forget loss (held-out language B)")
    bx.set_title(f"fine-tuning attack (seed {r0['seed']})")
    bx.set_yscale("log")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    for axis in (ax.yaxis, bx.yaxis):
        axis.set_major_formatter(ticker.ScalarFormatter())
        axis.set_minor_formatter(ticker.FormatStrFormatter("%.1f"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="outputs/routing", help="artifact directory (default: outputs/routing)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small model and corpus: 1–2 minutes on 2 CPU cores"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (default: 0)")
    parser.add_argument("--recalls", type=float, nargs="+", default=[1.0, 0.6], help="forget label recalls")
    parser.add_argument(
        "--docs", action="store_true", help="also copy the plot to docs/img/routing_tradeoff.png"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="SGTM variants: 'sgtm' = only dedicated coordinates learn from forget batches (hfhooks' default); "
        "'sgtm+shared' = embeddings, norms and LM head learn from them too (the reference code's default)",
    )  # fmt: skip
    parser.add_argument("--progress", action="store_true", help="show the Trainer's progress bars")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    for field, value in asdict(Settings()).items():
        parser.add_argument(
            f"--{field.replace('_', '-')}", type=type(value), default=None, help=f"default {value}"
        )
    args = parser.parse_args()
    s = replace(Settings(), **(QUICK if args.quick else {}))
    s = replace(s, **{k: v for k, v in vars(args).items() if k in asdict(s) and v is not None})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t_start = time.time()
    lang = Bilingual()
    print(f"vocabulary {len(lang.vocab)} words, stories ≤ {lang.max_len} tokens, "
          f"model {s.layers}×{s.hidden} (MLP {s.intermediate}, {s.heads} heads), "
          f"{s.n_retain} + {s.n_forget} training stories, seeds {args.seeds}")  # fmt: skip
    results = []
    for seed in args.seeds:
        print(f"seed {seed}")
        t0 = time.time()
        log = lambda m: print(m, flush=True)  # noqa: E731
        results.append(run_seed(seed, s, args.recalls, args.variants, out, args.progress, log))
        results[-1]["wall_s"] = round(time.time() - t0, 1)
    text = table(results, s)
    elapsed = time.time() - t_start
    print(f"\nSGTM demo — mean token CE (nats) on held-out stories; attack: steps until forget loss ≤ "
          f"no-intervention + {s.recover_margin} (lr {s.attack_lr:g}, cap {s.attack_steps})\n")  # fmt: skip
    print(text, end="\n\n")
    top = max(args.recalls)
    ratios = {}
    for variant in args.variants:
        key = f"{variant}@{top}"
        ratios[key] = [attack_ratio(r["runs"][key], r["runs"][f"ga@{top}"], s) for r in results]
        print(f"attack steps to recover, {key} / ga@{top}: "
              + ", ".join(f"seed {r['seed']}: {x['text']}" for r, x in zip(results, ratios[key])))  # fmt: skip
    print(f"wall time {elapsed:.0f} s")
    summary = {
        "settings": asdict(s), "seeds": args.seeds, "recalls": args.recalls, "quick": args.quick,
        "variants": {v: VARIANTS[v] for v in args.variants}, "vocab_size": len(lang.vocab),
        "max_len": lang.max_len, "table": text, "sgtm_over_ga_attack_steps": ratios,
        "wall_s": round(elapsed, 1), "torch_threads": args.threads, "hfhooks_version": hfhooks.__version__,
        "results": results,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    plot(results, s, out / "routing_tradeoff.png")
    if args.docs:
        dest = Path(__file__).resolve().parent.parent / "docs" / "img" / "routing_tradeoff.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "routing_tradeoff.png", dest)
        print(f"plot copied to {dest}")
    print(
        f"artifacts: {out / 'results.json'}, {out / 'routing_tradeoff.png'}, {out / 'dedicated.safetensors'}"
    )


if __name__ == "__main__":
    main()
