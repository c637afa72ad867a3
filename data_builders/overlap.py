"""Train/evaluation disjointness: normalised text and word n-gram overlap (not only exact strings).

A held-out set only measures generalisation if nothing the model trained on reappears in it. Exact-string checks
miss the common leaks: an attack with an appended clause, a changed canary, other casing or spacing, a context
reused with another question. Texts are therefore compared as sets of word n-grams after :func:`normalise` (NFKC,
case folding, canaries and ``{canary}`` slots masked to one placeholder, punctuation dropped, whitespace collapsed):

* :func:`shared_ngrams` — the n-grams two texts share;
* :func:`find_overlaps` — for each text of one collection, the texts of another collection it shares at least one
  n-gram with (an inverted index, so thousands of texts compare in well under a second).

The causal stage refuses training attacks or tasks that share an ``ATTACK_NGRAM``-gram (attacks) or a
``DATA_NGRAM``-gram (data parts) with the evaluation set (:func:`data_builders.triplets.check_attack_overlap`,
:func:`data_builders.triplets.check_task_overlap`); ``tests/test_heldout.py`` applies the same rules to the shipped
held-out set.
"""
from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from typing import Iterable, Sequence

ATTACK_NGRAM = 6
DATA_NGRAM = 8
CANARY_RE = re.compile(r"\{canary\}|\b[A-Z][A-Z0-9]{2,}(?:-[A-Z0-9]+)*-\d{2,}\b")
_WORDS = re.compile(r"[^\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """NFKC, canaries (``WORD-NNN…``) and ``{canary}`` slots → ``<c>``, case-folded, punctuation → space."""
    t = unicodedata.normalize("NFKC", text or "")
    t = CANARY_RE.sub(" canaryslot ", t)
    return " ".join(_WORDS.findall(t.casefold()))


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of :func:`normalise` (``text``); a text shorter than n words gives its whole word tuple."""
    w = normalise(text).split()
    if not w:
        return set()
    if len(w) < n:
        return {tuple(w)}
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def shared_ngrams(a: str, b: str, n: int) -> set[tuple[str, ...]]:
    """The word n-grams ``a`` and ``b`` share (after :func:`normalise`)."""
    return ngrams(a, n) & ngrams(b, n)


def find_overlaps(texts: Sequence[str], others: Sequence[str], n: int) -> dict[int, list[int]]:
    """``{i: [j, …]}``: the indices j of ``others`` that share a word n-gram with ``texts[i]`` (only i with a hit)."""
    index: dict[tuple, list[int]] = defaultdict(list)
    for j, t in enumerate(others):
        for g in ngrams(t, n):
            index[g].append(j)
    out: dict[int, list[int]] = {}
    for i, t in enumerate(texts):
        hits = sorted({j for g in ngrams(t, n) for j in index.get(g, ())})
        if hits:
            out[i] = hits
    return out


def canary_words(canaries: Iterable[str]) -> set[str]:
    """The alphabetic words of canaries (``MAPLE-123`` → ``maple``), to compare canary vocabularies."""
    return {w for c in canaries for w in re.findall(r"[A-Za-z]{3,}", c.casefold())}
