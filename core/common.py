"""What every stage script shares: the command line, logging, seeding and building TRL/HF training args."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import gc
import logging
import os
import random
import re
import shutil
import sys
import time
import types
import typing
from pathlib import Path

import numpy as np

from staged_alignment.core.config import CliParser, ConfigError, PipelineConfig, finite_or_error, load_config
from staged_alignment.core.hub import HubPushError, push_stage_adapter, pushed_key
from staged_alignment.core.jsonl_io import DataError, atomic_directory, atomic_write_json, os_error_line
from staged_alignment.core.redaction import install_log_redaction, overrides_from_env
from staged_alignment.core.run_dir import Manifest, RunFolderBusy, RunLock, path_sha256
from staged_alignment.core.stage import Stage
from staged_alignment.core.start_model import check_models

log = logging.getLogger("staged_alignment")


def stage_cli(description: str, argv=None, stage: str | None = None) -> tuple[argparse.Namespace, PipelineConfig]:
    """Parse ``--config C [key=value …] [--key value …]`` and load/validate the config. Exits with code 2 on a bad
    config. ``stage`` (the script's stage) lets ``--learning_rate 1e-5`` mean ``<stage>.training.learning_rate``
    (:meth:`core.config.CliParser.flag_to_override`)."""
    ap = CliParser(description=description, stage=stage)
    ap.add_argument("--config", required=True, help="pipeline YAML (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sft.training.max_steps=5; or "
                    "flags: --sft.training.max_steps 5, and on a stage script --learning_rate 1e-5 (its training "
                    "args), --max_prompts 8 (its section), --model_name_or_path M, --lora_r 8")
    setup_logging()
    try:
        args = ap.parse(argv)
        args.overrides = list(args.overrides) + overrides_from_env()  # secret overrides the pipeline passed
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return args, cfg


def setup_logging(level: int = logging.INFO) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    install_log_redaction()  # credentials in values (URL user-info, hf_/sk- tokens) never reach a log line


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def on_cuda(cfg: PipelineConfig) -> bool:
    import torch

    return cfg.device != "cpu" and torch.cuda.is_available()


def build_training_args(cls, cfg: PipelineConfig, section: str, output_dir: str | Path, **defaults):
    """Build ``cls`` (``trl.SFTConfig``, ``trl.DPOConfig`` or ``TrainingArguments``) from ``cfg.<section>.training``.

    Project defaults go first, then ``defaults``, then the user's keys. On CPU: fp32 (``bf16=False``) and no
    gradient checkpointing, because TRL's bf16 default is ~30x slower on CPU. On CUDA: bf16 where supported
    and gradient checkpointing with QLoRA. Unknown keys raise :class:`ConfigError` naming the YAML line
    (through ``HfArgumentParser.parse_dict(allow_extra_keys=False)``).
    """
    import torch
    from transformers import HfArgumentParser

    cuda = on_cuda(cfg)
    base = dict(output_dir=str(output_dir), seed=cfg.seed, logging_steps=cfg.logging.logging_steps,
                report_to=[r for r in cfg.logging.report_to if r != "none"] or "none",
                run_name=f"{cfg.run_name}-{section}", save_strategy="steps", save_steps=50, save_total_limit=2,
                bf16=bool(cuda and torch.cuda.is_bf16_supported()),
                fp16=bool(cuda and not torch.cuda.is_bf16_supported()),
                gradient_checkpointing=bool(cuda and cfg.model.quantization == "4bit"),
                use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=False,
                logging_first_step=True)
    base.update(defaults)
    user = check_training_section(cls, cfg, section)
    base.update(user)
    field_names = {f.name for f in dataclasses.fields(cls)}
    base = {k: v for k, v in base.items() if k in field_names or k in user}
    try:
        (args,) = HfArgumentParser(cls).parse_dict(base, allow_extra_keys=False)
    except (ValueError, TypeError) as e:
        raise ConfigError(cfg.source_path, cfg.line_of(f"{section}.training"), f"{section}.training", str(e)) from None
    return args


# range rules for training keys: (lowest, highest, lowest included); values of other keys are only type-checked
TRAINING_RANGES = {
    "learning_rate": (0.0, 1.0, False), "num_train_epochs": (0.0, 10 ** 5, False),
    "per_device_train_batch_size": (1, 1 << 16, True), "per_device_eval_batch_size": (1, 1 << 16, True),
    "gradient_accumulation_steps": (1, 1 << 16, True), "max_steps": (-1, 10 ** 9, True),
    "seed": (0, 2 ** 32 - 1, True), "data_seed": (0, 2 ** 32 - 1, True),
    "warmup_ratio": (0.0, 1.0, True), "warmup_steps": (0.0, None, True), "weight_decay": (0.0, None, True),
    "max_grad_norm": (0.0, None, True), "adam_beta1": (0.0, 1.0, True), "adam_beta2": (0.0, 1.0, True),
    "adam_epsilon": (0.0, None, False), "logging_steps": (0.0, None, False), "save_steps": (0.0, None, False),
    "eval_steps": (0.0, None, False), "save_total_limit": (1, None, True), "dataloader_num_workers": (0, None, True),
    "beta": (0.0, None, False), "label_smoothing": (0.0, 0.5, True), "rpo_alpha": (0.0, None, True),
    "max_length": (1, None, True), "max_prompt_length": (1, None, True), "max_completion_length": (1, None, True),
    "eval_accumulation_steps": (1, None, True),
}
LENGTH_KEYS = ("max_length", "max_prompt_length", "max_completion_length")


def _coerce(value, ann, where):
    """``value`` converted to the type ``ann`` declares, or ``where(message)`` raised.

    YAML reads ``3e-4`` (no dot) and quoted numbers as strings: a string that parses as the declared number is
    converted; ``"abc"`` is refused. An integral float becomes an int where an int is declared (``16.0``); ``1.5``
    does not. NaN and ±inf are refused. Types with no rule here (enums, lists, dicts) are left to TRL.
    """
    args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    if value is None:
        if type(None) in args:
            return None
        raise where("null is not allowed here")
    numeric = [t for t in (int, float) if t in args]
    if isinstance(value, list):
        elem = [typing.get_args(a)[0] for a in args if typing.get_origin(a) is list and typing.get_args(a)]
        if elem and elem[0] in (str, int, float, bool) and not all(isinstance(v, elem[0]) for v in value):
            raise where(f"expected a list of {elem[0].__name__}, got {value!r}")
        if not elem and list not in args and typing.get_origin(ann) is not list and (numeric or str in args):
            raise where(f"expected {'a number' if numeric else 'a string'}, got a list ({value!r})")
        return value
    if isinstance(value, bool):
        if numeric and bool not in args:
            raise where(f"expected a number, got {value!r}")
        return value
    if args == (bool,):
        raise where(f"expected true or false, got {value!r}")
    if not numeric or str in args:
        return value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise where(f"expected {'an integer' if numeric == [int] else 'a number'}, got the string "
                        f"{value!r}") from None
    if not isinstance(value, (int, float)):
        raise where(f"expected a number, got {type(value).__name__} ({value!r})")
    finite_or_error(value, where)
    if numeric == [int] and isinstance(value, float):
        if not value.is_integer():
            raise where(f"expected an integer, got {value!r}")
        value = int(value)
    if numeric == [float]:
        value = float(value)
    return value


def check_training_section(cls, cfg: PipelineConfig, section: str) -> dict:
    """``cfg.<section>.training`` with every value converted to the type ``cls`` declares and range-checked.

    ``cls`` is ``trl.SFTConfig``, ``trl.DPOConfig`` or ``transformers.TrainingArguments``; the types come from its
    dataclass fields. Ranges: :data:`TRAINING_RANGES`; ``max_steps`` is ≥ 1 or exactly -1 (train by epochs:
    transformers' own default; 0 or -5 would silently fall back to 3 epochs); lengths are at most the model's
    position limit (from its ``config.json``). Raises :class:`ConfigError` naming the file, line and field.
    """
    user = getattr(cfg, section).training
    if not isinstance(user, dict):
        raise cfg.error(f"{section}.training", f"expected a mapping, got {type(user).__name__}")
    hints = typing.get_type_hints(cls)
    limit = None
    out = {}
    for key, value in user.items():
        dotted = f"{section}.training.{key}"

        def where(msg, dotted=dotted):
            return ConfigError(cfg.source_path, cfg.line_of(dotted), dotted, msg)

        if key not in hints or key.startswith("_"):
            raise where(f"unknown key for {cls.__name__}")
        value = _coerce(value, hints[key], where)
        if key == "max_steps" and not (value >= 1 or value == -1):
            raise where(f"{value}: use ≥ 1, or -1 to train for num_train_epochs")
        rule = TRAINING_RANGES.get(key)
        if rule and isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi, closed = rule
            if (value < lo if closed else value <= lo) or (hi is not None and value > hi):
                span = f"{'[' if closed else '('}{lo}, {hi if hi is not None else '∞'}{']' if hi is not None else ')'}"
                raise where(f"{value} is outside {span}")
        if key in LENGTH_KEYS and isinstance(value, int):
            if limit is None:
                from staged_alignment.core.models import model_position_limit

                limit = model_position_limit(cfg) or 0
            if limit and value > limit:
                raise where(f"{value} is above the model's maximum of {limit} positions")
        out[key] = value
    user.update(out)  # every later reader (memory estimate, resolved config) sees the typed values
    return out


def process_state(cfg: PipelineConfig):
    """accelerate's ``PartialState`` (a singleton) for this launch: rank, world size and the barrier.

    ``cpu`` follows the config as in :func:`build_training_args` (``use_cpu``), so on a CPU-only or ``device: cpu``
    multi-process launch the state is ``MULTI_CPU`` over gloo (with ``cpu=False`` on a machine without CUDA every
    rank would call itself process 0). When the stage's ``TrainingArguments`` already created the state (and the
    process group, with ``<stage>.training.ddp_timeout``), that state is returned unchanged. On one process:
    ``is_main_process`` is True, ``num_processes`` is 1, ``wait_for_everyone()`` returns at once and
    ``main_process_first()`` just runs its block; no process group is created.
    """
    from accelerate import PartialState

    return PartialState(cpu=not on_cuda(cfg))


def main_process_only(cfg: PipelineConfig, what: str) -> bool:
    """Gate for work that is not distributed (evaluation): True on the process that should do it.

    On one process: True at once. Under a multi-process launch every process meets at a barrier, then only the
    main process goes on (True); the others log that they leave the work to it and get False (they should exit 0
    and must not meet the main process at any later barrier).
    """
    state = process_state(cfg)
    if state.num_processes <= 1:
        return True
    state.wait_for_everyone()
    if state.is_main_process:
        log.info("%s is not distributed: the main process runs it alone (%d launched processes; the others exit)",
                 what, state.num_processes)
        return True
    log.info("%s is not distributed: process %d of %d exits, the main process runs it", what, state.process_index,
             state.num_processes)
    return False


def report_to_env(cfg: PipelineConfig, stage: str) -> None:
    """Set W&B project/group/run names from the config (each stage one run, in one group per pipeline run)."""
    if "wandb" in cfg.logging.report_to:
        os.environ.setdefault("WANDB_PROJECT", cfg.logging.wandb_project)
        os.environ["WANDB_RUN_GROUP"] = cfg.logging.wandb_group or cfg.run_name
        os.environ["WANDB_NAME"] = f"{cfg.run_name}-{stage}"
        os.environ.setdefault("WANDB_DIR", str(cfg.run_dir))


def last_checkpoint(folder: str | Path) -> str | None:
    """Newest complete ``checkpoint-N`` folder in ``folder``, or None.

    Complete = it holds ``trainer_state.json`` (the Trainer writes it last); a checkpoint cut off mid-save is
    skipped in favour of the previous complete one, so a kill during a save never costs earlier steps.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    ckpts = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    for _, p in sorted(ckpts, reverse=True):
        if (p / "trainer_state.json").exists():
            return str(p)
    return None


def standard_callbacks(cfg: PipelineConfig) -> list:
    """Loss guard (NaN/inf/explosion) and SIGTERM checkpointing, for every stage's trainer."""
    from staged_alignment.core.callbacks import LossGuardCallback, SigtermCheckpointCallback

    return [LossGuardCallback(), SigtermCheckpointCallback()]


def raise_if_terminated(trainer) -> None:
    """After ``trainer.train()``: exit 143 if training stopped because of SIGTERM (checkpoint already saved)."""
    from staged_alignment.core.callbacks import SigtermCheckpointCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, SigtermCheckpointCallback) and cb.requested:
            log.warning("stopped by SIGTERM after saving %s; rerun to resume", trainer.args.output_dir)
            raise SystemExit(143)


