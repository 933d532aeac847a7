"""Build docs/compatibility.md (callback × setup) from pytest's JUnit XML reports of the ``compat``-marked tests.

Tests tag themselves ``@pytest.mark.compat(callback=..., setup=..., variant=..., expect="error")``;
``tests/conftest.py`` copies the marker (and the library versions) into each test's JUnit properties, and a
refusal test records the message it checked as ``compat_error``. This script renders every cell from those
results — ✓ (a test trained through the combination and checked its guarantees), ✗ (a test checked the error),
a failure, a skip with its reason, or a gap with its explanation — never by hand.

Usage::

    python scripts/compat_matrix.py --run                  # run tests/compat, then write docs/compatibility.md
    python scripts/compat_matrix.py --junit a.xml [b.xml]  # render from existing reports (e.g. a GPU run too)
    python scripts/compat_matrix.py --junit build/junit.xml --check   # fail if the committed matrix is stale

Reports of other library versions (``make test-min``'s) are summarised below the matrix: totals, and the tests
they skip that the first report runs (the explicit version gates).
"""

from __future__ import annotations

import argparse
import html
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "compatibility.md"
REGENERATE = "make compat-matrix"

CALLBACKS = {
    "gradient_mask": "`GradientMaskCallback`",
    "routing": "`GradientRoutingCallback`",
    "unlearning": "`SaliencyUnlearningCallback`",
    "attribution": "`AttributionAlignmentCallback`",
    "restoration": "`LayerRestorationCallback`",
}
SETUPS = {  # column title, how the tests select it
    "single": (
        "Single process",
        "fp32 on CPU, no wrapper: the baseline every other column changes one thing of.",
    ),
    "peft": (
        "PEFT LoRA",
        "`peft.get_peft_model(model, LoraConfig(r=2, ...))`; masks and restoration act on the "
        "adapters (and `modules_to_save` copies), base weights stay frozen.",
    ),
    "ddp": (
        "DDP",
        "`torchrun --nproc_per_node 2`, `TrainingArguments(ddp_backend='gloo')` on CPU; both ranks "
        "checked, and their weights must be bit-identical.",
    ),
    "fsdp2": (
        "FSDP2",
        "`torch.distributed.fsdp.fully_shard` on each decoder layer and the root (parameters are "
        "sharded DTensors), `torchrun --nproc_per_node 2`, gloo, CPU. On CPU accelerate runs "
        "`TrainingArguments(fsdp=...)` as plain DDP (its FSDP path needs a GPU), so this column drives each "
        "callback's events in the Trainer's order around the sharded model (AdamW with weight decay, two "
        "accumulated micro-batches, clipping); frozen coordinates are compared on the gathered weights of "
        "both ranks.",
    ),
    "compile": (
        "torch.compile",
        "`TrainingArguments(torch_compile=True, torch_compile_backend='aot_eager')`: Dynamo + AOTAutograd, "
        "which decide how hooks and the backward graph behave; each callback also runs once with the default "
        "`inductor` backend (a variant: its C++ code generation takes 10–30 s per tiny model on two CPU cores).",
    ),
    "grad_ckpt": (
        "Grad. checkpointing",
        "`gradient_checkpointing=True, gradient_checkpointing_kwargs="
        "{'use_reentrant': False}` (non-reentrant).",
    ),
    "bf16": (
        "bf16 autocast",
        "`TrainingArguments(bf16=True, use_cpu=True)`: CPU autocast to bfloat16, fp32 master weights.",
    ),
    "gpu_bf16": (
        "bf16 on GPU",
        "`TrainingArguments(bf16=True)` on a CUDA device; runs only where one exists.",
    ),
    "zero1": (
        "DeepSpeed ZeRO-1",
        "`TrainingArguments(deepspeed={'zero_optimization': {'stage': 1}, ...}, use_cpu=True, "
        "optim='adamw_torch')`, `torchrun --nproc_per_node 2`, `DS_ACCELERATOR=cpu` (gloo); frozen coordinates "
        "are compared on the module weights, the fp32 master weights and the Adam state of both ranks.",
    ),
    "zero2": ("DeepSpeed ZeRO-2", "As ZeRO-1, with `'stage': 2` (gradients partitioned too)."),
    "zero3": (
        "DeepSpeed ZeRO-3",
        "As ZeRO-1, with `'stage': 3` (parameters partitioned too; `deepspeed.init_distributed(dist_backend="
        "'gloo')` before the model is built); module weights compared gathered.",
    ),
    "fsdp1": ("FSDP1", "`TrainingArguments(fsdp='full_shard', fsdp_config={'version': 1})`."),
    "trl": (
        "TRL",
        "TRL's `SFTTrainer` (the `trl` extra) on a `datasets.Dataset` with side-label columns (`unlearn`, "
        "`routing`, `rationale`), TRL's tokenisation, its `DataCollatorForLanguageModeling` wrapped in "
        "`TaggedCollator(..., columns=[...])` with `remove_unused_columns=False`, and its fused LM head (label "
        "log-probabilities, no logits); `DPOTrainer` and `SFTTrainer(peft_config=LoraConfig(...))` (TRL wraps "
        "the model after the callbacks were built) as variants where the method makes sense. Refusals are "
        "raised before the first optimizer step.",
    ),
}
GAPS = {  # (callback or "*", setup) -> why a cell without any test result is empty
    ("*", "fsdp2"): "not tested yet: FSDP2 tests live in tests/compat/test_fsdp2.py",
    ("*", "gpu_bf16"): "not run: the report has no GPU run",
}
SYMBOL = {"pass": "✓", "refused": "✗", "failed": "FAILED", "skipped": "skipped", "missing": "—"}
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"


