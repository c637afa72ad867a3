"""TRL-style command-line flags on every stage script: ``--key value``, ``--key=value``, bare booleans, in any
position, mapped onto the dotted config (``core.config.CliParser``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from staged_alignment.core.config import CliParser, ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smollm2-135m_smoke-pipeline_cpu.yaml"


def parser(stage=None):
    ap = CliParser(prog="stage.py", stage=stage)
    ap.add_argument("--config", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--from-stage")
    ap.add_argument("overrides", nargs="*")
    return ap


def test_flags_map_onto_the_stage_training_args_section_and_aliases():
    a = parser("dpo").parse(["--learning_rate", "1e-5", "--config", "C", "--max_prompts=8", "--bf16",
                             "run_name=x", "--model_name_or_path", "org/m", "--lora-r", "4", "--dry-run",
                             "--sft.training.max_steps", "3", "--gradient_checkpointing", "--seed", "7"])
    assert a.config == "C" and a.dry_run is True
    assert a.overrides == ["dpo.training.learning_rate=1e-5", "dpo.max_prompts=8", "dpo.training.bf16=true",
                           "run_name=x", "model.name_or_path=org/m", "lora.r=4", "sft.training.max_steps=3",
                           "dpo.training.gradient_checkpointing=true", "seed=7"]


def test_a_bare_boolean_before_a_dotted_override_does_not_swallow_it():
    a = parser("sft").parse(["--config", "C", "--packing", "sft.training.max_steps=2", "--from-stage", "causal"])
    assert a.overrides == ["sft.training.packing=true", "sft.training.max_steps=2"] and a.from_stage == "causal"


def test_pipeline_flags_need_a_section_for_stage_keys():
    a = parser(None).parse(["--config", "C", "--max_seq_length", "256", "--r", "8", "--output_dir", "o"])
    assert a.overrides == ["model.max_seq_length=256", "lora.r=8", "output_dir=o"]
    with pytest.raises(ConfigError, match="--learning_rate is not a setting here; give its section"):
        parser(None).parse(["--config", "C", "--learning_rate", "1e-5"])
    with pytest.raises(ConfigError, match="--model is not a setting here"):  # a section, not a value
        parser(None).parse(["--config", "C", "--model", "x"])


def test_a_typo_of_the_script_flag_is_named_not_taken_as_a_setting():
    with pytest.raises(ConfigError, match=r"unrecognized arguments: --dryrun \(did you mean --dry-run\?\)"):
        parser("sft").parse(["--config", "C", "--dryrun"])


def test_evaluate_maps_its_own_section_and_refuses_training_keys():
    assert parser("evaluate").parse(["--config", "C", "--max_cases", "5"]).overrides == ["evaluate.max_cases=5"]
    with pytest.raises(ConfigError, match="--learning_rate is not a setting here"):
        parser("evaluate").parse(["--config", "C", "--learning_rate", "1"])


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                                       "PYTHONPATH": str(ROOT)})


def test_stage_script_flag_reaches_the_training_args_and_a_typo_is_one_located_line(tmp_path):
    """Through the real entry point: an unknown training key given as a flag is refused before any model loads,
    naming the dotted key it became."""
    proc = _run("stage1_dpo.py", "--config", str(SMOKE), f"output_dir={tmp_path}", "--learnin_rate", "1e-5")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("error:") and "dpo.training" in err[-1] and "learnin_rate" in err[-1], err[-3:]


def test_recipes_follow_one_name_scheme_and_name_their_command():
    """``configs/<model>_<method>_<device>.yaml`` (torchtune-style), each headed by the command that runs it."""
    import re

    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(recipes) >= 5
    for p in recipes:
        assert re.fullmatch(r"[a-z0-9.]+-[0-9.]+[bm]_[a-z0-9-]*pipeline_(cpu|[a-z0-9]+-[0-9]+gb)\.yaml", p.name), p.name
        first = p.read_text().splitlines()[0]
        assert first.startswith("# Run: ") and f"configs/{p.name}" in first, (p.name, first)