def save_adapter(model, tokenizer, out_dir: str | Path, extra_files: dict | None = None,
                 state_dict: dict | None = None) -> Path:
    """Save a peft adapter (safetensors) + tokenizer atomically; ``extra_files`` = {name: writer(path)}.

    ``state_dict``: the full trainable weights gathered by :func:`core.sharded.trainable_state_dict` (every
    process calls that; the main process then calls this). Without it the local module's weights are written,
    which is right only when they are not sharded (one process, DDP)."""
    with atomic_directory(out_dir) as tmp:
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        tokenizer.save_pretrained(tmp)
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
    return Path(out_dir)


def clear_resume_state(paths) -> list[tuple[Path, Path]]:
    """Make a stage start fresh without losing its earlier work: move each checkpoint folder and generated record
    aside as ``<name>.superseded`` (replacing an older one); returns the ``(original, superseded)`` moves.

    Called when the stage's last attempt did not stop part-way with the same config and inputs (first run,
    a finished stage rerun alone, ``--from-stage``/``--force``, or a changed config or input): resuming from
    those checkpoints or records would silently reuse work done under other settings. Nothing is deleted here:
    :func:`run_stage_main` removes the superseded checkpoint folders once the new attempt has finished, and moves
    them back if it fails before writing any of its own (a model that does not load, for instance).
    """
    moved = []
    for p in map(Path, paths):
        if not p.exists():
            continue
        aside = p.with_name(p.name + ".superseded")
        if aside.is_dir():
            shutil.rmtree(aside)
        elif aside.exists():
            aside.unlink()
        log.info("starting fresh: the previous %s is kept as %s until this attempt finishes", p.name, aside.name)
        os.replace(p, aside)
        moved.append((p, aside))
    return moved


