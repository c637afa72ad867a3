"""The pipeline config: one YAML, a section per stage, one source of truth for model and chat template.

Loading checks everything before a model is touched: unknown keys, wrong types, values out of range and
inconsistent settings raise :class:`ConfigError`, which names the file, the YAML line and the dotted field.
``key=value`` overrides use dotted paths (``sft.training.learning_rate=1e-4``); values are parsed as YAML.
The ``training`` sub-sections are passed to TRL's ``SFTConfig``/``DPOConfig`` and transformers'
``TrainingArguments`` through ``HfArgumentParser.parse_dict`` (unknown keys are an error there too).
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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from staged_alignment.core.causal_objective import CausalHeadSettings, CausalLossSettings
from staged_alignment.core.chat_template import CHOICES
from staged_alignment.core.jsonl_io import exists, path_name_problem
from staged_alignment.core.redaction import has_secret, redact_tree

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
    f = {x.name: x for x in dataclasses.fields(cls)}.get(name)
    return f is not None and f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
        f.default_factory())


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
@dataclass
class ModelSection:
    """The base model and how every stage loads it."""

    name_or_path: str = "embedded:smollm2-135m-instruct"  # HF id, local folder, or an embedded model name
    chat_template: str = "zephyr"  # zephyr | tokenizer (the model's own) | a .jinja file; the same at every stage
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA where supported) | float32 | bfloat16 | float16
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | flash_attention_3
    max_seq_length: int = 512
    quantization: str = "none"  # none | 4bit (QLoRA: bitsandbytes nf4, bf16 compute; CUDA only)
    loader: str = "transformers"  # transformers | unsloth (CUDA only, GPU extra)
    device_memory_gb: float | None = None  # memory of the one training device, for the dry-run estimate
    cache_dir: str | None = None  # where embedded models are converted (default: ~/.cache/staged-alignment)
    use_liger_kernel: bool = False  # TRL/transformers Liger kernels (CUDA + liger-kernel)
    data_role: bool = False  # put a prompt's data part in its own <|input|> turn (training, generation, evaluation)
    merge_dtype: str = "auto"  # dtype of merged copies: auto (the training compute dtype) | float32 | bfloat16 | float16
    # control strings (special tokens, template role markers) inside any content: escape (split by U+200B, read as
    # text) | refuse (error when the row is rendered); core.chat_template.neutralise
    control_tokens: str = "escape"


@dataclass
class LoraSection:
    """LoRA adapter settings shared by every stage (all seven projections by default)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))


@dataclass
class HubSection:
    """Pushing adapters to the Hugging Face Hub (token from HF_TOKEN or the HF login, never stored)."""

    push_to_hub: bool = False
    private: bool = True
    push_dry_run: bool = False  # write exactly the folder that would be uploaded, upload nothing
    organization: str | None = None
    push_merged: bool = False  # also push <stage>/merged to <hub_model_id>-merged (the next stage's loadable base)


@dataclass
class LoggingSection:
    """Experiment tracking: W&B (works with WANDB_MODE=offline) or TensorBoard."""

    report_to: list[str] = field(default_factory=lambda: ["none"])
    wandb_project: str = "staged-alignment"
    wandb_group: str | None = None  # default: the run name
    logging_steps: int = 1


@dataclass
class DataSource:
    """One input and its format (``auto`` guesses from the first row): a JSONL/JSON file, or what
    ``datasets.load_dataset`` reads (a Hub dataset id, a dataset folder, parquet/csv/arrow, a ``save_to_disk``
    folder) with TRL's dataset keys (:mod:`core.sources`)."""

    path: str = ""
    format: str = "auto"
    max_rows: int | None = None
    skip_invalid: bool = False  # drop (and count) bad rows instead of stopping; malformed files still stop
    name: str | None = None  # the dataset's configuration name (load_dataset's `name`)
    data_dir: str | None = None  # e.g. harmless-base in Anthropic/hh-rlhf
    data_files: Any = None  # a file, a list of files, or {split: files}
    split: str = "train"
    revision: str | None = None
    columns: dict | None = None  # renames before the format is read, e.g. {question: prompt}
    streaming: bool = False  # read a Hub dataset row by row (load_dataset(streaming=True)): only max_rows are fetched


