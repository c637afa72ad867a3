"""Stage overhead: the project's trainers vs bare TRL on the same model, data and settings (step time ratio).

SFT: ``trainers.sft.ZephyrSFTTrainer`` with the args of ``core.common.build_training_args`` (+ the stage's
callbacks) vs a bare ``trl.SFTTrainer`` built the way a plain TRL script would. DPO: ``trainers.dpo.
ConstitutionalDPOTrainer`` (+ per-principle metrics) vs a bare ``trl.DPOTrainer``. Both sides: SmolLM2-135M, the
smoke config's LoRA (r=8, all seven projections), batch 4, max_length 256, fp32 on CPU, logging every step.

Each side trains ``--steps`` optimizer steps per run; runs alternate A B A B (one warm-up run each first). The
first step of every run (dataloader start) is dropped; the reported ratio is the median of the per-step ratios
A/B paired by round and step index (the same batch on both sides: same seed, same data order).
The bare side sets ``gradient_checkpointing=False`` like the project does on CPU: TRL 1.14's SFTConfig and
DPOConfig default it to True, and recomputing activations made the bare side 12-25 % slower (ratios 0.77 SFT,
0.88 DPO), hiding the project's overhead.
Goal: project / bare ≤ 1.05.

    python bench/bench_stage_overhead.py [--steps 4] [--reps 3] [--only sft|dpo] [--threads N] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, median, report, setup, sft_rows, smoke_config, smollm2_path, step_timer

GOAL = 1.05


def _pairs(n: int) -> list[dict]:
    """Synthetic constitutional preference pairs in the project's schema (TRL conversational format)."""
    import json

    from common import REDTEAM_SEED

    prompts = [json.loads(line)["prompt"] for line in REDTEAM_SEED.read_text().splitlines() if line.strip()]
    out = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        out.append({"prompt": [{"role": "user", "content": p}],
                    "chosen": [{"role": "assistant", "content": "I can't help with that, because it could hurt "
                                "someone. If you are worried, talk to them directly or ask a professional." +
                                " Thank you for understanding." * (i % 3)}],
                    "rejected": [{"role": "assistant", "content": "Sure, here is how to do it. First, wait until "
                                  "nobody is around, then go ahead step by step." + " Then repeat." * (i % 4)}],
                    "principle_id": ("harm", "honesty", "privacy")[i % 3]})
    return out


def _paired_ratio(a_runs: list[list[float]], b_runs: list[list[float]]) -> tuple[float, float, float, list]:
    """(median A step, median B step, median of paired A/B ratios, ratios) with the first step of each run dropped."""
    a_steps = [d for run in a_runs for d in run[1:]]
    b_steps = [d for run in b_runs for d in run[1:]]
    ratios = [a / b for ra, rb in zip(a_runs, b_runs) for a, b in zip(ra[1:], rb[1:])]
    return median(a_steps), median(b_steps), median(ratios), ratios


