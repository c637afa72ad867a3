"""Per-stage device-memory estimate for the dry run (weights, LoRA, optimizer, activations, logits).

An estimate, not a measurement: bytes = weights + LoRA params·(weight+grad+AdamW m,v in fp32 = 16 B) +
head + activations + logits. Activations per layer follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 1): s·b·h·(34 + 5·a·s/h) bytes in 16-bit without
recomputation, 2·s·b·h with full checkpointing; fp32 doubles them. Logits: b·s·V·4 bytes (×2 with their
gradient). DPO doubles the batch (chosen + rejected); the reference pass (adapter disabled) adds no weights.
The causal stage multiplies it by the number of views its objective stacks (1–4: benign, injected, counterfactual,
hijack; :func:`core.causal_objective.needed_views`) and uses ``causal.max_length`` when set; its logits exist
only at the response positions (bounded here by the full length). Generation (``dpo-generate``: critique and
rewrite at ``dpo.generation.batch_size``, prompt + ``max_new_tokens`` positions; ``evaluate``): merged 16-bit
weights + KV cache.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from staged_alignment.core.causal_objective import needed_views

GiB = 1024 ** 3

# dims of the models the shipped configs use, for estimates without downloading their config.json
KNOWN = {
    "embedded:smollm2-135m-instruct": dict(params=134.5e6, hidden=576, inter=1536, layers=30, heads=9, kv=3, vocab=49152),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": dict(params=1.10e9, hidden=2048, inter=5632, layers=22, heads=32, kv=4, vocab=32000),
    "meta-llama/Llama-3.1-8B-Instruct": dict(params=8.03e9, hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256),
    "Qwen/Qwen2.5-32B": dict(params=32.8e9, hidden=5120, inter=27648, layers=64, heads=40, kv=8, vocab=152064),
}


@dataclass
class Estimate:
    stage: str
    gib: float
    parts: dict

    def line(self, device_gib: float | None) -> str:
        share = f" = {100 * self.gib / device_gib:.0f}% of {device_gib:g} GiB" if device_gib else ""
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.parts.items())
        return f"{self.stage:12s} ~{self.gib:6.2f} GiB{share}  ({parts})"


def config_file(name_or_path: str) -> Path | None:
    """The model's ``config.json``: in a local folder, or for a Hub id in the local Hugging Face cache (never
    downloaded); None when neither has it."""
    local = Path(name_or_path) / "config.json"
    if local.is_file():
        return local
    if "/" not in name_or_path or name_or_path.startswith("embedded:"):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # noqa: BLE001 - an invalid id is simply not cached
        return None
    return Path(hit) if isinstance(hit, str) else None


def model_dims(name_or_path: str) -> dict | None:
    """Dims from the model's ``config.json`` (a local folder, or the Hub cache: :func:`config_file`; multimodal
    configs read through their ``text_config``), else the shipped recipes' table :data:`KNOWN` (offline fallback);
    None when unknown. Nothing is downloaded."""
    cfg_file = config_file(name_or_path)
    if cfg_file is None:
        return KNOWN.get(name_or_path)
    c = json.loads(cfg_file.read_text())
    c = c.get("text_config") or c
    h, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    inter = c.get("intermediate_size", 4 * h)
    heads = c.get("num_attention_heads", 1)
    kv = c.get("num_key_value_heads", heads)
    params = V * h * (1 if c.get("tie_word_embeddings") else 2) + L * (2 * h * h + 2 * h * h * kv // heads + 3 * h * inter)
    return dict(params=params, hidden=h, inter=inter, layers=L, heads=heads, kv=kv, vocab=V)


def lora_params(d: dict, r: int, targets: list[str]) -> int:
    """Trainable LoRA parameters: r·(d_in + d_out) per targeted projection per layer."""
    h, inter, kvh = d["hidden"], d["inter"], d["hidden"] * d["kv"] // d["heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kvh), "v_proj": (h, kvh), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return d["layers"] * sum(r * sum(shapes[t]) for t in targets if t in shapes)


def _causal_views(cfg) -> int:
    """Views per triplet the configured causal objective stacks (1–4)."""
    try:
        return len(needed_views(**dataclasses.asdict(cfg.causal.loss))[0])
    except Exception:  # noqa: BLE001 - an invalid loss section is reported by validation, not here
        return 3


def estimate(cfg, stage: str, dims: dict, *, on_cuda: bool) -> Estimate:
    """Peak-memory estimate in GiB of one stage on one device (see module docstring for the formula)."""
    tr = getattr(cfg, stage).training if stage in ("sft", "dpo", "causal") else {}
    b = int(tr.get("per_device_train_batch_size") or 8)
    s = int(tr.get("max_length") or (cfg.causal.max_length if stage == "causal" else None) or cfg.model.max_seq_length)
    if stage == "dpo-generate":  # critique-and-rewrite on the merged model: the generation batch, prompt + answer
        gen = cfg.dpo.generation
        b, s = gen.batch_size, cfg.model.max_seq_length + gen.max_new_tokens
    ckpt = bool(tr.get("gradient_checkpointing", on_cuda and cfg.model.quantization == "4bit"))
    act_bytes = 2 if on_cuda else 4
    training = stage in ("sft", "dpo", "causal")
    wbytes = 0.5 + 0.07 if (cfg.model.quantization == "4bit" and training) else (2 if on_cuda else 4)
    h, L, V, a = dims["hidden"], dims["layers"], dims["vocab"], dims["heads"]
    mult = {"sft": 1, "dpo": 2, "causal": _causal_views(cfg), "evaluate": 1}.get(stage, 1)
    bb = b * mult
    parts = {"weights": dims["params"] * wbytes / GiB}
    if stage in ("sft", "dpo", "causal"):
        lp = lora_params(dims, cfg.lora.r, cfg.lora.target_modules)
        parts["lora+adam"] = lp * 16 / GiB
        per_layer = (2 * s * bb * h) if ckpt else s * bb * h * (34 + 5 * a * s / h)
        parts["activations"] = L * per_layer * act_bytes / 2 / GiB
        parts["logits"] = bb * s * V * 4 * 2 / GiB
        if stage == "causal" and cfg.causal.loss.contrastive != "none":
            parts["head"] = (h * 256 + 256 * 128) * 16 / GiB
    else:  # generation / evaluation: merged 16-bit weights + KV cache
        parts["weights"] = dims["params"] * (2 if on_cuda else 4) / GiB
        kvh = h * dims["kv"] // dims["heads"]
        parts["kv_cache"] = 2 * L * bb * s * kvh * act_bytes / GiB
    return Estimate(stage, sum(parts.values()), parts)
