"""``--smoke``: any recipe, shrunk, on this CPU with the embedded model, before paying for a GPU.

:func:`smoke_plan` reads a recipe (the YAML dict after the user's overrides) and returns the dotted overrides that
map it onto the CPU, with one table row per change (setting, the recipe's value, the smoke value). The recipe's
stages, data sources, objectives and other settings stay as they are; only what a CPU cannot run and the sizes
change:

* hardware: ``device → cpu``; the model → the embedded SmolLM2-135M-Instruct (a Q4_1 GGUF copy converted to fp32:
  the plumbing, not the recipe's figures); ``quantization 4bit → none``; ``dtype bf16/fp16 → auto`` (fp32);
  ``loader unsloth → transformers``; FlashAttention → SDPA; Liger off; ``vllm → transformers`` generation;
  ``bf16``/``fp16``/gradient checkpointing off; 8-bit and paged optimizers → ``adamw_torch``;
  ``report_to: wandb`` runs with ``WANDB_MODE=offline``; Hub pushes become ``hub.push_dry_run``;
* sizes: ``max_steps`` 2 per stage, batch 2, no accumulation, ``max_seq_length`` ≤ 256, at most
  :data:`ROWS` rows per data source (a reachable Hub dataset is streamed, so only those rows are fetched), a few DPO
  prompts and held-out answers, :data:`TRIPLETS` triplets, and an evaluation of :data:`CASES` cases;
* data: every source stays as the recipe names it where this machine can read it (a local file, a cached Hub
  dataset or URL, anything the network can fetch); a Hub dataset or URL that is neither cached nor reachable
  (``HF_HUB_OFFLINE`` set, or no answer from the Hub) is replaced by the shipped seed data of the same role
  (:func:`stand_ins`; ``--dry-run --target`` does the same for its checks);
* the run folder: ``<run_name>-smoke`` beside the recipe's.
"""
from __future__ import annotations

import json
from pathlib import Path

from staged_alignment.core import sources  # module access: tests replace its probes of the Hub
from staged_alignment.core.config import ConfigError

EMBEDDED = "embedded:smollm2-135m-instruct"
ROWS, TRIPLETS, CASES = 24, 8, 8
SOURCE_LISTS = ("sft.data", "dpo.prompts", "causal.tasks", "causal.train_attacks")
SEED_DIR = Path(__file__).resolve().parents[1] / "data_builders" / "seed"
# the shipped seed file that stands in for an unreadable source of each list (same role and row format family)
STAND_INS = {"sft.data": "sft_seed.jsonl", "dpo.prompts": "redteam_prompts.jsonl", "causal.tasks": "tasks.jsonl",
             "causal.train_attacks": "attacks_train.json"}
EIGHT_BIT_OPTIMIZERS = ("8bit", "paged", "bnb")


def _get(data: dict, key: str, default=None):
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _entry(src) -> dict:
    """A source of a raw config list as a ``DataSource``-like mapping (a copy; a bare path becomes ``{"path"}``)."""
    return {"path": src} if isinstance(src, str) else dict(src)


def stand_ins(lists: dict[str, list]) -> tuple[dict[str, list], list[tuple[str, str, str, str]]]:
    """Replace the sources this machine cannot read now (:func:`core.sources.unavailable`: a Hub dataset or
    URL neither in the local cache nor reachable) by the shipped seed file of :data:`STAND_INS`.

    ``lists`` maps a dotted key of :data:`SOURCE_LISTS` to its sources (paths or ``DataSource`` mappings). Returns
    ``(changed, replaced)``: the new lists of the keys that changed (a seed file appears once per list, with the
    replaced source's ``max_rows``) and ``(key.i, source, seed file, reason)`` per replaced source."""
    changed, replaced = {}, []
    for key, listed in lists.items():
        if key not in STAND_INS:
            continue
        new, seed = [], str(SEED_DIR / STAND_INS[key])
        for i, src in enumerate(listed or []):
            entry = _entry(src)
            why = sources.unavailable(entry) if entry.get("path") else None
            if why is None:
                new.append(src)
                continue
            replaced.append((f"{key}.{i}", entry["path"], seed, why))
            if not any((x if isinstance(x, str) else x.get("path")) == seed for x in new):
                new.append({"path": seed, **({"max_rows": entry["max_rows"]} if entry.get("max_rows") else {})})
        if new != list(listed or []):
            changed[key] = new
    return changed, replaced


