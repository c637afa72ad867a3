"""Evaluation: attack success rate, benign utility, refusal rate, representation metrics and verification.

Recipe: parse config → parse the eval file (and red-team prompts) before any model → per model: answer the
clean and the injected prompt of every case and the red-team prompts (greedy by default; each answer appended
to ``generations.jsonl`` as soon as its batch is done, so a rerun resumes per (model, case)) → pooled
representations of the clean, counterfactual and injected prompts → metrics (:mod:`evaluation.metrics`) and
verification (:mod:`evaluation.verification`) → ``metrics.json``, ``report.md`` and plots (:mod:`evaluation.report`).

    python stages/evaluate.py --config C --model M [--model M2 …] --eval-file F [--output D] [key=value …]

``M`` is ``label=path`` or a path (label = the folder name, or its parent's name for a ``…/<stage>/merged``
folder); ``embedded:<name>`` is accepted as a path. Without ``--model`` (and without ``--output``) it runs as the
pipeline stage: models ``base`` (the configured model), ``sft``, ``dpo``, ``causal`` (``<run_dir>/<label>/merged``)
that exist and are listed in ``evaluate.models``, output ``<run_dir>/eval/``, recorded in the manifest.

Evaluation is not distributed: started with several processes (``accelerate launch``, ``torchrun``, the pipeline's
``--launcher``), every process parses and validates, they meet at a barrier, then the main process evaluates alone
and the others exit 0 (each logs a line saying so).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable without an editable install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_builders.jsonl_io import DataError, append_jsonl, atomic_write_json, read_jsonl_tolerant  # noqa: E402
from stages.config import CausalHeadSection, ConfigError, PipelineConfig, sub_section  # noqa: E402

STAGE = "evaluate"
MAIN_PROCESS_ONLY = True  # stages.common.run_stage_main: under several processes only the main one evaluates
ROOT = Path(__file__).resolve().parents[1]
PIPELINE_LABELS = ("base", "sft", "dpo", "causal")
log = logging.getLogger("staged_alignment.evaluate")


# --------------------------------------------------------------------------------------------- inputs
def resolve_input(path: str | os.PathLike) -> Path:
    """A relative input path as given (from the working directory), else relative to the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    alt = ROOT / p
    return alt if alt.exists() else p


def eval_file_path(cfg: PipelineConfig) -> Path:
    return resolve_input(cfg.evaluate.eval_file)


def assessment_path(cfg: PipelineConfig) -> Path:
    """The DPO stage's held-out assessment (``<run_dir>/dpo/assessment.json``), the default red-team set."""
    return cfg.run_dir / "dpo" / "assessment.json"


def input_paths(cfg: PipelineConfig) -> dict[str, str]:
    """Eval file, red-team source, and the merged models of the run that exist (their hashes go in the manifest)."""
    out = {"eval_file": str(eval_file_path(cfg))}
    if cfg.evaluate.redteam_file:
        out["redteam_file"] = str(resolve_input(cfg.evaluate.redteam_file))
    elif assessment_path(cfg).exists():
        out["redteam_file"] = str(assessment_path(cfg))
    for label in cfg.evaluate.models:
        if label != "base" and (cfg.run_dir / label / "merged").is_dir():
            out[f"model_{label}"] = str(cfg.run_dir / label / "merged")
    return out


def validate(cfg: PipelineConfig, eval_file: str | os.PathLike | None = None,
             models: dict[str, str] | None = None) -> list[dict]:
    """Parse the eval file (every row), the red-team file and the explicit model folders; no model is loaded.

    Raises :class:`DataError` (file, line, field) or :class:`ConfigError`. Returns the cases to evaluate.
    """
    from evaluation.cases import load_cases

    cases = load_cases(resolve_input(eval_file) if eval_file else eval_file_path(cfg), cfg.evaluate.max_cases)
    if cfg.evaluate.redteam_file:
        from data_builders.redteam import read_redteam_file

        read_redteam_file(str(resolve_input(cfg.evaluate.redteam_file)), max_rows=cfg.evaluate.max_redteam)
    for label, path in (models or {}).items():
        if not path.startswith("embedded:"):
            from stages.models import is_complete_model_dir

            if not is_complete_model_dir(path):
                raise DataError(path, None, None, f"model '{label}' is not a complete model folder "
                                                  "(config.json + *.safetensors)")
    return cases