def settle_resume_state(moved: list[tuple[Path, Path]], succeeded: bool) -> None:
    """After an attempt that started fresh: on success delete the superseded checkpoint *folders* (records stay as
    ``*.superseded`` files, as before); on failure move back every superseded path whose original the attempt did
    not recreate, so that a failed attempt leaves the earlier work where it was."""
    for original, aside in moved:
        if succeeded:
            if aside.is_dir():
                shutil.rmtree(aside, ignore_errors=True)
        elif not original.exists() and aside.exists():
            os.replace(aside, original)
            log.info("the attempt failed: %s put back", original)


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
DISK_MESSAGES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "file size limit")


def is_disk_error(e: BaseException) -> bool:
    """A full disk or read-only output, as an ``OSError`` or as the message of a library's own error
    (safetensors' ``SafetensorError``, torch's ``RuntimeError`` from a failed save), anywhere in the chain."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return True
        if any(m.lower() in str(e).lower() for m in DISK_MESSAGES):
            return True
        e, seen = (e.__cause__ or e.__context__), seen + 1
    return False


def _record_failure(manifest, name: str, e) -> None:
    """Mark the stage failed in the manifest; a manifest that cannot be written (full disk) is left as it was."""
    try:
        manifest.fail(name, e if isinstance(e, str) else f"{type(e).__name__}: {e}")
    except OSError:
        pass


def run_stage_main(stage: Stage, description: str, argv=None) -> int:
    """Entry point of a stage script: parse the CLI, validate once (no model), run from the plan, record the
    manifest.

    ``stage`` implements :class:`core.stage.Stage` (a stage script module): ``validate(cfg)`` returns the plan
    (raising DataError/ConfigError before any model loads), ``check_upstream(cfg)``, ``input_paths(cfg)``,
    ``resume_state(cfg)`` and ``run(cfg, plan) -> {"outputs": {...}, "metrics": {...}}``. Raises ``TypeError``
    for an object that does not implement it.
    Exit codes: 0 done, 2 bad input or config, 1 failure during the run, 3 done but the Hub push failed
    (local artifacts saved), 4 disk full or output not writable mid-run (earlier outputs intact), 143 stopped
    by SIGTERM.

    Several processes (``accelerate launch``/``torchrun``): every process parses and validates; only the main
    process (accelerate's ``PartialState``, created after ``validate``, which for the training stages has already
    set it up through ``TrainingArguments``) clears the resume state and writes the manifest (start, finish,
    failure); the others wait at a barrier until it has, then every process runs the stage (the stage itself keeps
    its file writes to the main process). A module with ``MAIN_PROCESS_ONLY = True`` (evaluation) runs on the main
    process alone: the others exit 0 after the barrier (:func:`main_process_only`).
    """
    if not isinstance(stage, Stage):
        missing = [m for m in ("STAGE", "MAIN_PROCESS_ONLY", "validate", "check_upstream", "input_paths",
                               "resume_state", "run") if not hasattr(stage, m)]
        raise TypeError(f"{stage!r} is not a stage (core.stage.Stage): it lacks {missing}")
    args, cfg = stage_cli(description, argv, stage=stage.STAGE)
    try:
        from staged_alignment.core.models import import_unsloth_first

        import_unsloth_first(cfg.model)  # before anything imports transformers/trl/peft (check_model does)

        check_models(cfg)
        plan = stage.validate(cfg)
        stage.check_upstream(cfg)  # what an earlier stage must have made
    except (DataError, ConfigError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permission, name too long, not a regular file: one line naming the file
        print(os_error_line(e), file=sys.stderr)
        return 2
    name = stage.STAGE
    alone = stage.MAIN_PROCESS_ONLY
    if alone and not main_process_only(cfg, f"stage {name}"):
        return 0
    state = process_state(cfg)
    main = state.is_main_process
    if not main:
        return _run_stage(stage, cfg, plan, state, main, alone)

    try:  # every check is done: the run folder is locked (a stage the pipeline started shares its lock)
        with RunLock(cfg.run_dir):
            return _run_stage(stage, cfg, plan, state, main, alone)
    except RunFolderBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_stage(stage: Stage, cfg: PipelineConfig, plan, state, main: bool, alone: bool) -> int:
    """The part of :func:`run_stage_main` after validation: manifest, resume state, run, outcome."""
    name = stage.STAGE
    manifest = Manifest(cfg.run_dir) if main else None  # written by the main process only
    moved, before = [], None
    if main:
        inputs = {k: path_sha256(v) for k, v in stage.input_paths(cfg).items()}
        resume_hash = cfg.config_hash(name, for_resume=True)
        before = manifest.read()["stages"].get(name)
        if not manifest.should_resume(name, resume_hash, inputs):
            moved = clear_resume_state(stage.resume_state(cfg))
        manifest.start(name, cfg.config_hash(name), inputs, resume_hash)
    if not alone:  # the others start once checkpoints are cleared (or kept for resuming)
        state.wait_for_everyone()

    def record_failure(e) -> None:
        if not main:
            return
        settle_resume_state(moved, succeeded=False)
        if moved and not any(aside.exists() for _, aside in moved) and before is not None:
            # the attempt wrote nothing of its own: the run folder is as it was, manifest entry included
            manifest.restore(name, before)
            log.info("%s: the attempt failed before writing anything; the run folder is as it was", name)
            return
        _record_failure(manifest, name, e)

    t0 = time.time()
    try:
        result = stage.run(cfg, plan)
    except SystemExit as e:
        record_failure(f"exited with {e.code}")
        raise
    except Exception as e:
        if not is_disk_error(e):
            record_failure(e)
            raise
        # a full disk or a read-only folder mid-run: one clear line; whatever was written before is intact
        # (every output is written atomically), so the same command resumes once space is freed
        record_failure(e)
        what = getattr(e, "filename", None) or "output"
        print(f"error: {name}: cannot write {what}: {getattr(e, 'strerror', None) or e}; earlier outputs are "
              "intact, free space or fix permissions and rerun the same command to resume", file=sys.stderr)
        return 4
    except BaseException as e:
        record_failure(e)
        raise
    if not main:
        return 0
    manifest.finish(name, result.get("outputs", {}), result.get("metrics", {}), seconds=round(time.time() - t0, 1))
    settle_resume_state(moved, succeeded=True)
    hub_error = result.get("outputs", {}).get("hub_error")
    if hub_error:
        print(f"error: {hub_error}", file=sys.stderr)
        return 3
    return 0


def maybe_push(cfg: PipelineConfig, stage: str, adapter_dir, metrics: dict, extra_files=None) -> dict:
    """Push (or dry-run) the stage's adapter when the config asks; returns fields for the manifest outputs.

    Called only after every local artifact is saved. A failed push does not fail the stage: its message is
    returned as ``hub_error`` (the stage then exits 3, see :func:`run_stage_main`).
    """
    if not (cfg.hub.push_to_hub or cfg.hub.push_dry_run):
        return {}

    try:
        where = push_stage_adapter(cfg, stage, adapter_dir, metrics, extra_files=extra_files)
    except (HubPushError, ValueError) as e:
        log.error("%s", e)
        return {"hub_error": str(e)}
    return {pushed_key(cfg): str(where)}


@dataclasses.dataclass
class Trained:
    """What :func:`train_save_merge` returns on the main process: ``result`` (``transformers.TrainOutput``),
    ``log_history`` (as written to ``log_history.json``), the ``adapter`` and ``merged`` folders."""

    result: typing.Any
    log_history: list
    adapter: Path
    merged: Path


def train_save_merge(trainer, cfg: PipelineConfig, state, *, stage: str, out_dir: Path, base: str | os.PathLike,
                     tokenizer, before_train=None, history_prefix=None, extra_files=None) -> Trained | None:
    """Resume → train → save → merge, the sequence the three training stages share.

    Resumes from the last checkpoint under ``trainer.args.output_dir`` (``before_train(ckpt)`` runs first, e.g.
    the causal stage's step-0 evaluation when not resuming), trains, stops on SIGTERM
    (:func:`raise_if_terminated`), gathers the trainable weights on every process (a collective under FSDP /
    ZeRO-3). On the main process only: writes ``out_dir/log_history.json`` (``history_prefix()`` + the trainer's),
    saves the adapter to ``out_dir/adapter`` (``extra_files(weights)``: ``{file name: writer}`` beside it), frees
    the trainer's model and optimizer, and merges the adapter into ``base`` as ``out_dir/merged``. Returns
    :class:`Trained` there and None on the other processes. The caller should hold no reference to the model
    (``del model`` after building the trainer) so the merge has the memory.
    """
    import torch

    from staged_alignment.core.models import merge_adapter
    from staged_alignment.core.sharded import trainable_state_dict

    ckpt = last_checkpoint(trainer.args.output_dir)
    if ckpt:
        log.info("resuming %s from %s", {"sft": "SFT", "dpo": "DPO"}.get(stage, f"the {stage} stage"), ckpt)
    if before_train is not None:
        before_train(ckpt)
    result = trainer.train(resume_from_checkpoint=ckpt)
    raise_if_terminated(trainer)
    weights = trainable_state_dict(trainer)  # every process: a collective under FSDP / ZeRO-3
    if not state.is_main_process:
        log.info("process %d of %d: %s training done; the main process saves and merges", state.process_index,
                 state.num_processes, stage)
        return None
    out_dir = Path(out_dir)
    history = list(history_prefix() if history_prefix is not None else []) + trainer.state.log_history
    atomic_write_json(out_dir / "log_history.json", history)
    save_adapter(trainer.model, tokenizer, out_dir / "adapter",
                 extra_files=extra_files(weights) if extra_files is not None else None, state_dict=weights)
    # free the trained model and optimizer before the merge loads the base: accelerate's prepared objects, the
    # trainer's own attributes and those its callback handler keeps (transformers 5.17 Trainer.train sets them)
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    if hasattr(trainer, "deepspeed"):
        trainer.deepspeed = None
    handler = getattr(trainer, "callback_handler", None)
    for attr in ("model", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader"):
        if hasattr(handler, attr):
            setattr(handler, attr, None)
    del weights
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    merge_adapter(str(base), out_dir / "adapter", out_dir / "merged", cfg.model, tokenizer)
    return Trained(result=result, log_history=history, adapter=out_dir / "adapter", merged=out_dir / "merged")
