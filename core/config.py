"""The pipeline config: one YAML, a section per stage, one source of truth for model and chat template.

Each section is a typed pydantic v2 dataclass (:mod:`core.settings`): a field declares its type, its choices
(``Literal``), its range (``Field(ge=…, le=…)``) and its description once; nested sections (``dpo.generation``,
``causal.loss``, ``causal.head``, ``evaluate.suite``, ``evaluate.adaptive``, the data sources) are typed the same
way, and rules that span fields are ``model_validator``\ s naming the field they are about. Loading checks
everything before a model is touched: unknown keys, wrong types, values out of range and inconsistent settings
raise :class:`ConfigError`, which names the file, the YAML line (pydantic's error location through the YAML line
map) and the dotted field; :func:`validate_config` then checks what needs the disk, the Hub or the hardware.
``key=value`` overrides use dotted paths (``sft.training.learning_rate=1e-4``); values are parsed as YAML 1.2.
The ``training`` sub-sections stay TRL's ``SFTConfig``/``DPOConfig`` and transformers' ``TrainingArguments``:
they are converted and range-checked against those classes (``core.common.check_training_section``) and passed
through ``HfArgumentParser.parse_dict`` (unknown keys are an error there too).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, get_args

import yaml
from pydantic import BeforeValidator, Field, ValidationError, model_validator

from staged_alignment.core.causal_objective import CausalHeadSettings, CausalLossSettings
from staged_alignment.core.chat_template import CHOICES
from staged_alignment.core.jsonl_io import exists, path_name_problem
from staged_alignment.core.redaction import has_secret, redact_tree
from staged_alignment.core.settings import (
    Bool,
    Float,
    Int,
    Prose,
    Text,
    field_infos,
    invalid,
    located_errors,
    section,
    section_class,
)

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SECRET_KEY_PARTS = ("token", "api_key", "password", "secret")


# training keys that may change when an interrupted stage resumes from its checkpoint (see config_hash)
RESUME_SAFE_TRAINING_KEYS = ("max_steps", "num_train_epochs", "save_steps", "save_total_limit", "logging_steps",
                             "eval_steps", "report_to", "run_name", "dataloader_num_workers", "disable_tqdm")

OVERRIDE = "override"  # the "line" of a value set by a key=value override


class ConfigError(ValueError):
    """A bad config value: names the file, the YAML line (when known) and the dotted field."""

    def __init__(self, path: str | None, line: int | None, field_name: str | None, message: str):
        if len(message) > 600:  # a 5000-character value echoed back helps no one
            message = message[:480] + " … " + message[-100:]
        self.path, self.line, self.field, self.message = path, line, field_name, message
        if line == OVERRIDE:
            where = f"{path or '<config>'} (command-line override)"
        else:
            where = f"{path}:{line}" if (path and line) else (path or "<config>")
        what = f"field '{field_name}': " if field_name else ""
        super().__init__(f"{where}: {what}{message}")


class CliParser(argparse.ArgumentParser):
    """``argparse`` with the project's error format and TRL-style flags, for every stage script.

    A bad command line raises :class:`ConfigError` (``error: command line: <prog>: <message>``; the scripts print it
    as their one ``error:`` line and exit 2) instead of argparse's usage block; :meth:`parse` accepts the dotted
    ``key=value`` overrides before, between and after the flags (``parse_intermixed_args``).

    Flags the script does not define are config overrides, written as TRL and HF scripts write them
    (:meth:`flag_to_override`): ``--key value``, ``--key=value``, or ``--key`` alone for ``true``; a dotted key
    (``--sft.training.max_steps 5``) is used as it is; ``-`` in a key reads as ``_``. ``stage`` (``sft``, ``dpo``,
    ``causal``, ``evaluate``; None for the pipeline and other scripts) decides where a bare key goes.
    """

    def __init__(self, *args, stage: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage

    def error(self, message):  # argparse's hook for every usage error
        raise ConfigError("command line", None, None, f"{self.prog}: {message} (see --help)")

    def flag_to_override(self, key: str) -> str:
        """The dotted config key a bare flag name means, in this order: a dotted key as it is; a TRL/HF alias
        (:data:`CLI_ALIASES`, e.g. ``model_name_or_path`` → ``model.name_or_path``, ``lora_r`` → ``lora.r``); a
        top-level setting (``run_name``, ``output_dir``, ``seed``, ``device``); on a stage script, a setting of that
        stage's section (``--max_prompts`` → ``dpo.max_prompts``), else of its training arguments
        (``--learning_rate`` → ``dpo.training.learning_rate``; an unknown name is refused there, naming the key);
        elsewhere a ``model`` or ``lora`` setting. Raises :class:`ConfigError` for a bare key with no stage."""
        key = key.replace("-", "_")
        if "." in key:
            return key
        if key in CLI_ALIASES:
            return CLI_ALIASES[key]
        top = {f.name for f in dataclasses.fields(PipelineConfig)}
        if key in top and not is_dataclass_field(PipelineConfig, key):
            return key
        sections = {"sft": SFTSection, "dpo": DPOSection, "causal": CausalSection, "evaluate": EvaluateSection}
        if self.stage in sections:
            if key != "training" and key in {f.name for f in dataclasses.fields(sections[self.stage])}:
                return f"{self.stage}.{key}"
            if self.stage != "evaluate":
                return f"{self.stage}.training.{key}"
        for name, cls in (("model", ModelSection), ("lora", LoraSection)):
            if key in {f.name for f in dataclasses.fields(cls)}:
                return f"{name}.{key}"
        raise ConfigError("command line", None, None,
                          f"{self.prog}: --{key} is not a setting here; give its section, e.g. "
                          f"--sft.training.{key} (or sft.training.{key}=…)")

    def parse(self, argv=None) -> argparse.Namespace:
        """Parse ``argv`` (``sys.argv[1:]`` when None); raises :class:`ConfigError` on a usage error."""
        argv = list(sys.argv[1:] if argv is None else argv)
        known = {opt: a for a in self._actions for opt in a.option_strings}
        out, i = [], 0
        while i < len(argv):
            tok = argv[i]
            name, eq, value = tok[2:].partition("=") if tok.startswith("--") and len(tok) > 2 else ("", "", "")
            if not name or f"--{name}" in known:
                out.append(tok)
                action = known.get(f"--{name}")
                if action is not None and not eq and action.nargs != 0 and i + 1 < len(argv):
                    out.append(argv[i + 1])  # the script's own flag and its value
                    i += 1
                i += 1
                continue
            close = difflib.get_close_matches(f"--{name}", [k for k in known if k.startswith("--")], n=1, cutoff=0.85)
            if close:  # a typo of the script's own flag, not a config key
                self.error(f"unrecognized arguments: --{name} (did you mean {close[0]}?)")
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if nxt is not None and not nxt.startswith("--") and not _OVERRIDE.match(nxt):
                    value, i = nxt, i + 1
                else:
                    value = "true"
            out.append(f"{self.flag_to_override(name)}={value}")
            i += 1
        return self.parse_intermixed_args(out)


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.-]*=")
# TRL / HF script flag names → this project's config keys
CLI_ALIASES = {"model_name_or_path": "model.name_or_path", "trust_remote_code": "model.trust_remote_code",
               "attn_implementation": "model.attn_implementation", "max_seq_length": "model.max_seq_length",
               "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
               "lora_target_modules": "lora.target_modules", "use_liger_kernel": "model.use_liger_kernel"}


def is_dataclass_field(cls, name: str) -> bool:
    """Whether ``cls.name`` is itself a section (a dataclass), as ``PipelineConfig.model`` is."""
    info = field_infos(cls).get(name)
    return info is not None and dataclasses.is_dataclass(section_class(info.annotation))


SHARE = ("share", "staged-alignment")  # where a wheel installs configs/ and constitutions/ (data-files)


def bundled_path(path: str | os.PathLike) -> Path | None:
    """``path`` (relative, e.g. ``constitutions/default.json``) among the files a non-editable install ships
    (``<sys.prefix>/share/staged-alignment/…``), or None when it is not there."""
    p = Path(path)
    if p.is_absolute():
        return None
    cand = Path(sys.prefix).joinpath(*SHARE) / p
    return cand if cand.exists() else None


def resolve_input(path: str | os.PathLike) -> Path:
    """A relative input path as given (from the working directory) if it exists, else relative to the code's root
    (a checkout, or the site-packages of a wheel install, where ``data_builders/seed`` and ``evaluation/heldout``
    are package data), else among the files a wheel ships under ``<prefix>/share`` (:func:`bundled_path`), else
    as given (the reader then names it as missing)."""
    p = Path(path)
    if path_name_problem(p):
        return p  # the reader (or _check_path_names) names what is wrong with it
    if p.is_absolute() or exists(p):
        return p
    alt = Path(__file__).resolve().parents[1] / p
    if exists(alt):
        return alt
    return bundled_path(p) or p


# --------------------------------------------------------------------------------------------- sections
# Every section is a pydantic dataclass (core.settings): type, choices and range on the field, cross-field checks
# in a model_validator; building one validates it, and an assignment too. What needs the file system, the network
# or the hardware (a template file, Hub ids, CUDA) is checked afterwards by validate_config.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
OptInt = Annotated[Int | None, Field(ge=1)]  # a count or a cap; null = all


def _doc(default, description: str, **constraints):
    return Field(default, description=description, **constraints)


@section
class ModelSection:
    """The base model and how every stage loads it."""

    name_or_path: Text = _doc("embedded:smollm2-135m-instruct", "HF id, local folder, or an embedded model name")
    chat_template: Text = _doc("zephyr", "zephyr | tokenizer (the model's own) | a .jinja file; the same at every "
                                         "stage")
    dtype: Dtype = _doc("auto", "auto: fp32 on CPU, bf16 on CUDA where supported")
    trust_remote_code: Bool = _doc(False, "run the model repo's own Python code (never at validation)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] = \
        _doc("sdpa", "attention kernel (FlashAttention: CUDA only)")
    max_seq_length: Int = _doc(512, "tokens per training sequence", ge=16)
    quantization: Literal["none", "4bit"] = _doc("none", "4bit = QLoRA: bitsandbytes nf4, bf16 compute; CUDA only")
    loader: Literal["transformers", "unsloth"] = _doc("transformers", "unsloth: CUDA only, GPU extra")
    device_memory_gb: Float | None = _doc(None, "memory of the one training device, for the dry-run estimate", gt=0)
    cache_dir: Text | None = _doc(None, "where embedded models are converted (default: ~/.cache/staged-alignment)")
    use_liger_kernel: Bool = _doc(False, "TRL/transformers Liger kernels (CUDA + liger-kernel)")
    data_role: Bool = _doc(False, "put a prompt's data part in its own <|input|> turn (training, generation, "
                                  "evaluation)")
    merge_dtype: Dtype = _doc("auto", "dtype of merged copies: auto = the training compute dtype")
    control_tokens: Literal["escape", "refuse"] = _doc(
        "escape", "control strings (special tokens, template role markers) inside any content: escape (split by "
                  "U+200B, read as text) | refuse (error when the row is rendered); core.chat_template.neutralise")


@section
class LoraSection:
    """The LoRA adapter every training stage trains (and merges)."""

    r: Int = _doc(16, "rank", ge=1)
    alpha: Int = _doc(32, "scaling numerator (scale = alpha / r)", ge=1)
    dropout: Float = _doc(0.05, "dropout on the adapter's input", ge=0, lt=1)
    target_modules: list[Text] = _doc(ALL_PROJECTIONS, "module names the adapter wraps (checked against the "
                                                       "model)", min_length=1)


@section
class HubSection:
    """Pushing adapters (and merged models) to the Hugging Face Hub after each stage."""

    push_to_hub: Bool = _doc(False, "push each stage's adapter to its <stage>.hub_model_id")
    private: Bool = _doc(True, "create the repos private")
    push_dry_run: Bool = _doc(False, "write exactly the folder that would be uploaded, upload nothing")
    organization: Text | None = _doc(None, "namespace of repo ids given without one")
    push_merged: Bool = _doc(False, "also push <stage>/merged to <hub_model_id>-merged (the next stage's loadable "
                                    "base)")


@section
class LoggingSection:
    """Where training logs go."""

    report_to: list[Literal["none", "wandb", "tensorboard"]] = _doc(["none"], "trackers (W&B reads WANDB_API_KEY "
                                                                              "from the environment)")
    wandb_project: Text = _doc("staged-alignment", "W&B project")
    wandb_group: Text | None = _doc(None, "W&B group (default: the run name)")
    logging_steps: Int = _doc(1, "log every N optimizer steps", ge=1)


@section
class DataSource(Mapping):
    """One data source of a list (``sft.data``, ``dpo.prompts``, ``causal.tasks``, ``causal.*_attacks``): a local
    file, a URL, a Hub dataset id or a dataset folder (:mod:`core.sources`). In YAML a bare path stands for
    ``{path: …}``. It reads as the mapping the source readers take (``source["path"]``, ``source.get("split")``),
    so code may pass them a plain dict with the same keys."""

    path: Text = Field(description="file, URL, Hub dataset id or dataset folder")
    format: Text = _doc("auto", "the reader's format (auto: from the file's rows)")
    max_rows: OptInt = _doc(None, "read at most this many rows")
    skip_invalid: Bool = _doc(False, "drop (and count) bad rows instead of stopping; malformed files still stop")
    name: Text | None = _doc(None, "the dataset's configuration name (load_dataset's name)")
    data_dir: Text | None = _doc(None, "e.g. harmless-base in Anthropic/hh-rlhf")
    data_files: Any = _doc(None, "a file, a list of files, or {split: files}")
    split: Text = _doc("train", "the split to read")
    revision: Text | None = _doc(None, "a Hub revision (branch, tag or commit)")
    columns: dict[str, str] | None = _doc(None, "renames before the format is read, e.g. {question: prompt}")
    streaming: Bool = _doc(False, "read a Hub dataset row by row (load_dataset(streaming=True)): only max_rows "
                                  "are fetched")

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


def _sources(value):
    """A source list as written: a bare path is ``{path: …}``; anything else but a mapping is refused by index."""
    if not isinstance(value, list):
        return value
    out = []
    for i, s in enumerate(value):
        if isinstance(s, str):
            s = {"path": s}
        elif not isinstance(s, (dict, DataSource)):
            raise invalid(str(i), f"expected a path or a mapping with 'path', got {type(s).__name__} ({s!r})")
        out.append(s)
    return out


Sources = Annotated[list[DataSource], BeforeValidator(_sources)]


@section
class SFTSection:
    """Stage 0: supervised fine-tuning in the Zephyr format, loss on assistant tokens only."""

    enabled: Bool = _doc(True, "run this stage")
    data: Sources = _doc([], "SFT sources (messages, Alpaca, prompt/response rows)")
    eval_fraction: Float = _doc(0.0, "held-out share of the rows for eval loss", ge=0, lt=1)
    sample_prompts: list[Prose] = _doc(["Give three tips for writing clear emails."], "answered after training, in "
                                                                                     "the stage's report")
    hub_model_id: Text | None = _doc(None, "Hub repo of the stage's adapter (hub.push_to_hub)")
    max_truncated_share: Float = _doc(0.05, "share of rows whose prompt fills max_length so that no assistant token "
                                            "is trained; above it validation fails", ge=0, le=1)
    training: dict = _doc({}, "trl.SFTConfig keys")


def _similarity(default: float, description: str):
    return Field(default, gt=0, le=1, description=description + " (a similarity in (0, 1])")


@section
class GenerationSection:
    """``dpo.generation``: sampling for critique-and-rewrite, who critiques, and the pair filters
    (``data_builders/pair_filters.py``; similarity = difflib ratio / containment in [0, 1])."""

    backend: Literal["transformers", "vllm"] = _doc("transformers", "vllm: CUDA only")
    batch_size: Int = _doc(8, "prompts per generation batch", ge=1)
    max_new_tokens: Int = _doc(128, "tokens per answer, critique and revision", ge=1)
    do_sample: Bool = _doc(True, "sample (else greedy)")
    temperature: Float = _doc(0.7, "sampling temperature (> 0 when do_sample)", ge=0)
    top_p: Float = _doc(0.9, "nucleus sampling mass", gt=0, le=1)
    vllm_gpu_memory_utilization: Float = _doc(0.5, "vLLM's share of GPU memory", gt=0, le=1)
    num_few_shot: Int = _doc(1, "few-shot critique-and-rewrite conversations from the constitution prepended as "
                                "earlier turns", ge=0)
    drop_truncated: Bool = _doc(True, "drop pairs whose response or revision hit max_new_tokens (always counted)")
    min_revision_words: Int = _doc(3, "a revision shorter than this after stripping a 'Here is a revised…' "
                                      "preamble is dropped", ge=0)
    seed: Int | None = _doc(None, "principle draws and sampling (default: the top-level seed)", ge=0, lt=2 ** 32)
    progress: Bool = _doc(True, "tqdm progress bar")
    critic_model: Text | None = _doc(None, "who writes critiques and revisions (the original answer always comes "
                                           "from the model being trained): null = that model; a model folder or Hub "
                                           "id; or an OpenAI-compatible server URL (vllm serve, trl vllm-serve, "
                                           "transformers serve), e.g. http://127.0.0.1:8000/v1")
    critic_endpoint_model: Text | None = _doc(None, "model name sent to the server (default: the first it lists)")
    max_original_similarity: Float = _similarity(0.9, "revision nearly the original -> near_identical")
    max_critique_similarity: Float = _similarity(0.6, "revision restates the critique -> copies_critique")
    max_request_similarity: Float = _similarity(0.7, "revision restates the revision request -> copies_request")
    min_length_ratio: Float = _doc(0.1, "len(revision) / len(original), characters", ge=0)
    max_length_ratio: Float = _doc(10.0, "len(revision) / len(original), characters", gt=0)
    require_prompt_overlap: Bool = _doc(True, "a non-refusal revision must share a content word with prompt or "
                                              "original")
    judge_pairs: Bool = _doc(True, "drop pairs the refusal/harm judge rates worse than the original")

    @model_validator(mode="after")
    def _consistent(self):
        if self.do_sample and self.temperature <= 0:
            raise invalid("temperature", "must be > 0 when do_sample is true")
        if self.min_length_ratio >= self.max_length_ratio:
            raise invalid("min_length_ratio", "need min_length_ratio < max_length_ratio")
        if self.critic_endpoint_model and not (self.critic_model or "").startswith(("http://", "https://")):
            raise invalid("critic_endpoint_model", "only used with an http(s):// critic_model")
        return self


@section
class DPOSection:
    """Stage 1: constitutional critique-and-rewrite pairs, then DPO."""

    base_model: Text | None = _doc(None, "where DPO starts instead of <run_dir>/sft/merged: a model folder, a Hub "
                                         "id, or a LoRA adapter (folder or Hub repo) merged into its base first "
                                         "(core/start_model.py)")
    enabled: Bool = _doc(True, "run this stage")
    prompts: Sources = _doc([], "red-team prompt sources")
    constitution: Text = _doc("constitutions/default.json", "principles for critique and revision (own or "
                                                            "llm-swarm layout)")
    held_out: Int = _doc(8, "red-team prompts kept out of training, for the before/after assessment", ge=0)
    max_prompts: OptInt = _doc(None, "at most this many training prompts (null = all)")
    pairs_file: Text | None = _doc(None, "reuse existing pairs instead of generating")
    min_pairs: Int = _doc(2, "fewer usable pairs than this after filtering is an error", ge=1)
    assessment_max_new_tokens: Int = _doc(64, "greedy answers to the held-out prompts, before and after DPO", ge=1)
    retain_sft_weight: Float = _doc(0.0, "retention: λ · NLL of replayed SFT rows (sft.data) added to the DPO loss",
                                    ge=0)
    retain_sft_rows: Int = _doc(256, "how many SFT rows (a seeded sample) the retention term cycles through", ge=1)
    generation: GenerationSection = Field(default_factory=GenerationSection, description="critique-and-rewrite")
    hub_model_id: Text | None = _doc(None, "Hub repo of the stage's adapter (hub.push_to_hub)")
    training: dict = _doc({}, "trl.DPOConfig keys")


# The causal stage's objective and head: declared once, in core/causal_objective.py (defaults = the measured
# best objective, descriptions, constraints); trainers.causal.CausalConfig has the same fields, flat.
CausalLossSection = CausalLossSettings
CausalHeadSection = CausalHeadSettings
RENAMED_LOSS_KEYS = {"injected_lm_loss": "lambda_lm_injected", "lambda_injected": "lambda_lm_injected"}


def _renamed_loss_keys(value):
    for old, new in RENAMED_LOSS_KEYS.items():
        if isinstance(value, dict) and old in value:
            raise invalid(old, f"renamed: set causal.loss.{new} (a weight; 0 turns the term off)")
    return value


AdaptiveAttack = Literal["bon", "random_search", "gcg"]
Budget = Annotated[Int, Field(ge=1)]


@section
class CausalAdversarialSection:
    """``causal.adversarial``: adversarial training examples from the adaptive attacks (issue 28, point 3,
    "optionally"). A seeded ``fraction`` of the triplets whose injection asks for a canary get an adversarial form,
    dealt in turn over ``attacks``: ``bon`` rewrites the injection by one Best-of-N augmentation (no model);
    ``random_search`` / ``gcg`` append a suffix optimised against the starting model towards the canary as the
    answer's start, at the budget below. The search's shape (suffix length, tokens changed per query, top-k,
    candidates, σ) is ``evaluate.adaptive``'s, so training meets the attacker the suite measures; the budgets are
    this section's. Suffixes are cached in ``data/adversarial_suffixes.jsonl`` (keyed by the model, the prompt and
    the settings; resumable)."""

    attacks: list[AdaptiveAttack] = _doc([], "attacks whose outputs become training injections; [] = off")
    fraction: Float = _doc(0.5, "share of the canary triplets given an adversarial form", gt=0, le=1)
    rs_queries: Budget = _doc(32, "random search: queries per training triplet")
    gcg_steps: Budget = _doc(4, "GCG: steps per training triplet")


@section
class CausalSection:
    """Stage 2: the causal stage on prompt-injection triplets (targets per view, invariance, contrast)."""

    enabled: Bool = _doc(True, "run this stage")
    tasks: Sources = _doc([], "task sources (bipia contexts | alpaca | seed tasks)")
    train_attacks: Sources = _doc([], "attack files for training ({category: [texts]})")
    eval_attacks: Sources = _doc([], "attack files reserved for evaluation (must not overlap)")
    triplets_file: Text | None = _doc(None, "reuse existing triplets instead of building them")
    max_triplets: OptInt = _doc(None, "at most this many triplets")
    counterfactual: Literal["rule", "model"] = _doc("rule", "how the counterfactual data is made")
    counterfactual_batch_size: Int = _doc(8, "model paraphrases: generation batch size", ge=1)
    counterfactual_max_new_tokens: Int = _doc(256, "model paraphrases: tokens per paraphrase", ge=1)
    positions: list[Literal["start", "middle", "end"]] = _doc(["start", "middle", "end"], "injection positions "
                                                                                          "(cycled)", min_length=1)
    triplets_per_task: Int = _doc(1, "triplets per task (next attack, next position each)", ge=1)
    canary_style: Literal["code", "word", "mixed"] = _doc("code", "canaries the training attacks ask for: code "
                                                                 "(MAPLE-123) | word (Lantern!) | mixed (each ½)")
    max_data_chars: OptInt = _doc(None, "skip tasks whose data part is longer (cheap pre-filter)")
    max_response_chars: OptInt = _doc(None, "skip tasks whose gold answer is longer (short targets, short "
                                            "sequences)")
    max_length: Annotated[Int | None, Field(ge=16)] = _doc(None, "tokens per view (prompt + response); null = "
                                                                 "model.max_seq_length")
    padding_side: Literal["right", "left"] = _doc("right", "the collator's (pooling and positions are "
                                                           "padding-agnostic)")
    control_fraction: Float = _doc(0.1, "share of triplets whose trusted instruction asks for a tag (target: "
                                        "comply)", ge=0, lt=1)
    generation_max_new_tokens: Int = _doc(64, "model-made targets and hijacked responses (greedy, cached)", ge=1)
    generation_batch_size: Int = _doc(16, "batch size of that generation", ge=1)
    eval_fraction: Float = _doc(0.0, "held-out triplets for eval/ causal metrics during training", ge=0, lt=1)
    base: Literal["dpo", "sft"] = _doc("dpo", "which merged model to start from")
    base_model: Text | None = _doc(None, "where the causal stage starts instead of <run_dir>/<base>/merged: a model "
                                         "folder (e.g. the ablation's shared starting model), a Hub id, or a LoRA "
                                         "adapter (folder or Hub repo) merged into its base first")
    retain_source: Literal["pairs", "self"] = _doc("pairs", "retention replays: pairs (a preference file) | self "
                                                            "(the starting model's own answers to the DPO stage's "
                                                            "training prompts; SFT term only)")
    retain_pairs_file: Text | None = _doc(None, "pairs replayed by the retention terms (default "
                                                "<run_dir>/data/pairs.jsonl)")
    retain_max_pairs: OptInt = _doc(None, "at most this many of them (the file's first; null = all)")
    loss: Annotated[CausalLossSection, BeforeValidator(_renamed_loss_keys)] = Field(
        default_factory=CausalLossSection, description="the objective (core.causal_objective.CausalLossSettings)")
    head: CausalHeadSection = Field(default_factory=CausalHeadSection, description="the projection head")
    adversarial: CausalAdversarialSection = Field(default_factory=CausalAdversarialSection,
                                                  description="adversarial examples from the adaptive attacks")
    hub_model_id: Text | None = _doc(None, "Hub repo of the stage's adapter (hub.push_to_hub)")
    training: dict = _doc({}, "transformers.TrainingArguments keys")

    @model_validator(mode="after")
    def _retention(self):
        if self.retain_source == "self" and self.loss.lambda_retain_dpo > 0:
            raise invalid("loss.lambda_retain_dpo", "retain_source 'self' replays the starting model's own answers: "
                                                    "there is no rejected answer for a DPO term")
        return self


Benchmark = Literal["alpacafarm", "sep", "bipia", "heldout", "tasktracker", "cyberseceval2"]


@section
class SuiteSection:
    """``evaluate.suite``: the security suite by name (:mod:`evaluation.suite`; ``--suite injection``).

    Each benchmark reads a local file (the papers' own files; nothing is shipped) or is left out when its file is
    unset; ``heldout`` is the project's shipped set and always available. The attack and variant names are those
    the evaluation modules implement (checked by :func:`evaluation.suite.validate_suite`)."""

    benchmarks: list[Benchmark] = _doc(list(get_args(Benchmark)), "benchmarks run (those whose file, or judge, "
                                                                           "is unset are left out with a note)",
                                       min_length=1)
    alpacafarm_file: Text | None = _doc(None, "davinci_003_outputs.json (original or combined layout)")
    sep_file: Text | None = _doc(None, "SEP_dataset.json or SEP_1000_keyword.json")
    bipia_file: Text | None = _doc(None, "an eval file made by evaluation.bipia_convert from BIPIA's test split")
    heldout_file: Text = _doc("evaluation/heldout/injection_heldout.jsonl", "utility clean and under attack (gold "
                                                                            "answers)")
    alpacafarm_attacks: list[Text] | None = _doc(None, "null = every StruQ/SecAlign attack "
                                                       "(alpacafarm_convert.ATTACKS)", min_length=1)
    sep_attacks: list[Text] | None = _doc(None, "keyword layout; null = Meta SecAlign's six "
                                                "(sep_convert.KEYWORD_ATTACKS)", min_length=1)
    positions: list[Literal["after", "before"]] = _doc(["after", "before"], "AlpacaFarm: injection after | before "
                                                                            "the data", min_length=1)
    template_variants: list[Text] | None = _doc(None, "model-specific completion (template_attacks.VARIANTS); [] = "
                                                      "off")
    ignore_sentences: Text | None = _doc(None, "JSON list with {injected_prompt} (e.g. StruQ's test list); null = "
                                               "the project's own")
    hackaprompt_sentences: Text | None = _doc(None, "likewise for hackaprompt; null = the project's own")
    tasktracker_file: Text | None = _doc(None, "TaskTracker's test set in Meta SecAlign's layout "
                                               "(TaskTracker_dataset_test.json: instruction, input, "
                                               "injection_in_input); judged by judge_model")
    cyberseceval2_file: Text | None = _doc(None, "CyberSecEval2's prompt_injection.json (PurpleLlama; its indirect "
                                                 "rows) or Meta SecAlign's CySE_prompt_injections.json; judged by "
                                                 "judge_model")
    judge_model: Text | None = _doc(None, "the judge of tasktracker and cyberseceval2 (evaluation.judged): a model "
                                          "folder, a Hub id, or an OpenAI-compatible server URL; unset = those "
                                          "benchmarks are left out")
    judge_endpoint_model: Text | None = _doc(None, "model name sent to the judge server (default: the first it "
                                                   "lists)")
    judge_max_new_tokens: Budget = _doc(4, "length of the judge's reply (its first word is the verdict)")
    judge_agreement_samples: Int = _doc(50, "rule-judged answers of the other benchmarks also given to the judge, "
                                            "for its agreement with the rule judges (0 = none)", ge=0)
    max_samples: OptInt = _doc(None, "samples (rows) per benchmark: a seeded sample; null = all")
    seed: Int = _doc(0, "the sample's seed", ge=0)

    @model_validator(mode="after")
    def _judge(self):
        if self.judge_endpoint_model and not (self.judge_model or "").startswith(("http://", "https://")):
            raise invalid("judge_endpoint_model", "only used with an http(s):// judge_model")
        return self


@section
class AdaptiveSection:
    """``evaluate.adaptive``: attacks that adapt to the model under test (:mod:`evaluation.adaptive`), each with its
    budget; a budget curve records the ASR at every ``checkpoints`` budget. Defaults are CPU-sized; the GPU recipes
    set the papers' budgets (GCG: SecAlign's 20-token suffix, top-k 256, 512 candidates, 500 steps). The
    optimisation attacks' target is each case's own canary as the answer's start (AlpacaFarm: "Hacked")."""

    attacks: list[AdaptiveAttack] = _doc(["bon", "random_search", "gcg"], "attacks run")
    n_cases: Budget = _doc(30, "a fixed, seeded subset of AlpacaFarm rows (or held-out cases), the same for every "
                               "model")
    seed: Int = _doc(0, "the subset's and the attacks' seed", ge=0)
    max_new_tokens: Budget = _doc(16, "greedy answer length when a checkpoint is judged")
    bon_n: Budget = _doc(16, "best-of-N: augmented injections per case (queries)")
    bon_sigma: Float = _doc(0.4, "best-of-N: augmentation strength (Hughes et al. 2024's σ)", gt=0, le=1)
    rs_iterations: Budget = _doc(64, "random search: accepted-or-rejected proposals (forward-only queries)")
    rs_suffix_tokens: Budget = _doc(20, "random search: suffix length")
    rs_change_tokens: Budget = _doc(4, "tokens replaced per proposal at the start (halved as the search goes on)")
    gcg_steps: Budget = _doc(8, "GCG: optimisation steps")
    gcg_suffix_tokens: Budget = _doc(20, "GCG: suffix length")
    gcg_topk: Budget = _doc(256, "GCG: candidate tokens per position (top-k of the gradient)")
    gcg_batch: Budget = _doc(64, "candidates per step (SecAlign: 512)")
    gcg_mini_batch: Budget = _doc(64, "candidates per forward pass at the cached prefix")
    checkpoints: list[Annotated[Int, Field(ge=0)]] | None = _doc(None, "budgets at which success is judged (null = "
                                                                       "0 and powers of 2 to the max)", min_length=1)

    @model_validator(mode="after")
    def _consistent(self):
        if self.rs_change_tokens > self.rs_suffix_tokens:
            raise invalid("rs_change_tokens", "cannot exceed rs_suffix_tokens")
        return self


