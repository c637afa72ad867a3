"""Peak memory: the DPO stage's trainer vs the SFT stage's trainer (peak RSS ratio), each in its own process.

Peak RSS (``ru_maxrss``) only grows, so each side runs in a child process: this script re-runs itself with
``--side load|sft|dpo`` (one child per side and repetition, sides alternating) and each child prints its own
``ru_maxrss`` after training. Sides, all SmolLM2-135M fp32 on CPU, the smoke config's LoRA (r=8, seven
projections), batch 4, max_length 256, the stage's own args (``build_training_args`` + ``sft_defaults`` /
``dpo_defaults``):

* ``sft``: ``ZephyrSFTTrainer`` on the seed SFT conversations (``data_builders/seed/sft_seed.jsonl``);
* ``dpo``: ``ConstitutionalDPOTrainer`` with ``ref_model=None`` — the reference is the same network with the
  adapter disabled, so no second copy of the weights — on pairs made of the SAME conversations: prompt = the
  conversation up to the last assistant turn, chosen = that turn, rejected = another conversation's last
  assistant turn (the same token counts per sequence as SFT, twice the sequences: chosen + rejected);
* ``dpo_half``: the same DPO trainer with half the pairs per step (B/2 pairs = B sequences, as many as SFT):
  isolates what the DPO stage itself adds (reference forward, preference collation, metrics) from the
  doubled sequence count;
* ``load``: imports and loads the model and tokenizer, no training (the floor both sides share).

Each training side runs ``--steps`` optimizer steps (the peak is reached in the first steps: AdamW state,
activations, logits). Goal: peak RSS DPO / SFT ≤ 1.15. The increments over ``load`` show where the difference
comes from (activations and full-vocabulary logits of 2B sequences, plus the reference forward).

    python bench/bench_memory.py [--steps 3] [--reps 1] [--quick]
    python bench/bench_memory.py --side dpo --steps 3     # one side, prints SIDE_RESULT {json}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, report, rss_mib, setup, sft_rows, smoke_config, smollm2_path

GOAL = 1.15
SIDES = ("load", "sft", "dpo", "dpo_half")


def pairs_from_sft(rows: list[dict]) -> list[dict]:
    """Preference pairs in TRL's conversational format from the SFT conversations (see the module docstring)."""
    out = []
    n = len(rows)
    for i, r in enumerate(rows):
        msgs = r["messages"]
        other = rows[(i + 1) % n]["messages"]
        out.append({"prompt": msgs[:-1], "chosen": [msgs[-1]], "rejected": [other[-1]],
                    "principle_id": ("harm", "honesty", "privacy")[i % 3]})
    return out


