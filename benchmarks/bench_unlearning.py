"""SalUn reproduction on real data: scikit-learn digits, a small CNN, Retrain / FT / GA / RL / SalUn side by side.

Protocol (SalUn, ICLR 2024, scaled down to 8×8 digits on a CPU):

* data: the 1797 digits, a fixed stratified 20 % test split (``random_state=0``); pixels scaled to [0, 1];
* ORIGINAL: a small CNN trained on the whole training split (SGD, momentum 0.9, weight decay 5e-4, cosine lr);
* two scenarios, each starting every method from the *same* original model:
  - ``random``: forget a random 10 % of the training split (drawn from the seed);
  - ``class``: forget every training example of one class (``--forget-class``). Here RA is accuracy on the
    retain set (the other classes), TA is accuracy on the test examples of the *remaining* classes, MIA uses
    those test examples as non-members, and the extra column ``UA_test`` is 100 − accuracy on the test
    examples of the forgotten class (Retrain ≈ 100: it has never seen the class);
* methods: Retrain (from scratch on the retain set, same recipe as the original — the reference), FT
  (fine-tune on the retain set), GA (gradient ascent on the forget set only: ``salun`` with
  ``UnlearningObjective("ga", retain_weight=0)`` and an all-ones mask), RL (random labels on the forget set +
  CE on the retain set, all-ones mask), SalUn (RL under a saliency mask of ratio r, scored by
  ``grad_abs_sum`` at θ₀ in eval mode); r ∈ {0.1, 0.3, 0.5, 0.7, 0.9}; r = 1.0 is RL;
* metrics (``hfhooks.unlearning_metrics``): UA, RA, TA, MIA-efficacy; ``average_gap`` to Retrain of the same
  seed; run time relative to that seed's Retrain (SalUn's time includes scoring the mask);
* every SalUn run asserts that the coordinates outside the mask are bit-identical to the original model.
* two extra, *untuned* rows run RL and SalUn r = 0.5 at the SalUn reference lr (``--ref-lr``, 0.013).

Hyper-parameters, same budget for every unlearning method: SGD (momentum 0.9, weight decay 5e-4, batch 64,
constant lr) for ``--unlearn-epochs`` epochs; the learning rate is picked from the same grid for every method
(``--lr-grid``) on separate *tuning seeds* (``--tune-seeds``, default 100 and 101, not among the reported seeds)
by the smallest average gap to each seed's own Retrain, averaged over the tuning seeds; the reported seeds then
reuse the chosen lr. Each SalUn ratio is tuned the same way. The full grid (gap per method × lr) is saved too.
A diverged run (non-finite logits: GA at a large lr) counts as gap = ∞ and is never selected.

    python benchmarks/bench_unlearning.py                 # full: tuning + 3 seeds, both scenarios (≈ 15 min, 2 cores)
    python benchmarks/bench_unlearning.py --quick         # ≈ 1-2 min: seed 0, SalUn r=0.5 only, no tuning (the
                                                          #   lrs the full run chose, TUNED_LRS)
    python benchmarks/bench_unlearning.py --docs          # also writes docs/img/unlearning_gap.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import default_data_collator

from hfhooks import ParamMask, UnlearningObjective, average_gap, salun, unlearning_metrics
from hfhooks.unlearning.evaluation import true_class_confidence

METHODS_FIXED = ("Original", "Retrain", "FT", "GA", "RL")
KEYS = ("UA", "RA", "TA", "MIA")


# --------------------------------------------------------------------------------------------------------------
# data and model


def load_data() -> tuple[list[dict], list[dict]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx_train, idx_test = train_test_split(
        list(range(len(d.target))), test_size=0.2, stratify=d.target, random_state=0
    )
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)

    def ex(i: int) -> dict:
        return {"pixel_values": x[i], "labels": y[i]}

    return [ex(i) for i in idx_train], [ex(i) for i in idx_test]


class CNN(nn.Module):
    """A small CNN (≈ 23k parameters) returning ``{"loss", "logits"}`` like a Hugging Face model."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(self.features(pixel_values))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def train(model: nn.Module, data: list[dict], epochs: int, lr: float, seed: int, cosine: bool) -> nn.Module:
    """Plain supervised training (ORIGINAL, Retrain, FT): SGD momentum 0.9, wd 5e-4, batch 64."""
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=64, shuffle=True, generator=g, collate_fn=default_data_collator
    )
    opt = sgd(lr)(model.parameters())
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 0.5 * (1 + math.cos(math.pi * s / total))) if cosine else (lambda s: 1.0)
    )
    model.train()
    for _ in range(epochs):
        for batch in loader:
            loss = model(**batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------------------
# one scenario, one seed


def split(train_set: list[dict], test_set: list[dict], scenario: str, seed: int, forget_class: int):
    if scenario == "random":
        g = torch.Generator().manual_seed(10_000 + seed)
        perm = torch.randperm(len(train_set), generator=g).tolist()
        n_f = round(0.1 * len(train_set))
        forget = [train_set[i] for i in sorted(perm[:n_f])]
        retain = [train_set[i] for i in sorted(perm[n_f:])]
        return forget, retain, test_set, []
    forget = [e for e in train_set if int(e["labels"]) == forget_class]
    retain = [e for e in train_set if int(e["labels"]) != forget_class]
    test_r = [e for e in test_set if int(e["labels"]) != forget_class]
    test_f = [e for e in test_set if int(e["labels"]) == forget_class]
    return forget, retain, test_r, test_f


def metrics(model, forget, retain, test, test_f, seed) -> dict[str, float]:
    # A diverged run (GA at a large lr) has non-finite logits; unlearning_metrics would hand NaN confidences to
    # the SVC, which raises. Such runs are recorded as diverged (gap = inf: never selected by tuning).
    with torch.no_grad():
        logits = model(torch.stack([e["pixel_values"] for e in [*forget, *retain, *test]]))["logits"]
    if not bool(torch.isfinite(logits).all()):
        return {**dict.fromkeys(KEYS, math.nan), "diverged": True}
    m = unlearning_metrics(model, forget, retain, test, seed=seed)
    if test_f:  # class-wise: error on the test examples of the forgotten class
        m["UA_test"] = 100.0 - 100.0 * float(true_class_confidence(model, test_f)[1].float().mean())
    return m


def unlearn(
    method: str, original: nn.Module, forget, retain, lr: float, epochs: int, seed: int, ratio: float = 1.0
) -> tuple[nn.Module, float, float]:
    """Run one unlearning method from a copy of ``original``. Returns (model, seconds, mask density)."""
    model = copy.deepcopy(original)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    density = 1.0
    if method == "FT":
        train(model, retain, epochs, lr, seed, cosine=False)
    elif method == "GA":
        salun(
            model, forget, [], UnlearningObjective("ga", retain_weight=0.0), mask=ParamMask.full(model),
            optimizer=sgd(lr), epochs=epochs, batch_size=64, seed=seed, progress=False,
        )  # fmt: skip
    elif method in ("RL", "SalUn"):
        objective = UnlearningObjective("random_labels", retain_weight=1.0, seed=seed)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        mask = salun(
            model, forget, retain, objective, ratio=ratio,
            mask=ParamMask.full(model) if method == "RL" else None,
            optimizer=sgd(lr), epochs=epochs, batch_size=64, seed=seed, progress=False,
        )  # fmt: skip
        density = mask.density()
        if method == "SalUn":  # the hard-freeze guarantee: outside the mask, bit-identical to θ₀
            for n, p in model.named_parameters():
                outside = ~mask[n]
                assert torch.equal(p.detach()[outside], before[n][outside]), f"{n}: frozen coordinates moved"
            changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
            total = sum(p.numel() for p in model.parameters())
            assert changed <= round(ratio * total), (changed, ratio * total)
    else:
        raise ValueError(method)
    model.eval()
    return model, time.perf_counter() - t0, density


def method_list(ratios: list[float]) -> list[tuple[str, str, float]]:
    """(label, method, ratio) for every unlearning method."""
    out = [("FT", "FT", 1.0), ("GA", "GA", 1.0), ("RL", "RL", 1.0)]
    out += [(f"SalUn r={r:g}", "SalUn", r) for r in ratios]
    return out


def run_seed(args, data, scenario: str, seed: int, lrs: dict[str, float] | None, grid: list[float]):
    """Original + Retrain + every method. With ``lrs`` None, sweep ``grid`` for every method (tuning)."""
    train_set, test_set = data
    forget, retain, test, test_f = split(train_set, test_set, scenario, seed, args.forget_class)
    if seed not in ORIGINALS:  # the same original model for both scenarios of a seed
        torch.manual_seed(seed)
        ORIGINALS[seed] = train(CNN(), train_set, args.epochs, args.lr, seed, cosine=True)
    original = ORIGINALS[seed]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    retrain = train(CNN(), retain, args.epochs, args.lr, seed, cosine=True)
    t_retrain = time.perf_counter() - t0
    ref = metrics(retrain, forget, retain, test, test_f, seed)
    rows = {
        "Retrain": {**ref, "gap": 0.0, "time": 1.0, "lr": args.lr},
        "Original": {
            **(m := metrics(original, forget, retain, test, test_f, seed)),
            "gap": average_gap(m, ref),
        },
    }
    fixed = (
        []
        if lrs is None
        else [(f"{m} @ ref lr", m, r, args.ref_lr) for m, r in (("RL", 1.0), ("SalUn r=0.5", 0.5))]
    )
    runs = [(lab, meth, r, None) for lab, meth, r in method_list(args.ratios)] + fixed
    for label, method, ratio, fixed_lr in runs:
        method = "SalUn" if method.startswith("SalUn") else method
        for lr in grid if lrs is None else [fixed_lr or lrs[label]]:
            model, secs, density = unlearn(
                method, original, forget, retain, lr, args.unlearn_epochs, seed, ratio
            )
            m = metrics(model, forget, retain, test, test_f, seed)
            gap = math.inf if m.get("diverged") else average_gap(m, ref)
            row = {**m, "gap": gap, "time": secs / t_retrain, "lr": lr, "density": density}
            key = label if lrs is not None else f"{label} @ lr={lr:g}"
            rows[key] = row
    info = {"n_forget": len(forget), "n_retain": len(retain), "n_test": len(test), "retrain_s": t_retrain}
    return rows, info


# --------------------------------------------------------------------------------------------------------------
# reporting


def finite(obj):
    """JSON-safe copy: non-finite floats (diverged runs) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(per_seed: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean ± std over seeds; diverged runs are left out of the mean and counted in ``diverged``."""
    out = {}
    for label in per_seed[0]:
        ok = [s[label] for s in per_seed if not s[label].get("diverged")]
        cols = [k for k in (*KEYS, "UA_test", "gap", "time") if k in per_seed[0][label]]
        out[label] = {k: mean_std([r[k] for r in ok]) if ok else (math.nan, math.nan) for k in cols}
        out[label]["lr"] = per_seed[0][label].get("lr")
        out[label]["diverged"] = len(per_seed) - len(ok)
    return out


def table(summary: dict, title: str) -> str:
    cols = [k for k in (*KEYS, "UA_test", "gap", "time") if k in next(iter(summary.values()))]
    names = {"gap": "Avg. Gap", "time": "time ×Retrain"}
    lines = [f"### {title}", "", "| method | lr | " + " | ".join(names.get(c, c) for c in cols) + " |"]
    lines.append("|---|---|" + "---:|" * len(cols))
    for label, row in summary.items():
        lr = "—" if label in ("Original",) or row.get("lr") is None else f"{row['lr']:g}"
        cells = []
        for c in cols:
            if c not in row:
                cells.append("—")
                continue
            mu, sd = row[c]
            cells.append(f"{mu:.2f} ± {sd:.2f}")
        if label == "Original":
            cells[cols.index("time")] = "—"
        note = f" ({row['diverged']} seed(s) diverged, left out)" if row.get("diverged") else ""
        lines.append(f"| {label}{note} | {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(rows: dict, grid: list[float], title: str) -> str:
    labels = [lab for lab, _, _ in METHOD_LABELS]
    lines = [f"### {title}", "", "| method | " + " | ".join(f"lr={lr:g}" for lr in grid) + " |"]
    lines.append("|---|" + "---:|" * len(grid))
    for lab in labels:
        cells = []
        for lr in grid:
            r = rows.get(f"{lab} @ lr={lr:g}")
            cells.append("—" if r is None else "diverged" if math.isinf(r["gap"]) else f"{r['gap']:.2f}")
        best = min(grid, key=lambda lr: rows[f"{lab} @ lr={lr:g}"]["gap"])
        cells[grid.index(best)] = f"**{cells[grid.index(best)]}**"
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


METHOD_LABELS: list[tuple[str, str, float]] = []
# Learning rates chosen by the full run's tuning (seeds 100, 101); ``--quick`` / ``--no-tune`` use them as they are.
TUNED_LRS: dict[str, dict[str, float]] = {
    "random": {"FT": 0.01, "GA": 0.001, "RL": 0.001, "SalUn r=0.1": 0.003, "SalUn r=0.3": 0.001,
               "SalUn r=0.5": 0.001, "SalUn r=0.7": 0.001, "SalUn r=0.9": 0.001},
    "class": {"FT": 0.1, "GA": 0.001, "RL": 0.1, "SalUn r=0.1": 0.01, "SalUn r=0.3": 0.003,
              "SalUn r=0.5": 0.1, "SalUn r=0.7": 0.003, "SalUn r=0.9": 0.03},
}  # fmt: skip
ORIGINALS: dict[int, nn.Module] = {}


def plot(summaries: dict[str, dict], path: Path, n_seeds: int) -> None:
    """Gap per method (bars, std error bars), one panel per scenario; the y axis is cut above the bulk of the
    bars so small gaps stay readable, and bars cut off carry their value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(6.4 * len(summaries), 4.0), squeeze=False)
    for ax, (scenario, summary) in zip(axes[0], summaries.items()):
        labels = [k for k in summary if k != "Retrain"]
        mu = [summary[k]["gap"][0] for k in labels]
        sd = [summary[k]["gap"][1] for k in labels]
        colors = [
            "#9e9e9e" if k == "Original" else "#d95f02" if k.startswith("RL") else "#1b9e77"
            if k.startswith("SalUn") else "#7570b3" for k in labels
        ]  # fmt: skip
        tops = sorted(m + s for m, s in zip(mu, sd))
        top = 1.3 * min(tops[-1], 4 * statistics.median(tops)) or 1.0
        ax.bar(range(len(labels)), mu, yerr=sd, capsize=3, color=colors)
        for i, m in enumerate(mu):
            cut = m + sd[i] > top
            y = min(m + sd[i], top * 0.93) if cut else m + sd[i]
            ax.text(i, y, f"{m:.2f}" + (" ↑" if cut else ""), ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, top)
        ticks = [k.replace("SalUn ", "SalUn\n").replace(" @ ref lr", "\n@ ref lr") for k in labels]
        ax.set_xticks(range(len(labels)), ticks, fontsize=7)
        ax.set_ylabel("average gap to Retrain (pp, lower is better)")
        ax.set_title(f"digits, {scenario} forgetting — mean ± std over {n_seeds} seed(s)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="seed 0, r=0.5 only, tuned lrs from TUNED_LRS (≈ 1-2 min)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--scenarios", nargs="+", default=["random", "class"], choices=["random", "class"])
    p.add_argument("--forget-class", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30, help="ORIGINAL and Retrain epochs")
    p.add_argument("--lr", type=float, default=0.05, help="ORIGINAL and Retrain peak lr (cosine)")
    p.add_argument("--unlearn-epochs", type=int, default=10)
    p.add_argument("--lr-grid", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--no-tune", action="store_true", help="skip tuning; use the lrs tuned by the full run")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument(
        "--ref-lr", type=float, default=0.013, help="extra untuned RL / SalUn r=0.5 rows at this lr"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/bench_unlearning.json")
    p.add_argument("--plot", default="benchmarks/results/unlearning_gap.png")
    p.add_argument("--docs", action="store_true", help="write the plot to docs/img/unlearning_gap.png")
    p.add_argument(
        "--replot", metavar="JSON", help="only redraw the plot (and reprint tables) from a results file"
    )
    args = p.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        print("\n\n".join(saved["tables"]))
        summaries = {sc: v["summary"] for sc, v in saved["scenarios"].items()}
        n_seeds = len(saved["config"]["seeds"])
        plot(summaries, Path(args.plot), n_seeds)
        if args.docs:
            plot(summaries, Path("docs/img/unlearning_gap.png"), n_seeds)
        return
    if args.quick:
        args.seeds, args.ratios, args.no_tune = args.seeds[:1], [0.5], True
    torch.set_num_threads(args.threads)
    METHOD_LABELS[:] = method_list(args.ratios)
    data = load_data()
    start = time.perf_counter()
    results: dict = {"config": vars(args), "scenarios": {}}
    summaries, texts = {}, []
    for scenario in args.scenarios:
        t = time.perf_counter()
        if args.no_tune:
            tune_rows = None
            lrs = {lab: TUNED_LRS[scenario].get(lab, 0.01) for lab, _, _ in METHOD_LABELS}
            print(f"[{scenario}] lrs from the full run's tuning: {lrs}", flush=True)
        else:
            tune_per_seed = [
                run_seed(args, data, scenario, s, None, args.lr_grid)[0] for s in args.tune_seeds
            ]
            tune_rows = {  # mean gap over the tuning seeds (inf if any diverged)
                k: {"gap": statistics.fmean(r[k]["gap"] for r in tune_per_seed)} for k in tune_per_seed[0]
            }
            lrs = {
                lab: min(args.lr_grid, key=lambda lr, lab=lab: tune_rows[f"{lab} @ lr={lr:g}"]["gap"])
                for lab, _, _ in METHOD_LABELS
            }
            print(
                f"[{scenario}] tuned on seeds {args.tune_seeds} ({time.perf_counter() - t:.0f}s): {lrs}",
                flush=True,
            )
        per_seed, infos = [], []
        for seed in args.seeds:
            t = time.perf_counter()
            rows, info = run_seed(args, data, scenario, seed, lrs, args.lr_grid)
            per_seed.append(rows)
            infos.append(info)
            print(f"[{scenario}] seed {seed}: {time.perf_counter() - t:.0f}s, " + ", ".join(
                f"{k} {v['gap']:.2f}" for k, v in rows.items()), flush=True)  # fmt: skip
        summary = summarise(per_seed)
        summaries[scenario] = summary
        texts.append(table(summary, f"{scenario} forgetting — mean ± std over seeds {args.seeds}"))
        if tune_rows is not None:
            texts.append(grid_table(tune_rows, args.lr_grid, f"{scenario} forgetting — Avg. Gap per lr, mean over tuning seeds {args.tune_seeds}"))  # fmt: skip
        results["scenarios"][scenario] = {
            "lr": lrs, "tuning": None if args.no_tune else tune_per_seed, "per_seed": per_seed, "info": infos,
            "summary": {k: {c: list(v) if isinstance(v, tuple) else v for c, v in row.items()} for k, row in summary.items()},
        }  # fmt: skip
    total = time.perf_counter() - start
    header = (
        f"digits 8×8 (train {len(data[0])}, test {len(data[1])}), CNN {sum(q.numel() for q in CNN().parameters())} params, "
        f"original/Retrain {args.epochs} epochs, unlearning {args.unlearn_epochs} epochs, torch {torch.__version__}, "
        f"{args.threads} thread(s), {platform.machine()}, total {total / 60:.1f} min"
    )
    print("\n" + header + "\n")
    print("\n\n".join(texts))
    results["header"], results["total_s"] = header, total
    results["tables"] = texts
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(finite(results), indent=2))
    plot(summaries, Path(args.plot), len(args.seeds))
    if args.docs:
        plot(summaries, Path("docs/img/unlearning_gap.png"), len(args.seeds))
    print(f"\nwrote {args.out} and {args.plot}" + (" and docs/img/unlearning_gap.png" if args.docs else ""))


if __name__ == "__main__":
    main()
