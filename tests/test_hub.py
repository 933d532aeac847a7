"""Masks and diffs through the Hub API: local folders, a populated Hub cache read offline, clear push errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hfhooks import ParamMask, WeightDiff
from hfhooks.io.hub import HubError


def _mask() -> ParamMask:
    g = torch.Generator().manual_seed(0)
    return ParamMask({"a.weight": torch.rand(5, 7, generator=g) > 0.5, "b.bias": torch.tensor([True, False])})


def _diff() -> WeightDiff:
    g = torch.Generator().manual_seed(1)
    return WeightDiff({"a.weight": torch.randn(5, 7, generator=g), "b.bias": torch.randn(2, generator=g)})


def _same_diff(x: WeightDiff, y: WeightDiff) -> bool:
    tx, ty = x.to_dict(), y.to_dict()
    return set(tx) == set(ty) and all(torch.equal(tx[n], ty[n]) for n in tx)


def test_save_pretrained_and_from_pretrained_folder_and_file(tmp_path):
    mask, diff = _mask(), _diff()
    assert mask.save_pretrained(tmp_path / "m") == tmp_path / "m"
    assert (tmp_path / "m" / "mask.safetensors").is_file()
    assert ParamMask.from_pretrained(tmp_path / "m") == mask
    assert ParamMask.from_pretrained(tmp_path / "m" / "mask.safetensors") == mask
    diff.save_pretrained(tmp_path / "d")
    assert _same_diff(WeightDiff.from_pretrained(tmp_path / "d"), diff)
    assert _same_diff(WeightDiff.from_pretrained(tmp_path / "d", lazy=True), diff)


def test_folder_without_the_artifact_names_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"mask\.safetensors.*save_pretrained"):
        ParamMask.from_pretrained(tmp_path / "empty")


def _populate_cache(cache: Path, repo_id: str, filename: str, source: Path) -> None:
    """Lay out a Hub cache entry exactly as hf_hub_download leaves one (refs/main → snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(source.read_bytes())


def test_from_pretrained_repo_id_offline_from_populated_cache(tmp_path):
    cache = tmp_path / "hub"
    for kind, artifact in (("mask", _mask()), ("diff", _diff())):
        artifact.save_pretrained(tmp_path / kind)
        _populate_cache(
            cache, f"someone/tiny-{kind}", f"{kind}.safetensors", tmp_path / kind / f"{kind}.safetensors"
        )
    # A fresh process (one for both kinds: importing transformers dominates): HF_HUB_OFFLINE is read when
    # huggingface_hub is imported.
    script = textwrap.dedent(f"""
        import torch
        from hfhooks import ParamMask, WeightDiff
        for kind, cls in (("mask", ParamMask), ("diff", WeightDiff)):
            loaded = cls.from_pretrained(f"someone/tiny-{{kind}}")
            ref = cls.from_pretrained({str(tmp_path)!r} + "/" + kind)
            if cls is ParamMask:
                assert loaded == ref
            else:
                a, b = loaded.to_dict(), ref.to_dict()
                assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
            try:
                cls.from_pretrained("someone/not-cached")
            except Exception as e:
                print(type(e).__name__, e)
            else:
                raise SystemExit("an uncached repo id loaded offline")
        print("OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.count("HubError") == 2
        and "someone/not-cached" in out.stdout
        and out.stdout.endswith("OK\n")
    )


def test_push_to_hub_offline_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE.*save_pretrained"):
        _mask().push_to_hub("someone/masks")


def test_push_to_hub_without_network_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubError, match=r"Could not push mask\.safetensors to 'someone/masks'"):
        _mask().push_to_hub("someone/masks", token="hf_dummy")
