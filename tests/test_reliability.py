"""Numerical faults and signals: a NaN loss stops training with the last good checkpoint kept; SIGTERM saves."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from staged_alignment.core.callbacks import LossGuardCallback, NonFiniteLossError
from tests.conftest import REPO, write_tiny_pipeline_config


def _sft_trainer(tiny_model_dir, out, max_steps=6, save_steps=2):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from staged_alignment.core.callbacks import SigtermCheckpointCallback
    from staged_alignment.core.chat_template import apply_template
    from staged_alignment.core.config import LoraSection
    from staged_alignment.core.models import lora_config
    from staged_alignment.data_builders.sft_data import read_sft_file
    from staged_alignment.trainers.sft import ZephyrSFTTrainer

    tok = apply_template(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    rows = read_sft_file(str(REPO / "data_builders/seed/sft_seed.jsonl"))
    args = SFTConfig(output_dir=str(out), max_steps=max_steps, save_steps=save_steps, per_device_train_batch_size=2,
                     use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", logging_steps=1,
                     assistant_only_loss=True, max_length=192, save_strategy="steps")
    return ZephyrSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            peft_config=lora_config(LoraSection(r=4, alpha=8, dropout=0.0)),
                            callbacks=[LossGuardCallback(), SigtermCheckpointCallback()])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tmp_path):
    trainer = _sft_trainer(tiny_model_dir, tmp_path / "ck")
    lm_head = trainer.model.get_base_model().lm_head
    from transformers import TrainerCallback

    # TRL's fused LM head reads the head's weight directly: poison the (frozen) weight after step 2

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                with torch.no_grad():
                    lm_head.weight.fill_(float("nan"))

    trainer.add_callback(Poison())
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        trainer.train()
    ckpts = sorted(p.name for p in (tmp_path / "ck").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2"], ckpts
    from safetensors.torch import load_file

    state = load_file(tmp_path / "ck" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values()), "the kept checkpoint must be the last good one"


def test_loss_guard_explosion_and_nan():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    g = LossGuardCallback(explode_factor=5.0, warmup=2)
    args, state, ctl = TrainingArguments(output_dir="/tmp/x", report_to="none"), TrainerState(), TrainerControl()
    for loss in (2.0, 1.0, 1.5, 4.0):
        g.on_log(args, state, ctl, logs={"loss": loss})
    with pytest.raises(NonFiniteLossError, match="exploded"):
        g.on_log(args, state, ctl, logs={"loss": 5.5})  # > 5 × best (1.0)
    with pytest.raises(NonFiniteLossError, match="nan"):
        LossGuardCallback().on_log(args, state, ctl, logs={"loss": float("nan")})
    LossGuardCallback(explode_factor=None).on_log(args, state, ctl, logs={"loss": 1e9})  # disabled: no error


def test_sigterm_saves_checkpoint_and_rerun_resumes(tiny_model_dir, tmp_path):
    cfg = write_tiny_pipeline_config(tmp_path, tiny_model_dir)
    text = cfg.read_text().replace("    max_steps: 4\n", "    max_steps: 400\n", 1).replace(
        "    save_steps: 2\n", "    save_steps: 1000\n", 1)
    cfg.write_text(text)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    errlog = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "stages/stage0_sft.py"), "--config", str(cfg)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=errlog, text=True)
    ckdir = tmp_path / "runs" / "tiny" / "sft" / "checkpoints"
    deadline = time.time() + 120
    seen_step = False
    while time.time() < deadline:  # wait until training is under way (TRL logs a step)
        line = proc.stdout.readline()  # the Trainer prints each log dict to stdout
        if "'loss'" in line:
            seen_step = True
            break
    assert seen_step, "training never started"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    err = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 143, err[-2000:]
    ckpts = list(ckdir.glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").exists()
    step = json.loads((ckpts[0] / "trainer_state.json").read_text())["global_step"]
    assert 0 < step < 400
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["status"] == "failed"
    # rerun with a reachable max_steps (a resume-safe change): resumes from the checkpoint and finishes
    cfg.write_text(text.replace("    max_steps: 400\n", f"    max_steps: {step + 2}\n", 1))
    r = subprocess.run([sys.executable, str(REPO / "stages/stage0_sft.py"), "--config", str(cfg)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming SFT from {ckpts[0]}" in r.stderr
    hist = json.loads((tmp_path / "runs" / "tiny" / "sft" / "log_history.json").read_text())
    steps = [h["step"] for h in hist if "loss" in h]
    assert steps == list(range(1, step + 3))  # 1..k restored from the checkpoint, k+1, k+2 trained after it
    # a change that is not resume-safe (learning rate) starts fresh: the old checkpoints are removed
    cfg.write_text(text.replace("    max_steps: 400\n", "    max_steps: 2\n", 1).replace(
        "    learning_rate: 1.0e-3\n", "    learning_rate: 5.0e-4\n", 1))
    from staged_alignment.core.run_dir import Manifest

    Manifest(tmp_path / "runs" / "tiny").update("sft", status="failed")  # as if the finished run had been killed
    r = subprocess.run([sys.executable, str(REPO / "stages/stage0_sft.py"), "--config", str(cfg)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resuming SFT" not in r.stderr, r.stderr[-3000:]
    hist = json.loads((tmp_path / "runs" / "tiny" / "sft" / "log_history.json").read_text())
    assert [h["step"] for h in hist if "loss" in h] == [1, 2]
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["status"] == "done"


def test_last_checkpoint_skips_a_checkpoint_cut_off_mid_save(tmp_path):
    from staged_alignment.core.common import last_checkpoint

    assert last_checkpoint(tmp_path / "none") is None
    for step, complete in ((2, True), (4, True), (10, False), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()  # not a step folder
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")  # 10 and 6 were cut off, 4 is whole
