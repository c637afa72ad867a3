"""Config loading: unknown keys, types, ranges and hardware consistency fail with file, line and field."""
from __future__ import annotations

import pytest

from staged_alignment.core.config import ConfigError, load_config

GOOD = """run_name: t
output_dir: {out}
model:
  max_seq_length: 128
sft:
  data:
    - path: x.jsonl
  training:
    max_steps: 2
"""


def _cfg(tmp_path, text, overrides=None):
    p = tmp_path / "c.yaml"
    p.write_text(text.format(out=tmp_path / "runs"))
    return p, load_config(p, overrides)


def _refused(tmp_path, text, overrides, field, msg) -> ConfigError:
    """The :class:`ConfigError` loading ``text`` with ``overrides`` raises; it names ``field`` and says ``msg``."""
    with pytest.raises(ConfigError) as ei:
        _cfg(tmp_path, text, overrides)
    e = ei.value
    assert e.field == field and msg in e.message, str(e)
    return e


def test_good_config_and_overrides(tmp_path):
    p, cfg = _cfg(tmp_path, GOOD, ["sft.training.max_steps=7", "lora.r=4", "causal.loss.temperature=0.5"])
    assert cfg.sft.training["max_steps"] == 7 and cfg.lora.r == 4 and cfg.causal.loss.temperature == 0.5
    assert cfg.model.name_or_path == "embedded:smollm2-135m-instruct"
    assert cfg.sft.data[0].path == "x.jsonl" and dict(cfg.sft.data[0])["split"] == "train"
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("text,overrides,line,field,msg", [
    (GOOD.replace("  max_seq_length: 128", "  max_seq_lenght: 128"), [], 4, "model.max_seq_lenght", "unknown key"),
    (GOOD + "bogus: 1\n", [], 10, "bogus", "unknown key"),
    (GOOD.replace("128", "'long'"), [], 4, "model.max_seq_length", "expected int"),
    (GOOD, ["causal.loss.temperature=2.0"], None, "causal.loss.temperature", "must be in [0.01, 1] (got 2.0)"),
    (GOOD, ["model.dtype=bfloat16"], None, "model.dtype", "CPU"),
    (GOOD, ["sft.training.bf16=true"], None, "sft.training.bf16", "GPU"),
    (GOOD, ["model.quantization=4bit"], None, "model.quantization", "CUDA"),
    (GOOD, ["dpo.training.train_sampling_strategy=group_by_length"], None, "dpo.training.train_sampling_strategy",
     "sft and causal stages only"),
    (GOOD, ["dpo.generation.backend=vllm"], None, "dpo.generation.backend", "CUDA"),
    (GOOD, ["causal.head.type=transformer"], None, "causal.head.type", "not one of"),
    (GOOD.replace("  data:\n    - path: x.jsonl\n", "  data:\n    - path: ''\n"), [], 7, "sft.data.0.path", "empty"),
    (GOOD + "hub:\n  hf_token: hf_abc\n", [], 11, "hub.hf_token", "secrets"),
    (GOOD, ["nokey"], None, "nokey", "key=value"),
])
def test_bad_configs(tmp_path, text, overrides, line, field, msg):
    e = _refused(tmp_path, text, overrides, field, msg)
    if line is not None:
        assert e.line == line and str(e).startswith(f"{tmp_path / 'c.yaml'}:{line}: field '{field}'")


def test_device_memory_claim_must_match_comment_and_name(tmp_path):
    text = GOOD.replace("  max_seq_length: 128", "  max_seq_length: 128\n  device_memory_gb: 24  # RTX 3060: 12 GB")
    with pytest.raises(ConfigError, match="contradicts its comment") as ei:
        _cfg(tmp_path, text)
    assert ei.value.line == 5
    p = tmp_path / "x_rtx3060-12gb.yaml"
    p.write_text(GOOD.format(out=tmp_path).replace("  max_seq_length: 128", "  max_seq_length: 128\n  device_memory_gb: 16"))
    with pytest.raises(ConfigError, match="file name"):
        load_config(p)
    _cfg(tmp_path, text.replace("24  #", "12  #"))  # consistent: loads
    # an override replaces the commented value: the comment no longer speaks for it (this used to raise TypeError)
    good = tmp_path / "ok.yaml"
    good.write_text(text.format(out=tmp_path).replace("24  #", "12  #"))
    assert load_config(good, ["model.device_memory_gb=24"]).model.device_memory_gb == 24
    with pytest.raises(ConfigError, match="file name"):
        load_config(p, ["model.device_memory_gb=20"])


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_name: t\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML") as ei:
        load_config(p)
    assert ei.value.line is not None
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_training_args_unknown_key_names_line(tmp_path):
    from trl import SFTConfig

    from staged_alignment.core.common import build_training_args

    p, cfg = _cfg(tmp_path, GOOD.replace("    max_steps: 2", "    max_steps: 2\n    learnin_rate: 0.1"))
    with pytest.raises(ConfigError) as ei:
        build_training_args(SFTConfig, cfg, "sft", tmp_path / "out")
    assert ei.value.line == 10 and ei.value.field == "sft.training.learnin_rate"
    _, cfg = _cfg(tmp_path, GOOD)
    args = build_training_args(SFTConfig, cfg, "sft", tmp_path / "out", assistant_only_loss=True)
    assert args.bf16 is False and args.gradient_checkpointing is False and args.max_steps == 2
    assert args.assistant_only_loss is True


