"""Zephyr template: exact assistant-only label masks, and the inference prompt equals the training prefix."""
from __future__ import annotations

import pytest
from datasets import Dataset

from data_builders.chat_template import apply_template, render_conversation, render_prompt

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def _tokenizer(path):
    from transformers import AutoTokenizer

    return apply_template(AutoTokenizer.from_pretrained(str(path)))


def _sft_labels(tok, conv, model_dir, tmp_path):
    """Labels exactly as the project's SFT trainer builds them (TRL dataset preparation + collator)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from trainers.sft import ZephyrSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, report_to="none", max_length=512)
    trainer = ZephyrSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"messages": conv}]),
                               processing_class=tok)
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    return row["input_ids"], batch["labels"][0].tolist()


def _expected_trained(tok, conv):
    """Independent expectation: character spans of assistant content + eos, mapped through token offsets."""
    text = render_conversation(tok, conv)
    spans, pos = [], 0
    for m in conv:
        header = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}[m["role"]]
        assert text[pos:pos + len(header)] == header
        pos += len(header)
        body = m["content"] + tok.eos_token
        assert text[pos:pos + len(body)] == body
        if m["role"] == "assistant":
            spans.append((pos, pos + len(body)))
        pos += len(body) + 1  # the "\n" after eos is never trained
    assert pos == len(text)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [any(s <= a and b <= e for s, e in spans) and b > a for a, b in enc["offset_mapping"]]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_assistant_only_labels_token_by_token(which, request, tmp_path):
    path = request.getfixturevalue("tiny_model_dir" if which == "tiny" else "smollm2_dir")
    tok = _tokenizer(path)
    assert tok.eos_token == ("</s>" if which == "tiny" else "<|im_end|>")
    ids, labels = _sft_labels(tok, CONV, path, tmp_path)
    ids2, trained = _expected_trained(tok, CONV)
    assert ids == ids2
    for i, (tid, lab, tr) in enumerate(zip(ids, labels, trained)):
        piece = tok.decode([tid])
        if tr:
            assert lab == tid, f"token {i} {piece!r} is assistant content/eos but not trained"
        else:
            assert lab == -100, f"token {i} {piece!r} is header/system/user/newline but trained"
    # every assistant turn ends with a trained eos token
    eos_positions = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
    assert len(eos_positions) == len(CONV)
    assistant_eos = [eos_positions[i] for i, m in enumerate(CONV) if m["role"] == "assistant"]
    assert all(labels[p] == tok.eos_token_id for p in assistant_eos)
    other_eos = [eos_positions[i] for i, m in enumerate(CONV) if m["role"] != "assistant"]
    assert all(labels[p] == -100 for p in other_eos)
    # the "<|assistant|>" header tokens are never trained
    header_ids = tok("<|assistant|>\n", add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(header_ids) + 1):
        if ids[start:start + len(header_ids)] == header_ids:
            assert all(labels[start + k] == -100 for k in range(len(header_ids)))


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_inference_prompt_is_training_prefix(which, request):
    path = request.getfixturevalue("tiny_model_dir" if which == "tiny" else "smollm2_dir")
    tok = _tokenizer(path)
    for cut in (2, 4):  # prompt = conversation up to a user turn
        prompt = render_prompt(tok, CONV[:cut])
        full = render_conversation(tok, CONV[:cut + 1])
        assert full.startswith(prompt), "inference prompt must be a byte prefix of the training text"
        assert prompt.endswith("<|assistant|>\n")
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"]
        assert f_ids[:len(p_ids)] == p_ids, "token ids of the prompt must be a prefix of the training ids"


def test_unknown_role_and_missing_eos_raise(tiny_model_dir):
    tok = _tokenizer(tiny_model_dir)
    with pytest.raises(Exception, match="Unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    bare.eos_token = None
    with pytest.raises(ValueError, match="eos_token"):
        apply_template(bare)
    with pytest.raises(ValueError, match="unknown chat_template"):
        apply_template(tok, "chatml-not-here")


def test_sft_trainer_uses_our_template_without_swapping(tiny_model_dir):
    """TRL keeps a template that already has generation markers (it would swap in its own otherwise)."""
    from trl.chat_template_utils import has_generation_markers

    tok = _tokenizer(tiny_model_dir)
    assert has_generation_markers(tok.chat_template)
    ds = Dataset.from_list([{"messages": CONV}])
    assert ds[0]["messages"][2]["content"] == "Hello there!"