@dataclass
class Result:
    """One compat-marked test's outcome."""

    test: str
    callback: str
    setup: str
    variant: str
    expect: str
    outcome: str  # pass | refused | failed | skipped
    detail: str  # the checked error message, the failure or the skip reason
    versions: str


@dataclass
class Report:
    """One JUnit XML report: its compat results, and totals / skip reasons over all of its tests."""

    versions: str
    results: list[Result]
    totals: dict[str, int]
    skips: dict[str, str]  # test -> skip reason


def _outcome(case: ET.Element) -> tuple[str, str]:
    failed = case.find("failure") if case.find("failure") is not None else case.find("error")
    if failed is not None:
        return "failed", (failed.get("message") or failed.text or "").strip()
    skipped = case.find("skipped")
    if skipped is not None:
        return "skipped", (skipped.get("message") or "").strip()
    return "passed", ""


def parse(path: Path) -> Report:
    """Every compat-tagged test case in a JUnit XML report, and totals over all its test cases."""
    out = []
    totals: dict[str, int] = defaultdict(int)
    skips: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, detail = _outcome(case)
        totals[outcome] += 1
        if outcome == "skipped":
            skips[test] = detail
        props = {p.get("name"): p.get("value", "") for p in case.iter("property")}
        if "compat_callback" not in props:
            continue
        error = props.get("compat_error", "")
        expect = props.get("compat_expect", "ok")
        if outcome == "passed":
            outcome = "refused" if error or expect == "error" else "pass"
            detail = error
        out.append(Result(test, props["compat_callback"], props["compat_setup"], props.get("compat_variant", ""),
                          expect, outcome, detail, props.get("compat_versions", "unknown versions")))  # fmt: skip
    versions = out[0].versions if out else "unknown versions"
    return Report(versions, out, dict(totals), skips)


def merge(results: list[Result]) -> list[Result]:
    """One result per test: a run that executed it (pass / refused / failed) wins over one that skipped it."""
    rank = {"failed": 3, "pass": 2, "refused": 2, "skipped": 1}
    best: dict[str, Result] = {}
    for r in results:
        if r.test not in best or rank[r.outcome] > rank[best[r.test].outcome]:
            best[r.test] = r
    return list(best.values())


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _md(text: str) -> str:
    """Plain text made safe in a Markdown list item (no HTML, no emphasis, no table-cell breaks)."""
    return html.escape(text, quote=False).replace("*", "\\*").replace("|", "\\|")


