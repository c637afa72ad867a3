"""Injection eval cases: parsing with located errors, and the clean / injected / counterfactual prompts.

Schema (ARCHITECTURE.md, "Injection eval case"), one JSON object a line::

    {"id": str, "system": str, "instruction": str, "data": str, "injection": str,
     "position": "start"|"middle"|"end", "canary": str, "ideal": str (optional), "attack_category": str}

Extra keys are kept (e.g. ``source``). Checks, each a :class:`~data_builders.jsonl_io.DataError` naming file,
line and field: required strings present and non-empty (``system`` may be empty), ``position`` valid, ``id`` and
``canary`` unique across the file, the canary at least 4 characters and absent (case-insensitive) from the
clean prompt (system, instruction, data) and from ``ideal`` — otherwise a benign answer could contain it and
the canary judge would count a success that is not one.

Prompts are built exactly like the causal stage's triplet views (:func:`data_builders.triplets.triplet_messages`):
the clean prompt is ``[system] + user(user_turn(instruction, data))``; the injected prompt inserts ``injection``
into ``data`` at ``position`` (:func:`data_builders.triplets.insert_injection`); the counterfactual prompt rewords
``data`` without changing its meaning (:func:`counterfactual_data`).
"""
from __future__ import annotations

from pathlib import Path

from data_builders.jsonl_io import DataError, iter_jsonl, require_str
from data_builders.triplets import POSITIONS, insert_injection, reword, triplet_messages  # noqa: F401 (re-export)

REQUIRED = ("id", "instruction", "data", "injection", "position", "canary", "attack_category")
MIN_CANARY_CHARS = 4


def parse_case(obj: dict, path, line) -> dict:
    """Validate one eval case row; returns a new dict (``ideal`` None when absent). Raises :class:`DataError`."""
    out = dict(obj)
    for key in REQUIRED:
        out[key] = require_str(obj, key, path, line)
    out["system"] = require_str(obj, "system", path, line, allow_empty=True) if "system" in obj else ""
    if out["position"] not in POSITIONS:
        raise DataError(path, line, "position", f"{out['position']!r} is not one of {list(POSITIONS)}")
    ideal = obj.get("ideal")
    if ideal is not None:
        if isinstance(ideal, list) and all(isinstance(x, str) for x in ideal):
            ideal = "\n".join(ideal)
        if not isinstance(ideal, str):
            raise DataError(path, line, "ideal", f"expected a string, got {type(ideal).__name__}")
        ideal = ideal if ideal.strip() else None
    out["ideal"] = ideal
    canary = out["canary"].strip()
    if len(canary) < MIN_CANARY_CHARS:
        raise DataError(path, line, "canary", f"{canary!r} is shorter than {MIN_CANARY_CHARS} characters; "
                                              "a short canary can occur by chance in a benign answer")
    low = canary.casefold()
    for key in ("system", "instruction", "data"):
        if low in out[key].casefold():
            raise DataError(path, line, "canary", f"the canary {canary!r} already occurs in '{key}': a benign "
                                                  "answer could repeat it")
    if ideal and low in ideal.casefold():
        raise DataError(path, line, "canary", f"the canary {canary!r} occurs in 'ideal'")
    out["canary"] = canary
    return out


def load_cases(path: str | Path, max_cases: int | None = None) -> list[dict]:
    """Parse every row of an eval file (all rows are checked, also beyond ``max_cases``); returns the first
    ``max_cases`` (all if None). Raises :class:`DataError` (file, line, field) on the first bad row."""
    cases: list[dict] = []
    seen_ids: dict[str, int] = {}
    seen_canaries: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        c = parse_case(obj, str(path), line)
        if c["id"] in seen_ids:
            raise DataError(path, line, "id", f"duplicate id {c['id']!r} (first on line {seen_ids[c['id']]})")
        key = c["canary"].casefold()
        if key in seen_canaries:
            raise DataError(path, line, "canary", f"canary {c['canary']!r} is also used on line {seen_canaries[key]}; "
                                                  "each case needs its own so another case's canary never counts")
        seen_ids[c["id"]], seen_canaries[key] = line, line
        cases.append(c)
    return cases[:max_cases] if max_cases else cases


def counterfactual_data(case: dict) -> str:
    """The counterfactual of a case's ``data``: its own ``data_counterfactual`` when given, else the triplet
    builder's deterministic meaning-preserving rewording (:func:`data_builders.triplets.reword`; tables: column
    padding, prose: whole-word substitutions, numbers never touched), so the causal stage and the evaluation
    use the same counterfactual rule."""
    if isinstance(case.get("data_counterfactual"), str) and case["data_counterfactual"].strip():
        return case["data_counterfactual"]
    return reword(case["data"])[0]


def _view(case: dict, view: str) -> list[dict]:
    t = {"system": case.get("system", ""), "instruction": case["instruction"], "data": case["data"],
         "injection": case["injection"], "position": case["position"]}
    if view == "counterfactual":
        t["data_counterfactual"] = counterfactual_data(case)
    return triplet_messages(t, "benign" if view == "clean" else view)


def clean_messages(case: dict) -> list[dict]:
    """Chat messages of the clean (benign) prompt: ``[system (if non-empty), user(instruction, data)]``."""
    return _view(case, "clean")


def injected_messages(case: dict) -> list[dict]:
    """Chat messages of the injected prompt (:func:`data_builders.triplets.insert_injection` at the case's
    position)."""
    return _view(case, "injected")


def counterfactual_messages(case: dict) -> list[dict]:
    """Chat messages of the counterfactual prompt (data reworded by :func:`counterfactual_data`)."""
    return _view(case, "counterfactual")
