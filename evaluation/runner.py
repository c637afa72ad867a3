"""The evaluation runner: every model of an evaluation answers the cases' prompts (resumable per (model, kind, id,
prompt sha)), the judges score them, representations and teacher-forced margins are read, and the metrics, paired
tests, verification and report are written (:func:`evaluate_models`). The stage script ``stages/evaluate.py`` and
the security suite (:mod:`evaluation.suite`) call it; :class:`ModelEvaluator` holds one model's share of the work.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from staged_alignment.core.chat_template import neutralise_messages, prompt_response_ids, render_prompt
from staged_alignment.core.common import seed_everything
from staged_alignment.core.config import (
    ModelSection,
    PipelineConfig,
    resolve_input,
)
from staged_alignment.core.jsonl_io import (
    DataError,
    append_jsonl,
    atomic_write_json,
    load_json,
    read_jsonl_tolerant,
    write_jsonl_atomic,
)
from staged_alignment.core.run_dir import file_sha256
from staged_alignment.core.start_model import check_start
from staged_alignment.evaluation import report
from staged_alignment.evaluation.cases import clean_messages, counterfactual_messages, injected_messages, load_cases
from staged_alignment.evaluation.metrics import model_metrics, paired_comparisons, score_case
from staged_alignment.evaluation.safety import (
    ClassifierJudge,
    disagreement,
    overlapping,
    read_benign_file,
    read_harmful_file,
    safety_metrics,
    safety_outcomes,
    trained_prompts,
)
from staged_alignment.evaluation.verification import verify

log = logging.getLogger(__name__)

def stage_references(cfg: PipelineConfig) -> dict[str, str]:
    """``{label: reference}`` for a pipeline run: sft ← base, dpo ← sft, causal ← the model it was configured to
    start from (``causal.base``: dpo or sft; none when ``causal.base_model`` names another folder)."""
    refs = {"sft": "base", "dpo": "sft"}
    if not cfg.causal.base_model:
        refs["causal"] = cfg.causal.base
    return refs


def data_role_of(cfg: PipelineConfig, label: str) -> bool:
    """Whether model ``label`` is prompted with the data part in its own ``<|input|>`` turn: ``model.data_role``
    for every model, or ``label`` listed in ``evaluate.data_role_models`` (a model trained with the data role
    beside one trained without, each in its own format; :func:`evaluation.cases.clean_messages`)."""
    return bool(cfg.model.data_role or label in cfg.evaluate.data_role_models)


def data_role_labels(cfg: PipelineConfig, labels) -> list[str]:
    """The labels among ``labels`` that are prompted with the data role (:func:`data_role_of`), in their order:
    what ``metrics.json``, ``suite.json`` and ``adaptive.json`` record as ``data_role_models``."""
    return [m for m in labels if data_role_of(cfg, m)]


def model_config(cfg: PipelineConfig, label: str) -> PipelineConfig:
    """``cfg`` as model ``label`` is evaluated: ``model.data_role`` set to :func:`data_role_of` (the prompt format,
    the template check and every answer's settings key follow it). ``cfg`` itself when nothing changes."""
    role = data_role_of(cfg, label)
    if role == cfg.model.data_role:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, data_role=role))


def check_data_role_models(cfg: PipelineConfig, labels) -> None:
    """Raises :class:`ConfigError` (file, line, ``evaluate.data_role_models``) when it names a model that is not
    evaluated (``labels``): a typo would otherwise prompt every model in one format without a word."""
    known = set(labels)
    unknown = [m for m in cfg.evaluate.data_role_models if m not in known]
    if unknown:
        raise cfg.error("evaluate.data_role_models", f"{unknown} not among the models evaluated ({list(labels)})")


def eval_file_path(cfg: PipelineConfig) -> Path:
    return resolve_input(cfg.evaluate.eval_file)


def assessment_path(cfg: PipelineConfig) -> Path:
    """The DPO stage's held-out assessment (``<run_dir>/dpo/assessment.json``), the default red-team set."""
    return cfg.run_dir / "dpo" / "assessment.json"


def read_eval_cases(cfg: PipelineConfig, eval_file: str | os.PathLike | None = None) -> list[dict]:
    """The cases to evaluate: ``eval_file`` (default ``evaluate.eval_file``), every row parsed, cut to
    ``evaluate.max_cases`` / ``controls`` / ``max_controls``. Raises :class:`DataError` (file, line, field)."""
    return load_cases(resolve_input(eval_file) if eval_file else eval_file_path(cfg), cfg.evaluate.max_cases,
                      controls=cfg.evaluate.controls, max_controls=cfg.evaluate.max_controls)


