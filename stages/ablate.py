"""Ablation of the causal stage: from the *same* starting model, triplets, steps and seed, train each objective and
evaluate every arm on the same held-out set.

    python stages/ablate.py --config configs/smollm2-135m_shared-data-pipeline_cpu.yaml [--base PATH] [--arms A1,A3,...]
                            [key=value …]

Arms (``causal.loss`` of each; every arm keeps the benign LM term, λ_task = 1, and the config's other settings):

====  ==========================================================================================================
A0    the starting model, untrained (the reference)
A1    benign LM only (NLL(y|x_b)): what training on the tasks alone does
A2    the seed's v1 stage: benign LM + v1 cosine contrast on prompt-pooled states (τ 0.1, λ 1/1)
A3    A1 + ``lm_injected`` (NLL(y|x_i), StruQ)
A4    A3 + v1
A5    A3 + ``kl_invariance``
A6    A3 + v2 contrastive (response states, hijacked trajectory as the negative)
A7    the best of A3–A6 + the data role (the data part in its own ``<|input|>`` turn, template tokens removed from
      it; used identically at training and evaluation)
A8    A7 + ``pref_injected`` (SecAlign's DPO term on x_i, y ≻ y_a)
A9    A5 (the default objective) + retention: the DPO stage's pairs replayed with ``lambda_retain_sft`` = 1 and
      ``lambda_retain_dpo`` = 1 (``causal.retain_pairs_file``, default ``<run_dir>/data/pairs.jsonl``)
A10   A5 + retention by self-replay: the starting model's own answers to the DPO stage's training prompts,
      ``lambda_retain_sft`` = 1 (``causal.retain_source: self``)
====  ==========================================================================================================

"Best" (for A7): the lowest headline ASR among A3–A6 whose clean utility is within 5 points of A0's, ties broken by
the higher utility under attack; the rule and its outcome are written to ``ablation.json``.

Everything lands under ``runs/<run_name>/ablation/``: the shared ``data/triplets.jsonl`` (targets and hijacked
responses generated once from the starting model), one folder per arm (the causal stage's outputs), ``eval/`` (one
evaluation per arm; answers cached, so a rerun resumes), and ``ablation.json``, ``ablation.md`` and
``ablation.png``. Columns: headline ASR and SecAlign's begins-ASR (Wilson 95 %), clean utility, utility under
attack, over-defence compliance, the teacher-forced margin log p(y|x_i) − log p(y_a|x_i) (mean, with a paired
Wilcoxon signed-rank test against A0, scipy), exact McNemar p-values of ASR and utility under attack against A0 and
against A3 (Holm over the table), the safety measure of :mod:`evaluation.safety` (harmful-refusal and benign
over-refusal rates with the McNemar test of the harmful-refusal flags against A0), and the wall time of each arm.
Finished arms are skipped on a rerun.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, "") and (Path(__file__).resolve().parents[1] / "staged_alignment").is_dir():  # a checkout, run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (an installed wheel needs nothing)

import hashlib
import math
import shutil

import numpy as np

from staged_alignment.core.common import setup_logging
from staged_alignment.core.config import (
    CliParser,
    ConfigError,
    PipelineConfig,
    load_config,
)
from staged_alignment.core.jsonl_io import DataError, atomic_write_json, atomic_write_text
from staged_alignment.core.markdown import md_escape
from staged_alignment.core.run_dir import (
    RunFolderBusy,
    RunLock,
    file_sha256,
)
from staged_alignment.evaluation.metrics import paired_comparisons
from staged_alignment.evaluation.runner import evaluate_models, model_fingerprint, read_eval_cases, task_clusters
from staged_alignment.stages import stage2_causal as s2
from staged_alignment.stages.stage2_causal import retain_pairs_path

log = logging.getLogger("staged_alignment.ablate")

# every arm states every weight, so the arms do not change when the config's defaults do
ARM_BASE = {"lambda_task": 1.0, "lambda_lm_injected": 0.0, "lambda_lm_counterfactual": 0.0, "lambda_kl": 0.0,
            "lambda_pref": 0.0, "contrastive": "none", "lambda_retain_sft": 0.0, "lambda_retain_dpo": 0.0}
A3_LOSS = {**ARM_BASE, "lambda_lm_injected": 1.0}
V1 = {"contrastive": "v1", "variant": "cosine", "temperature": 0.1, "lambda_causal": 1.0, "lambda_spurious": 1.0}
ARMS: dict[str, dict] = {
    "A1": {"loss": dict(ARM_BASE), "label": "benign LM only"},
    "A2": {"loss": {**ARM_BASE, **V1}, "label": "seed v1 stage"},
    "A3": {"loss": dict(A3_LOSS), "label": "lm_injected"},
    "A4": {"loss": {**A3_LOSS, **V1}, "label": "A3 + v1"},
    "A5": {"loss": {**A3_LOSS, "lambda_kl": 1.0}, "label": "A3 + kl_invariance"},
    "A6": {"loss": {**A3_LOSS, "contrastive": "v2", "lambda_contrastive": 1.0, "temperature": 0.1},
           "label": "A3 + v2 contrastive"},
    "A9": {"loss": {**A3_LOSS, "lambda_kl": 1.0, "lambda_retain_sft": 1.0, "lambda_retain_dpo": 1.0,
                    "retain_beta": 0.1},
           "label": "A5 + retention (replayed DPO pairs)"},
    "A10": {"loss": {**A3_LOSS, "lambda_kl": 1.0, "lambda_retain_sft": 1.0},
            "causal": {"retain_source": "self"}, "label": "A5 + retention (self-replay on DPO prompts)"},
}
CANDIDATES = ("A3", "A4", "A5", "A6")
ORDER = ("A0", "A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8", "A9", "A10")
UTILITY_TOLERANCE = 0.05
STATE = "arm_state.json"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def triplet_state(cfg: PipelineConfig, base_fp: str) -> str:
    """What the shared triplet file depends on: the starting model, the seed and the causal data settings."""
    c = dataclasses.asdict(cfg.causal)
    for k in ("loss", "head", "training", "hub_model_id", "enabled", "base", "base_model", "triplets_file",
              "eval_fraction", "padding_side"):
        c.pop(k, None)
    return _sha({"base": base_fp, "seed": cfg.seed, "causal": c, "data_role": cfg.model.data_role,
                 "template": cfg.model.chat_template})


def arm_state(cfg: PipelineConfig, loss: dict, data_role: bool, base_fp: str, triplets: Path,
              causal: dict | None = None) -> str:
    """What an arm's trained model depends on: its loss, the data role, the starting model, the triplets (bytes),
    the training arguments, LoRA, head and seed."""
    retain = None
    if (loss.get("lambda_retain_sft", 0) > 0 or loss.get("lambda_retain_dpo", 0) > 0) and \
            (causal or {}).get("retain_source") == "self":  # made by the arm from the DPO prompts
        retain = ["self", cfg.causal.retain_max_pairs, [dict(s) for s in cfg.dpo.prompts], cfg.dpo.max_prompts, cfg.dpo.held_out,
                  cfg.causal.generation_max_new_tokens]
    elif loss.get("lambda_retain_sft", 0) > 0 or loss.get("lambda_retain_dpo", 0) > 0:
        pairs = retain_pairs_path(cfg)
        retain = [str(pairs), file_sha256(pairs) if pairs.is_file() else None, cfg.causal.retain_max_pairs]
    return _sha({"loss": loss, "data_role": data_role, "base": base_fp, "triplets": file_sha256(triplets),
                 "retain": retain,
                 "training": cfg.causal.training, "lora": dataclasses.asdict(cfg.lora), "head": dataclasses.asdict(cfg.causal.head),
                 "max_length": cfg.causal.max_length, "seed": cfg.seed, "model": cfg.model.name_or_path})


def arm_config(cfg: PipelineConfig, arm: str, loss: dict, data_role: bool, base: str, triplets: Path,
               root: Path, causal: dict | None = None) -> PipelineConfig:
    """The config of one arm: its own run folder under ``root``, the shared base model and triplets, its loss and
    its ``causal`` keys (e.g. ``retain_source``)."""
    c = copy.deepcopy(cfg)
    c.causal.retain_pairs_file = str(retain_pairs_path(cfg))  # the pipeline run's pairs, not the arm folder's
    c.output_dir, c.run_name = str(root), arm
    c.causal.base_model = base
    c.causal.triplets_file = str(triplets)
    c.causal.loss = dict(loss)
    for k, v in (causal or {}).items():
        setattr(c.causal, k, v)
    c.model.data_role = data_role
    return c


def choose_best(results: dict, a0: dict) -> tuple[str, str]:
    """``(arm, reason)``: the candidate (A3–A6) with the lowest headline ASR whose clean utility is within
    :data:`UTILITY_TOLERANCE` of A0's; ties → higher utility under attack. Falls back to the lowest ASR overall."""
    cands = [a for a in CANDIDATES if a in results]
    if not cands:
        raise ValueError("no candidate arm (A3–A6) was trained")
    ok = [a for a in cands if (results[a]["utility_clean"] or 0) >= (a0["utility_clean"] or 0) - UTILITY_TOLERANCE]
    pool = ok or cands
    best = min(pool, key=lambda a: (results[a]["attack_success_rate"], -(results[a]["utility_under_attack"] or 0)))
    why = (f"lowest headline ASR among {pool} (clean utility within {UTILITY_TOLERANCE:.2f} of A0's)" if ok else
           f"no candidate kept clean utility within {UTILITY_TOLERANCE:.2f} of A0's; lowest ASR among {pool}")
    return best, why


