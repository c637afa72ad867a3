"""Model cards and uploads that are usable round trips: huggingface_hub's ModelCard/ModelCardData, base_model chain,
no Markdown escaping inside the YAML, the exact upload folders, and Trainer's own push refused (all offline)."""
from __future__ import annotations

from pathlib import Path

import pytest


def _cfg(tmp_path, **hub):
    from staged_alignment.core.config import PipelineConfig

    cfg = PipelineConfig(run_name="card_run", output_dir=str(tmp_path / "runs"))
    cfg.sft.hub_model_id, cfg.dpo.hub_model_id, cfg.causal.hub_model_id = "org/my_model", "dpo_model", "org/causal_x"
    cfg.hub.organization = "team"
    for k, v in hub.items():
        setattr(cfg.hub, k, v)
    return cfg


def _load(text: str, tmp_path: Path):
    from huggingface_hub import ModelCard

    p = tmp_path / "README.md"
    p.write_text(text)
    return ModelCard.load(p)


def test_sft_card_round_trips_and_names_the_real_hub_base(tmp_path):
    from huggingface_hub.utils import validate_repo_id

    from staged_alignment.core.hub import model_card

    cfg = _cfg(tmp_path)
    text = model_card(cfg, "sft", {"train_loss": 1.5}, ["data/sft_seed.jsonl", "HuggingFaceH4/ultrachat_200k"])
    card = _load(text, tmp_path)
    d = card.data.to_dict()
    assert d["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded model's Hub origin
    validate_repo_id(d["base_model"])  # huggingface_hub's own rule (raises on an invalid id)
    assert d["base_model_relation"] == "adapter" and d["library_name"] == "peft"
    assert d["model_name"] == "org/my_model" and "org/my\\_model" not in text.split("---")[1]  # YAML not escaped
    assert d["datasets"] == ["HuggingFaceH4/ultrachat_200k"]  # local files are not Hub datasets
    assert "embedded" not in d["base_model"] and "Q4_1 GGUF" in card.text
    assert "| train\\_loss | 1.5 |" in card.text  # the body stays escaped


def test_local_base_gives_no_base_model_and_says_why(tmp_path, tiny_model_dir):
    from staged_alignment.core.hub import model_card

    cfg = _cfg(tmp_path)
    cfg.model.name_or_path = str(tiny_model_dir)
    assert "base_model" not in _load(model_card(cfg, "sft", {}, []), tmp_path).data.to_dict()
    card = _load(model_card(cfg, "dpo", {}, []), tmp_path)  # dpo trains on sft/merged, not pushed
    assert "base_model" not in card.data.to_dict() and "hub.push_merged: true" in card.text


def test_chain_names_the_previous_stage_merged_repo(tmp_path):
    from staged_alignment.core.hub import model_card

    cfg = _cfg(tmp_path, push_to_hub=True, push_merged=True)
    dpo = _load(model_card(cfg, "dpo", {}, []), tmp_path).data.to_dict()
    assert dpo["base_model"] == "org/my_model-merged" and dpo["model_name"] == "team/dpo_model"
    cfg.causal.base = "dpo"
    assert _load(model_card(cfg, "causal", {}, []), tmp_path).data.to_dict()["base_model"] == "team/dpo_model-merged"
    merged = _load(model_card(cfg, "dpo", {}, [], merged=True), tmp_path).data.to_dict()
    assert merged["library_name"] == "transformers" and merged["base_model_relation"] == "finetune"
    assert merged["model_name"] == "team/dpo_model-merged"


def test_dry_run_writes_the_exact_adapter_and_merged_upload_folders(tmp_path):
    from staged_alignment.core.hub import push_stage_adapter

    cfg = _cfg(tmp_path, push_dry_run=True, push_merged=True)
    stage = cfg.run_dir / "dpo"
    (stage / "adapter").mkdir(parents=True)
    (stage / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (stage / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no merged model"):
        push_stage_adapter(cfg, "dpo", stage / "adapter", {})
    (stage / "merged").mkdir()
    (stage / "merged" / "config.json").write_text("{}")
    (stage / "merged" / "model.safetensors").write_bytes(b"y")
    out = push_stage_adapter(cfg, "dpo", stage / "adapter", {"loss": 0.5})
    assert out == stage / "hub_upload"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "training_metrics.json"]
    merged = stage / "hub_upload_merged"
    assert sorted(p.name for p in merged.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "training_metrics.json"]
    assert (merged / "model.safetensors").read_bytes() == b"y"


@pytest.mark.parametrize("key", ["push_to_hub", "hub_model_id"])
def test_trainer_push_keys_are_refused_with_a_pointer_to_hub(tmp_path, key):
    from staged_alignment.core.config import ConfigError, load_config

    cfg = Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m_smoke-pipeline_cpu.yaml"
    value = "true" if key == "push_to_hub" else "org/x"
    with pytest.raises(ConfigError, match=rf"dpo\.training\.{key}.*hub\.push_to_hub and dpo\.hub_model_id"):
        load_config(str(cfg), [f"dpo.training.{key}={value}", f"output_dir={tmp_path}"])


def test_evaluation_results_reach_the_pushed_cards_as_model_index(tmp_path):
    """After evaluation, the card of each stage pushed in the run (here the causal adapter, dry run) carries that
    model's results as model-index, parsed back by huggingface_hub; a stage evaluated but not pushed, a null metric
    and a model not evaluated are left out; the training metrics stay in the body."""
    import json

    from staged_alignment.core.hub import push_eval_results, push_stage_adapter

    cfg = _cfg(tmp_path, push_dry_run=True)
    stage = cfg.run_dir / "causal"
    (stage / "adapter").mkdir(parents=True)
    (stage / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (stage / "adapter" / "adapter_config.json").write_text("{}")
    push_stage_adapter(cfg, "causal", stage / "adapter", {"train_loss": 1.25})
    from staged_alignment.core.run_dir import Manifest

    Manifest(cfg.run_dir).finish("causal", {"hub_upload": str(stage / "hub_upload")})  # as maybe_push records it
    (cfg.run_dir / "dpo" / "hub_upload").mkdir(parents=True)  # a stale folder of an earlier run: not this run's
    (cfg.run_dir / "dpo" / "hub_upload" / "README.md").write_text("---\n---\nold")
    before = _load((stage / "hub_upload" / "README.md").read_text(), tmp_path)
    assert before.data.eval_results is None
    metrics = {"eval_file": "evaluation/heldout/injection_heldout.jsonl",
               "models": {"causal": {"attack_success_rate": 0.0625, "n_cases": 48, "utility_clean": 0.8125,
                                     "utility_under_attack": 0.5417, "harmful_refusal_rate": float("nan"),
                                     "benign_over_refusal_rate": 0.25, "n_benign": 8},
                          "dpo": {"attack_success_rate": 0.1}}}
    done = push_eval_results(cfg, metrics)
    assert done == {"causal": str(stage / "hub_upload")}  # dpo was evaluated but not pushed in this run
    assert (cfg.run_dir / "dpo" / "hub_upload" / "README.md").read_text() == "---\n---\nold"
    text = (stage / "hub_upload" / "README.md").read_text()
    card = _load(text, tmp_path)
    got = {(r.metric_type, r.metric_value, r.dataset_name) for r in card.data.eval_results}
    assert got == {("attack_success_rate", 0.0625, "injection cases of injection_heldout.jsonl (n=48)"),
                   ("utility_clean", 0.8125, "injection cases of injection_heldout.jsonl (n=48)"),
                   ("utility_under_attack", 0.5417, "injection cases of injection_heldout.jsonl (n=48)"),
                   ("benign_over_refusal_rate", 0.25, "benign prompts (n=8)")}  # NaN left out
    assert card.data.model_name == "org/causal_x" and "model-index:" in text
    assert "| train\\_loss | 1.25 |" in text and json.loads((stage / "hub_upload" / "training_metrics.json").read_text()) == \
        {"train_loss": 1.25}
    cfg.hub.push_dry_run = False  # no push configured: nothing is touched
    assert push_eval_results(cfg, metrics) == {}


def test_card_sources_are_the_configs_paths(tmp_path):
    """The card's source list reads the typed data sources (a bare path in YAML, a mapping, a Hub id), not their
    repr; local files stay out of the card's ``datasets``."""
    from staged_alignment.core.hub import model_card, stage_sources

    cfg = _cfg(tmp_path)
    cfg.sft.data = ["data/sft_seed.jsonl", {"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}]
    assert stage_sources(cfg, "sft") == ["data/sft_seed.jsonl", "HuggingFaceH4/ultrachat_200k"]
    cfg.causal.tasks, cfg.causal.train_attacks = [{"path": "t.jsonl"}], ["a.json"]
    assert stage_sources(cfg, "causal") == ["t.jsonl", "a.json"]
    card = _load(model_card(cfg, "sft", {}, stage_sources(cfg, "sft")), tmp_path)
    assert card.data.to_dict()["datasets"] == ["HuggingFaceH4/ultrachat_200k"]
