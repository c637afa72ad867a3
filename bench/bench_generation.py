"""Batched generation: ``generate_chat`` at batch 8 (left-padded) vs one prompt at a time (tokens/s ratio).

Both sides call the project's ``data_builders.generation.generate_chat`` (what critique-and-rewrite, the DPO
before/after assessment and the evaluation use) on the same SmolLM2-135M-Instruct model, greedy, with the same
prompts: the seed red-team prompts (``data_builders/seed/redteam_prompts.jsonl``, the first ``--prompts``).
Side A passes ``batch_size=8`` (left padding, one ``model.generate`` per 8 prompts); side B passes
``batch_size=1``. Tokens/s counts the generated tokens each side returns (``n_tokens``: up to and excluding
eos), so rows that finished early in a batch — and still ride along until the batch's longest row ends — are
not counted as work. Runs alternate A B A B after one warm-up run each; the ratio is the median of the paired
per-round ratios. Also reported: how many greedy answers are identical between the two sides (left padding
changes fp32 summation order, so a few near-tie tokens may differ; the count is a sanity check, not a goal).
Goal: batched / one-at-a-time tokens/s ≥ 3.

    python bench/bench_generation.py [--prompts 16] [--max-new-tokens 48] [--reps 3] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REDTEAM_SEED, interleave, median, report, setup, smollm2_path

GOAL = 3.0
BATCH = 8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="red-team prompts (a multiple of 8 keeps batches full)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="the smoke config's dpo.generation value")
    ap.add_argument("--reps", type=int, default=3, help="interleaved runs per side after one warm-up run each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    ap.add_argument("--quick", action="store_true", help="8 prompts, 24 new tokens, 1 rep")
    a = ap.parse_args(argv)
    if a.quick:
        a.prompts, a.max_new_tokens, a.reps = 8, 24, 1
    setup(a.threads)

    from staged_alignment.core.config import ModelSection
    from staged_alignment.core.models import load_model, load_tokenizer
    from staged_alignment.data_builders.generation import generate_chat

    path = smollm2_path()
    mcfg = ModelSection()
    tok = load_tokenizer(path, mcfg)
    model = load_model(path, mcfg, device="cpu", for_training=False).eval()
    prompts = [json.loads(x)["prompt"] for x in REDTEAM_SEED.read_text().splitlines() if x.strip()]
    convs = [[{"role": "user", "content": prompts[i % len(prompts)]}] for i in range(a.prompts)]

    runs: dict[str, list] = {"batched": [], "single": []}

    def side(name: str, bs: int):
        def run():
            t0 = time.perf_counter()
            out = generate_chat(model, tok, convs, max_new_tokens=a.max_new_tokens, batch_size=bs, do_sample=False)
            dt = time.perf_counter() - t0
            runs[name].append((dt, out))
        return run

    interleave({"batched": side("batched", BATCH), "single": side("single", 1)}, reps=a.reps, warmup=1)
    b_runs, s_runs = runs["batched"][1:], runs["single"][1:]  # drop the warm-up runs

    def tps(run):
        dt, out = run
        return sum(o["n_tokens"] for o in out) / dt

    ratios = [tps(b) / tps(s) for b, s in zip(b_runs, s_runs)]
    ratio = median(ratios)
    b_out, s_out = b_runs[-1][1], s_runs[-1][1]
    same = sum(x["text"] == y["text"] for x, y in zip(b_out, s_out))
    figures = {
        "batched_tokens_per_s": round(median([tps(r) for r in b_runs]), 2),
        "single_tokens_per_s": round(median([tps(r) for r in s_runs]), 2),
        "batched_run_s": round(median([r[0] for r in b_runs]), 3),
        "single_run_s": round(median([r[0] for r in s_runs]), 3),
        "generated_tokens_batched": sum(o["n_tokens"] for o in b_out),
        "generated_tokens_single": sum(o["n_tokens"] for o in s_out),
        "truncated_answers": sum(o["truncated"] for o in s_out),
        "identical_greedy_answers": f"{same}/{len(convs)}",
        "paired_ratios": [round(r, 3) for r in ratios],
        "prompts": len(convs), "batch_size": BATCH, "max_new_tokens": a.max_new_tokens, "reps": a.reps,
    }
    report("generation", figures, headline="batch-8 / one-at-a-time generated tokens/s", value=ratio,
           goal=f">= {GOAL}", met=ratio >= GOAL,
           notes=f"generate_chat, SmolLM2-135M fp32 CPU, greedy, {a.threads} torch thread(s); median of paired "
                 "per-round ratios; tokens = returned tokens before eos (padding after an early eos not counted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
