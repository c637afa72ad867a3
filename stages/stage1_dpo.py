"""Stage 1: constitutional critique-and-rewrite pairs from the merged SFT model, then DPO with LoRA.

Recipe: parse config → validate prompts, constitution, pairs file and DPOConfig (no model yet) → load
``sft/merged`` (16-bit, never 4-bit, for generation) → split off ``dpo.held_out`` prompts (deterministic, by
seeded hash of the id) → generate pairs into ``data/pairs.jsonl`` (append-only, resumable) or reuse
``dpo.pairs_file`` → answer the held-out prompts with the SFT model (before) → DPO with a LoRA adapter on
``sft/merged`` (reference = the same network with the adapter disabled, no second copy) → save ``dpo/adapter`` →
merge into ``dpo/merged`` (16-bit) → answer the held-out prompts with ``dpo/merged`` (after) → judge both with
:mod:`core.judges` → ``dpo/assessment.json``, ``dpo/log_history.json`` → push (if configured).

    accelerate launch --config_file accelerate_config.yaml stages/stage1_dpo.py --config C [key=value …]

Several processes: only the main process generates the pairs and answers the held-out prompts; the others wait at
a barrier, then read the same ``data/pairs.jsonl``, so every process trains on the same pairs (the Trainer shards
them). Saving, merging, the assessment and the Hub push are the main process's; the others end after training.

Config keys (``dpo`` section): ``prompts`` (red-team sources, ``{path, format, max_rows, skip_invalid}``),
``constitution``, ``held_out``, ``max_prompts``, ``pairs_file``, ``min_pairs``, ``assessment_max_new_tokens``,
``generation`` (:class:`core.config.GenerationSection`), ``training`` (``trl.DPOConfig`` keys, e.g. ``beta``,
``loss_type``, ``learning_rate``, ``max_steps``), ``hub_model_id``; plus the shared ``model`` and ``lora``.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from pathlib import Path

if __package__ in (None, "") and (Path(__file__).resolve().parents[1] / "staged_alignment").is_dir():  # a checkout, run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (an installed wheel needs nothing)

import gc

from staged_alignment.core.common import (
    build_training_args,
    maybe_push,
    process_state,
    report_to_env,
    run_stage_main,
    seed_everything,
    standard_callbacks,
    train_save_merge,
)
from staged_alignment.core.config import GenerationSection, PipelineConfig, resolve_input
from staged_alignment.core.jsonl_io import DataError, atomic_write_json
from staged_alignment.core.judges import assess, judge_response
from staged_alignment.core.start_model import start_dir
from staged_alignment.data_builders.constitution import load_constitution
from staged_alignment.data_builders.critique_rewrite import (
    build_backend,
    build_critic,
    default_side_paths,
    generate_pairs,
    read_pairs,
    read_pairs_source,
    summarize_files,
)
from staged_alignment.data_builders.pair_report import pair_filter_settings, write_pairs_report
from staged_alignment.data_builders.sft_data import (
    read_sft_sources,
    replay_rows,
)
from staged_alignment.evaluation.safety import dpo_prompt_sources, dpo_prompts, without_safety_eval

STAGE = "dpo"
MAIN_PROCESS_ONLY = False
log = logging.getLogger("staged_alignment")

# TRL 1.14.2's DPOTrainer loss types (trl/trainer/dpo_trainer.py, _compute_loss)
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCE_LOSS_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}


def input_paths(cfg: PipelineConfig) -> dict[str, str]:
    out = {f"prompts{i}": s["path"] for i, s in enumerate(dpo_prompt_sources(cfg))}
    out["constitution"] = str(resolve_input(cfg.dpo.constitution))
    if cfg.dpo.pairs_file:
        out["pairs_file"] = str(resolve_input(cfg.dpo.pairs_file))
    out["base"] = cfg.dpo.base_model or str(cfg.run_dir / "sft" / "merged")  # a redone SFT stage invalidates this one
    return out


def resume_state(cfg: PipelineConfig) -> list:
    """What an interrupted run resumes from: DPO checkpoints and the append-only generated pairs (with their
    rejected-pairs and stats side files); cleared (pairs kept as ``*.superseded``) when the stage starts fresh."""
    paths = [cfg.run_dir / "dpo" / "checkpoints"]
    if not cfg.dpo.pairs_file:
        pairs = cfg.run_dir / "data" / "pairs.jsonl"
        paths += [pairs, *default_side_paths(pairs)]
    return paths


def dpo_defaults(cfg: PipelineConfig) -> dict:
    """Project defaults for ``trl.DPOConfig`` (the YAML's ``dpo.training`` overrides them)."""
    return dict(max_length=cfg.model.max_seq_length, precompute_ref_log_probs=False, beta=0.1, learning_rate=5e-6,
                use_liger_kernel=cfg.model.use_liger_kernel, dataset_num_proc=None, remove_unused_columns=True)


def _check_dpo_args(cfg: PipelineConfig, args) -> None:
    unknown = [t for t in args.loss_type if t not in TRL_LOSS_TYPES]
    if unknown:
        raise cfg.error("dpo.training.loss_type", f"unknown loss type(s) {unknown}; TRL 1.14 knows {list(TRL_LOSS_TYPES)}")
    if "exo_pair" in args.loss_type and args.label_smoothing == 0.0:
        raise cfg.error("dpo.training.label_smoothing", "the 'exo_pair' loss needs label_smoothing > 0 (EXO paper: 1e-3)")
    if args.f_divergence_type != "reverse_kl" and not set(args.loss_type) <= F_DIVERGENCE_LOSS_TYPES:
        raise cfg.error("dpo.training.f_divergence_type",
                        f"only supported with loss types {sorted(F_DIVERGENCE_LOSS_TYPES)}")
    if args.sync_ref_model:
        raise cfg.error("dpo.training.sync_ref_model", "not supported with a LoRA adapter: the reference is the "
                                                       "adapter-disabled model")


@dataclasses.dataclass
class DPOPlan:
    """What :func:`validate` parsed: ``train`` / ``held_out`` red-team prompts (:func:`evaluation.safety.dpo_prompts`),
    the ``constitution``, ``pairs`` (None unless ``dpo.pairs_file``), the ``gen`` section, the ``trl.DPOConfig``
    ``args`` and ``retain_sft`` (the SFT rows replayed, or None)."""

    train: list[dict]
    held_out: list[dict]
    constitution: typing.Any
    pairs: list[dict] | None
    gen: GenerationSection
    args: typing.Any
    retain_sft: list[dict] | None


def validate(cfg: PipelineConfig) -> DPOPlan:
    """Parse prompts, constitution, pairs file, generation section and DPOConfig; no model is loaded.

    Raises :class:`DataError` (file, line, field) or :class:`ConfigError`.
    """
    from trl import DPOConfig

    d = cfg.dpo
    gen = cfg.dpo.generation
    constitution = load_constitution(resolve_input(d.constitution))
    if not d.prompts and not d.pairs_file:
        raise cfg.error("dpo.prompts", "no red-team prompt sources configured (and no dpo.pairs_file)")
    train, held = dpo_prompts(cfg)
    pairs = None
    if d.pairs_file:
        pf = resolve_input(d.pairs_file)
        pairs = read_pairs_source(str(pf) if pf.exists() else d.pairs_file)  # a file, or a Hub id / dataset
        held_ids = {p["id"] for p in held}
        # an external row's id is "<prompt id>-<hash>": its prompt part is compared too
        leaked = [p["id"] for p in pairs if p["id"] in held_ids or p["id"].rsplit("-", 1)[0] in held_ids]
        if leaked:
            log.warning("dpo.pairs_file: %d pair(s) use held-out prompts and are left out of training: %s",
                        len(leaked), leaked[:5])
            pairs = [p for p in pairs if p["id"] not in leaked]
        pairs = without_safety_eval(cfg, pairs, "dpo.pairs_file")
        if len(pairs) < d.min_pairs:
            raise cfg.error("dpo.pairs_file", f"only {len(pairs)} usable pair(s), dpo.min_pairs is {d.min_pairs}")
    elif len(train) < d.min_pairs:
        raise cfg.error("dpo.prompts", f"only {len(train)} training prompt(s) after the held-out split; "
                                       f"dpo.min_pairs is {d.min_pairs}")
    args = build_training_args(DPOConfig, cfg, "dpo", cfg.run_dir / "dpo" / "checkpoints", **dpo_defaults(cfg))
    _check_dpo_args(cfg, args)
    retain = None
    if d.retain_sft_weight > 0:  # the SFT stage's data, replayed (read and checked now, tokenized in run)
        if not cfg.sft.data:
            raise cfg.error("dpo.retain_sft_weight", "replays the SFT data, but sft.data is empty")
        retain = read_sft_sources(cfg.sft.data)
    return DPOPlan(train=train, held_out=held, constitution=constitution, pairs=pairs, gen=gen, args=args,
                   retain_sft=retain)


def answer_and_judge(model, tok, prompts: list[dict], *, max_new_tokens: int, batch_size: int, label: str) -> dict:
    """Greedy answers to ``prompts`` judged with :func:`core.judges.judge_response`.

    Returns ``{"refusal_rate", "harmful_rate", "n", "responses": [{"id", "prompt", "response", "truncated",
    "refused", "harmful", "reason"}]}``.
    """
    from staged_alignment.data_builders.generation import generate_chat

    convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    outs = generate_chat(model, tok, convs, max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=False,
                         progress=True, desc=f"held-out answers ({label})") if convs else []
    rows = []
    for p, o in zip(prompts, outs):
        rows.append({"id": p["id"], "prompt": p["prompt"], "response": o["text"], "truncated": o["truncated"],
                     **judge_response(p["prompt"], o["text"])})
    rates = assess([{"prompt": r["prompt"], "response": r["response"]} for r in rows])
    return {**rates, "responses": rows}


def check_upstream(cfg: PipelineConfig) -> None:
    """Without ``dpo.base_model``, ``<run_dir>/sft/merged`` must be complete: else :class:`ConfigError` naming
    ``dpo.base_model`` and both ways out (run the SFT stage, or start from an existing model). Called by the stage's
    entry point after validation (not by the pipeline's plan check, which runs before SFT has run)."""
    from staged_alignment.core.models import is_complete_model_dir

    sft_dir = cfg.run_dir / "sft" / "merged"
    if not cfg.dpo.base_model and not is_complete_model_dir(sft_dir):
        raise cfg.error("dpo.base_model", f"not set, and {sft_dir} is missing or incomplete: run the SFT stage first "
                        f"(python stages/stage0_sft.py --config {cfg.source_path or 'C'}), or set dpo.base_model "
                        "to a model folder, a Hub id or a LoRA adapter")


def start_model_dir(cfg: PipelineConfig, state) -> Path:
    """The model DPO generates with and trains on: ``dpo.base_model`` resolved by
    :func:`core.start_model.materialize` (an adapter merged into ``dpo/start_model`` by the main process first),
    else ``<run_dir>/sft/merged``."""
    return start_dir(cfg.dpo.base_model, cfg.run_dir / "sft" / "merged", cfg.run_dir / "dpo" / "start_model", state,
                     cfg.model)


def run(cfg: PipelineConfig, plan: DPOPlan | None = None) -> dict:
    """Generate pairs, train, save, merge, assess from ``plan`` (:func:`validate`'s; validated, and the upstream
    checked, here when None); returns ``{"outputs": {...}, "metrics": {...}}``.

    Starts from ``dpo.base_model`` when set, else ``<run_dir>/sft/merged`` (:func:`check_upstream`). Raises
    :class:`DataError` when fewer than ``dpo.min_pairs`` pairs survive the filters.
    """
    import torch
    from datasets import Dataset

    from staged_alignment.core.callbacks import LossGuardCallback
    from staged_alignment.core.models import attach_lora, load_model, load_tokenizer, pick_device
    from staged_alignment.trainers.dpo import ConstitutionalDPOTrainer

    if plan is None:
        plan = validate(cfg)
        check_upstream(cfg)
    v = plan
    d, gen = cfg.dpo, v.gen
    seed_everything(cfg.seed)
    report_to_env(cfg, STAGE)
    out = cfg.run_dir / "dpo"
    out.mkdir(parents=True, exist_ok=True)
    state = process_state(cfg)  # the one DPOConfig set up in validate; one process: main, barriers are no-ops
    sft_dir = start_model_dir(cfg, state)
    device = pick_device(cfg.device)
    tok = load_tokenizer(str(sft_dir), cfg.model)
    model = None

    def generation_model():
        nonlocal model
        if model is None:
            model = load_model(str(sft_dir), cfg.model, device=device, quantize=False, for_training=False).to(device)
        return model

    # 1. pairs: generated by the main process alone (one writer of the append-only file); the others wait, then
    #    read the same file
    gen_stats = None
    if v.pairs is not None:
        pairs, pairs_path = v.pairs, resolve_input(d.pairs_file)
    else:
        pairs_path = cfg.run_dir / "data" / "pairs.jsonl"
        filters = pair_filter_settings(gen)
        if state.is_main_process:
            gen_seed = gen.seed if gen.seed is not None else cfg.seed
            backend = build_backend(gen, sft_dir, cfg.model, seed=gen_seed, device=device,
                                    model=generation_model() if gen.backend == "transformers" else None,
                                    tokenizer=tok)
            critic = build_critic(gen, cfg.model, seed=gen_seed, device=device)
            gen_stats = generate_pairs(backend, v.train, v.constitution, pairs_path, seed=gen_seed,
                                       num_few_shot=gen.num_few_shot, batch_size=gen.batch_size,
                                       drop_truncated=gen.drop_truncated, min_revision_words=gen.min_revision_words,
                                       progress=gen.progress, provenance={"model": str(sft_dir)},
                                       filters=filters, critic=critic)
            del backend, critic
            gc.collect()
        if state.is_main_process:
            write_pairs_report(pairs_path, v.constitution, out / "pairs_report.md", filters)
        state.wait_for_everyone()
        train_ids = {p["id"] for p in v.train}
        pairs = [p for p in read_pairs(pairs_path) if p["id"] in train_ids] if pairs_path.exists() else []
        if len(pairs) < d.min_pairs:
            raise DataError(pairs_path, None, None, f"only {len(pairs)} usable pair(s) after filtering (dpo.min_pairs "
                                                    f"is {d.min_pairs}); see {default_side_paths(pairs_path)[1]}")
    log.info("DPO on %d pairs from %s", len(pairs), pairs_path)

    # 2. held-out answers before DPO (main process)
    amt, bs = d.assessment_max_new_tokens, gen.batch_size
    before = None
    if state.is_main_process:
        before = answer_and_judge(generation_model(), tok, v.held_out, max_new_tokens=amt, batch_size=bs,
                                  label="sft")
    state.wait_for_everyone()

    # 3. DPO with LoRA on sft/merged; the reference is the adapter-disabled model (ref_model=None)
    if cfg.model.quantization == "4bit" and device == "cuda":
        del model
        gc.collect()
        torch.cuda.empty_cache()
        model = load_model(str(sft_dir), cfg.model, device=device, quantize=True, for_training=True)
    else:
        model = generation_model()
    ds = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected", "principle_id")} for p in pairs])
    args = v.args
    callbacks = standard_callbacks(cfg)
    for cb in callbacks:
        if isinstance(cb, LossGuardCallback):
            cb.explode_factor = None  # DPO loss starts at ln 2 and may approach 0: "20x the minimum" is meaningless
    retain = None
    if v.retain_sft:
        retain = replay_rows(v.retain_sft, tok, args.max_length or cfg.model.max_seq_length, d.retain_sft_rows,
                             cfg.seed)
        if not retain:
            raise cfg.error("dpo.retain_sft_weight", f"no SFT row fits in {args.max_length} tokens to replay")
        log.info("DPO retention: λ=%s on %d replayed SFT rows", d.retain_sft_weight, len(retain))
    model, peft_config = attach_lora(model, cfg, for_trl=True)
    trainer = ConstitutionalDPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                                       peft_config=peft_config, callbacks=callbacks, retain_sft=retain,
                                       retain_sft_weight=d.retain_sft_weight if retain else 0.0)
    if trainer.ref_model is not None:  # TRL contract with a peft model: no second copy of the weights
        raise RuntimeError("expected no separate reference model with a LoRA adapter")
    model = None  # the trainer holds it; train_save_merge frees it before the merge
    trained = train_save_merge(trainer, cfg, state, stage=STAGE, out_dir=out, base=sft_dir, tokenizer=tok)
    del trainer
    gc.collect()
    if trained is None:  # not the main process: saving, merging and the assessment are the main process's
        return {"outputs": {}, "metrics": {}}
    result, history = trained.result, trained.log_history

    # 4. held-out answers after DPO, from the merged model
    merged_tok = load_tokenizer(str(out / "merged"), cfg.model)
    merged = load_model(str(out / "merged"), cfg.model, device=device, quantize=False, for_training=False).to(device)
    after = answer_and_judge(merged, merged_tok, v.held_out, max_new_tokens=amt, batch_size=bs, label="dpo")
    del merged
    gc.collect()

    def delta(key):
        a, b = after[key], before[key]
        return None if a is None or b is None else a - b

    assessment = {
        "judge": "core.judges.judge_response (rule-based; see its docstring for what it checks and misses)",
        "decoding": {"do_sample": False, "max_new_tokens": amt},
        "held_out": [{"id": p["id"], "prompt": p["prompt"]} for p in v.held_out],
        "before": {"model": str(sft_dir), **before},
        "after": {"model": str(out / "merged"), **after},
        "delta": {"refusal_rate": delta("refusal_rate"), "harmful_rate": delta("harmful_rate")},
    }
    atomic_write_json(out / "assessment.json", assessment)

    logs = [h for h in history if "rewards/margins" in h]
    files = summarize_files(pairs_path) if v.pairs is None else None
    metrics = {"pairs": len(pairs), "steps": result.global_step, "train_loss": round(result.training_loss, 4),
               "first_margin": logs[0]["rewards/margins"] if logs else None,
               "last_margin": logs[-1]["rewards/margins"] if logs else None,
               "last_reward_accuracy": logs[-1]["rewards/accuracies"] if logs else None,
               "refusal_rate_before": before["refusal_rate"], "refusal_rate_after": after["refusal_rate"],
               "harmful_rate_before": before["harmful_rate"], "harmful_rate_after": after["harmful_rate"],
               "held_out": before["n"]}
    if files:
        metrics["pairs_rejected"] = files["rejected"]
        metrics["pairs_rejected_by_reason"] = files["rejected_by_reason"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    outputs = {"pairs": str(pairs_path), "adapter": str(out / "adapter"), "merged": str(out / "merged"),
               "assessment": str(out / "assessment.json"), "log_history": str(out / "log_history.json")}
    if gen_stats is not None:
        outputs["pairs_stats"] = str(default_side_paths(pairs_path)[1])
    outputs.update(maybe_push(cfg, STAGE, out / "adapter", metrics))
    return {"outputs": outputs, "metrics": metrics}


def main(argv=None) -> int:
    return run_stage_main(sys.modules[__name__], "Stage 1: constitutional critique-and-rewrite pairs, then DPO", argv)


if __name__ == "__main__":
    raise SystemExit(main())
