"""Constitutional critique-and-rewrite (Bai et al. 2022, "Constitutional AI", §3.1): red-team prompt → preference pair.

For each red-team prompt, one multi-turn chat with the merged 16-bit SFT model, rendered with the project's Zephyr
template (``render_prompt``), with ``num_few_shot`` few-shot conversations of the constitution as earlier turns::

    [few-shot turns…] user: <prompt>               → assistant: <response>   (rejected)
                      user: <principle.critique>   → assistant: <critique>
                      user: <principle.revision>   → assistant: <revision>   (chosen)

The principle is drawn per prompt with an RNG seeded by ``(seed, prompt id)`` (:func:`draw_principle`), so a
resumed run draws the same one. Generation is batched over prompts (one batched call per step, left-padded, see
:func:`data_builders.generation.generate_chat`) or runs through vLLM (``generation.backend: vllm``, CUDA only).

Output rows (docs/architecture.md, "Preference pair"; TRL's conversational preference format plus provenance)::

    {"id", "prompt": [{"role": "user", "content"}], "chosen": [{"role": "assistant", "content": revision}],
     "rejected": [{"role": "assistant", "content": response}], "principle_id", "critique", "source"}

Filters (each prompt gets the first reason that applies; every reason is counted in the stats):

- ``empty_response`` / ``empty_critique`` / ``empty_revision``: nothing but whitespace or special tokens;
- ``truncated_response`` / ``truncated_revision``: generation hit ``max_new_tokens`` without an eos (dropped when
  ``drop_truncated``, else kept); a truncated critique is only counted (``truncated.critique``), because the critique
  is context for the revision, not training text;
- ``meta_revision``: the revision talks about the rewrite instead of doing it. A leading preamble such as
  "Sure, here is a revised response:", "Here's a rewritten version of the response:", "Revised response:" or
  "Rewrite:" is stripped (with quotes around the rest) when the rest has at least ``min_revision_words`` words
  (counted as ``preamble_stripped``); otherwise the pair is dropped. What is *not* caught: meta-talk in the middle
  or at the end ("I removed the harmful parts above"), a revision that paraphrases the critique, and a revision
  that is itself harmful — the judge in :mod:`core.judges` is the place for that;
- ``identical``: the revision equals the response after whitespace normalisation;
- the content filters of :mod:`data_builders.pair_filters` (``near_identical``, ``copies_critique``,
  ``copies_request``, ``length_ratio``, ``off_prompt``, ``not_better``), with the thresholds of ``filters``; the
  rejected rows keep the measured values and the judge's verdicts under ``filter``.

The critique and the revision may come from a different model than the response (``critic``: a second backend,
e.g. a larger local model or an OpenAI-compatible server); the response always comes from ``backend``, the model
being trained.

Resumability: accepted pairs are appended to ``out`` and filtered-out prompts (with the reason and all texts) to
``rejected_out`` (default ``<out stem>.rejected.jsonl``), one batch at a time with :func:`append_jsonl` (fsync'd
whole lines). On start, both files are read with :func:`read_jsonl_tolerant` (a torn last line from a kill is
dropped and later repaired) and their ids skipped, so a killed run resumes where it stopped, never duplicates a
prompt, and never regenerates a prompt that was filtered out. Stats go to ``<out stem>.stats.json``.

Command line (small, used by the resumability test and for standalone runs)::

    python -m staged_alignment.data_builders.critique_rewrite --model DIR --prompts F [--prompts F2] --constitution C --out O \\
        [--rejected-out R] [--seed 42] [--num-few-shot 1] [--batch-size 8] [--max-new-tokens 128] [--greedy] \\
        [--critic DIR_OR_URL [--critic-model-name NAME]] [--no-content-filters]
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, "") and (Path(__file__).resolve().parents[1] / "staged_alignment").is_dir():  # a checkout, run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (an installed wheel needs nothing)

import importlib.util

from tqdm.auto import tqdm

from staged_alignment.core.chat_template import prompt_ids
from staged_alignment.core.config import GenerationSection, ModelSection
from staged_alignment.core.jsonl_io import (  # noqa: E402
    ConverterParser,
    DataError,
    append_jsonl,
    atomic_write_json,
    check_output_file,
    iter_jsonl,
    positive_int,
    read_jsonl_tolerant,
    require_str,
    run_converter,
)
from staged_alignment.core.jsonl_io import iter_jsonl as _lines
from staged_alignment.core.redaction import install_log_redaction
from staged_alignment.core.sources import iter_source
from staged_alignment.data_builders.constitution import (
    Constitution,
    Principle,
    draw_principle,
    load_constitution,
)
from staged_alignment.data_builders.pair_filters import FILTER_REASONS, PairFilterSettings, check_pair
from staged_alignment.data_builders.redteam import (
    prompt_id,
    read_redteam_sources,
)
from staged_alignment.data_builders.sft_data import as_messages

log = logging.getLogger(__name__)

REJECT_REASONS = ("empty_response", "truncated_response", "empty_critique", "empty_revision", "truncated_revision",
                  "meta_revision", "identical") + FILTER_REASONS

# A leading sentence that announces a rewrite instead of being one. Anchored at the start; needs a rewrite noun
# (version/response/revision/…) or a "Revised response:"-style label, so "Sure, I can help with that." is kept.
_OPENER = r"(?:(?:sure|okay|ok|certainly|of course|absolutely|alright|great)\s*[,!.]?\s*)?"
_ADJ = r"(?:[\w'’-]+,?\s+){0,4}?"  # up to four words before the noun: "a more age-appropriate", "a safer, kinder"
_NOUN = r"(?:version|response|revision|rewrite|reply|answer|text)"
_PREAMBLE = re.compile(
    r"^\s*" + _OPENER + r"(?:"
    r"(?:here(?:'s|’s| is| are)|below is|this is|i(?:'ve|’ve| have)\s+(?:re)?written|i(?:'ll|’ll| will| can)\s+"
    r"(?:rewrite|revise)[^\n:]*?(?:as follows|like this)?)\s+" + _ADJ + _NOUN + r"s?\b[^\n:]{0,80}?(?::|\.|\n|$)"
    r"|(?:(?:revised|rewritten|new|updated|improved|amended|edited)\s+(?:" + _NOUN + r")|revision|rewrite)\s*:"
    r")[ \t]*\n*",
    re.IGNORECASE)
_QUOTES = [("\"", "\""), ("“", "”"), ("'", "'")]


def normalize_ws(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends (for the ``identical`` filter)."""
    return " ".join(text.split())


