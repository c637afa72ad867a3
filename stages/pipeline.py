"""The orchestrator: SFT → merge → critique-and-rewrite → DPO → merge → triplets → causal → merge → evaluate.

    python stages/pipeline.py --config C [--dry-run [--target cuda]] [--smoke] [--from-stage S] [--force]
                              [--launcher L] [key=value …]

Before any model loads, every run (and ``--dry-run``) validates the whole plan: config, every input file,
the constitution, the output folder (writable, free disk), and a per-stage memory estimate against
``model.device_memory_gb`` (warning above 90%). Each stage then runs as its own process (``python`` or the
``--launcher``, e.g. ``"accelerate launch --config_file accelerate_config.yaml"``), exactly as a user would
run it alone; the stage records itself in ``manifest.json``. A stage whose entry is ``done`` with the same
config hash and input hashes is skipped; an interrupted one is rerun and resumes from its last checkpoint
(training) or last written record (generation). ``--from-stage S`` redoes S and what follows; ``--force``
redoes everything.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, "") and (Path(__file__).resolve().parents[1] / "staged_alignment").is_dir():  # a checkout, run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (an installed wheel needs nothing)

import copy
import json
import tempfile

from staged_alignment.core.common import (
    on_cuda,
    setup_logging,
)
from staged_alignment.core.config import (
    CliParser,
    ConfigError,
    PipelineConfig,
    load_config,
    raw_config,
    resolved_yaml,
)
from staged_alignment.core.jsonl_io import (
    DataError,
    atomic_write_text,
    os_error_line,
)
from staged_alignment.core.memory import GiB, estimate, model_dims
from staged_alignment.core.redaction import SECRET_OVERRIDES_ENV, child_env, redact, split_secret_overrides
from staged_alignment.core.run_dir import (
    Manifest,
    RunFolderBusy,
    RunLock,
    path_sha256,
)
from staged_alignment.core.smoke import (  # noqa: E402
    SOURCE_LISTS,
    format_table,
    needs_network,
    smoke_plan,
    stand_ins,
)
from staged_alignment.core.stage import Stage
from staged_alignment.core.start_model import check_models
from staged_alignment.evaluation.report import metrics_table, paired_table

ROOT = Path(__file__).resolve().parents[1]
STAGE_MODULES = {"sft": "staged_alignment.stages.stage0_sft", "dpo": "staged_alignment.stages.stage1_dpo", "causal": "staged_alignment.stages.stage2_causal",
                 "evaluate": "staged_alignment.stages.evaluate"}
ORDER = list(STAGE_MODULES)


class PlanError(RuntimeError):
    """The plan cannot run (e.g. output folder not writable, disk full)."""


def enabled_stages(cfg: PipelineConfig) -> list[str]:
    return [s for s in ORDER if getattr(cfg, s).enabled]


def stage_module(name: str) -> Stage:
    """The stage script module called ``name`` (it implements :class:`core.stage.Stage`)."""
    return importlib.import_module(STAGE_MODULES[name])


def plan_summary(plan) -> str:
    """One line of what a stage's plan holds: the size of each of its lists (``rows 24``, ``train 36``)."""
    parts = [f"{f.name} {len(v)}" for f in dataclasses.fields(plan)
             if isinstance(v := getattr(plan, f.name), list) and (v or f.name in ("rows", "cases", "train"))]
    return ", ".join(parts) or "no inputs to count"


