"""Security: safetensors only, weights_only loads, trust_remote_code off, tokens never written, escaping."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, write_tiny_pipeline_config

PLANTED_HF = "hf_PLANTEDsecretTOKEN0123456789abcdef"
PLANTED_WANDB = "wandbPLANTEDkey0123456789abcdef0123456789"


def _project_sources():
    for d in ("stages", "trainers", "data_builders", "evaluation", "bench"):
        yield from (REPO / d).rglob("*.py")


def test_no_unsafe_deserialisation_in_sources():
    offenders = []
    for f in _project_sources():
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{f}: torch.load without weights_only=True")
        if re.search(r"\bpickle\.loads?\(|\bjoblib\.load\(", text):
            offenders.append(f"{f}: pickle/joblib load")
        if re.search(r"trust_remote_code\s*=\s*True", text):
            offenders.append(f"{f}: trust_remote_code hard-coded on")
        if re.search(r"torch\.save\(", text):
            offenders.append(f"{f}: torch.save (use safetensors)")
    assert not offenders, offenders


def test_trust_remote_code_default_off_and_logged(tiny_model_dir, caplog):
    from staged_alignment.core.config import ModelSection
    from staged_alignment.core.models import load_tokenizer

    assert ModelSection().trust_remote_code is False
    with caplog.at_level("WARNING"):
        load_tokenizer(str(tiny_model_dir), ModelSection(trust_remote_code=True))
    assert "trust_remote_code is ON" in caplog.text


def test_model_card_escapes_untrusted_text(tmp_path):
    from staged_alignment.core.config import PipelineConfig
    from staged_alignment.core.hub import escape_md, model_card

    cfg = PipelineConfig(run_name="r")
    cfg.sft.data = [{"path": "<script>alert(1)</script>.jsonl"}]
    card = model_card(cfg, "sft", {"note": "| injected | row |"}, ["<img src=x onerror=y>"])
    assert "<script>" not in card and "<img" not in card and "&lt;img" in card
    assert "\\| injected \\| row \\|" in card
    assert escape_md("a*b_c") == "a\\*b\\_c"


def _grep_tree(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hits += [f"{f}: {n[:8]}…" for n in needles if n.encode() in data]
    return hits


def test_tokens_never_written_and_offline_push_fails_fast(tiny_model_dir, tmp_path):
    """A real SFT stage run with planted tokens, logging to W&B (offline) and TensorBoard: push fails fast
    offline, artifacts saved, no token in any file the run writes (W&B's offline run and config included)."""
    cfg = write_tiny_pipeline_config(tmp_path, tiny_model_dir, extra="hub:\n  push_to_hub: true\n"
                                                                     "logging:\n  report_to: [wandb, tensorboard]\n")
    cfg.write_text(cfg.read_text().replace("sft:\n", "sft:\n  hub_model_id: someone/tiny-sft\n", 1))
    env = dict(os.environ, HF_TOKEN=PLANTED_HF, WANDB_API_KEY=PLANTED_WANDB, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    for k in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(REPO / "stages/stage0_sft.py"), "--config", str(cfg)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "push of the sft adapter to someone/tiny-sft failed" in errors[0]
    run = tmp_path / "runs" / "tiny"
    assert (run / "sft" / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "sft" / "merged" / "config.json").exists()
    upload = run / "sft" / "hub_upload"
    assert (upload / "README.md").exists() and (upload / "adapter_model.safetensors").exists()
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt")) or all(
        "optimizer.pt" in str(p) or "scheduler.pt" in str(p) or "rng_state" in str(p) or "training_args.bin" in str(p)
        for p in list(run.rglob("*.bin")) + list(run.rglob("*.pt")))
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, "one offline W&B run per stage, under the run directory"
    records = next(wandb_runs[0].glob("run-*.wandb")).read_bytes()  # the offline run: config, name, history
    assert b"learning_rate" in records and b"tiny-sft" in records  # run named <run_name>-<stage>
    assert list(run.rglob("events.out.tfevents.*")), "TensorBoard events written too"
    assert not _grep_tree(run, [PLANTED_HF, PLANTED_WANDB])
    assert PLANTED_HF not in r.stdout + r.stderr and PLANTED_WANDB not in r.stdout + r.stderr


def test_push_dry_run_writes_exact_upload_folder(tmp_path):
    from staged_alignment.core.config import PipelineConfig
    from staged_alignment.core.hub import push_stage_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    head = tmp_path / "causal_projection.safetensors"
    head.write_bytes(b"h")
    cfg = PipelineConfig(run_name="r", output_dir=str(tmp_path / "runs"))
    cfg.hub.push_dry_run = True
    with pytest.raises(ValueError, match="hub_model_id"):
        push_stage_adapter(cfg, "causal", adapter, {})
    cfg.causal.hub_model_id = "me/causal"
    out = push_stage_adapter(cfg, "causal", adapter, {"loss": 0.5}, extra_files=[head])
    assert sorted(p.name for p in Path(out).iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "causal_projection.safetensors",
        "training_metrics.json"]
    assert "Causal contrastive" in (Path(out) / "README.md").read_text()
