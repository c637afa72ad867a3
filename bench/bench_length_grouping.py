"""Padding waste: random vs length-grouped batches for the causal and SFT stages.

``bench_causal_step.py`` showed a third of each causal batch is padding (each (3B, L) batch pads to its
longest row). The Trainer's ``train_sampling_strategy: group_by_length`` (transformers 5; the v4
``group_by_length`` flag) puts examples of similar length in one batch: it shuffles, cuts the order into
mega-batches of ``mult × batch`` examples and sorts each by length (``get_length_grouped_indices``), so the data
stays shuffled at the mega-batch level. The causal dataset gives it the ``length`` column (the longest of the
three views, what the collator pads to: ``data_builders/token_cache.py``); TRL's SFT dataset has ``input_ids``.

Both sides run in this process on the same model, data and seed, alternating random / grouped, one full epoch
each (every example seen once, so both sides train the same tokens):

* padded tokens per epoch (from the batches the collator builds) and the padding share;
* epoch wall time, ratio random / grouped (> 1: grouping is faster).

Model and data as in the smoke run: SmolLM2-135M, LoRA r=8 on the seven projections, batch 4, max_length 256,
fp32 CPU; triplets from the seed tasks × seed attacks, SFT rows = the seed conversations.

    python bench/bench_length_grouping.py [--reps 2] [--triplets 48] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_causal_step import RecordingCollator, build_data
from common import interleave, median, report, setup, sft_rows, smoke_config, smollm2_path

STRATEGIES = ("random", "group_by_length")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="epochs per side (alternating)")
    ap.add_argument("--triplets", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 rep, 24 triplets")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.triplets = 1, 24
    setup(a.threads)

    from datasets import Dataset
    from peft import get_peft_model
    from transformers import TrainingArguments
    from trl import SFTConfig

    from staged_alignment.core.common import build_training_args, seed_everything
    from staged_alignment.core.models import load_model, load_tokenizer, lora_config
    from staged_alignment.data_builders.token_cache import TripletCollator
    from staged_alignment.stages.stage0_sft import sft_defaults
    from staged_alignment.stages.stage2_causal import causal_defaults, loss_and_head_kwargs
    from staged_alignment.trainers.causal import CausalContrastiveTrainer
    from staged_alignment.trainers.causal_losses import build_projection_head
    from staged_alignment.trainers.sft import ZephyrSFTTrainer

    figures: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = smollm2_path()
        common = ["save_strategy='no'", "disable_tqdm=true", "logging_steps=100", "num_train_epochs=1",
                  "max_steps=-1"]
        cfgs = {s: smoke_config(tmp / s, [f"{sec}.training.{x}" for sec in ("causal", "sft")
                                          for x in common + [f"train_sampling_strategy={s}"]])
                for s in STRATEGIES}
        cfg = cfgs["random"]
        tok = load_tokenizer(path, cfg.model)
        B = cfg.causal.training["per_device_train_batch_size"]
        _, ds = build_data(tmp, tok, cfg.model.max_seq_length, n=a.triplets)
        ds = ds.remove_columns(["fits"])
        loss_cfg = cfg.causal.loss
        head_cfg = cfg.causal.head
        rows = sft_rows()

        def causal_side(s):
            seed_everything(cfg.seed)
            c = cfgs[s]
            args = build_training_args(TrainingArguments, c, "causal", tmp / s / "causal", **causal_defaults(c))
            model = get_peft_model(load_model(path, c.model, device="cpu"), lora_config(c.lora))
            hidden = model.get_base_model().config.get_text_config().hidden_size
            kw = loss_and_head_kwargs(c)
            coll = RecordingCollator(TripletCollator(tok.pad_token_id, padding_side=c.causal.padding_side,
                                                     views=kw["views"], lm_views=kw["lm_views"]))
            head = (build_projection_head(head_cfg.type, hidden, head_cfg.dim, head_cfg.hidden, seed=c.seed)
                    if loss_cfg.contrastive != "none" else None)
            trainer = CausalContrastiveTrainer(
                model=model, args=args, train_dataset=ds, data_collator=coll, processing_class=tok,
                projection_head=head, **kw)
            return trainer, coll

        def sft_side(s):
            seed_everything(cfg.seed)
            c = cfgs[s]
            args = build_training_args(SFTConfig, c, "sft", tmp / s / "sft", **sft_defaults(c))
            trainer = ZephyrSFTTrainer(model=load_model(path, c.model, device="cpu"), args=args,
                                       train_dataset=Dataset.from_list(rows), processing_class=tok,
                                       peft_config=lora_config(c.lora))
            coll = RecordingCollator(trainer.data_collator)
            trainer.data_collator = coll
            return trainer, coll

        for stage, make in (("causal", causal_side), ("sft", sft_side)):
            built = {s: make(s) for s in STRATEGIES}
            runs: dict[str, list] = {s: [] for s in STRATEGIES}

            def epoch(s):
                def go():
                    trainer, coll = built[s]
                    coll.shapes = []
                    t0 = time.perf_counter()
                    trainer.train()
                    runs[s].append((time.perf_counter() - t0, list(coll.shapes)))
                return go

            # the first epoch of each side warms it up (allocator, kernels) and is dropped
            interleave({s: epoch(s) for s in STRATEGIES}, reps=a.reps, warmup=1)
            for s in STRATEGIES:
                runs[s] = runs[s][1:]
            per = {}
            for s in STRATEGIES:
                shapes = runs[s][-1][1]
                padded = sum(r * L for r, L, _ in shapes)
                real = sum(x for _, _, x in shapes)
                per[s] = {"epoch_s": median([t for t, _ in runs[s]]), "padded": padded, "real": real}
                figures[f"{stage}_{s}_epoch_s"] = round(per[s]["epoch_s"], 2)
                figures[f"{stage}_{s}_padded_tokens"] = padded
                figures[f"{stage}_{s}_padding_share"] = round(1 - real / max(padded, 1), 3)
            assert per["random"]["real"] == per["group_by_length"]["real"], "both sides must train the same tokens"
            figures[f"{stage}_real_tokens"] = per["random"]["real"]
            figures[f"{stage}_padded_token_ratio"] = round(per["random"]["padded"] / per["group_by_length"]["padded"], 3)
            figures[f"{stage}_epoch_speedup"] = round(per["random"]["epoch_s"] / per["group_by_length"]["epoch_s"], 3)
            figures[f"{stage}_examples"] = len(ds) if stage == "causal" else len(rows)
    figures.update({"batch": B, "reps": a.reps})
    report("length_grouping", figures, headline="causal epoch time, random / group_by_length",
           value=figures["causal_epoch_speedup"], goal="> 1 (grouping faster)",
           met=figures["causal_epoch_speedup"] > 1.0,
           notes=f"SmolLM2-135M LoRA r=8, B={B}, fp32 CPU, {a.threads} thread(s); one epoch per side, the same "
                 "examples and tokens, alternating sides, first epoch dropped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