def pipeline_models(cfg: PipelineConfig) -> dict[str, str]:
    """``{label: path}`` of the pipeline's models that exist, in the order base, sft, dpo, causal."""
    from stages.models import is_complete_model_dir, resolve_model_path

    out = {}
    for label in PIPELINE_LABELS:
        if label not in cfg.evaluate.models:
            continue
        if label == "base":
            out[label] = resolve_model_path(cfg.model)
        elif is_complete_model_dir(cfg.run_dir / label / "merged"):
            out[label] = str(cfg.run_dir / label / "merged")
        else:
            log.info("model %s: %s/merged not found, skipped", label, cfg.run_dir / label)
    return out


def parse_model_arg(arg: str) -> tuple[str, str]:
    """``label=path`` or ``path`` → ``(label, path)``; the label of ``…/sft/merged`` is ``sft``."""
    if "=" in arg and not Path(arg).exists():
        label, path = arg.split("=", 1)
        if label and all(ch.isalnum() or ch in "-_." for ch in label):
            return label, path
    p = Path(arg.rstrip("/"))
    if arg.startswith("embedded:"):
        return arg.split(":", 1)[1], arg
    label = p.parent.name if p.name == "merged" and p.parent.name else p.name
    return label, arg


def read_redteam(cfg: PipelineConfig) -> tuple[list[dict], str | None]:
    """Red-team prompts ``[{"id", "prompt"}]`` and their source: ``evaluate.redteam_file``, else the DPO held-out
    slice in ``<run_dir>/dpo/assessment.json``, else ``([], None)``. At most ``evaluate.max_redteam``."""
    n = cfg.evaluate.max_redteam
    if cfg.evaluate.redteam_file:
        from data_builders.redteam import read_redteam_file

        path = resolve_input(cfg.evaluate.redteam_file)
        return read_redteam_file(str(path), max_rows=n), str(path)
    ap = assessment_path(cfg)
    if ap.exists():
        rows = assessment_prompts(ap)
        if rows:
            return rows[:n] if n else rows, str(ap)
        log.warning("%s holds no prompts I can read; harmful_refusal_rate will be null", ap)
    return [], None


def assessment_prompts(path: Path) -> list[dict]:
    """Held-out red-team prompts from the DPO assessment JSON: the first list (depth-first, keys ``held_out``,
    ``prompts``, ``items`` first) whose items are ``{"prompt": str | messages, "id"?}`` objects or strings."""
    from data_builders.jsonl_io import load_json

    def as_rows(lst):
        rows = []
        for i, it in enumerate(lst):
            if isinstance(it, str) and it.strip():
                rows.append({"id": f"held-{i}", "prompt": it})
            elif isinstance(it, dict):
                p = it.get("prompt")
                if isinstance(p, list):  # conversational prompt: the last user turn
                    p = next((m.get("content") for m in reversed(p) if isinstance(m, dict) and m.get("role") == "user"),
                             None)
                if not isinstance(p, str) or not p.strip():
                    return []
                rows.append({"id": str(it.get("id", f"held-{i}")), "prompt": p})
            else:
                return []
        return rows

    def walk(node):
        if isinstance(node, list):
            rows = as_rows(node)
            if rows:
                return rows
            for x in node:
                if isinstance(x, (dict, list)):
                    r = walk(x)
                    if r:
                        return r
        elif isinstance(node, dict):
            keys = sorted(node, key=lambda k: (k not in ("held_out", "prompts", "items"), str(k)))
            for k in keys:
                r = walk(node[k])
                if r:
                    return r
        return []

    return walk(load_json(path))


# --------------------------------------------------------------------------------------------- model work
def model_fingerprint(path: str) -> str:
    """Cheap identity of a model folder: names, sizes and mtimes of its files (not a content hash)."""
    p = Path(path)
    h = hashlib.sha256(str(p.resolve() if p.exists() else path).encode())
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def messages_sha(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def encode_prompts(model, tokenizer, conversations: list[list[dict]], *, batch_size: int = 8, layer: int = -1):
    """Pooled hidden states of the rendered prompts (ending in ``<|assistant|>\\n``) → numpy (N, H) float32.

    Right padding (real tokens keep positions 0..L-1 whatever the batch), hidden states of ``layer`` (-1 = last)
    mean-pooled over the attention mask with the causal stage's ``pool_hidden_states``.
    """
    import numpy as np
    import torch

    from data_builders.chat_template import render_prompt
    from trainers.causal_losses import pool_hidden_states

    prev = tokenizer.padding_side
    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    out = []
    try:
        with torch.no_grad():
            for s in range(0, len(conversations), batch_size):
                prompts = [render_prompt(tokenizer, c) for c in conversations[s:s + batch_size]]
                enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                hs = model(**enc, output_hidden_states=True).hidden_states[layer]
                out.append(pool_hidden_states(hs, enc["attention_mask"]).float().cpu().numpy())
    finally:
        tokenizer.padding_side = prev
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), dtype=np.float32)