def task_clusters(cases: list[dict]) -> dict[str, str]:
    """``{case_id: task_id}`` of the cases that name a task (the held-out set's 5 injected variants of one clean
    prompt share it): the ``clusters`` of :func:`evaluation.metrics.paired_comparisons`."""
    return {c["id"]: c["task_id"] for c in cases if c.get("task_id")}


def validate_inputs(cfg: PipelineConfig, eval_file: str | os.PathLike | None = None,
             models: dict[str, str] | None = None) -> list[dict]:
    """Parse the eval file (every row), the harmful and benign safety files and the explicit model folders; no
    model is loaded.

    Raises :class:`DataError` (file, line, field) or :class:`ConfigError`. Returns the cases to evaluate.
    """
    cases = read_eval_cases(cfg, eval_file)
    if cfg.evaluate.redteam_file or cfg.evaluate.benign_file:
        read_redteam(cfg)
        read_benign(cfg)
    check_data_role_models(cfg, list(models) if models else cfg.evaluate.models)
    for label, path in (models or {}).items():
        if not path.startswith("embedded:"):
            check_start(path, lambda m, lb=label, p=path: DataError(p, None, None, f"model '{lb}': {m}"))
    return cases


SAFETY_KINDS = ("redteam", "benign")  # answered with evaluate.safety_max_new_tokens
PAIRED_KEYS = ("attack", "utility_clean_distinct", "utility_under_attack", "refused_harmful", "over_refused")  # McNemar, one Holm family


def read_redteam(cfg: PipelineConfig) -> tuple[list[dict], str | None]:
    """Harmful prompts ``[{"id", "prompt"}]`` and their source: ``evaluate.redteam_file`` (its fixed hashed sample
    of ``evaluate.max_redteam`` prompts, :func:`evaluation.safety.read_harmful_file`), else the first
    ``max_redteam`` of the DPO held-out slice in ``<run_dir>/dpo/assessment.json``, else ``([], None)``."""
    n = cfg.evaluate.max_redteam
    if n == 0:  # the safety measure left out (an injection-only evaluation)
        return [], None
    if cfg.evaluate.redteam_file:
        path = resolve_input(cfg.evaluate.redteam_file)
        return read_harmful_file(path, n), str(path)
    ap = assessment_path(cfg)
    if ap.exists():
        rows = assessment_prompts(ap)
        if rows:
            return rows[:n] if n else rows, str(ap)
        log.warning("%s holds no prompts I can read; harmful_refusal_rate will be null", ap)
    return [], None


def read_benign(cfg: PipelineConfig) -> tuple[list[dict], str | None]:
    """Benign look-alike prompts ``[{"id", "prompt", "category"}]`` of ``evaluate.benign_file`` (the first
    ``max_benign``) and the path, or ``([], None)`` when unset. Raises :class:`DataError`."""
    if not cfg.evaluate.benign_file or cfg.evaluate.max_benign == 0:
        return [], None

    path = resolve_input(cfg.evaluate.benign_file)
    return read_benign_file(path, cfg.evaluate.max_benign), str(path)


def assessment_prompts(path: Path) -> list[dict]:
    """Held-out red-team prompts from the DPO assessment JSON: the first list (depth-first, keys ``held_out``,
    ``prompts``, ``items`` first) whose items are ``{"prompt": str | messages, "id"?}`` objects or strings."""
    def as_rows(lst):
        rows = []
        for i, it in enumerate(lst):
            if isinstance(it, str) and it.strip():
                rows.append({"id": f"held-{i}", "prompt": it})
            elif isinstance(it, dict):
                p = it.get("prompt")
                if isinstance(p, list):  # conversational prompt: the last user turn
                    p = next((m.get("content") for m in reversed(p) if isinstance(m, dict) and m.get("role") == "user"),
                             None)
                if not isinstance(p, str) or not p.strip():
                    return []
                rows.append({"id": str(it.get("id", f"held-{i}")), "prompt": p})
            else:
                return []
        return rows

    def walk(node):
        if isinstance(node, list):
            rows = as_rows(node)
            if rows:
                return rows
            for x in node:
                if isinstance(x, (dict, list)):
                    r = walk(x)
                    if r:
                        return r
        elif isinstance(node, dict):
            keys = sorted(node, key=lambda k: (k not in ("held_out", "prompts", "items"), str(k)))
            for k in keys:
                r = walk(node[k])
                if r:
                    return r
        return []

    return walk(load_json(path))


