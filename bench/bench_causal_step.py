"""Causal stage step cost: the fused (3B, L) forward vs three separate forwards, and causal / SFT step time.

Model and data as in the smoke run: SmolLM2-135M, LoRA r=8 on the seven projections, the stage's projection
head (mlp 576→128→64), batch B=4 triplets, max_length 256, fp32 CPU; triplets from the seed tasks × seed
attacks (``build_triplets`` + ``build_token_cache`` + ``TripletCollator``, right padding).

1. **fused vs separate** (forward + backward of the loss, no optimizer): ``CausalContrastiveTrainer.compute_loss``
   on the collator's (3B, L) batch — ONE forward with ``output_hidden_states=True`` — vs the same loss computed
   with three forwards over the (B, L_v) rows of each view (benign, counterfactual, injected; each trimmed to its
   own longest row, so the separate side never pays for another view's padding): the benign LM loss from
   ``lm_head`` on the labelled positions (:func:`trainers.causal_losses.lm_token_nll`), the prompt-token mean
   pool (:func:`pool_hidden_states`) of the last layer, the same head and :func:`contrastive_loss`. The two
   losses are checked equal (|Δ| reported). Ratio = separate / fused time, > 1 means fusing pays.
2. **causal / SFT step**: ``CausalContrastiveTrainer.train()`` (3B sequences a step) vs the project's
   ``ZephyrSFTTrainer`` (stage-0 args) on the benign view of the same triplets as conversations (system + user
   turn + the response: B sequences a step, the same tokens per sequence as the benign rows plus the newline
   the template writes after eos), same seed and
   order, so step k of both sees the same triplets. Full optimizer steps (``step_timer``), first step of each
   run dropped, runs alternate A B. Ideal ratio 3.0 (3× the sequences); the padded tokens each side trained are
   recorded, and ``per_padded_token_ratio`` = step ratio / padded-token ratio (ideal 1.0) separates the cost of
   the longer injected rows (the batch pads to them) from per-token overhead.

    python bench/bench_causal_step.py [--steps 4] [--reps 2] [--batches 2] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ATTACKS_SEED,
    ATTACKS_SEED_CANARY,
    TASKS_SEED,
    fill_hijacks,
    interleave,
    median,
    report,
    setup,
    smoke_config,
    smollm2_path,
    step_timer,
)

IDEAL = 3.0


class RecordingCollator:
    """Wraps a collator and records the (rows, padded length, real tokens) of every batch it builds."""

    def __init__(self, inner):
        self.inner, self.shapes = inner, []

    def __call__(self, features):
        out = self.inner(features)
        ids = out["input_ids"]
        real = int(out["attention_mask"].sum()) if "attention_mask" in out else ids.numel()
        self.shapes.append((ids.shape[0], ids.shape[1], real))
        return out


def build_data(tmp: Path, tok, max_length: int, n: int):
    from staged_alignment.data_builders.token_cache import build_token_cache
    from staged_alignment.data_builders.triplets import build_triplets, read_attacks, read_tasks, write_triplets

    res = build_triplets(read_tasks(str(TASKS_SEED)), [read_attacks(str(ATTACKS_SEED)),
                                                       read_attacks(str(ATTACKS_SEED_CANARY))], seed=42, max_triplets=n)
    path = write_triplets(tmp / "triplets.jsonl", fill_hijacks(res.triplets))
    ds, _ = build_token_cache(path, tok, max_length, tmp / "cache")
    return res.triplets, ds


def separate_loss(trainer, model, inputs: dict):
    """The fused ``compute_loss`` (no ``num_items_in_batch``) with three forwards, one per view."""
    from staged_alignment.trainers.causal_losses import contrastive_loss, lm_token_nll, pool_hidden_states

    B = inputs["input_ids"].shape[0] // 3
    emb = trainer._output_embeddings(model)
    zs, lm_sum, n_lm = [], 0.0, 0
    for v in range(3):
        rows = slice(v * B, (v + 1) * B)
        mask = inputs["attention_mask"][rows]
        L = int(mask.sum(1).max())  # right padding: trim the columns no row of this view uses
        ids, mask = inputs["input_ids"][rows, :L], mask[:, :L]
        labels, pool = inputs["labels"][rows, :L], inputs["pool_mask"][rows, :L]
        out = model(input_ids=ids, attention_mask=mask, position_ids=inputs["position_ids"][rows, :L],
                    output_hidden_states=True, use_cache=False, logits_to_keep=1)
        targets = labels[:, 1:]
        valid = targets != -100
        if trainer.views[v] in trainer.lm_views:
            h = out.hidden_states[-1][:, :-1][valid]
            nll = lm_token_nll(emb(h).unsqueeze(0), targets[valid].unsqueeze(0))
            lm_sum = lm_sum + trainer.weights[trainer.views[v]] * nll.sum()
            n_lm += nll.numel()
        zs.append(trainer.projection_head(pool_hidden_states(out.hidden_states[trainer.pool_layer], pool)))
    at = {v: k for k, v in enumerate(trainer.views)}
    con = contrastive_loss(zs[at["benign"]], zs[at["counterfactual"]], zs[at["injected"]], **trainer.loss_cfg)
    return lm_sum / max(n_lm, 1) + con.loss


def bench_fused(trainer, batches: list[dict], reps: int) -> dict:
    model = trainer.model
    model.train()
    losses = {"fused": [], "separate": []}

    def step(name, fn, batch):
        def run():
            t0 = time.perf_counter()
            loss = fn(batch)
            loss.backward()
            dt = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            losses[name].append(float(loss.detach()))
            return dt
        return run

    fused_t, sep_t = [], []
    for i, batch in enumerate(batches):
        res = interleave({"fused": step("fused", lambda b: trainer.compute_loss(model, b), batch),
                          "separate": step("separate", lambda b: separate_loss(trainer, model, b), batch)},
                         reps=reps, warmup=1 if i == 0 else 0)
        fused_t += res["fused"]
        sep_t += res["separate"]
    ratios = [s / f for s, f in zip(sep_t, fused_t)]
    diff = max(abs(a - b) for a, b in zip(losses["fused"], losses["separate"]))
    padded_fused = sum(b["input_ids"].numel() for b in batches)
    padded_sep = sum(int(b["attention_mask"][v * (len(b["input_ids"]) // 3):(v + 1) * (len(b["input_ids"]) // 3)]
                         .sum(1).max()) * (len(b["input_ids"]) // 3) for b in batches for v in range(3))
    return {"fused_fwd_bwd_s": round(median(fused_t), 4), "separate_fwd_bwd_s": round(median(sep_t), 4),
            "separate_over_fused": round(median(ratios), 3), "fused_paired_ratios": [round(r, 3) for r in ratios],
            "fused_vs_separate_max_abs_loss_diff": float(f"{diff:.2e}"),
            "fused_padded_tokens": padded_fused, "separate_padded_tokens": padded_sep,
            "separate_over_fused_per_padded_token": round(median(ratios) * padded_fused / padded_sep, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per training run (the first is dropped)")
    ap.add_argument("--reps", type=int, default=2, help="interleaved runs (and fused/separate rounds) per side")
    ap.add_argument("--batches", type=int, default=2, help="batches for the fused vs separate comparison")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 rep, 1 batch")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.reps, a.batches = 3, 1, 1
    setup(a.threads)

    from datasets import Dataset
    from peft import get_peft_model
    from transformers import TrainingArguments
    from trl import SFTConfig

    from staged_alignment.core.callbacks import LossGuardCallback, SigtermCheckpointCallback
    from staged_alignment.core.common import build_training_args, seed_everything, standard_callbacks
    from staged_alignment.core.models import load_model, load_tokenizer, lora_config
    from staged_alignment.data_builders.token_cache import TripletCollator
    from staged_alignment.data_builders.triplets import triplet_messages
    from staged_alignment.stages.stage0_sft import sft_defaults
    from staged_alignment.stages.stage2_causal import causal_defaults, loss_and_head_kwargs
    from staged_alignment.trainers.causal import CausalContrastiveTrainer
    from staged_alignment.trainers.causal_losses import build_projection_head
    from staged_alignment.trainers.sft import ZephyrSFTTrainer

    figures = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # random order on both sides: step k of both trainers sees the same triplets (length grouping would sort
        # them by different lengths); bench_length_grouping.py measures grouping
        common = ["save_strategy='no'", "disable_tqdm=true", "logging_steps=1", "train_sampling_strategy=random"]
        # the seed's three-view objective (benign LM + v1 contrast): what "fused vs separate" measures
        cfg = smoke_config(tmp, [f"causal.training.{x}" for x in common + [f"max_steps={a.steps}"]] +
                           [f"sft.training.{x}" for x in common + [f"max_steps={a.steps}"]] +
                           ["causal.loss.contrastive=v1", "causal.loss.lambda_lm_injected=0.0"])
        path = smollm2_path()
        tok = load_tokenizer(path, cfg.model)
        B = cfg.causal.training["per_device_train_batch_size"]
        assert cfg.sft.training["per_device_train_batch_size"] == B
        triplets, ds = build_data(tmp, tok, cfg.model.max_seq_length, n=48)
        ds = ds.remove_columns(["fits"])
        by_id = {t["id"]: t for t in triplets}

        # --- the causal trainer, built as stages/stage2_causal.py builds it
        seed_everything(cfg.seed)
        head_cfg = cfg.causal.head
        c_args = build_training_args(TrainingArguments, cfg, "causal", tmp / "causal", **causal_defaults(cfg))
        peft_model = get_peft_model(load_model(path, cfg.model, device="cpu"), lora_config(cfg.lora))
        hidden = peft_model.get_base_model().config.get_text_config().hidden_size
        head = build_projection_head(head_cfg.type, hidden, head_cfg.dim, head_cfg.hidden, seed=cfg.seed)
        kw = loss_and_head_kwargs(cfg)
        c_coll = RecordingCollator(TripletCollator(tok.pad_token_id, padding_side=cfg.causal.padding_side,
                                                   views=kw["views"], lm_views=kw["lm_views"]))
        c_timer = step_timer()
        causal = CausalContrastiveTrainer(
            model=peft_model, args=c_args, train_dataset=ds, data_collator=c_coll, processing_class=tok,
            callbacks=[LossGuardCallback(explode_factor=None), SigtermCheckpointCallback(), c_timer],
            projection_head=head, **kw)

        # --- 1. fused vs separate forwards on fixed batches
        inner = TripletCollator(tok.pad_token_id, padding_side="right", views=kw["views"], lm_views=kw["lm_views"])
        batches = [inner([ds[i] for i in range(k * B, (k + 1) * B)]) for k in range(a.batches)]
        figures.update(bench_fused(causal, batches, a.reps))

        # --- 2. causal step vs SFT step (the benign view of the same triplets as SFT conversations)
        sft_rows = []
        for row in ds:
            t = by_id[row["id"]]
            sft_rows.append({"messages": triplet_messages(t, "benign") + [{"role": "assistant",
                                                                            "content": t["response"]}]})
        seed_everything(cfg.seed)
        s_args = build_training_args(SFTConfig, cfg, "sft", tmp / "sft", **sft_defaults(cfg))
        s_timer = step_timer()
        sft = ZephyrSFTTrainer(model=load_model(path, cfg.model, device="cpu"), args=s_args,
                               train_dataset=Dataset.from_list(sft_rows), processing_class=tok,
                               peft_config=lora_config(cfg.lora), callbacks=standard_callbacks(cfg) + [s_timer])
        s_coll = RecordingCollator(sft.data_collator)
        sft.data_collator = s_coll
        # the benign SFT sequences hold the causal benign rows' tokens (+1: the template's newline after eos)
        s_len = sum(len(x) for x in sft.train_dataset["input_ids"][:]) / len(sft.train_dataset)
        c_len = sum(len(x) for x in ds["benign_input_ids"][:]) / len(ds)

        c_runs, s_runs = [], []

        def run(trainer, timer, coll, sink):
            def go():
                timer.durations, coll.shapes = [], []
                trainer.train()
                sink.append((list(timer.durations), list(coll.shapes)))
            return go

        # no warm-up runs: the model is warm from part 1 and the first step of every run is dropped anyway
        interleave({"causal": run(causal, c_timer, c_coll, c_runs), "sft": run(sft, s_timer, s_coll, s_runs)},
                   reps=a.reps, warmup=0)
        c_steps = [x for durs, _ in c_runs for x in durs[1:]]
        s_steps = [x for durs, _ in s_runs for x in durs[1:]]
        ratios = [c / s for (cd, _), (sd, _) in zip(c_runs, s_runs) for c, s in zip(cd[1:], sd[1:])]
        # batches built per run: the dataloader may prefetch; count the first `steps` batches of each run
        c_pad = [r * L for _, shapes in c_runs for (r, L, _) in shapes[1:a.steps]]
        s_pad = [r * L for _, shapes in s_runs for (r, L, _) in shapes[1:a.steps]]
        c_real = [x for _, shapes in c_runs for (_, _, x) in shapes[1:a.steps]]
        s_real = [x for _, shapes in s_runs for (_, _, x) in shapes[1:a.steps]]
        step_ratio = median(ratios)
        pad_ratio = sum(c_pad) / max(sum(s_pad), 1)
        figures.update({
            "causal_step_s": round(median(c_steps), 4), "sft_step_s": round(median(s_steps), 4),
            "causal_over_sft_step": round(step_ratio, 3), "step_paired_ratios": [round(r, 3) for r in ratios],
            "causal_padded_tokens_per_step": round(sum(c_pad) / max(len(c_pad), 1), 1),
            "sft_padded_tokens_per_step": round(sum(s_pad) / max(len(s_pad), 1), 1),
            "causal_real_tokens_per_step": round(sum(c_real) / max(len(c_real), 1), 1),
            "sft_real_tokens_per_step": round(sum(s_real) / max(len(s_real), 1), 1),
            "padded_token_ratio": round(pad_ratio, 3),
            "per_padded_token_ratio": round(step_ratio / pad_ratio, 3),
            "sft_minus_benign_tokens_per_seq": round(s_len - c_len, 2),
            "triplets": len(ds), "batch_triplets": B, "steps": a.steps, "reps": a.reps,
        })
    report("causal_step", figures, headline="causal step / SFT step time (B triplets vs B sequences)",
           value=figures["causal_over_sft_step"], goal=f"~{IDEAL} (ideal)",
           met=figures["causal_over_sft_step"] <= IDEAL * 1.1,
           notes=f"SmolLM2-135M LoRA r=8, B={B}, max_length {cfg.model.max_seq_length}, fp32 CPU, {a.threads} "
                 "thread(s); fused vs separate: forward+backward of the same loss on the same batches "
                 "(separate/fused > 1 means the fused forward is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
