"""``model.chat_template: tokenizer | <Jinja file>``: the template's checks, exact assistant-only label masks with
a non-Zephyr template, TRL's training version of a known model template, and the located config errors."""
from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset

from staged_alignment.core.chat_template import apply_template, prompt_response_ids, render_conversation, render_prompt
from tests.conftest import CONV, REPO

SMOKE = REPO / "configs" / "smollm2-135m_smoke-pipeline_cpu.yaml"
# ChatML with the assistant content and its end-of-turn token (SmolLM2's eos, <|im_end|>) inside the markers
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
          "{% endgeneration %}{% else %}{{ message['content'] + eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _write(tmp_path, text, name="chat.jinja") -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_jinja_file_template_gives_exact_assistant_only_labels(smollm2_dir, tmp_path):
    """SFT labels built by the project's trainer (TRL's preparation + collator) train exactly the assistant
    contents and their <|im_end|>, nothing of the ChatML headers, system or user turns."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from staged_alignment.trainers.sft import ZephyrSFTTrainer

    tok = apply_template(_tok(smollm2_dir), _write(tmp_path, CHATML))
    assert tok.chat_template == CHATML and tok.eos_token == "<|im_end|>"
    args = SFTConfig(output_dir=str(tmp_path / "out"), assistant_only_loss=True, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, report_to="none", max_length=512)
    trainer = ZephyrSFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(smollm2_dir)), args=args,
                               train_dataset=Dataset.from_list([{"messages": CONV}]), processing_class=tok)
    row = trainer.train_dataset[0]
    labels = trainer.data_collator([row])["labels"][0].tolist()
    text = render_conversation(tok, CONV)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert row["input_ids"] == enc["input_ids"]
    spans = []
    for reply in ("Hello there!", "Paris."):
        start = text.index("<|im_start|>assistant\n" + reply) + len("<|im_start|>assistant\n")
        spans.append((start, start + len(reply + "<|im_end|>")))
    expected = [i if any(s <= a and b <= e for s, e in spans) and b > a else -100
                for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
    assert labels == expected
    trained = tok.decode([i for i in labels if i != -100])
    assert trained == "Hello there!<|im_end|>Paris.<|im_end|>"
    # generation reads the same prefix: prompt + response + eos tokenized jointly splits at the assistant header
    prompt = render_prompt(tok, CONV[:2])
    assert prompt.endswith("<|im_start|>assistant\n") and text.startswith(prompt + "Hello there!<|im_end|>")
    ids, n = prompt_response_ids(tok, CONV[:2], "Hello there!")
    assert tok.decode(ids[n:]) == "Hello there!<|im_end|>"


def test_model_template_without_markers_trl_cannot_patch_is_refused_with_the_fix(smollm2_dir):
    tok = _tok(smollm2_dir)  # SmolLM2's own ChatML template: no {% generation %} markers, unknown to TRL
    with pytest.raises(ValueError, match=r"no \{% generation %\} markers.*TRL has no training version.*"
                                         r"model.chat_template: zephyr"):
        apply_template(tok, "tokenizer")
    tok.chat_template = None
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        apply_template(tok, "tokenizer")


def test_model_template_trl_knows_gets_trl_training_markers(smollm2_dir):
    """A Qwen2.5-style tokenizer (its template verbatim, eos <|im_end|>): TRL's training version is used, so the
    assistant mask covers the reply and its <|im_end|> (TRL's span also holds the newlines around them)."""
    from trl.chat_template_utils import qwen2_5_chat_template, qwen2_5_training_chat_template

    tok = _tok(smollm2_dir)
    tok.chat_template = qwen2_5_chat_template
    apply_template(tok, "tokenizer")
    assert tok.chat_template == qwen2_5_training_chat_template
    enc = tok.apply_chat_template(CONV[1:3], return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(masked) == "\nHello there!<|im_end|>\n"
    assert render_prompt(tok, CONV[1:2]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("template, data_role, message", [
    (CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", ""), False,
     r"no \{% generation %\} markers, which the assistant-only loss needs; set model.chat_template: zephyr"),
    (CHATML.replace("{{ message['content'] + eos_token }}{% endgeneration %}",
                    "{{ message['content'] }}{% endgeneration %}{{ eos_token }}"), False,
     r"end-of-turn token is outside the \{% generation %\} markers"),
    (CHATML.replace("{{ message['content'] + eos_token }}{% endgeneration %}",
                    "{{ message['content'] + '<|end|>' }}{% endgeneration %}"), False,
     r"followed by the reply and eos_token \('<\|im_end\|>'\) is not how the template writes the assistant turn"),
    (CHATML.replace("{% for message in messages %}",
                    "{% for message in messages %}{% if message['role'] == 'input' %}"
                    "{{ raise_exception('no input role') }}{% endif %}"), True,
     r"a 'input' turn does not render .*set model.data_role: false"),
])
def test_jinja_templates_that_would_train_or_generate_wrong_are_refused(smollm2_dir, tmp_path, template,
                                                                        data_role, message):
    path = _write(tmp_path, template)
    with pytest.raises(ValueError, match=message) as ei:
        apply_template(_tok(smollm2_dir), path, data_role=data_role)
    assert path in str(ei.value)
    if data_role:  # the same file is fine without the data role
        apply_template(_tok(smollm2_dir), path, data_role=False)


def test_config_resolves_the_file_and_checks_it_before_any_model_load(smollm2_dir, tmp_path, monkeypatch):
    from staged_alignment.core.config import ConfigError, load_config
    from staged_alignment.core.models import check_model

    with pytest.raises(ConfigError, match=r"model.chat_template.*'missing.jinja' is neither one of \['zephyr', "
                                          r"'tokenizer'\] nor an existing Jinja template file"):
        load_config(SMOKE, ["model.chat_template=missing.jinja"])
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, CHATML)
    cfg = load_config(SMOKE, ["model.chat_template=chat.jinja", f"output_dir={tmp_path}"])
    assert Path(cfg.model.chat_template).resolve() == tmp_path / "chat.jinja"
    check_model(cfg)  # the embedded model's tokenizer takes this template
    before = cfg.config_hash("sft")
    (tmp_path / "chat.jinja").write_text(CHATML.replace("'\n' }}{% endfor %}", "'\n\n' }}{% endfor %}"))
    assert cfg.config_hash("sft") != before  # an edited template redoes the stages
    bad = _write(tmp_path, CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", ""), "bad.jinja")
    cfg = load_config(SMOKE, [f"model.chat_template={bad}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"field 'model.chat_template': chat template .*bad.jinja: no "
                                          r"\{% generation %\} markers"):
        check_model(cfg)
    cfg = load_config(SMOKE, ["model.chat_template=tokenizer", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="TRL has no training version"):
        check_model(cfg)


def test_smoke_maps_the_recipe_model_template_to_zephyr():
    """The model's own template or a file written for its tokens (a hard-coded <|eot_id|>) would not fit the embedded
    model's tokenizer."""
    from staged_alignment.core.smoke import smoke_plan

    for template in ("tokenizer", "templates/llama3.jinja"):
        over, rows = smoke_plan({"run_name": "r", "model": {"chat_template": template}})
        assert 'model.chat_template="zephyr"' in over


def test_a_template_must_write_the_bos_its_tokenizer_starts_sequences_with(spm_model_dir, tmp_path):
    """A Llama-style SentencePiece tokenizer starts sequences with <s>; prompts are tokenized without special tokens,
    so a template that does not write bos_token is refused, and accepted once it does."""
    tok = _tok(spm_model_dir)
    path = _write(tmp_path, CHATML)
    with pytest.raises(ValueError, match=r"start the template with \{\{ bos_token \}\}"):
        apply_template(tok, path)
    tok = apply_template(_tok(spm_model_dir), _write(tmp_path, "{{ bos_token }}" + CHATML, "bos.jinja"))
    assert render_prompt(tok, CONV[1:2]).startswith(tok.bos_token)
