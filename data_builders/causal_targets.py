"""Targets and hijacked responses of the causal stage's triplets, generated once by the starting model and cached.

Per triplet (:func:`data_builders.triplets.build_triplets`):

* ``target`` y — what every view is trained toward. The gold answer when the task has one; otherwise the starting
  model's own greedy answer to the *benign* prompt (consistency training: the injected prompt should get the answer
  the clean one gets; Chua et al. 2025, "Bias-augmented consistency training"; Irpan et al. 2025, "Consistency
  training helps stop sycophancy and jailbreaks"). A control triplet's target is that answer with its tag
  (:func:`data_builders.triplets.compose_control_target`).
* ``hijack`` y_a — what obeying the injection looks like. For a canary attack, the canary (set by the builder);
  for a task attack (e.g. BIPIA's "write a poem about …"), the starting model's greedy answer to the injected
  instruction alone, as SecAlign builds its rejected responses (Chen et al. 2024, §4.1: the response to the
  injected instruction).

Generation is batched (:func:`data_builders.generation.generate_chat`), greedy, and resumable: every answer is
appended to ``cache_path`` (JSONL) as soon as its batch is done, keyed by the sha256 of (model fingerprint, the
exact messages, ``max_new_tokens``), so a killed run regenerates nothing it already has and a changed model or
prompt never reuses a stale answer. Answers that hit ``max_new_tokens`` are kept (short targets are the point) but
counted; empty answers leave the triplet out (counted in the stats).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

from staged_alignment.core.jsonl_io import append_jsonl, read_jsonl_tolerant
from staged_alignment.data_builders.triplets import TRAIN_CONTROL_SUFFIXES, compose_control_target, triplet_messages

log = logging.getLogger(__name__)


def _key(fingerprint: str, messages: list[dict], max_new_tokens: int) -> str:
    blob = json.dumps([fingerprint, messages, max_new_tokens], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _answer_missing(jobs: dict[str, list[dict]], model, tokenizer, cache_path: Path, *, max_new_tokens: int,
                    batch_size: int, progress: bool = False) -> tuple[dict[str, dict], dict]:
    """Greedy answers to ``jobs`` (``{key: messages}``) from the cache at ``cache_path``, generating the missing ones
    in batches and appending each batch to the cache as soon as it is done. Returns ``({key: {"text",
    "truncated"}}, {"generated", "from_cache", "truncated": 0, "dropped_empty": 0})``."""
    from staged_alignment.data_builders.generation import generate_chat

    cached = {r["key"]: r for r in read_jsonl_tolerant(cache_path) if isinstance(r, dict) and "key" in r}
    todo = [(k, m) for k, m in jobs.items() if k not in cached]
    stats = {"generated": len(todo), "from_cache": len(jobs) - len(todo), "truncated": 0, "dropped_empty": 0}
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        outs = generate_chat(model, tokenizer, [m for _, m in chunk], max_new_tokens=max_new_tokens,
                             batch_size=batch_size, do_sample=False)
        rows = [{"key": k, "text": o["text"], "truncated": o["truncated"]} for (k, _), o in zip(chunk, outs)]
        append_jsonl(cache_path, rows)
        cached.update({r["key"]: r for r in rows})
        if progress:
            log.info("causal targets: %d/%d answers generated", min(s + batch_size, len(todo)), len(todo))
    return cached, stats


def pending(triplets: Sequence[dict]) -> dict:
    """How many triplets still need a model-made ``target`` / ``hijack``."""
    return {"target": sum(1 for t in triplets if not t.get("target")),
            "hijack": sum(1 for t in triplets if not t.get("hijack"))}


def self_replay_pairs(prompts: Sequence[dict], model, tokenizer, cache_path: str | Path, *, fingerprint: str,
                      max_new_tokens: int = 64, batch_size: int = 8) -> tuple[list[dict], dict]:
    """Retention pairs from the starting model's own greedy answers to earlier-stage prompts (``{"id", "prompt"}``,
    e.g. the DPO stage's red-team prompts): ``{"id", "prompt": [user], "chosen": [assistant: answer], "rejected":
    [the same]}`` for the SFT retention term only — sequence-level distillation from the starting model (Kim & Rush
    2016, "Sequence-Level Knowledge Distillation"), which keeps what that model does on those prompts, refusals
    included (Learning without Forgetting's idea, Li & Hoiem 2016). Answers are cached in ``cache_path`` like the
    triplet targets (keyed by fingerprint, messages, ``max_new_tokens``; resumable). Empty answers are left out.
    Returns ``(pairs, {"generated", "from_cache", "truncated", "dropped_empty"})``."""
    keyed = [(p, [{"role": "user", "content": p["prompt"]}]) for p in prompts]
    keyed = [(p, m, _key(fingerprint, m, max_new_tokens)) for p, m in keyed]
    cached, stats = _answer_missing({k: m for _, m, k in keyed}, model, tokenizer, Path(cache_path),
                                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    pairs = []
    for p, m, k in keyed:
        text = cached[k]["text"].strip()
        stats["truncated"] += int(bool(cached[k].get("truncated")))
        if not text:
            stats["dropped_empty"] += 1
            continue
        answer = [{"role": "assistant", "content": text}]
        pairs.append({"id": p["id"], "prompt": m, "chosen": answer, "rejected": answer, "source": "self"})
    return pairs, stats


def fill_generated(triplets: Sequence[dict], model, tokenizer, cache_path: str | Path, *, fingerprint: str,
                   max_new_tokens: int = 64, batch_size: int = 8, data_role: bool = False,
                   progress: bool = False) -> tuple[list[dict], dict]:
    """Fill empty ``target``/``hijack`` fields with the model's greedy answers (module docstring).

    Args:
        triplets: validated triplet rows (:func:`data_builders.triplets.read_triplets`).
        model, tokenizer: the starting model (merged, not 4-bit) and its tokenizer with the project template.
        cache_path: append-only JSONL of answers (created if missing).
        fingerprint: identity of the model (e.g. :func:`evaluation.runner.model_fingerprint`); part of every key.
    Returns:
        ``(rows, stats)``: rows with both fields filled (triplets whose generated answer was empty are dropped) and
        ``{"generated", "from_cache", "truncated", "dropped_empty"}``.
    """
    cache_path = Path(cache_path)
    jobs: dict[str, list[dict]] = {}  # key → messages (deduplicated: shared prompts are answered once)
    wants: list[tuple[int, str, str]] = []  # (triplet index, field, key)
    for i, t in enumerate(triplets):
        if not t.get("target"):
            msgs = triplet_messages({**t, "instruction": _base_instruction(t)}, "benign", data_role=data_role)
            k = _key(fingerprint, msgs, max_new_tokens)
            jobs.setdefault(k, msgs)
            wants.append((i, "target", k))
        if not t.get("hijack"):
            msgs = [{"role": "user", "content": t["injection"]}]
            k = _key(fingerprint, msgs, max_new_tokens)
            jobs.setdefault(k, msgs)
            wants.append((i, "hijack", k))
    cached, stats = _answer_missing(jobs, model, tokenizer, cache_path, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, progress=progress)
    out = [dict(t) for t in triplets]
    bad = set()
    for i, field, k in wants:
        r = cached[k]
        text = r["text"].strip()
        stats["truncated"] += int(bool(r.get("truncated")))
        if not text:
            bad.add(i)
            continue
        if field == "target" and out[i].get("control_tag"):
            text = compose_control_target(text, out[i]["control_tag"], out[i].get("control_mode") or "end")
        out[i][field] = text
        out[i][f"{field}_source"] = "model"
    stats["dropped_empty"] = len(bad)
    return [t for i, t in enumerate(out) if i not in bad], stats


def _base_instruction(t: dict) -> str:
    """The instruction without a control triplet's tag request: the model answers the task itself; the tag is added
    to its answer afterwards."""
    if not t.get("control_tag"):
        return t["instruction"]

    ins = t["instruction"]
    for suffix, _ in TRAIN_CONTROL_SUFFIXES:
        tail = " " + suffix.format(tag=t["control_tag"])
        if ins.endswith(tail):
            return ins[: -len(tail)]
    return ins