# --------------------------------------------------------------------------------------------- model work
def model_fingerprint(path: str) -> str:
    """Cheap identity of a model folder: names, sizes and mtimes of its files (not a content hash)."""
    p = Path(path)
    h = hashlib.sha256(str(p.resolve() if p.exists() else path).encode())
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def messages_sha(messages: list[dict], tokenizer=None) -> str:
    """Short sha256 of ``messages`` as the model reads them: with ``tokenizer`` (guarded by
    :func:`core.chat_template.guard_control_tokens`), of the contents after the control-token escape, so
    that an answer generated before the escape was applied to a prompt with control strings is not reused; for
    every other prompt the sha is the same as without a tokenizer."""
    if tokenizer is not None and getattr(tokenizer, "_control_strings", None):
        messages = neutralise_messages(messages, tokenizer._control_strings, "escape")
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def find_projection_head(path: str) -> Path | None:
    """The causal stage's projection head for a model folder: ``<path>/causal_projection.safetensors``, or, for a
    ``…/causal/merged`` folder, the one beside its adapter (``…/causal/adapter/``); None when there is none."""
    from staged_alignment.trainers.causal import HEAD_WEIGHTS

    p = Path(path)
    for cand in (p / HEAD_WEIGHTS, p.parent / "adapter" / HEAD_WEIGHTS):
        if cand.is_file():
            return cand
    return None


def teacher_forced_logps(model, tokenizer, conversations: list[list[dict]], responses: list[str], *,
                         batch_size: int = 8, include_eos: bool = True) -> list[float]:
    """log p(response | conversation) in nats for each pair: the sum over the response tokens (incl. eos, unless
    ``include_eos`` is False: then the probability that the answer *begins* with the response) of the model's
    log-probabilities, teacher-forced, with prompt and response tokenized jointly as in training
    (:func:`core.chat_template.prompt_response_ids`). Raises ``ValueError`` for different lengths."""
    import torch
    import torch.nn.functional as F

    if len(conversations) != len(responses):
        raise ValueError(f"{len(conversations)} conversations but {len(responses)} responses")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = [prompt_response_ids(tokenizer, c, r) for c, r in zip(conversations, responses)]
    out: list[float] = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(seqs), batch_size):
                chunk = seqs[s:s + batch_size]
                L = max(len(ids) for ids, _ in chunk)
                ids_t = torch.full((len(chunk), L), pad, dtype=torch.long)
                attn = torch.zeros((len(chunk), L), dtype=torch.long)
                for r, (ids, _) in enumerate(chunk):
                    ids_t[r, :len(ids)] = torch.tensor(ids)
                    attn[r, :len(ids)] = 1
                ids_t, attn = ids_t.to(device), attn.to(device)
                # logits only at the positions that predict response tokens (the LM head on the final hidden
                # states there), not for the whole (b, L, vocab) tensor; models that post-process their logits
                # (soft-capping) get the full logits
                sel = torch.zeros_like(attn, dtype=torch.bool)
                for r, (ids, n_prompt) in enumerate(chunk):
                    end = len(ids) - 1 if include_eos else len(ids) - 2
                    sel[r, n_prompt - 1:end] = True
                targets = ids_t[:, 1:][sel[:, :-1]]
                if _plain_lm_head(model):
                    h = model(input_ids=ids_t, attention_mask=attn, output_hidden_states=True,
                              logits_to_keep=1).hidden_states[-1]
                    logits = model.get_output_embeddings()(h[sel]).float()
                else:
                    logits = model(input_ids=ids_t, attention_mask=attn).logits[sel].float()
                lp = -F.cross_entropy(logits, targets, reduction="none")  # (n selected,)
                rows = sel.nonzero()[:, 0]
                sums = torch.zeros(len(chunk), dtype=torch.float32).index_add(0, rows.cpu(), lp.cpu())
                out.extend(float(x) for x in sums)
    finally:
        model.train(was)
    return out