def test_stage_defaults_group_by_length_and_user_key_wins(tmp_path):
    from transformers import TrainingArguments
    from trl import SFTConfig

    from staged_alignment.core.common import build_training_args
    from staged_alignment.stages.stage0_sft import sft_defaults
    from staged_alignment.stages.stage2_causal import causal_defaults

    _, cfg = _cfg(tmp_path, GOOD)
    assert build_training_args(SFTConfig, cfg, "sft", tmp_path / "o", **sft_defaults(cfg)) \
        .train_sampling_strategy == "group_by_length"
    assert build_training_args(TrainingArguments, cfg, "causal", tmp_path / "o", **causal_defaults(cfg)) \
        .train_sampling_strategy == "group_by_length"
    _, cfg = _cfg(tmp_path, GOOD, ["sft.training.train_sampling_strategy=random"])
    assert build_training_args(SFTConfig, cfg, "sft", tmp_path / "o", **sft_defaults(cfg)) \
        .train_sampling_strategy == "random"


def test_shipped_configs_load():
    """Every config under configs/ parses (GPU-only settings are checked against the hardware at run time)."""
    from pathlib import Path

    import staged_alignment.core.config as sc

    paths = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert paths, "no shipped configs"
    real = sc.cuda_available
    sc.cuda_available = lambda: True  # pretend a GPU so GPU recipes pass the hardware check
    try:
        for p in paths:
            cfg = load_config(p)
            assert cfg.model.chat_template == "zephyr", p
    finally:
        sc.cuda_available = real


def test_override_indexes_lists_and_aliases_are_not_shared(tmp_path):
    """``sft.data.0.path=…`` sets the list item; an override of an aliased section changes that section only; a
    key given twice is refused with both lines."""
    from staged_alignment.core.config import ConfigError, apply_overrides, load_yaml_bounded

    data = {"sft": {"data": [{"path": "a.jsonl"}, {"path": "b.jsonl"}]}}
    assert apply_overrides(data, ["sft.data.1.path=c.jsonl"]) == ["sft.data.1.path"]
    assert data["sft"]["data"] == [{"path": "a.jsonl"}, {"path": "c.jsonl"}]
    with pytest.raises(ConfigError, match="list of 2 item"):
        apply_overrides(data, ["sft.data.2.path=x"])
    with pytest.raises(ConfigError, match="empty part"):
        apply_overrides(data, ["sft..path=x"])
    loaded, lines = load_yaml_bounded("sft:\n  training: &t {max_steps: 4}\ndpo:\n  training: *t\n", "c.yaml")
    apply_overrides(loaded, ["sft.training.max_steps=9"])
    assert loaded["sft"]["training"]["max_steps"] == 9 and loaded["dpo"]["training"]["max_steps"] == 4
    assert lines["dpo.training"] == 4
    with pytest.raises(ConfigError, match=r"c\.yaml:3: field 'a\.b': duplicate key \(first given on line 2\)"):
        load_yaml_bounded("a:\n  b: 1\n  b: 2\n", "c.yaml")


@pytest.mark.parametrize("text,overrides,line,field,msg", [
    # each setting's own constraint names the setting (the imperative checks named a neighbour: 'lora.r' for alpha,
    # 'dpo.held_out' for min_pairs, 'dpo.generation' for its batch_size) and shows the value
    (GOOD, ["lora.alpha=-2"], None, "lora.alpha", "must be ≥ 1 (got -2)"),
    (GOOD, ["dpo.min_pairs=0"], None, "dpo.min_pairs", "must be ≥ 1 (got 0)"),
    (GOOD + "dpo:\n  generation:\n    batch_size: 0\n", [], 12, "dpo.generation.batch_size", "must be ≥ 1 (got 0)"),
    (GOOD + "causal:\n  generation_batch_size: 0\n", [], 11, "causal.generation_batch_size", "must be ≥ 1"),
    (GOOD, ["lora.dropout=1.0"], None, "lora.dropout", "must be in [0, 1) (got 1.0)"),
    # list items by index; nested sections typed like the rest (these were unchecked dicts until the suite ran)
    (GOOD, ["lora.target_modules=[q_proj, 3]"], None, "lora.target_modules.1", "expected str, got int (3)"),
    (GOOD, ["causal.positions=[start, top]"], None, "causal.positions.1", "'top' is not one of ['start', 'middle'"),
    (GOOD + "evaluate:\n  suite:\n    max_sampels: 5\n", [], 12, "evaluate.suite.max_sampels",
     "unknown key (did you mean 'max_samples'?)"),
    (GOOD + "evaluate:\n  adaptive:\n    gcg_topk: many\n", [], 12, "evaluate.adaptive.gcg_topk",
     "expected int, got str ('many')"),
    (GOOD.replace("    - path: x.jsonl\n", "    - path: x.jsonl\n      max_rows: 1.5\n"), [], 8, "sft.data.0.max_rows",
     "expected int, got float (1.5)"),
    (GOOD.replace("    - path: x.jsonl\n", "    - 7\n"), [], 7, "sft.data.0", "expected a path or a mapping"),
    # cross-field rules name the field they are about
    (GOOD + "causal:\n  retain_source: self\n  loss:\n    lambda_retain_dpo: 1\n", [], 13,
     "causal.loss.lambda_retain_dpo", "no rejected answer"),
    (GOOD + "causal:\n  head:\n    type: bottleneck\n    hidden: 512\n", [], 13, "causal.head.hidden",
     "hidden < dim (got 512 ≥ 128)"),
    (GOOD, ["causal.loss.injected_lm_loss=1"], None, "causal.loss.injected_lm_loss", "renamed"),
    (GOOD + "line_map: 1\n", [], 10, "line_map", "unknown key"),
    # an override that replaces a list is located at the command line, not at the replaced items' lines
    (GOOD, ["sft.data=[{path: x.jsonl, formatt: y}]"], None, "sft.data.0.formatt", "did you mean 'format'"),
])
def test_typed_sections_name_the_setting(tmp_path, text, overrides, line, field, msg):
    e = _refused(tmp_path, text, overrides, field, msg)
    assert e.line == (line if line is not None else "override"), str(e)


