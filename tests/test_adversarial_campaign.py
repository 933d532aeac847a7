"""The adversarial campaign (scripts/adversarial_campaign.py) in its quick form: zero violations.

Fuzzed masks, diffs and checkpoints, kill -9 mid-edit, concurrent edits, outputs inside inputs, symlinks to
outside files, FIFOs and a full disk, all through the real CLI entry point: every outcome must be a correct
result or a clean one-line error, inputs must stay byte-identical and nothing may be left behind. The full
campaign (``python scripts/adversarial_campaign.py``) runs the same oracles with more trials.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_campaign_finds_no_violation(tmp_path):
    # a subprocess: the campaign forks its commands, which must not inherit pytest's (or xdist's) state
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "adversarial_campaign.py"),
            *("--quick", "--json", "--seed", "0", "--out", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    families = summary["families"]
    assert set(families) == {
        "fuzz_artifacts",
        "fuzz_checkpoints",
        "kill9",
        "concurrent",
        "out_vs_in",
        "symlinks",
        "fifo",
        "full_disk",
    }
    assert all(f["trials"] > 0 for f in families.values())
    found = {
        f"{name}: {kind} ×{count} (e.g. {f['examples'][kind]})"
        for name, f in families.items()
        for kind, count in f["kinds"].items()
    }
    assert not found, "\n".join(sorted(found))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # the campaign cleans its temporary root