def render_matrix(results: list[Result]) -> tuple[str, list[str]]:
    """The matrix section (table, notes, setups) and the list of cells left unexplained."""
    unknown = sorted({f"{r.callback} × {r.setup}" for r in results
                      if r.callback not in CALLBACKS or r.setup not in SETUPS})  # fmt: skip
    if unknown:
        raise SystemExit(
            f"compat markers with unknown callback/setup keys: {unknown}; add them to {__file__}"
        )
    cells: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in sorted(results, key=lambda r: (r.variant != "", r.variant, r.test)):
        cells[(r.callback, r.setup)].append(r)
    notes: list[str] = []
    unexplained: list[str] = []
    rows = ["| Callback | " + " | ".join(title for title, _ in SETUPS.values()) + " |",
            "|---|" + "---|" * len(SETUPS)]  # fmt: skip
    for cb, cb_title in CALLBACKS.items():
        row = [cb_title]
        for setup in SETUPS:
            entries = cells.get((cb, setup), [])
            if not entries:
                why = GAPS.get((cb, setup)) or GAPS.get(("*", setup))
                if why is None:
                    why = "no test (unexplained gap)"
                    unexplained.append(f"{cb} × {setup}")
                notes.append(f"{CALLBACKS[cb]} × {SETUPS[setup][0]}: {why}.")
                row.append(f"— <sup>{len(notes)}</sup>")
                continue
            parts = []
            for r in entries:
                text = SYMBOL[r.outcome]
                label = f"{CALLBACKS[cb]} × {SETUPS[setup][0]}" + (
                    f" ({_md(r.variant)})" if r.variant else ""
                )
                note = None
                if r.outcome == "refused":
                    message = _short(r.detail).replace("`", "'") or f"see {r.test}"
                    note = f"{label}: refused with `{message}`"
                elif r.outcome == "failed":
                    note = f"{label}: **failed** in `{r.test}`: {_md(_short(r.detail))}"
                elif r.outcome == "skipped":
                    note = f"{label}: skipped ({_md(_short(r.detail))})"
                elif r.variant:
                    note = f"{label}: passes"
                if note is not None:
                    notes.append(note)
                    text += f" <sup>{len(notes)}</sup>"
                parts.append(text)
            row.append(" ".join(parts))
        rows.append("| " + " | ".join(row) + " |")
    lines = [BEGIN, "", *rows, "", "**Notes**", ""]
    lines += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    lines += ["", "**Setups**", ""]
    lines += [f"- **{title}** — {how}" for title, how in SETUPS.values()]
    lines += ["", END]
    return "\n".join(lines), unexplained