def strip_preamble(text: str) -> tuple[str, bool]:
    """Remove a leading "here is a revised response:"-style preamble; return ``(rest, had_preamble)``.

    Quotes wrapping the whole rest are removed too. Only the start of the text is examined (see module docstring).
    """
    m = _PREAMBLE.match(text)
    if not m or m.end() == 0:
        return text.strip(), False
    rest = text[m.end():].strip()
    for a, b in _QUOTES:
        once = rest.count(a) == 2 if a == b else (rest.count(a) == 1 and rest.count(b) == 1)
        if len(rest) >= 2 and rest.startswith(a) and rest.endswith(b) and once:
            rest = rest[len(a):-len(b)].strip()
            break
    return rest, True


# ------------------------------------------------------------------------------------------------- backends
def ensure_full_precision(model) -> None:
    """Raise ``ValueError`` for a 4-bit/8-bit quantized model or an unmerged peft model.

    Critique-and-rewrite must run on the merged 16-bit SFT model (``sft/merged``): a 4-bit QLoRA base generates
    from different weights than the ones the DPO stage trains on.
    """
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError("critique-and-rewrite needs the merged 16-bit SFT model (sft/merged), got a model loaded in "
                         "4/8-bit; load it with quantize=False")
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None:
        qd = qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: {})()
        if qd.get("load_in_4bit") or qd.get("load_in_8bit") or qd.get("quant_method") in {"bitsandbytes", "gptq", "awq"}:
            raise ValueError(f"critique-and-rewrite needs the merged 16-bit SFT model (sft/merged), got a quantized "
                             f"model ({qd.get('quant_method', 'quantized')})")
    if hasattr(model, "peft_config") and hasattr(model, "disable_adapter"):
        raise ValueError("critique-and-rewrite needs the merged model, got a peft model with an unmerged adapter; "
                         "merge it first (core.models.merge_adapter)")


