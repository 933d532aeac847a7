"""Task vectors, merges, TALL masks and LoRA diffs of real SmolLM2-135M-Instruct fine-tunes (CPU).

What it does (``make install-llm`` first):
 1. fine-tunes SmolLM2 three times, full weights, stock ``Trainer``, each on one task of invented facts that the
    base model cannot know (``examples/fictitious.py``): the birthplaces of fictitious authors, the capitals of
    fictitious countries, and sums of three-digit numbers in a fixed answer format; saves base and fine-tunes
    as checkpoints (safetensors);
 2. takes each fine-tune's task vector with ``WeightDiff.between`` (exact by default: checks
    ``apply(diff, base) == tuned`` bit for bit and reports the file size against the changed tensors' bytes);
 3. merges the three checkpoints in one streaming pass with ``hfhooks.merge``: task arithmetic, TIES, TALL
    (one model per task, reconstructed from the merged vector with that task's TALL mask) and consensus
    (coordinates kept by ≥ 2 TALL masks), and scores every model on every task (TOFU's answer probability:
    ``P(answer | question)^(1/|answer|)``);
 4. trains a LoRA adapter (peft, r=16) on the first task, takes its diff with ``WeightDiff.from_lora`` (stored
    factored: B, A and the scaling) and checks that applying it to the base equals peft's
    ``merge_and_unload()``.

Run: ``python examples/smollm2_diffs.py --out outputs/smollm2_diffs`` (≈ 10–20 min on 2 CPU cores; ``--quick``:
fewer examples and steps, a smoke run). Writes ``results.json``, ``table.md`` and ``tasks_heatmap.png``.
Results: ``docs/merging.md`` ("On a real LLM").
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from fictitious import Pad, make_authors, make_countries, make_sums, qa_items, tokenize_qa
from transformers import PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from hfhooks import WeightDiff, answer_probability, load_gguf, merge, smollm2_path


def tasks(n: int, seed: int) -> dict[str, list[dict]]:
    """Three tasks of ``n`` QA pairs each (question / answer strings)."""
    authors = make_authors(n, seed)
    births = [it for it in qa_items(authors, authors, seed) if "born?" in it["question"]]  # one per author
    return {"birthplaces": births, "capitals": make_countries(n, seed + 1), "sums": make_sums(n, seed + 2)}


def finetune(model, data: list[dict], pad: Pad, out: Path, name: str, lr: float, args) -> float:
    """SFT on ``data`` with a stock Trainer; returns the wall time."""
    t = time.perf_counter()
    ta = TrainingArguments(
        output_dir=str(out / "trainer" / name), num_train_epochs=args.epochs, learning_rate=lr,
        per_device_train_batch_size=8, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0,
        seed=args.seed, use_cpu=True, report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=ta, train_dataset=data, data_collator=pad)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.eval()
    return time.perf_counter() - t


def scores(model, tok, task_sets: dict[str, list[dict]]) -> dict[str, float]:
    """Mean answer probability on each task."""
    out = {}
    for name, items in task_sets.items():
        q, a = [it["question"] for it in items], [it["answer"] for it in items]
        out[name] = float(answer_probability(model, tok, q, a, batch_size=8).mean())
    return out


def load_state(model, state: dict[str, torch.Tensor]):
    """A copy of ``model`` holding ``state`` (a merge's canonical-name state dict)."""
    m = copy.deepcopy(model)
    missing, unexpected = m.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:  # tied head: not stored
        raise RuntimeError(
            f"merged state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return m.eval()


def heatmap(table: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, task_names = list(table), list(next(iter(table.values())))
    data = [[table[m][t] for t in task_names] for m in models]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(models) + 1.2))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(task_names)), task_names)
    ax.set_yticks(range(len(models)), models)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="answer probability")
    ax.set_title("SmolLM2-135M: fine-tunes and their merges, per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lora_check(base, tok, data, pad: Pad, out: Path, args) -> dict:
    """LoRA on the first task → WeightDiff.from_lora (factored) → applied to the base == peft's merge."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    secs = finetune(peft_model, data, pad, out, "lora", args.lora_lr, args)
    diff = WeightDiff.from_lora(peft_model)
    diff.save(out / "lora_diff.safetensors")
    dense_bytes = sum(4 * base.get_parameter(n).numel() for n in diff.changed if n.endswith(".weight"))
    applied = diff.apply(copy.deepcopy(base))
    merged = peft_model.merge_and_unload()
    gap = max(float((applied.get_parameter(n) - merged.get_parameter(n)).abs().max()) for n in diff.changed)
    return {"train_s": secs, "file_bytes": (out / "lora_diff.safetensors").stat().st_size,
            "dense_fp32_bytes": dense_bytes, "max_abs_vs_peft_merge": gap, "model": applied,
            "changed_tensors": len(diff.changed)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/smollm2_diffs")
    p.add_argument("--quick", action="store_true", help="8 examples per task, 2 epochs (smoke run)")
    p.add_argument("--examples", type=int, default=24, help="QA pairs per task")
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--lr", type=float, default=1e-4, help="full-weight fine-tunes")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.examples, args.epochs = 8, 2.0
    out = Path(args.out)
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()

    task_sets = tasks(args.examples, args.seed)
    base, tok = load_gguf(smollm2_path())
    pad = Pad(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    base.save_pretrained(out / "ckpt" / "base")
    table: dict[str, dict[str, float]] = {"base": scores(base, tok, task_sets)}
    info: dict[str, dict] = {}

    # 1-2. three fine-tunes, their checkpoints and exact task vectors
    tuned_dirs = []
    for name, items in task_sets.items():
        model = copy.deepcopy(base)
        secs = finetune(model, tokenize_qa(tok, items), pad, out, name, args.lr, args)
        table[f"fine-tune: {name}"] = scores(model, tok, task_sets)
        d = out / "ckpt" / name
        model.save_pretrained(d)
        tuned_dirs.append(d)
        diff = WeightDiff.between(out / "ckpt" / "base", d)
        diff.save(out / f"{name}.diff.safetensors")
        changed_bytes = sum(4 * base.get_parameter(n).numel() for n in diff.changed)
        check = diff.apply(copy.deepcopy(base))
        exact = all(
            torch.equal(check.get_parameter(n), model.get_parameter(n)) for n, _ in model.named_parameters()
        )
        info[name] = {"train_s": secs, "diff_exact": diff.exact, "apply_bit_identical": exact,
                      "diff_file_bytes": (out / f"{name}.diff.safetensors").stat().st_size,
                      "changed_tensor_bytes": changed_bytes, "changed_tensors": len(diff.changed)}  # fmt: skip
        del model, check

    # 3. merges in one streaming pass each (in memory: base and fine-tunes from their checkpoints)
    merges = {
        "task arithmetic (λ=1)": {"method": "task_arithmetic"},
        "task arithmetic (λ=0.5)": {"method": "task_arithmetic", "lambda_": 0.5},
        "TIES (density 0.2)": {"method": "ties", "density": 0.2},
        "consensus (k=2)": {"method": "consensus", "k": 2},
    }
    merges.update({f"TALL: {name}": {"method": "tall", "task": i} for i, name in enumerate(task_sets)})
    for label, opts in merges.items():
        t = time.perf_counter()
        report = merge(out / "ckpt" / "base", tuned_dirs, out=out / "ckpt" / "merged", overwrite=True,
                       progress=False, **opts)  # fmt: skip
        merged_model = type(base).from_pretrained(out / "ckpt" / "merged").eval()
        table[label] = scores(merged_model, tok, task_sets)
        info[label] = {"merge_s": time.perf_counter() - t, "report": str(report)[:400]}
        del merged_model

    # 4. LoRA: factored diff vs peft's merge
    first = next(iter(task_sets))
    lora = lora_check(base, tok, tokenize_qa(tok, task_sets[first]), pad, out, args)
    table[f"LoRA diff applied: {first}"] = scores(lora.pop("model"), tok, task_sets)
    info["lora"] = lora

    total = time.perf_counter() - t0
    names = list(task_sets)
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {m} | " + " | ".join(f"{row[t]:.3f}" for t in names) + " |" for m, row in table.items()]
    header = (f"SmolLM2-135M-Instruct (fp32, CPU, {args.threads} threads); {args.examples} QA pairs per task; "
              f"full-weight fine-tunes: {args.epochs:g} epochs, lr {args.lr:g}; LoRA r=16, lr {args.lora_lr:g}; "
              f"seed {args.seed}; answer probability = P(answer | question)^(1/|answer|)")  # fmt: skip
    text = header + "\n\n" + "\n".join(lines)
    print("\n" + text + f"\n\nwall time {total / 60:.1f} min\n" + json.dumps(info, indent=1, default=str))
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"config": vars(args), "table": table, "info": info,
                                                  "wall_s": total}, indent=1, default=str))  # fmt: skip
    heatmap(table, out / "tasks_heatmap.png")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'tasks_heatmap.png'}")


if __name__ == "__main__":
    main()