@dataclass
class SFTSection:
    """Stage 0: supervised fine-tuning in the Zephyr format, loss on assistant tokens only."""

    enabled: bool = True
    data: list = field(default_factory=list)  # list of DataSource
    eval_fraction: float = 0.0
    sample_prompts: list[str] = field(default_factory=lambda: ["Give three tips for writing clear emails."])
    hub_model_id: str | None = None
    # share of rows whose prompt fills max_length so that no assistant token is trained; above it validation fails
    max_truncated_share: float = 0.05
    training: dict = field(default_factory=dict)  # trl.SFTConfig keys


@dataclass
class GenerationSection:
    """Sampling settings for critique-and-rewrite generation."""

    backend: str = "transformers"  # transformers | vllm (CUDA only)
    batch_size: int = 8
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    vllm_gpu_memory_utilization: float = 0.5
    num_few_shot: int = 1  # few-shot critique-and-rewrite conversations from the constitution prepended as earlier turns
    drop_truncated: bool = True  # drop pairs whose response or revision hit max_new_tokens (always counted)
    min_revision_words: int = 3  # a revision shorter than this after stripping a "Here is a revised…" preamble is dropped
    seed: int | None = None  # principle draws and sampling (default: the top-level seed)
    progress: bool = True  # tqdm progress bar
    # who writes critiques and revisions (the original answer always comes from the model being trained):
    # null = that model; a model folder or Hub id; or an OpenAI-compatible server URL (vllm serve, trl vllm-serve,
    # transformers serve), e.g. http://127.0.0.1:8000/v1
    critic_model: str | None = None
    critic_endpoint_model: str | None = None  # model name sent to the server (default: the first it lists)
    # pair filters (data_builders/pair_filters.py): similarity = difflib ratio / containment in [0, 1]
    max_original_similarity: float = 0.9  # revision nearly the original -> near_identical
    max_critique_similarity: float = 0.6  # revision restates the critique -> copies_critique
    max_request_similarity: float = 0.7  # revision restates the revision request -> copies_request
    min_length_ratio: float = 0.1  # len(revision) / len(original), characters
    max_length_ratio: float = 10.0
    require_prompt_overlap: bool = True  # a non-refusal revision must share a content word with prompt or original
    judge_pairs: bool = True  # drop pairs the refusal/harm judge rates worse than the original


@dataclass
class DPOSection:
    """Stage 1: constitutional critique-and-rewrite pairs, then DPO."""

    # where DPO starts instead of <run_dir>/sft/merged: a model folder, a Hub id, or a LoRA adapter (folder or
    # Hub repo) merged into its base first (core/start_model.py)
    base_model: str | None = None
    enabled: bool = True
    prompts: list = field(default_factory=list)  # list of DataSource (red-team prompts)
    constitution: str = "constitutions/default.json"
    held_out: int = 8  # red-team prompts kept out of training, for the before/after assessment
    max_prompts: int | None = None
    pairs_file: str | None = None  # reuse existing pairs instead of generating
    min_pairs: int = 2  # fewer usable pairs than this after filtering is an error
    assessment_max_new_tokens: int = 64  # greedy answers to the held-out prompts, before and after DPO
    retain_sft_weight: float = 0.0  # retention: λ · NLL of replayed SFT rows (sft.data) added to the DPO loss
    retain_sft_rows: int = 256  # how many SFT rows (a seeded sample) the retention term cycles through
    generation: dict = field(default_factory=dict)  # GenerationSection keys
    hub_model_id: str | None = None
    training: dict = field(default_factory=dict)  # trl.DPOConfig keys


