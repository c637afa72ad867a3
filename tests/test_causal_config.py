"""CausalConfig / CausalTrainer as a TRL user builds them: defaults, constraints, and the documented example."""
from __future__ import annotations

import dataclasses
import re

import pytest

from tests.conftest import REPO


def test_causal_config_defaults_are_the_measured_best(tmp_path):
    """No loss argument anywhere: task + injected LM + KL, no contrastive term (ablation arm A5), and the views that
    objective needs; the pipeline's sections have the very same defaults (declared once)."""
    from staged_alignment.core.config import CausalHeadSection, CausalLossSection
    from staged_alignment.core.settings import field_infos
    from staged_alignment.trainers.causal import CausalConfig

    args = CausalConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert (args.lambda_task, args.lambda_lm_injected, args.lambda_kl, args.lambda_pref) == (1.0, 1.0, 1.0, 0.0)
    assert args.contrastive == "none" and args.lambda_lm_counterfactual == 0.0
    assert args.views == ["benign", "injected"] and args.lm_views == ["benign", "injected"]
    assert dataclasses.asdict(args.loss_settings()) == dataclasses.asdict(CausalLossSection())
    assert dataclasses.asdict(args.head_settings()) == dataclasses.asdict(CausalHeadSection())
    assert args.remove_unused_columns is False
    for name, info in field_infos(CausalLossSection).items():  # each field described once, and CausalConfig's help
        assert info.description and CausalConfig.__dataclass_fields__[name].metadata["help"] == info.description


@pytest.mark.parametrize("field,value,words", [("temperature", 5.0, "temperature"), ("lambda_kl", -1.0, "lambda_kl"),
                                               ("contrastive", "v3", "contrastive"), ("head_type", "cnn", "head_type"),
                                               ("lambda_task", float("nan"), "lambda_task"),
                                               ("padding_side", "middle", "padding_side")])
def test_causal_config_refuses_values_outside_their_constraint(field, value, words, tmp_path):
    from staged_alignment.trainers.causal import CausalConfig

    with pytest.raises(ValueError, match=words):
        CausalConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{field: value})
    with pytest.raises(ValueError, match="at least one LM term"):
        CausalConfig(output_dir=str(tmp_path), use_cpu=True, lambda_task=0.0, lambda_lm_injected=0.0)


def test_trainer_built_with_no_loss_arguments_uses_the_measured_best(tiny_model_dir, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from staged_alignment.core.chat_template import apply_template
    from staged_alignment.trainers.causal import CausalConfig, CausalContrastiveTrainer, CausalTrainer
    from tests.test_causal_trainer import seed_triplets

    tok = apply_template(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    from datasets import Dataset

    ds = Dataset.from_list(seed_triplets(4))
    tr = CausalTrainer(model, args=CausalConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
                       train_dataset=ds, processing_class=tok,
                       peft_config=LoraConfig(r=4, task_type="CAUSAL_LM", target_modules=["q_proj"]))
    assert tr.weights == {"benign": 1.0, "injected": 1.0, "counterfactual": 0.0}
    assert tr.lambda_kl == 1.0 and tr.lambda_pref == 0.0 and tr.contrastive == "none" and tr.projection_head is None
    assert tr.views == ["benign", "injected"] and "benign_input_ids" in tr.train_dataset.column_names
    # the lower-level trainer agrees: its defaults are the same settings (no second set of defaults)
    from tests.test_causal_trainer import peft_model

    low = CausalContrastiveTrainer(model=peft_model(tiny_model_dir), args=CausalConfig(
        output_dir=str(tmp_path / "b"), use_cpu=True, report_to="none"), train_dataset=tr.train_dataset,
        data_collator=tr.data_collator, processing_class=tok)
    assert low.loss_settings == tr.loss_settings and low.lambda_kl == 1.0
    with pytest.raises(ValueError, match="CausalConfig"):
        from transformers import TrainingArguments

        CausalTrainer(model, args=TrainingArguments(output_dir=str(tmp_path / "c")), train_dataset=ds)


def test_the_documented_ten_line_example_runs(tiny_model_dir, tmp_path):
    """docs/causal-trainer.md's code block, run as written (two steps on the tiny model and the seed triplets):
    the loss is finite, the adapter changed."""
    import json
    import math

    from tests.test_causal_trainer import seed_triplets

    text = (REPO / "docs" / "causal-trainer.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    statements = [x for x in code.strip().splitlines() if x.strip() and not x.startswith(("from ", "import ", " "))]
    assert len(statements) <= 10, "the example is meant to be about ten lines (imports aside)"
    triplets = tmp_path / "triplets.jsonl"
    triplets.write_text("".join(json.dumps(t) + "\n" for t in seed_triplets(6)))
    env = {"MODEL": str(tiny_model_dir), "TRIPLETS": str(triplets), "OUTPUT": str(tmp_path / "out")}
    exec(compile(code, "docs/causal-trainer.md", "exec"), env)  # noqa: S102 - the project's own documentation
    trainer = env["trainer"]
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    assert trainer.state.global_step == 2 and losses and all(math.isfinite(x) for x in losses)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: training moved it
