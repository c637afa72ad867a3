"""Utilisation: achieved training FLOP/s of SmolLM2 at sequence 256 over this machine's measured fp32 matmul peak.

Both are measured in the same process, with the same torch threads, alternating (peak burst, training run, peak
burst, training run, …) so a change in machine load hits both:

* **peak**: ``torch.matmul`` of two square fp32 ``--n`` × ``--n`` matrices (2·n³ FLOP each); a burst is
  ``--mm-iters`` products and its best time counts; one burst before and one after every training run; the
  peak is the best burst (a shared CPU only ever lowers it; all bursts are reported). The headline divides by
  it; ``utilisation_vs_adjacent_bursts`` divides each run by the mean of its two neighbouring bursts instead
  (the load that run saw).
* **training**: the project's stage-0 trainer (``ZephyrSFTTrainer``, ``build_training_args`` + ``sft_defaults``)
  on SmolLM2-135M, LoRA r=8 on the seven projections, batch 4, every sequence exactly 256 tokens (long
  conversations truncated at ``max_length`` 256: no padding), fp32. Step times from ``step_timer`` (the first
  step of each run dropped); tokens per step from the collated batches.

Formula: achieved FLOP/s = 6 · N · tokens / step time, N = all parameters (frozen 134.5 M + LoRA 2.4 M; the
tied embedding counted once — it is the LM head's matmul), the usual "model FLOPs" convention (forward 2N,
backward 4N per token; attention scores not included: + 12·layers·seq·hidden = +6.5 % at seq 256).
With LoRA the frozen weights need no weight gradient, but the backward still costs ~2·N per token for the
activation gradients, so the arithmetic actually executed is ≈ 4·N·tokens: ``executed_utilisation`` (4N)
= 2/3 of the 6N ``model_flops_utilisation``. Also reported: a bare loop (``model(**batch).loss.backward()`` +
AdamW step on the same peft model and batches) — the trainer's own overhead (TRL's entropy/accuracy metrics on
the full-vocabulary logits, logging, callbacks) is the gap between the two.

    python bench/bench_utilisation.py [--steps 4] [--reps 2] [--n 2048] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SFT_SEED, median, report, setup, smoke_config, smollm2_path, step_timer

SEQ = 256


def long_rows(n_rows: int, words: int = 400) -> list[dict]:
    """Conversations longer than 256 tokens from the seed SFT text (the trainer truncates them to 256)."""
    from staged_alignment.data_builders.sft_data import read_sft_file

    seed = read_sft_file(str(SFT_SEED))
    text = " ".join(m["content"] for r in seed for m in r["messages"]).split()
    rows = []
    for i in range(n_rows):
        start = (i * 53) % len(text)
        chunk = (text * 3)[start:start + words]
        rows.append({"messages": [{"role": "user", "content": " ".join(chunk[:words // 4])},
                                  {"role": "assistant", "content": " ".join(chunk[words // 4:])}]})
    return rows


def matmul_burst(n: int, iters: int) -> float:
    """Best FLOP/s of ``iters`` fp32 n×n matmuls."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class ShapeRecorder:
    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, features):
        out = self.inner(features)
        self.tokens.append(int(out["attention_mask"].sum()) if "attention_mask" in out else out["input_ids"].numel())
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per training run (the first is dropped)")
    ap.add_argument("--reps", type=int, default=2, help="alternating (peak burst, training run) rounds")
    ap.add_argument("--n", type=int, default=2048, help="matrix size of the peak matmul")
    ap.add_argument("--mm-iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both measurements")
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 round, 1024² matmuls")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.reps, a.n = 3, 1, 1024
    setup(a.threads)

    import torch
    from datasets import Dataset
    from trl import SFTConfig

    from staged_alignment.core.common import build_training_args, seed_everything, standard_callbacks
    from staged_alignment.core.models import load_model, load_tokenizer, lora_config
    from staged_alignment.stages.stage0_sft import sft_defaults
    from staged_alignment.trainers.sft import ZephyrSFTTrainer

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = smoke_config(tmp, [f"sft.training.max_steps={a.steps}", "sft.training.save_strategy='no'",
                                 "sft.training.disable_tqdm=true", "sft.training.logging_steps=1"])
        assert cfg.model.max_seq_length == SEQ
        path = smollm2_path()
        tok = load_tokenizer(path, cfg.model)
        seed_everything(cfg.seed)
        args = build_training_args(SFTConfig, cfg, "sft", tmp / "sft", **sft_defaults(cfg))
        timer = step_timer()
        tr = ZephyrSFTTrainer(model=load_model(path, cfg.model, device="cpu"), args=args,
                              train_dataset=Dataset.from_list(long_rows(64)), processing_class=tok,
                              peft_config=lora_config(cfg.lora), callbacks=standard_callbacks(cfg) + [timer])
        rec = ShapeRecorder(tr.data_collator)
        tr.data_collator = rec
        lens = [len(x) for x in tr.train_dataset["input_ids"][:]]
        n_total = sum(p.numel() for p in tr.model.parameters())
        n_train = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)

        peaks, steps, tok_per_step, bare, adjacent = [], [], [], [], []
        matmul_burst(a.n, 1)  # warm-up
        peaks.append(matmul_burst(a.n, a.mm_iters))
        for _ in range(a.reps):
            timer.durations, rec.tokens = [], []
            tr.train()
            peaks.append(matmul_burst(a.n, a.mm_iters))
            run_step = median(timer.durations[1:])
            run_tokens = median(rec.tokens[1:a.steps])
            adjacent.append(6 * n_total * run_tokens / run_step / ((peaks[-2] + peaks[-1]) / 2))
            steps += timer.durations[1:]
            tok_per_step += rec.tokens[1:a.steps]

        # bare forward/backward/AdamW on the same peft model and a full batch, for the trainer's overhead
        batch = rec.inner([tr.train_dataset[i] for i in range(args.per_device_train_batch_size)])
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        model = tr.model
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for i in range(1 + a.reps):
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # first is warm-up
                bare.append(time.perf_counter() - t0)
        bare_tokens = int(batch["attention_mask"].sum())

    peak = max(peaks)
    step = median(steps)
    tokens = median(tok_per_step)
    achieved = 6 * n_total * tokens / step
    bare_achieved = 6 * n_total * bare_tokens / median(bare)
    cfgm = tr.model.get_base_model().config
    attn = 12 * cfgm.num_hidden_layers * SEQ * cfgm.hidden_size  # per token, fwd+bwd, causal mask not halved
    figures = {
        "peak_matmul_gflops": round(peak / 1e9, 2), "peak_bursts_gflops": [round(p / 1e9, 2) for p in peaks],
        "matmul_n": a.n,
        "train_step_s": round(step, 3), "tokens_per_step": tokens, "tokens_per_s": round(tokens / step, 1),
        "all_sequences_256": all(x >= SEQ for x in lens),
        "params_total_M": round(n_total / 1e6, 2), "params_trainable_M": round(n_train / 1e6, 3),
        "achieved_gflops_6N": round(achieved / 1e9, 2),
        "model_flops_utilisation_6N": round(achieved / peak, 4),
        "utilisation_vs_adjacent_bursts": [round(u, 4) for u in adjacent],
        "executed_utilisation_4N": round(achieved * 4 / 6 / peak, 4),
        "attention_share_of_6N": round(attn / (6 * n_total), 4),
        "bare_loop_step_s": round(median(bare), 3),
        "bare_loop_utilisation_6N": round(bare_achieved / peak, 4),
        "trainer_over_bare_step": round(step * bare_tokens / (median(bare) * tokens), 3),
        "threads": a.threads, "steps": a.steps, "reps": a.reps,
    }
    report("utilisation", figures, headline="achieved training FLOP/s (6·N·tokens/s) / measured fp32 matmul peak",
           value=achieved / peak,
           notes=f"SmolLM2-135M SFT (LoRA r=8), batch 4 × 256 tokens, fp32, {a.threads} torch thread(s) for both "
                 "the training and the matmul peak; 6N counts frozen weights' backward as if it computed weight "
                 "gradients (LoRA executes ≈4N: see executed_utilisation_4N)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