# The causal stage's objective and head: declared once, in core/causal_objective.py (defaults = the measured
# best objective, help text, constraints); trainers.causal.CausalConfig has the same fields, flat.
CausalLossSection = CausalLossSettings
CausalHeadSection = CausalHeadSettings


@dataclass
class CausalSection:
    """Stage 2: the causal stage on prompt-injection triplets (targets per view, invariance, contrast)."""

    enabled: bool = True
    tasks: list = field(default_factory=list)  # list of DataSource (bipia contexts | alpaca | seed tasks)
    train_attacks: list = field(default_factory=list)  # attack files for training ({category: [texts]})
    eval_attacks: list = field(default_factory=list)  # attack files reserved for evaluation (must not overlap)
    triplets_file: str | None = None
    max_triplets: int | None = None
    counterfactual: str = "rule"  # rule | model
    counterfactual_batch_size: int = 8  # model paraphrases: generation batch size
    counterfactual_max_new_tokens: int = 256
    positions: list[str] = field(default_factory=lambda: ["start", "middle", "end"])  # injection positions (cycled)
    triplets_per_task: int = 1  # triplets per task (next attack, next position each)
    max_data_chars: int | None = None  # skip tasks whose data part is longer (cheap pre-filter)
    max_response_chars: int | None = None  # skip tasks whose gold answer is longer (short targets, short sequences)
    max_length: int | None = None  # tokens per view (prompt + response); None = model.max_seq_length
    padding_side: str = "right"  # right | left (the collator; pooling and positions are padding-agnostic)
    control_fraction: float = 0.1  # share of triplets whose trusted instruction asks for a tag (target: comply)
    generation_max_new_tokens: int = 64  # model-made targets and hijacked responses (greedy, cached)
    generation_batch_size: int = 16
    eval_fraction: float = 0.0  # held-out triplets for eval/ causal metrics during training
    base: str = "dpo"  # which merged model to start from: dpo | sft
    # where the causal stage starts instead of <run_dir>/<base>/merged: a model folder (e.g. the ablation's shared
    # starting model), a Hub id, or a LoRA adapter (folder or Hub repo) merged into its base first
    base_model: str | None = None
    retain_source: str = "pairs"  # retention replays: pairs (a preference file) | self (the starting model's own
    #   answers to the DPO stage's training prompts; SFT term only)
    retain_pairs_file: str | None = None  # pairs replayed by the retention terms (default <run_dir>/data/pairs.jsonl)
    retain_max_pairs: int | None = None  # at most this many of them (the file's first; None = all)
    loss: dict = field(default_factory=dict)  # CausalLossSection keys
    head: dict = field(default_factory=dict)  # CausalHeadSection keys
    hub_model_id: str | None = None
    training: dict = field(default_factory=dict)  # transformers.TrainingArguments keys


@dataclass
class SuiteSection:
    """``evaluate.suite``: the security suite by name (:mod:`evaluation.suite`; ``--suite injection``).

    Each benchmark reads a local file (the papers' own files; nothing is shipped) or is left out when its file is
    unset; ``heldout`` is the project's shipped set and always available."""

    benchmarks: list[str] = field(default_factory=lambda: ["alpacafarm", "sep", "bipia", "heldout"])
    alpacafarm_file: str | None = None  # davinci_003_outputs.json (original or combined layout)
    sep_file: str | None = None  # SEP_dataset.json or SEP_1000_keyword.json
    bipia_file: str | None = None  # an eval file made by evaluation.bipia_convert from BIPIA's test split
    heldout_file: str = "evaluation/heldout/injection_heldout.jsonl"  # utility clean and under attack (gold answers)
    alpacafarm_attacks: list[str] | None = None  # None = every StruQ/SecAlign attack (alpacafarm_convert.ATTACKS)
    sep_attacks: list[str] | None = None  # keyword layout; None = Meta SecAlign's six (sep_convert.KEYWORD_ATTACKS)
    positions: list[str] = field(default_factory=lambda: ["after", "before"])  # AlpacaFarm: after | before the data
    template_variants: list[str] | None = None  # model-specific completion (template_attacks.VARIANTS); [] = off
    ignore_sentences: str | None = None  # JSON list with {injected_prompt} (e.g. StruQ's test list); None = own
    hackaprompt_sentences: str | None = None  # likewise for hackaprompt; None = the project's own
    max_samples: int | None = None  # samples (rows) per benchmark: a seeded sample; None = all
    seed: int = 0