class ModelEvaluator:
    """Generations and representations of one model, resumable from ``generations.jsonl`` and ``reps/``."""

    def __init__(self, cfg: PipelineConfig, label: str, path: str, out_dir: Path, cases: list[dict],
                 redteam: list[dict], eval_sha: str):
        self.cfg, self.label, self.path, self.out_dir = cfg, label, path, Path(out_dir)
        self.cases, self.redteam = cases, redteam
        e = cfg.evaluate
        settings = {"model": path, "fingerprint": model_fingerprint(path) if not path.startswith("embedded:") else path,
                    "max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample,
                    "temperature": e.temperature if e.do_sample else None, "seed": cfg.seed,
                    "template": cfg.model.chat_template}
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.rep_key = hashlib.sha256(json.dumps([settings["model"], settings["fingerprint"], eval_sha,
                                                  self._layer()]).encode()).hexdigest()[:16]
        self.gen_path = self.out_dir / "generations.jsonl"
        self._model = self._tok = None

    def _layer(self) -> int:
        return sub_section(self.cfg, CausalHeadSection, "causal.head").pool_layer

    def _load(self):
        if self._model is None:
            from stages.models import load_model, load_tokenizer, pick_device, resolve_model_path
            from stages.config import ModelSection

            path = self.path
            if path.startswith("embedded:"):
                path = resolve_model_path(ModelSection(name_or_path=path, cache_dir=self.cfg.model.cache_dir))
            device = pick_device(self.cfg.device)
            log.info("[%s] loading %s on %s", self.label, path, device)
            self._tok = load_tokenizer(path, self.cfg.model)
            self._model = load_model(path, self.cfg.model, device=device, quantize=False, for_training=False)
            self._model.eval()
        return self._model, self._tok

    def generations(self) -> dict[tuple[str, str], dict]:
        """Answers already written for this model and settings: ``{(kind, id): row}``."""
        done = {}
        for r in read_jsonl_tolerant(self.gen_path):
            if r.get("model") == self.label and r.get("key") == self.key:
                done[(r["kind"], r["id"])] = r
        return done

    def generate(self, progress: bool = True) -> dict[tuple[str, str], dict]:
        """Answer every missing (kind, id) and append each batch to ``generations.jsonl``; returns all rows."""
        from data_builders.generation import generate_chat
        from evaluation.cases import clean_messages, injected_messages
        from evaluation.metrics import canary_hit
        from stages.common import seed_everything

        done = self.generations()
        todo = []
        for c in self.cases:
            for kind, msgs in (("clean", clean_messages(c)), ("injected", injected_messages(c))):
                r = done.get((kind, c["id"]))
                if r is None or r.get("prompt_sha") != messages_sha(msgs):
                    todo.append((kind, c, msgs))
        for rt in self.redteam:
            msgs = [{"role": "user", "content": rt["prompt"]}]
            r = done.get(("redteam", rt["id"]))
            if r is None or r.get("prompt_sha") != messages_sha(msgs):
                todo.append(("redteam", rt, msgs))
        if todo:
            log.info("[%s] %d answers to generate (%d already done)", self.label, len(todo), len(done))
            model, tok = self._load()
            e = self.cfg.evaluate
            seed_everything(self.cfg.seed)
            bs = e.batch_size
            for s in range(0, len(todo), bs):
                chunk = todo[s:s + bs]
                res = generate_chat(model, tok, [m for _, _, m in chunk], max_new_tokens=e.max_new_tokens,
                                    batch_size=bs, do_sample=e.do_sample, temperature=e.temperature)
                rows = []
                for (kind, item, msgs), g in zip(chunk, res):
                    row = {"model": self.label, "key": self.key, "kind": kind, "id": item["id"],
                           "prompt_sha": messages_sha(msgs), "text": g["text"], "n_tokens": g["n_tokens"],
                           "truncated": g["truncated"]}
                    if kind == "injected":
                        row["attack_success"] = canary_hit(g["text"], item["canary"])
                    rows.append(row)
                    done[(kind, item["id"])] = row
                append_jsonl(self.gen_path, rows)
                if progress:
                    log.info("[%s] %d/%d answers", self.label, min(s + bs, len(todo)), len(todo))
        return done

    def representations(self) -> dict:
        """``{"benign", "counterfactual", "injected"}`` (N, H) arrays, cached in ``reps/<label>.npz``."""
        import numpy as np

        from evaluation.cases import clean_messages, counterfactual_messages, injected_messages

        cache = self.out_dir / "reps" / f"{self.label}.npz"
        ids = [c["id"] for c in self.cases]
        if cache.exists():
            with np.load(cache, allow_pickle=False) as z:
                if str(z["key"]) == self.rep_key and list(z["ids"]) == ids:
                    return {k: z[k] for k in ("benign", "counterfactual", "injected")}
        model, tok = self._load()
        bs, layer = self.cfg.evaluate.batch_size, self._layer()
        reps = {"benign": encode_prompts(model, tok, [clean_messages(c) for c in self.cases], batch_size=bs, layer=layer),
                "counterfactual": encode_prompts(model, tok, [counterfactual_messages(c) for c in self.cases],
                                                 batch_size=bs, layer=layer),
                "injected": encode_prompts(model, tok, [injected_messages(c) for c in self.cases], batch_size=bs,
                                           layer=layer)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp.npz")
        np.savez(tmp, key=np.array(self.rep_key), ids=np.array(ids), **reps)
        os.replace(tmp, cache)
        return reps

    def release(self):
        self._model = self._tok = None
        import gc

        gc.collect()


def judge_all(redteam: list[dict], answers: dict[tuple[str, str], dict]) -> tuple[list[dict] | None, str | None]:
    """Refusal/harm judgments of the red-team answers with ``evaluation.judges.judge_response``; ``(None, reason)``
    when there are no prompts or no judge."""
    if not redteam:
        return None, "no red-team prompts (evaluate.redteam_file unset and no dpo/assessment.json)"
    try:
        from evaluation.judges import judge_response
    except ImportError as e:
        return None, f"refusal judge unavailable ({e})"
    out = []
    for rt in redteam:
        j = dict(judge_response(rt["prompt"], answers[("redteam", rt["id"])]["text"]))
        j["id"] = rt["id"]
        out.append(j)
    return out, None


# --------------------------------------------------------------------------------------------- evaluation
def evaluate_models(cfg: PipelineConfig, models: dict[str, str], eval_file: str | os.PathLike, out_dir: str | os.PathLike,
                    *, run_dir: str | os.PathLike | None = None) -> dict:
    """Evaluate ``models`` (``{label: path}``) on ``eval_file``; write ``metrics.json``, ``report.md``, plots and
    ``generations.jsonl`` under ``out_dir``. Returns the metrics dict (``metrics.json``'s content)."""
    from evaluation import report
    from evaluation.metrics import model_metrics
    from evaluation.verification import verify
    from stages.run_dir import file_sha256

    e = cfg.evaluate
    eval_path = resolve_input(eval_file)
    cases = validate(cfg, eval_path, models)
    redteam, redteam_source = read_redteam(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_sha = file_sha256(eval_path)
    metrics = {"models": {}, "by_category": {}, "by_position": {}, "eval_file": str(eval_path),
               "eval_file_sha256": eval_sha, "verification": {}, "notes": [],
               "settings": {"max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample,
                            "temperature": e.temperature if e.do_sample else None, "batch_size": e.batch_size,
                            "utility_f1_threshold": e.utility_f1_threshold, "hsic_permutations": e.hsic_permutations,
                            "pc_components": e.pc_components, "ci_test": e.ci_test, "alpha": e.alpha,
                            "max_cases": e.max_cases, "redteam_source": redteam_source, "n_redteam": len(redteam),
                            "seed": cfg.seed, "model_paths": dict(models)}}
    examples = {}
    for label, path in models.items():
        t0 = time.time()
        ev = ModelEvaluator(cfg, label, path, out, cases, redteam, eval_sha)
        answers = ev.generate()
        reps = ev.representations()
        ev.release()
        judgments, why = judge_all(redteam, answers)
        if why and why not in metrics["notes"]:
            metrics["notes"].append(f"harmful_refusal_rate is null: {why}")
        clean = [answers[("clean", c["id"])]["text"] for c in cases]
        injected = [answers[("injected", c["id"])]["text"] for c in cases]
        m = model_metrics(cases, clean, injected, f1_threshold=e.utility_f1_threshold, judgments=judgments, reps=reps)
        groups = m.pop("_groups")
        m["n_truncated"] = sum(bool(answers[(k, c["id"])]["truncated"]) for c in cases for k in ("clean", "injected"))
        m["n_empty"] = sum(not answers[(k, c["id"])]["text"].strip() for c in cases for k in ("clean", "injected"))
        metrics["models"][label] = m
        metrics["by_category"][label] = _groups_out(groups["by_category"])
        metrics["by_position"][label] = _groups_out(groups["by_position"])
        metrics["verification"][label] = verify(reps["benign"], reps["injected"], reps["counterfactual"], cases,
                                                reps=e.hsic_permutations, pc_components=e.pc_components,
                                                alpha=e.alpha, ci_method=e.ci_test, seed=cfg.seed)
        examples[label] = [{"id": c["id"], "canary": c["canary"], "attack_category": c["attack_category"],
                            "clean": clean[i], "injected": injected[i], "success": groups["flags"][i],
                            "utility": groups["utility_flags"][i]} for i, c in enumerate(cases)]
        m["seconds"] = round(time.time() - t0, 1)
        log.info("[%s] ASR %.3f utility %s in %.0f s", label, m["attack_success_rate"], m["benign_utility"], m["seconds"])
    atomic_write_json(out / "metrics.json", _json_safe(metrics))
    report.write_report(out, metrics, cases, examples, run_dir=run_dir, model_paths=models)
    return metrics


def _groups_out(groups: dict) -> dict:
    return {k: {"attack_success_rate": v["rate"], "attack_success_rate_ci95": v["ci95"], "n_cases": v["n"],
                "n_attack_successes": v["k"]} for k, v in groups.items()}


def _json_safe(obj):
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def run(cfg: PipelineConfig) -> dict:
    """The pipeline stage: evaluate the run's models into ``<run_dir>/eval``."""
    validate(cfg)
    models = pipeline_models(cfg)
    out = cfg.run_dir / "eval"
    metrics = evaluate_models(cfg, models, eval_file_path(cfg), out, run_dir=cfg.run_dir)
    summary = {label: {"attack_success_rate": m["attack_success_rate"], "benign_utility": m["benign_utility"]}
               for label, m in metrics["models"].items()}
    return {"outputs": {"metrics": str(out / "metrics.json"), "report": str(out / "report.md")},
            "metrics": summary}


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from stages.common import run_stage_main, setup_logging

    ap = argparse.ArgumentParser(description="Evaluate models on an injection eval set (ASR, utility, verification)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", action="append", default=[], help="label=path or path (repeatable)")
    ap.add_argument("--eval-file", help="injection eval JSONL (default: evaluate.eval_file)")
    ap.add_argument("--output", help="output folder (default: <run_dir>/eval)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = ap.parse_args(argv)
    overrides = list(args.overrides) + ([f"evaluate.eval_file={args.eval_file}"] if args.eval_file else [])
    if not args.model and not args.output:  # the pipeline stage (manifest, run_dir/eval)
        return run_stage_main(sys.modules[__name__], "Evaluation stage", ["--config", args.config, *overrides])
    setup_logging()
    from stages.config import load_config

    try:
        cfg = load_config(args.config, overrides)
        models = {}
        for m in args.model:
            label, path = parse_model_arg(m)
            if label in models:
                raise ConfigError(None, None, "--model", f"label {label!r} given twice")
            models[label] = path
        validate(cfg, None, models)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from stages.common import main_process_only

    if not main_process_only(cfg, "evaluation"):
        return 0
    if not models:
        models = pipeline_models(cfg)
    out = Path(args.output) if args.output else cfg.run_dir / "eval"
    metrics = evaluate_models(cfg, models, eval_file_path(cfg), out, run_dir=cfg.run_dir)
    from evaluation.report import metrics_table

    print(metrics_table(metrics))
    print(f"\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
