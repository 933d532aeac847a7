"""Selective gradient masking (SGTM) during continued pretraining of a real LLM: SmolLM2-135M-Instruct (CPU).

What it does (``make install-llm`` first):
 1. builds a mixed corpus of short documents about invented things (``examples/fictitious.py``): the *forget*
    domain is author biographies (birthplace, year, genre, prize, father's job, a novel), the *retain* domain is
    country profiles (capital) and sums. Nothing in it exists, so the model knows it only from this training;
 2. continues pretraining SmolLM2 on it (causal LM loss on every token, stock ``Trainer``), at label recall 1.0
    and 0.6 — the share of forget documents labelled *forget*; the others stay unlabelled, like undiscovered
    forget data — with:
      * ``none``   — no intervention, everything trained;
      * ``filter`` — data filtering: the labelled forget documents dropped;
      * ``sgtm``   — ``GradientRoutingCallback`` (strict, parameter level, ``dedicated_mask(mlp_units, heads)``
        in every layer): labelled forget documents update only the dedicated slices, labelled retain documents
        never do; then ``ablate`` (dedicated slices zeroed) and ``calibrate_logits`` (the LM-head bias only);
      * ``graddiff`` — post-hoc unlearning for comparison: GradDiff (``SaliencyUnlearningCallback``, every
        weight) on the ``none`` model with the labelled forget documents;
 3. reports the mean token loss on the forget and retain documents, and a fine-tuning attack: steps of
    fine-tuning on the forget documents until their loss is back within ``--margin`` nats of ``none``'s.

Run: ``python examples/smollm2_sgtm.py --out outputs/smollm2_sgtm`` (≈ 20–30 min on 2 CPU cores; ``--quick``:
a smoke run). Writes ``results.json`` and ``table.md``. Results: ``docs/routing.md`` ("On a real LLM").
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
import warnings
from pathlib import Path

import torch
from fictitious import TEMPLATES, Pad, make_authors, make_countries, make_sums
from transformers import PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from hfhooks import (
    FORGET,
    RETAIN,
    UNLABELLED,
    GradientRoutingCallback,
    ParamMask,
    SaliencyUnlearningCallback,
    TaggedCollator,
    TaggedDataset,
    UnlearningObjective,
    ablate,
    calibrate_logits,
    dedicated_mask,
    forget_retain_dataset,
    load_gguf,
    relearn_attack,
    smollm2_path,
)


def corpus(n_forget: int, n_retain: int, seed: int) -> tuple[list[str], list[str]]:
    """Forget documents (author biographies) and retain documents (a country's capital and two sums)."""
    bios = []
    for a in make_authors(n_forget, seed):
        bios.append(" ".join(TEMPLATES[attr][1].format(n=a["name"], v=a[attr]) for attr in TEMPLATES))
    countries, sums = make_countries(n_retain, seed + 1), make_sums(2 * n_retain, seed + 2)
    retain = [
        c["answer"].strip() + " " + sums[2 * i]["answer"].strip() + " " + sums[2 * i + 1]["answer"].strip()
        for i, c in enumerate(countries)
    ]
    return bios, retain


def tokenize(tok, docs: list[str]) -> list[dict]:
    out = []
    for d in docs:
        ids = tok(d, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def train(
    model, docs: list[dict], pad: Pad, args, routing: list[int] | None = None, callbacks=(), **kw
) -> float:
    """Continued pretraining with a stock Trainer; with ``routing``: label-homogeneous micro-batches."""
    t = time.perf_counter()
    ta = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"), num_train_epochs=kw.get("epochs", args.epochs),
        learning_rate=kw.get("lr", args.lr), weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=0.1,
        per_device_train_batch_size=1 if routing is not None else 8, seed=args.seed, use_cpu=True, report_to=[],
        logging_strategy="no", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    if routing is None:
        trainer = Trainer(
            model=model, args=ta, train_dataset=docs, data_collator=pad, callbacks=list(callbacks)
        )
    else:
        data = TaggedDataset(
            docs, tags={"routing": routing}, group_by="routing", batch_size=8, seed=args.seed
        )
        trainer = Trainer(model=model, args=ta, train_dataset=data, callbacks=list(callbacks),
                          data_collator=TaggedCollator(base=pad, homogeneous="routing"))  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.eval()
    return time.perf_counter() - t


@torch.no_grad()
def mean_loss(model, docs: list[dict], pad: Pad) -> float:
    """Mean token cross-entropy (nats) over ``docs``."""
    model.eval()
    total = count = 0.0
    for i in range(0, len(docs), 16):
        batch = pad(docs[i : i + 16])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), target.flatten(), reduction="sum"
        )
        total += float(loss)
        count += int((target != -100).sum())
    return total / count