def _seed_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:4], "big")


class TransformersBackend:
    """Batched generation with ``generate_chat`` on an in-memory (merged, 16-bit) model."""

    name = "transformers"

    def __init__(self, model, tokenizer, gen, seed: int):
        ensure_full_precision(model)
        self.model, self.tokenizer, self.gen, self.seed = model, tokenizer, gen, seed

    def generate(self, conversations: Sequence[list[dict]], ids: Sequence[str], step: str) -> list[dict]:
        """Answer each conversation; returns ``[{"text", "n_tokens", "truncated"}]`` in order."""
        import torch

        from staged_alignment.data_builders.generation import generate_chat

        if not conversations:
            return []
        torch.manual_seed(_seed_int(self.seed, step, *ids))  # same batch → same samples, also after a resume
        g = self.gen
        return generate_chat(self.model, self.tokenizer, conversations, max_new_tokens=g.max_new_tokens,
                             batch_size=g.batch_size, do_sample=g.do_sample, temperature=g.temperature, top_p=g.top_p,
                             progress=False)


def require_vllm() -> None:
    """Raise ``RuntimeError`` naming what is missing (the ``vllm`` package, a CUDA device) for the vLLM backend."""
    import torch

    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append("the 'vllm' package is not installed (pip install vllm; CUDA builds only)")
    if not torch.cuda.is_available():
        problems.append("no CUDA device is available")
    if problems:
        raise RuntimeError("generation.backend 'vllm' cannot run: " + "; ".join(problems)
                           + ". Set dpo.generation.backend: transformers")


def check_model_dir_not_quantized(path: str | Path) -> None:
    """Raise ``ValueError`` if ``path/config.json`` declares a ``quantization_config`` (vLLM loads from the folder)."""
    cfg_file = Path(path) / "config.json"
    if cfg_file.exists():
        qc = json.loads(cfg_file.read_text()).get("quantization_config")
        if qc:
            raise ValueError(f"{path} is a quantized model ({qc.get('quant_method', '?')}); critique-and-rewrite needs "
                             "the merged 16-bit SFT model (sft/merged)")


class VLLMBackend:
    """Generation with vLLM from the merged model folder (CUDA only).

    The chat template is applied by us (``render_prompt``) and the prompt is tokenized without extra special tokens,
    exactly as in :func:`generate_chat`; vLLM receives token ids (``{"prompt_token_ids": …}``), so it cannot add a BOS
    of its own. Sampling: ``SamplingParams`` from the generation section (greedy = temperature 0), one seed per prompt
    and step, stop at the tokenizer's eos. ``truncated`` = vLLM's ``finish_reason == "length"``.
    """

    name = "vllm"

    def __init__(self, model_path: str | Path, tokenizer, gen, seed: int, *, trust_remote_code: bool = False,
                 max_model_len: int | None = None):
        require_vllm()
        check_model_dir_not_quantized(model_path)
        from vllm import LLM, SamplingParams

        self._SamplingParams = SamplingParams
        self.tokenizer, self.gen, self.seed = tokenizer, gen, seed
        self.llm = LLM(model=str(model_path), tokenizer=str(model_path), dtype="auto", seed=seed,
                       gpu_memory_utilization=gen.vllm_gpu_memory_utilization, trust_remote_code=trust_remote_code,
                       max_model_len=max_model_len)

    def generate(self, conversations: Sequence[list[dict]], ids: Sequence[str], step: str) -> list[dict]:
        if not conversations:
            return []
        g = self.gen
        prompts = [{"prompt_token_ids": prompt_ids(self.tokenizer, c)} for c in conversations]
        params = [self._SamplingParams(n=1, max_tokens=g.max_new_tokens,
                                       temperature=g.temperature if g.do_sample else 0.0,
                                       top_p=g.top_p if g.do_sample else 1.0, seed=_seed_int(self.seed, step, pid),
                                       stop_token_ids=[self.tokenizer.eos_token_id], skip_special_tokens=True)
                  for pid in ids]
        outs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            res.append({"text": c.text.strip(), "n_tokens": len(c.token_ids), "truncated": c.finish_reason == "length"})
        return res