def bench_sft(steps: int, reps: int, tmp: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from staged_alignment.core.common import build_training_args, seed_everything, standard_callbacks
    from staged_alignment.core.models import load_model, load_tokenizer, lora_config
    from staged_alignment.stages.stage0_sft import sft_defaults
    from staged_alignment.trainers.sft import ZephyrSFTTrainer

    cfg = smoke_config(tmp, [f"sft.training.max_steps={steps}", "sft.training.save_strategy='no'",
                             "sft.training.disable_tqdm=true"])
    path = smollm2_path()
    tok = load_tokenizer(path, cfg.model)
    ds = Dataset.from_list(sft_rows())
    t = cfg.sft.training

    # A: the project's stage-0 trainer, args and callbacks
    seed_everything(cfg.seed)
    a_args = build_training_args(SFTConfig, cfg, "sft", tmp / "a", **sft_defaults(cfg))
    a_timer = step_timer()
    a = ZephyrSFTTrainer(model=load_model(path, cfg.model, device="cpu"), args=a_args, train_dataset=ds,
                         processing_class=tok, peft_config=lora_config(cfg.lora),
                         callbacks=standard_callbacks(cfg) + [a_timer])
    # B: a bare TRL script with the same hyper-parameters
    seed_everything(cfg.seed)
    b_args = SFTConfig(output_dir=str(tmp / "b"), max_steps=steps, per_device_train_batch_size=t["per_device_train_batch_size"],
                       learning_rate=t["learning_rate"], lr_scheduler_type=t["lr_scheduler_type"],
                       assistant_only_loss=True, max_length=cfg.model.max_seq_length, packing=False, use_cpu=True,
                       bf16=False, logging_steps=1, report_to="none", save_strategy="no", seed=cfg.seed,
                       dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False,
                       train_sampling_strategy=a_args.train_sampling_strategy)  # same batches as the project side
    b_timer = step_timer()
    b = SFTTrainer(model=load_model(path, cfg.model, device="cpu"), args=b_args, train_dataset=ds,
                   processing_class=tok, peft_config=lora_config(cfg.lora), callbacks=[b_timer])
    return _run_pair("sft", a, a_timer, b, b_timer, reps)


def bench_dpo(steps: int, reps: int, tmp: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from staged_alignment.core.common import build_training_args, seed_everything, standard_callbacks
    from staged_alignment.core.models import load_model, load_tokenizer, lora_config
    from staged_alignment.stages.stage1_dpo import dpo_defaults
    from staged_alignment.trainers.dpo import ConstitutionalDPOTrainer

    cfg = smoke_config(tmp, [f"dpo.training.max_steps={steps}", "dpo.training.save_strategy='no'",
                             "dpo.training.disable_tqdm=true"])
    path = smollm2_path()
    tok = load_tokenizer(path, cfg.model)
    ds = Dataset.from_list(_pairs(32))
    t = cfg.dpo.training

    seed_everything(cfg.seed)
    a_args = build_training_args(DPOConfig, cfg, "dpo", tmp / "a", **dpo_defaults(cfg))
    a_timer = step_timer()
    a = ConstitutionalDPOTrainer(model=load_model(path, cfg.model, device="cpu"), ref_model=None, args=a_args,
                                 train_dataset=ds, processing_class=tok, peft_config=lora_config(cfg.lora),
                                 callbacks=standard_callbacks(cfg) + [a_timer])
    seed_everything(cfg.seed)
    b_args = DPOConfig(output_dir=str(tmp / "b"), max_steps=steps, per_device_train_batch_size=t["per_device_train_batch_size"],
                       learning_rate=t["learning_rate"], beta=t["beta"], max_length=t["max_length"], use_cpu=True,
                       bf16=False, logging_steps=1, report_to="none", save_strategy="no", seed=cfg.seed,
                       dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False)
    b_timer = step_timer()
    b = DPOTrainer(model=load_model(path, cfg.model, device="cpu"), ref_model=None, args=b_args, train_dataset=ds.remove_columns("principle_id"),
                   processing_class=tok, peft_config=lora_config(cfg.lora), callbacks=[b_timer])
    return _run_pair("dpo", a, a_timer, b, b_timer, reps)


def _run_pair(stage: str, a, a_timer, b, b_timer, reps: int) -> dict:
    a_runs, b_runs = [], []

    def run_a():
        a_timer.durations = []
        a.train()
        a_runs.append(list(a_timer.durations))

    def run_b():
        b_timer.durations = []
        b.train()
        b_runs.append(list(b_timer.durations))

    interleave({"project": run_a, "bare": run_b}, reps=reps, warmup=1)
    a_runs, b_runs = a_runs[1:], b_runs[1:]  # drop the warm-up runs
    a_med, b_med, ratio, ratios = _paired_ratio(a_runs, b_runs)
    return {f"{stage}_project_step_s": round(a_med, 4), f"{stage}_bare_step_s": round(b_med, 4),
            f"{stage}_ratio": round(ratio, 4), f"{stage}_ratio_of_medians": round(a_med / b_med, 4),
            f"{stage}_paired_ratios": [round(r, 3) for r in ratios]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is dropped)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved runs per side after one warm-up run each")
    ap.add_argument("--only", choices=["sft", "dpo"], default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 rep")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.reps = 3, 1
    setup(a.threads)
    figures = {}
    with tempfile.TemporaryDirectory() as d:
        if a.only in (None, "sft"):
            figures.update(bench_sft(a.steps, a.reps, Path(d) / "sft"))
        if a.only in (None, "dpo"):
            try:
                import staged_alignment.trainers.dpo  # noqa: F401
            except ImportError as e:
                figures["dpo_skipped"] = f"trainers/dpo.py not importable: {e}"
            else:
                figures.update(bench_dpo(a.steps, a.reps, Path(d) / "dpo"))
    ratios = [figures[k] for k in ("sft_ratio", "dpo_ratio") if k in figures]
    worst = max(ratios)
    report("stage_overhead", figures, headline="project/bare step time (worst of SFT, DPO)", value=worst,
           goal=f"<= {GOAL}", met=worst <= GOAL,
           notes="SmolLM2-135M, LoRA r=8 on 7 projections, batch 4, max_length 256, fp32 CPU; median of paired "
                 "per-step ratios, first step of each run dropped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