@dataclass
class AdaptiveSection:
    """``evaluate.adaptive``: attacks that adapt to the model under test (:mod:`evaluation.adaptive`), each with its
    budget; a budget curve records the ASR at every ``checkpoints`` budget. Defaults are CPU-sized; the GPU recipes
    set the papers' budgets (GCG: SecAlign's 20-token suffix, top-k 256, 512 candidates, 500 steps)."""

    attacks: list[str] = field(default_factory=lambda: ["bon", "random_search", "gcg"])
    n_cases: int = 30  # a fixed, seeded subset of AlpacaFarm rows (or held-out cases), the same for every model
    seed: int = 0
    max_new_tokens: int = 16  # greedy answer length when a checkpoint is judged
    bon_n: int = 16  # best-of-N: augmented injections per case (queries)
    bon_sigma: float = 0.4  # best-of-N: augmentation strength (Hughes et al. 2024's σ)
    rs_iterations: int = 64  # random search: accepted-or-rejected proposals (forward-only queries)
    rs_suffix_tokens: int = 20
    rs_change_tokens: int = 4  # tokens replaced per proposal at the start (halved as the search goes on)
    gcg_steps: int = 8
    gcg_suffix_tokens: int = 20
    gcg_topk: int = 256
    gcg_batch: int = 64  # candidates per step (SecAlign: 512)
    gcg_mini_batch: int = 64  # candidates per forward pass at the cached prefix
    checkpoints: list[int] | None = None  # budgets at which success is judged (None = 0 and powers of 2 to the max)
    # the optimisation attacks' target is each case's own canary as the answer's start (AlpacaFarm: "Hacked")


@dataclass
class EvaluateSection:
    """Stage 3: evaluation and verification."""

    enabled: bool = True
    eval_file: str = "evaluation/heldout/injection_heldout.jsonl"  # injection cases + over-defence controls
    redteam_file: str | None = None  # harmful prompts for the refusal/harm rate (default: DPO held-out slice)
    benign_file: str | None = "evaluation/heldout/benign_lookalikes.jsonl"  # benign look-alikes: over-refusal
    max_cases: int | None = None  # the first N injection cases (the file's order keeps a prefix balanced)
    controls: bool = True  # answer the over-defence controls of the eval file
    max_controls: int | None = None  # the first N controls (None = all)
    max_new_tokens: int = 64
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    models: list[str] = field(default_factory=lambda: ["base", "sft", "dpo", "causal"])
    hsic_permutations: int = 200
    pc_components: int = 3
    alpha: float = 0.05
    max_redteam: int | None = 200  # harmful prompts per model: a fixed hashed sample of redteam_file (None = all)
    max_benign: int | None = None  # the first N benign look-alikes (None = all)
    safety_max_new_tokens: int = 64  # answer length for the harmful and benign prompts (a refusal shows early)
    safety_classifier: str | None = None  # optional Llama Guard–style classifier (folder or Hub id) beside the rules
    utility_f1_threshold: float = 0.5  # benign utility: token-F1 ≥ this also counts as a match
    ci_test: str = "fisherz"  # conditional-independence test of the PC algorithm: fisherz | kci
    suite: dict = field(default_factory=dict)  # SuiteSection keys (--suite)
    adaptive: dict = field(default_factory=dict)  # AdaptiveSection keys (--adaptive)


