"""Selective layer restoration on a tiny language model: post-training collapses its answers, restoring a range
of layers brings the diversity back with validity held — found by the CRC search, applied by the CLI.

1. A character-level tokenizer and a *diverse* generated corpus: lines ``qch:c`` — a random set of 3–8 letters
   or digits, then one of them drawn uniformly at random.
2. Pre-train an 8-layer Llama on it (``base/``).
3. Post-train on a *narrow* chat-like set in a new format, ``<qch>q``, always answering the first listed
   character (``post/``): the model follows the new format and its answers collapse to one character.
4. :func:`hfhooks.search_restoration` scores all 36 ranges ``[s, e)`` with the CRC proxy (validity and entropy
   over the listed characters, one forward per prompt batch, prompts in the post-training format), applies
   "validity ≥ 0.9 × post, then max entropy" and compares with interpolating the weights (soup); plot.
5. ``hfhooks restore post/ base/ --layers s:e -o restored/`` (streaming, atomic) writes the selected model;
   ``hfhooks diff base/ post/`` extracts the post-training as a diff, ``hfhooks apply`` re-applies it to
   ``base/`` bit for bit.
6. Sampling check (real generations, not the proxy): for held-out prompts, how often the answer is valid and
   how many distinct characters come out, for base / post / restored / best soup.

Run: ``python examples/restoration_demo.py --out outputs/restoration`` (≈ 3–4 min on 2 busy CPU cores;
``--quick``, used by ``make demo``, ≈ 2 min).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers as T
from transformers.utils import logging as hf_logging

from hfhooks.io.checkpoints import Checkpoint
from hfhooks.restoration.search import crc_prompts, search_restoration

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
CHARS = " " + LETTERS + DIGITS + ".,:<>\n"
ROOT = Path(__file__).resolve().parent.parent


def tokenizer() -> T.PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]"
    )


def listed(rng: random.Random) -> list[str]:
    alphabet = LETTERS if rng.random() < 0.5 else DIGITS
    return rng.sample(alphabet, rng.randint(3, 8))


def pretrain_line(rng: random.Random) -> str:
    chars = listed(rng)
    return f"{''.join(chars)}:{rng.choice(chars)}"  # diverse: any listed character, uniformly


def post_line(rng: random.Random) -> str:
    chars = listed(rng)
    return f"<{''.join(chars)}>{chars[0]}"  # narrow, in a new format: always the first listed character


def batches(lines: list[str], tok, batch: int, rng: random.Random):
    while True:
        chunk = rng.sample(lines, batch)
        enc = tok(["[BOS]" + s for s in chunk], padding=True, return_tensors="pt", add_special_tokens=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = torch.full_like(ids, -100)  # loss on the answer (the last real token) only
        last = mask.sum(-1) - 1
        labels[torch.arange(len(ids)), last] = ids[torch.arange(len(ids)), last]
        yield ids, mask, labels


def train(model, lines, tok, steps: int, lr: float, seed: int, label: str) -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.time()
    for step, (ids, mask, labels) in zip(range(steps), batches(lines, tok, 64, rng)):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(
                f"  {label} step {step + 1}/{steps}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
    model.eval()


@torch.no_grad()
def sample_check(model, prompts, per_prompt: int, seed: int) -> dict:
    """Sample answers at temperature 1: valid rate, distinct valid answers per prompt, entropy of the counts."""
    g = torch.Generator().manual_seed(seed)
    valid_hits, distinct, entropy = 0, 0.0, 0.0
    for p in prompts:
        ids = torch.tensor([p.input_ids])
        probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        draws = torch.multinomial(probs, per_prompt, replacement=True, generator=g).tolist()
        ok = [d for d in draws if d in p.valid]
        valid_hits += len(ok)
        distinct += len(set(ok)) / len(p.valid)
        counts = torch.tensor([ok.count(v) for v in set(ok)], dtype=torch.float) if ok else torch.ones(1)
        q = counts / counts.sum()
        entropy += float(-(q * q.log()).sum())
    n = len(prompts)
    return {
        "valid_rate": valid_hits / (n * per_prompt),
        "distinct_frac": distinct / n,
        "entropy": entropy / n,
    }


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "hfhooks", *args], capture_output=True, text=True, cwd=ROOT)
    print(f"$ hfhooks {' '.join(args)}\n{proc.stdout.rstrip()}", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"hfhooks {args[0]} failed:\n{proc.stderr}")
    return proc.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/restoration")
    p.add_argument("--quick", action="store_true", help="fewer steps (for make demo)")
    p.add_argument(
        "--plot", help="also save the trade-off plot here (e.g. docs/img/restoration_tradeoff.png)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pre_steps, post_steps = (500, 200) if args.quick else (1200, 300)
    t_start = time.time()

    tok = tokenizer()
    rng = random.Random(args.seed)
    pretrain = [pretrain_line(rng) for _ in range(20000)]
    posttrain = [post_line(rng) for _ in range(4000)]
    cfg = T.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=2, eos_token_id=None,
    )  # fmt: skip
    print(f"1-2. pre-training an 8-layer Llama ({sum(p.numel() for p in T.LlamaForCausalLM(cfg).parameters()) / 1e6:.2f}M "
          f"parameters) on {len(pretrain)} diverse lines, e.g. {pretrain[0]!r}")  # fmt: skip
    base = T.LlamaForCausalLM(cfg)
    train(base, pretrain, tok, pre_steps, 3e-3, args.seed, "pre-train")
    base.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")

    print(f"3. post-training on {len(posttrain)} narrow lines, e.g. {posttrain[0]!r}")
    post = copy.deepcopy(base)
    train(post, posttrain, tok, post_steps, 1e-3, args.seed + 1, "post-train")
    post.save_pretrained(out / "post")
    tok.save_pretrained(out / "post")

    print("4. search: every range [s, e) scored by the CRC proxy in the post-training format")
    crc = dict(template="[BOS]<{chars}>", separator="", answer_prefix="")
    prompts = crc_prompts(tok, n=20, seed=1, **crc)
    held_out = crc_prompts(tok, n=50, seed=2, **crc)
    result = search_restoration(post, base, prompts, progress=False)
    print(result.table(top=10))
    best, soup = result.best, result.best_soup
    chosen = "no restoration" if best["kind"] == "post" else f"layers [{best['start']}, {best['end']})"
    print(
        f"   {len(result.ranges())} ranges + {len(result.soups())} soups in {result.seconds:.1f}s; selected {chosen}"
    )
    narrow = [r for r in result.ranges() if r["eligible"] and r["end"] - r["start"] <= 4]
    half = max(narrow, key=lambda r: r["diversity"]) if narrow else None
    if half:
        print(f"   best range of at most half the layers: [{half['start']}, {half['end']}) — validity "
              f"{half['validity']:.3f}, diversity {half['diversity']:.3f}")  # fmt: skip
    if soup:
        print(
            f"   best soup: α = {soup['alpha']:.2f} — validity {soup['validity']:.3f}, diversity {soup['diversity']:.3f}"
        )
    result.to_csv(out / "search.csv")
    fig_path = out / "restoration_tradeoff.png"
    result.plot(fig_path, title="Restoring layers of a collapsed tiny LM (CRC proxy, 8 layers)")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        result.plot(args.plot, title="Restoring layers of a collapsed tiny LM (CRC proxy, 8 layers)")

    print("5. the selected restoration and the post-training diff, with the CLI (streaming, atomic)")
    if best["kind"] == "range":
        layers = f"{best['start']}:{best['end']}"
    else:  # nothing beats the post-trained model: still show the command on the single best range
        layers = "{start}:{end}".format(**max(result.ranges(), key=lambda r: r["diversity"]))
    cli(
        "restore",
        str(out / "post"),
        str(out / "base"),
        "--layers",
        layers,
        "-o",
        str(out / "restored"),
        "--overwrite",
        "-q",
    )
    tok.save_pretrained(out / "restored")
    cli(
        "diff",
        str(out / "base"),
        str(out / "post"),
        "-o",
        str(out / "post.diff.safetensors"),
        "--dtype",
        "float64",
        "-q",
    )
    cli("diff-info", str(out / "post.diff.safetensors"), "--limit", "4")
    cli(
        "apply",
        str(out / "post.diff.safetensors"),
        str(out / "base"),
        "-o",
        str(out / "post-again"),
        "--overwrite",
        "-q",
    )
    again, ref = Checkpoint(out / "post-again"), Checkpoint(out / "post")
    bit_exact = all(torch.equal(again.get(n).view(torch.int32), ref.get(n).view(torch.int32)) for n in ref)
    print(f"   base + diff == post, bit for bit: {bit_exact}")

    print("6. sampling check on held-out prompts (20 samples each, temperature 1)")
    restored = T.LlamaForCausalLM.from_pretrained(out / "restored").eval()
    models = {"base": base, "post-trained": post, f"restored [{layers.replace(':', ', ')})": restored}
    if soup is not None:
        souped = copy.deepcopy(post)
        with torch.no_grad():
            for (_, w), (_, b) in zip(souped.named_parameters(), base.named_parameters()):
                w.lerp_(b, soup["alpha"])
        models[f"soup α={soup['alpha']:.2f}"] = souped
    checks = {}
    print(f"   {'model':<22} {'valid':>7} {'distinct/listed':>16} {'entropy':>8}")
    for name, model in models.items():
        checks[name] = sample_check(model, held_out, 20, args.seed)
        c = checks[name]
        print(f"   {name:<22} {c['valid_rate']:>7.3f} {c['distinct_frac']:>16.3f} {c['entropy']:>8.3f}")

    results = {
        "search": {"best": best, "best_soup": soup, "best_half_width": half, "post": result.post,
                   "base": next(r for r in result.rows if r["kind"] == "base"), "seconds": result.seconds,
                   "ranges": len(result.ranges()), "prompts": len(prompts)},
        "restored_layers": layers,
        "diff_bit_exact": bit_exact,
        "sampling": checks,
        "uniform_entropy_mean": sum(math.log(len(p.valid)) for p in held_out) / len(held_out),
        "seconds": time.time() - t_start,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"done in {results['seconds']:.0f}s; artifacts in {out}/")
    return 0 if bit_exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
