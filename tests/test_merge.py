"""Merges keep the trained model: merged logits equal adapter logits in the training precision (fp32 on CPU)."""
from __future__ import annotations

import pytest
import torch


def _adapter(model_dir, out, scale=0.002):
    """A LoRA adapter whose update is small against W (as after a real stage: ≈ 0.1 % of ‖W‖)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * scale)
    peft.save_pretrained(out)
    return peft


def test_fp32_merge_equals_adapter_logits_and_bf16_does_not(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from staged_alignment.core.config import ModelSection
    from staged_alignment.core.models import merge_adapter, merged_dtype

    peft = _adapter(tiny_model_dir, tmp_path / "adapter")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(["Summarise the email below in one sentence.", "The capital of France is Paris."], padding=True,
              return_tensors="pt")
    with torch.no_grad():
        ref = peft(**ids).logits
        base = peft.get_base_model()
        with peft.disable_adapter():
            plain = base(**ids).logits
    effect = (ref - plain).abs().mean().item()
    assert effect > 1e-4  # the adapter changes the model

    ms = ModelSection(name_or_path=str(tiny_model_dir))
    assert merged_dtype(ms, "cpu") == torch.float32  # auto = the CPU training precision
    merge_adapter(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "fp32", ms, tok, device="cpu")
    m32 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    assert next(m32.parameters()).dtype == torch.float32
    assert m32.config.dtype in (torch.float32, "float32")
    with torch.no_grad():
        err32 = (m32(**ids).logits - ref).abs().max().item()
    assert err32 < 1e-4

    ms16 = ModelSection(name_or_path=str(tiny_model_dir), merge_dtype="bfloat16")
    merge_adapter(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "bf16", ms16, tok, device="cpu")
    m16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    with torch.no_grad():
        err16 = (m16(**ids).logits - ref).abs().max().item()
    assert err16 > 10 * err32  # the 16-bit copy loses part of the update (bench/bench_merge_precision.py)


@pytest.mark.parametrize("value", ["float64", "fp8"])
def test_merge_dtype_is_validated(tmp_path, value):
    from staged_alignment.core.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text(f"model:\n  merge_dtype: {value}\n")
    with pytest.raises(ConfigError, match="merge_dtype"):
        load_config(p)