def render(results: list[Result], others: list[Report], primary_skips: set[str]) -> tuple[str, list[str]]:
    """The whole page: the matrix from ``results``, then a summary of each report of other versions."""
    matrix, unexplained = render_matrix(results)
    versions = sorted({r.versions for r in results})
    head = [
        "# Compatibility",
        "",
        "Which training setups each callback supports. Every cell is produced by "
        "`scripts/compat_matrix.py` from the results of the tests in `tests/compat/` (and "
        "`tests/compat/test_fsdp2.py` for FSDP2), never written by hand.",
        "",
        "**Legend.** ✓ — a test trains through this combination in a stock `transformers.Trainer` (TRL's "
        "trainers in the TRL column) and checks: "
        "no hfhooks hook left on any module, parameter or optimizer after training (the callback's own count "
        "and a census of the model's hook dictionaries against the state before the callback attached), "
        "masked / frozen / restored coordinates bit-identical, and evidence that the callback acted (unmasked "
        "coordinates trained, alignment term logged and checked to send gradient, forget loss up, restored "
        "layers equal to the reference). ✗ — the callback refuses the setup; a test checks the error, whose "
        "message (naming the alternative) is quoted in the notes. FAILED — a test failed in the run that "
        "produced this page. skipped — the test exists but did not run here (reason in the notes). A dash — no "
        "test; the note says why. A superscript points to a note; a cell may hold a main test and variants.",
        "",
        f"Produced with {'; '.join(versions)} ({_counts(results)}). Regenerate with `{REGENERATE}`.",
        "",
    ]
    tail = []
    if others:
        tail = ["", "## Minimum supported versions", "",
                "`make test-min` runs the whole suite, the matrix's tests included, against the oldest releases "
                "hfhooks supports (the lower bounds in `pyproject.toml`):", "",
                "| Versions | whole suite | matrix tests |", "|---|---|---|"]  # fmt: skip
        gates: dict[str, str] = {}
        for rep in others:
            t = rep.totals
            suite = f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('skipped', 0)} skipped"
            tail.append(f"| {rep.versions} | {suite} | {_counts(merge(rep.results))} |")
            gates.update({k: v for k, v in rep.skips.items() if v not in primary_skips})
        if gates:
            tail += [
                "",
                "Tests skipped only on those versions (explicit version gates, with their reasons):",
                "",
            ]
            tail += [f"- `{test}` — {_md(_short(why, 600))}" for test, why in sorted(gates.items())]
    return "\n".join(head) + matrix + "\n" + "\n".join(tail) + ("\n" if tail else ""), unexplained


def _counts(results: list[Result]) -> str:
    n = defaultdict(int)
    for r in results:
        n[r.outcome] += 1
    return f"{n['pass']} ✓ tests, {n['refused']} ✗ tests, {n['failed']} failed, {n['skipped']} skipped"


def section(text: str) -> str:
    """The matrix section of a page (what ``--check`` compares: versions may differ between machines)."""
    start, end = text.find(BEGIN), text.find(END)
    return text[start : end + len(END)] if start >= 0 and end >= 0 else ""


def run_tests(report: Path, extra: list[str]) -> None:
    """Run the compat tests with a JUnit XML report (failures are rendered, not fatal here)."""
    report.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "tests/compat", "-q", f"--junitxml={report}", *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--junit", nargs="*", type=Path, default=[], help="JUnit XML report(s) to render from"
    )
    parser.add_argument("--run", action="store_true", help="run tests/compat first (report in build/)")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments for --run")
    parser.add_argument("--out", type=Path, default=DOC, help="the page to write (or to check)")
    parser.add_argument("--check", action="store_true", help="only check that the page's matrix is current")
    a = parser.parse_args(argv)
    reports = list(a.junit)
    if a.run:
        reports.insert(0, ROOT / "build" / "compat-junit.xml")
        run_tests(reports[0], a.pytest_args.split())
    if not reports:
        parser.error("give --junit REPORT(s) or --run")
    missing = [str(p) for p in reports if not Path(p).exists()]
    if missing:
        parser.error(f"no such report: {missing}")
    parsed = [parse(Path(path)) for path in reports]
    if not parsed[0].results:
        print(f"no compat-marked tests in {reports[0]}", file=sys.stderr)
        return 1
    primary = merge([r for rep in parsed if rep.versions == parsed[0].versions for r in rep.results])
    primary_skips = {
        why for rep in parsed if rep.versions == parsed[0].versions for why in rep.skips.values()
    }
    others = [rep for rep in parsed if rep.versions != parsed[0].versions]
    text, unexplained = render(primary, others, primary_skips)
    if a.check:
        current = a.out.read_text() if a.out.exists() else ""
        if section(current) != section(text):
            print(f"{os.path.relpath(a.out, ROOT)} is stale (its matrix differs from the test results): run "
                  f"`{REGENERATE}` and commit it.", file=sys.stderr)  # fmt: skip
            return 1
        print(f"{os.path.relpath(a.out, ROOT)}: matrix matches the test results ({_counts(primary)}).")
        return 0
    a.out.write_text(text)
    print(f"wrote {a.out} ({_counts(primary)})")
    if unexplained:
        print(f"unexplained gaps: {unexplained}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
