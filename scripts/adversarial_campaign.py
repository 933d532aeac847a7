"""Adversarial campaign against hfhooks' promise "never lossy, never silent" (seeded, bounded, standalone).

Attack families (each reports trials / ok / clean errors / violations, with one example per violation kind):

* ``fuzz_artifacts``   — mask and diff files with bit flips, truncations, header-length edits, JSON header
  mutations, extra / missing tensors: every load must be a clean hfhooks error (:class:`ArtifactError`) or
  give back exactly the original tensors; a lazy diff applied to a model must not change it when it fails;
* ``fuzz_checkpoints`` — mutated shard headers, index entries (missing shard, ``../outside``, absolute path,
  duplicate names, unlisted tensors or shards), shards symlinked inside / outside the directory, fed to
  ``diff`` / ``apply`` / ``restore``: refuse, or produce exactly the output of the pristine checkpoint, and
  never read a file outside the given directories;
* ``kill9``            — ``apply`` / ``restore`` / ``diff`` (new output or ``--in-place``) killed with SIGKILL at
  a random moment: inputs hash identical, the output is absent or complete and equal to an uninterrupted run,
  and after one more normal run no temporary file or directory is left anywhere;
* ``concurrent``       — two ``apply -o SAME`` at once (at most one may succeed; the output valid), and
  ``apply --in-place`` racing a reader (``diff``): the reader fails cleanly or every tensor it reports is one
  the checkpoint really held;
* ``out_vs_in``        — ``-o`` equal to / inside / the parent of / a symlink to an input, with and without
  ``--overwrite``; ``diff -o`` onto an existing file: inputs byte-identical, no sibling file lost;
* ``symlinks``         — a checkpoint holding ``notes.txt -> OUTSIDE/secret`` and a directory symlink: no output
  holds the secret's bytes in a regular file (nor a hard link to it), nothing outside is created or changed;
* ``fifo``             — a FIFO as a diff, a mask or a shard: the command must fail within the timeout;
* ``full_disk``        — writes under ``RLIMIT_FSIZE`` (SIGXFSZ ignored): a clean error naming the path, inputs
  intact, no temporary file left.

Commands run through ``hfhooks.cli.main`` in a process forked from this one (the same code path as
``python -m hfhooks``, without paying the interpreter and torch start-up for every trial; ``--real-cli`` uses
``python -m hfhooks`` instead). Everything happens under one temporary root, removed at the end unless
``--keep``. Exit status 1 if any violation was found.

Usage::

    python scripts/adversarial_campaign.py --seed 0            # full campaign (~3-5 min on 2 cores)
    python scripts/adversarial_campaign.py --quick --json      # ~30 s, machine-readable summary on stdout
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked children must not inherit OpenMP pools
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import hfhooks.cli  # noqa: E402
import hfhooks.diffs  # noqa: E402  (imported here so forked children start instantly)
import hfhooks.restoration.restore  # noqa: E402
from hfhooks import ParamMask  # noqa: E402
from hfhooks.diffs import WeightDiff  # noqa: E402
from hfhooks.io.artifacts import ArtifactError  # noqa: E402

FAMILIES = (
    "fuzz_artifacts",
    "fuzz_checkpoints",
    "kill9",
    "concurrent",
    "out_vs_in",
    "symlinks",
    "fifo",
    "full_disk",
)
SECRET = b"HFHOOKS-CAMPAIGN-SECRET-7f3a9c"


# ====================================================================================================== results
@dataclass
class Family:
    """Counts of one attack family; ``examples`` keeps the first instance of each violation kind."""

    name: str
    trials: int = 0
    ok: int = 0
    clean: int = 0
    violations: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    every: list[str] = field(default_factory=list)  # every violation, one line each (--verbose)

    def record(self, outcome: str, kind: str = "", example: str = "") -> None:
        self.trials += 1
        if outcome == "ok":
            self.ok += 1
        elif outcome == "clean":
            self.clean += 1
        else:
            self.violation(kind, example, count_trial=False)

    def violation(self, kind: str, example: str, count_trial: bool = True) -> None:
        if count_trial:
            self.trials += 1
        self.violations += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.examples.setdefault(kind, example[:600])
        self.every.append(f"{kind}: {example.splitlines()[0][:300] if example else ''}")


class Violation(Exception):
    """An oracle failed: ``kind`` names the broken promise, the message is the example."""

    def __init__(self, kind: str, example: str):
        super().__init__(example)
        self.kind = kind


def judge(fam: Family, fn: Callable[..., str], *args: Any) -> None:
    """Run one trial, ``fn(*args)``: it returns "ok" or "clean", or raises :class:`Violation`."""
    try:
        fam.record(fn(*args))
    except Violation as v:
        fam.record("violation", v.kind, str(v))
    except Exception as e:  # a bug of the campaign itself must not look like a library violation
        fam.record(
            "violation", "campaign-internal-error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        )


# ====================================================================================================== running
@dataclass
class Run:
    rc: int | None  # None: killed by us (timeout or planned SIGKILL)
    out: str
    err: str
    timed_out: bool = False
    killed: bool = False
    seconds: float = 0.0

    def outcome(self) -> str:
        """ "success", "clean" (exit 1 or 2, one-line hfhooks or argparse error, no traceback), "hang" or "crash"."""
        if self.timed_out:
            return "hang"
        if self.rc == 0:
            return "success"
        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        if self.rc in (1, 2) and "Traceback" not in self.err and lines:
            last = lines[-1]
            if last.startswith("hfhooks: error:") or (last.startswith("hfhooks ") and ": error:" in last):
                return "clean"
        return "crash"

    def describe(self) -> str:
        tail = " | ".join(ln for ln in (self.err.strip().splitlines() or [""])[-3:])
        return f"rc={self.rc} timed_out={self.timed_out} stderr: {tail[:400]}"


REAL_CLI = False


class Proc:
    """A command running in a child process: ``hfhooks.cli.main(argv)`` (forked) or any Python callable."""

    def __init__(
        self, target: Callable[[], int], fsize: int | None = None, argv: Sequence[str] | None = None
    ):
        self.start = time.monotonic()
        r_out, w_out = os.pipe()
        r_err, w_err = os.pipe()
        if REAL_CLI and argv is not None:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "hfhooks", *argv],
                stdout=w_out,
                stderr=w_err,
                cwd=str(REPO),
                preexec_fn=(lambda: _limit(fsize)) if fsize is not None else None,
            )
            self.pid = self.popen.pid
        else:
            self.popen = None
            self.pid = os.fork()
            if self.pid == 0:  # child
                code = 1
                try:
                    os.close(r_out)
                    os.close(r_err)
                    os.dup2(w_out, 1)
                    os.dup2(w_err, 2)
                    sys.stdout = os.fdopen(1, "w", buffering=1)
                    sys.stderr = os.fdopen(2, "w", buffering=1)
                    _reset_after_fork()
                    if fsize is not None:
                        _limit(fsize)
                    code = target()
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code if isinstance(code, int) else 1)
        os.close(w_out)
        os.close(w_err)
        self._bufs: dict[int, bytearray] = {r_out: bytearray(), r_err: bytearray()}
        self._threads = [threading.Thread(target=self._drain, args=(fd,), daemon=True) for fd in self._bufs]
        for t in self._threads:
            t.start()
        self.rc: int | None = None
        self.timed_out = self.killed = False

    def _drain(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):
            self._bufs[fd].extend(chunk)
        os.close(fd)

    def poll(self) -> int | None:
        if self.rc is not None:
            return self.rc
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self.rc = os.waitstatus_to_exitcode(status)
            if self.popen is not None:
                self.popen.returncode = self.rc
        return self.rc

    def kill(self) -> None:
        if self.poll() is None:
            with _suppress():
                os.kill(self.pid, signal.SIGKILL)
            self.killed = True

    def wait(self, timeout: float) -> Run:
        deadline = self.start + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.timed_out = True
                self.kill()
                os.waitpid(self.pid, 0)
                self.rc = None
                break
            time.sleep(0.005)
        for t in self._threads:
            t.join(5)
        out, err = (bytes(b).decode("utf-8", "replace") for b in self._bufs.values())
        rc = None if (self.killed or self.timed_out) else self.rc
        return Run(rc, out, err, self.timed_out, self.killed, time.monotonic() - self.start)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]


def _limit(fsize: int) -> None:
    signal.signal(
        signal.SIGXFSZ, signal.SIG_IGN
    )  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))


def _reset_after_fork() -> None:
    """Make the child look like a fresh ``python -m hfhooks``: Python's default warning filters (this
    process ignores warnings; the CLI's users see them) and no inherited thread pool (pools do not survive
    fork(): drop the lazy-diff CRC pool so the child creates its own)."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    try:
        import hfhooks.diffs.fileformat as ff

        ff._POOL = None
    except Exception:
        pass


