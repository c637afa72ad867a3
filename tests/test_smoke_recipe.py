"""``--smoke`` (any recipe shrunk onto this CPU) and ``--dry-run --target cuda`` (a GPU recipe validated here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from staged_alignment.core.smoke import EMBEDDED, smoke_plan

ROOT = Path(__file__).resolve().parents[1]
GPU_RECIPES = ["tinyllama-1.1b_lora-pipeline_rtx3060-12gb.yaml", "llama3.1-8b_qlora-pipeline_rtx3060-12gb.yaml",
               "qwen2.5-32b_qlora-pipeline_a100-80gb.yaml"]


def _plan(data):
    over, rows = smoke_plan(data)
    return {o.split("=", 1)[0]: json.loads(o.split("=", 1)[1]) for o in over}, {r[0]: r for r in rows}


def test_cuda_only_settings_map_to_their_cpu_equivalents_and_are_listed():
    data = {"run_name": "r", "device": "cuda",
            "model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct", "quantization": "4bit", "dtype": "bfloat16",
                      "loader": "unsloth", "attn_implementation": "flash_attention_2", "use_liger_kernel": True,
                      "max_seq_length": 2048, "device_memory_gb": 12},
            "sft": {"data": ["a.jsonl", {"path": "b.jsonl", "max_rows": 5}],
                    "training": {"bf16": True, "optim": "paged_adamw_8bit", "gradient_checkpointing": True,
                                 "gradient_accumulation_steps": 8, "num_train_epochs": 3}},
            "dpo": {"generation": {"backend": "vllm"}, "max_prompts": 500},
            "hub": {"push_to_hub": True}, "logging": {"report_to": ["wandb"]}}
    over, rows = _plan(data)
    assert over["device"] == "cpu" and over["model.name_or_path"] == EMBEDDED
    assert over["model.quantization"] == "none" and over["model.dtype"] == "auto"
    assert over["model.loader"] == "transformers" and over["model.attn_implementation"] == "sdpa"
    assert over["model.use_liger_kernel"] is False and over["dpo.generation.backend"] == "transformers"
    assert over["sft.training.bf16"] is False and over["sft.training.optim"] == "adamw_torch"
    assert over["sft.training.max_steps"] == 2 and over["sft.training.gradient_accumulation_steps"] == 1
    assert over["sft.data"] == [{"path": "a.jsonl", "max_rows": 24}, {"path": "b.jsonl", "max_rows": 5}]  # 5 ≤ 24 kept
    assert over["hub.push_to_hub"] is False and over["hub.push_dry_run"] is True
    assert over["run_name"] == "r-smoke" and over["dpo.max_prompts"] == 8
    assert over["dpo.generation.drop_truncated"] is False
    assert rows["model.quantization"][1:] == ("4bit", "none") and "WANDB_MODE=offline" in rows["logging.report_to"][2]
    # what the recipe keeps: its data sources' paths, its objective, its epochs key (max_steps wins)
    assert "sft.training.num_train_epochs" not in over and "causal.loss" not in str(over)


def test_uncached_hub_datasets_and_urls_offline_get_the_seed_data_of_their_role(monkeypatch):
    """The GPU recipes name Hub datasets and BIPIA's GitHub files; offline and uncached, --smoke stands in the
    shipped seed data of the same role (once per list), lists each replacement, and keeps local sources."""
    import yaml

    from staged_alignment.core.config import load_config
    from staged_alignment.core.smoke import SEED_DIR

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = ROOT / "configs" / GPU_RECIPES[0]
    over, rows = _plan(yaml.safe_load(recipe.read_text()))
    assert over["sft.data"] == [{"path": str(SEED_DIR / "sft_seed.jsonl"), "max_rows": 24}]
    assert over["dpo.prompts"] == [{"path": str(SEED_DIR / "redteam_prompts.jsonl"), "max_rows": 24}]
    assert over["causal.tasks"] == [{"path": str(SEED_DIR / "tasks.jsonl"), "max_rows": 24}]  # three URLs, one seed
    assert over["causal.train_attacks"] == [{"path": str(SEED_DIR / "attacks_train.json"), "max_rows": 24},
                                            {"path": "data_builders/seed/attacks_train_canary.json", "max_rows": 24}]
    assert rows["sft.data.0"][1] == "HuggingFaceH4/ultrachat_200k"
    assert rows["causal.tasks.2"][1].startswith("https://raw.githubusercontent.com/microsoft/BIPIA/")
    assert "not in the local cache, offline: the shipped seed data stands in" in rows["dpo.prompts.0"][2]
    cfg = load_config(recipe, [f"{k}={json.dumps(v)}" for k, v in over.items()])  # the overrides load as a config
    assert [s["path"] for s in cfg.causal.tasks] == [str(SEED_DIR / "tasks.jsonl")] and cfg.device == "cpu"


def test_reachable_hub_datasets_are_streamed_in_a_smoke_run(monkeypatch):
    """Online, a Hub dataset is kept and streamed (only the first rows are fetched); a URL and a local file are
    read as they are."""
    import staged_alignment.core.sources as sources

    monkeypatch.setattr(sources, "unavailable", lambda source: None)
    monkeypatch.setattr(sources, "hub_answers", lambda source: True)  # the Hub answers
    monkeypatch.setattr(sources, "is_cached", lambda source: False)
    over, rows = _plan({"run_name": "r", "sft": {"data": [{"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"},
                                                          "https://example.org/a/b.jsonl", "local.jsonl"]}})
    assert over["sft.data"] == [{"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "max_rows": 24,
                                 "streaming": True},
                                {"path": "https://example.org/a/b.jsonl", "max_rows": 24},
                                {"path": "local.jsonl", "max_rows": 24}]
    assert rows["sft.data.0.streaming"][2].startswith("true")


def test_a_cpu_recipe_only_shrinks():
    over, _ = _plan({"run_name": "x", "device": "cpu", "model": {"name_or_path": EMBEDDED, "max_seq_length": 128}})
    assert "device" not in over and "model.name_or_path" not in over and "model.max_seq_length" not in over
    assert over["sft.training.max_steps"] == 2


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipe_dry_run_for_cuda_on_this_cpu(recipe, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "pipeline.py"), "--config",
                           str(ROOT / "configs" / recipe), "--dry-run", "--target", "cuda",
                           f"output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "memory estimate per stage (CUDA; device" in proc.stdout and "dry run: plan valid" in proc.stdout
    # the Hub datasets and BIPIA's pinned GitHub files are not cached on this offline machine: named, not fatal
    assert "not checked here: sft.data.0 = HuggingFaceH4/ultrachat_200k (not in the local cache, offline" in proc.stdout
    assert "not checked here: causal.tasks.0 = https://raw.githubusercontent.com/microsoft/BIPIA/" in proc.stdout
    assert "  dpo-generate ~" in proc.stdout  # critique-and-rewrite on the merged 16-bit model, its own line


def test_dpo_generation_estimate_is_the_merged_16_bit_model_and_its_kv_cache():
    """On a 12 GB card the Llama-3.1-8B QLoRA recipe trains in 4 bits but generates pairs on the merged bf16
    model: 8.03e9 × 2 B = 14.96 GiB of weights, and a KV cache that grows with dpo.generation.batch_size."""
    from staged_alignment.core.config import PipelineConfig
    from staged_alignment.core.memory import KNOWN, estimate

    cfg = PipelineConfig()
    cfg.model.quantization, cfg.model.max_seq_length = "4bit", 1024
    cfg.dpo.generation = {"batch_size": 16, "max_new_tokens": 256}
    dims = KNOWN["meta-llama/Llama-3.1-8B-Instruct"]
    gen = estimate(cfg, "dpo-generate", dims, on_cuda=True)
    train = estimate(cfg, "dpo", dims, on_cuda=True)
    assert round(gen.parts["weights"], 2) == 14.96 and round(train.parts["weights"], 2) == 4.26
    # K and V: 2 × layers × batch × positions × kv width × 2 bytes = 2·32·16·1280·1024·2 B = 2.5 GiB
    assert gen.parts["kv_cache"] == pytest.approx(2 * 32 * 16 * 1280 * 1024 * 2 / 1024 ** 3)
    cfg.dpo.generation.batch_size = 32
    assert estimate(cfg, "dpo-generate", dims, on_cuda=True).parts["kv_cache"] == pytest.approx(2 * gen.parts["kv_cache"])


def test_target_needs_dry_run(tmp_path):
    from staged_alignment.stages.pipeline import main

    assert main(["--config", str(ROOT / "configs" / GPU_RECIPES[0]), "--target", "cuda"]) == 2


def test_a_smoke_run_goes_offline_unless_a_source_is_fetched(monkeypatch, tmp_path):
    from staged_alignment.core.smoke import needs_network

    assert not needs_network({"sft": {"data": [{"path": "local.jsonl"}]}})
    assert needs_network({"sft": {"data": [{"path": "org/data", "streaming": True}]}})
    assert needs_network({"causal": {"tasks": ["https://example.org/never/fetched.jsonl"]}})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert needs_network({"dpo": {"prompts": [{"path": "org/not-cached"}]}})  # read without streaming: fetched