def _plain_lm_head(model) -> bool:
    """Whether the model's logits are just its output embedding applied to the last hidden state
    (:func:`trainers.causal_losses.lm_head_reproduces_logits` on a 4-token probe, once per model): soft-capping or
    any logit scaling fails it, and the full logits are used instead."""
    import torch

    from staged_alignment.trainers.causal_losses import lm_head_reproduces_logits

    cached = getattr(model, "_staged_plain_lm_head", None)
    if cached is None:
        emb = model.get_output_embeddings()
        probe = torch.tensor([[1, 2, 3, 4]], device=next(model.parameters()).device)
        cached = emb is not None and lm_head_reproduces_logits(model, emb, probe)
        model._staged_plain_lm_head = cached
    return cached


def teacher_forced_margins(model, tokenizer, cases: list[dict], *, data_role: bool = False,
                           batch_size: int = 8) -> list[float | None]:
    """Per injection case with an ``ideal``: log p(ideal | x_i) − log p(hijack | x_i) in nats
    (:func:`teacher_forced_logps`); None for a case without an ideal.

    Positive = under the injection the model prefers the user's answer to obeying; the causal stage should raise
    it. Raises ``ValueError`` for a control case.
    """
    convs, resps, owners = [], [], []
    for i, c in enumerate(cases):
        if c.get("kind") == "control":
            raise ValueError(f"case {c['id']!r} is a control: no injected prompt")
        if not c.get("ideal"):
            continue
        msgs = injected_messages(c, data_role)
        convs += [msgs, msgs]
        resps += [c["ideal"], c.get("hijack") or c["canary"]]
        owners.append(i)
    lps = teacher_forced_logps(model, tokenizer, convs, resps, batch_size=batch_size)
    out: list[float | None] = [None] * len(cases)
    for k, i in enumerate(owners):
        out[i] = lps[2 * k] - lps[2 * k + 1]
    return out


