"""The stage interface (core.stage.Stage): the four stage scripts implement it, the entry point validates once and
runs from the plan, the pipeline's check reports each plan, and the DPO prompts come from one shared function."""
from __future__ import annotations

import dataclasses
import types

import pytest
from conftest import write_tiny_pipeline_config

from staged_alignment.core import common
from staged_alignment.core.config import load_config
from staged_alignment.core.stage import Stage
from staged_alignment.evaluation.safety import dpo_prompts
from staged_alignment.stages import evaluate, pipeline, stage0_sft, stage1_dpo, stage2_causal

STAGES = {"sft": stage0_sft, "dpo": stage1_dpo, "causal": stage2_causal, "evaluate": evaluate}


def test_every_stage_script_implements_the_interface_and_returns_a_plan(tmp_path, tiny_model_dir):
    cfg = load_config(str(write_tiny_pipeline_config(tmp_path, tiny_model_dir)))
    plans = {"sft": stage0_sft.SFTPlan, "dpo": stage1_dpo.DPOPlan, "causal": stage2_causal.CausalPlan,
             "evaluate": evaluate.EvalPlan}
    for name, mod in STAGES.items():
        assert isinstance(mod, Stage) and mod.STAGE == name
        assert pipeline.stage_module(name) is mod
        plan = mod.validate(cfg)
        assert type(plan) is plans[name] and dataclasses.is_dataclass(plan)
    assert len(stage0_sft.validate(cfg).rows) >= 2
    assert evaluate.validate(cfg).cases and stage1_dpo.MAIN_PROCESS_ONLY is False and evaluate.MAIN_PROCESS_ONLY


def test_an_object_that_is_not_a_stage_is_refused_by_name():
    half = types.SimpleNamespace(STAGE="sft", validate=lambda cfg: None, run=lambda cfg, plan: {})
    with pytest.raises(TypeError, match=r"lacks \['MAIN_PROCESS_ONLY', 'check_upstream', 'input_paths', "
                                        r"'resume_state'\]"):
        common.run_stage_main(half, "half", ["--config", "x.yaml"])


def test_the_entry_point_validates_once_and_runs_from_that_plan(tmp_path, tiny_model_dir):
    cfg_path = write_tiny_pipeline_config(tmp_path, tiny_model_dir)
    calls = []

    def validate(cfg):
        calls.append("validate")
        return {"plan": len(calls)}

    def run(cfg, plan):
        calls.append(("run", plan))
        return {"outputs": {}, "metrics": {}}

    stage = types.SimpleNamespace(STAGE="sft", MAIN_PROCESS_ONLY=False, validate=validate, run=run,
                                  check_upstream=lambda cfg: calls.append("upstream"), input_paths=lambda cfg: {},
                                  resume_state=lambda cfg: [])
    assert common.run_stage_main(stage, "fake", ["--config", str(cfg_path)]) == 0
    assert calls == ["validate", "upstream", ("run", {"plan": 1})]


def test_the_pipeline_check_reports_each_plan(tmp_path, tiny_model_dir, capsys):
    cfg_path = write_tiny_pipeline_config(tmp_path, tiny_model_dir)
    assert pipeline.main(["--config", str(cfg_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(str(cfg_path))
    n_rows, train = len(stage0_sft.validate(cfg).rows), stage1_dpo.validate(cfg)
    assert f"  sft: inputs valid (rows {n_rows})" in out
    assert f"  dpo: inputs valid (train {len(train.train)}, held_out {len(train.held_out)}" in out
    assert "  evaluate: inputs valid (cases " in out


def test_the_dpo_prompts_are_one_definition_for_both_stages(tmp_path, tiny_model_dir):
    cfg = load_config(str(write_tiny_pipeline_config(tmp_path, tiny_model_dir)),
                      ["causal.retain_source=self", "causal.loss.lambda_retain_sft=0.1", "causal.retain_max_pairs=3"])
    train, held = dpo_prompts(cfg)
    plan = stage1_dpo.validate(cfg)
    assert plan.train == train and plan.held_out == held and train and held
    assert not {p["id"] for p in train} & {p["id"] for p in held}
    assert stage2_causal.self_replay_prompts(cfg) == train[:3]