def wilcoxon_vs(margins: dict, ref: dict) -> dict:
    """Paired Wilcoxon signed-rank test (scipy, two-sided) of per-case margins against the reference's."""
    from scipy.stats import wilcoxon

    ids = [i for i, v in margins.items() if v is not None and ref.get(i) is not None]
    if len(ids) < 6:
        return {"n": len(ids), "p_value": None}
    d = [margins[i] - ref[i] for i in ids]
    if all(x == 0 for x in d):
        return {"n": len(ids), "p_value": 1.0, "median_difference": 0.0}
    res = wilcoxon([margins[i] for i in ids], [ref[i] for i in ids])
    d.sort()
    return {"n": len(ids), "p_value": float(res.pvalue), "median_difference": d[len(d) // 2]}


def run_ablation(cfg: PipelineConfig, base: str, arms: list[str], adopt: bool = False) -> dict:
    """Train and evaluate the arms (module docstring); returns the content of ``ablation.json``.

    Every output records what it was made from (``data/state.json``, ``<arm>/arm_state.json``: hashes of the
    starting model, triplets, loss and training settings). On a rerun a finished arm is reused only when its
    recorded state matches; otherwise its folder is removed and it is trained again (a changed base or data
    rebuilds the triplets, which changes every arm's state). ``adopt``: reuse finished outputs that have no recorded
    state yet (made before states were recorded), recording their state now."""
    import torch

    from staged_alignment.core.models import is_complete_model_dir, load_model, load_tokenizer, pick_device

    root = cfg.run_dir / "ablation"
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    # 1. one triplet file for every arm, targets and hijacked responses from the starting model
    triplets = root / "data" / "triplets.jsonl"
    data_cfg = copy.deepcopy(cfg)
    data_cfg.output_dir, data_cfg.run_name = str(root), "data-build"
    base_fp = model_fingerprint(base)
    t_state = triplet_state(cfg, base_fp)
    state_file = root / "data" / "state.json"
    recorded = json.loads(state_file.read_text()).get("state") if state_file.is_file() else None
    if triplets.is_file() and recorded != t_state and not (adopt and recorded is None):
        log.warning("the shared triplets were built from other settings or another base: rebuilding")
        triplets.unlink()
    if not triplets.is_file():
        parsed = s2.validate(data_cfg)
        device = pick_device(cfg.device)
        tok = load_tokenizer(base, cfg.model)
        model = load_model(base, cfg.model, device=device, for_training=False).to(device)
        path, stats = s2.build_triplet_file(data_cfg, parsed, model, tok, model_fingerprint(base))
        del model
        gc.collect()
        triplets.parent.mkdir(parents=True, exist_ok=True)
        path.replace(triplets)
        atomic_write_json(root / "data" / "triplet_stats.json", stats)
    atomic_write_json(state_file, {"state": t_state, "base": base})
    timings = json.loads((root / "timings.json").read_text()) if (root / "timings.json").exists() else {}
    evals: dict[str, dict] = {}

    def evaluate(arm: str, path: str, data_role: bool) -> dict:
        ecfg = copy.deepcopy(cfg)
        ecfg.model.data_role = data_role
        t0 = time.time()
        m = evaluate_models(ecfg, {arm: path}, cfg.evaluate.eval_file, root / "eval" / arm, references={},
                            margins=True)
        timings.setdefault(arm, {})["evaluate_s"] = timings.get(arm, {}).get("evaluate_s") or round(time.time() - t0)
        return m

    def train(arm: str, loss: dict, data_role: bool, causal: dict | None = None) -> str:
        acfg = arm_config(cfg, arm, loss, data_role, base, triplets, root, causal)
        merged = acfg.run_dir / "causal" / "merged"
        want = arm_state(cfg, loss, data_role, base_fp, triplets, causal)
        sfile = acfg.run_dir / STATE
        have = json.loads(sfile.read_text()).get("state") if sfile.is_file() else None
        if acfg.run_dir.exists() and have != want and not (adopt and have is None and is_complete_model_dir(merged)):
            log.warning("[%s] outputs from other settings (or unfinished): removed, training again", arm)
            shutil.rmtree(acfg.run_dir)
            shutil.rmtree(root / "eval" / arm, ignore_errors=True)
        if not is_complete_model_dir(merged):
            t0 = time.time()
            log.info("[%s] training: %s", arm, loss)
            s2.run(acfg)
            timings.setdefault(arm, {})["train_s"] = round(time.time() - t0)
            atomic_write_json(root / "timings.json", timings)
            gc.collect()
        atomic_write_json(sfile, {"state": want, "loss": loss, "data_role": data_role})
        return str(merged)

    evals["A0"] = evaluate("A0", base, False)
    specs = {a: dict(ARMS[a]) for a in ARMS if a in arms}
    for arm in [a for a in ORDER if a in specs]:
        print(f"[ablation] {arm} ({specs[arm]['label']})", flush=True)
        evals[arm] = evaluate(arm, train(arm, specs[arm]["loss"], False, specs[arm].get("causal")), False)
        atomic_write_json(root / "timings.json", timings)
    rows = {a: evals[a]["models"][a] for a in evals}
    best, why = None, None
    if "A7" in arms or "A8" in arms:
        best, why = choose_best(rows, rows["A0"])
        a7_loss = dict(specs.get(best, ARMS[best])["loss"])
        arm_specs = {"A7": {"loss": a7_loss, "label": f"{best} + data role"},
                     "A8": {"loss": {**a7_loss, "lambda_pref": 1.0, "pref_beta": 0.1},
                            "label": f"{best} + data role + pref_injected"}}
        for arm in ("A7", "A8"):
            if arm in arms:
                specs[arm] = arm_specs[arm]
                print(f"[ablation] {arm} ({specs[arm]['label']})", flush=True)
                evals[arm] = evaluate(arm, train(arm, specs[arm]["loss"], True), True)
                rows[arm] = evals[arm]["models"][arm]
                atomic_write_json(root / "timings.json", timings)
    return summarise(cfg, root, evals, specs, best, why, timings, base)


def case_clusters(cfg: PipelineConfig) -> dict[str, str]:
    """``{case_id: task_id}`` of the held-out file's cases that name a task (the 5 injected variants of one clean
    prompt share it), for :func:`evaluation.metrics.paired_comparisons`' clustered p-value; ``{}`` for a file
    without task ids. Raises :class:`DataError` on a bad row (the file was already read once by the arms)."""
    return task_clusters(read_eval_cases(cfg))


def summarise(cfg, root: Path, evals: dict, specs: dict, best, why, timings: dict, base: str) -> dict:
    """``ablation.json``/``.md``/``.png`` from the per-arm evaluations."""
    flags = {a: evals[a]["case_outcomes"][a] for a in evals}
    margins = {a: (evals[a].get("margins") or {}).get(a) or {} for a in evals}
    pairs = [(a, "A0") for a in evals if a != "A0"] + [(a, "A3") for a in evals if a not in ("A0", "A3") and "A3" in evals]
    flags = {a: {**flags[a], **(evals[a].get("safety_outcomes") or {}).get(a, {})} for a in flags}
    paired = paired_comparisons(flags, pairs, keys=("attack", "utility_under_attack", "refused_harmful"),
                                alpha=cfg.evaluate.alpha, clusters=case_clusters(cfg))
    table = []
    for a in [x for x in ORDER if x in evals]:
        m = evals[a]["models"][a]
        row = {"arm": a, "objective": "starting model" if a == "A0" else specs[a]["label"],
               "loss": None if a == "A0" else specs[a]["loss"], "data_role": a in ("A7", "A8"),
               "causal": None if a == "A0" else specs[a].get("causal")}
        for k in ("attack_success_rate", "attack_success_rate_ci95", "attack_success_rate_begins",
                  "attack_success_rate_begins_ci95", "attack_success_rate_contains", "utility_clean",
                  "utility_clean_ci95", "utility_under_attack", "utility_under_attack_ci95", "over_defence_compliance",
                  "over_defence_compliance_ci95", "n_cases", "n_controls", "teacher_forced_margin_mean",
                  "teacher_forced_margin_positive", "harmful_refusal_rate", "harmful_refusal_rate_ci95", "n_redteam",
                  "benign_over_refusal_rate", "benign_over_refusal_rate_ci95", "n_benign"):
            row[k] = m.get(k)
        row["margin_wilcoxon_vs_A0"] = None if a == "A0" else wilcoxon_vs(margins[a], margins["A0"])
        for ref in ("A0", "A3"):
            for metric in ("attack", "utility_under_attack", "refused_harmful"):
                hit = next((r for r in paired if r["model"] == a and r["reference"] == ref and r["metric"] == metric), None)
                row[f"mcnemar_{metric}_vs_{ref}"] = hit
        row["train_s"] = timings.get(a, {}).get("train_s")
        row["evaluate_s"] = timings.get(a, {}).get("evaluate_s")
        table.append(row)
    out = {"config": cfg.source_path, "base_model": base, "eval_file": cfg.evaluate.eval_file,
           "eval_settings": evals["A0"]["settings"], "triplets": str(root / "data" / "triplets.jsonl"),
           "steps": cfg.causal.training.get("max_steps"), "seed": cfg.seed, "best_candidate": best,
           "best_rule": why, "arms": table, "paired": paired, "timings": timings}
    atomic_write_json(root / "ablation.json", _safe(out))
    atomic_write_text(root / "ablation.md", ablation_markdown(out))
    plot_ablation(out, root / "ablation.png")
    return out


def _safe(obj):
    if isinstance(obj, dict):
        return {str(k): _safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def _r(v, ci=None) -> str:
    if v is None:
        return "—"
    s = f"{v:.3f}"
    return s + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _p(hit) -> str:
    """``raw / Holm`` p-values of one paired test ("—" when absent), then ``(clustered p)`` when the test has one."""
    if not hit:
        return "—"
    clustered = f" ({hit['p_clustered']:.2g})" if hit.get("p_clustered") is not None else ""
    return f"{hit['p_value']:.2g} / {hit['p_holm']:.2g}{clustered}"


def ablation_markdown(out: dict) -> str:
    """The ablation table (Markdown)."""
    lines = ["# Causal-stage ablation", "",
             f"Starting model `{md_escape(out['base_model'])}`; the same triplets (`{md_escape(out['triplets'])}`), "
             f"{out['steps']} steps and seed {out['seed']} for every arm; held-out set `{md_escape(out['eval_file'])}` "
             f"(n = {out['arms'][0]['n_cases']} injection cases, {out['arms'][0]['n_controls']} controls)."
             + (f" A7's base arm: **{out['best_candidate']}** ({md_escape(out['best_rule'] or '—')})."
                if out.get("best_candidate") else ""), "",
             "| arm | objective | ASR ↓ [95 % CI] | ASR, begins ↓ | utility, clean ↑ | utility under attack ↑ | "
             "over-defence compliance ↑ | margin (nats) ↑ | Wilcoxon p vs A0 | McNemar p ASR vs A0 (raw / Holm (clustered)) | "
             "vs A3 | McNemar p utility-under-attack vs A0 | harmful refusal ↑ | McNemar p harmful refusal vs A0 | "
             "benign over-refusal ↓ | train / eval s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["arms"]:
        w = r["margin_wilcoxon_vs_A0"]
        wp = "—" if not w or w.get("p_value") is None else f"{w['p_value']:.2g}"
        lines.append(
            f"| {r['arm']} | {md_escape(r['objective'])}{' (data role)' if r['data_role'] else ''} | "
            f"{_r(r['attack_success_rate'], r['attack_success_rate_ci95'])} | {_r(r['attack_success_rate_begins'])} | "
            f"{_r(r['utility_clean'], r['utility_clean_ci95'])} | "
            f"{_r(r['utility_under_attack'], r['utility_under_attack_ci95'])} | "
            f"{_r(r['over_defence_compliance'], r['over_defence_compliance_ci95'])} | "
            f"{_r(r['teacher_forced_margin_mean'])} | {wp} | "
            f"{_p(r['mcnemar_attack_vs_A0'])} | {_p(r['mcnemar_attack_vs_A3'])} | "
            f"{_p(r['mcnemar_utility_under_attack_vs_A0'])} | "
            f"{_r(r.get('harmful_refusal_rate'), r.get('harmful_refusal_rate_ci95'))} | "
            f"{_p(r.get('mcnemar_refused_harmful_vs_A0'))} | "
            f"{_r(r.get('benign_over_refusal_rate'), r.get('benign_over_refusal_rate_ci95'))} | "
            f"{r['train_s'] or '—'} / {r['evaluate_s'] or '—'} |")
    lines += ["", "ASR: headline judge (the canary used outside copies, refusals and reports; clean answer without it). "
              "Margin: mean over cases of log p(ideal | x_i) − log p(hijack | x_i), teacher-forced. McNemar: exact, "
              "on the discordant cases; raw p, and Holm-corrected over every comparison in this table (ASR, "
              "utility under attack and harmful refusal, against A0 and A3); in brackets, the p-value clustered by "
              "task (Durkalski et al. 2003; a task's injected variants share one clean prompt). Harmful refusal / benign over-refusal: "
              f"{out['arms'][0].get('n_redteam')} held-out harmful prompts and {out['arms'][0].get('n_benign')} benign "
              "look-alikes (evaluation/safety.py). Wilcoxon: paired signed-rank test of the per-case margins "
              "against A0's.", ""]
    return "\n".join(lines)


def plot_ablation(out: dict, path: Path) -> Path:
    """Bars per arm: headline ASR, clean utility, utility under attack, over-defence compliance (Wilson 95 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r["arm"] for r in out["arms"]]
    keys = [("attack_success_rate", "ASR", "#c0392b"), ("utility_clean", "utility, clean", "#2e86c1"),
            ("utility_under_attack", "utility under attack", "#27ae60"),
            ("over_defence_compliance", "over-defence compliance", "#8e44ad")]
    x = np.arange(len(arms))
    w = 0.2
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(arms) + 2), 4))
    for k, (key, name, color) in enumerate(keys):
        vals = [r[key] or 0.0 for r in out["arms"]]
        lo = [max(0.0, (r[key] or 0) - r[key + "_ci95"][0]) if r.get(key + "_ci95") else 0 for r in out["arms"]]
        hi = [max(0.0, r[key + "_ci95"][1] - (r[key] or 0)) if r.get(key + "_ci95") else 0 for r in out["arms"]]
        ax.bar(x + (k - 1.5) * w, vals, width=w, yerr=[lo, hi], capsize=2, label=name, color=color)
    ax.set_xticks(x, arms)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate (95 % Wilson interval)")
    ax.set_title(f"Causal-stage ablation (n = {out['arms'][0]['n_cases']} held-out injection cases)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = CliParser(description="Ablation of the causal stage's objective (same model, data, steps, seed)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--base", help="starting model folder (default: <run_dir>/dpo/merged)")
    ap.add_argument("--arms", default=",".join(a for a in ORDER if a != "A0"), help="comma-separated arms (A1…A10)")
    ap.add_argument("--adopt", action="store_true", help="reuse finished arms that have no recorded state (made "
                                                          "before states were recorded), recording it now")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    setup_logging()
    try:
        args = ap.parse(argv)
        cfg = load_config(args.config, args.overrides)
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        if not arms:
            raise ConfigError("command line", None, "--arms", f"names no arm; give a comma-separated list of "
                                                              f"{list(ORDER[1:])}")
        bad = [a for a in arms if a not in ORDER or a == "A0"]
        if bad:
            raise ConfigError("command line", None, "--arms", f"unknown arm(s) {bad}; choose from {list(ORDER[1:])}")
        if {"A7", "A8"} & set(arms) and not set(CANDIDATES) & set(arms):
            raise ConfigError("command line", None, "--arms", f"A7/A8 build on the best of {list(CANDIDATES)}: include them")
        base = args.base or str(cfg.run_dir / "dpo" / "merged")
        from staged_alignment.core.models import check_model_folder, is_complete_model_dir

        if not is_complete_model_dir(base):
            raise ConfigError("command line", None, "--base", f"{base} is not a complete model folder (config.json "
                                                             "+ *.safetensors); run the pipeline up to the DPO stage "
                                                             "or pass --base")
        check_model_folder(base, lambda m: ConfigError("command line", None, "--base", m))

        s2.validate(cfg)  # every input before any model
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    t0 = time.time()
    try:
        with RunLock(cfg.run_dir):
            out = run_ablation(cfg, base, arms, adopt=args.adopt)
    except RunFolderBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(ablation_markdown(out))
    print(f"ablation: {cfg.run_dir / 'ablation' / 'ablation.md'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
