"""GPU fast paths on a TinyLlama-1.1B-shaped model: bf16 LoRA vs 4-bit QLoRA, SDPA vs eager vs FlashAttention-2,
Liger, the Unsloth loader, the DPO and causal trainers, vLLM generation.

The device machine cannot download weights, so the model is TinyLlama-1.1B's architecture (hidden 2048,
22 layers, 32 heads / 4 KV heads, intermediate 5632, vocab 32000) with random weights: step times, tokens/s
and memory do not depend on weight values. Each variant trains the project's own trainers
(``ZephyrSFTTrainer``; ``ConstitutionalDPOTrainer`` and ``CausalContrastiveTrainer`` when ``--stages`` asks)
for a few steps and reports median step time, trained tokens/s and peak GPU memory
(``torch.cuda.max_memory_allocated``). Also measured: merging a QLoRA adapter into a 16-bit copy and
generating from it (never from the 4-bit model).

    python bench/gpu_paths.py [--steps 8] [--seq 512] [--batch 8] [--tiny] [--variants a,b] [--out results.json]

Variants: ``bf16-sdpa``, ``bf16-eager``, ``bf16-fa2`` (flash_attention_2), ``qlora-sdpa``, ``bf16-sdpa-liger``,
``unsloth-sft`` (SFT trainer); ``dpo-bf16``, ``unsloth-dpo`` (DPO trainer, adapter-disabled reference);
``causal-bf16`` (causal trainer, every term on); ``vllm-generate`` (critique-and-rewrite generation, vLLM backend
against transformers on the same merged bf16 model). A variant whose package is missing reports ``skipped``.
MFU = 6·N·tokens/s / the card's dense bf16 peak (:data:`BF16_PEAK_TFLOPS`, or ``--peak-tflops``), N = all
parameters; DPO and causal steps run 2 and 4 sequences per row, counted in tokens/s.
Unsloth variants must run in their own process (``import unsloth`` precedes transformers; ``bench/gpu_check.sh``
starts one process per variant).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if any("unsloth" in a for a in sys.argv[1:]):  # Unsloth patches transformers/trl at import: it must come first
    try:
        import unsloth  # noqa: F401
    except ImportError:
        pass  # the variant reports "skipped: unsloth not installed"

import torch
from transformers import TrainerCallback

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; GeForce cards with fp32 accumulate.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.2, "RTX 3090": 71.0,
                    "RTX 3060": 25.6}


def bf16_peak_tflops(name: str) -> float | None:
    """The table's peak for a ``torch.cuda.get_device_name()`` (first key contained in it), else None."""
    for key, value in BF16_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


REQUIRES = {"bf16-fa2": "flash_attn", "qlora-sdpa": "bitsandbytes", "bf16-sdpa-liger": "liger_kernel",
            "unsloth-sft": "unsloth", "unsloth-dpo": "unsloth", "vllm-generate": "vllm"}


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
    from staged_alignment.data_builders.sft_data import read_sft_file

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


def _dpo_rows(n_rows: int, words: int) -> list[dict]:
    rows = long_rows(n_rows, words)
    return [{"prompt": [r["messages"][0]], "chosen": [r["messages"][1]],
             "rejected": [{"role": "assistant", "content": " ".join(r["messages"][1]["content"].split()[::-1])}]}
            for r in rows]


