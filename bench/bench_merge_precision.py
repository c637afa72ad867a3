"""Merge precision: how much of a LoRA update survives a merged copy in fp32 vs bf16 (side by side, one run).

For an adapter trained in fp32 on CPU (e.g. a run's ``sft/adapter`` on its base), per LoRA module the intended
update is ΔW = (α/r)·B·A (fp32). A merged copy in dtype d stores W_d = round_d(W + ΔW); the update it really carries,
seen by the next stage (which loads it in fp32), is ΔW_d = W_d − W. Printed per dtype: cos(ΔW, ΔW_d) and
‖ΔW_d‖/‖ΔW‖ for one named module and the median over all modules, ‖ΔW‖/‖W‖, and on a few prompts the mean
absolute logit error of the merged copy against the adapter model, next to the adapter's own effect (mean
|logits(adapter) − logits(base)|). The stages merge in fp32 on CPU (``model.merge_dtype: auto``); bf16 is what
they did before.

    python bench/bench_merge_precision.py --base BASE_DIR --adapter ADAPTER_DIR [--module model.layers.10.self_attn.q_proj]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, setup

PROMPTS = ["Summarise the note below in one sentence.\n\nThe kitchen is closed on Friday.",
           "What is the capital of France?", "Give three tips for writing clear emails."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--module", default="model.layers.10.self_attn.q_proj")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    setup(a.threads)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from staged_alignment.core.chat_template import prompt_ids
    from staged_alignment.core.config import ModelSection
    from staged_alignment.core.models import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    W0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    peft = PeftModel.from_pretrained(base, a.adapter)
    tok = load_tokenizer(a.base, ModelSection(name_or_path=a.base))
    batch = [prompt_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    with torch.no_grad():
        adapter_logits = [peft(input_ids=torch.tensor([ids])).logits for ids in batch]
        with peft.disable_adapter():
            base_logits = [peft(input_ids=torch.tensor([ids])).logits for ids in batch]
    effect = statistics.mean(float((x - y).abs().mean()) for x, y in zip(adapter_logits, base_logits))
    deltas = {}
    for name, mod in peft.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            dw = mod.get_delta_weight("default").detach().float()
            key = name.replace("base_model.model.", "") + ".weight"
            deltas[key] = dw
    merged = peft.merge_and_unload()
    figures = {"adapter_logit_effect": round(effect, 5), "modules": len(deltas)}
    for dtype in ("float32", "bfloat16"):
        stored = {n: p.detach().to(getattr(torch, dtype)).float() for n, p in merged.named_parameters()}
        cos, ratio = [], []
        for n, dw in deltas.items():
            real = stored[n] - W0[n]
            c = torch.nn.functional.cosine_similarity(dw.flatten(), real.flatten(), dim=0).item()
            cos.append(c)
            ratio.append((real.norm() / dw.norm()).item())
            if n == a.module + ".weight":
                figures[f"{dtype}_{a.module}_cos"] = round(c, 4)
                figures[f"{dtype}_{a.module}_norm_ratio"] = round(ratio[-1], 4)
                figures[f"{a.module}_update_over_weight"] = round((dw.norm() / W0[n].norm()).item(), 6)
        figures[f"{dtype}_median_cos"] = round(statistics.median(cos), 4)
        figures[f"{dtype}_median_norm_ratio"] = round(statistics.median(ratio), 4)
        copy = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
        copy.load_state_dict({n: stored[n] for n in stored}, strict=False)
        with torch.no_grad():
            err = statistics.mean(float((copy(input_ids=torch.tensor([ids])).logits - x).abs().mean())
                                  for ids, x in zip(batch, adapter_logits))
        figures[f"{dtype}_logit_error_vs_adapter"] = round(err, 6)
    report("merge_precision", figures, headline="cos(intended ΔW, ΔW stored by a bf16 merge), median over modules",
           value=figures["bfloat16_median_cos"], goal="fp32 merge: cos 1.0 (the stages merge in fp32 on CPU)",
           met=figures["float32_median_cos"] > 0.999,
           notes=f"base {a.base}, adapter {a.adapter}; logit error = mean |merged − adapter| over {len(PROMPTS)} prompts")
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
