"""Evaluation: attack success, utility (clean and under attack), over-defence compliance, refusal rate,
representation metrics, paired tests and verification.

Recipe: parse config → parse the eval file (injection cases and controls) and red-team prompts before any model →
per model: answer the clean prompt of every case (prompts shared by several cases are answered once), the injected
prompt of every injection case and the red-team prompts (greedy by default; each answer appended to
``generations.jsonl`` as soon as its batch is done, so a rerun resumes per (model, case)) → per-case verdicts of
the judges (:func:`evaluation.metrics.score_case`, written back into ``generations.jsonl``) → representations of
the clean, counterfactual and injected views (through the causal stage's projection head when the model has one,
else the pooled hidden states) → metrics (:mod:`evaluation.metrics`), exact McNemar tests of each model against the
model its stage started from (Holm-corrected) and verification (:mod:`evaluation.verification`) → ``metrics.json``,
``report.md`` and plots (:mod:`evaluation.report`).

    python stages/evaluate.py --config C --model M [--model M2 …] --eval-file F [--output D] [key=value …]

``M`` is ``label=path`` or a path (label = the folder name, or its parent's name for a ``…/<stage>/merged``
folder); the path may be a model folder, a Hub id (the local cache's snapshot, downloaded when online), a LoRA
adapter folder or Hub repo (merged into its base under ``<output>/models/<label>``, :mod:`core.start_model`), or
``embedded:<name>``. Without ``--model`` (and without ``--output``) it runs as the
pipeline stage: models ``base`` (the configured model), ``sft``, ``dpo``, ``causal`` (``<run_dir>/<label>/merged``)
that exist and are listed in ``evaluate.models``, output ``<run_dir>/eval/``, recorded in the manifest.

Evaluation is not distributed: started with several processes (``accelerate launch``, ``torchrun``, the pipeline's
``--launcher``), every process parses and validates, they meet at a barrier, then the main process evaluates alone
and the others exit 0 (each logs a line saying so).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, "") and (Path(__file__).resolve().parents[1] / "staged_alignment").is_dir():  # a checkout, run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (an installed wheel needs nothing)

from staged_alignment.core.common import (
    main_process_only,
    run_stage_main,
    setup_logging,
)
from staged_alignment.core.config import (
    CliParser,
    ConfigError,
    ModelSection,
    PipelineConfig,
    load_config,
    resolve_input,
)
from staged_alignment.core.hub import push_eval_results
from staged_alignment.core.jsonl_io import DataError
from staged_alignment.core.redaction import overrides_from_env
from staged_alignment.core.start_model import materialize
from staged_alignment.evaluation.adaptive import (
    adaptive_cases,
    run_adaptive,
)
from staged_alignment.evaluation.judged import JUDGED
from staged_alignment.evaluation.report import metrics_table
from staged_alignment.evaluation.runner import assessment_path, eval_file_path, evaluate_models, validate_inputs
from staged_alignment.evaluation.suite import (
    SUITES,
    build_benchmark,
    run_suite,
    sub_suite,
    suite_pairs,
    validate_suite,
)
from staged_alignment.evaluation.tracking import log_evaluation

STAGE = "evaluate"
MAIN_PROCESS_ONLY = True  # core.common.run_stage_main: under several processes only the main one evaluates
PIPELINE_LABELS = ("base", "sft", "dpo", "causal")


log = logging.getLogger("staged_alignment.evaluate")


# --------------------------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class EvalPlan:
    """What :func:`validate` parsed: the eval file's ``cases`` (injection cases and controls)."""

    cases: list[dict]


def validate(cfg: PipelineConfig, eval_file: str | os.PathLike | None = None,
             models: dict[str, str] | None = None) -> EvalPlan:
    """The stage's checks, no model loaded: ``evaluate.suite``/``evaluate.adaptive``
    (:func:`evaluation.suite.validate_suite`) and every input (:func:`evaluation.runner.validate_inputs`). Raises
    :class:`DataError` or :class:`ConfigError`."""
    validate_suite(cfg)
    return EvalPlan(cases=validate_inputs(cfg, eval_file, models))


def check_upstream(cfg: PipelineConfig) -> None:
    """Nothing: the evaluation takes the run's models that exist (:func:`pipeline_models`) and names the missing."""


def resume_state(cfg: PipelineConfig) -> list:
    """Nothing is set aside: answers resume per (model, kind, id, prompt sha) from ``generations.jsonl``, so a
    changed prompt is answered again and an unchanged one is reused."""
    return []


