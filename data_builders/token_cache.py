"""Tokenized triplets, cached with ``datasets``, and the collator that stacks the views of a batch.

:func:`build_token_cache` tokenizes ``data/triplets.jsonl`` once: ``Dataset.from_list(rows).map(tokenize,
new_fingerprint=fp, cache_file_name=<cache_dir>/triplets-<fp>.arrow)``. The fingerprint ``fp`` is the sha256 of
the triplet file's bytes, the tokenizer (its full serialisation for fast tokenizers — vocabulary, merges,
normalizer, pre-tokenizer, added tokens — or the sorted vocabulary otherwise, plus the special tokens), the chat
template string, the data-role switch, ``max_length`` and :data:`CACHE_VERSION`; a change to any of them (e.g. a
different template) re-tokenizes, and a repeated build loads the Arrow file without calling the map function.

Four sequences per triplet, each a prompt (the chat-template generation prompt, ending in ``<|assistant|>\\n``)
followed by a response and ``eos``, tokenized *jointly* (:func:`core.chat_template.prompt_response_ids`, so
the response's first token is the one the model sees at generation time, also for SentencePiece tokenizers):

* ``benign``, ``counterfactual``, ``injected``: the three prompts of the triplet + its ``target`` y;
* ``hijack``: the injected prompt + the ``hijack`` response y_a (what obeying the injection looks like).

Columns: ``<view>_input_ids`` and ``<view>_labels`` (-100 on the prompt, the token id on the response), ``id``,
``fits`` (all four ≤ ``max_length``; triplets that do not fit are dropped, never truncated, and counted) and
``length`` (the longest of the four, which the Trainer's ``group_by_length`` sampler reads).

Retention (``causal.loss.lambda_retain_sft`` / ``lambda_retain_dpo``): :func:`tokenize_retention_pairs` tokenizes
the DPO stage's preference pairs the same way and :func:`attach_retention` gives every triplet one of them (a seeded
permutation, cycled), as the views ``retain_chosen`` and ``retain_rejected``; the replay is then part of each
example, so sharding, accumulation and resume treat it like the triplet itself.

:class:`TripletCollator` pads the views a loss needs (:func:`core.causal_objective.needed_views`) of B triplets to one length L and
returns one (V·B, L) batch: rows ``[v·B:(v+1)·B]`` hold view ``views[v]``, with ``attention_mask``,
``position_ids`` (counted over real tokens, so left and right padding give the same positions), ``pool_mask`` (1
on prompt tokens), ``response_mask`` (1 on response tokens, every view) and ``labels`` (the response tokens of the
views in ``lm_views``, -100 everywhere else).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from staged_alignment.core.chat_template import prompt_response_ids
from staged_alignment.core.jsonl_io import DataError
from staged_alignment.data_builders.triplets import read_triplets, triplet_messages

log = logging.getLogger(__name__)

CACHE_VERSION = "triplet-tokens-v3-joint"  # bump when the tokenize function changes
VIEWS = ("benign", "counterfactual", "injected", "hijack")
RETAIN_VIEWS = ("retain_chosen", "retain_rejected")  # a replayed DPO-stage pair: prompt + chosen, prompt + rejected


def tokenizer_fingerprint_bytes(tokenizer) -> bytes:
    """Bytes identifying the tokenizer's behaviour (not its folder): serialisation or vocabulary + specials."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    specials = json.dumps({"special": tokenizer.special_tokens_map, "eos_id": tokenizer.eos_token_id,
                           "pad_id": tokenizer.pad_token_id, "class": type(tokenizer).__name__},
                          sort_keys=True, default=str)
    return body.encode("utf-8") + b"\0" + specials.encode("utf-8")


