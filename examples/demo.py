"""The hfhooks end-to-end demo (``make demo``): one short run per capability, on CPU, with real data.

Sections (each is also a standalone script with its own ``--help``):

==============  ==========================================  ================================================
section         script                                      what it shows
==============  ==========================================  ================================================
saliency        examples/saliency_demo.py                   SalUn saliency → 50 % mask → safetensors → CLI
routing         examples/routing_demo.py --quick            SGTM on a bilingual corpus: ablate, calibrate
unlearning      benchmarks/bench_unlearning.py --quick      SalUn vs Retrain / FT / GA / RL on digits
attribution     examples/decoy_digits.py --quick            RRR removes a decoy shortcut on digits
restoration     examples/restoration_demo.py --quick        a weight diff and a layer restore, streamed
==============  ==========================================  ================================================

Each section writes its artifacts and a ``results.json`` under ``--out/<section>``; the demo ends with a
summary table of every section's status and wall time. ``--only`` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# "{out}" is replaced by the section's artifact directory.
SECTIONS = {
    "saliency": ["examples/saliency_demo.py", "--out", "{out}"],
    "routing": ["examples/routing_demo.py", "--quick", "--out", "{out}"],
    "unlearning": [
        "benchmarks/bench_unlearning.py",
        "--quick",
        "--out",
        "{out}/results.json",
        "--plot",
        "{out}/unlearning_gap.png",
    ],
    "attribution": ["examples/decoy_digits.py", "--quick", "--out", "{out}"],
    "restoration": ["examples/restoration_demo.py", "--quick", "--out", "{out}"],
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs", help="artifact directory (default: outputs)")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    args = parser.parse_args()
    out = Path(args.out)
    summary = []
    for name, cmd in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        script = ROOT / cmd[0]
        if not script.exists():
            summary.append((name, "not available", 0.0, ""))
            continue
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        argv = [a.replace("{out}", str(target)) for a in cmd[1:]]
        print(f"\n{'=' * 100}\n== {name}: {cmd[0]} {' '.join(argv)}\n{'=' * 100}", flush=True)
        start = time.time()
        proc = subprocess.run([sys.executable, str(script), *argv], cwd=ROOT)
        took = time.time() - start
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        artifacts = sorted(p.name for p in target.iterdir() if p.is_file())
        summary.append((name, status, took, ", ".join(artifacts[:6])))
    print(f"\n{'=' * 100}\nhfhooks demo summary (artifacts under {out}/)\n{'-' * 100}")
    print(f"{'section':<12} {'status':<20} {'time':>8}  artifacts")
    for name, status, took, artifacts in summary:
        print(f"{name:<12} {status:<20} {took:>7.1f}s  {artifacts}")
    (out / "summary.json").write_text(
        json.dumps([dict(zip(("section", "status", "seconds", "artifacts"), s)) for s in summary], indent=2)
    )
    return 0 if all(s[1] in ("ok", "not available") for s in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