def cli(argv: Sequence[str], timeout: float, fsize: int | None = None) -> Run:
    """Run ``hfhooks ARGV`` to completion (or timeout)."""
    return cli_start(argv, fsize).wait(timeout)


def cli_start(argv: Sequence[str], fsize: int | None = None) -> Proc:
    argv = [str(a) for a in argv]
    return Proc(lambda: hfhooks.cli.main(argv), fsize=fsize, argv=argv)


class _Hang(Exception):
    pass


def with_alarm(seconds: int, fn: Callable[[], Any]) -> Any:
    """Call ``fn`` in this process, raising :class:`_Hang` if it runs longer than ``seconds``."""

    def handler(signum: int, frame: Any) -> None:
        raise _Hang(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ====================================================================================================== files
def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (symlinks not followed): regular files by content hash, links by target."""
    snap: dict[str, tuple] = {}
    if not os.path.lexists(root):
        return snap

    def walk(d: Path, rel: str) -> None:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            r = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            if entry.is_symlink():
                snap[r] = ("link", os.readlink(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                snap[r] = ("dir",)
                walk(Path(entry.path), r)
            elif entry.is_file(follow_symlinks=False):
                snap[r] = ("file", st.st_size, _sha(Path(entry.path)))
            else:
                snap[r] = ("special", st.st_mode)

    if root.is_dir() and not root.is_symlink():
        walk(root, "")
    else:
        snap["."] = ("link", os.readlink(root)) if root.is_symlink() else ("file", _sha(root))
    return snap


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snap_diff(before: dict, after: dict) -> str:
    """A short description of what changed between two snapshots ("" if nothing)."""
    gone = sorted(set(before) - set(after))
    new = sorted(set(after) - set(before))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = []
    if gone:
        parts.append(f"removed {gone[:4]}{'…' if len(gone) > 4 else ''}")
    if new:
        parts.append(f"created {new[:4]}{'…' if len(new) > 4 else ''}")
    if changed:
        parts.append(f"modified {changed[:4]}{'…' if len(changed) > 4 else ''}")
    return "; ".join(parts)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory or file, read with plain safetensors (the campaign's own reader)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    out: dict[str, torch.Tensor] = {}
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(path.glob("*.safetensors"))]
    for f in files:
        out.update(load_file(str(path / f)))
    return out


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """ "" if equal (names, dtypes, shapes, bytes); otherwise what differs first."""
    if set(a) != set(b):
        return f"names differ: only in one {sorted(set(a) ^ set(b))[:3]}"
    for n in a:
        if not same_tensor(a[n], b[n]):
            return f"tensor {n!r} differs"
    return ""


def diff_tensors(path: Path) -> dict[str, torch.Tensor]:
    d = WeightDiff.load(path)
    return {n: d[n] for n in d.names()}


def leftovers(root: Path, expected: set[str]) -> list[str]:
    """Entries under ``root`` whose relative path is not expected nor under an expected directory."""
    found = []
    for rel in snapshot(root):
        if rel in expected or any(rel.startswith(e + "/") for e in expected):
            continue
        found.append(rel)
    return found


# ====================================================================================================== models
def tiny_llama(dtype: torch.dtype, seed: int, medium: bool = False):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, vocab_size=256)
    if not medium:
        size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, vocab_size=64)
    cfg = transformers.LlamaConfig(
        **size,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # random norms too: every tensor distinct from the next
            p.add_(torch.randn_like(p) * 0.02)
    return model


def save_pair(root: Path, dtype: torch.dtype, seed: int, medium: bool = False) -> tuple[Path, Path]:
    """``root/base`` and ``root/tuned`` (tuned = base with a few tensors changed), each in 3 shards."""
    model = tiny_llama(dtype, seed, medium)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shard = max(total // 3 + 1024, 4096)
    base, tuned = root / "base", root / "tuned"
    model.save_pretrained(base, max_shard_size=shard, safe_serialization=True)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers.1." in name or "layers.0.mlp" in name or name == "model.norm.weight":
                p.add_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))
    model.save_pretrained(tuned, max_shard_size=shard, safe_serialization=True)
    (base / "notes.txt").write_text("base notes\n")
    return base, tuned


@dataclass
class Fixture:
    """A pristine base / tuned pair, their diff, and reference outputs of every command (uninterrupted runs)."""

    root: Path
    base: Path
    tuned: Path
    diff: Path
    ref: dict[str, dict[str, torch.Tensor]]
    seconds: dict[str, float]


def make_fixture(root: Path, dtype: torch.dtype, seed: int, medium: bool, timeout: float) -> Fixture:
    root.mkdir(parents=True)
    base, tuned = save_pair(root, dtype, seed, medium)
    diff = root / "task.safetensors"
    ref: dict[str, dict[str, torch.Tensor]] = {}
    secs: dict[str, float] = {}
    for op in ("diff", "apply", "restore"):
        out = root / f"ref-{op}" if op != "diff" else diff
        run = cli(op_argv(op, base, tuned, diff, out), timeout)
        if run.outcome() != "success":
            raise RuntimeError(f"reference run of {op} failed: {run.describe()}")
        ref[op] = diff_tensors(out) if op == "diff" else load_tensors(out)
        secs[op] = run.seconds
    return Fixture(root, base, tuned, diff, ref, secs)


def op_argv(op: str, base: Path, tuned: Path, diff: Path, out: Path | None, *extra: str) -> list[str]:
    """The command line of one operation: ``out=None`` means ``--in-place`` on the target."""
    where = ["--in-place"] if out is None else ["-o", str(out)]
    if op == "diff":
        return ["diff", str(base), str(tuned), *where, "-q", *extra]
    if op == "apply":
        return ["apply", str(diff), str(base), *where, "-q", *extra]
    if op == "restore":
        return ["restore", str(tuned), str(base), "--layers", "0:2", *where, "-q", *extra]
    raise ValueError(op)


def copy_inputs(fx: Fixture, dest: Path) -> tuple[Path, Path, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    base, tuned, diff = dest / "base", dest / "tuned", dest / "task.safetensors"
    shutil.copytree(fx.base, base, symlinks=True)
    shutil.copytree(fx.tuned, tuned, symlinks=True)
    shutil.copy2(fx.diff, diff)
    return base, tuned, diff


def read_output(op: str, out: Path) -> dict[str, torch.Tensor]:
    return diff_tensors(out) if op == "diff" else load_tensors(out)


# ====================================================================================================== families
class Campaign:
    def __init__(self, root: Path, seed: int, trials: int, quick: bool, timeout: float):
        self.root, self.seed, self.quick, self.timeout = root, seed, quick, timeout
        self.rng = random.Random(seed)
        self.n = trials
        self.fams = {f: Family(f) for f in FAMILIES}
        self.figures: dict[str, Any] = {}
        small32 = make_fixture(root / "fx-f32", torch.float32, seed, False, timeout)
        small16 = make_fixture(root / "fx-bf16", torch.bfloat16, seed + 7, False, timeout)
        self.small = [small32, small16]
        self.medium = make_fixture(root / "fx-medium", torch.float32, seed + 13, True, timeout)
        self.figures["reference_seconds"] = {k: round(v, 3) for k, v in self.medium.seconds.items()}
        self._trial = 0

    def trial_dir(self, family: str) -> Path:
        self._trial += 1
        d = self.root / "trials" / f"{family}-{self._trial:05d}"
        d.mkdir(parents=True)
        return d

    def tally(self, fam: Family, key: str, fn: Callable[..., str], *args: Any) -> None:
        """:func:`judge`, and count the outcome under ``figures[fam][key]`` (which mutation gave what)."""
        before = (fam.ok, fam.clean, fam.violations)
        judge(fam, fn, *args)
        after = (fam.ok, fam.clean, fam.violations)
        outcome = ("ok", "clean", "violation")[
            [a != b for a, b in zip(before, after, strict=True)].index(True)
        ]
        per = self.figures.setdefault(f"{fam.name}_outcomes", {}).setdefault(key, {})
        per[outcome] = per.get(outcome, 0) + 1

    def cleanup(self, d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ fuzz artifacts
    def fuzz_artifacts(self, trials: int) -> None:
        fam = self.fams["fuzz_artifacts"]
        d = self.root / "artifacts"
        d.mkdir()
        originals: list[tuple[str, Path, Any]] = []
        gen = torch.Generator().manual_seed(self.seed)
        mask = ParamMask(
            {
                "model.layers.0.mlp.up_proj.weight": torch.rand(16, 12, generator=gen) > 0.5,
                "model.norm.weight": torch.rand(32, generator=gen) > 0.3,
            }
        )
        mask.save(d / "mask.safetensors")
        originals.append(("mask", d / "mask.safetensors", ParamMask.load(d / "mask.safetensors")))
        big = ParamMask({f"w{i}": torch.rand(7 + i, 9, generator=gen) > 0.5 for i in range(6)})
        big.save(d / "mask2.safetensors", note="fuzz")
        originals.append(("mask", d / "mask2.safetensors", ParamMask.load(d / "mask2.safetensors")))
        fx = self.small[0]
        model_base = tiny_llama(torch.float32, self.seed, False)
        base_sd = load_tensors(fx.base)
        model_base.load_state_dict(base_sd, strict=False)
        tuned_sd = load_tensors(fx.tuned)
        for storage, levels in (("dense", None), ("sparse", None), ("auto", None), ("dense", 16)):
            p = d / f"diff-{storage}-{levels}.safetensors"
            diff = WeightDiff.between(base_sd, tuned_sd, storage=storage, changed_only=True, progress=False)
            if levels:
                diff = diff.quantize(levels)
            diff.save(p)
            originals.append(("diff", p, WeightDiff.load(p)))
        expected_model = {k: v.clone() for k, v in model_base.state_dict().items()}
        mutators = [
            self._m_bitflip,
            self._m_bitflips,
            self._m_truncate,
            self._m_header_len,
            self._m_json,
            self._m_json,
            self._m_tensor_set,
            self._m_overwrite,
        ]
        # valid files must load back: one-tensor masks and diffs whose only difference is the name length
        # (the header length sweeps through every multiple of 8 over ~800 bytes)
        for length in range(1, 2 * trials + 1 if self.quick else 400):
            judge(fam, self._check_round_trip, d, length)
        for t in range(trials):
            kind, path, original = originals[t % len(originals)]
            raw = path.read_bytes()
            mutator = mutators[self.rng.randrange(len(mutators))]
            mutated, what = mutator(raw)
            target = d / f"fuzz-{t}.safetensors"
            target.write_bytes(mutated)
            label = f"{path.name} {what}"
            if kind == "mask":
                judge(fam, self._check_mask_load, target, original, label)
            else:
                judge(fam, self._check_diff_load, target, original, label, model_base, expected_model)
            if t % 5 == 0:  # the CLI readers too (forked: a crash or hang there is visible as such)
                argv = ["mask", "info", target] if kind == "mask" else ["diff-info", target, "--lazy"]
                judge(fam, self._check_cli_read, argv, label, target, original, kind)
            target.unlink(missing_ok=True)

    def _check_round_trip(self, d: Path, length: int) -> str:
        name = "w" * length
        path = d / "valid-mask.safetensors"
        mask = ParamMask({name: torch.arange(12).reshape(3, 4) % 3 == 0})
        mask.save(path)
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        try:
            loaded = ParamMask.load(path)
        except ArtifactError as e:
            raise Violation(
                "valid file refused", f"a one-tensor mask named 'w'×{length} (header {n} bytes): {e}"
            ) from None
        if loaded != mask:
            raise Violation("round trip changed a valid mask", f"'w'×{length}")
        delta = WeightDiff.between({name: torch.zeros(3)}, {name: torch.ones(3)}, progress=False)
        path = d / "valid-diff.safetensors"  # a diff may not replace a mask file (only an earlier diff)
        delta.save(path)
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        for lazy in (False, True):
            try:
                back = WeightDiff.load(path, lazy=lazy)[name]
            except ArtifactError as e:
                raise Violation(
                    "valid file refused", f"a one-tensor diff named 'w'×{length} (header {n} bytes): {e}"
                ) from None
            if not torch.equal(back, torch.ones(3)):
                raise Violation("round trip changed a valid diff", f"'w'×{length}")
        return "ok"

    def _check_mask_load(self, path: Path, original: ParamMask, label: str) -> str:
        try:
            loaded = with_alarm(20, lambda: ParamMask.load(path))
        except _Hang as e:
            raise Violation("hang", f"ParamMask.load({label}): {e}") from None
        except ArtifactError:
            return "clean"
        except Exception as e:
            raise Violation(
                "crash (non-hfhooks exception)", f"ParamMask.load({label}): {type(e).__name__}: {e}"
            ) from None
        if loaded != original:
            raise Violation(
                "silent load of altered data", f"ParamMask.load({label}) returned a different mask"
            )
        return "ok"

    def _check_diff_load(self, path: Path, original: WeightDiff, label: str, model, expected_model) -> str:
        outcomes = []
        for lazy in (False, True):
            try:
                loaded = with_alarm(20, lambda lazy=lazy: WeightDiff.load(path, lazy=lazy))
                tensors = {n: loaded[n] for n in loaded.names()}
            except _Hang as e:
                raise Violation("hang", f"WeightDiff.load({label}, lazy={lazy}): {e}") from None
            except ArtifactError:
                outcomes.append("clean")
                continue
            except Exception as e:
                raise Violation(
                    "crash (non-hfhooks exception)",
                    f"WeightDiff.load({label}, lazy={lazy}): {type(e).__name__}: {e}",
                ) from None
            why = same_tensors(tensors, {n: original[n] for n in original.names()})
            bases = {n: loaded.entry(n).base for n in loaded.names()} == {
                n: original.entry(n).base for n in original.names()
            }
            if why or not bases:
                raise Violation(
                    "silent load of altered data",
                    f"WeightDiff.load({label}, lazy={lazy}) loaded without error but {why or 'base fingerprints differ'}",
                )
            outcomes.append("ok")
        # item 4: applying a corrupt lazy diff to a model must leave the model as it was
        try:
            lazy_diff = WeightDiff.load(path, lazy=True)
        except ArtifactError:
            lazy_diff = None
        if lazy_diff is not None:
            try:
                with_alarm(20, lambda: lazy_diff.apply(model, check_base=False))
                applied = True
            except (ArtifactError, ValueError, KeyError):  # refusals (corrupt file, shape, unknown name)
                applied = False
            except _Hang as e:
                raise Violation("hang", f"lazy apply({label}): {e}") from None
            except Exception as e:
                raise Violation(
                    "crash (non-hfhooks exception)", f"lazy apply({label}): {type(e).__name__}: {e}"
                ) from None
            now = model.state_dict()
            if not applied:
                changed = [k for k in expected_model if not same_tensor(now[k], expected_model[k])]
                if changed:
                    raise Violation(
                        "failed in-memory apply left the model modified",
                        f"WeightDiff.load({label}, lazy=True).apply(model) raised but changed {len(changed)} "
                        f"tensors first (e.g. {changed[0]})",
                    )
            with torch.no_grad():  # back to the base weights for the next trial
                for k, v in model.state_dict().items():
                    v.copy_(expected_model[k])
        return "clean" if "clean" in outcomes else "ok"

    def _check_cli_read(self, argv, label: str, path: Path, original, kind: str) -> str:
        run = cli(argv, timeout=self.timeout)
        outcome = run.outcome()
        if outcome == "hang":
            raise Violation("hang", f"hfhooks {argv[0]} on {label}: {run.describe()}")
        if outcome == "crash":
            raise Violation(
                "crash (traceback / non-clean exit)", f"hfhooks {argv[0]} on {label}: {run.describe()}"
            )
        if outcome == "clean":
            return "clean"
        # exit 0: the file must hold the original data (the in-process check decides that precisely)
        try:
            if kind == "mask":
                same = ParamMask.load(path) == original
            else:  # read it as the command did (--lazy: per-tensor CRCs, not the whole-file digest)
                lazy = WeightDiff.load(path, lazy="--lazy" in argv)
                same = not same_tensors(
                    {n: lazy[n] for n in lazy.names()}, {n: original[n] for n in original.names()}
                )
        except ArtifactError:
            same = False
        if not same:
            raise Violation(
                "silent load of altered data", f"hfhooks {' '.join(map(str, argv[:2]))} exited 0 on {label}"
            )
        return "ok"

    # mutators: (bytes) -> (bytes, description)
    def _m_bitflip(self, raw: bytes) -> tuple[bytes, str]:
        b = bytearray(raw)
        i = self.rng.randrange(len(b))
        bit = self.rng.randrange(8)
        b[i] ^= 1 << bit
        return bytes(b), f"bit {bit} of byte {i} flipped"

    def _m_bitflips(self, raw: bytes) -> tuple[bytes, str]:
        b = bytearray(raw)
        k = self.rng.randint(2, 16)
        for _ in range(k):
            b[self.rng.randrange(len(b))] ^= 1 << self.rng.randrange(8)
        return bytes(b), f"{k} random bit flips"

    def _m_truncate(self, raw: bytes) -> tuple[bytes, str]:
        n = self.rng.choice([0, 1, 7, 8, self.rng.randrange(len(raw)), len(raw) - 1, len(raw) - 8])
        return raw[: max(n, 0)], f"truncated to {max(n, 0)} of {len(raw)} bytes"

    def _m_header_len(self, raw: bytes) -> tuple[bytes, str]:
        (n,) = struct.unpack("<Q", raw[:8])
        new = self.rng.choice(
            [
                n + 1,
                n - 1,
                n + 8,
                n - 8,
                0,
                2**64 - 1,
                len(raw),
                len(raw) - 8,
                self.rng.randrange(2**32),
                n * 2,
            ]
        )
        new = max(0, min(new, 2**64 - 1))
        return struct.pack("<Q", new) + raw[8:], f"header length {n} -> {new}"

    def _m_overwrite(self, raw: bytes) -> tuple[bytes, str]:
        b = bytearray(raw)
        start = self.rng.randrange(len(b))
        k = self.rng.randint(1, 32)
        for i in range(start, min(start + k, len(b))):
            b[i] = self.rng.randrange(256)
        return bytes(b), f"{k} bytes overwritten at {start}"

    def _m_json(self, raw: bytes) -> tuple[bytes, str]:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        data = raw[8 + n :]
        meta = header.get("__metadata__", {})
        names = [k for k in header if k != "__metadata__"]
        choice = self.rng.randrange(9)
        what = ""
        if choice == 0 and names:  # dtype of one tensor
            name = self.rng.choice(names)
            old = header[name]["dtype"]
            header[name]["dtype"] = self.rng.choice(["U8", "I8", "BOOL", "F16", "BF16", "F32", "I32", "F64"])
            what = f"dtype of {name!r} {old} -> {header[name]['dtype']}"
        elif choice == 1 and names:  # shape
            name = self.rng.choice(names)
            shape = header[name]["shape"]
            new = (
                list(reversed(shape))
                if len(shape) > 1 and self.rng.random() < 0.5
                else [*shape[:-1], 1, max(1, (shape[-1] if shape else 1))]
            )
            header[name]["shape"] = new
            what = f"shape of {name!r} {shape} -> {new}"
        elif choice == 2 and len(names) > 1:  # swap the data ranges of two tensors
            a, b2 = self.rng.sample(names, 2)
            header[a]["data_offsets"], header[b2]["data_offsets"] = (
                header[b2]["data_offsets"],
                header[a]["data_offsets"],
            )
            what = f"data_offsets of {a!r} and {b2!r} swapped"
        elif choice == 3 and names:  # rename a tensor
            name = self.rng.choice(names)
            header[name + "x"] = header.pop(name)
            what = f"tensor {name!r} renamed"
        elif choice == 4 and meta:  # drop a metadata key
            key = self.rng.choice(sorted(meta))
            del meta[key]
            what = f"metadata {key!r} removed"
        elif choice == 5 and meta:  # edit a JSON metadata value (counts, shapes, fingerprints...)
            key = self.rng.choice(sorted(k for k in meta))
            value = meta[key]
            mutated = _mutate_json_text(value, self.rng)
            meta[key] = mutated
            what = f"metadata {key!r} value edited"
        elif choice == 6:  # add a metadata key
            meta["hfhooks.extra"] = json.dumps({"x": 1})
            what = "metadata key added"
        elif choice == 7 and "hfhooks.tensors" in meta:  # consistent-looking but wrong per-tensor info
            info = json.loads(meta["hfhooks.tensors"])
            name = self.rng.choice(sorted(info))
            entry = info[name]
            if isinstance(entry, dict):
                key = self.rng.choice(sorted(entry))
                entry[key] = _mutate_value(entry[key], self.rng)
                what = f"hfhooks.tensors[{name!r}][{key!r}] edited"
            meta["hfhooks.tensors"] = json.dumps(info)
        else:  # offsets off by a few bytes
            if names:
                name = self.rng.choice(names)
                o = header[name]["data_offsets"]
                delta = self.rng.choice([-8, -1, 1, 8])
                header[name]["data_offsets"] = [max(0, o[0] + delta), max(0, o[1] + delta)]
                what = f"data_offsets of {name!r} shifted by {delta}"
        if meta:
            header["__metadata__"] = meta
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + data, f"JSON header mutation: {what or 'no-op'}"

    def _m_tensor_set(self, raw: bytes) -> tuple[bytes, str]:
        """Extra or missing tensors: rewrite the file with plain safetensors, same metadata."""
        from safetensors.torch import load, save

        tensors = load(raw)
        (n,) = struct.unpack("<Q", raw[:8])
        meta = json.loads(raw[8 : 8 + n]).get("__metadata__", {})
        if self.rng.random() < 0.5 and len(tensors) > 1:
            name = self.rng.choice(sorted(tensors))
            del tensors[name]
            what = f"tensor {name!r} removed"
        else:
            name = self.rng.choice(
                ["extra", "model.norm.weight::values", f"{sorted(tensors)[0]}::mask", "w0x"]
            )
            if name in tensors:
                name += "2"
            tensors[name] = torch.zeros(4, dtype=torch.uint8)
            what = f"tensor {name!r} added"
        return save(tensors, metadata=meta), what

    # ------------------------------------------------------------------------------------------ fuzz checkpoints
    def fuzz_checkpoints(self, trials: int) -> None:
        fam = self.fams["fuzz_checkpoints"]
        kinds = [
            "shard-header-bitflip",
            "shard-header-bitflip",
            "shard-truncated",
            "shard-header-length",
            "index-missing-shard",
            "index-outside-relative",
            "index-absolute",
            "index-duplicate-names",
            "index-unlisted-tensor",
            "unlisted-shard-file",
            "shard-symlink-outside",
            "shard-symlink-inside",
        ]
        for t in range(trials):
            fx = self.small[t % 2]
            kind = kinds[t % len(kinds)] if t < len(kinds) else self.rng.choice(kinds)
            op = self.rng.choice(["diff", "apply", "restore"])
            self.tally(fam, f"{kind}/{op}", self._ckpt_trial, fx, kind, op)

    def _ckpt_trial(self, fx: Fixture, kind: str, op: str) -> str:
        d = self.trial_dir("ckpt")
        base, tuned, diff = copy_inputs(fx, d / "in")
        outside = d / "outside"
        outside.mkdir()
        # the mutated checkpoint is the base (diff: BASE side; apply: TARGET; restore: REFERENCE)
        index = json.loads((base / "model.safetensors.index.json").read_text())
        wm = index["weight_map"]
        shards = sorted(set(wm.values()))
        shard = self.rng.choice(shards)
        poison = _poisoned_copy(base / shard, outside / "outside.safetensors")
        independent_same = False  # does plain safetensors read the mutated checkpoint as the pristine one?
        label = kind
        if kind == "shard-header-bitflip":
            raw = bytearray((base / shard).read_bytes())
            (n,) = struct.unpack("<Q", raw[:8])
            i = self.rng.randrange(8, 8 + n)
            bit = self.rng.randrange(8)
            raw[i] ^= 1 << bit
            (base / shard).write_bytes(bytes(raw))
            label += f" (byte {i} bit {bit} of {shard})"
            independent_same = _independent(base, fx.base)
            if independent_same == "different":
                label += " (plain safetensors reads a different, valid checkpoint: output not judged)"
        elif kind == "shard-truncated":
            raw = (base / shard).read_bytes()
            k = self.rng.randrange(len(raw))
            (base / shard).write_bytes(raw[:k])
            label += f" ({shard} to {k} bytes)"
        elif kind == "shard-header-length":
            raw = (base / shard).read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            new = self.rng.choice([n - 8, n + 8, n + 1, 0, len(raw)])
            (base / shard).write_bytes(struct.pack("<Q", max(new, 0)) + raw[8:])
            label += f" ({n} -> {new})"
        elif kind == "index-missing-shard":
            name = self.rng.choice(sorted(wm))
            wm[name] = "model-99999-of-99999.safetensors"
        elif kind == "index-outside-relative":
            for name, f in wm.items():
                if f == shard:
                    wm[name] = "../../outside/outside.safetensors"
        elif kind == "index-absolute":
            for name, f in wm.items():
                if f == shard:
                    wm[name] = str(poison)
        elif kind == "index-duplicate-names":
            pass  # written below as raw JSON text with a key repeated
        elif kind == "index-unlisted-tensor":
            name = self.rng.choice(sorted(wm))
            del wm[name]
            label += f" ({name!r} left out of the index)"
        elif kind == "unlisted-shard-file":
            shutil.copy2(poison, base / "model-00009-of-00009.safetensors")
        elif kind == "shard-symlink-outside":
            (base / shard).unlink()
            os.symlink(poison, base / shard)
        elif kind == "shard-symlink-inside":
            (base / "blobs").mkdir()
            os.rename(base / shard, base / "blobs" / shard)
            os.symlink(Path("blobs") / shard, base / shard)
            independent_same = True
        if kind.startswith("index-"):
            text = json.dumps(index, indent=2)
            if kind == "index-duplicate-names":
                name = self.rng.choice(sorted(wm))
                other = self.rng.choice([s for s in shards if s != wm[name]])
                first = json.dumps(name)
                text = text.replace(f"{first}: ", f"{first}: {json.dumps(other)},\n    {first}: ", 1)
                label += f" ({name!r} listed in {other} and {wm[name]})"
                # Python's json keeps the last value, which is the right shard: a reader may accept this
                independent_same = True
            (base / "model.safetensors.index.json").write_text(text)
        out = d / "out" if op != "diff" else d / "out.safetensors"
        ref = fx.ref[op]
        argv = op_argv(op, base, tuned, diff, out)
        if op == "apply":
            argv += ["--no-check-base"] if kind == "shard-symlink-outside" else []
        before_outside = snapshot(outside)
        before_tuned = snapshot(tuned)
        run = cli(argv, self.timeout)
        try:
            outcome = run.outcome()
            where = f"hfhooks {op} with {label}"
            if outcome == "hang":
                raise Violation("hang", f"{where}: {run.describe()}")
            if outcome == "crash":
                raise Violation("crash (traceback / non-clean exit)", f"{where}: {run.describe()}")
            if snapshot(outside) != before_outside or snapshot(tuned) != before_tuned:
                raise Violation(
                    "input or outside tree modified",
                    f"{where}: {snap_diff(before_outside, snapshot(outside))}",
                )
            if outcome == "clean":
                return "clean"
            got = read_output(op, out)
            if kind in ("index-outside-relative", "index-absolute", "shard-symlink-outside"):
                raise Violation(
                    "read a file outside the checkpoint",
                    f"{where}: exit 0 (the data came from {poison.name} outside the directory)",
                )
            if kind == "unlisted-shard-file" and "model-00009" not in run.err:
                raise Violation(
                    "unlisted shard ignored silently",
                    f"{where}: exit 0 without a word about model-00009-of-00009.safetensors, which the index does "
                    "not list",
                )
            why = same_tensors(got, ref)
            if why and independent_same == "different":
                return "ok"  # the mutated checkpoint is valid and means something else: nothing to compare to
            if why and not independent_same:
                raise Violation("silent wrong output from a corrupt checkpoint", f"{where}: exit 0 but {why}")
            if why:
                raise Violation("wrong output", f"{where}: exit 0 but {why}")
            return "ok"
        finally:
            self.cleanup(d)

    # ------------------------------------------------------------------------------------------ kill -9
    def kill9(self, trials: int) -> None:
        fam = self.fams["kill9"]
        fx = self.medium
        for t in range(trials):
            op = ("apply", "restore", "diff")[t % 3]
            in_place = op != "diff" and self.rng.random() < 0.3
            judge(fam, self._kill_trial, fx, op, in_place)

    def _kill_trial(self, fx: Fixture, op: str, in_place: bool) -> str:
        d = self.trial_dir("kill")
        base, tuned, diff = copy_inputs(fx, d)
        out = None if in_place else (d / "out.safetensors" if op == "diff" else d / "out")
        target = tuned if op == "restore" else base  # edited in place
        argv = op_argv(
            op, base, tuned, diff, out, *(["--fsync"] if op != "diff" and self.rng.random() < 0.3 else [])
        )
        inputs = {p: snapshot(p) for p in (base, tuned, diff)}
        span = fx.seconds[op] * 0.7 + 0.01  # the reference run is the slowest (cold caches)
        delay = self.rng.uniform(0, span)
        proc = cli_start(argv)
        time.sleep(delay)
        proc.kill()
        run = proc.wait(self.timeout)
        key = "kill9_interrupted" if run.killed else "kill9_finished_before_kill"
        self.figures[key] = self.figures.get(key, 0) + 1
        label = f"hfhooks {' '.join(argv[:1])}{' --in-place' if in_place else ''} killed after {delay * 1000:.0f} ms"
        try:
            for p, snap in inputs.items():
                if in_place and p == target:
                    continue
                if snapshot(p) != snap:
                    raise Violation(
                        "input modified by an interrupted edit",
                        f"{label}: {p.name}: {snap_diff(snap, snapshot(p))}",
                    )
            if in_place:
                state = self._in_place_state(op, target, fx)
                if state is None:
                    raise Violation("in-place target neither original nor edited", f"{label}: {target.name}")
                non_weight = {
                    k: v for k, v in inputs[target].items() if not k.endswith((".safetensors", ".json"))
                }
                now = snapshot(target)
                lost = [k for k in non_weight if now.get(k) != non_weight[k]]
                if lost:
                    raise Violation("in-place edit lost files", f"{label}: {lost}")
            elif out.exists():
                try:
                    got = read_output(op, out)
                except Exception as e:
                    raise Violation(
                        "partial output under the real name", f"{label}: {type(e).__name__}: {e}"
                    ) from None
                if same_tensors(got, fx.ref[op]):
                    raise Violation(
                        "output differs from an uninterrupted run",
                        f"{label}: {same_tensors(got, fx.ref[op])}",
                    )
            # one more normal run to the same output: it must succeed and clean every leftover
            if in_place:
                again = op_argv(op, base, tuned, diff, None, *(["--no-check-base"] if op == "apply" else []))
            else:
                if out.exists():
                    (shutil.rmtree(out) if out.is_dir() else out.unlink())
                again = op_argv(op, base, tuned, diff, out)
            rerun = cli(again, self.timeout)
            if rerun.outcome() != "success":
                raise Violation("re-run after a kill failed", f"{label}; re-run: {rerun.describe()}")
            expected = {"base", "tuned", "task.safetensors"} | ({out.name} if out is not None else set())
            left = leftovers(d, expected)
            # inside the checkpoints: nothing but what was there before (an in-place target may change files)
            for p in (base, tuned):
                before = inputs[p]
                now = snapshot(p)
                extra = [
                    k
                    for k in now
                    if k not in before and not (in_place and p == target and not k.startswith("."))
                ]
                left += [f"{p.name}/{k}" for k in extra]
            if not in_place and out is not None and out.is_dir():
                left += [f"out/{k}" for k in snapshot(out) if k.startswith(".") or "hfhooks-" in k]
            if left:
                raise Violation("temporary leftovers after the next run", f"{label}: {left[:4]}")
            return "ok"
        finally:
            self.cleanup(d)

    def _in_place_state(self, op: str, target: Path, fx: Fixture) -> str | None:
        try:
            got = load_tensors(target)
        except Exception:
            return None
        original = load_tensors(fx.tuned if op == "restore" else fx.base)
        if not same_tensors(got, original):
            return "original"
        if not same_tensors(got, fx.ref[op]):
            return "edited"
        return None

    # ------------------------------------------------------------------------------------------ concurrency
    def concurrent(self, trials: int) -> None:
        fam = self.fams["concurrent"]
        for t in range(trials):
            if t % 2 == 0:
                judge(fam, lambda: self._two_writers(self.medium))
            else:
                judge(fam, lambda: self._writer_vs_reader(self.medium))

    def _two_writers(self, fx: Fixture) -> str:
        d = self.trial_dir("race")
        base, tuned, diff = copy_inputs(fx, d)
        out = d / "out"
        argv = op_argv("apply", base, tuned, diff, out)
        inputs = snapshot(base)
        try:
            a, b = cli_start(argv), cli_start(argv)
            ra, rb = a.wait(self.timeout), b.wait(self.timeout)
            outcomes = [ra.outcome(), rb.outcome()]
            label = f"two 'hfhooks apply -o SAME' at once: {outcomes}"
            for r in (ra, rb):
                if r.outcome() in ("hang", "crash"):
                    raise Violation(r.outcome(), f"{label}: {r.describe()}")
            if snapshot(base) != inputs:
                raise Violation("input modified", label)
            if outcomes.count("success") == 2:
                raise Violation("both concurrent edits of one output exited 0", label)
            if "success" in outcomes:
                why = same_tensors(load_tensors(out), fx.ref["apply"])
                if why:
                    raise Violation("concurrent output invalid", f"{label}: {why}")
            left = leftovers(d, {"base", "tuned", "task.safetensors", "out"})
            if left:
                raise Violation("temporary leftovers after concurrent edits", f"{label}: {left[:4]}")
            return "ok" if "success" in outcomes else "clean"
        finally:
            self.cleanup(d)

    def _writer_vs_reader(self, fx: Fixture) -> str:
        """``apply --in-place --no-check-base`` K times on TARGET while ``diff BASE TARGET`` reads it."""
        d = self.trial_dir("inplace-race")
        base, _, diff = copy_inputs(fx, d)
        target = d / "target"
        shutil.copytree(fx.base, target)
        k = 6 if self.quick else 15
        # the states TARGET goes through, computed sequentially on a copy first
        seq = d / "seq"
        shutil.copytree(fx.base, seq)
        states = [load_tensors(seq)]
        for _ in range(k):
            r = cli(["apply", diff, seq, "--in-place", "--no-check-base", "-q"], self.timeout)
            if r.outcome() != "success":
                raise RuntimeError(f"sequential apply failed: {r.describe()}")
            states.append(load_tensors(seq))
        base_t = load_tensors(base)
        allowed = {n: [(s[n].float() - base_t[n].float()) for s in states] for n in base_t}

        def writer() -> int:
            for _ in range(k):
                rc = hfhooks.cli.main(
                    ["apply", str(diff), str(target), "--in-place", "--no-check-base", "-q"]
                )
                if rc:
                    return rc
            return 0

        try:
            w = Proc(writer)
            readers: list[tuple[Run, Path]] = []
            i = 0
            while w.poll() is None and i < 40:
                out = d / f"read-{i}.safetensors"
                readers.append((cli(["diff", base, target, "-o", out, "-q"], self.timeout), out))
                i += 1
            wr = w.wait(self.timeout)
            if wr.outcome() != "success":
                raise Violation("in-place writer failed while read", f"writer: {wr.describe()}")
            garbage = 0
            example = ""
            clean = 0
            for r, out in readers:
                o = r.outcome()
                if o in ("hang", "crash"):
                    raise Violation(o, f"diff racing apply --in-place: {r.describe()}")
                if o == "clean":
                    clean += 1
                    continue
                got = diff_tensors(out)
                bad = [
                    n for n, t in got.items() if not any(same_tensor(t, a.to(t.dtype)) for a in allowed[n])
                ]
                if bad:
                    garbage += 1
                    example = (
                        example
                        or f"{len(bad)} of {len(got)} tensors match no state the checkpoint held (e.g. {bad[0]})"
                    )
            self.figures.setdefault("inplace_race_reads", 0)
            self.figures["inplace_race_reads"] += len(readers)
            if garbage:
                raise Violation(
                    "reader exited 0 with garbage during an in-place edit",
                    f"'hfhooks diff BASE TARGET' racing 'apply TARGET --in-place': {garbage} of {len(readers)} reads "
                    f"exited 0 with garbage; {example}",
                )
            return "clean" if clean else "ok"
        finally:
            self.cleanup(d)

    # ------------------------------------------------------------------------------------------ outputs vs inputs
    def out_vs_in(self) -> None:
        fam = self.fams["out_vs_in"]
        fx = self.small[0]
        cases: list[tuple[str, Callable[[Path, Path, Path, Path], tuple[str, list[str]]]]] = []

        def case(name: str):
            def deco(fn):
                cases.append((name, fn))
                return fn

            return deco

        for op in ("apply", "restore"):
            tgt = (lambda b, t: t) if op == "restore" else (lambda b, t: b)
            for ow in (False, True):
                extra = ["--overwrite"] if ow else []
                sfx = " --overwrite" if ow else ""
                case(f"{op} -o TARGET{sfx}")(
                    lambda r, b, t, df, op=op, tgt=tgt, e=extra: (op, op_argv(op, b, t, df, tgt(b, t), *e))
                )
                case(f"{op} -o TARGET/.{sfx}")(
                    lambda r, b, t, df, op=op, tgt=tgt, e=extra: (
                        op,
                        op_argv(op, b, t, df, str(tgt(b, t)) + "/.", *e),
                    )
                )
                case(f"{op} -o TARGET/sub{sfx}")(
                    lambda r, b, t, df, op=op, tgt=tgt, e=extra: (
                        op,
                        op_argv(op, b, t, df, tgt(b, t) / "sub", *e),
                    )
                )
                case(f"{op} -o PARENT{sfx}")(
                    lambda r, b, t, df, op=op, e=extra: (op, op_argv(op, b, t, df, r, *e))
                )
                case(f"{op} -o LINK->TARGET{sfx}")(
                    lambda r, b, t, df, op=op, tgt=tgt, e=extra: (
                        op,
                        op_argv(op, b, t, df, _link(r / "link", tgt(b, t)), *e),
                    )
                )
                if op == "restore":  # apply's other input is the diff file (case "apply -o DIFF-FILE")
                    case(f"{op} -o REFERENCE{sfx}")(
                        lambda r, b, t, df, op=op, e=extra: (op, op_argv(op, b, t, df, b, *e))
                    )
        case("diff -o BASE's shard")(
            lambda r, b, t, df: ("diff", op_argv("diff", b, t, df, sorted(b.glob("model-0*.safetensors"))[0]))
        )
        case("diff -o TUNED/config.json")(
            lambda r, b, t, df: ("diff", op_argv("diff", b, t, df, t / "config.json"))
        )
        case("diff -o the diff of apply (existing file)")(
            lambda r, b, t, df: ("diff", op_argv("diff", b, t, df, df))
        )
        case("diff -o PARENT")(lambda r, b, t, df: ("diff", op_argv("diff", b, t, df, r)))
        case("apply -o DIFF-FILE")(lambda r, b, t, df: ("apply", op_argv("apply", b, t, df, df)))
        for name, build in cases:
            judge(fam, lambda name=name, build=build: self._out_case(fx, name, build))

    def _out_case(self, fx: Fixture, name: str, build) -> str:
        d = self.trial_dir("outin")
        r = d / "work"
        base, tuned, diff = copy_inputs(fx, r)
        (r / "sibling.txt").write_text("a sibling file of the checkpoints\n")
        op, argv = build(r, base, tuned, diff)
        before = snapshot(r)
        run = cli(argv, self.timeout)
        try:
            o = run.outcome()
            if o in ("hang", "crash"):
                raise Violation(o, f"hfhooks {name}: {run.describe()}")
            after = snapshot(r)
            # what must survive: the command's inputs, a sibling file, and (diff has no --overwrite) the existing
            # file task.safetensors; tuned/ is no input of apply, so `apply -o tuned --overwrite` may replace it
            inputs = {"apply": ("base", "task.safetensors"), "restore": ("base", "tuned")}.get(
                op, ("base", "tuned", "task.safetensors")
            )
            inputs = (*inputs, "sibling.txt")
            changed = {k: v for k, v in before.items() if k.split("/")[0] in inputs and after.get(k) != v}
            created_inside = [k for k in after if k not in before and k.split("/")[0] in ("base", "tuned")]
            if changed or created_inside:
                what = snap_diff(
                    {k: before[k] for k in before if k.split("/")[0] in inputs},
                    {k: v for k, v in after.items() if k.split("/")[0] in inputs},
                )
                raise Violation(
                    "input or sibling destroyed / modified",
                    f"hfhooks {name} -> {o} (exit {run.rc}); inputs: {what}",
                )
            left = [
                k
                for k in after
                if k not in before
                and k.split("/")[0] not in inputs
                and k.split("/")[0] not in ("link", "out")
            ]
            left = [k for k in left if k.split("/")[0].startswith(".")]
            if left:
                raise Violation("temporary leftovers", f"hfhooks {name} -> {o}: {left[:4]}")
            return "ok" if o == "success" else "clean"
        finally:
            self.cleanup(d)

    # ------------------------------------------------------------------------------------------ symlinks
    def symlinks(self) -> None:
        fam = self.fams["symlinks"]
        fx = self.small[0]
        for op in ("apply", "restore", "diff"):
            for in_place in (False, True):
                if op == "diff" and in_place:
                    continue
                judge(fam, self._symlink_case, fx, op, in_place)

    def _symlink_case(self, fx: Fixture, op: str, in_place: bool) -> str:
        d = self.trial_dir("symlink")
        outside = d / "OUTSIDE"
        (outside / "dir").mkdir(parents=True)
        (outside / "secret").write_bytes(SECRET + b"\n")
        (outside / "dir" / "data.txt").write_bytes(SECRET + b" in a directory\n")
        base, tuned, diff = copy_inputs(fx, d / "work")
        target = tuned if op == "restore" else base
        os.symlink(outside / "secret", target / "notes2.txt")
        os.symlink(outside / "dir", target / "extra")
        os.symlink(outside / "secret", tuned / "tokenizer_config.json")  # a file the edit copies by name
        out = None if in_place else (d / "work" / ("out.safetensors" if op == "diff" else "out"))
        argv = op_argv(op, base, tuned, diff, out)
        before_out = snapshot(outside)
        inodes = {os.stat(p).st_ino for p in (outside / "secret", outside / "dir" / "data.txt")}
        run = cli(argv, self.timeout)
        label = f"hfhooks {op}{' --in-place' if in_place else ''} on a checkpoint with links to OUTSIDE"
        try:
            o = run.outcome()
            if o in ("hang", "crash"):
                raise Violation(o, f"{label}: {run.describe()}")
            if snapshot(outside) != before_out:
                raise Violation(
                    "outside tree modified", f"{label}: {snap_diff(before_out, snapshot(outside))}"
                )
            produced = target if in_place else out
            if o == "success" and produced is not None and produced.exists():
                for p in [produced] if produced.is_file() else produced.rglob("*"):
                    if p.is_symlink() or not p.is_file():
                        continue
                    if os.stat(p).st_ino in inodes:
                        raise Violation(
                            "outside file hard-linked into the output", f"{label}: {p.relative_to(d)}"
                        )
                    if SECRET in p.read_bytes():
                        raise Violation(
                            "secret copied into the output", f"{label}: {p.relative_to(d)} holds the secret"
                        )
                extra = produced / "extra" if produced.is_dir() else None
                if extra is not None and extra.is_dir() and not extra.is_symlink():
                    raise Violation(
                        "directory symlink materialised",
                        f"{label}: {extra.relative_to(d)} is a real directory",
                    )
            return "ok" if o == "success" else "clean"
        finally:
            self.cleanup(d)

    # ------------------------------------------------------------------------------------------ FIFOs
    def fifo(self) -> None:
        fam = self.fams["fifo"]
        fx = self.small[0]
        d = self.trial_dir("fifo")
        cases = []
        fifo = d / "pipe.safetensors"
        os.mkfifo(fifo)
        cases.append(("mask info FIFO", ["mask", "info", fifo]))
        cases.append(("diff-info FIFO", ["diff-info", fifo]))
        cases.append(("diff-info --lazy FIFO", ["diff-info", fifo, "--lazy"]))
        cases.append(("apply FIFO-diff", ["apply", fifo, fx.base, "-o", d / "o1", "-q"]))
        single = d / "single"
        single.mkdir()
        shutil.copy2(fx.base / "config.json", single / "config.json")
        os.mkfifo(single / "model.safetensors")
        cases.append(
            (
                "diff with model.safetensors a FIFO",
                ["diff", single, fx.tuned, "-o", d / "o2.safetensors", "-q"],
            )
        )
        sharded = d / "sharded"
        shutil.copytree(fx.base, sharded)
        shard = sorted(sharded.glob("model-*.safetensors"))[0]
        shard.unlink()
        os.mkfifo(shard)
        cases.append(
            ("apply to a checkpoint with a FIFO shard", ["apply", fx.diff, sharded, "-o", d / "o3", "-q"])
        )
        cases.append(
            (
                "restore from a checkpoint with a FIFO shard",
                ["restore", fx.tuned, sharded, "--layers", "0:1", "-o", d / "o4", "-q"],
            )
        )
        lone = d / "lone"
        lone.mkdir()
        os.mkfifo(lone / "weights.safetensors")
        cases.append(
            (
                "diff of a directory whose lone .safetensors is a FIFO",
                ["diff", lone, fx.tuned, "-o", d / "o5.safetensors", "-q"],
            )
        )
        cases.append(("diff BASE FIFO-file", ["diff", fx.base, fifo, "-o", d / "o6.safetensors", "-q"]))
        timeout = min(self.timeout, 8.0 if self.quick else 15.0)
        procs = [
            (name, cli_start(argv)) for name, argv in cases
        ]  # in parallel: a hang costs the timeout once
        for name, p in procs:
            run = p.wait(timeout)
            o = run.outcome()
            if o == "hang":
                fam.record(
                    "violation", "hang on a FIFO", f"hfhooks {name}: still blocked after {timeout:.0f}s"
                )
            elif o == "crash":
                fam.record(
                    "violation", "crash (traceback / non-clean exit)", f"hfhooks {name}: {run.describe()}"
                )
            elif o == "success":
                fam.record("violation", "FIFO accepted", f"hfhooks {name}: exit 0")
            else:
                fam.record("clean")
        self.cleanup(d)

    # ------------------------------------------------------------------------------------------ full disk
    def full_disk(self, trials: int) -> None:
        fam = self.fams["full_disk"]
        fx = self.small[0]
        ops = ["apply", "restore", "diff", "apply-in-place", "mask-save", "diff-save"]
        for t in range(trials):
            op = ops[t % len(ops)]
            judge(fam, lambda op=op: self._full_disk_case(fx, op))

    def _full_disk_case(self, fx: Fixture, op: str) -> str:
        d = self.trial_dir("fsize")
        base, tuned, diff = copy_inputs(fx, d)
        size = self.rng.choice([0, 100, 4096, self.rng.randrange(200, 60000)])
        if op in ("mask-save", "diff-save"):
            out = d / "artifact.safetensors"
            if op == "mask-save":
                m = ParamMask({f"w{i}": torch.rand(64, 64) > 0.5 for i in range(4)})

                def target() -> int:
                    m.save(out)
                    return 0
            else:
                w = WeightDiff.load(diff)

                def target() -> int:
                    w.save(out)
                    return 0

            proc = Proc(_api_child(target), fsize=size)
            label = f"{op} under RLIMIT_FSIZE={size}"
        else:
            out = None if op == "apply-in-place" else (d / ("out.safetensors" if op == "diff" else "out"))
            argv = op_argv(op.removesuffix("-in-place"), base, tuned, diff, out)
            proc = cli_start(argv, fsize=size)
            label = f"hfhooks {' '.join(argv[:1])}{' --in-place' if out is None else ''} under RLIMIT_FSIZE={size}"
        inputs = {p: snapshot(p) for p in (base, tuned, diff)}
        run = proc.wait(self.timeout)
        try:
            o = run.outcome()
            if o == "hang":
                raise Violation("hang", f"{label}: {run.describe()}")
            for p, snap in inputs.items():
                if op == "apply-in-place" and p == base and o == "success":
                    continue
                if snapshot(p) != snap:
                    raise Violation(
                        "input modified by a failed write",
                        f"{label}: {p.name}: {snap_diff(snap, snapshot(p))}",
                    )
            expected = {"base", "tuned", "task.safetensors"} | ({out.name} if out is not None else set())
            left = leftovers(d, expected) + [
                f"base/{k}" for k in snapshot(base) if k not in inputs[base] and k.startswith(".")
            ]
            if left:
                raise Violation("temporary leftovers after a failed write", f"{label}: {left[:4]}")
            if o == "success":
                return "ok"
            if o == "crash":
                raise Violation("crash (traceback / non-clean exit)", f"{label}: {run.describe()}")
            # a clean error must say which file could not be written
            msg = run.err.strip().splitlines()[-1] if run.err.strip() else ""
            names = {str(d), d.name, "out", "artifact.safetensors", "out.safetensors"}
            if not any(n in msg for n in names):
                raise Violation("full-disk error does not name the path", f"{label}: {msg[:300]}")
            return "clean"
        finally:
            self.cleanup(d)

    # ------------------------------------------------------------------------------------------ driver
    def run(self, only: Sequence[str] | None) -> None:
        n = self.n
        plan = {
            "fuzz_artifacts": lambda: self.fuzz_artifacts(max(12, 10 * n)),
            "fuzz_checkpoints": lambda: self.fuzz_checkpoints(max(12, 2 * n)),
            "kill9": lambda: self.kill9(max(6, 3 * n)),
            "concurrent": lambda: self.concurrent(max(2, n // 3)),
            "out_vs_in": self.out_vs_in,
            "symlinks": self.symlinks,
            "fifo": self.fifo,
            "full_disk": lambda: self.full_disk(max(6, n)),
        }
        for name in FAMILIES:
            if only and name not in only:
                continue
            t0 = time.monotonic()
            plan[name]()
            self.figures.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)


def _api_child(fn: Callable[[], int]) -> Callable[[], int]:
    """A library call in a child: an :class:`ArtifactError` or ``OSError`` is a clean error (exit 2, one line)."""

    def run() -> int:
        try:
            return fn()
        except (ArtifactError, OSError) as e:
            print(f"hfhooks: error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2

    return run


def _link(link: Path, to: Path) -> Path:
    os.symlink(to, link)
    return link


def _poisoned_copy(shard: Path, dest: Path) -> Path:
    """A valid shard with the same tensors as ``shard`` but different values (reading it is detectable)."""
    from safetensors.torch import load_file, save_file

    tensors = {k: (v.float() + 1.0).to(v.dtype) for k, v in load_file(str(shard)).items()}
    save_file(tensors, str(dest), metadata={"format": "pt"})
    return dest


def _independent(mutated: Path, pristine: Path) -> bool | str:
    """How plain safetensors reads ``mutated``: True (exactly ``pristine``'s tensors: the change is harmless),
    False (unreadable: corrupt), or "different" (a valid checkpoint with other tensors)."""
    try:
        got = load_tensors(mutated)
    except Exception:
        return False
    return True if not same_tensors(got, load_tensors(pristine)) else "different"


def _mutate_value(value: Any, rng: random.Random) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice([-1, 1, 7])
    if isinstance(value, float):
        return value * 1.5 + 0.001
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "x"
    if isinstance(value, list):
        return [*value, 1] if rng.random() < 0.5 else value[:-1]
    return None


def _mutate_json_text(text: str, rng: random.Random) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return text + "x"
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        value[key] = _mutate_value(value[key], rng)
        return json.dumps(value)
    return json.dumps(_mutate_value(value, rng))


# ====================================================================================================== output
def table(fams: dict[str, Family]) -> str:
    rows = [("family", "trials", "ok", "clean errors", "violations")]
    for f in fams.values():
        if f.trials:
            rows.append((f.name, str(f.trials), str(f.ok), str(f.clean), str(f.violations)))
    total = [sum(int(r[i]) for r in rows[1:]) for i in range(1, 5)]
    rows.append(("TOTAL", *map(str, total)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for j, r in enumerate(rows):
        lines.append(
            " | ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        )
        if j == 0 or j == len(rows) - 2:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def violations_text(fams: dict[str, Family]) -> str:
    lines = []
    for f in fams.values():
        for kind, count in f.kinds.items():
            lines.append(f"[{f.name}] {kind} ×{count}\n    e.g. {f.examples[kind]}")
    return "\n".join(lines) or "no violations"


def main(argv: Sequence[str] | None = None) -> int:
    global REAL_CLI
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help="scale of the randomised families (default 30; 6 with --quick)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", help="the campaign's temporary root is created inside this directory (default: $TMPDIR)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--quick", action="store_true", help="a small run (~30 s)")
    p.add_argument("--only", nargs="+", choices=FAMILIES, help="run only these families")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a command counts as hung")
    p.add_argument("--real-cli", action="store_true", help="run 'python -m hfhooks' instead of forking")
    p.add_argument("--keep", action="store_true", help="keep the temporary root")
    p.add_argument("--verbose", action="store_true", help="list every violation, not one example per kind")
    args = p.parse_args(argv)
    REAL_CLI = args.real_cli
    trials = args.trials if args.trials is not None else (6 if args.quick else 30)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="hfhooks-campaign-", dir=args.out))
    warnings.filterwarnings("ignore")
    t0 = time.monotonic()
    try:
        camp = Campaign(root, args.seed, trials, args.quick, args.timeout)
        camp.run(args.only)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.monotonic() - t0
    total = sum(f.violations for f in camp.fams.values())
    if args.json:
        json.dump(
            {
                "seed": args.seed,
                "trials": trials,
                "seconds": round(seconds, 1),
                "violations": total,
                "families": {
                    f.name: {
                        "trials": f.trials,
                        "ok": f.ok,
                        "clean_errors": f.clean,
                        "violations": f.violations,
                        "kinds": f.kinds,
                        "examples": f.examples,
                    }
                    for f in camp.fams.values()
                    if f.trials
                },
                "figures": camp.figures,
            },
            sys.stdout,
            indent=2,
        )
        print()
    else:
        print(table(camp.fams))
        print()
        print(violations_text(camp.fams))
        if args.verbose:
            for f in camp.fams.values():
                for line in f.every:
                    print(f"  [{f.name}] {line}")
        print(f"\nseed {args.seed}, --trials {trials}, {seconds:.0f}s; figures: {json.dumps(camp.figures)}")
    return 1 if total else 0


if __name__ == "__main__":
    raise SystemExit(main())