def input_paths(cfg: PipelineConfig) -> dict[str, str]:
    """Eval file, red-team source, and the merged models of the run that exist (their hashes go in the manifest)."""
    out = {"eval_file": str(eval_file_path(cfg))}
    if cfg.evaluate.redteam_file:
        out["redteam_file"] = str(resolve_input(cfg.evaluate.redteam_file))
    elif assessment_path(cfg).exists():
        out["redteam_file"] = str(assessment_path(cfg))
    if cfg.evaluate.benign_file:
        out["benign_file"] = str(resolve_input(cfg.evaluate.benign_file))
    for label in cfg.evaluate.models:
        if label != "base" and (cfg.run_dir / label / "merged").is_dir():
            out[f"model_{label}"] = str(cfg.run_dir / label / "merged")
    return out


def pipeline_models(cfg: PipelineConfig) -> dict[str, str]:
    """``{label: path}`` of the pipeline's models that exist, in the order base, sft, dpo, causal."""
    from staged_alignment.core.models import is_complete_model_dir, resolve_model_path

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


def parse_models(args: list[str]) -> dict[str, str]:
    """``{label: path}`` of the ``--model`` arguments (:func:`parse_model_arg`); raises :class:`ConfigError` for a
    label given twice."""
    models = {}
    for m in args:
        label, path = parse_model_arg(m)
        if label in models:
            raise ConfigError(None, None, "--model", f"label {label!r} given twice")
        models[label] = path
    return models


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