ModelLabel = Literal["base", "sft", "dpo", "causal"]


@section
class EvaluateSection:
    """Stage 3: evaluation and verification."""

    enabled: Bool = _doc(True, "run this stage")
    eval_file: Text = _doc("evaluation/heldout/injection_heldout.jsonl", "injection cases + over-defence controls")
    redteam_file: Text | None = _doc(None, "harmful prompts for the refusal/harm rate (default: DPO held-out slice)")
    benign_file: Text | None = _doc("evaluation/heldout/benign_lookalikes.jsonl", "benign look-alikes: "
                                                                                  "over-refusal")
    max_cases: OptInt = _doc(None, "the first N injection cases (the file's order keeps a prefix balanced)")
    controls: Bool = _doc(True, "answer the over-defence controls of the eval file")
    max_controls: OptInt = _doc(None, "the first N controls (null = all)")
    max_new_tokens: Int = _doc(64, "greedy answer length of the injection cases", ge=1)
    batch_size: Int = _doc(8, "prompts per generation batch", ge=1)
    do_sample: Bool = _doc(False, "sample (else greedy)")
    temperature: Float = _doc(1.0, "sampling temperature (> 0 when do_sample)", ge=0)
    models: list[ModelLabel] = _doc(["base", "sft", "dpo", "causal"], "models compared")
    data_role_models: list[Text] = _doc([], "labels of models prompted with the data in its own <|input|> turn "
                                            "whatever model.data_role says (a model trained with the data role "
                                            "compared with one trained without); each must be a model evaluated")
    hsic_permutations: Int = _doc(200, "permutations of the HSIC test (the p-value is ≥ 1/(1+reps))", ge=20)
    pc_components: Int = _doc(3, "principal components fed to the PC algorithm", ge=1)
    alpha: Float = _doc(0.05, "significance level of the tests", gt=0, lt=1)
    max_redteam: Annotated[Int | None, Field(ge=0)] = _doc(200, "harmful prompts per model: a fixed hashed sample of "
                                                                "redteam_file (0 leaves it out; null = all)")
    max_benign: Annotated[Int | None, Field(ge=0)] = _doc(None, "the first N benign look-alikes (0 leaves them out; "
                                                                "null = all)")
    safety_max_new_tokens: Int = _doc(64, "answer length for the harmful and benign prompts (a refusal shows early)",
                                      ge=1)
    safety_classifier: Text | None = _doc(None, "optional Llama Guard–style classifier (folder or Hub id) beside "
                                                "the rules")
    utility_f1_threshold: Float = _doc(0.5, "benign utility: token-F1 ≥ this also counts as a match", gt=0, le=1)
    ci_test: Literal["fisherz", "kci"] = _doc("fisherz", "conditional-independence test of the PC algorithm")
    suite: SuiteSection = Field(default_factory=SuiteSection, description="the security suite (--suite)")
    adaptive: AdaptiveSection = Field(default_factory=AdaptiveSection, description="adaptive attacks (--adaptive)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.do_sample and self.temperature <= 0:
            raise invalid("temperature", "must be > 0 when do_sample is true")
        return self


INTERNAL = ("source_path", "line_map", "validation_target")  # set by load_config, not by the file
# nested sections hashed by their non-default values only (PipelineConfig.hash_form)
SPARSE_SECTIONS = {"dpo.generation": GenerationSection, "causal.loss": CausalLossSection,
                   "causal.head": CausalHeadSection, "evaluate.suite": SuiteSection, "evaluate.adaptive": AdaptiveSection}


def _non_default(values: dict, cls, prefix: str, written) -> dict:
    """The entries of ``values`` (section ``prefix`` as a dict) that were written in the file or an override (their
    dotted key is in ``written``, the line map) or differ from ``cls``'s defaults; a source keeps its path."""
    defaults = dataclasses.asdict(cls(**({"path": values["path"]} if cls is DataSource else {})))
    return {k: v for k, v in values.items() if k == "path" or v != defaults.get(k) or f"{prefix}.{k}" in written}


@section
class PipelineConfig:
    """The whole run: model, adapter, stages, logging and hub settings."""

    run_name: Text = _doc("run", "the run's folder under output_dir (letters, digits, ._+=-)")
    output_dir: Text = _doc("runs", "where run folders are made")
    seed: Int = _doc(42, "seed of every stage", ge=0, lt=2 ** 32)
    device: Literal["auto", "cpu", "cuda"] = _doc("auto", "auto: CUDA when available")
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    sft: SFTSection = Field(default_factory=SFTSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    causal: CausalSection = Field(default_factory=CausalSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    hub: HubSection = Field(default_factory=HubSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    __internal__ = INTERNAL  # not offered as known keys (core.settings)
    source_path: str | None = None
    line_map: dict = Field(default_factory=dict)
    validation_target: str | None = None  # --dry-run --target

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def line_of(self, dotted: str) -> int | None:
        """YAML line of a dotted key (or of its nearest ancestor)."""
        parts = dotted.split(".")
        while parts:
            if ".".join(parts) in self.line_map:
                return self.line_map[".".join(parts)]
            parts.pop()
        return None

    def error(self, dotted: str, message: str) -> ConfigError:
        """A :class:`ConfigError` for ``dotted`` located in this config's file."""
        return ConfigError(self.source_path, self.line_of(dotted), dotted, message)

    def to_dict(self) -> dict:
        """Plain dict of the config keys (internal fields dropped: ``resolved_config.yaml`` loads back)."""
        d = dataclasses.asdict(self)
        for key in INTERNAL:
            d.pop(key, None)
        return d

    def hash_form(self) -> dict:
        """:meth:`to_dict` as the manifest's hashes read it: the nested sections that were free-form mappings
        before they were typed (:data:`SPARSE_SECTIONS`) and each data source keep only the values the config wrote
        or that differ from the default (as those mappings held them), so typing a section or adding a setting
        with a default does not change the hash of a run that never set it: a finished stage stays done after an
        upgrade, and an interrupted one still resumes."""
        d = self.to_dict()
        d["validation_target"] = self.validation_target  # in the hash since it was a field (None when unset)
        for dotted, cls in SPARSE_SECTIONS.items():
            sec, key = dotted.split(".")
            d[sec][key] = _non_default(d[sec][key], cls, dotted, self.line_map)
        for dotted in SOURCE_LISTS:
            sec, key = dotted.split(".")
            d[sec][key] = [_non_default(x, DataSource, f"{dotted}.{i}", self.line_map) for i, x in enumerate(d[sec][key])]
        return d

    def config_hash(self, section: str | None = None, *, for_resume: bool = False) -> str:
        """sha256 of the config (or of one section plus model/lora), for the manifest.

        ``for_resume`` leaves out the training keys that may change between an interrupted attempt and its
        resumption without invalidating the checkpoint (:data:`RESUME_SAFE_TRAINING_KEYS`: train longer, save or
        log more often), plus logging and hub settings.
        """
        d = self.hash_form()
        template = Path(str(d.get("model", {}).get("chat_template") or ""))
        if template.suffix and template.is_file():  # a Jinja file: its text, not its path, is the setting
            d["model"]["chat_template"] = hashlib.sha256(template.read_bytes()).hexdigest()
        if section:
            d = {k: d[k] for k in ("model", "lora", "seed", section) if k in d}
        if for_resume:
            d = json.loads(json.dumps(d, default=str))
            sec = d.get(section) if section else None
            for s in ([sec] if sec is not None else [v for v in d.values() if isinstance(v, dict)]):
                if isinstance(s, dict) and isinstance(s.get("training"), dict):
                    for k in RESUME_SAFE_TRAINING_KEYS:
                        s["training"].pop(k, None)
                if isinstance(s, dict):
                    s.pop("hub_model_id", None)
            d.pop("logging", None)
            d.pop("hub", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- parsing
MAX_CONFIG_BYTES = 1 << 20  # a pipeline YAML is a few KiB; anything above 1 MiB is not a config
MAX_YAML_NODES = 20_000  # entries after alias expansion (the shipped configs have < 400)
MAX_YAML_DEPTH = 64


class Yaml12Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading plain scalars by the YAML 1.2 core schema (YAML 1.2.2, section 10.3).

    PyYAML implements YAML 1.1, whose implicit types change values a user did not mean to write as numbers or
    booleans: ``1:30`` is 90 (sexagesimal), ``010`` is 8 (octal), ``off``/``yes``/``on`` are booleans and
    ``2026-12-01`` is a date. Here only the 1.2 core forms are typed: ``null``/``~``/empty, ``true``/``false``
    (three spellings each), decimal, ``0o`` and ``0x`` integers (``010`` is 10), and floats including ``1e-4``
    (a string in YAML 1.1), ``.inf`` and ``.nan``; everything else is a string, which the typed config fields then
    refuse with their file and line where they expect a number or a boolean.
    """


Yaml12Loader.yaml_implicit_resolvers = {}
for _tag, _regexp, _first in (
        ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
        ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
        ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
        ("tag:yaml.org,2002:float",
         r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
         list("-+.0123456789"))):
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(_regexp), _first)


def _construct_int12(loader, node):
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)  # "010" is ten: YAML 1.2 has no leading-zero octal


def _construct_float12(loader, node):
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    if text == ".nan":
        return float("nan")
    return float(text)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int12)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float12)


def _prescan(text: str, path: str | None, line_offset: int = 0) -> None:
    """Bound a YAML document on its event stream, before any tree is built: nesting depth
    (:data:`MAX_YAML_DEPTH`) and size after alias expansion (:data:`MAX_YAML_NODES`), counted with the size of
    every anchored node so that an alias bomb is refused in time linear in the file's length; a recursive alias
    is refused here too. Raises :class:`ConfigError` naming ``path`` and the line."""
    sizes: dict[str, int] = {}
    stack: list[list] = []  # [entries so far, anchor]
    total = 0
    try:
        for ev in yaml.parse(text, Loader=Yaml12Loader):
            line = ev.start_mark.line + 1 + line_offset
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack.append([0, ev.anchor])
                if len(stack) > MAX_YAML_DEPTH:
                    raise ConfigError(path, line, None, f"nested deeper than {MAX_YAML_DEPTH} levels")
                add = 0
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                count, anchor = stack.pop()
                if anchor is not None:
                    sizes[anchor] = count + 1
                if stack:
                    stack[-1][0] += count + 1
                continue
            elif isinstance(ev, yaml.ScalarEvent):
                add = 1
                if ev.anchor is not None:
                    sizes[ev.anchor] = 1
            elif isinstance(ev, yaml.AliasEvent):
                if ev.anchor not in sizes:
                    open_anchors = {a for _, a in stack}
                    if ev.anchor in open_anchors:
                        raise ConfigError(path, line, None, "recursive alias (a node that contains itself)")
                    continue  # an undefined alias: the composer reports it with its line
                add = sizes[ev.anchor]
            else:
                continue
            total += add
            if stack and not isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack[-1][0] += add
            if total > MAX_YAML_NODES:
                raise ConfigError(path, line, None, f"the YAML expands to more than {MAX_YAML_NODES} entries "
                                                    "(nested aliases?); a pipeline config is far smaller")
    except yaml.YAMLError:
        return  # malformed: the composer reports the error with its line


def _yaml_error(e: yaml.YAMLError, path: str | None, line_offset: int = 0) -> "ConfigError":
    mark = getattr(e, "problem_mark", None)
    problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
    return ConfigError(path, mark.line + 1 + line_offset if mark else None, None, f"malformed YAML: {problem}")


def load_yaml_bounded(text: str, path: str | None) -> tuple[Any, dict[str, int]]:
    """Parse YAML ``text`` safely by the YAML 1.2 core schema (:class:`Yaml12Loader`); return ``(data, line_map)``.

    ``line_map`` maps dotted key paths (``sft.training.learning_rate``; list items as ``sft.data.0``) to 1-based
    lines. Aliases are allowed, but the document must stay small once they are expanded: more than
    :data:`MAX_YAML_NODES` entries (a "billion laughs" file), nesting deeper than :data:`MAX_YAML_DEPTH` (both
    checked on the event stream before a tree is built, :func:`_prescan`), a recursive alias, a key given twice
    in one mapping (YAML lets the second silently win), a key that is not a string (``~:``, ``1:``) or that holds a
    ``.`` (``sft.training:`` at the top level reads as one key, not a nested one) raise :class:`ConfigError`
    naming the file and line. Only safe constructors are used.
    """
    _prescan(text, path)
    try:
        loader = Yaml12Loader(text)
    except yaml.YAMLError as e:  # a character YAML does not allow (a lone surrogate, a control character)
        raise _yaml_error(e, path) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as e:
            raise _yaml_error(e, path) from None
        lines: dict[str, int] = {}
        count = 0

        def walk(node, prefix, depth, on_path):
            nonlocal count
            count += 1
            line = node.start_mark.line + 1
            if count > MAX_YAML_NODES:
                raise ConfigError(path, line, prefix or None, f"the YAML expands to more than {MAX_YAML_NODES} "
                                  "entries (nested aliases?); a pipeline config is far smaller")
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(path, line, prefix or None, f"nested deeper than {MAX_YAML_DEPTH} levels")
            if id(node) in on_path:
                raise ConfigError(path, line, prefix or None, "recursive alias (a node that contains itself)")
            if isinstance(node, yaml.MappingNode):
                seen: dict[str, int] = {}
                for k, v in node.value:
                    kline = k.start_mark.line + 1
                    if not isinstance(k, yaml.ScalarNode):
                        raise ConfigError(path, kline, prefix or None, "keys must be plain scalars")
                    if k.tag == "tag:yaml.org,2002:merge":
                        walk(v, prefix, depth + 1, on_path | {id(node)})
                        continue
                    key = f"{prefix}.{k.value}" if prefix else str(k.value)
                    if k.tag != "tag:yaml.org,2002:str":
                        raise ConfigError(path, kline, key, f"a key must be a name; {k.value!r} reads as "
                                                            f"{k.tag.rsplit(':', 1)[-1]} (quote it if you mean it)")
                    if "." in k.value:
                        raise ConfigError(path, kline, key, "a key may not contain '.'; write the nested "
                                                            "mapping (sft:\\n  training: …)")
                    if k.value in seen:
                        raise ConfigError(path, kline, key,
                                          f"duplicate key (first given on line {seen[k.value]}); YAML would keep "
                                          "only the last one")
                    seen[k.value] = kline
                    lines.setdefault(key, kline)
                    walk(v, key, depth + 1, on_path | {id(node)})
            elif isinstance(node, yaml.SequenceNode):
                for i, v in enumerate(node.value):
                    key = f"{prefix}.{i}"
                    lines.setdefault(key, v.start_mark.line + 1)
                    walk(v, key, depth + 1, on_path | {id(node)})

        if root is None:
            return None, lines
        walk(root, "", 0, frozenset())
        try:
            data = loader.construct_document(root)
        except yaml.YAMLError as e:
            raise _yaml_error(e, path) from None
        return _unshare(data), lines
    finally:
        loader.dispose()


def load_yaml_value(raw: str, where: str) -> Any:
    """One YAML 1.2 value (a command-line override's right-hand side), bounded like a file
    (:func:`load_yaml_bounded`). A value with `` #`` in it is taken as the literal string: a shell argument holds no
    YAML comment, and dropping the rest (``/x/good #1.jsonl`` read as ``/x/good``) would change a path silently.
    Raises :class:`ConfigError` located at ``where``."""
    if raw == "":
        return ""
    if " #" in raw or raw.startswith("#") or "\t#" in raw:
        return raw
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("command line", None, where, f"override value longer than {MAX_CONFIG_BYTES} bytes")
    try:
        data, _ = load_yaml_bounded(raw, "command line")
    except ConfigError as e:
        raise ConfigError("command line", None, where, f"override value: {e.message}") from None
    return data


def _unshare(value):
    """Copy of ``value`` in which no two places share a dict or list (an alias must not make an override of one
    key change another; ``copy.deepcopy`` would keep the sharing)."""
    if isinstance(value, dict):
        return {k: _unshare(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshare(v) for v in value]
    return value


def finite_or_error(value: float, where: Callable[[str], ConfigError]) -> float:
    """Return ``value`` if it is a finite number, else raise ``where(message)`` (NaN and ±inf are never config values)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise where(f"{value} is not a finite number")
    return value


def build_config(data: dict, path: str | None, lines: dict) -> PipelineConfig:
    """:class:`PipelineConfig` from the YAML mapping ``data``; the first validation error (pydantic's, in the
    project's wording: :func:`core.settings.located_errors`) raises :class:`ConfigError` at its file, line and
    dotted field. ``lines`` maps dotted keys to YAML lines (:func:`load_yaml_bounded`)."""
    for key in INTERNAL:
        if key in data:
            raise ConfigError(path, lines.get(key), key, "unknown key (set by the loader, not by a config file)")
    data = {k: {} if v is None and is_dataclass_field(PipelineConfig, k) else v for k, v in data.items()}  # `sft:`
    try:
        return PipelineConfig(**data)
    except ValidationError as e:
        dotted, message = next(located_errors(e, PipelineConfig))
        line = lines.get(dotted)
        parts = dotted.split(".")
        while line is None and len(parts) > 1:  # a cross-field or list error: the nearest key written in the file
            parts.pop()
            line = lines.get(".".join(parts))
        raise ConfigError(path, line, dotted or None, message) from None


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``a.b.c=value`` (value as YAML 1.2, :func:`load_yaml_value`) into ``("a.b.c", value)``; raises :class:`ConfigError`."""
    if "=" not in item:
        raise ConfigError("command line", None, item, "override must look like key=value (e.g. sft.training.max_steps=5)")
    key, raw = item.split("=", 1)
    key = key.strip().removeprefix("--")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("command line", None, item, "override key is empty or has an empty part (a.b.c=value)")
    return key, load_yaml_value(raw, key)


def apply_overrides(data: dict, overrides: list[str], path: str | None = None) -> list[str]:
    """Apply dotted ``key=value`` overrides to the raw YAML dict in place; returns the dotted keys set.

    A numeric part indexes an existing list item (``sft.data.0.path=x``); a missing section is created. Raises
    :class:`ConfigError` located as a command-line override of ``path``.
    """
    keys = []
    for item in overrides or []:
        key, value = parse_override(item)
        node = data
        parts = key.split(".")
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not (p.isdigit() and int(p) < len(node)):
                    raise ConfigError(path, OVERRIDE, key, f"'{'.'.join(parts[:i])}' is a list of {len(node)} "
                                                           f"item(s); {p!r} is not one of its indices")
                if last:
                    node[int(p)] = value
                else:
                    node = node[int(p)]
            elif isinstance(node, dict):
                if last:
                    node[p] = value
                else:
                    if node.get(p) is None:
                        node[p] = {}
                    node = node[p]
            else:
                raise ConfigError(path, OVERRIDE, key, f"'{'.'.join(parts[:i])}' is a value, not a section")
        keys.append(key)
    return keys


def read_config_text(path: str | os.PathLike) -> tuple[Path, str]:
    """``(path, text)`` of a config file (a recipe name of a wheel install is found under its share folder).
    Raises :class:`ConfigError` for a missing path, a folder, anything but a regular file (a FIFO, ``/dev/zero``:
    never opened), a file above :data:`MAX_CONFIG_BYTES` (read no further than that) or text that is not UTF-8."""
    p = Path(path)
    try:
        if not p.exists() and bundled_path(p) is not None:  # e.g. configs/<recipe>.yaml of a wheel install
            p = bundled_path(p)
        if not p.exists():
            raise ConfigError(str(p), None, None, "config file does not exist")
        if p.is_dir():
            raise ConfigError(str(p), None, None, "is a folder, not a config file (give the .yaml file)")
        if not p.is_file():
            raise ConfigError(str(p), None, None, "not a regular file (a device, FIFO or socket); give a .yaml file")
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(str(p), None, None, f"cannot read the config: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(str(p), None, None, f"more than {MAX_CONFIG_BYTES} bytes; a config file may hold at most "
                                              f"{MAX_CONFIG_BYTES}")
    try:
        return p, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), None, None, f"not valid UTF-8 (byte {e.start})") from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, *,
                target: str | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline YAML. Raises :class:`ConfigError` (never loads a model).

    ``target="cuda"`` validates for a CUDA machine from any machine (``--dry-run --target cuda``): the settings
    only a GPU can run are accepted and no CUDA device is required; everything else is checked as usual."""
    p, text = read_config_text(path)
    data, lines = load_yaml_bounded(text, str(p))
    if data is None:
        raise ConfigError(str(p), None, None, "config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(str(p), 1, None, "the config must be a YAML mapping")
    for key in _find_secret_keys(data):
        raise ConfigError(str(p), lines.get(key), key,
                          "secrets do not belong in configs; set HF_TOKEN / WANDB_API_KEY in the environment")
    for key in apply_overrides(data, overrides or [], str(p)):
        for old in [k for k in lines if k.startswith(key + ".")]:  # the lines of the value it replaced
            del lines[old]
        parts = key.split(".")  # errors in an overridden value (or a section it created) point at the command line
        for i in range(1, len(parts) + 1):
            if i == len(parts) or ".".join(parts[:i]) not in lines:
                lines[".".join(parts[:i])] = OVERRIDE
    for key in _find_secret_keys(data):  # also a secret given as a key=value override
        raise ConfigError(str(p), lines.get(key), key,
                          "secrets do not belong in configs; set HF_TOKEN / WANDB_API_KEY in the environment")
    cfg = build_config(data, str(p), lines)
    cfg.source_path, cfg.line_map = str(p), lines
    cfg.validation_target = target
    _check_hardware_claims(cfg, text, p.name)
    validate_config(cfg)
    return cfg


def raw_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """The YAML dict of ``path`` with ``overrides`` applied, not validated (for ``--smoke``'s mapping).
    Raises :class:`ConfigError` when the file cannot be read or parsed."""
    p, text = read_config_text(path)
    data, _ = load_yaml_bounded(text, str(p))
    if not isinstance(data, dict):
        raise ConfigError(str(p), 1, None, "the config must be a YAML mapping")
    apply_overrides(data, overrides or [], str(p))
    return data


def _check_hardware_claims(cfg: "PipelineConfig", text: str, filename: str) -> None:
    """``model.device_memory_gb`` must agree with the comment on its line and with a ``-<N>gb`` file-name tag."""
    mem = cfg.model.device_memory_gb
    if mem is None:
        return
    line = cfg.line_of("model.device_memory_gb")
    if isinstance(line, int) and "model.device_memory_gb" in cfg.line_map:  # not a command-line override
        comment = text.splitlines()[line - 1].partition("#")[2]
        claims = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)\s*(?:GB|GiB|G)\b", comment, flags=re.I)]
        if claims and all(abs(c - mem) > 1e-6 for c in claims):
            raise cfg.error("model.device_memory_gb",
                            f"value {mem:g} contradicts its comment ({comment.strip()!r})")
    tag = re.search(r"[-_](\d+)gb", filename.lower())
    if tag and abs(float(tag.group(1)) - mem) > 1e-6:
        raise cfg.error("model.device_memory_gb", f"value {mem:g} contradicts the hardware in the file name {filename!r}")


def _find_secret_keys(data, prefix="") -> list[str]:
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            dotted = f"{prefix}.{k}" if prefix else str(k)
            low = str(k).lower()
            if any(s in low for s in SECRET_KEY_PARTS) and not low.endswith(("_tokens", "max_new_tokens")) \
                    and low not in {"pad_token", "eos_token", "bos_token", "tokenizer", "max_tokens"} and v:
                found.append(dotted)
            found += _find_secret_keys(v, dotted)
    return found


SOURCE_LISTS = ("sft.data", "dpo.prompts", "causal.tasks", "causal.train_attacks", "causal.eval_attacks")


def source_lists(cfg: PipelineConfig) -> Iterator[tuple[str, list[DataSource]]]:
    """``(dotted key, sources)`` of every source list of the config (:data:`SOURCE_LISTS`)."""
    for dotted in SOURCE_LISTS:
        section, key = dotted.split(".")
        yield dotted, getattr(getattr(cfg, section), key)


def validate_config(cfg: PipelineConfig) -> None:
    """The checks that the fields' own types and constraints cannot make (those ran when ``cfg`` was built): a
    template file that exists, names that can become folders and Hub repos, paths the OS accepts, training keys
    this project routes elsewhere, and settings the hardware at hand cannot run. Needs no model and no data;
    relative inputs shipped with the code are resolved to it. Raises :class:`ConfigError`."""
    m = cfg.model
    if m.chat_template not in CHOICES:  # else the path of a Jinja file (relative to the working folder)
        found = resolve_input(m.chat_template)
        if not found.is_file():
            raise cfg.error("model.chat_template", f"{m.chat_template!r} is neither one of {list(CHOICES)} nor an "
                                                   "existing Jinja template file")
        m.chat_template = str(found)
    _check_names(cfg)
    _check_path_names(cfg)
    for _, sources in source_lists(cfg):
        for s in sources:
            found = resolve_input(s.path)  # not here, but shipped with the code (a wheel install's seed data)
            if found.exists() and not Path(s.path).exists():
                s.path = str(found)
    if cfg.dpo.training.get("train_sampling_strategy") in {"group_by_length", "batch_rebalance"}:
        # TRL's DPO dataset has prompt_ids/chosen_ids/rejected_ids, no input_ids or length column: the Trainer's
        # length-grouped samplers raise "Can only automatically infer lengths" after the model has loaded.
        raise cfg.error("dpo.training.train_sampling_strategy",
                        "length-grouped sampling is supported for the sft and causal stages only (TRL's DPO "
                        "dataset has no length column); use 'random'")
    for sec in ("sft", "dpo", "causal"):
        for key in ("push_to_hub", "hub_model_id", "hub_strategy"):
            if key in getattr(cfg, sec).training and getattr(cfg, sec).training[key] not in (None, False):
                raise cfg.error(f"{sec}.training.{key}", "pushes go through hub.push_to_hub and "
                                f"{sec}.hub_model_id: the stage pushes its adapter (and hub.push_merged: the merged "
                                "model) with a model card after saving; the Trainer's own push would upload "
                                "checkpoints to a second repo")
    _check_device_consistency(cfg)


PATH_KEYS = {"path", "name_or_path", "cache_dir", "chat_template", "constitution", "base_model", "output_dir"}


def _check_path_names(cfg: PipelineConfig) -> None:
    """Every value that names a file or folder (keys of :data:`PATH_KEYS`, ``*_file`` and ``*_dir`` keys, the items
    of source lists) can name one on this system (:func:`core.jsonl_io.path_name_problem`: no NUL byte,
    no component over 255 bytes): a name the OS refuses is one located error, not an ``OSError`` later."""
    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                dotted = f"{prefix}.{k}" if prefix else str(k)
                if isinstance(v, str) and (k in PATH_KEYS or str(k).endswith(("_file", "_dir"))):
                    problem = path_name_problem(v)
                    if problem:
                        raise cfg.error(dotted, f"cannot name a file: it {problem}")
                walk(v, dotted)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, str) and prefix.rsplit(".", 1)[-1] in {"data", "prompts", "tasks", "train_attacks",
                                                                         "eval_attacks"}:
                    problem = path_name_problem(v)
                    if problem:
                        raise cfg.error(f"{prefix}.{i}", f"cannot name a file: it {problem}")
                walk(v, f"{prefix}.{i}")

    walk(dataclasses.asdict(cfg), "")


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}$")


def _check_names(cfg: PipelineConfig) -> None:
    """Names that become folders or Hub repos: ``run_name`` is 1-100 characters of ``[A-Za-z0-9._+=-]`` starting
    with a letter or digit (no ``/``, ``..``, control or non-encodable characters, nothing a file system refuses);
    no name or path holds a credential (it would be written into folder names, logs and the Hub); Hub ids and
    ``hub.organization`` pass ``huggingface_hub``'s own validator (``../../etc/passwd`` is not a repo id)."""
    if not isinstance(cfg.run_name, str) or not RUN_NAME.match(cfg.run_name) or ".." in cfg.run_name:
        shown = cfg.run_name.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:60]
        raise cfg.error("run_name", f"must be a plain folder name: 1-100 characters of letters, digits and ._+=- "
                                    f"starting with a letter or digit (got {shown!r})")
    for dotted in ("run_name", "output_dir", "hub.organization", "sft.hub_model_id", "dpo.hub_model_id",
                   "causal.hub_model_id", "model.name_or_path"):
        section, _, key = dotted.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, key)
        if has_secret(value):
            raise cfg.error(dotted, "holds a credential (a token or a URL's user:password@); it would be written "
                                    "into folder names and logs: pass credentials in the environment (HF_TOKEN)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    org = cfg.hub.organization
    ids = [("hub.organization", f"{org}/x")] if org else []
    ids += [(f"{sec}.hub_model_id", getattr(cfg, sec).hub_model_id) for sec in ("sft", "dpo", "causal")
            if getattr(cfg, sec).hub_model_id]
    for dotted, repo_id in ids:
        try:
            validate_repo_id(repo_id)
            if any(part in ("..", ".") for part in repo_id.split("/")) or repo_id.count("/") > 1:
                raise HFValidationError("a repo id is 'name' or 'namespace/name'")
        except HFValidationError as e:
            raise cfg.error(dotted, f"{repo_id!r} is not a Hub repo id: {str(e).splitlines()[0]}") from None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_device_consistency(cfg: PipelineConfig) -> None:
    """Settings that cannot work on the hardware at hand fail here, before any model is loaded."""
    if getattr(cfg, "validation_target", None) == "cuda":
        return  # validated for a CUDA machine (--dry-run --target cuda): GPU-only settings are what it runs
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and cuda_available())
    if cfg.device == "cuda" and not cuda_available():
        raise cfg.error("device", "device is 'cuda' but no CUDA device is available")
    if not on_cuda:
        if cfg.model.quantization == "4bit":
            raise cfg.error("model.quantization", "4-bit QLoRA (bitsandbytes nf4) needs a CUDA GPU; use 'none' on CPU")
        if cfg.model.loader == "unsloth":
            raise cfg.error("model.loader", "the Unsloth loader needs a CUDA GPU; use 'transformers' on CPU")
        if cfg.model.dtype in {"bfloat16", "float16"}:
            raise cfg.error("model.dtype", f"{cfg.model.dtype} on CPU is ~30x slower than float32 here; use auto or float32")
        for sec in ("sft", "dpo", "causal"):
            tr = getattr(cfg, sec).training
            for flag in ("bf16", "fp16"):
                if tr.get(flag):
                    raise cfg.error(f"{sec}.training.{flag}", f"{flag} training needs a GPU; on CPU training runs in fp32")
        if cfg.model.attn_implementation.startswith("flash_attention"):
            raise cfg.error("model.attn_implementation", "FlashAttention needs a CUDA GPU; use sdpa on CPU")
        if cfg.dpo.generation.backend == "vllm":
            raise cfg.error("dpo.generation.backend", "the vLLM backend needs a CUDA GPU; use 'transformers' on CPU")
        if cfg.model.use_liger_kernel:
            raise cfg.error("model.use_liger_kernel", "Liger kernels are Triton kernels and need a CUDA GPU")


def resolved_yaml(cfg: PipelineConfig) -> str:
    """The config after overrides, as YAML, with no secret in it: :func:`load_config` rejects secret keys, and
    credentials inside values (a URL's ``user:password@``, ``hf_…``/``sk-…`` tokens) are replaced by ``***``
    (:func:`core.redaction.redact_tree`)."""
    return yaml.safe_dump(redact_tree(cfg.to_dict()), sort_keys=False)
