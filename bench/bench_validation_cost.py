"""Cost of validation: ``pipeline.py --dry-run`` wall time of two checkouts side by side, as a ratio.

    python bench/bench_validation_cost.py --before /path/to/older/checkout [--repeats 5]

Runs the same dry runs from this checkout and from ``--before`` (e.g. a ``git worktree`` of the commit before a
change), alternating, in fresh processes: the smoke config, and a GPU recipe validated for CUDA from this machine
(``--target cuda``). Prints per config the median wall time of each and their ratio (after / before). One torch
job at a time: run nothing else meanwhile.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [("smoke config", "configs/smollm2-135m_smoke-pipeline_cpu.yaml", []),
         ("GPU recipe (--target cuda)", "configs/llama3.1-8b_qlora-pipeline_rtx3060-12gb.yaml", ["--target", "cuda"])]


def dry_run(checkout: Path, config: str, extra: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(checkout), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(checkout / "stages" / "pipeline.py"), "--config", config, "--dry-run",
                        *extra], cwd=checkout, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{checkout}: dry run of {config} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"| config | before s (median of {args.repeats}) | after s | after / before |\n|---|---|---|---|")
    for name, config, extra in CASES:
        times = {"before": [], "after": []}
        dry_run(REPO, config, extra)  # warm the file cache once
        for _ in range(args.repeats):
            times["before"].append(dry_run(args.before, config, extra))
            times["after"].append(dry_run(REPO, config, extra))
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        print(f"| {name} | {b:.2f} | {a:.2f} | {a / b:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