def cache_fingerprint(triplets_path: str | Path, tokenizer, max_length: int, data_role: bool = False) -> str:
    """sha256 of (triplet file bytes, tokenizer, chat template, data role, max_length, :data:`CACHE_VERSION`)."""
    h = hashlib.sha256()
    for part in (Path(triplets_path).read_bytes(), tokenizer_fingerprint_bytes(tokenizer),
                 (tokenizer.chat_template or "").encode("utf-8"), str(int(max_length)).encode(),
                 f"data_role={bool(data_role)}".encode(), CACHE_VERSION.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def tokenize_triplet(row: dict, tokenizer, max_length: int, data_role: bool = False) -> dict:
    """Token ids and labels of the four sequences of one triplet (see the module docstring)."""
    out = {}
    lengths = []
    for field in ("target", "hijack"):
        if not row.get(field):
            raise ValueError(f"triplet {row.get('id')!r} has no {field} yet (fill it with data_builders.causal_targets)")
    for view in VIEWS:
        prompt_view = "injected" if view == "hijack" else view
        response = row["hijack"] if view == "hijack" else row["target"]
        ids, n_prompt = prompt_response_ids(tokenizer, triplet_messages(row, prompt_view, data_role=data_role), response)
        out[f"{view}_input_ids"] = ids
        out[f"{view}_labels"] = [-100] * n_prompt + ids[n_prompt:]
        lengths.append(len(ids))
    out["length"] = max(lengths)
    out["fits"] = out["length"] <= max_length
    return out


@dataclass
class CacheInfo:
    fingerprint: str
    cache_file: str
    from_cache: bool
    n_total: int
    n_kept: int
    n_too_long: int


def build_token_cache(triplets_path: str | Path, tokenizer, max_length: int, cache_dir: str | Path,
                      data_role: bool = False):
    """Tokenize (or load from the cache) the triplets; returns ``(Dataset of fitting rows, CacheInfo)``.

    Raises :class:`DataError` if the triplet file is invalid, a triplet has no target, or no triplet fits in
    ``max_length`` tokens.
    """
    from datasets import Dataset

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs an eos token")
    triplets_path = Path(triplets_path)
    rows = read_triplets(triplets_path)
    for i, r in enumerate(rows):
        for field in ("target", "hijack"):
            if not r[field]:
                raise DataError(triplets_path, i + 1, field, "empty: the starting model's answer was never generated "
                                                             "(data_builders.causal_targets.fill_generated)")
    fp = cache_fingerprint(triplets_path, tokenizer, max_length, data_role)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"triplets-{fp[:16]}.arrow"
    from_cache = cache_file.exists()
    keep_cols = {"id"}
    ds = Dataset.from_list(rows)
    ds = ds.map(_MapFn(tokenizer, max_length, data_role), new_fingerprint=fp[:32], cache_file_name=str(cache_file),
                load_from_cache_file=True, remove_columns=[c for c in ds.column_names if c not in keep_cols],
                desc="tokenizing triplets")
    fits = ds["fits"][:]  # one Arrow read; iterating the lazy Column formats row by row (~40 µs a row)
    kept = [i for i, f in enumerate(fits) if f]
    info = CacheInfo(fingerprint=fp, cache_file=str(cache_file), from_cache=from_cache, n_total=len(rows),
                     n_kept=len(kept), n_too_long=len(rows) - len(kept))
    if not kept:
        raise DataError(triplets_path, None, None, f"none of the {len(rows)} triplets fits in max_length="
                                                   f"{max_length} tokens (prompt + response)")
    if info.n_too_long:
        log.warning("dropped %d of %d triplets longer than %d tokens", info.n_too_long, len(rows), max_length)
    if len(kept) < len(rows):
        ds = ds.select(kept, keep_in_memory=True)
    return ds, info


class _MapFn:
    """The ``datasets.map`` function (a class so tests can count calls through :data:`CALLS`)."""

    CALLS = 0

    def __init__(self, tokenizer, max_length, data_role=False):
        self.tokenizer, self.max_length, self.data_role = tokenizer, max_length, data_role

    def __call__(self, row):
        _MapFn.CALLS += 1
        return tokenize_triplet(row, self.tokenizer, self.max_length, self.data_role)


def tokenize_retention_pairs(pairs: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Token ids and labels of preference pairs (``{"prompt": messages, "chosen": [assistant message] | str,
    "rejected": …}``, the DPO stage's ``data/pairs.jsonl`` rows) as the views ``retain_chosen`` and
    ``retain_rejected``, each the prompt followed by the answer and eos, tokenized jointly like the triplets.
    Returns ``(rows, n_too_long)``: pairs with a sequence over ``max_length`` are dropped and counted."""
    rows, too_long = [], 0
    for p in pairs:
        row, fits = {}, True
        for view, key in zip(RETAIN_VIEWS, ("chosen", "rejected")):
            answer = p[key][-1]["content"] if isinstance(p[key], list) else p[key]
            ids, n_prompt = prompt_response_ids(tokenizer, list(p["prompt"]), answer)
            fits = fits and len(ids) <= max_length
            row[f"{view}_input_ids"] = ids
            row[f"{view}_labels"] = [-100] * n_prompt + ids[n_prompt:]
        if fits:
            rows.append(row)
        else:
            too_long += 1
    return rows, too_long


def attach_retention(ds, rows: list[dict], seed: int):
    """``ds`` with the retention views of one pair per example: example i gets ``rows[order[i mod len(rows)]]``,
    ``order`` a permutation seeded by ``seed``; ``length`` becomes the longest of all views. Raises
    ``ValueError`` for an empty ``rows``."""
    if not rows:
        raise ValueError("no retention pair to attach")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)

    def add(ex, i):
        r = rows[order[i % len(rows)]]
        return {**r, "length": max(ex["length"], *(len(r[f"{v}_input_ids"]) for v in RETAIN_VIEWS))}

    return ds.map(add, with_indices=True, keep_in_memory=True, desc="attaching retention pairs")


class TripletCollator:
    """Pads the chosen views of B triplets to one (V·B, L) batch (layout in the module docstring).

    Args:
        pad_token_id: id used for padding (masked everywhere).
        padding_side: ``right`` or ``left``.
        views: the views to stack, in order (default benign, counterfactual, injected: the seed's three).
        lm_views: the views whose response tokens go into ``labels`` (default: benign only).
        pad_to_multiple_of: round L up to a multiple (GPU efficiency).
    Raises ``ValueError`` for an unknown view or padding side, or an LM view that is not stacked.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", views=("benign", "counterfactual", "injected"),
                 lm_views=("benign",), pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        bad = [v for v in views if v not in VIEWS + RETAIN_VIEWS] + [v for v in lm_views if v not in VIEWS]
        if bad or not views or set(lm_views) - set(views):
            raise ValueError(f"views {list(views)} / lm_views {list(lm_views)}: use views of "
                             f"{list(VIEWS + RETAIN_VIEWS)}, the LM views among the triplet views {list(VIEWS)}")
        self.pad_token_id, self.padding_side = pad_token_id, padding_side
        self.views, self.lm_views = list(views), list(lm_views)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs, labs, lm = [], [], []
        for view in self.views:
            for f in features:
                seqs.append(list(f[f"{view}_input_ids"]))
                labs.append(list(f[f"{view}_labels"]))
                lm.append(view in self.lm_views)
        L = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            L = (L + m - 1) // m * m
        n = len(seqs)
        input_ids = torch.full((n, L), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, L), dtype=torch.long)
        labels = torch.full((n, L), -100, dtype=torch.long)
        pool = torch.zeros((n, L), dtype=torch.long)
        resp = torch.zeros((n, L), dtype=torch.long)
        for r, (s, lab, use) in enumerate(zip(seqs, labs, lm)):
            k = len(s)
            sl = slice(L - k, L) if self.padding_side == "left" else slice(0, k)
            input_ids[r, sl] = torch.tensor(s, dtype=torch.long)
            attention[r, sl] = 1
            lab_t = torch.tensor(lab, dtype=torch.long)
            pool[r, sl] = (lab_t == -100).long()
            resp[r, sl] = (lab_t != -100).long()
            if use:
                labels[r, sl] = lab_t
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids,
                "labels": labels, "pool_mask": pool, "response_mask": resp}
