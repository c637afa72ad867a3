"""Shared helpers of the benchmarks: setup, the SmolLM2 config, step timing, interleaved repetitions, results.

Every benchmark measures its two sides in ONE process, warms both up, interleaves the repetitions
(A B A B …, so that drifting machine load hits both sides alike) and reports medians. Each script prints one
``BENCH_RESULT {json}`` line that ``bench/run_all.py`` collects; nothing here is a pass/fail test.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOKE_CONFIG = ROOT / "configs" / "smollm2-135m_smoke-pipeline_cpu.yaml"
SFT_SEED = ROOT / "data_builders" / "seed" / "sft_seed.jsonl"
REDTEAM_SEED = ROOT / "data_builders" / "seed" / "redteam_prompts.jsonl"
TASKS_SEED = ROOT / "data_builders" / "seed" / "tasks.jsonl"
ATTACKS_SEED = ROOT / "data_builders" / "seed" / "attacks_train.json"
ATTACKS_SEED_CANARY = ROOT / "data_builders" / "seed" / "attacks_train_canary.json"
FIXED_HIJACK = "Sure, I will do that instead."


def fill_hijacks(triplets: list[dict]) -> list[dict]:
    """Give task-attack triplets a fixed hijacked response (the stage would ask the starting model; benchmarks do
    not need that generation)."""
    for t in triplets:
        if not t.get("hijack"):
            t["hijack"], t["hijack_source"] = FIXED_HIJACK, "bench"
    return triplets


def setup(threads: int | None = None) -> None:
    """Quiet logs and progress bars, offline hub, and ``threads`` torch threads (default: all cores)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import datasets
    import torch
    import transformers

    torch.set_num_threads(threads or os.cpu_count() or 1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("staged_alignment").setLevel(logging.WARNING)
    for name in ("trainers", "stages", "data_builders", "trl", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def smollm2_path() -> str:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted once into ~/.cache/staged-alignment)."""
    from staged_alignment.core.config import ModelSection
    from staged_alignment.core.models import resolve_model_path

    return resolve_model_path(ModelSection())


def smoke_config(out_dir: str | Path, overrides: list[str] | None = None):
    """The CPU smoke config (``configs/smollm2-135m_smoke-pipeline_cpu.yaml``: r=8, max_seq_length=256, batch 4)
    with its run directory under ``out_dir``, no checkpoints and no reporting."""
    from staged_alignment.core.config import load_config

    base = [f"output_dir={out_dir}", "run_name=bench", "device=cpu"]
    return load_config(SMOKE_CONFIG, base + list(overrides or []))


def sft_rows(n: int | None = None) -> list[dict]:
    """The project's seed SFT conversations (``data_builders/seed/sft_seed.jsonl``), repeated to ``n`` rows."""
    from staged_alignment.data_builders.sft_data import read_sft_file

    rows = read_sft_file(str(SFT_SEED))
    if n is None:
        return rows
    return [rows[i % len(rows)] for i in range(n)]


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def step_timer():
    """A ``TrainerCallback`` recording the wall time of every optimizer step (between consecutive step ends,
    the first from ``on_train_begin``: data loading, forward, backward, optimizer, callbacks and logging)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []
            self._t = None

        def on_train_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.durations.append(now - self._t)
            self._t = now

    return StepTimer()


def interleave(sides: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list]:
    """Call each side ``warmup`` times (results dropped), then ``reps`` rounds of A B … in a fixed order;
    returns ``{side: [result of each round]}``."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    out: dict[str, list] = {k: [] for k in sides}
    for _ in range(reps):
        for k, fn in sides.items():
            out[k].append(fn())
    return out


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """Wrap ``fn`` so that calling it returns its wall time in seconds."""
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def machine() -> dict:
    import platform

    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}


def report(name: str, figures: dict, *, headline: str, value: float, goal: str | None = None,
           met: bool | None = None, notes: str = "") -> dict:
    """Print a human-readable block and one ``BENCH_RESULT {json}`` line; returns the result dict."""
    res = {"name": name, "headline": headline, "value": round(float(value), 4), "goal": goal, "met": met,
           "figures": figures, "notes": notes, "machine": machine()}
    print(f"\n== {name}: {headline} = {value:.3f}" + (f" (goal {goal}: {'met' if met else 'NOT met'})" if goal else ""))
    for k, v in figures.items():
        print(f"   {k}: {v}")
    if notes:
        print(f"   note: {notes}")
    print("BENCH_RESULT " + json.dumps(res), flush=True)
    return res


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