def run(cfg: PipelineConfig, plan: EvalPlan | None = None) -> dict:
    """The pipeline stage: evaluate the run's models into ``<run_dir>/eval``, from ``plan`` (:func:`validate`'s;
    validated here when None)."""
    plan = plan if plan is not None else validate(cfg)
    models = pipeline_models(cfg)
    out = cfg.run_dir / "eval"
    metrics = evaluate_models(cfg, models, eval_file_path(cfg), out, run_dir=cfg.run_dir, cases=plan.cases)

    log_evaluation(cfg, metrics, out)  # W&B / TensorBoard, as logging.report_to says

    pushed = push_eval_results(cfg, metrics)  # model-index on the cards of the stages pushed in this run
    summary = {label: {k: m.get(k) for k in ("attack_success_rate", "attack_success_rate_begins", "utility_clean",
                                             "utility_under_attack", "over_defence_compliance",
                                             "harmful_refusal_rate", "benign_over_refusal_rate")}
               for label, m in metrics["models"].items()}
    outputs = {"metrics": str(out / "metrics.json"), "report": str(out / "report.md")}
    if pushed:
        outputs["hub_cards"] = {k: v for k, v in pushed.items() if k != "hub_error"}
        if pushed.get("hub_error"):
            outputs["hub_error"] = pushed["hub_error"]
    return {"outputs": outputs, "metrics": summary}


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = CliParser(description="Evaluate models on an injection eval set (ASR, utility, verification)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", action="append", default=[], help="label=path or path (repeatable)")
    ap.add_argument("--eval-file", help="injection eval JSONL (default: evaluate.eval_file)")
    ap.add_argument("--output", help="output folder (default: <run_dir>/eval; <run_dir>/suite with --suite)")
    ap.add_argument("--suite", help="run a security suite by name (evaluation.suite.SUITES: injection)")
    ap.add_argument("--benchmark", action="append", default=[],
                    help="one benchmark of the suite (alpacafarm, sep, bipia, heldout, tasktracker, cyberseceval2; "
                         "repeatable)")
    ap.add_argument("--adaptive", action="store_true", help="also run evaluate.adaptive's attacks (budget curves)")
    ap.add_argument("--reference", action="append", default=[],
                    help="model=reference for the suite's paired tests, repeatable, a model may have several "
                         "(default: each model against the one before)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    try:
        args = ap.parse(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # a path from the command line is a literal string (JSON-quoted), never re-read as YAML
    overrides = list(args.overrides) + ([f"evaluate.eval_file={json.dumps(args.eval_file)}"] if args.eval_file else [])
    if not args.model and not args.output and not (args.suite or args.benchmark or args.adaptive):
        # the pipeline stage (manifest, run_dir/eval); run_stage_main adds the secret overrides itself
        return run_stage_main(sys.modules[__name__], "Evaluation stage", ["--config", args.config, *overrides])
    overrides += overrides_from_env()
    if args.suite or args.benchmark or args.adaptive:
        return suite_main(args, overrides)
    setup_logging()

    try:
        cfg = load_config(args.config, overrides)
        models = parse_models(args.model)
        plan = validate(cfg, None, models)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if not main_process_only(cfg, "evaluation"):
        return 0
    out = Path(args.output) if args.output else cfg.run_dir / "eval"
    models = materialized(cfg, models, out)
    metrics = evaluate_models(cfg, models, eval_file_path(cfg), out, run_dir=cfg.run_dir, cases=plan.cases)

    print(metrics_table(metrics))
    print(f"\nreport: {out / 'report.md'}")
    return 0


def materialized(cfg: PipelineConfig, models: dict[str, str], out: Path) -> dict[str, str]:
    """``{label: local model folder}``: the pipeline's models when ``models`` is empty; a Hub id → its cached (or
    downloaded) snapshot; an adapter → merged into its base under ``<out>/models/<label>``."""
    models = models or pipeline_models(cfg)
    return {label: str(materialize(path, out / "models" / label, cfg.model)) if not path.startswith("embedded:")
            else path for label, path in models.items()}


def suite_benchmarks(cfg: PipelineConfig, suite: str | None, named: list[str]) -> tuple[list[str], list[str]]:
    """``(benchmarks to run, notes)``: the ``--benchmark`` names, else the suite's benchmarks that
    ``evaluate.suite.benchmarks`` lists and whose file is set (a note for each left out). Raises
    :class:`ConfigError` for an unknown suite or benchmark, or a named benchmark without its file."""
    st = sub_suite(cfg)
    if suite is not None and suite not in SUITES:
        raise ConfigError(None, None, "--suite", f"unknown suite {suite!r}; expected one of {sorted(SUITES)}")
    known = SUITES["injection"]
    for b in named:
        if b not in known:
            raise ConfigError(None, None, "--benchmark", f"unknown benchmark {b!r}; expected one of {list(known)}")
    missing = {b: None if b == "heldout" or getattr(st, f"{b}_file") else f"{b}_file" for b in known}
    for b in JUDGED:  # judged by a model: its file and the judge
        missing[b] = missing[b] or (None if st.judge_model else "judge_model")
    if named:
        for b in named:
            if missing[b]:
                raise cfg.error(f"evaluate.suite.{missing[b]}", f"--benchmark {b} needs this setting")
        return list(named), []
    names = [b for b in SUITES[suite or "injection"] if b in st.benchmarks]
    notes = [f"{b}: left out (evaluate.suite.{missing[b]} unset)" for b in names if missing[b]]
    return [b for b in names if not missing[b]], notes


def suite_main(args, overrides: list[str]) -> int:
    """``--suite`` / ``--benchmark`` / ``--adaptive``: every file and model checked first, then the suite's tables
    (:func:`evaluation.suite.run_suite`) and the adaptive attacks' budget curves
    (:func:`evaluation.adaptive.run_adaptive`) under ``--output`` (default ``<run_dir>/suite``)."""
    setup_logging()
    try:
        cfg = load_config(args.config, overrides)
        models = parse_models(args.model)
        validate(cfg, None, models)
        benchmarks, notes = suite_benchmarks(cfg, args.suite, args.benchmark) if (args.suite or args.benchmark) \
            else ([], [])
        refs = []
        for r in args.reference:
            if "=" not in r:
                raise ConfigError(None, None, "--reference", f"expected model=reference, got {r!r}")
            refs.append(tuple(r.split("=", 1)))

        for b in benchmarks:  # every file read and every case checked before any model loads
            build_benchmark(b, sub_suite(cfg))
        if args.adaptive:
            ad = cfg.evaluate.adaptive
            adaptive_cases(cfg, ad.n_cases, ad.seed)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if not main_process_only(cfg, "the security suite"):
        return 0
    out = Path(args.output) if args.output else cfg.run_dir / "suite"
    models = materialized(cfg, models, out)
    for n in notes:
        print(f"note: {n}")
    labels = list(models)

    pairs = suite_pairs(labels, refs or None)
    if benchmarks:
        tok = run_tokenizer(cfg, next(iter(models.values())))
        run_suite(cfg, models, out, benchmarks, references=pairs, tokenizer=tok)
        print((out / "suite.md").read_text(encoding="utf-8"))
    if args.adaptive:
        run_adaptive(cfg, models, out, pairs=pairs)
        print((out / "adaptive.md").read_text(encoding="utf-8"))
    print(f"\nresults: {out}")
    return 0


def run_tokenizer(cfg: PipelineConfig, path: str):
    """The tokenizer of ``path`` with the run's chat template (the template every model of the run is prompted in:
    the model-specific completion attacks are written in it)."""
    from staged_alignment.core.models import load_tokenizer, resolve_model_path

    if path.startswith("embedded:"):
        path = resolve_model_path(ModelSection(name_or_path=path, cache_dir=cfg.model.cache_dir))
    return load_tokenizer(path, cfg.model)


if __name__ == "__main__":
    raise SystemExit(main())