def test_every_setting_is_typed_and_described():
    """Each field of each section has a description, and nested sections are instances of their section class
    (no raw dicts), also after an assignment (validate_assignment)."""
    import dataclasses

    from staged_alignment.core import config as C
    from staged_alignment.core.settings import field_infos, section_class

    seen, todo = set(), [C.PipelineConfig]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        for name, info in field_infos(cls).items():
            if cls is C.PipelineConfig and (name in C.INTERNAL or section_class(info.annotation)):
                pass
            else:
                assert info.description, f"{cls.__name__}.{name} has no description"
            sub = section_class(info.annotation)
            if sub is not None and sub not in seen:
                todo.append(sub)
    assert {C.GenerationSection, C.CausalLossSection, C.CausalHeadSection, C.SuiteSection, C.AdaptiveSection,
            C.DataSource} <= seen
    cfg = C.PipelineConfig(**{"causal": {"loss": {"lambda_kl": 0}}, "sft": {"data": ["a.jsonl"]}})
    assert isinstance(cfg.causal.loss, C.CausalLossSection) and cfg.causal.loss.lambda_kl == 0.0
    assert cfg.sft.data[0]["path"] == "a.jsonl" and cfg.sft.data[0].get("split") == "train"
    cfg.causal.loss = {"lambda_kl": 0.5}
    assert isinstance(cfg.causal.loss, C.CausalLossSection)
    with pytest.raises(ValueError, match="lambda_kl"):
        cfg.causal.loss = {"lambda_kl": -1}
    with pytest.raises(ValueError, match="contrastive"):
        dataclasses.replace(cfg.causal.loss, contrastive="v3")


def test_empty_sections_and_free_text(tmp_path):
    """A section written with no value (``sft:``) is that section's defaults, as before the sections were typed; a
    sample prompt may span lines (free text) while a path may not; the loader's own keys are not offered as known
    keys."""
    p, cfg = _cfg(tmp_path, GOOD + "dpo:\nlogging:\n")
    assert cfg.dpo.held_out == 8 and cfg.logging.report_to == ["none"]
    _, cfg = _cfg(tmp_path, GOOD, ['sft.sample_prompts=["Line one.\\nLine two."]'])
    assert cfg.sft.sample_prompts == ["Line one.\nLine two."]
    with pytest.raises(ConfigError, match="control character"):
        _cfg(tmp_path, GOOD, ['evaluate.eval_file="a\\nb.jsonl"'])
    with pytest.raises(ConfigError) as ei:
        _cfg(tmp_path, GOOD + "run_nam: x\n")
    assert "did you mean 'run_name'" in ei.value.message and "line_map" not in ei.value.message


def test_manifest_hashes_keep_only_what_the_config_wrote(tmp_path):
    """The stage hashes read a typed nested section as the mapping it was: values written in the file (even when
    equal to the default) or differing from the default. A default nobody wrote changes no hash, so a finished
    stage stays done when a section gains a setting."""
    _, base = _cfg(tmp_path, GOOD)
    form = base.hash_form()
    assert form["causal"]["loss"] == {} and form["dpo"]["generation"] == {} and form["sft"]["data"] == [{"path": "x.jsonl"}]
    _, written = _cfg(tmp_path, GOOD + "causal:\n  loss:\n    lambda_kl: 1.0\n")  # the default, written
    assert written.hash_form()["causal"]["loss"] == {"lambda_kl": 1.0}
    assert written.config_hash("causal") != base.config_hash("causal")
    assert written.config_hash("sft") == base.config_hash("sft")
    _, other = _cfg(tmp_path, GOOD, ["causal.loss.lambda_kl=0.5"])
    assert other.hash_form()["causal"]["loss"] == {"lambda_kl": 0.5}
