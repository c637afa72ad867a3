"""Tokenized triplets, cached with ``datasets``, and the collator that stacks the three views into one batch.

:func:`build_token_cache` tokenizes ``data/triplets.jsonl`` once: ``Dataset.from_list(rows).map(tokenize,
new_fingerprint=fp, cache_file_name=<cache_dir>/triplets-<fp>.arrow)``. The fingerprint ``fp`` is the sha256 of
the triplet file's bytes, the tokenizer (its full serialisation for fast tokenizers — vocabulary, merges,
normalizer, pre-tokenizer, added tokens — or the sorted vocabulary otherwise, plus the special tokens), the chat
template string, ``max_length`` and :data:`CACHE_VERSION`; a change to any of them (e.g. a different template)
re-tokenizes, and a repeated build loads the Arrow file without calling the map function.

Columns per triplet (prompt = the chat-template generation prompt, ending in ``<|assistant|>\\n``; response = the
triplet's ``response`` tokens followed by ``eos``, exactly what the model would generate after the prompt):

* ``benign_input_ids``, ``counterfactual_input_ids``, ``injected_input_ids``: prompt + response token ids;
* ``benign_labels``, ``counterfactual_labels``, ``injected_labels``: the same length, -100 on the prompt, the
  token id on the response (so the labels mask exactly the response tokens);
* ``id``, ``fits`` (all three sequences ≤ ``max_length``). Triplets that do not fit are dropped, never truncated
  (a truncated prompt would cut the data or the ``<|assistant|>`` marker); their number is reported;
* ``length``: the longest of the three views in tokens, the length the collator pads the triplet to. The
  Trainer's ``train_sampling_strategy: group_by_length`` reads it (``length_column_name`` default) to put
  triplets of similar length in one batch (less padding; see ``bench/README.md``).

:class:`TripletCollator` pads the three views of B triplets to one length L and returns one (3B, L) batch:
rows [0:B] benign, [B:2B] counterfactual, [2B:3B] injected, with ``attention_mask``, ``position_ids`` (counted
over real tokens, so left and right padding give the same positions), ``pool_mask`` (1 on prompt tokens, the
positions that are mean-pooled) and ``labels`` (3B, L): the benign rows' response tokens, the injected rows'
too when ``injected_lm_loss``; everything else -100.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from data_builders.chat_template import prompt_ids
from data_builders.jsonl_io import DataError
from data_builders.triplets import read_triplets, triplet_messages

log = logging.getLogger(__name__)

CACHE_VERSION = "triplet-tokens-v2"  # bump when the tokenize function changes
VIEWS = ("benign", "counterfactual", "injected")


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


def cache_fingerprint(triplets_path: str | Path, tokenizer, max_length: int) -> str:
    """sha256 of (triplet file bytes, tokenizer, chat template, max_length, :data:`CACHE_VERSION`)."""
    h = hashlib.sha256()
    for part in (Path(triplets_path).read_bytes(), tokenizer_fingerprint_bytes(tokenizer),
                 (tokenizer.chat_template or "").encode("utf-8"), str(int(max_length)).encode(),
                 CACHE_VERSION.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def tokenize_triplet(row: dict, tokenizer, max_length: int) -> dict:
    """Token ids and labels of the three views of one triplet (see the module docstring)."""
    response_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    out = {}
    lengths = []
    for view in VIEWS:
        p = prompt_ids(tokenizer, triplet_messages(row, view))
        ids = p + response_ids
        out[f"{view}_input_ids"] = ids
        out[f"{view}_labels"] = [-100] * len(p) + list(response_ids)
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


def build_token_cache(triplets_path: str | Path, tokenizer, max_length: int, cache_dir: str | Path):
    """Tokenize (or load from the cache) the triplets; returns ``(Dataset of fitting rows, CacheInfo)``.

    Raises :class:`DataError` if the triplet file is invalid or no triplet fits in ``max_length`` tokens.
    """
    from datasets import Dataset

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs an eos token")
    triplets_path = Path(triplets_path)
    rows = read_triplets(triplets_path)
    fp = cache_fingerprint(triplets_path, tokenizer, max_length)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"triplets-{fp[:16]}.arrow"
    from_cache = cache_file.exists()
    keep_cols = {"id"}
    ds = Dataset.from_list(rows)
    ds = ds.map(_MapFn(tokenizer, max_length), new_fingerprint=fp[:32], cache_file_name=str(cache_file),
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

    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, row):
        _MapFn.CALLS += 1
        return tokenize_triplet(row, self.tokenizer, self.max_length)


class TripletCollator:
    """Pads the three views of B triplets to one (3B, L) batch (layout in the module docstring).

    Args:
        pad_token_id: id used for padding (masked everywhere).
        padding_side: ``right`` or ``left``.
        injected_lm_loss: also put the injected rows' response tokens in ``labels``.
        pad_to_multiple_of: round L up to a multiple (GPU efficiency).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", injected_lm_loss: bool = False,
                 pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id, self.padding_side = pad_token_id, padding_side
        self.injected_lm_loss, self.pad_to_multiple_of = injected_lm_loss, pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs, labs, lm = [], [], []
        for view in VIEWS:
            for f in features:
                seqs.append(list(f[f"{view}_input_ids"]))
                labs.append(list(f[f"{view}_labels"]))
                lm.append(view == "benign" or (view == "injected" and self.injected_lm_loss))
        L = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            L = (L + m - 1) // m * m
        n = len(seqs)
        input_ids = torch.full((n, L), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, L), dtype=torch.long)
        labels = torch.full((n, L), -100, dtype=torch.long)
        pool = torch.zeros((n, L), dtype=torch.long)
        for r, (s, lab, use) in enumerate(zip(seqs, labs, lm)):
            k = len(s)
            sl = slice(L - k, L) if self.padding_side == "left" else slice(0, k)
            input_ids[r, sl] = torch.tensor(s, dtype=torch.long)
            attention[r, sl] = 1
            lab_t = torch.tensor(lab, dtype=torch.long)
            pool[r, sl] = (lab_t == -100).long()
            if use:
                labels[r, sl] = lab_t
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids,
                "labels": labels, "pool_mask": pool}
