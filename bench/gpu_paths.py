"""GPU fast paths on a TinyLlama-1.1B-shaped model: bf16 LoRA vs 4-bit QLoRA, SDPA vs eager, Liger.

The device machine cannot download weights, so the model is TinyLlama-1.1B's architecture (hidden 2048,
22 layers, 32 heads / 4 KV heads, intermediate 5632, vocab 32000) with random weights: step times, tokens/s
and memory do not depend on weight values. Each variant trains the project's own trainers
(``ZephyrSFTTrainer``; ``ConstitutionalDPOTrainer`` and ``CausalContrastiveTrainer`` when ``--stages`` asks)
for a few steps and reports median step time, trained tokens/s and peak GPU memory
(``torch.cuda.max_memory_allocated``). Also measured: merging a QLoRA adapter into a 16-bit copy and
generating from it (never from the 4-bit model).

    python bench/gpu_paths.py [--steps 8] [--seq 512] [--batch 8] [--tiny] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (CUDA-synchronised)."""

    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def build_model_dir(root: Path, dims: dict) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tiny_tokenizer

    out = root / "tinyllama-shaped"
    tok = build_tiny_tokenizer(out)
    cfg = LlamaConfig(**dims, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    return out


def long_rows(n_rows: int, words: int) -> list[dict]:
    from data_builders.sft_data import read_sft_file

    seed = read_sft_file(str(Path(__file__).resolve().parents[1] / "data_builders/seed/sft_seed.jsonl"))
    text = " ".join(m["content"] for r in seed for m in r["messages"]).split()
    rows = []
    for i in range(n_rows):
        start = (i * 37) % max(1, len(text) - words)
        chunk = (text * 4)[start:start + words]
        half = len(chunk) // 3
        rows.append({"messages": [{"role": "user", "content": " ".join(chunk[:half])},
                                  {"role": "assistant", "content": " ".join(chunk[half:])}]})
    return rows


def run_sft_variant(model_dir: Path, name: str, *, quant: bool, attn: str, liger: bool, steps: int, seq: int,
                    batch: int, work: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig

    from stages.config import LoraSection, ModelSection
    from stages.models import load_model, load_tokenizer, lora_config
    from trainers.sft import ZephyrSFTTrainer

    cuda = torch.cuda.is_available()
    mcfg = ModelSection(name_or_path=str(model_dir), quantization="4bit" if quant else "none",
                        attn_implementation=attn, max_seq_length=seq, dtype="bfloat16" if cuda else "float32")
    torch.cuda.empty_cache() if cuda else None
    torch.cuda.reset_peak_memory_stats() if cuda else None
    tok = load_tokenizer(str(model_dir), mcfg)
    model = load_model(str(model_dir), mcfg, device="cuda" if cuda else "cpu")
    rows = long_rows(batch * (steps + 2), words=max(8, seq // 5))  # the local BPE gives ~4 tokens a word
    args = SFTConfig(output_dir=str(work / name), max_steps=steps + 2, per_device_train_batch_size=batch,
                     bf16=cuda, use_cpu=not cuda, gradient_checkpointing=quant, report_to="none",
                     assistant_only_loss=True, max_length=seq, save_strategy="no", logging_steps=1,
                     optim="paged_adamw_8bit" if quant else "adamw_torch", use_liger_kernel=liger,
                     disable_tqdm=True)
    timer = StepTimer()
    trainer = ZephyrSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                               peft_config=lora_config(LoraSection(r=16, alpha=32)), callbacks=[timer])
    lengths = [min(len(x), seq) for x in trainer.train_dataset["input_ids"]]
    trainer.train()
    times = timer.times[2:]  # drop warm-up steps
    step = statistics.median(times)
    tokens_per_step = batch * statistics.mean(lengths)
    res = {"variant": name, "median_step_s": round(step, 4), "tokens_per_s": round(tokens_per_step / step, 1),
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
           "steps_timed": len(times), "mean_seq_tokens": round(statistics.mean(lengths), 1)}
    if quant:
        res.update(merge_and_generate(trainer, tok, model_dir, mcfg, work))
    del trainer, model
    return res


def merge_and_generate(trainer, tok, model_dir: Path, mcfg, work: Path) -> dict:
    """Save the QLoRA adapter, merge into a 16-bit copy, generate from the merged copy."""
    from data_builders.generation import generate_chat
    from stages.common import save_adapter
    from stages.models import load_model, merge_adapter

    t0 = time.perf_counter()
    save_adapter(trainer.model, tok, work / "qlora_adapter")
    merge_adapter(str(model_dir), work / "qlora_adapter", work / "qlora_merged", mcfg, tok)
    t_merge = time.perf_counter() - t0
    merged = load_model(str(work / "qlora_merged"), mcfg, device="cuda", quantize=False, for_training=False)
    dtype = str(next(merged.parameters()).dtype)
    t0 = time.perf_counter()
    out = generate_chat(merged, tok, [[{"role": "user", "content": "Say hello."}]] * 8, max_new_tokens=32,
                        batch_size=8)
    torch.cuda.synchronize()
    t_gen = time.perf_counter() - t0
    return {"merge_s": round(t_merge, 2), "merged_dtype": dtype,
            "generate_tokens_per_s": round(sum(o["n_tokens"] for o in out) / t_gen, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="tiny dims (CPU check of the script)")
    ap.add_argument("--variants", default="bf16-sdpa,bf16-eager,qlora-sdpa,bf16-sdpa-liger")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu_paths_"))
    model_dir = build_model_dir(work, TINY if a.tiny else TINYLLAMA)
    specs = {"bf16-sdpa": dict(quant=False, attn="sdpa", liger=False),
             "bf16-eager": dict(quant=False, attn="eager", liger=False),
             "qlora-sdpa": dict(quant=True, attn="sdpa", liger=False),
             "bf16-sdpa-liger": dict(quant=False, attn="sdpa", liger=True)}
    results = []
    for name in a.variants.split(","):
        try:
            results.append(run_sft_variant(model_dir, name, steps=a.steps, seq=a.seq, batch=a.batch, work=work,
                                           **specs[name]))
        except Exception as e:  # report and go on: one missing package must not hide the other figures
            results.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(results[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"\n{'variant':18s} {'step s':>8s} {'tok/s':>9s} {'peak GiB':>9s}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:18s} error: {r['error'][:80]}")
        else:
            print(f"{r['variant']:18s} {r['median_step_s']:8.3f} {r['tokens_per_s']:9.0f} {str(r['peak_gpu_gib']):>9s}")


if __name__ == "__main__":
    main()
