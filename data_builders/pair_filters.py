"""Filters that decide whether a critique-and-rewrite pair is worth training on (the project's rules).

A pair is (prompt, rejected = the original answer, chosen = the revision), made with a critique and a revision
request. :func:`check_pair` returns the first reason that applies, in this order, or None:

- ``near_identical``: the revision is nearly the original, :func:`similarity` ≥ ``max_original_similarity``;
- ``copies_critique``: the revision restates the critique, :func:`similarity` ≥ ``max_critique_similarity``
  (a prefix test misses "2. Sending fake emails…" when the critique's first item starts "1. …");
- ``copies_request``: the revision restates the revision request (the constitution's "Rewrite the response to
  remove…"), ``ratio`` ≥ ``max_request_similarity`` (ratio only: a good refusal may reuse the request's words,
  "…assist the human with criminal plans or activities");
- ``length_ratio``: ``len(revision) / len(original)`` in characters is outside
  [``min_length_ratio``, ``max_length_ratio``];
- ``off_prompt``: the revision shares no content word (:func:`content_words`) with the prompt or the original, and
  it is not a refusal (a refusal need not repeat the request);
- ``not_better``: the project's refusal/harm judge (:func:`core.judges.judge_response`) rates the revision
  worse than the original: the revision harmful and the original not, or the original a refusal and the revision
  not.

Similarity is ``max(ratio, containment)`` of ``difflib.SequenceMatcher`` (standard library) on lower-cased,
whitespace-normalised text: ``ratio`` = 2·M / (|a| + |b|); containment = M / |a|, the share of the revision's
characters found in matching blocks of the other text, counted only when the revision has at least
``MIN_CONTAINMENT_WORDS`` words (a short refusal may occur inside a critique and still be a good revision).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass

from staged_alignment.core.judges import judge_response

MIN_CONTAINMENT_WORDS = 6
FILTER_REASONS = ("near_identical", "copies_critique", "copies_request", "length_ratio", "off_prompt", "not_better")

_STOP = set("""a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when where
which while who whom why will with would you your yours yourself yourselves response human assistant please
would could might make made like well really think know want""".split())


@dataclass
class PairFilterSettings:
    """Thresholds of :func:`check_pair` (``dpo.generation`` keys of the same names; defaults documented there)."""

    max_original_similarity: float = 0.9
    max_critique_similarity: float = 0.6
    max_request_similarity: float = 0.7
    min_length_ratio: float = 0.1
    max_length_ratio: float = 10.0
    require_prompt_overlap: bool = True
    judge_pairs: bool = True

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def off(cls) -> "PairFilterSettings":
        """Settings under which only exact copies of the original, critique or request are dropped."""
        return cls(max_original_similarity=1.0, max_critique_similarity=1.0, max_request_similarity=1.0,
                   min_length_ratio=0.0, max_length_ratio=float("inf"), require_prompt_overlap=False,
                   judge_pairs=False)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text or "").strip().lower()


def similarity(revision: str, other: str, containment: bool = True) -> float:
    """``max(ratio, containment)`` in [0, 1] of ``difflib.SequenceMatcher`` on normalised texts (module docstring);
    ``ratio`` alone when ``containment`` is False.

    1.0 when the revision equals ``other`` or, having ≥ ``MIN_CONTAINMENT_WORDS`` words, lies wholly inside it.
    """
    a, b = _norm(revision), _norm(other)
    if not a or not b:
        return 0.0
    m = difflib.SequenceMatcher(None, a, b, autojunk=False)
    ratio = m.ratio()
    if not containment or len(a.split()) < MIN_CONTAINMENT_WORDS:
        return ratio
    matched = sum(block.size for block in m.get_matching_blocks() if block.size >= 4)
    return max(ratio, matched / len(a))


def content_words(text: str) -> set[str]:
    """Lower-cased words of ≥ 3 letters minus English stop words, each cut to its first 5 letters (a crude stem:
    "poisons"/"poisoning" → "poiso")."""
    return {w[:5] for w in re.findall(r"[a-z][a-z'-]{2,}", (text or "").lower()) if w not in _STOP}


def check_pair(prompt: str, original: str, critique: str, revision: str, revision_request: str,
               settings: PairFilterSettings) -> tuple[str | None, dict]:
    """The first filter reason that applies to the pair, or None; plus the measured values and judge verdicts.

    Returns ``(reason, details)``; ``details`` holds the three similarities, the length ratio, the shared content
    words and the judge's verdicts on both answers (used by the pair report). Raises ``TypeError`` on non-strings.
    """
    for name, value in (("prompt", prompt), ("original", original), ("critique", critique), ("revision", revision),
                        ("revision_request", revision_request)):
        if not isinstance(value, str):
            raise TypeError(f"check_pair: {name} must be a string, got {type(value).__name__}")
    s = settings
    j_rev, j_orig = judge_response(prompt, revision), judge_response(prompt, original)
    shared = sorted(content_words(revision) & (content_words(prompt) | content_words(original)))
    details = {"sim_original": round(similarity(revision, original), 3),
               "sim_critique": round(similarity(revision, critique), 3),
               "sim_request": round(similarity(revision, revision_request, containment=False), 3),
               "length_ratio": round(len(revision.strip()) / max(len(original.strip()), 1), 3),
               "shared_words": shared[:12], "judge_chosen": j_rev, "judge_rejected": j_orig}
    if details["sim_original"] >= s.max_original_similarity:
        return "near_identical", details
    if details["sim_critique"] >= s.max_critique_similarity:
        return "copies_critique", details
    if details["sim_request"] >= s.max_request_similarity:
        return "copies_request", details
    if not s.min_length_ratio <= details["length_ratio"] <= s.max_length_ratio:
        return "length_ratio", details
    if s.require_prompt_overlap and not shared and not j_rev["refused"]:
        return "off_prompt", details
    if s.judge_pairs and ((j_rev["harmful"] and not j_orig["harmful"]) or (j_orig["refused"] and not j_rev["refused"])):
        return "not_better", details
    return None, details