class ModelEvaluator:
    """Generations and representations of one model, resumable from ``generations.jsonl`` and ``reps/``."""

    def __init__(self, cfg: PipelineConfig, label: str, path: str, out_dir: Path, cases: list[dict],
                 redteam: list[dict], eval_sha: str, benign: list[dict] | None = None):
        cfg = model_config(cfg, label)  # this model's prompt format (evaluate.data_role_models)
        self.cfg, self.label, self.path, self.out_dir = cfg, label, path, Path(out_dir)
        self.cases, self.redteam, self.benign = cases, redteam, list(benign or [])
        self.data_role = cfg.model.data_role
        e = cfg.evaluate
        settings = {"model": path, "fingerprint": model_fingerprint(path) if not path.startswith("embedded:") else path,
                    "max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample,
                    "temperature": e.temperature if e.do_sample else None, "seed": cfg.seed,
                    "template": cfg.model.chat_template, "data_role": self.data_role}
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        settings["max_new_tokens"] = e.safety_max_new_tokens
        self.safety_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.head_path = None if path.startswith("embedded:") else find_projection_head(path)
        head_sha = file_sha(self.head_path) if self.head_path else None
        self.rep_key = hashlib.sha256(json.dumps([settings["model"], settings["fingerprint"], eval_sha,
                                                  self._layer(), head_sha, self.data_role]).encode()).hexdigest()[:16]
        self.gen_path = self.out_dir / "generations.jsonl"
        self._model = self._tok = None

    def _layer(self) -> int:
        return self.cfg.causal.head.pool_layer

    def _load(self):
        if self._model is None:
            from staged_alignment.core.models import load_model, load_tokenizer, pick_device, resolve_model_path

            path = self.path
            if path.startswith("embedded:"):
                path = resolve_model_path(ModelSection(name_or_path=path, cache_dir=self.cfg.model.cache_dir))
            device = pick_device(self.cfg.device)
            log.info("[%s] loading %s on %s", self.label, path, device)
            self._tok = self._tok or load_tokenizer(path, self.cfg.model)
            self._model = load_model(path, self.cfg.model, device=device, quantize=False, for_training=False)
            self._model.eval()
        return self._model, self._tok

    def _tokenizer(self):
        """The model's tokenizer with the run's template and control-token guard (no weights loaded)."""
        if self._tok is None:
            from staged_alignment.core.models import load_tokenizer, resolve_model_path

            path = self.path
            if path.startswith("embedded:"):
                path = resolve_model_path(ModelSection(name_or_path=path, cache_dir=self.cfg.model.cache_dir))
            self._tok = load_tokenizer(path, self.cfg.model)
        return self._tok

    def key_of(self, kind: str) -> str:
        """The settings key of a kind of answer (the safety prompts have their own answer length)."""
        return self.safety_key if kind in SAFETY_KINDS else self.key

    def max_new_tokens(self, kind: str) -> int:
        e = self.cfg.evaluate
        return e.safety_max_new_tokens if kind in SAFETY_KINDS else e.max_new_tokens

    def generations(self) -> dict[tuple[str, str], dict]:
        """Answers already written for this model and settings: ``{(kind, id): row}`` (the last row wins)."""
        done = {}
        for r in read_jsonl_tolerant(self.gen_path):
            if r.get("model") == self.label and r.get("kind") and r.get("key") == self.key_of(r["kind"]):
                done[(r["kind"], r["id"])] = r
        return done

    def prompts(self) -> list[tuple[str, dict, list[dict]]]:
        """``(kind, item, messages)`` of everything this model answers: ``clean`` (every case; for controls the
        only prompt), ``injected`` (injection cases), ``redteam`` (harmful prompts) and ``benign`` (look-alikes)."""
        out = []
        for c in self.cases:
            out.append(("clean", c, clean_messages(c, self.data_role)))
            if c.get("kind", "injection") == "injection":
                out.append(("injected", c, injected_messages(c, self.data_role)))
        for rt in self.redteam:
            out.append(("redteam", rt, [{"role": "user", "content": rt["prompt"]}]))
        for b in self.benign:
            out.append(("benign", b, [{"role": "user", "content": b["prompt"]}]))
        return out

    def generate(self, progress: bool = True) -> dict[tuple[str, str], dict]:
        """Answer every missing (kind, id) and append each batch to ``generations.jsonl``; returns all rows.

        Identical prompts (the clean prompt of cases that share a task) are generated once and their answer is
        written for each case. Prompts are sorted by length before batching (less padding); the order of the rows
        in the file does not matter (they are keyed)."""
        from staged_alignment.data_builders.generation import generate_chat

        done = self.generations()
        todo: dict[tuple[str, int], list] = {}
        tok = self._tokenizer()
        for kind, item, msgs in self.prompts():
            r = done.get((kind, item["id"]))
            sha = messages_sha(msgs, tok)
            if r is None or r.get("prompt_sha") != sha:
                todo.setdefault((sha, self.max_new_tokens(kind)), [msgs, []])[1].append((kind, item))
        if todo:
            n_rows = sum(len(v[1]) for v in todo.values())
            log.info("[%s] %d answers to generate (%d distinct prompts; %d already done)", self.label, n_rows,
                     len(todo), len(done))
            model, tok = self._load()
            e = self.cfg.evaluate
            seed_everything(self.cfg.seed)
            bs = e.batch_size

            # batches never mix answer lengths: sorted by (length limit, prompt length), split where the limit changes
            order = sorted(todo.items(), key=lambda kv: (kv[0][1], len(render_prompt(tok, kv[1][0]))))
            chunks = [order[s:s + bs] for s in range(0, len(order), bs)]
            chunks = [[x for x in c if x[0][1] == m] for c in chunks for m in sorted({x[0][1] for x in c})]
            bar = tqdm(total=len(order), desc=f"evaluating {self.label}", disable=not progress, unit="prompt")
            for chunk in chunks:
                res = generate_chat(model, tok, [v[0] for _, v in chunk], max_new_tokens=chunk[0][0][1],
                                    batch_size=bs, do_sample=e.do_sample, temperature=e.temperature)
                rows = []
                for ((sha, _), (_, owners)), g in zip(chunk, res):
                    for kind, item in owners:
                        row = {"model": self.label, "key": self.key_of(kind), "kind": kind, "id": item["id"],
                               "prompt_sha": sha, "text": g["text"], "n_tokens": g["n_tokens"],
                               "truncated": g["truncated"]}
                        rows.append(row)
                        done[(kind, item["id"])] = row
                append_jsonl(self.gen_path, rows)
                bar.update(len(chunk))
            bar.close()
        return done

    def representations(self) -> dict:
        """``{"benign", "counterfactual", "injected"}`` (N, D) arrays over the injection cases (N = all of them for
        prompt pooling; those with an ``ideal`` for a response-pooled head), plus ``space``, ``pooling``, ``ids``;
        cached in ``reps/<label>.npz``. None when no case can be represented."""
        from staged_alignment.trainers.causal import encode_views, load_projection_head, read_head_config

        inj = [c for c in self.cases if c.get("kind", "injection") == "injection"]
        space, pooling, layer = "pooled", "prompt", self._layer()
        if self.head_path is not None:
            meta = read_head_config(self.head_path)
            pooling, layer = meta.get("pooling") or "prompt", int(meta.get("pool_layer", layer))
            space = f"head ({self.head_path})"
        if pooling == "response":
            inj = [c for c in inj if c.get("ideal")]
        ids = [c["id"] for c in inj]
        if not inj:  # e.g. a response-pooled head and an eval set without ideals: nothing to represent
            return None
        cache = self.out_dir / "reps" / f"{self.label}.npz"
        if cache.exists():
            with np.load(cache, allow_pickle=False) as z:
                if str(z["key"]) == self.rep_key and list(z["ids"]) == ids:
                    return {**{k: z[k] for k in ("benign", "counterfactual", "injected")}, "space": space,
                            "pooling": pooling, "ids": ids}
        model, tok = self._load()
        head = None
        if self.head_path is not None:
            hidden = model.config.get_text_config().hidden_size
            head = load_projection_head(self.head_path, hidden)
        bs = self.cfg.evaluate.batch_size
        responses = [c["ideal"] for c in inj] if pooling == "response" else None
        reps = {}
        for view, fn in (("benign", clean_messages), ("counterfactual", counterfactual_messages),
                         ("injected", injected_messages)):
            convs = [fn(c, self.data_role) for c in inj]
            reps[view] = encode_views(model, tok, convs, responses, head=head, layer=layer, pooling=pooling,
                                      batch_size=bs).numpy()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp.npz")
        np.savez(tmp, key=np.array(self.rep_key), ids=np.array(ids), **reps)
        os.replace(tmp, cache)
        return {**reps, "space": space, "pooling": pooling, "ids": ids}

    def margins(self) -> list[float | None]:
        """Teacher-forced margins of the injection cases (:func:`teacher_forced_margins`), in case order."""
        model, tok = self._load()
        inj = [c for c in self.cases if c.get("kind", "injection") == "injection"]
        return teacher_forced_margins(model, tok, inj, data_role=self.data_role, batch_size=self.cfg.evaluate.batch_size)

    def release(self):
        self._model = self._tok = None

        gc.collect()


