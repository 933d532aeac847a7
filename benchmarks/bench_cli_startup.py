"""Start-up time of the ``hfhooks`` command, against a bare ``python -c pass``.

Each command runs in N fresh processes; the table shows the median (and the fastest) wall time. The goal is
< 1 s for ``hfhooks --help``, every ``--help`` and ``hfhooks mask info FILE`` (a real mask of a tiny model,
created first); the benchmark asserts it. Run on a quiet machine:

    OMP_NUM_THREADS=1 python benchmarks/bench_cli_startup.py --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 1.0


def make_mask(path: Path) -> None:
    """A mask of a tiny Llama, as a user would save it (this part imports torch; it is not timed)."""
    import torch
    import transformers

    from hfhooks import ParamMask

    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
    )
    model = transformers.LlamaForCausalLM(cfg)
    scores = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
    ParamMask.from_scores(scores, ratio=0.1).save(path, model=model)


def time_command(argv: list[str], repeats: int) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="fresh processes per command (median reported)")
    args = p.parse_args()
    py = [sys.executable]
    with tempfile.TemporaryDirectory() as tmp:
        mask = Path(tmp) / "mask.safetensors"
        make_mask(mask)
        cases = {
            "python -c pass": ([*py, "-c", "pass"], False),
            "hfhooks --help": ([*py, "-m", "hfhooks", "--help"], True),
            "hfhooks mask info FILE": ([*py, "-m", "hfhooks", "mask", "info", str(mask)], True),
            "hfhooks diff --help": ([*py, "-m", "hfhooks", "diff", "--help"], True),
            "hfhooks restore --help": ([*py, "-m", "hfhooks", "restore", "--help"], True),
            "python -c 'import torch'": ([*py, "-c", "import torch"], False),
        }
        rows = {name: time_command(argv, args.repeats) for name, (argv, _) in cases.items()}
    load = os.getloadavg()
    print(
        f"# {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {args.repeats} runs each"
    )
    print(f"| {'command':<26} | median (s) | fastest (s) | goal |")
    print(f"|{'-' * 28}|-----------:|------------:|------|")
    for name, times in rows.items():
        goal = "< 1 s" if cases[name][1] else ""
        print(f"| {name:<26} | {statistics.median(times):10.3f} | {min(times):11.3f} | {goal:<4} |")
    slow = {
        n: statistics.median(t) for n, t in rows.items() if cases[n][1] and statistics.median(t) >= GOAL_S
    }
    assert not slow, f"start-up goal of {GOAL_S} s missed: {slow}"


if __name__ == "__main__":
    main()
