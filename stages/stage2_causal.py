"""Stage 2: the causal stage on prompt-injection triplets.

Recipe: parse config → validate task and attack files and their disjointness from the evaluation set (attacks:
shared word 6-grams; task data: shared 8-grams; no model yet) → base = ``dpo/merged`` (or ``sft/merged`` with
``causal.base: sft``) → build ``data/triplets.jsonl`` (canary attacks get training canaries, a share of controls)
→ fill missing targets and hijacked responses with the base model's greedy answers (cached in
``data/causal_generations.jsonl``, resumable) → with ``causal.adversarial.attacks``, adversarial injections for a
share of the canary triplets (suffixes searched against the base model, cached in
``data/adversarial_suffixes.jsonl``, resumable) → tokenize once (cached under ``data/cache/``) → LoRA on the merged
base (+ projection head when a contrastive term is on) → train (:class:`trainers.causal.CausalContrastiveTrainer`)
→ save ``causal/adapter`` (+ ``causal_projection.safetensors``) → merge into ``causal/merged`` (in the training
precision) → ``causal/log_history.json`` and ``causal/curves.png``.

    accelerate launch --config_file accelerate_config.yaml stages/stage2_causal.py --config C [key=value …]

Several processes: only the main process writes ``data/triplets.jsonl`` (and generates model paraphrases); the
others wait at a barrier and read it; the main process tokenizes it into the cache first and the others then load
that cache (``main_process_first``). Every process trains and evaluates (the Trainer shards the data); the log
history, curves, adapter, head, merge and Hub push are the main process's; the others end after training.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, "") and (Path(__file__).resolve().parents[1] / "staged_alignment").is_dir():  # a checkout, run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (an installed wheel needs nothing)

import dataclasses
import random

from staged_alignment.core.causal_objective import (
    HEAD_PREFIX,
    needed_views,
)
from staged_alignment.core.common import (
    build_training_args,
    log,
    maybe_push,
    process_state,
    report_to_env,
    run_stage_main,
    seed_everything,
    train_save_merge,
)
from staged_alignment.core.config import (
    PipelineConfig,
    resolve_input,
)
from staged_alignment.core.jsonl_io import (
    DataError,
    atomic_write_json,
    write_jsonl_atomic,
)
from staged_alignment.core.start_model import start_dir
from staged_alignment.data_builders.causal_targets import (
    fill_generated,
    pending,
    self_replay_pairs,
)
from staged_alignment.data_builders.critique_rewrite import read_pairs
from staged_alignment.data_builders.triplets import (  # noqa: E402
    AttackSet,
    Task,
    build_triplets,
    check_attack_overlap,
    check_task_overlap,
    model_counterfactuals,
    read_attacks,
    read_task_source,
    read_triplets,
    task_group,
    write_triplets,
)
from staged_alignment.evaluation.adaptive import adversarial_triplets
from staged_alignment.evaluation.cases import load_cases
from staged_alignment.evaluation.runner import model_fingerprint
from staged_alignment.evaluation.safety import dpo_prompts
from staged_alignment.evaluation.template_attacks import role_segments

STAGE = "causal"
MAIN_PROCESS_ONLY = False
CURVE_KEYS = ("loss", "loss_lm", "loss_lm_injected", "loss_lm_counterfactual", "loss_kl", "loss_pref",
              "loss_contrastive", "margin_injected", "loss_retain_sft", "loss_retain_dpo", "retain_margin",
              "head_cos_benign_counterfactual", "head_cos_benign_injected",
              "head_causal_discrimination", "pooled_cos_benign_counterfactual", "pooled_cos_benign_injected",
              "pooled_causal_discrimination")


def base_model_dir(cfg: PipelineConfig) -> Path:
    """``causal.base_model`` when set (as given: a folder, Hub id or adapter; :func:`start_model_dir` resolves it),
    else ``run_dir/dpo/merged`` or ``run_dir/sft/merged`` (``causal.base``)."""
    if cfg.causal.base_model:
        return Path(cfg.causal.base_model)
    return cfg.run_dir / cfg.causal.base / "merged"


def check_upstream(cfg: PipelineConfig) -> None:
    """Without ``causal.base_model``, ``<run_dir>/<causal.base>/merged`` must be complete: else :class:`ConfigError`
    naming ``causal.base`` (called by the stage's entry point after validation)."""
    from staged_alignment.core.models import is_complete_model_dir

    c = cfg.causal
    base = cfg.run_dir / c.base / "merged"
    if not c.base_model and not is_complete_model_dir(base):
        other = "sft" if c.base == "dpo" else "dpo"
        hint = f", or causal.base: {other} ({cfg.run_dir / other / 'merged'} exists)" if is_complete_model_dir(
            cfg.run_dir / other / "merged") else ""
        raise cfg.error("causal.base", f"{c.base!r}, but {base} is missing or incomplete: run stage '{c.base}' "
                        f"first, or set causal.base_model to a model folder, a Hub id or a LoRA adapter{hint}")


def start_model_dir(cfg: PipelineConfig, state) -> Path:
    """The model the causal stage trains on (``causal.base_model`` resolved by
    :func:`core.start_model.materialize`, an adapter merged into ``causal/start_model`` by the main process
    first; else ``<run_dir>/<causal.base>/merged``)."""
    return start_dir(cfg.causal.base_model, base_model_dir(cfg), cfg.run_dir / STAGE / "start_model", state,
                     cfg.model)


def input_paths(cfg: PipelineConfig) -> dict[str, str]:
    c = cfg.causal
    paths = {f"tasks{i}": s["path"] for i, s in enumerate(c.tasks)}
    paths.update({f"train_attacks{i}": s["path"] for i, s in enumerate(c.train_attacks)})
    paths.update({f"eval_attacks{i}": s["path"] for i, s in enumerate(c.eval_attacks)})
    if c.triplets_file:
        paths["triplets_file"] = c.triplets_file
    paths["base"] = str(base_model_dir(cfg))
    return paths


def resume_state(cfg: PipelineConfig) -> list:
    """What an interrupted run resumes from (triplets are rebuilt deterministically each run; the token cache is
    fingerprinted, so neither needs clearing)."""
    return [cfg.run_dir / "causal" / "checkpoints"]


def _src(s) -> dict:
    return {"path": s} if isinstance(s, str) else s


def eval_attack_sets(cfg: PipelineConfig) -> list:
    """The evaluation attack files: ``causal.eval_attacks`` plus ``evaluate.eval_file`` when it exists (its
    ``injection`` texts must not be trained on either)."""

    sets = [read_attacks(s["path"], s.get("format", "auto"), s.get("max_rows")) for s in map(_src, cfg.causal.eval_attacks)]
    ef = resolve_input(cfg.evaluate.eval_file) if cfg.evaluate.eval_file else None
    if ef is not None and ef.is_file() and ef.name.endswith((".jsonl", ".jsonl.gz")) and \
            all(Path(s.path).resolve() != ef.resolve() for s in sets):
        sets.append(read_attacks(str(ef), "auto"))
    return sets


def eval_cases_for_overlap(cfg: PipelineConfig) -> list[dict]:
    """The evaluation cases whose data the training tasks must not share (``evaluate.eval_file`` when it is an
    injection eval JSONL that exists), else []."""
    if not cfg.evaluate.eval_file:
        return []
    ef = resolve_input(cfg.evaluate.eval_file)
    if not (ef.is_file() and ef.name.endswith((".jsonl", ".jsonl.gz"))):
        return []

    return load_cases(ef)


@dataclasses.dataclass
class CausalPlan:
    """What :func:`validate` parsed: ``tasks`` and ``train_attacks`` (empty with a ``triplets_file``),
    ``eval_attacks`` (kept disjoint from the training attacks), ``triplets`` (the rows of ``causal.triplets_file``,
    else None), and the retention inputs: ``retain_prompts`` (``retain_source: self``: the DPO stage's training
    prompts) or ``retain_pairs`` (a pairs file that exists now), else None."""

    tasks: list = dataclasses.field(default_factory=list)
    train_attacks: list = dataclasses.field(default_factory=list)
    eval_attacks: list = dataclasses.field(default_factory=list)
    triplets: list[dict] | None = None
    retain_prompts: list[dict] | None = None
    retain_pairs: list[dict] | None = None


def validate(cfg: PipelineConfig) -> CausalPlan:
    """Parse task files, attack files (train/eval disjointness of attacks and of task data), an existing
    ``triplets_file`` and the training args; raises DataError/ConfigError before any model is loaded."""
    c = cfg.causal
    out = CausalPlan(eval_attacks=eval_attack_sets(cfg))
    eval_cases = eval_cases_for_overlap(cfg)
    if c.triplets_file:
        out.triplets = read_triplets(c.triplets_file)
    else:
        if not c.tasks:
            raise cfg.error("causal.tasks", "no task files configured (and no causal.triplets_file)")
        if not c.train_attacks:
            raise cfg.error("causal.train_attacks", "no training attack files configured")
        for s in map(_src, c.tasks):
            out.tasks += read_task_source(s)
        out.train_attacks = [read_attacks(s["path"], s.get("format", "auto"), s.get("max_rows"))
                                for s in map(_src, c.train_attacks)]
        check_attack_overlap(out.train_attacks, out.eval_attacks)
        check_task_overlap(out.tasks, eval_cases, cfg.evaluate.eval_file)
    if out.triplets is not None:
        if out.eval_attacks:
            used = AttackSet(path=str(c.triplets_file), kind="text",
                             items=[(t["attack_category"], t["injection"]) for t in out.triplets])
            check_attack_overlap([used], out.eval_attacks)
        check_task_overlap([Task(id=t["id"], instruction=t["instruction"], data=t["data"], response=t["response"])
                            for t in out.triplets], eval_cases, cfg.evaluate.eval_file)
    if retention_on(cfg) and cfg.causal.retain_source == "self":
        out.retain_prompts = self_replay_prompts(cfg)
    elif retention_on(cfg) and (cfg.causal.retain_pairs_file or retain_pairs_path(cfg).is_file()):
        out.retain_pairs = read_retain_pairs(cfg)  # (the default file may not exist before the DPO stage runs)
    causal_training_args(cfg, cfg.run_dir / "causal" / "checkpoints")
    return out


def causal_training_args(cfg: PipelineConfig, output_dir):
    """The stage's :class:`trainers.causal.CausalConfig`: ``causal.training`` (TrainingArguments' keys) over the
    stage defaults (:func:`causal_defaults`), with the objective and head from ``causal.loss``/``causal.head`` and
    the batch settings from ``causal``. Raises ``ConfigError``."""
    from staged_alignment.trainers.causal import CausalConfig

    loss = cfg.causal.loss
    head = cfg.causal.head
    objective = {**dataclasses.asdict(loss), **{HEAD_PREFIX + k: v for k, v in dataclasses.asdict(head).items()},
                 "max_length": cfg.causal.max_length or cfg.model.max_seq_length,
                 "padding_side": cfg.causal.padding_side, "data_role": cfg.model.data_role}
    for key in cfg.causal.training:
        if key in objective:
            where = ("causal.loss" if key in dataclasses.asdict(loss) else "causal.head" if key.startswith(HEAD_PREFIX)
                     else "causal" if key != "data_role" else "model")
            raise cfg.error(f"causal.training.{key}", f"is set in {where} (causal.training holds TrainingArguments' "
                                                      "own keys)")
    return build_training_args(CausalConfig, cfg, "causal", output_dir, **{**causal_defaults(cfg), **objective})


def loss_and_head_kwargs(cfg: PipelineConfig) -> dict:
    """The :class:`CausalContrastiveTrainer` keyword arguments that come from ``causal.loss`` and ``causal.head``:
    the term weights, the contrastive version and its settings, the pooling layer, the head learning rate, and the
    batch layout (``views``/``lm_views`` of :func:`core.causal_objective.needed_views`)."""
    loss = cfg.causal.loss
    head_cfg = cfg.causal.head
    kw = dict(lambda_task=loss.lambda_task, lambda_lm_injected=loss.lambda_lm_injected,
              lambda_lm_counterfactual=loss.lambda_lm_counterfactual, lambda_kl=loss.lambda_kl,
              lambda_pref=loss.lambda_pref, pref_beta=loss.pref_beta, contrastive=loss.contrastive,
              lambda_contrastive=loss.lambda_contrastive, contrastive_counterfactual=loss.contrastive_counterfactual,
              variant=loss.variant, temperature=loss.temperature, lambda_causal=loss.lambda_causal,
              lambda_spurious=loss.lambda_spurious, margin_floor=loss.margin_floor,
              in_batch_negatives=loss.in_batch_negatives, pool_layer=head_cfg.pool_layer,
              head_learning_rate=head_cfg.learning_rate, lambda_retain_sft=loss.lambda_retain_sft,
              lambda_retain_dpo=loss.lambda_retain_dpo, retain_beta=loss.retain_beta)
    views, lm_views = needed_views(**kw)
    return {**kw, "views": views, "lm_views": lm_views}


def retention_on(cfg: PipelineConfig) -> bool:
    loss = cfg.causal.loss
    return loss.lambda_retain_sft > 0 or loss.lambda_retain_dpo > 0


def retain_pairs_path(cfg: PipelineConfig) -> Path:
    """``retain_source: self``: ``<run_dir>/data/retain_self.jsonl`` (written by this stage); else
    ``causal.retain_pairs_file``, else the DPO stage's ``<run_dir>/data/pairs.jsonl``."""
    if cfg.causal.retain_source == "self":
        return cfg.run_dir / "data" / "retain_self.jsonl"
    return resolve_input(cfg.causal.retain_pairs_file) if cfg.causal.retain_pairs_file else \
        cfg.run_dir / "data" / "pairs.jsonl"


def self_replay_prompts(cfg: PipelineConfig) -> list[dict]:
    """``retain_source: self``: the DPO stage's training prompts (its pool without the held-out slice and without
    the safety measure's prompts), the first ``causal.retain_max_pairs``. Raises what the DPO stage's validation
    raises."""
    prompts = dpo_prompts(cfg)[0]
    if not prompts:
        raise cfg.error("causal.retain_source", "'self' replays the DPO stage's prompts, but it has none (dpo.prompts)")
    return prompts[:cfg.causal.retain_max_pairs] if cfg.causal.retain_max_pairs else prompts


def read_retain_pairs(cfg: PipelineConfig) -> list[dict]:
    """The preference pairs the retention terms replay (at most ``causal.retain_max_pairs``). Raises
    :class:`ConfigError` naming ``causal.retain_pairs_file`` when the file is missing (e.g. no DPO run yet) and
    :class:`DataError` (file, line, field) for a bad row."""
    path = retain_pairs_path(cfg)
    if not path.is_file():
        raise cfg.error("causal.retain_pairs_file", f"the retention terms replay preference pairs, but {path} does "
                                                    "not exist: run the DPO stage first, or point "
                                                    "causal.retain_pairs_file at a pairs JSONL")
    pairs = read_pairs(path, provenance=False)
    if not pairs:
        raise cfg.error("causal.retain_pairs_file", f"{path} holds no pair to replay")
    return pairs[:cfg.causal.retain_max_pairs] if cfg.causal.retain_max_pairs else pairs


def causal_defaults(cfg: PipelineConfig) -> dict:
    """Causal-stage TrainingArguments defaults (a user's ``causal.training`` keys override them).

    ``train_sampling_strategy: group_by_length`` batches triplets of similar ``length`` (the longest view, a
    column of the token cache) to cut padding (``bench/bench_length_grouping.py``); ``random`` turns it off.
    """
    return dict(remove_unused_columns=False, label_names=["labels"], prediction_loss_only=True,
                eval_strategy="steps" if cfg.causal.eval_fraction > 0 else "no",
                train_sampling_strategy="group_by_length")


def template_segments(tokenizer) -> tuple[str, str] | None:
    """The run's chat-template strings around an assistant turn (``(close_user, close_answer)``,
    :func:`evaluation.template_attacks.role_segments`) for the template-completion training attacks; None without a
    tokenizer (the attack file's Zephyr default is used)."""
    if tokenizer is None:
        return None

    return role_segments(tokenizer)


def build_triplet_file(cfg: PipelineConfig, parsed: dict, model=None, tokenizer=None,
                       model_fingerprint: str | None = None) -> tuple[Path, dict]:
    """Write ``data/triplets.jsonl`` (atomically) from the parsed inputs, with every target and hijacked response
    filled (model-made ones generated with ``model`` when given, cached in ``data/causal_generations.jsonl``);
    returns (path, stats). Without a model, triplets that still need one raise :class:`DataError`."""
    c = cfg.causal
    path = cfg.run_dir / "data" / "triplets.jsonl"
    if parsed.triplets is not None:
        rows, stats = list(parsed.triplets), {"triplets": len(parsed.triplets), "source": str(c.triplets_file)}
    else:
        cfs, cf_stats = None, None
        if c.counterfactual == "model":
            # paraphrase only the tasks that will be used (same shuffle/cap as build_triplets)
            probe = build_triplets(parsed.tasks, parsed.train_attacks, seed=cfg.seed, max_triplets=c.max_triplets,
                                   positions=c.positions, max_data_chars=c.max_data_chars,
                                   max_response_chars=c.max_response_chars, triplets_per_task=c.triplets_per_task)
            used = {t["id"] for t in probe.triplets}
            tasks = [t for t in parsed.tasks if t.id in used]
            cfs, cf_stats = model_counterfactuals(model, tokenizer, tasks, batch_size=c.counterfactual_batch_size,
                                                  max_new_tokens=c.counterfactual_max_new_tokens, progress=True)
        res = build_triplets(parsed.tasks, parsed.train_attacks, seed=cfg.seed, max_triplets=c.max_triplets,
                             positions=c.positions, max_data_chars=c.max_data_chars,
                             max_response_chars=c.max_response_chars,
                             eval_attacks=parsed.eval_attacks, counterfactuals=cfs,
                             triplets_per_task=c.triplets_per_task, control_fraction=c.control_fraction,
                             template_segments=template_segments(tokenizer), canary_style=c.canary_style)
        rows, stats = res.triplets, dict(res.stats)
        if cf_stats:
            stats["model_paraphrases"] = cf_stats
    todo = pending(rows)
    if todo["target"] or todo["hijack"]:
        if model is None:
            raise DataError(path, None, "target", f"{todo} triplets need the starting model's answers; no model given")
        rows, gen_stats = fill_generated(rows, model, tokenizer, cfg.run_dir / "data" / "causal_generations.jsonl",
                                         fingerprint=model_fingerprint or "unknown",
                                         max_new_tokens=c.generation_max_new_tokens,
                                         batch_size=c.generation_batch_size, data_role=cfg.model.data_role,
                                         progress=True)
        stats["generated"] = {**gen_stats, **{f"needed_{k}": v for k, v in todo.items()}}
    if c.adversarial.attacks:
        rows, stats["adversarial"] = adversarial_triplets(
            rows, c.adversarial, cfg.evaluate.adaptive, seed=cfg.seed, model=model, tokenizer=tokenizer,
            cache_path=cfg.run_dir / "data" / "adversarial_suffixes.jsonl",
            fingerprint=model_fingerprint or "unknown", data_role=cfg.model.data_role, progress=True)
        log.info("adversarial training examples: %s", stats["adversarial"])
    stats["triplets"] = len(rows)
    write_triplets(path, rows)
    return path, stats


def split_by_task(ds, eval_fraction: float, seed: int):
    """(train, eval or None): a seeded split of whole tasks (all triplets of a task on one side), the eval side
    holding about ``eval_fraction`` of the tasks (at least one)."""

    if eval_fraction <= 0:
        return ds.shuffle(seed=seed, keep_in_memory=True), None
    groups = sorted({task_group(i) for i in ds["id"]})
    random.Random(seed).shuffle(groups)
    n_eval = max(1, int(round(len(groups) * eval_fraction)))
    held = set(groups[:n_eval])
    ids = ds["id"]
    ev = [i for i, x in enumerate(ids) if task_group(x) in held]
    tr = [i for i, x in enumerate(ids) if task_group(x) not in held]
    train = ds.select(tr, keep_in_memory=True).shuffle(seed=seed, keep_in_memory=True)
    return train, ds.select(ev, keep_in_memory=True)


def plot_curves(log_history: list[dict], out_png: Path) -> Path | None:
    """Loss components (left) and causal metrics (right) per step, train and eval; matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("loss components", ("loss", "loss_lm", "loss_lm_injected", "loss_lm_counterfactual", "loss_kl",
                                   "loss_pref", "loss_contrastive")),
              ("margin and representation metrics", ("margin_injected", "head_cos_benign_counterfactual",
                                                     "head_cos_benign_injected", "head_causal_discrimination",
                                                     "pooled_cos_benign_injected", "pooled_causal_discrimination")))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            for prefix, style in (("", "-"), ("eval_", "--")):
                x, y = series(prefix + key)
                if x:
                    ax.plot(x, y, style, marker="." if prefix else None, label=prefix + key)
        ax.set_title(title)
        ax.set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name("." + out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def first_last(log_history: list[dict]) -> dict:
    """``{key: [first, last]}`` of each logged training metric (and ``eval_`` metric)."""
    out = {}
    for key in CURVE_KEYS + tuple("eval_" + k for k in CURVE_KEYS):
        vals = [h[key] for h in log_history if key in h]
        if vals:
            out[key] = [vals[0], vals[-1]]
    return out


def run(cfg: PipelineConfig, plan: CausalPlan | None = None) -> dict:
    """Build triplets, train, save adapter + head, merge from ``plan`` (:func:`validate`'s; validated, and the
    upstream checked, here when None); returns ``{"outputs": …, "metrics": …}``."""
    import torch

    from staged_alignment.core.callbacks import LossGuardCallback, SigtermCheckpointCallback
    from staged_alignment.core.models import attach_lora, load_model, load_tokenizer, pick_device
    from staged_alignment.core.sharded import sub_state
    from staged_alignment.data_builders.token_cache import TripletCollator, build_token_cache
    from staged_alignment.trainers.causal import (
        HEAD_ATTR,
        HEAD_CONFIG,
        HEAD_WEIGHTS,
        CausalTrainer,
        save_projection_head,
    )
    from staged_alignment.trainers.causal_losses import build_projection_head

    if plan is None:
        plan = validate(cfg)
        check_upstream(cfg)
    parsed = plan
    c = cfg.causal
    seed_everything(cfg.seed)
    report_to_env(cfg, STAGE)
    out = cfg.run_dir / STAGE
    loss_cfg = cfg.causal.loss
    head_cfg = cfg.causal.head
    args = causal_training_args(cfg, out / "checkpoints")
    state = process_state(cfg)  # the one TrainingArguments set up; one process: main, barriers are no-ops
    base = start_model_dir(cfg, state)
    device = pick_device(cfg.device)
    tok = load_tokenizer(str(base), cfg.model)
    model = load_model(str(base), cfg.model, device=device)

    # the triplet file has one writer, the main process; the others wait for it and read the same file
    triplets_path, tstats = cfg.run_dir / "data" / "triplets.jsonl", None
    if state.is_main_process:
        gen_model = model.to(device) if device == "cpu" else model
        triplets_path, tstats = build_triplet_file(cfg, parsed, gen_model, tok, model_fingerprint(str(base)))
        if retention_on(cfg) and c.retain_source == "self":  # the starting model's own answers, replayed
            pairs, rstats = self_replay_pairs(parsed.retain_prompts, gen_model, tok,
                                              cfg.run_dir / "data" / "causal_generations.jsonl",
                                              fingerprint=model_fingerprint(str(base)),
                                              max_new_tokens=c.generation_max_new_tokens,
                                              batch_size=c.generation_batch_size)
            write_jsonl_atomic(retain_pairs_path(cfg), pairs)
            log.info("retention (self): %s", rstats)
        del gen_model  # an alias of the model: train_save_merge must be able to free it before the merge
    state.wait_for_everyone()
    max_length = c.max_length or cfg.model.max_seq_length
    with state.main_process_first():  # the main process writes the token cache, the others then load it
        ds, cache = build_token_cache(triplets_path, tok, max_length, cfg.run_dir / "data" / "cache",
                                      data_role=cfg.model.data_role)
    log.info("triplets: %d built, %d fit in %d tokens (cache %s, %s)", cache.n_total, cache.n_kept, max_length,
             cache.cache_file, "hit" if cache.from_cache else "built")
    ds, eval_ds = split_by_task(ds, c.eval_fraction, cfg.seed)
    if eval_ds is not None and len(ds) == 0:
        raise cfg.error("causal.eval_fraction", "leaves no training triplets")
    retain_stats = None
    if retention_on(cfg):
        from staged_alignment.data_builders.token_cache import attach_retention, tokenize_retention_pairs

        pairs = parsed.retain_pairs if c.retain_source == "pairs" and parsed.retain_pairs else \
            read_retain_pairs(cfg)
        rows, too_long = tokenize_retention_pairs(pairs, tok, max_length)
        if not rows:
            raise cfg.error("causal.retain_pairs_file", f"none of the {len(pairs)} pairs fits in {max_length} tokens")
        ds = attach_retention(ds, rows, cfg.seed)
        eval_ds = attach_retention(eval_ds, rows, cfg.seed + 1) if eval_ds is not None else None
        retain_stats = {"file": str(retain_pairs_path(cfg)), "pairs": len(rows), "too_long": too_long}
        log.info("retention: %d pair(s) replayed from %s (%d too long)", len(rows), retain_stats["file"], too_long)

    peft_model, _ = attach_lora(model, cfg, for_trl=False)
    kwargs = loss_and_head_kwargs(cfg)
    hidden_size = peft_model.get_base_model().config.get_text_config().hidden_size
    n_layers = peft_model.get_base_model().config.get_text_config().num_hidden_layers
    if not -(n_layers + 1) <= head_cfg.pool_layer <= n_layers:
        raise cfg.error("causal.head.pool_layer", f"{head_cfg.pool_layer} is outside the model's "
                                                  f"{n_layers + 1} hidden-state layers")
    head = (build_projection_head(head_cfg.type, hidden_size, head_cfg.dim, head_cfg.hidden, seed=cfg.seed)
            if loss_cfg.contrastive != "none" else None)
    collator = TripletCollator(tok.pad_token_id, padding_side=c.padding_side, views=kwargs["views"],
                               lm_views=kwargs["lm_views"])
    log.info("causal objective: views %s, LM on %s, contrastive %s", kwargs["views"], kwargs["lm_views"],
             loss_cfg.contrastive)
    # The loss can be negative (v1: −λ·cos/τ), so the explosion check of LossGuardCallback (relative to the best
    # loss) does not apply; NaN/inf are still caught here and in compute_loss.
    callbacks = [LossGuardCallback(explode_factor=None), SigtermCheckpointCallback()]
    trainer = CausalTrainer(model=peft_model, args=args, train_dataset=ds, eval_dataset=eval_ds,
                            data_collator=collator, processing_class=tok, callbacks=callbacks, projection_head=head)
    before_file = out / "eval_before.json"

    def step0_eval(ckpt):  # held-out metrics before any update (step 0); train() resets the log history
        if not ckpt and eval_ds is not None:
            step0 = trainer.evaluate()  # every process takes part (sharded eval); the main process writes the file
            if state.is_main_process:
                atomic_write_json(before_file, {**step0, "step": 0})

    def head_writer(weights):
        if head is None:
            return {}
        head_extra, head_state = trainer._head_extra(), sub_state(weights, HEAD_ATTR)
        return {HEAD_WEIGHTS: lambda p: save_projection_head(head, p.parent, head_extra, state=head_state)}

    del model, peft_model  # the trainer holds the model; train_save_merge frees it before the merge
    trained = train_save_merge(
        trainer, cfg, state, stage=STAGE, out_dir=out, base=base, tokenizer=tok, before_train=step0_eval,
        history_prefix=lambda: [json.loads(before_file.read_text())] if eval_ds is not None and before_file.exists()
        else [], extra_files=head_writer)
    if trained is None:  # not the main process: log history, curves, saving and merging are the main process's
        return {"outputs": {}, "metrics": {}}
    result, history, adapter_dir = trained.result, trained.log_history, trained.adapter
    png = plot_curves(history, out / "curves.png")

    fl = first_last(history)
    metrics = {"train_loss": round(result.training_loss, 4), "steps": result.global_step,
               "triplets": cache.n_kept, "triplets_too_long": cache.n_too_long, "token_cache_hit": cache.from_cache,
               "triplet_stats": tstats, "first_last": fl, "retention": retain_stats}
    for key in ("loss_lm_injected", "margin_injected", "head_causal_discrimination"):
        if key in fl:
            metrics[f"first_{key}"], metrics[f"last_{key}"] = fl[key]
    head_files = [adapter_dir / HEAD_WEIGHTS, adapter_dir / HEAD_CONFIG] if head is not None else []
    hub = maybe_push(cfg, STAGE, adapter_dir, metrics, extra_files=head_files)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"outputs": {"triplets": str(triplets_path), "adapter": str(adapter_dir), "merged": str(out / "merged"),
                        **({"head": str(adapter_dir / HEAD_WEIGHTS)} if head is not None else {}),
                        "log_history": str(out / "log_history.json"),
                        "curves": str(png), **hub}, "metrics": metrics}


def main(argv=None) -> int:
    return run_stage_main(sys.modules[__name__], "Stage 2: causal contrastive training on injection triplets", argv)


if __name__ == "__main__":
    raise SystemExit(main())