def combine(results: list[dict]) -> str:
    """One table over runs with different ``--seed`` (their ``results.json``): mean ± std of each loss, and the
    attack steps of every run."""
    seeds = [r["config"]["seed"] for r in results]

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    stages = ["raw", "ablated", "calibrated"]
    lines = [f"| model | {' | '.join(f'{s}: forget / retain loss' for s in stages)} | attack steps (seeds {seeds}) |",
             "|---|" + "---:|" * (len(stages) + 1)]  # fmt: skip
    for key, first in results[0]["rows"].items():
        cells = []
        for s in stages:
            if s not in first:
                cells.append("—")
                continue
            both = [[r["rows"][key][s][part] for r in results] for part in ("forget", "retain")]
            cells.append(f"{cell(both[0])} / {cell(both[1])}")
        attack = max(r["config"]["attack_steps"] for r in results)
        steps = [r["rows"][key].get("attack_steps", "—") for r in results]
        steps_cell = (
            "—" if key == "base" else ", ".join(f"> {attack}" if v is None else str(v) for v in steps)
        )
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {steps_cell} |")
    return "\n".join(lines)


def plot_seeds(results: list[dict], path: Path) -> None:
    """Forget loss (raw / after ablation and calibration) and attack steps per model, one point per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in results[0]["rows"] if k != "base"]
    cap = max(r["config"]["attack_steps"] for r in results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, key in enumerate(keys):
        for r in results:
            row = r["rows"][key]
            left.scatter(i, row["raw"]["forget"], color="tab:gray", marker="o")
            if "calibrated" in row:
                left.scatter(i, row["calibrated"]["forget"], color="tab:red", marker="^")
            steps = row.get("attack_steps")
            right.scatter(i, cap + 1 if steps is None else steps, color="tab:blue")
    base = statistics.mean(r["rows"]["base"]["raw"]["forget"] for r in results)
    left.axhline(base, color="tab:green", ls="--", lw=1, label="base model (never saw them)")
    left.scatter([], [], color="tab:gray", marker="o", label="after training")
    left.scatter([], [], color="tab:red", marker="^", label="after ablation + calibration (sgtm)")
    for ax, label in (
        (left, "forget-document loss (nats/token) ↑"),
        (right, f"attack steps to recover ↑ (cap {cap})"),
    ):
        ax.set_xticks(range(len(keys)), keys, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(label)
    left.legend(fontsize=7)
    fig.suptitle(
        f"SGTM on SmolLM2-135M-Instruct: one point per seed ({', '.join(str(r['config']['seed']) for r in results)})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/smollm2_sgtm")
    p.add_argument("--quick", action="store_true", help="few documents, one epoch (smoke run)")
    p.add_argument("--forget-docs", type=int, default=24)
    p.add_argument("--retain-docs", type=int, default=72)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--mlp-units", type=int, default=64, help="dedicated MLP units per layer (of 1536)")
    p.add_argument("--heads", type=int, default=1, help="dedicated attention heads per layer (of 9)")
    p.add_argument("--recalls", type=float, nargs="+", default=[1.0, 0.6])
    p.add_argument("--retain-label-frac", type=float, default=0.5, help="retain documents labelled retain")
    p.add_argument("--calib-steps", type=int, default=20)
    p.add_argument("--attack-steps", type=int, default=20)
    p.add_argument(
        "--margin", type=float, default=0.1, help="attack: forget loss within this of none's (nats)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--combine", type=Path, nargs="+", metavar="DIR",
        help="no training: one mean ± std table over earlier runs' --out directories (other --seed values); "
        "written to --out/table_seeds.md and --out/seeds.png",
    )  # fmt: skip
    args = p.parse_args()
    if args.combine:
        results = [json.loads((d / "results.json").read_text()) for d in args.combine]
        text = combine(results)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "table_seeds.md").write_text(text + "\n")
        plot_seeds(results, Path(args.out) / "seeds.png")
        print(text + f"\n\nwrote {Path(args.out) / 'table_seeds.md'}, {Path(args.out) / 'seeds.png'}")
        return
    if args.quick:
        args.forget_docs, args.retain_docs, args.epochs, args.recalls = 8, 16, 1.0, [1.0]
        args.calib_steps, args.attack_steps = 2, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()

    base, tok = load_gguf(smollm2_path())
    pad = Pad(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    forget_txt, retain_txt = corpus(args.forget_docs, args.retain_docs, args.seed)
    forget, retain = tokenize(tok, forget_txt), tokenize(tok, retain_txt)
    rng = random.Random(args.seed)
    order = list(range(len(forget)))
    rng.shuffle(order)  # the first round(recall · n) forget documents in this order are the labelled ones
    n_r = round(args.retain_label_frac * len(retain))
    retain_labels = [RETAIN] * n_r + [UNLABELLED] * (len(retain) - n_r)
    rng.shuffle(retain_labels)
    calib_retain = [d for d, lab in zip(retain, retain_labels) if lab == RETAIN]
    rows: dict[str, dict] = {}

    def record(key: str, stage: str, model, **extra) -> None:
        rows.setdefault(key, {})[stage] = {"forget": mean_loss(model, forget, pad),
                                           "retain": mean_loss(model, retain, pad)}  # fmt: skip
        rows[key].update(extra)
        print(f"{key:<14} {stage:<11} " + json.dumps(rows[key][stage]), flush=True)

    record("base", "raw", base)
    none = copy.deepcopy(base)
    secs = train(none, forget + retain, pad, args)
    record("none", "raw", none, train_s=secs)
    models = {"none": none}
    for recall in args.recalls:
        labelled = set(order[: round(recall * len(forget))])
        labelled_docs = [forget[i] for i in sorted(labelled)]
        # data filtering
        model = copy.deepcopy(base)
        secs = train(model, retain + [d for i, d in enumerate(forget) if i not in labelled], pad, args)
        record(f"filter@{recall}", "raw", model, train_s=secs)
        models[f"filter@{recall}"] = model
        # SGTM: route, ablate, calibrate
        model = copy.deepcopy(base)
        dedicated = dedicated_mask(model, mlp_units=args.mlp_units, heads=args.heads)
        callback = GradientRoutingCallback(dedicated, strict=True)
        labels = retain_labels + [FORGET if i in labelled else UNLABELLED for i in range(len(forget))]
        secs = train(model, retain + forget, pad, args, routing=labels, callbacks=[callback])
        key = f"sgtm@{recall}"
        record(key, "raw", model, train_s=secs, dedicated_fraction=dedicated.density(),
               routed_batches={str(k): v for k, v in callback.router.counts.items()})  # fmt: skip
        ablate(model, dedicated)
        record(key, "ablated", model)
        with (
            warnings.catch_warnings()
        ):  # the demo never saves its models: the added bias need not survive a reload
            warnings.filterwarnings("ignore", message="calibrate_logits added an LM-head bias")
            calibrate_logits(model, {"forget": ([pad(labelled_docs[i : i + 8]) for i in range(0, len(labelled_docs), 8)], 1.0),
                                     "retain": ([pad(calib_retain[i : i + 8]) for i in range(0, len(calib_retain), 8)], 1.0)},
                             steps=args.calib_steps, lr=1e-2, progress=False)  # fmt: skip
        record(key, "calibrated", model)
        models[key] = model
        # post-hoc GradDiff on the none model, as many steps as one epoch of the labelled forget documents
        model = copy.deepcopy(none)
        cb = SaliencyUnlearningCallback(labelled_docs, objective=UnlearningObjective("graddiff", retain_weight=1.0),
                                        mask=ParamMask.full(model), collate=pad, progress=False)  # fmt: skip
        sample = random.Random(args.seed).sample(calib_retain, min(len(calib_retain), len(labelled_docs)))
        t = time.perf_counter()
        ta = TrainingArguments(output_dir=str(out / "trainer"), num_train_epochs=2, learning_rate=2e-5,
                               per_device_train_batch_size=8, lr_scheduler_type="constant", weight_decay=0.0,
                               seed=args.seed, use_cpu=True, report_to=[], logging_strategy="no",
                               save_strategy="no", disable_tqdm=True)  # fmt: skip
        trainer = Trainer(model=model, args=ta, train_dataset=forget_retain_dataset(labelled_docs, sample),
                          data_collator=TaggedCollator(base=pad), callbacks=[cb])  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        model.eval()
        record(f"graddiff@{recall}", "raw", model, train_s=time.perf_counter() - t)
        models[f"graddiff@{recall}"] = model

    # fine-tuning attack: same optimiser, learning rate and batches for every model
    target = rows["none"]["raw"]["forget"] + args.margin
    for key, model in models.items():
        attack = relearn_attack(model, forget, lambda m: mean_loss(m, forget, pad), target, steps=args.attack_steps,
                                eval_every=2, lr=5e-5, batch_size=8, collate=pad, higher_is_recovered=False,
                                seed=args.seed)  # fmt: skip
        rows[key]["attack_steps"] = attack["steps_to_recover"]
        print(f"{key}: attack {attack['steps_to_recover']}", flush=True)

    total = time.perf_counter() - t0
    stages = ["raw", "ablated", "calibrated"]
    lines = ["| model | " + " | ".join(f"{s}: forget / retain loss" for s in stages) + " | attack steps |",
             "|---|" + "---:|" * (len(stages) + 1)]  # fmt: skip
    for key, r in rows.items():
        cells = [f"{r[s]['forget']:.3f} / {r[s]['retain']:.3f}" if s in r else "—" for s in stages]
        steps = r.get("attack_steps", "—") if key != "base" else "—"
        steps = f"> {args.attack_steps}" if steps is None else steps
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {steps} |")
    header = (f"SmolLM2-135M-Instruct (fp32, CPU, {args.threads} threads), continued pretraining {args.epochs:g} "
              f"epochs, lr {args.lr:g}, on {len(forget)} forget + {len(retain)} retain documents; SGTM: "
              f"{args.mlp_units} MLP units + {args.heads} head per layer dedicated ({rows[f'sgtm@{args.recalls[0]}']['dedicated_fraction']:.3f} "
              f"of the weights), {round(100 * args.retain_label_frac)} % of retain documents labelled; attack: "
              f"steps until forget loss ≤ none's + {args.margin} (lr 5e-5, batch 8, at most {args.attack_steps}); "
              f"seed {args.seed}")  # fmt: skip
    text = header + "\n\n" + "\n".join(lines)
    print("\n" + text + f"\n\nwall time {total / 60:.1f} min")
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps({"config": vars(args), "rows": rows, "wall_s": total}, indent=1)
    )


if __name__ == "__main__":
    main()
