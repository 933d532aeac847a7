"""scripts/compat_matrix.py: cells come from JUnit results; gaps are explained or reported; stale pages fail."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "compat_matrix.py"
spec = importlib.util.spec_from_file_location("compat_matrix", SCRIPT)
cm = sys.modules.setdefault("compat_matrix", importlib.util.module_from_spec(spec))
spec.loader.exec_module(cm)

VERSIONS = "python 3, torch 2, transformers 5, peft 0"


def _case(name: str, callback: str, setup: str, body: str = "", **props: str) -> str:
    props = {"compat_callback": callback, "compat_setup": setup, "compat_versions": VERSIONS, **props}
    xml = "".join(f'<property name="{k}" value="{v}"/>' for k, v in props.items())
    return (
        f'<testcase classname="tests.compat.t" name="{name}"><properties>{xml}</properties>{body}</testcase>'
    )


def _report(path: Path, *cases: str, extra: str = "") -> Path:
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}{extra}</testsuite></testsuites>')
    return path


def test_cells_notes_and_gaps(tmp_path):
    report = _report(
        tmp_path / "a.xml",
        _case("ok", "gradient_mask", "single"),
        _case(
            "no",
            "gradient_mask",
            "zero2",
            compat_error="X does not support DeepSpeed. Use DDP.",
            compat_expect="error",
        ),
        _case("var", "gradient_mask", "peft", compat_variant="frozen base", compat_expect="error"),
        _case("bad", "routing", "single", body='<failure message="AssertionError: moved">tb</failure>'),
        _case("gpu", "routing", "gpu_bf16", body='<skipped message="no CUDA device in this run"/>'),
    )
    rep = cm.parse(report)
    assert [r.outcome for r in rep.results] == ["pass", "refused", "refused", "failed", "skipped"]
    text, unexplained = cm.render(rep.results, [], set())
    row = next(line for line in text.splitlines() if line.startswith("| `GradientMaskCallback`"))
    assert row.split(" | ")[1] == "✓" and "✗ <sup>" in row
    assert "X does not support DeepSpeed. Use DDP." in text
    assert "see tests.compat.t::var" in text  # an error test without a recorded message points to itself
    assert "**failed** in `tests.compat.t::bad`" in text and "skipped (no CUDA device in this run)" in text
    assert "not tested yet: FSDP2 tests live in" in text  # an explained gap
    assert "gradient_mask × ddp" in unexplained and "gradient_mask × single" not in unexplained


def test_merge_prefers_a_run_over_a_skip_and_check_detects_staleness(tmp_path):
    cpu = _report(
        tmp_path / "cpu.xml", _case("gpu", "routing", "gpu_bf16", body='<skipped message="no GPU"/>')
    )
    gpu = _report(tmp_path / "gpu.xml", _case("gpu", "routing", "gpu_bf16"))
    page = tmp_path / "compat.md"
    assert (
        cm.main(["--junit", str(cpu), str(gpu), "--out", str(page)]) == 1
    )  # writes, reports unexplained gaps
    assert "| `GradientRoutingCallback` | — <sup>" in page.read_text()
    assert "✓" in page.read_text().split("`GradientRoutingCallback`")[1].splitlines()[0]
    assert cm.main(["--junit", str(cpu), str(gpu), "--out", str(page), "--check"]) == 0
    assert cm.main(["--junit", str(cpu), "--out", str(page), "--check"]) == 1  # the GPU cell would change


def test_minimum_versions_section_lists_version_gates(tmp_path):
    latest = _report(tmp_path / "l.xml", _case("ok", "gradient_mask", "single"))
    gate = '<testcase classname="tests.test_x" name="old"><skipped message="transformers &lt; 4.48 bug"/></testcase>'
    old = _report(
        tmp_path / "o.xml",
        _case(
            "ok", "gradient_mask", "single", compat_versions="python 3, torch 2, transformers 4.46, peft 0"
        ),
        extra=gate,
    )
    page = tmp_path / "compat.md"
    cm.main(["--junit", str(latest), str(old), "--out", str(page)])
    text = page.read_text()
    assert "## Minimum supported versions" in text and "transformers 4.46" in text
    assert "`tests.test_x::old` — transformers &lt; 4.48 bug" in text
