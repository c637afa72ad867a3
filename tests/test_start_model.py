"""Stages that stand alone: DPO, the causal stage and evaluation start from a model folder, a Hub id (offline, from
a local cache laid out like the Hub's) or a LoRA adapter; a missing upstream is one located error, exit 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hub_cache(root: Path, repo_id: str, src: Path) -> Path:
    """A Hugging Face hub cache holding ``src`` as ``repo_id``'s main snapshot (models--org--name/…)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    return snap


@pytest.fixture()
def adapter_dir(tmp_path, tiny_model_dir):
    """A LoRA adapter (random B, so it changes the model) saved with its base = the tiny model folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    out = tmp_path / "adapter"
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    return out


def test_check_start_kinds_and_errors(tmp_path, tiny_model_dir, adapter_dir, monkeypatch):
    from staged_alignment.core.start_model import check_start

    def err(m):
        return ValueError(m)

    assert check_start(str(tiny_model_dir), err)["kind"] == "model"
    a = check_start(str(adapter_dir), err)
    assert a["kind"] == "adapter" and a["base"] == str(tiny_model_dir)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at call time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        check_start("org/not-cached", err)
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub id"):
        check_start(str(tmp_path / "nothing" / "here"), err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a complete model folder"):
        check_start(str(tmp_path / "empty"), err)


def test_hub_id_and_adapter_materialize_offline(tmp_path, tiny_model_dir, adapter_dir, monkeypatch):
    """A Hub id resolves to the cached snapshot; an adapter Hub repo whose base is a Hub id merges into a model whose
    logits equal the adapter's; a second call reuses the merge."""
    import huggingface_hub.constants
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from staged_alignment.core.config import ModelSection
    from staged_alignment.core.start_model import check_start, materialize

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read at call time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_snap = _hub_cache(hub, "org/tiny-base", tiny_model_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    conf = json.loads(cfg_path.read_text())
    conf["base_model_name_or_path"] = "org/tiny-base"
    cfg_path.write_text(json.dumps(conf))
    _hub_cache(hub, "org/tiny-lora", adapter_dir)
    mcfg = ModelSection(name_or_path=str(tiny_model_dir))
    assert materialize("org/tiny-base", tmp_path / "unused", mcfg) == base_snap
    assert check_start("org/tiny-lora", ValueError)["kind"] == "adapter"
    merged = materialize("org/tiny-lora", tmp_path / "start", mcfg)
    assert merged == tmp_path / "start" and json.loads((merged / "start_model.json").read_text())["spec"] == \
        "org/tiny-lora"
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                    str(adapter_dir)).eval()
    got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(ids).logits
    assert not torch.allclose(got(ids).logits, plain, atol=1e-3)  # the adapter did change the model
    mtime = (merged / "model.safetensors").stat().st_mtime_ns
    assert materialize("org/tiny-lora", tmp_path / "start", mcfg) == merged
    assert (merged / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not merged again


def _stage(script: str, cfg: Path, *args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(ROOT / "stages" / script), "--config", str(cfg), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_dpo_alone_without_sft_is_one_located_error(tmp_path, tiny_model_dir):
    from conftest import write_tiny_pipeline_config

    cfg = write_tiny_pipeline_config(tmp_path, tiny_model_dir)
    proc = _stage("stage1_dpo.py", cfg)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "dpo.base_model" in last and "run the SFT stage first" in last, last
    proc = _stage("stage2_causal.py", cfg)
    assert proc.returncode == 2 and "causal.base" in proc.stderr.strip().splitlines()[-1]


def test_dpo_stage_from_a_model_folder_no_sft_produced_then_evaluate_its_adapter(tmp_path, tiny_model_dir):
    """The issue's demonstration: DPO on an existing model folder (no SFT run), then evaluate.py on the adapter
    folder it wrote (merged into its base on the fly)."""
    from conftest import write_tiny_pipeline_config

    from staged_alignment.core.models import is_complete_adapter_dir, is_complete_model_dir

    cfg = write_tiny_pipeline_config(tmp_path, tiny_model_dir)
    proc = _stage("stage1_dpo.py", cfg, f"--base_model={tiny_model_dir}", "--max_prompts", "6")
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "tiny"
    assert not (run / "sft").exists()  # no SFT stage ran
    assert is_complete_adapter_dir(run / "dpo" / "adapter") and is_complete_model_dir(run / "dpo" / "merged")
    adapter_base = json.loads((run / "dpo" / "adapter" / "adapter_config.json").read_text())
    assert adapter_base["base_model_name_or_path"] == str(tiny_model_dir)
    out = tmp_path / "eval"
    proc = _stage("evaluate.py", cfg, "--model", f"dpo_adapter={run / 'dpo' / 'adapter'}", "--output", str(out),
                  "evaluate.max_cases=4", "evaluate.max_redteam=4", "evaluate.max_benign=4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "dpo_adapter" in metrics["models"]
    assert metrics["settings"]["model_paths"]["dpo_adapter"] == str(out / "models" / "dpo_adapter")
    assert is_complete_model_dir(out / "models" / "dpo_adapter")


def test_memory_estimate_reads_dims_from_the_hub_cache_before_the_table(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub.constants

    from staged_alignment.core.memory import KNOWN, model_dims

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_dims("org/unknown-model") is None
    _hub_cache(tmp_path / "hub", "org/unknown-model", tiny_model_dir)
    d = model_dims("org/unknown-model")
    conf = json.loads((tiny_model_dir / "config.json").read_text())
    assert d["hidden"] == conf["hidden_size"] and d["layers"] == conf["num_hidden_layers"]
    assert model_dims("Qwen/Qwen2.5-32B") == KNOWN["Qwen/Qwen2.5-32B"]  # not cached here: the table's fallback


def test_dpo_prompt_sources_keep_urls_and_hub_ids_as_written():
    from staged_alignment.core.config import PipelineConfig
    from staged_alignment.evaluation.safety import dpo_prompt_sources as _sources

    cfg = PipelineConfig()
    url = "https://raw.githubusercontent.com/o/r/0123/redteam.jsonl"
    cfg.dpo.prompts = [{"path": url}, {"path": "Anthropic/hh-rlhf", "data_dir": "harmless-base"},
                       {"path": "data_builders/seed/redteam_prompts.jsonl"}]
    got = [s["path"] for s in _sources(cfg)]
    assert got[:2] == [url, "Anthropic/hh-rlhf"] and got[2].endswith("data_builders/seed/redteam_prompts.jsonl")