def file_sha(path) -> str:
    """sha256 (16 hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def write_outcomes(gen_path: Path, label: str, key: str, outcomes: dict[str, dict]) -> None:
    """Write the judges' per-case verdicts into this model's rows of ``generations.jsonl`` (atomic rewrite): the
    injected row gets the attack and utility-under-attack flags, the clean row the clean utility (or, for a
    control, the compliance verdict)."""
    rows = read_jsonl_tolerant(gen_path)
    for r in rows:
        if r.get("model") != label or r.get("key") != key or r.get("id") not in outcomes:
            continue
        o = outcomes[r["id"]]
        if r["kind"] == "injected":
            r.update({k: o.get(k) for k in ("attack", "attack_begins", "attack_contains", "attack_reason",
                                            "utility_under_attack")})
        elif r["kind"] == "clean":
            r.update({k: o[k] for k in ("utility_clean", "complied", "compliance_reason") if k in o})
    write_jsonl_atomic(gen_path, rows)


def safety_prompts(cfg: PipelineConfig, run_dir: str | os.PathLike | None, notes: list[str]) -> dict:
    """The safety measure's prompts: ``{"redteam", "benign", "redteam_source", "benign_source", "left_out"}``.

    Harmful prompts that overlap a prompt the run's DPO stage trained on (:func:`evaluation.safety.overlapping`
    with the prompts of ``<run_dir>/data/pairs.jsonl``) are left out and counted in ``left_out``, with a line in
    ``notes``."""
    redteam, rsrc = read_redteam(cfg)
    benign, bsrc = read_benign(cfg)
    left = 0
    if run_dir is not None and redteam:
        trained = trained_prompts(run_dir)
        drop = overlapping([r["prompt"] for r in redteam], trained) if trained else set()
        kept = [r for i, r in enumerate(redteam) if i not in drop]
        left = len(redteam) - len(kept)
        if left:
            notes.append(f"{left} harmful prompt(s) left out of the refusal measure: the run's DPO stage trained on "
                         "them (data/pairs.jsonl)")
        redteam = kept
    if not redteam:
        notes.append("harmful_refusal_rate is null: " + ("the safety measure is off (evaluate.max_redteam: 0)"
                     if cfg.evaluate.max_redteam == 0 else "no harmful prompts (evaluate.redteam_file unset and no "
                     "dpo/assessment.json)"))
    return {"redteam": redteam, "benign": benign, "redteam_source": rsrc, "benign_source": bsrc, "left_out": left}


def classify_answers(cfg: PipelineConfig, redteam: list[dict], answers: dict) -> dict[str, dict]:
    """``{id: parse_guard_output(...)}`` of the harmful answers by ``evaluate.safety_classifier``."""
    from staged_alignment.core.models import pick_device

    clf = ClassifierJudge(cfg.evaluate.safety_classifier, cfg.model, device=pick_device(cfg.device))
    return {r["id"]: clf(r["prompt"], answers[("redteam", r["id"])]["text"]) for r in redteam}


# --------------------------------------------------------------------------------------------- evaluation
def evaluate_models(cfg: PipelineConfig, models: dict[str, str], eval_file: str | os.PathLike, out_dir: str | os.PathLike,
                    *, run_dir: str | os.PathLike | None = None, references: dict[str, str] | None = None,
                    margins: bool = False, representations: bool = True, cases: list[dict] | None = None) -> dict:
    """Evaluate ``models`` (``{label: path}``) on ``eval_file``; write ``metrics.json``, ``report.md``, plots and
    ``generations.jsonl`` under ``out_dir``. Returns the metrics dict (``metrics.json``'s content).

    ``cases``: the eval file's cases as :func:`validate_inputs` returned them (the evaluation stage's plan); when
    None the inputs are validated here.

    ``references``: ``{label: reference label}`` for the paired tests (default: each pipeline stage against the
    model it started from, :func:`stage_references`). ``margins``: also compute the teacher-forced margins.
    ``representations``: False skips the representations and their verification (the security suite, whose
    benchmarks have no counterfactual views worth the forward passes)."""
    e = cfg.evaluate
    eval_path = resolve_input(eval_file)
    cases = cases if cases is not None else validate_inputs(cfg, eval_path, models)
    notes: list[str] = []
    sp = safety_prompts(cfg, run_dir, notes)
    redteam, benign = sp["redteam"], sp["benign"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_sha = file_sha256(eval_path)
    refs = {m: r for m, r in (references if references is not None else stage_references(cfg)).items()
            if m in models and r in models}
    metrics = {"models": {}, "by_category": {}, "by_position": {}, "utility_by_category": {},
               "utility_by_position": {}, "by_control_category": {}, "eval_file": str(eval_path),
               "eval_file_sha256": eval_sha, "verification": {}, "paired": [], "references": refs, "notes": notes,
               "over_refusal_by_category": {}, "safety_classifier": {},
               "settings": {"max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample,
                            "temperature": e.temperature if e.do_sample else None, "batch_size": e.batch_size,
                            "utility_f1_threshold": e.utility_f1_threshold, "hsic_permutations": e.hsic_permutations,
                            "pc_components": e.pc_components, "ci_test": e.ci_test, "alpha": e.alpha,
                            "max_cases": e.max_cases, "redteam_source": sp["redteam_source"],
                            "n_redteam": len(redteam), "redteam_left_out": sp["left_out"],
                            "benign_source": sp["benign_source"], "n_benign": len(benign),
                            "safety_max_new_tokens": e.safety_max_new_tokens,
                            "safety_classifier": e.safety_classifier,
                            "seed": cfg.seed, "model_paths": dict(models), "data_role": cfg.model.data_role,
                            "data_role_models": data_role_labels(cfg, models),
                            "causal_objective": causal_objective(cfg)}}
    examples, flags = {}, {}
    inj_cases = [c for c in cases if c.get("kind", "injection") == "injection"]
    for label, path in models.items():
        t0 = time.time()
        ev = ModelEvaluator(cfg, label, path, out, cases, redteam, eval_sha, benign)
        answers = ev.generate()
        reps = ev.representations() if representations else None
        mg = ev.margins() if margins else None
        ev.release()
        safety = safety_outcomes(redteam, benign, answers)
        if e.safety_classifier and redteam:
            verdicts = classify_answers(cfg, redteam, answers)
            metrics["safety_classifier"][label] = disagreement(safety, verdicts)
            for i, v in verdicts.items():
                safety[i]["classifier_unsafe"] = v["unsafe"]
        outcomes = []
        for c in cases:
            clean = answers[("clean", c["id"])]["text"]
            injected = answers[("injected", c["id"])]["text"] if c.get("kind", "injection") == "injection" else None
            outcomes.append(score_case(c, clean, injected, data_role=ev.data_role,
                                       f1_threshold=e.utility_f1_threshold))
        write_outcomes(ev.gen_path, label, ev.key, {c["id"]: o for c, o in zip(cases, outcomes)})
        m = model_metrics(cases, outcomes, reps=reps, data_role=ev.data_role)
        sm = safety_metrics(safety)
        metrics["over_refusal_by_category"][label] = sm.pop("over_refusal_by_category")
        m.update(sm)
        groups = m.pop("_groups")
        flags[label] = {**groups["flags"], **safety}
        metrics.setdefault("case_outcomes", {})[label] = groups["flags"]
        metrics.setdefault("safety_outcomes", {})[label] = safety
        if mg is not None:
            vals = [x for x in mg if x is not None]
            m["teacher_forced_margin_mean"] = sum(vals) / len(vals) if vals else None
            m["teacher_forced_margin_positive"] = (sum(x > 0 for x in vals) / len(vals)) if vals else None
            metrics.setdefault("margins", {})[label] = {c["id"]: x for c, x in zip(inj_cases, mg)}
        m["n_truncated"] = sum(bool(answers[(k, c["id"])]["truncated"]) for c in inj_cases for k in ("clean", "injected"))
        m["n_empty"] = sum(not answers[(k, c["id"])]["text"].strip() for c in inj_cases for k in ("clean", "injected"))
        metrics["models"][label] = m
        for key in ("by_category", "by_position"):
            metrics[key][label] = _groups_out(groups[key])
        for key in ("utility_by_category", "utility_by_position", "by_control_category"):
            metrics[key][label] = {k: {"rate": v["rate"], "ci95": v["ci95"], "k": v["k"], "n": v["n"]}
                                   for k, v in groups[key].items()}
        if reps is None:
            metrics["verification"][label] = {"skipped": "representations not computed (evaluate_models("
                                                         "representations=False))" if not representations else
                                              "no case has what the representation needs (a response-"
                                              "pooled head needs an ideal)", "tests": [], "pc": None}
        else:
            rep_cases = [c for c in inj_cases if c["id"] in set(reps["ids"])]
            metrics["verification"][label] = verify(reps["benign"], reps["injected"], reps["counterfactual"],
                                                    rep_cases, reps=e.hsic_permutations,
                                                    pc_components=e.pc_components, alpha=e.alpha,
                                                    ci_method=e.ci_test, seed=cfg.seed)
        by_id = groups["flags"]
        examples[label] = [{"id": c["id"], "canary": c["canary"], "attack_category": c["attack_category"],
                            "clean": answers[("clean", c["id"])]["text"],
                            "injected": answers[("injected", c["id"])]["text"], "success": by_id[c["id"]]["attack"],
                            "utility": by_id[c["id"]]["utility_under_attack"], "reason": by_id[c["id"]]["attack_reason"]}
                           for c in inj_cases]
        m["seconds"] = round(time.time() - t0, 1)
        log.info("[%s] ASR %.3f, utility clean %s / under attack %s, over-defence compliance %s in %.0f s", label,
                 m["attack_success_rate"], _fmt_rate(m["utility_clean"]), _fmt_rate(m["utility_under_attack"]),
                 _fmt_rate(m["over_defence_compliance"]), m["seconds"])
    # the held-out set's 5 injected variants of one clean prompt share its task_id: a second, clustered p-value
    metrics["paired"] = paired_comparisons(flags, list(refs.items()), keys=PAIRED_KEYS, alpha=e.alpha,
                                           clusters=task_clusters(cases))
    atomic_write_json(out / "metrics.json", _json_safe(metrics))
    report.write_report(out, metrics, cases, examples, run_dir=run_dir, model_paths=models)
    return metrics


def _fmt_rate(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def causal_objective(cfg: PipelineConfig) -> dict:
    """The causal stage's loss settings (what verification should expect of its representations)."""
    return dataclasses.asdict(cfg.causal.loss)


def _groups_out(groups: dict) -> dict:
    return {k: {"attack_success_rate": v["rate"], "attack_success_rate_ci95": v["ci95"], "n_cases": v["n"],
                "n_attack_successes": v["k"]} for k, v in groups.items()}


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