# ---------------------------------------------------------------------------------------------- pairs
def default_side_paths(out: str | Path) -> tuple[Path, Path]:
    """``(rejected_out, stats)`` beside ``out``: ``pairs.jsonl`` → ``pairs.rejected.jsonl``, ``pairs.stats.json``."""
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.stem
    return out.with_name(stem + ".rejected.jsonl"), out.with_name(stem + ".stats.json")


def make_pair(prompt: dict, principle: Principle, response: str, critique: str, revision: str) -> dict:
    """One preference pair in the project schema (chosen = revision, rejected = initial response)."""
    return {"id": prompt["id"], "prompt": [{"role": "user", "content": prompt["prompt"]}],
            "chosen": [{"role": "assistant", "content": revision}],
            "rejected": [{"role": "assistant", "content": response}],
            "principle_id": principle.id, "critique": critique, "source": prompt.get("source", "")}


def _done_ids(*paths: Path) -> set[str]:
    ids: set[str] = set()
    for p in paths:
        for row in read_jsonl_tolerant(p):
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                ids.add(row["id"])
    return ids


def summarize_files(out: str | Path, rejected_out: str | Path | None = None) -> dict:
    """Counts over everything written so far (all resumed runs): accepted, rejected by reason, prompts covered."""
    rej_path = Path(rejected_out) if rejected_out else default_side_paths(out)[0]
    acc = read_jsonl_tolerant(out)
    rej = read_jsonl_tolerant(rej_path)
    reasons = Counter(r.get("reason", "?") for r in rej)
    return {"accepted": len(acc), "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items())),
            "prompts_covered": len({r["id"] for r in acc} | {r["id"] for r in rej}),
            "by_principle": dict(sorted(Counter(r.get("principle_id") for r in acc).items()))}