def run_side(side: str, steps: int, threads: int) -> dict:
    setup(threads)
    t0 = time.perf_counter()
    from datasets import Dataset

    from staged_alignment.core.common import build_training_args, seed_everything, standard_callbacks
    from staged_alignment.core.models import load_model, load_tokenizer, lora_config

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        over = [f"{s}.training.{x}" for s in ("sft", "dpo") for x in
                (f"max_steps={steps}", "save_strategy='no'", "disable_tqdm=true", "logging_steps=1")]
        cfg = smoke_config(tmp, over)
        path = smollm2_path()
        seed_everything(cfg.seed)
        tok = load_tokenizer(path, cfg.model)
        model = load_model(path, cfg.model, device="cpu")
        rows = sft_rows()
        info: dict = {"side": side}
        if side == "sft":
            from trl import SFTConfig

            from staged_alignment.stages.stage0_sft import sft_defaults
            from staged_alignment.trainers.sft import ZephyrSFTTrainer

            args = build_training_args(SFTConfig, cfg, "sft", tmp / "sft", **sft_defaults(cfg))
            tr = ZephyrSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                  peft_config=lora_config(cfg.lora), callbacks=standard_callbacks(cfg))
            tr.train()
            info["sequences_per_step"] = args.per_device_train_batch_size
        elif side in ("dpo", "dpo_half"):
            from trl import DPOConfig

            from staged_alignment.stages.stage1_dpo import dpo_defaults
            from staged_alignment.trainers.dpo import ConstitutionalDPOTrainer

            args = build_training_args(DPOConfig, cfg, "dpo", tmp / "dpo", **dpo_defaults(cfg))
            if side == "dpo_half":  # as many sequences a step as SFT: B/2 pairs = B sequences
                args.per_device_train_batch_size = max(1, args.per_device_train_batch_size // 2)
            tr = ConstitutionalDPOTrainer(model=model, ref_model=None, args=args,
                                          train_dataset=Dataset.from_list(pairs_from_sft(rows)), processing_class=tok,
                                          peft_config=lora_config(cfg.lora), callbacks=standard_callbacks(cfg))
            assert tr.ref_model is None, "expected the adapter-disabled reference (no second model)"
            tr.train()
            info["sequences_per_step"] = 2 * args.per_device_train_batch_size
        info.update(peak_rss_mib=round(rss_mib(), 1), wall_s=round(time.perf_counter() - t0, 1),
                    torch_threads=threads, steps=steps if side != "load" else 0)
    return info


def spawn(side: str, steps: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--steps", str(steps),
           "--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [x for x in p.stdout.splitlines() if x.startswith("SIDE_RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"side {side} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("SIDE_RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", choices=SIDES, default=None, help="run one side in this process (used by the parent)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per training side")
    ap.add_argument("--reps", type=int, default=1, help="children per side (alternating sft, dpo)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 steps, 1 rep")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.reps = 2, 1
    if a.side:
        print("SIDE_RESULT " + json.dumps(run_side(a.side, a.steps, a.threads)), flush=True)
        return 0

    res: dict[str, list[dict]] = {s: [] for s in SIDES}
    res["load"].append(spawn("load", a.steps, a.threads))
    for _ in range(a.reps):
        for side in ("sft", "dpo", "dpo_half"):
            res[side].append(spawn(side, a.steps, a.threads))
            print(json.dumps(res[side][-1]), flush=True)
    peak = {s: median([r["peak_rss_mib"] for r in res[s]]) for s in SIDES}
    ratio = peak["dpo"] / peak["sft"]
    inc_sft, inc_dpo = peak["sft"] - peak["load"], peak["dpo"] - peak["load"]
    seqs = {s: res[s][0]["sequences_per_step"] for s in ("sft", "dpo", "dpo_half")}
    figures = {"load_peak_rss_mib": peak["load"], "sft_peak_rss_mib": peak["sft"], "dpo_peak_rss_mib": peak["dpo"],
               "sft_over_load_mib": round(inc_sft, 1), "dpo_over_load_mib": round(inc_dpo, 1),
               "increment_ratio_dpo_over_sft": round(inc_dpo / inc_sft, 3) if inc_sft > 0 else None,
               "increment_per_sequence_ratio": round((inc_dpo / seqs["dpo"]) / (inc_sft / seqs["sft"]), 3)
               if inc_sft > 0 else None,
               "dpo_half_peak_rss_mib": peak["dpo_half"],
               "dpo_half_over_sft": round(peak["dpo_half"] / peak["sft"], 3),
               "sft_runs_mib": [r["peak_rss_mib"] for r in res["sft"]],
               "dpo_runs_mib": [r["peak_rss_mib"] for r in res["dpo"]],
               "sequences_per_step": seqs,
               "steps": a.steps, "reps": a.reps}
    report("memory", figures, headline="peak RSS DPO stage / SFT stage", value=ratio, goal=f"<= {GOAL}",
           met=ratio <= GOAL,
           notes="separate child process per side (ru_maxrss); SmolLM2-135M fp32 CPU, LoRA r=8, batch 4, "
                 "max_length 256; DPO reference = adapter disabled (ref_model None); same conversations on both "
                 "sides")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
