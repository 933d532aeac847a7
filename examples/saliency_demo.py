"""hfhooks end-to-end demo on real data (scikit-learn's digits) and a tiny Llama, on CPU in about a minute.

What it does:
 1. turns each 8×8 digit image into a 64-token sequence (pixel intensities 0..16 are the tokens) and trains a
    tiny ``LlamaForSequenceClassification`` on it with a stock ``transformers.Trainer``;
 2. scores every weight by SalUn's saliency (|Σ ∇θ loss| on a 10 % "forget" subset, in eval mode);
 3. keeps the top 50 % globally as a ``ParamMask``, and the top MLP neurons by activation × gradient as a
    row/column mask, and saves both as bit-packed safetensors in ``--out``;
 4. inspects the saved mask with the ``hfhooks mask info`` CLI, loads both masks back and checks them;
 5. prints a results table and writes ``results.json``.

Run: ``python examples/saliency_demo.py --out outputs/saliency`` (part of ``make demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformers import LlamaConfig, LlamaForSequenceClassification, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import hfhooks
from hfhooks import ParamIndex, ParamMask, compute_saliency, find_layers, layer_of, mlp_unit_slices

PAD = 17  # pixel tokens are 0..16


class DigitTokens(torch.utils.data.Dataset):
    """Digits as token sequences: one token per pixel (intensity 0..16)."""

    def __init__(self, images, labels):
        self.ids = torch.as_tensor(images, dtype=torch.long)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def accuracy(model, data: DigitTokens) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data.ids).logits
    return float((logits.argmax(-1) == data.labels).float().mean())


def module_kind(name: str) -> str:
    if "embed" in name:
        return "embeddings"
    if "norm" in name:
        return "norms"
    if "self_attn" in name:
        return "attention"
    if "mlp" in name:
        return "mlp"
    return "head"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs", help="directory for artifacts (default: outputs)")
    parser.add_argument("--epochs", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    hf_logging.set_verbosity_error()
    t0 = time.time()

    # 1. real data, tiny model, stock Trainer
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data.astype(int), digits.target, test_size=0.2, random_state=args.seed
    )
    train, test = DigitTokens(x_tr, y_tr), DigitTokens(x_te, y_te)
    cfg = LlamaConfig(
        vocab_size=PAD + 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=10,
        pad_token_id=PAD,
    )
    model = LlamaForSequenceClassification(cfg)
    targs = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=32,
        num_train_epochs=args.epochs,
        learning_rate=3e-3,
        weight_decay=0.01,
        warmup_steps=10,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    Trainer(model=model, args=targs, train_dataset=train).train()
    acc = accuracy(model, test)

    # 2. SalUn saliency on a 10 % forget subset
    g = torch.Generator().manual_seed(args.seed)
    forget_idx = torch.randperm(len(train), generator=g)[: len(train) // 10]
    forget = torch.utils.data.DataLoader(torch.utils.data.Subset(train, forget_idx.tolist()), batch_size=32)
    scores = compute_saliency(model, forget, score="grad_abs_sum", progress=False)

    # 3. masks: top-50 % weights (global), and the top 10 % MLP neurons per layer by activation × gradient
    salun = ParamMask.from_scores(scores, ratio=0.5, scope="global")
    salun_path = salun.save(out / "salun_mask.safetensors", model=model)
    neurons = compute_saliency(model, forget, score="act_x_grad", progress=False)
    index = ParamIndex(model)
    slices = {}
    blocks = find_layers(model)
    for module, unit_scores in neurons.items():  # keys are MLP down-projection module names
        top = unit_scores.topk(max(1, unit_scores.numel() // 10)).indices
        slices.update(mlp_unit_slices(index, layer_of(f"{module}.weight", blocks), top.tolist()))
    neuron_mask = ParamMask.from_slices(slices, index)
    neuron_path = neuron_mask.save(out / "neuron_mask.safetensors", model=model, score="act_x_grad")

    # 4. inspect with the CLI, load back, check
    print("$ hfhooks mask info", salun_path, "--limit 6")
    subprocess.run(
        [sys.executable, "-m", "hfhooks", "mask", "info", str(salun_path), "--limit", "6"], check=True
    )
    loaded, loaded_neurons = ParamMask.load(salun_path), ParamMask.load(neuron_path)
    assert loaded == salun and loaded_neurons == neuron_mask, "round trip changed the mask"
    assert len(loaded.validate(model)) == len(index), "mask does not cover the model"

    # 5. results
    by_kind: dict[str, list[int]] = {}
    for name, (kept, total) in loaded.counts().items():
        k = by_kind.setdefault(module_kind(name), [0, 0])
        k[0] += kept
        k[1] += total
    n_params = sum(t for _, t in loaded.counts().values())
    rows = [
        ("model", f"tiny Llama, {len(find_layers(model))} layers, {n_params:,} parameters"),
        ("data", f"sklearn digits: {len(train)} train / {len(test)} test, forget set {len(forget_idx)}"),
        ("test accuracy", f"{acc:.3f}"),
        ("SalUn mask density (global r=0.5)", f"{loaded.density():.4f}"),
        *[(f"  density in {k}", f"{v[0] / v[1]:.3f}") for k, v in sorted(by_kind.items())],
        (
            "neuron mask (top 10% MLP units)",
            f"{loaded_neurons.density():.4f} of its {len(loaded_neurons)} tensors",
        ),
        (
            "mask file size",
            f"{salun_path.stat().st_size:,} B for {n_params:,} bits (numel/8 = {n_params // 8:,} B + header)",
        ),
        ("round trip", "bit-exact"),
        ("wall time", f"{time.time() - t0:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\nhfhooks demo results")
    print("-" * (width + 50))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    results = {k.strip(): v for k, v in rows} | {"hfhooks_version": hfhooks.__version__}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nartifacts: {salun_path}, {neuron_path}, {out / 'results.json'}")


if __name__ == "__main__":
    main()
