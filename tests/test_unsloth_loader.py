"""``model.loader: unsloth`` as far as a CPU allows: import order and LoRA through Unsloth's own API.

Unsloth needs a CUDA GPU, so a stand-in ``unsloth`` package (written to a temp folder on ``sys.path``) records
what the real one cares about: which of transformers/trl/peft were already imported when ``import unsloth`` ran,
and the arguments of ``FastLanguageModel.get_peft_model``. The stage entry point runs for real up to the model
load (the device check is told CUDA exists; the Unsloth loader itself then stops on this CPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_UNSLOTH = '''
import json, os, sys
with open(os.environ["UNSLOTH_RECORD"], "w") as f:
    json.dump({"imported_before": sorted(m for m in ("transformers", "trl", "peft") if m in sys.modules)}, f)


class FastLanguageModel:
    calls = []

    @staticmethod
    def get_peft_model(model, **kwargs):
        from peft import LoraConfig, get_peft_model
        FastLanguageModel.calls.append(kwargs)
        return get_peft_model(model, LoraConfig(r=kwargs["r"], lora_alpha=kwargs["lora_alpha"],
                                                lora_dropout=kwargs["lora_dropout"],
                                                target_modules=kwargs["target_modules"], task_type="CAUSAL_LM"))
'''


@pytest.fixture()
def fake_unsloth(tmp_path):
    pkg = tmp_path / "fake" / "unsloth"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_UNSLOTH)
    record = tmp_path / "record.json"
    yield tmp_path / "fake", record
    sys.modules.pop("unsloth", None)  # never leave the stand-in behind for later tests


def test_stage_entry_point_imports_unsloth_before_transformers_trl_peft(fake_unsloth, tmp_path, tiny_model_dir):
    from conftest import write_tiny_pipeline_config

    fake, record = fake_unsloth
    cfg = write_tiny_pipeline_config(tmp_path, tiny_model_dir)
    driver = textwrap.dedent(f"""
        import sys
        import staged_alignment.core.config
        staged_alignment.core.config.cuda_available = lambda: True  # pass the device check; the loader itself needs real CUDA
        from staged_alignment.stages import stage0_sft
        sys.exit(stage0_sft.main(["--config", {str(cfg)!r}, "device=auto", "model.loader=unsloth"]))
    """)
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{ROOT}", UNSLOTH_RECORD=str(record), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert record.exists(), f"unsloth was never imported:\n{proc.stderr[-3000:]}"
    assert json.loads(record.read_text())["imported_before"] == [], proc.stderr[-3000:]
    # the run then stops at the loader: the real Unsloth path needs a CUDA GPU (one line, recorded as a failure)
    assert "the Unsloth loader needs a CUDA GPU" in proc.stderr


def test_import_unsloth_first_is_a_no_op_for_the_transformers_loader_and_names_the_extra(monkeypatch):
    from staged_alignment.core.config import ModelSection
    from staged_alignment.core.models import import_unsloth_first

    assert import_unsloth_first(ModelSection()) is False
    monkeypatch.setitem(sys.modules, "unsloth", None)  # import unsloth → ImportError
    with pytest.raises(ImportError, match="requirements-gpu.txt"):
        import_unsloth_first(ModelSection(loader="unsloth"))


def test_attach_lora_uses_unsloth_get_peft_model(fake_unsloth, monkeypatch, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from staged_alignment.core.config import PipelineConfig
    from staged_alignment.core.models import attach_lora

    fake, _ = fake_unsloth
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    monkeypatch.setenv("UNSLOTH_RECORD", str(fake / "record.json"))
    cfg = PipelineConfig(seed=7)
    cfg.model.loader, cfg.model.max_seq_length = "unsloth", 96
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8, 0.0
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model, peft_config = attach_lora(base, cfg, for_trl=True)
    import unsloth

    assert peft_config is None and isinstance(model, PeftModel)  # the trainer gets the peft model, no config
    assert unsloth.FastLanguageModel.calls == [dict(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"], bias="none",
                                                    use_gradient_checkpointing="unsloth", random_state=7,
                                                    max_seq_length=96)]
    # the transformers loader: TRL attaches the adapter from the LoraConfig
    cfg.model.loader = "transformers"
    same, lora = attach_lora(base, cfg, for_trl=True)
    assert same is base and lora.r == 4 and sorted(lora.target_modules) == ["q_proj", "v_proj"]