def generate_pairs(backend, prompts: list[dict], constitution: Constitution, out: str | Path, *,
                   rejected_out: str | Path | None = None, stats_out: str | Path | None = None, seed: int = 42,
                   num_few_shot: int = 1, batch_size: int = 8, drop_truncated: bool = True,
                   min_revision_words: int = 3, progress: bool = True, throttle_seconds: float = 0.0,
                   on_batch: Callable[[int], None] | None = None, provenance: dict | None = None,
                   filters: PairFilterSettings | None = None, critic=None) -> dict:
    """Generate preference pairs for ``prompts`` (``{"id", "prompt", "source"?}``) into the append-only ``out``.

    ``backend.generate(conversations, ids, step)`` answers a batch of chats (see :class:`TransformersBackend`).
    Prompts whose id is already in ``out`` or ``rejected_out`` are skipped (resume). ``throttle_seconds`` pauses
    after each written batch (lets a test interrupt part-way). Returns the stats dict, also written atomically to
    ``stats_out``: this run's counts (``processed``, ``accepted``, ``rejected`` by reason, ``preamble_stripped``,
    ``truncated``/``empty`` per step) and ``files`` (totals over ``out`` and ``rejected_out``). ``filters``: the
    content filters' thresholds (default :class:`PairFilterSettings`); ``critic``: the backend that writes critiques
    and revisions (default ``backend``).
    """
    out = Path(out)
    rej_default, stats_default = default_side_paths(out)
    rejected_out = Path(rejected_out) if rejected_out else rej_default
    stats_out = Path(stats_out) if stats_out else stats_default
    done = _done_ids(out, rejected_out)
    todo = [p for p in prompts if p["id"] not in done]
    seen_ids = set()
    for p in todo:
        if p["id"] in seen_ids:
            raise ValueError(f"duplicate prompt id {p['id']!r} in the input; read prompts with data_builders.redteam")
        seen_ids.add(p["id"])
    few = constitution.few_shot_messages(num_few_shot)
    filters = filters or PairFilterSettings()
    stats = {"prompts": len(prompts), "skipped_done": len(prompts) - len(todo), "processed": 0, "accepted": 0,
             "rejected": {r: 0 for r in REJECT_REASONS}, "preamble_stripped": 0,
             "truncated": {"response": 0, "critique": 0, "revision": 0},
             "empty": {"response": 0, "critique": 0, "revision": 0},
             "settings": {"seed": seed, "num_few_shot": min(num_few_shot, len(constitution.few_shot)),
                          "drop_truncated": drop_truncated, "min_revision_words": min_revision_words,
                          "constitution": constitution.path or constitution.name, "backend": getattr(backend, "name", "?"),
                          "critic": getattr(critic, "name", "?") if critic is not None else "the trained model",
                          "filters": filters.as_dict(), **(provenance or {})}}
    log.info("critique-and-rewrite: %d prompts, %d already done, %d to generate", len(prompts), len(done & {p['id'] for p in prompts}), len(todo))
    bar = tqdm(total=len(todo), desc="critique-and-rewrite", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            accepted, rejected = _process_batch(backend, critic or backend, batch, constitution, few, seed,
                                                drop_truncated, min_revision_words, stats, filters)
            if accepted:
                append_jsonl(out, accepted)
            if rejected:
                append_jsonl(rejected_out, rejected)
            stats["processed"] += len(batch)
            bar.update(len(batch))
            if on_batch:
                on_batch(stats["processed"])
            if throttle_seconds:
                time.sleep(throttle_seconds)
    finally:
        bar.close()
        stats["files"] = summarize_files(out, rejected_out)
        atomic_write_json(stats_out, stats)
    return stats


def _process_batch(backend, critic, batch, constitution, few, seed, drop_truncated, min_words, stats, filters):
    principles = [draw_principle(constitution, seed, p["id"]) for p in batch]
    state = [{"prompt": p, "principle": pr, "reason": None, "texts": {}, "filter": None}
             for p, pr in zip(batch, principles)]

    def run_step(step: str, build):
        live = [s for s in state if s["reason"] is None]
        if not live:
            return
        convs = [build(s) for s in live]
        outs = (backend if step == "response" else critic).generate(convs, [s["prompt"]["id"] for s in live], step)
        for s, o in zip(live, outs):
            s["texts"][step] = o["text"]
            if o["truncated"]:
                stats["truncated"][step] += 1
            if not o["text"].strip():
                stats["empty"][step] += 1
                s["reason"] = f"empty_{step}"
            elif o["truncated"] and drop_truncated and step in ("response", "revision"):
                s["reason"] = f"truncated_{step}"

    def c1(s):
        return few + [{"role": "user", "content": s["prompt"]["prompt"]}]

    def c2(s):
        return c1(s) + [{"role": "assistant", "content": s["texts"]["response"]},
                        {"role": "user", "content": s["principle"].critique}]

    def c3(s):
        return c2(s) + [{"role": "assistant", "content": s["texts"]["critique"]},
                        {"role": "user", "content": s["principle"].revision}]

    run_step("response", c1)
    run_step("critique", c2)
    run_step("revision", c3)
    accepted, rejected = [], []
    for s in state:
        revision = s["texts"].get("revision")
        if s["reason"] is None:
            rest, had = strip_preamble(revision)
            if had and len(rest.split()) < max(min_words, 1):
                s["reason"] = "meta_revision"
            else:
                if had:
                    stats["preamble_stripped"] += 1
                    s["texts"]["revision_raw"] = revision
                    revision = rest
                if normalize_ws(revision) == normalize_ws(s["texts"]["response"]):
                    s["reason"] = "identical"
                else:
                    s["reason"], s["filter"] = check_pair(s["prompt"]["prompt"], s["texts"]["response"],
                                                          s["texts"]["critique"], revision, s["principle"].revision,
                                                          filters)
        if s["reason"] is None:
            accepted.append(make_pair(s["prompt"], s["principle"], s["texts"]["response"], s["texts"]["critique"],
                                      revision))
            stats["accepted"] += 1
        else:
            stats["rejected"][s["reason"]] += 1
            rejected.append({"id": s["prompt"]["id"], "reason": s["reason"], "principle_id": s["principle"].id,
                             "prompt": s["prompt"]["prompt"], "source": s["prompt"].get("source", ""), **s["texts"],
                             **({"revision_kept": revision, "filter": s["filter"]} if s["filter"] else {})})
    return accepted, rejected


# ------------------------------------------------------------------------------------------ reading pairs
def _check_messages(obj, key, role, path, line, *, last_role=None, single=False) -> None:
    msgs = obj.get(key)
    if not isinstance(msgs, list) or not msgs:
        raise DataError(path, line, key, "expected a non-empty list of messages")
    if single and len(msgs) != 1:
        raise DataError(path, line, key, f"expected exactly one {role} message, got {len(msgs)}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(path, line, f"{key}[{i}]", "expected an object")
        r = require_str(m, "role", path, line, prefix=f"{key}[{i}].")
        require_str(m, "content", path, line, prefix=f"{key}[{i}].")
        if single and r != role:
            raise DataError(path, line, f"{key}[{i}].role", f"expected {role!r}, got {r!r}")
    if last_role and msgs[-1]["role"] != last_role:
        raise DataError(path, line, f"{key}[{len(msgs) - 1}].role", f"the last message must be the {last_role}'s")


def parse_preference(obj: dict, path, line) -> dict:
    """Validate the preference part of a row: ``id`` and TRL's conversational ``prompt``/``chosen``/``rejected``
    message lists; raises :class:`DataError`."""
    require_str(obj, "id", path, line)
    _check_messages(obj, "prompt", "user", path, line, last_role="user")
    _check_messages(obj, "chosen", "assistant", path, line, single=True)
    _check_messages(obj, "rejected", "assistant", path, line, single=True)
    return obj


def parse_pair(obj: dict, path, line) -> dict:
    """Validate one preference-pair row (schema in the module docstring); raises :class:`DataError`."""
    parse_preference(obj, path, line)
    require_str(obj, "principle_id", path, line)
    require_str(obj, "critique", path, line, allow_empty=True)
    require_str(obj, "source", path, line, allow_empty=True)
    return obj


def trl_preference_to_pair(obj: dict, path, line, source: str) -> dict:
    """A TRL preference row as a project pair (``principle_id: external``, empty critique).

    Explicit prompt: ``prompt``, ``chosen``, ``rejected``, each a string or a message list. Implicit prompt (no
    ``prompt``): ``chosen`` and ``rejected`` are whole conversations; their common first turns are the prompt and
    the rest the two answers. ``id`` is kept when present, else ``<prompt_id>-<8 hex of the answers>`` (the prompt
    part is :func:`data_builders.redteam.prompt_id` of the last user turn, so held-out and safety-set checks can
    match it). Raises :class:`DataError` naming the field."""
    if "prompt" in obj:
        prompt = as_messages(obj["prompt"], path, line, "prompt", "user")
        chosen = as_messages(obj.get("chosen"), path, line, "chosen", "assistant")
        rejected = as_messages(obj.get("rejected"), path, line, "rejected", "assistant")
    else:
        c = as_messages(obj.get("chosen"), path, line, "chosen", "assistant")
        r = as_messages(obj.get("rejected"), path, line, "rejected", "assistant")
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        if n == 0:
            raise DataError(path, line, "chosen", "no 'prompt' and no shared first turns between chosen and "
                                                  "rejected (implicit-prompt rows must share the conversation)")
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    digest = hashlib.sha256(json.dumps([chosen, rejected], sort_keys=True).encode()).hexdigest()[:8]
    rid = obj.get("id") if isinstance(obj.get("id"), str) and obj.get("id") else \
        f"{prompt_id(users[-1] if users else json.dumps(prompt))}-{digest}"
    return {"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected, "principle_id": "external",
            "critique": "", "source": source}


def read_pairs_source(source: str | dict) -> list[dict]:
    """``dpo.pairs_file``: this project's pairs, or TRL preference rows (:func:`trl_preference_to_pair`), from a
    JSONL file or anything :mod:`core.sources` reads (Hub ids, parquet, dataset folders); duplicate ids
    are an error naming the row."""
    src = {"path": str(source)} if not isinstance(source, dict) else source
    label, rows_iter = iter_source(src, _lines)
    out, seen = [], {}
    for where, obj in rows_iter:
        row = obj if "principle_id" in obj else trl_preference_to_pair(obj, label, where, Path(str(label)).name)
        parse_pair(row, label, where)
        if row["id"] in seen:
            raise DataError(label, where, "id", f"duplicate id {row['id']!r} (first at {seen[row['id']]})")
        seen[row["id"]] = where
        out.append(row)
    return out


def read_pairs(path: str | Path, provenance: bool = True) -> list[dict]:
    """Read and validate a preference-pair JSONL file; duplicate ids are an error (file, line, ``id``).
    ``provenance=False`` checks only the preference part (:func:`parse_preference`: any TRL conversational
    preference file with ids), not ``principle_id``/``critique``/``source``."""
    rows, seen = [], {}
    for line, obj in iter_jsonl(path):
        (parse_pair if provenance else parse_preference)(obj, path, line)
        if obj["id"] in seen:
            raise DataError(path, line, "id", f"duplicate id {obj['id']!r} (first at line {seen[obj['id']]})")
        seen[obj["id"]] = line
        rows.append(obj)
    return rows


# ------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    """Command line: generate pairs from a model folder (see module docstring). Exit 2 on bad input (one
    ``error:`` line, :func:`core.jsonl_io.run_converter`)."""
    ap = ConverterParser(description="Constitutional critique-and-rewrite pairs from a merged model folder")
    ap.add_argument("--model", required=True, help="merged 16-bit model folder (e.g. runs/<name>/sft/merged)")
    ap.add_argument("--prompts", required=True, action="append", help="red-team prompt file (repeatable)")
    ap.add_argument("--prompts-format", default="auto", choices=["auto", "prompts", "hh-rlhf"])
    ap.add_argument("--max-prompts", type=positive_int, default=None)
    ap.add_argument("--constitution", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rejected-out", default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--num-few-shot", type=positive_int, default=1)
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--max-new-tokens", type=positive_int, default=128)
    ap.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--keep-truncated", action="store_true", help="keep (but count) truncated responses/revisions")
    ap.add_argument("--min-revision-words", type=int, default=3)
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--throttle-seconds", type=float, default=0.0, help="pause after each batch (tests)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--critic", default=None, help="model folder, Hub id or http(s):// OpenAI-compatible server that "
                                                   "writes critiques and revisions (default: --model)")
    ap.add_argument("--critic-model-name", default=None, help="model name sent to a critic server (default: the "
                                                              "first it lists)")
    ap.add_argument("--no-content-filters", action="store_true",
                    help="keep every pair the structural filters pass (no similarity/overlap/judge filters)")
    return run_converter(lambda: _main(ap.parse_args(argv), check_output_file))


def _main(args, check_output_file) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    install_log_redaction()  # a critic URL's user:password@ never reaches a log line

    check_output_file(args.out)
    if args.rejected_out:
        check_output_file(args.rejected_out, "--rejected-out")
    constitution = load_constitution(args.constitution)
    sources = [{"path": p, "format": args.prompts_format} for p in args.prompts]
    prompts = read_redteam_sources(sources)
    if args.max_prompts:
        prompts = prompts[:args.max_prompts]
    gen = GenerationSection(backend=args.backend, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p,
                            num_few_shot=args.num_few_shot, drop_truncated=not args.keep_truncated,
                            min_revision_words=args.min_revision_words, seed=args.seed, progress=not args.no_progress,
                            critic_model=args.critic, critic_endpoint_model=args.critic_model_name)
    backend = build_backend(gen, args.model, ModelSection(), seed=args.seed, device=args.device)
    critic = build_critic(gen, ModelSection(), seed=args.seed, device=args.device)
    filters = PairFilterSettings.off() if args.no_content_filters else PairFilterSettings()
    stats = generate_pairs(backend, prompts, constitution, args.out, rejected_out=args.rejected_out, seed=args.seed,
                           num_few_shot=gen.num_few_shot, batch_size=gen.batch_size, drop_truncated=gen.drop_truncated,
                           min_revision_words=gen.min_revision_words, progress=gen.progress,
                           throttle_seconds=args.throttle_seconds, provenance={"model": str(args.model)},
                           filters=filters, critic=critic)
    print(json.dumps({k: stats[k] for k in ("processed", "accepted", "rejected", "files")}, indent=2))
    return 0


class EndpointBackend:
    """Generation through an OpenAI-compatible chat-completions server (``vllm serve``, ``trl vllm-serve``,
    ``transformers serve``), with the ``openai`` client (the protocol's own library; ``huggingface_hub``'s
    ``InferenceClient`` refuses even a loopback URL under ``HF_HUB_OFFLINE=1``).

    The server applies its model's own chat template. One request per conversation, in order; sampling follows
    ``gen`` (``max_new_tokens``, ``do_sample``/``temperature``, ``top_p``) with a per-prompt seed.
    ``truncated`` = ``finish_reason == "length"``. The model name is ``model`` or the first one the server lists at
    ``/models``. The client sends the placeholder key ``EMPTY`` (as vLLM's docs do), never the user's Hugging Face
    token. Raises ``RuntimeError`` naming the URL when the server cannot be reached or answers with an error.
    """

    name = "endpoint"

    def __init__(self, url: str, gen, seed: int, model: str | None = None, timeout: float = 300.0):
        try:
            from openai import OpenAI
        except ImportError:
            raise RuntimeError("a critic endpoint needs the openai client: pip install openai") from None
        self.url, self.gen, self.seed = url.rstrip("/"), gen, seed
        self.client = OpenAI(base_url=self.url, api_key="EMPTY", timeout=timeout, max_retries=1)
        self.model = model or self._first_model()
        self.name = f"endpoint {self.url} ({self.model})"

    def _first_model(self) -> str:
        try:
            ids = [m.id for m in self.client.models.list()]
        except Exception as e:  # noqa: BLE001 - reported with the URL
            raise RuntimeError(f"critic endpoint {self.url}: cannot list models ({type(e).__name__}: {e}); set "
                               "dpo.generation.critic_endpoint_model to the served model's name") from None
        if not ids:
            raise RuntimeError(f"critic endpoint {self.url}: /models lists no model; set "
                               "dpo.generation.critic_endpoint_model")
        return ids[0]

    def generate(self, conversations: Sequence[list[dict]], ids: Sequence[str], step: str) -> list[dict]:
        res = []
        extra = {"temperature": self.gen.temperature, "top_p": self.gen.top_p} if self.gen.do_sample else \
            {"temperature": 0.0}
        for conv, pid in zip(conversations, ids):
            try:
                out = self.client.chat.completions.create(model=self.model, messages=conv,
                                                          max_tokens=self.gen.max_new_tokens,
                                                          seed=_seed_int(self.seed, pid, step) % 2 ** 31, **extra)
            except Exception as e:  # noqa: BLE001 - the server's error, located
                raise RuntimeError(f"critic endpoint {self.url}: {step} for {pid}: {type(e).__name__}: {e}") from None
            choice = out.choices[0]
            n = getattr(out.usage, "completion_tokens", None) if out.usage else None
            res.append({"text": (choice.message.content or "").strip(), "n_tokens": n,
                        "truncated": choice.finish_reason == "length"})
        return res


def build_critic(gen, model_cfg, *, seed: int, device: str = "auto"):
    """The backend that writes critiques and revisions: None (the trained model) when ``gen.critic_model`` is
    unset; :class:`EndpointBackend` for an ``http(s)://`` URL; else the model folder or Hub id through
    :func:`build_backend` (loaded unquantized, in the project's chat template)."""
    target = gen.critic_model
    if not target:
        return None
    if target.startswith(("http://", "https://")):
        return EndpointBackend(target, gen, seed, model=gen.critic_endpoint_model)
    backend = build_backend(gen, target, model_cfg, seed=seed, device=device)
    backend.name = f"critic {target}"
    return backend


def build_backend(gen, model_path: str | Path, model_cfg, *, seed: int, device: str = "auto", model=None,
                  tokenizer=None):
    """The generation backend of ``gen.backend`` for the merged model at ``model_path``.

    ``model``/``tokenizer`` may be passed to reuse an already loaded model (transformers backend). The model is
    loaded unquantized (``quantize=False``) whatever ``model.quantization`` says; a quantized model raises.
    """
    from staged_alignment.core.models import load_model, load_tokenizer, pick_device

    if gen.backend == "vllm":
        require_vllm()
    tok = tokenizer or load_tokenizer(str(model_path), model_cfg)
    if gen.backend == "vllm":
        return VLLMBackend(model_path, tok, gen, seed, trust_remote_code=model_cfg.trust_remote_code)
    if model is None:
        dev = pick_device(device)
        model = load_model(str(model_path), model_cfg, device=dev, quantize=False, for_training=False)
        model = model.to(dev)
    return TransformersBackend(model, tok, gen, seed)


if __name__ == "__main__":
    raise SystemExit(main())