def check_output_dir(cfg: PipelineConfig, need_gib: float, *, elsewhere: bool = False) -> str:
    """Prove the run folder writable and compare free disk with ``need_gib``, writing nothing that stays: the
    folder (or its nearest existing parent, when it does not exist yet) gets a temporary file that is removed at
    once; no folder is created. Raises :class:`ConfigError` at ``output_dir`` (not writable, a file in the way)
    or :class:`PlanError` (too little disk). ``elsewhere`` (validating for another machine, ``--target``): too
    little disk here is reported, not raised."""
    run_dir = cfg.run_dir
    probe_dir = run_dir
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise cfg.error("output_dir", f"output folder {run_dir} is not writable: {probe_dir} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe_dir, prefix=".write_probe"):
            pass
    except OSError as e:
        raise cfg.error("output_dir", f"output folder {run_dir} is not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(probe_dir).free / 1024 ** 3
    if free < need_gib and elsewhere:
        return (f"{run_dir}: needs ~{need_gib:.1f} GiB; only {free:.1f} GiB free on this machine (checked again "
                "where it runs)")
    if free < need_gib:
        raise PlanError(f"only {free:.1f} GiB free under {run_dir}; the run needs about {need_gib:.1f} GiB "
                        "(merged models, adapters, checkpoints)")
    return f"{run_dir}: writable, {free:.1f} GiB free (needs ~{need_gib:.1f} GiB)"


def validate_plan(cfg: PipelineConfig, stages: list[str], target: str | None = None) -> list[str]:
    """Validate every enabled stage's inputs (no model loaded) and estimate memory; returns report lines.
    ``target="cuda"``: the estimate is for the recipe's CUDA device, whatever this machine has; a Hub dataset or URL
    that this offline machine has not cached is reported as not checked here (its stage's other checks run with the
    shipped seed data in its place, :func:`core.smoke.stand_ins`).

    Raises DataError / ConfigError / PlanError on the first problem.
    """
    lines = [f"run: {cfg.run_dir}", f"model: {cfg.model.name_or_path} (template {cfg.model.chat_template}, "
             f"quantization {cfg.model.quantization}, loader {cfg.model.loader})", "stages: " + " → ".join(stages)]

    check_models(cfg)
    if target is not None:  # validating for another machine: what only that machine can fetch is not checked here
        cfg = copy.deepcopy(cfg)  # the stand-ins are for these checks only
        section = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in SOURCE_LISTS}
        changed, replaced = stand_ins(section)
        for key, new in changed.items():
            section[key][:] = new
        lines += [f"  not checked here: {key} = {src} ({why}; its stage's other checks ran with the shipped seed data "
                  "in its place)" for key, src, _, why in replaced]
        if "dpo.prompts" in changed and cfg.dpo.held_out > 2:  # sized for the real prompts, not the seed's 40
            lines.append(f"  not checked here: dpo.held_out = {cfg.dpo.held_out} against the number of prompts")
            cfg.dpo.held_out = 2
    for s in stages:
        lines.append(f"  {s}: inputs valid ({plan_summary(stage_module(s).validate(cfg))})")
    dims = model_dims(cfg.model.name_or_path)
    cuda = on_cuda(cfg) if target is None else target == "cuda"
    dev = cfg.model.device_memory_gb
    if dims is None:
        lines.append("memory: unknown model dims (no local config.json); estimate skipped")
        need = 10.0
    else:
        lines.append(f"memory estimate per stage ({'CUDA' if cuda else 'CPU'}; device "
                     f"{str(dev) + ' GiB' if dev else 'memory not configured'}):")
        phases = [p for s in stages for p in ([s, "dpo-generate"] if s == "dpo" and not cfg.dpo.pairs_file else [s])]
        for s in phases:  # dpo-generate: critique-and-rewrite on the merged 16-bit model (never a 4-bit one)
            est = estimate(cfg, s, dims, on_cuda=cuda)
            lines.append("  " + est.line(dev))
            if dev and est.gib > 0.9 * dev:
                lines.append(f"  WARNING: {s} needs ~{est.gib:.1f} GiB, above 90% of the configured {dev:g} GiB")
        import torch

        from staged_alignment.core.models import merged_dtype

        merged_bytes = 4 if merged_dtype(cfg.model, "cuda" if cuda else "cpu") == torch.float32 else 2
        need = 3 * dims["params"] * merged_bytes / GiB + 1.0  # three merged models in the merge precision
    lines.append("disk: " + check_output_dir(cfg, need, elsewhere=target is not None))
    return lines


def stage_inputs(cfg: PipelineConfig, name: str) -> dict:
    return {k: path_sha256(v) for k, v in stage_module(name).input_paths(cfg).items()}


def run_pipeline(args) -> int:
    setup_logging()
    if args.target and not args.dry_run:
        print("error: command line: --target only goes with --dry-run (validate a recipe for another machine)",
              file=sys.stderr)
        return 2
    if args.smoke:
        try:
            extra, rows = smoke_plan(raw_config(args.config, args.overrides), str(args.config))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"smoke run of {args.config} on this CPU with the embedded model; what changes:\n"
              f"{format_table(rows)}\n", flush=True)
        args.overrides = list(args.overrides) + extra  # the smoke mapping wins over the recipe and the overrides
        os.environ["WANDB_MODE"] = "offline"

        if not needs_network(raw_config(args.config, args.overrides)):  # the recipe with the smoke overrides
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no source is fetched: nothing else needs the Hub
    try:
        cfg = load_config(args.config, args.overrides, target=args.target)
        stages = enabled_stages(cfg)
        if args.from_stage and args.from_stage not in stages:
            raise ConfigError(cfg.source_path, None, "--from-stage", f"{args.from_stage!r} is not an enabled stage "
                                                                     f"({stages})")
        plan = validate_plan(cfg, stages, target=args.target)
        launcher = parse_launcher(args.launcher)
    except (ConfigError, DataError, PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permission, name too long, not a regular file: one line naming the file
        print(os_error_line(e), file=sys.stderr)
        return 2
    print("\n".join(plan), flush=True)
    if args.dry_run:
        print("dry run: plan valid, nothing trained")
        return 0

    try:  # every check is done: the run folder is locked, then written
        with RunLock(cfg.run_dir):
            return _run_stages(args, cfg, stages, launcher)
    except RunFolderBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def parse_launcher(text: str | None) -> list[str]:
    """``--launcher`` as an argument list (default: this Python). Raises :class:`ConfigError` (before anything is
    written) when it does not split as a shell command (an unclosed quote), is empty, or names a program that is
    neither on ``PATH`` nor an executable file."""
    if text is None:
        return [sys.executable]
    try:
        parts = shlex.split(text)
    except ValueError as e:
        raise ConfigError("command line", None, "--launcher", f"{text!r} is not a command ({e})") from None
    if not parts:
        raise ConfigError("command line", None, "--launcher", "is empty; give a command such as "
                                                             "\"accelerate launch --num_processes 2\"")
    if shutil.which(parts[0]) is None:
        raise ConfigError("command line", None, "--launcher", f"{parts[0]!r} is not an executable program on PATH")
    return parts


def _run_stages(args, cfg: PipelineConfig, stages: list[str], launcher: list[str]) -> int:
    """Run the enabled stages in order (the run folder is locked by the caller); returns the exit code."""
    atomic_write_text(cfg.run_dir / "resolved_config.yaml", resolved_yaml(cfg))
    manifest = Manifest(cfg.run_dir)
    redo_from = 0 if args.force else (stages.index(args.from_stage) if args.from_stage else len(stages))
    public_overrides, secret_overrides = split_secret_overrides(list(args.overrides))
    timings = {}
    hub_failed = False
    for i, name in enumerate(stages):
        inputs = stage_inputs(cfg, name)
        if i < redo_from and manifest.is_done(name, cfg.config_hash(name), inputs):
            print(f"[{name}] done with the same config and inputs: skipped", flush=True)
            continue
        if i >= redo_from:  # the stage starts fresh: no checkpoint or record of an earlier attempt is reused
            manifest.update(name, status="pending", redo=True)
        script = Path(stage_module(name).__file__)
        cmd = launcher + [str(script), "--config", str(args.config), *public_overrides]
        shown = " ".join(shlex.quote(c) for c in cmd) + (f"  (+{len(secret_overrides)} override(s) holding a "
                                                          f"credential, passed in ${SECRET_OVERRIDES_ENV})"
                                                          if secret_overrides else "")
        print(f"[{name}] running: {redact(shown)}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=os.getcwd(), env=child_env(secret_overrides))
        timings[name] = time.time() - t0
        if rc == 3:  # stage done, Hub push failed: local artifacts are saved, go on and report at the end
            hub_failed = True
            rc = 0
        if rc != 0:
            print(f"error: stage {name} exited with {rc}; rerun the same command to resume", file=sys.stderr)
            return rc
        print(f"[{name}] finished in {timings[name]:.0f} s", flush=True)
    print_summary(cfg, manifest)
    if hub_failed:
        print("error: at least one Hub push failed (see above); every local artifact is saved", file=sys.stderr)
        return 3
    return 0


def print_summary(cfg: PipelineConfig, manifest) -> None:
    """Stage times, the metrics table and the report path."""
    data = manifest.read()["stages"]
    print("\nstage times: " + ", ".join(f"{k} {v.get('seconds', '?')} s" for k, v in data.items()))
    metrics = cfg.run_dir / "eval" / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())

        print("\n" + metrics_table(m))
        if m.get("paired"):
            print("\n" + paired_table(m["paired"]))
    report = cfg.run_dir / "eval" / "report.md"
    if report.exists():
        print(f"\nreport: {report}")


def main(argv=None) -> int:
    ap = CliParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--dry-run", action="store_true", help="validate the plan, print estimates, exit")
    ap.add_argument("--from-stage", choices=ORDER, help="redo this stage and every later one")
    ap.add_argument("--force", action="store_true", help="redo every stage")
    ap.add_argument("--smoke", action="store_true", help="run this recipe shrunk on the CPU with the embedded model "
                    "(a few steps and rows per stage; prints what changes)")
    ap.add_argument("--target", choices=["cuda", "cpu"], help="with --dry-run: validate for this device (e.g. a GPU "
                    "recipe on a laptop) and estimate its memory there")
    ap.add_argument("--launcher", help='command that runs a stage script, e.g. "accelerate launch --config_file '
                                       'accelerate_config.yaml" (default: this python)')
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    try:
        args = ap.parse(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_pipeline(args)


if __name__ == "__main__":
    raise SystemExit(main())