def check_shapes(data: dict, path: str | None = None) -> None:
    """The parts of a raw recipe the smoke mapping reads have the shapes the config declares: every section a
    mapping (``model``, ``sft.training``, ``dpo.generation``, …) and every source list (:data:`SOURCE_LISTS`) a list
    of paths or mappings with a string ``path``. Raises :class:`core.config.ConfigError` naming the field
    (``sft.data=5`` or ``causal.tasks=[5]`` used to end in a ``TypeError``); everything else is validated with the
    smoke overrides applied, as usual."""
    for key in ("model", "lora", "hub", "logging", "sft", "dpo", "causal", "evaluate", "sft.training",
                "dpo.training", "dpo.generation", "causal.training", "causal.loss", "causal.head"):
        v = _get(data, key)
        if v is not None and not isinstance(v, dict):
            raise ConfigError(path, None, key, f"expected a mapping, got {type(v).__name__} ({v!r})")
    for key in SOURCE_LISTS:
        v = _get(data, key)
        if v is None:
            continue
        if not isinstance(v, list):
            raise ConfigError(path, None, key, f"expected a list of sources (paths or mappings with 'path'), got "
                                               f"{type(v).__name__} ({v!r})")
        for i, src in enumerate(v):
            if isinstance(src, dict) and isinstance(src.get("path"), str):
                continue
            if not isinstance(src, str):
                raise ConfigError(path, None, f"{key}.{i}", f"expected a path or a mapping with a string 'path', got "
                                                            f"{src!r}")


def smoke_plan(data: dict, path: str | None = None) -> tuple[list[str], list[tuple[str, str, str]]]:
    """``(overrides, rows)`` for the recipe ``data`` (a raw config dict): dotted ``key=value`` overrides (values
    in YAML/JSON) and the table rows ``(setting, recipe value, smoke value)`` of every change. Raises
    :class:`core.config.ConfigError` for a recipe whose sections or sources are not shaped as declared
    (:func:`check_shapes`)."""
    check_shapes(data, path)

    over: list[str] = []
    rows: list[tuple[str, str, str]] = []

    def put(key: str, new, show_old=True, reason: str | None = None):
        old = _get(data, key)
        if old == new:
            return
        over.append(f"{key}={json.dumps(new)}")
        rows.append((key, "(unset)" if old is None else str(old) if show_old else "…", str(new) +
                     (f"  ({reason})" if reason else "")))

    put("run_name", f"{_get(data, 'run_name', 'run')}-smoke")
    put("device", "cpu")
    put("model.name_or_path", EMBEDDED, reason="embedded SmolLM2-135M, a Q4_1 GGUF copy in fp32")
    for key, bad, good in (("model.quantization", {"4bit"}, "none"), ("model.dtype", {"bfloat16", "float16"}, "auto"),
                           ("model.loader", {"unsloth"}, "transformers"),
                           ("model.attn_implementation", {"flash_attention_2", "flash_attention_3"}, "sdpa"),
                           ("dpo.generation.backend", {"vllm"}, "transformers")):
        if _get(data, key) in bad:
            put(key, good)
    if _get(data, "model.use_liger_kernel"):
        put("model.use_liger_kernel", False)
    if _get(data, "model.device_memory_gb") is not None:
        put("model.device_memory_gb", None, reason="the CPU's RAM is checked instead")
    if (_get(data, "model.max_seq_length") or 512) > 256:
        put("model.max_seq_length", 256)
    if _get(data, "model.chat_template") not in (None, "zephyr"):  # the model's own, or a file written for its tokens
        put("model.chat_template", "zephyr", reason="written for the recipe model's tokens, not the embedded model's")
    for stage in ("sft", "dpo", "causal"):
        t = _get(data, f"{stage}.training") or {}
        for flag in ("bf16", "fp16", "tf32", "gradient_checkpointing"):
            if t.get(flag):
                put(f"{stage}.training.{flag}", False)
        if any(s in str(t.get("optim", "")) for s in EIGHT_BIT_OPTIMIZERS):
            put(f"{stage}.training.optim", "adamw_torch")
        put(f"{stage}.training.max_steps", 2)
        put(f"{stage}.training.per_device_train_batch_size", 2)
        if t.get("gradient_accumulation_steps", 1) != 1:
            put(f"{stage}.training.gradient_accumulation_steps", 1)
        for key in ("max_length", "max_prompt_length", "max_completion_length"):
            if (t.get(key) or 0) > 256:
                put(f"{stage}.training.{key}", 256)
        for key in ("save_steps", "eval_steps"):
            if key in t:
                put(f"{stage}.training.{key}", 1)
    for key in SOURCE_LISTS:
        entries, changed = list(_get(data, key) or []), False
        for i, src in enumerate(entries):
            entry = _entry(src)
            if (entry.get("max_rows") or ROWS + 1) > ROWS:
                entry["max_rows"] = ROWS
                entries[i], changed = entry, True
                rows.append((f"{key}.{i}.max_rows", str(src.get("max_rows") if isinstance(src, dict) else None),
                             str(ROWS)))
            if not entry.get("path"):
                continue  # validation names the missing path
            if sources.is_remote(entry["path"]) and not sources.is_url(entry["path"]) and not entry.get("streaming") and \
                    sources.hub_answers(entry) and not sources.is_cached(entry):
                entry["streaming"] = True  # a Hub dataset: fetch its first rows, not the whole split
                entries[i], changed = entry, True
                rows.append((f"{key}.{i}.streaming", "false", "true  (only the first rows are fetched)"))
        replaced, stood_in = stand_ins({key: entries})
        rows += [(k, src, f"{seed} ({why}: the shipped seed data stands in)") for k, src, seed, why in stood_in]
        if changed or key in replaced:
            over.append(f"{key}={json.dumps(replaced.get(key, entries))}")
    if _get(data, "dpo.generation.drop_truncated") is not False:
        put("dpo.generation.drop_truncated", False, reason="answers cut at the smoke's token cap still make pairs")
    for key, cap in (("dpo.max_prompts", 8), ("dpo.held_out", 2), ("dpo.generation.max_new_tokens", 48),
                     ("dpo.generation.batch_size", 4), ("causal.max_triplets", TRIPLETS),
                     ("evaluate.max_cases", CASES), ("evaluate.max_controls", 4), ("evaluate.max_redteam", 4),
                     ("evaluate.max_benign", 4), ("evaluate.max_new_tokens", 16),
                     ("evaluate.safety_max_new_tokens", 16), ("evaluate.batch_size", 8),
                     ("evaluate.hsic_permutations", 20)):
        old = _get(data, key)
        if old is None or old > cap:
            put(key, cap)
    if _get(data, "causal.max_length") and _get(data, "causal.max_length") > 256:
        put("causal.max_length", 256)
    if _get(data, "dpo.min_pairs") is None or _get(data, "dpo.min_pairs") > 1:
        put("dpo.min_pairs", 1, reason="a tiny model keeps few pairs")
    if _get(data, "hub.push_to_hub"):
        put("hub.push_to_hub", False)
        put("hub.push_dry_run", True)
    if "wandb" in (_get(data, "logging.report_to") or []):
        rows.append(("logging.report_to", "wandb", "wandb with WANDB_MODE=offline"))
    return over, rows