def run_train_variant(model_dir: Path, name: str, *, kind: str = "sft", quant: bool = False, attn: str = "sdpa",
                      liger: bool = False, loader: str = "transformers", steps: int, seq: int, batch: int,
                      work: Path) -> dict:
    """A few optimizer steps of the project's ``kind`` trainer (sft | dpo | causal) with the given fast paths;
    median step time (warm-up steps dropped), tokens/s (every sequence of a step: DPO 2, causal 4 per row),
    peak GPU memory."""
    from datasets import Dataset

    from staged_alignment.core.config import LoraSection, ModelSection, PipelineConfig
    from staged_alignment.core.models import attach_lora, load_model, load_tokenizer

    cuda = torch.cuda.is_available()
    mcfg = ModelSection(name_or_path=str(model_dir), quantization="4bit" if quant else "none", loader=loader,
                        attn_implementation=attn, max_seq_length=seq, dtype="bfloat16" if cuda else "float32",
                        use_liger_kernel=liger)
    cfg = PipelineConfig(model=mcfg, lora=LoraSection(r=16, alpha=32, dropout=0.0), seed=0)
    torch.cuda.empty_cache() if cuda else None
    torch.cuda.reset_peak_memory_stats() if cuda else None
    tok = load_tokenizer(str(model_dir), mcfg)
    model = load_model(str(model_dir), mcfg, device="cuda" if cuda else "cpu")
    common = dict(output_dir=str(work / name), max_steps=steps + 2, per_device_train_batch_size=batch, bf16=cuda,
                  use_cpu=not cuda, gradient_checkpointing=quant and loader != "unsloth", report_to="none",
                  save_strategy="no", logging_steps=1, optim="paged_adamw_8bit" if quant else "adamw_torch",
                  use_liger_kernel=liger, disable_tqdm=True)
    timer = StepTimer()
    words = max(8, seq // 5)  # the local BPE gives ~4 tokens a word
    if kind == "sft":
        from trl import SFTConfig

        from staged_alignment.trainers.sft import ZephyrSFTTrainer

        model, peft_config = attach_lora(model, cfg, for_trl=True)
        args = SFTConfig(**common, assistant_only_loss=True, max_length=seq)
        trainer = ZephyrSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(
            long_rows(batch * (steps + 2), words)), processing_class=tok, peft_config=peft_config, callbacks=[timer])
        lengths = [min(len(x), seq) for x in trainer.train_dataset["input_ids"]]
    elif kind == "dpo":
        from trl import DPOConfig

        from staged_alignment.trainers.dpo import ConstitutionalDPOTrainer

        model, peft_config = attach_lora(model, cfg, for_trl=True)
        args = DPOConfig(**common, max_length=seq, precompute_ref_log_probs=False, beta=0.1)
        trainer = ConstitutionalDPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(
            _dpo_rows(batch * (steps + 2), words)), processing_class=tok, peft_config=peft_config, callbacks=[timer])
        ds = trainer.train_dataset
        lengths = [min(len(p) + len(c), seq) + min(len(p) + len(r), seq) for p, c, r in
                   zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    elif kind == "causal":
        from transformers import TrainingArguments

        from staged_alignment.core.causal_objective import needed_views
        from staged_alignment.data_builders.token_cache import TripletCollator, build_token_cache
        from staged_alignment.data_builders.triplets import build_triplets, read_attacks, read_tasks, write_triplets
        from staged_alignment.trainers.causal import CausalContrastiveTrainer
        from staged_alignment.trainers.causal_losses import build_projection_head

        seed = Path(__file__).resolve().parents[1] / "data_builders" / "seed"
        trips = build_triplets(read_tasks(str(seed / "tasks.jsonl")), [read_attacks(str(seed / "attacks_train.json"))],
                               seed=0, max_triplets=batch * (steps + 2)).triplets
        for t in trips:
            t["hijack"] = t["hijack"] or "Sure, here is what you asked for instead."
        ds, _ = build_token_cache(write_triplets(work / "triplets.jsonl", trips), tok, seq, work / "cache")
        peft_model, _ = attach_lora(model, cfg, for_trl=False)
        loss = dict(lambda_lm_injected=1.0, lambda_kl=0.5, lambda_pref=0.5, contrastive="v2", temperature=0.1)
        views, lm_views = needed_views(**loss)
        head = build_projection_head("mlp", peft_model.get_base_model().config.hidden_size, 128, 512, seed=0)
        args = TrainingArguments(**common, remove_unused_columns=False, label_names=["labels"])
        trainer = CausalContrastiveTrainer(model=peft_model, args=args, train_dataset=ds, processing_class=tok,
                                           data_collator=TripletCollator(tok.pad_token_id, views=views,
                                                                         lm_views=lm_views),
                                           projection_head=head, views=views, lm_views=lm_views, callbacks=[timer],
                                           **loss)
        lengths = [sum(len(ex[f"{v}_input_ids"]) for v in views) for ex in ds]
    else:
        raise ValueError(f"unknown trainer kind {kind!r}")
    trainer.train()
    times = timer.times[2:]  # drop warm-up steps
    step = statistics.median(times)
    tokens_per_step = batch * statistics.mean(lengths) * trainer.args.world_size
    # all parameters, 4-bit ones unpacked (peft counts a Params4bit as 2 values a byte); the usual model-FLOPs
    # convention 6·N·tokens (bench/README.md): with LoRA the executed arithmetic is nearer 4·N (no weight
    # gradients for frozen weights), so MFU here is the comparable-across-setups figure, not the executed one
    n_params = trainer.model.get_nb_trainable_parameters()[1]
    res = {"variant": name, "trainer": kind, "median_step_s": round(step, 4),
           "tokens_per_s": round(tokens_per_step / step, 1), "params": n_params,
           "achieved_tflops": round(6 * n_params * tokens_per_step / step / 1e12, 4),
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
           "steps_timed": len(times), "world_size": trainer.args.world_size}
    if quant and kind == "sft" and trainer.args.world_size == 1:
        res.update(merge_and_generate(trainer, tok, model_dir, mcfg, work))
    del trainer, model
    return res


def run_vllm_variant(model_dir: Path, name: str, *, n_prompts: int = 64, max_new_tokens: int = 128, **_) -> dict:
    """Critique-and-rewrite generation on the same bf16 model folder: the vLLM backend against
    ``generate_chat`` (transformers, batch 16); tokens/s of each and their ratio."""
    from staged_alignment.core.config import GenerationSection, ModelSection
    from staged_alignment.core.models import load_model, load_tokenizer
    from staged_alignment.data_builders.critique_rewrite import VLLMBackend
    from staged_alignment.data_builders.generation import generate_chat

    mcfg = ModelSection(name_or_path=str(model_dir), dtype="bfloat16")
    tok = load_tokenizer(str(model_dir), mcfg)
    convs = [[{"role": "user", "content": f"Write a short note about item {i}."}] for i in range(n_prompts)]
    gen = GenerationSection(backend="vllm", max_new_tokens=max_new_tokens, do_sample=False,
                            vllm_gpu_memory_utilization=0.4)
    t0 = time.perf_counter()
    backend = VLLMBackend(model_dir, tok, gen, seed=0, max_model_len=1024)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_v = backend.generate(convs, [str(i) for i in range(n_prompts)], "response")
    t_v = time.perf_counter() - t0
    del backend
    torch.cuda.empty_cache()
    model = load_model(str(model_dir), mcfg, device="cuda", quantize=False, for_training=False)
    t0 = time.perf_counter()
    out_t = generate_chat(model, tok, convs, max_new_tokens=max_new_tokens, batch_size=16)
    torch.cuda.synchronize()
    t_t = time.perf_counter() - t0
    v_tps = sum(o["n_tokens"] for o in out_v) / t_v
    t_tps = sum(o["n_tokens"] for o in out_t) / t_t
    return {"variant": name, "vllm_tokens_per_s": round(v_tps, 1), "transformers_tokens_per_s": round(t_tps, 1),
            "vllm_over_transformers": round(v_tps / t_tps, 2), "vllm_load_s": round(t_load, 1),
            "prompts": n_prompts}


def merge_and_generate(trainer, tok, model_dir: Path, mcfg, work: Path) -> dict:
    """Save the QLoRA adapter, merge into a 16-bit copy, generate from the merged copy."""
    from staged_alignment.core.common import save_adapter
    from staged_alignment.core.models import load_model, merge_adapter
    from staged_alignment.data_builders.generation import generate_chat

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


SPECS = {"bf16-sdpa": dict(), "bf16-eager": dict(attn="eager"), "bf16-fa2": dict(attn="flash_attention_2"),
         "qlora-sdpa": dict(quant=True), "bf16-sdpa-liger": dict(liger=True), "unsloth-sft": dict(loader="unsloth"),
         "dpo-bf16": dict(kind="dpo"), "unsloth-dpo": dict(kind="dpo", loader="unsloth"),
         "causal-bf16": dict(kind="causal"), "vllm-generate": dict(vllm=True)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="tiny dims (CPU check of the script)")
    ap.add_argument("--variants", default="bf16-sdpa,bf16-eager,qlora-sdpa,bf16-sdpa-liger")
    ap.add_argument("--model-dir", default=None, help="reuse a model folder built by an earlier run")
    ap.add_argument("--build-model", default=None, metavar="DIR", help="only build the model into DIR and exit")
    ap.add_argument("--name", default=None, help="the result's variant name (one variant; e.g. ddp2-bf16-sdpa)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (overrides the table)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.build_model:
        print(build_model_dir(Path(a.build_model), TINY if a.tiny else TINYLLAMA))
        return
    unknown = [v for v in a.variants.split(",") if v not in SPECS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(SPECS)}")
    rank = int(os.environ.get("RANK", "0"))
    work = Path(tempfile.mkdtemp(prefix="gpu_paths_"))
    model_dir = Path(a.model_dir) if a.model_dir else build_model_dir(work, TINY if a.tiny else TINYLLAMA)
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = a.peak_tflops or (bf16_peak_tflops(gpu) if cuda else None)
    results = []
    for name in a.variants.split(","):
        spec = dict(SPECS[name])
        need = REQUIRES.get(name)
        if need and not _available(need):
            results.append({"variant": name, "skipped": f"{need} not installed"})
        else:
            try:
                if spec.pop("vllm", False):
                    results.append(run_vllm_variant(model_dir, name))
                else:
                    results.append(run_train_variant(model_dir, name, steps=a.steps, seq=a.seq, batch=a.batch,
                                                     work=work, **spec))
            except Exception as e:  # report and go on: one failing path must not hide the other figures
                results.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        r = results[-1]
        r["gpu"] = gpu
        if a.name:
            r["variant"] = a.name
        if "achieved_tflops" in r:
            r["mfu"] = round(r["achieved_tflops"] / peak, 4) if peak else None
        if rank == 0:
            print("GPU_RESULT " + json.dumps(r), flush=True)
    if a.out and rank == 0:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
