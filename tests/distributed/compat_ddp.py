"""Launched by tests/compat/test_compat_ddp.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Runs every compatibility-matrix scenario (tests/compat/compat_utils.py) with setup "ddp" — a stock Trainer
doing real DDP — one after the other in this launch, and writes ``<out>/rank<R>.json``: per scenario, the
measured facts, or the error it raised.
"""

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "compat"))
import compat_utils


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    results = {"world_size": int(os.environ["WORLD_SIZE"])}
    scenarios = {**compat_utils.SCENARIOS, "routing_mixed": compat_utils.scenario_routing_mixed}
    for name, scenario in scenarios.items():
        try:
            results[name] = {"status": "ok", **scenario("ddp", Path(a.out) / name)}
        except Exception as e:  # reported per scenario: one failure must not hide the others
            results[name] = {"status": "error", "message": str(e), "traceback": traceback.format_exc()}
    (Path(a.out) / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    if torch.distributed.is_initialized():  # exiting with live gloo threads can abort ("terminate called…")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