def needs_network(data: dict) -> bool:
    """Whether the smoke run reads a source from the network: a source list of :data:`SOURCE_LISTS` in ``data``
    (the raw config with the smoke overrides applied) still names a streamed Hub dataset, or a URL or Hub dataset
    that is not cached (:func:`core.sources.is_cached`). Otherwise the run sets ``HF_HUB_OFFLINE=1``: the
    embedded model needs no Hub, and libraries that probe an unreachable Hub retry for minutes (measured: a
    TinyLlama-recipe smoke took 365 s with the Hub unreachable, 145 s offline)."""
    for key in SOURCE_LISTS:
        for src in _get(data, key) or []:
            if not isinstance(src, (str, dict)):
                continue  # validation names it
            entry = _entry(src)
            if entry.get("path") and sources.is_remote(entry["path"]) and (entry.get("streaming") or not sources.is_cached(entry)):
                return True
    return False


def format_table(rows: list[tuple[str, str, str]]) -> str:
    """The mapping table printed by ``--smoke``."""
    w = max([len(r[0]) for r in rows] + [7])
    v = max([min(len(r[1]), 48) for r in rows] + [6])
    lines = [f"{'setting':{w}s}  {'recipe':{v}s}  smoke", f"{'-' * w}  {'-' * v}  {'-' * 5}"]
    lines += [f"{k:{w}s}  {(old if len(old) <= 48 else old[:16] + '...' + old[-29:]):{v}s}  {new}"
              for k, old, new in rows]  # a long value keeps its start and its end (a URL's file name)
    return "\n".join(lines)