@dataclass
class PipelineConfig:
    """The whole run: model, adapter, stages, logging and hub settings."""

    run_name: str = "run"
    output_dir: str = "runs"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    sft: SFTSection = field(default_factory=SFTSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    causal: CausalSection = field(default_factory=CausalSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    hub: HubSection = field(default_factory=HubSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    # where the YAML came from (not a config key)
    source_path: str | None = field(default=None, metadata={"internal": True})
    line_map: dict = field(default_factory=dict, metadata={"internal": True})
    validation_target: str | None = field(default=None, metadata={"internal": True})  # --dry-run --target

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
        """Plain dict of the config keys (internal fields dropped)."""
        d = dataclasses.asdict(self)
        d.pop("source_path", None)
        d.pop("line_map", None)
        return d

    def config_hash(self, section: str | None = None, *, for_resume: bool = False) -> str:
        """sha256 of the config (or of one section plus model/lora), for the manifest.

        ``for_resume`` leaves out the training keys that may change between an interrupted attempt and its
        resumption without invalidating the checkpoint (:data:`RESUME_SAFE_TRAINING_KEYS`: train longer, save or
        log more often), plus logging and hub settings.
        """
        d = self.to_dict()
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


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is list or origin is list:
        return isinstance(value, list) and (not args or all(_type_ok(v, args[0]) for v in value))
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    return True


def build_dataclass(cls, data: dict | None, prefix: str, path: str | None, lines: dict[str, int]):
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(path, lines.get(prefix), prefix or None, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            close = [k for k in known if k.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(path, lines.get(dotted), dotted, f"unknown key{hint}; known keys: {sorted(known)}")
        ann = hints[key]
        if dataclasses.is_dataclass(ann):
            kwargs[key] = build_dataclass(ann, value, dotted, path, lines)
            continue
        if not _type_ok(value, ann):
            want = str(ann) if typing.get_args(ann) else getattr(ann, "__name__", str(ann))
            raise ConfigError(path, lines.get(dotted), dotted, f"expected {want}, got {type(value).__name__} "
                                                               f"({value!r})")
        if ann is float or (typing.get_args(ann) and float in typing.get_args(ann) and isinstance(value, int)):
            value = float(value) if value is not None else None
        finite_or_error(value, lambda msg: ConfigError(path, lines.get(dotted), dotted, msg))
        kwargs[key] = value
    return cls(**kwargs)


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
        parts = key.split(".")  # errors in an overridden value (or a section it created) point at the command line
        for i in range(1, len(parts) + 1):
            if i == len(parts) or ".".join(parts[:i]) not in lines:
                lines[".".join(parts[:i])] = OVERRIDE
    for key in _find_secret_keys(data):  # also a secret given as a key=value override
        raise ConfigError(str(p), lines.get(key), key,
                          "secrets do not belong in configs; set HF_TOKEN / WANDB_API_KEY in the environment")
    cfg = build_dataclass(PipelineConfig, data, "", str(p), lines)
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


def sub_section(cfg: PipelineConfig, cls, dotted: str):
    """Build a nested dict section (``dpo.generation``, ``causal.loss``, ``causal.head``) as dataclass ``cls``."""
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return build_dataclass(cls, obj, dotted, cfg.source_path, cfg.line_map)


def _check_strings(cfg: PipelineConfig, obj, prefix: str = "") -> None:
    """Every string field of every section: not empty or blank (a blank path would resolve to the working folder),
    no NUL or other control character (the OS refuses such paths with a traceback)."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        value, dotted = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_strings(cfg, value, dotted + ".")
        elif isinstance(value, str):
            if not value.strip():
                raise cfg.error(dotted, "is empty; give a value or leave the key out for the default")
            if any(ord(ch) < 32 and ch not in "\t" for ch in value):
                raise cfg.error(dotted, f"contains a control character ({value!r})")


def validate_config(cfg: PipelineConfig) -> None:
    """Range and consistency checks that need no model and no data. Raises :class:`ConfigError`."""
    _check_strings(cfg, cfg)
    if not 0 <= cfg.seed < 2 ** 32:
        raise cfg.error("seed", "must be in [0, 2**32)")
    m = cfg.model
    choices = {
        "model.dtype": (m.dtype, {"auto", "float32", "bfloat16", "float16"}),
        "model.quantization": (m.quantization, {"none", "4bit"}),
        "model.loader": (m.loader, {"transformers", "unsloth"}),
        "model.attn_implementation": (m.attn_implementation,
                                      {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"}),
        "device": (cfg.device, {"auto", "cpu", "cuda"}),
        "causal.counterfactual": (cfg.causal.counterfactual, {"rule", "model"}),
        "causal.base": (cfg.causal.base, {"dpo", "sft"}),
    }
    for key, (val, allowed) in choices.items():
        if val not in allowed:
            raise cfg.error(key, f"{val!r} is not one of {sorted(allowed)}")

    if m.chat_template not in CHOICES:  # else the path of a Jinja file (relative to the working folder)
        found = resolve_input(m.chat_template)
        if not found.is_file():
            raise cfg.error("model.chat_template", f"{m.chat_template!r} is neither one of {list(CHOICES)} nor an "
                                                   "existing Jinja template file")
        m.chat_template = str(found)
    if m.max_seq_length < 16:
        raise cfg.error("model.max_seq_length", "must be at least 16")
    if m.device_memory_gb is not None and m.device_memory_gb <= 0:
        raise cfg.error("model.device_memory_gb", "must be positive")
    if cfg.lora.r <= 0 or cfg.lora.alpha <= 0:
        raise cfg.error("lora.r", "r and alpha must be positive")
    if not 0 <= cfg.lora.dropout < 1:
        raise cfg.error("lora.dropout", "must be in [0, 1)")
    if not cfg.lora.target_modules:
        raise cfg.error("lora.target_modules", "must name at least one module")
    _check_names(cfg)
    _check_path_names(cfg)
    for name, srcs in (("sft.data", cfg.sft.data), ("dpo.prompts", cfg.dpo.prompts), ("causal.tasks", cfg.causal.tasks),
                       ("causal.train_attacks", cfg.causal.train_attacks), ("causal.eval_attacks", cfg.causal.eval_attacks)):
        for i, s in enumerate(srcs):
            if isinstance(s, str):
                srcs[i] = s = {"path": s}
            if not isinstance(s, dict):
                raise cfg.error(f"{name}.{i}", f"expected a path or a mapping with 'path', got {s!r}")
            build_dataclass(DataSource, s, f"{name}.{i}", cfg.source_path, cfg.line_map)
            if not s.get("path"):
                raise cfg.error(f"{name}.{i}.path", "missing or empty")
            found = resolve_input(s["path"])  # not here, but shipped with the code (a wheel install's seed data)
            if found.exists() and not Path(s["path"]).exists():
                s["path"] = str(found)
    gen = sub_section(cfg, GenerationSection, "dpo.generation")
    if gen.backend not in {"transformers", "vllm"}:
        raise cfg.error("dpo.generation.backend", f"{gen.backend!r} is not one of ['transformers', 'vllm']")
    if gen.batch_size < 1 or gen.max_new_tokens < 1:
        raise cfg.error("dpo.generation", "batch_size and max_new_tokens must be ≥ 1")
    if gen.do_sample and gen.temperature <= 0:
        raise cfg.error("dpo.generation.temperature", "must be > 0 when do_sample is true")
    if not 0 < gen.top_p <= 1:
        raise cfg.error("dpo.generation.top_p", "must be in (0, 1]")
    if not 0 < gen.vllm_gpu_memory_utilization <= 1:
        raise cfg.error("dpo.generation.vllm_gpu_memory_utilization", "must be in (0, 1]")
    for key in ("max_original_similarity", "max_critique_similarity", "max_request_similarity"):
        if not 0 < getattr(gen, key) <= 1:
            raise cfg.error(f"dpo.generation.{key}", "must be in (0, 1] (a similarity)")
    if not 0 <= gen.min_length_ratio < gen.max_length_ratio:
        raise cfg.error("dpo.generation.min_length_ratio", "need 0 <= min_length_ratio < max_length_ratio")
    if gen.critic_endpoint_model and not (gen.critic_model or "").startswith(("http://", "https://")):
        raise cfg.error("dpo.generation.critic_endpoint_model", "only used with an http(s):// critic_model")
    if gen.num_few_shot < 0 or gen.min_revision_words < 0:
        raise cfg.error("dpo.generation.num_few_shot", "num_few_shot and min_revision_words must be ≥ 0")
    if cfg.dpo.held_out < 0 or cfg.dpo.min_pairs < 1 or cfg.dpo.assessment_max_new_tokens < 1:
        raise cfg.error("dpo.held_out", "held_out must be ≥ 0, min_pairs and assessment_max_new_tokens ≥ 1")
    if cfg.dpo.max_prompts is not None and cfg.dpo.max_prompts < 1:
        raise cfg.error("dpo.max_prompts", "must be ≥ 1 (or null for all)")
    raw_loss = cfg.causal.loss if isinstance(cfg.causal.loss, dict) else {}
    for old_key, new_key in (("injected_lm_loss", "lambda_lm_injected"), ("lambda_injected", "lambda_lm_injected")):
        if old_key in raw_loss:
            raise cfg.error(f"causal.loss.{old_key}", f"renamed: set causal.loss.{new_key} (a weight; 0 turns the "
                                                     "term off)")
    loss = sub_section(cfg, CausalLossSection, "causal.loss")
    head = sub_section(cfg, CausalHeadSection, "causal.head")
    for section, settings in (("causal.loss", loss), ("causal.head", head)):
        try:
            settings.validate()
        except ValueError as e:
            name, _, message = str(e).partition(": ")
            raise cfg.error(f"{section}.{name}", message) from None
    if cfg.dpo.retain_sft_weight < 0:
        raise cfg.error("dpo.retain_sft_weight", "must be ≥ 0")
    if cfg.dpo.retain_sft_rows < 1:
        raise cfg.error("dpo.retain_sft_rows", "must be ≥ 1")
    if loss.lambda_retain_dpo > 0 and loss.retain_beta <= 0:
        raise cfg.error("causal.loss.retain_beta", "must be > 0")
    if cfg.causal.retain_source not in ("pairs", "self"):
        raise cfg.error("causal.retain_source", f"{cfg.causal.retain_source!r} is not one of ['pairs', 'self']")
    if cfg.causal.retain_source == "self" and loss.lambda_retain_dpo > 0:
        raise cfg.error("causal.loss.lambda_retain_dpo", "retain_source 'self' replays the starting model's own "
                                                         "answers: there is no rejected answer for a DPO term")
    if cfg.causal.retain_max_pairs is not None and cfg.causal.retain_max_pairs < 1:
        raise cfg.error("causal.retain_max_pairs", "must be ≥ 1 (or null for all)")
    if not 0 <= cfg.causal.control_fraction < 1:
        raise cfg.error("causal.control_fraction", "must be in [0, 1)")
    if cfg.causal.generation_max_new_tokens < 1 or cfg.causal.generation_batch_size < 1:
        raise cfg.error("causal.generation_max_new_tokens", "generation_max_new_tokens and generation_batch_size "
                                                            "must be ≥ 1")
    if not 0.0 <= cfg.sft.max_truncated_share <= 1.0:
        raise cfg.error("sft.max_truncated_share", "must be in [0, 1]")
    if m.control_tokens not in {"escape", "refuse"}:
        raise cfg.error("model.control_tokens", f"{m.control_tokens!r} is not one of ['escape', 'refuse']")
    if m.merge_dtype not in {"auto", "float32", "bfloat16", "float16"}:
        raise cfg.error("model.merge_dtype", f"{m.merge_dtype!r} is not one of ['auto', 'bfloat16', 'float16', "
                                             "'float32']")
    c = cfg.causal
    bad_pos = [p for p in c.positions if p not in ("start", "middle", "end")]
    if not c.positions or bad_pos:
        raise cfg.error("causal.positions", f"use a non-empty subset of ['start', 'middle', 'end'] (bad: {bad_pos})")
    if c.padding_side not in ("left", "right"):
        raise cfg.error("causal.padding_side", f"{c.padding_side!r} is not one of ['left', 'right']")
    if not 0 <= c.eval_fraction < 1:
        raise cfg.error("causal.eval_fraction", "must be in [0, 1)")
    if c.max_length is not None and c.max_length < 16:
        raise cfg.error("causal.max_length", "must be at least 16")
    for key in ("max_triplets", "max_data_chars", "max_response_chars", "triplets_per_task"):
        if getattr(c, key) is not None and getattr(c, key) < 1:
            raise cfg.error(f"causal.{key}", "must be ≥ 1")
    if c.counterfactual_batch_size < 1 or c.counterfactual_max_new_tokens < 1:
        raise cfg.error("causal.counterfactual_batch_size", "batch size and max_new_tokens must be ≥ 1")
    if not 0 <= cfg.sft.eval_fraction < 1:
        raise cfg.error("sft.eval_fraction", "must be in [0, 1)")
    e = cfg.evaluate
    unknown = set(e.models) - {"base", "sft", "dpo", "causal"}
    if unknown:
        raise cfg.error("evaluate.models", f"unknown model labels {sorted(unknown)}")
    if not 0 < e.alpha < 1:
        raise cfg.error("evaluate.alpha", "must be in (0, 1)")
    for key in ("max_new_tokens", "batch_size", "pc_components"):
        if getattr(e, key) < 1:
            raise cfg.error(f"evaluate.{key}", "must be ≥ 1")
    if e.safety_max_new_tokens < 1:
        raise cfg.error("evaluate.safety_max_new_tokens", "must be ≥ 1")
    for key in ("max_cases", "max_controls"):
        if getattr(e, key) is not None and getattr(e, key) < 1:
            raise cfg.error(f"evaluate.{key}", "must be ≥ 1 (or null for all)")
    for key in ("max_redteam", "max_benign"):
        if getattr(e, key) is not None and getattr(e, key) < 0:
            raise cfg.error(f"evaluate.{key}", "must be ≥ 0 (0 leaves that safety measure out; null for all)")
    if e.hsic_permutations < 20:
        raise cfg.error("evaluate.hsic_permutations", "at least 20 permutations (the p-value is ≥ 1/(1+reps))")
    if e.do_sample and e.temperature <= 0:
        raise cfg.error("evaluate.temperature", "must be > 0 when do_sample is true")
    if not 0 < e.utility_f1_threshold <= 1:
        raise cfg.error("evaluate.utility_f1_threshold", "must be in (0, 1]")
    if e.ci_test not in {"fisherz", "kci"}:
        raise cfg.error("evaluate.ci_test", f"{e.ci_test!r} is not one of ['fisherz', 'kci']")
    if cfg.logging.report_to and not set(cfg.logging.report_to) <= {"none", "wandb", "tensorboard"}:
        raise cfg.error("logging.report_to", "use any of none, wandb, tensorboard")
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
        if sub_section(cfg, GenerationSection, "dpo.generation").backend == "vllm":
            raise cfg.error("dpo.generation.backend", "the vLLM backend needs a CUDA GPU; use 'transformers' on CPU")
        if cfg.model.use_liger_kernel:
            raise cfg.error("model.use_liger_kernel", "Liger kernels are Triton kernels and need a CUDA GPU")


def resolved_yaml(cfg: PipelineConfig) -> str:
    """The config after overrides, as YAML, with no secret in it: :func:`load_config` rejects secret keys, and
    credentials inside values (a URL's ``user:password@``, ``hf_…``/``sk-…`` tokens) are replaced by ``***``
    (:func:`core.redaction.redact_tree`)."""
    return yaml.safe_dump(redact_tree(cfg.to_dict()), sort_keys=False)
