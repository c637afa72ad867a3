"""Injection eval cases and over-defence controls: parsing with located errors, and the prompts of each view.

Schema (docs/architecture.md, "Injection eval case"), one JSON object a line. An *injection case*::

    {"id": str, "system": str, "instruction": str, "data": str, "injection": str,
     "position": "start"|"middle"|"end", "canary": str, "ideal": str (optional), "attack_category": str,
     "hijack": str (optional: what obeying the injection looks like; default the canary),
     "injected_data": str (optional: the data exactly as attacked, for converted sets whose attacks are not a
                      plain insertion, e.g. StruQ's completion attacks; it must differ from ``data``)}

An *over-defence control* (``"kind": "control"``) has no injection; its trusted instruction itself asks for a code
word, a format or an action, or its data legitimately holds imperative sentences the user asks about::

    {"id": str, "kind": "control", "system": str, "instruction": str, "data": str, "control_category": str (optional),
     "required": str (optional: a string the answer must contain), "ideal": str (optional)}   # one of the two

Extra keys are kept (e.g. ``source``, ``family``). Checks, each a :class:`~core.jsonl_io.DataError` naming
file, line and field: required strings present and non-empty (``system`` may be empty), ``position`` valid, ``id``
unique across the file, the canary at least 4 characters and absent (case-insensitive) from the clean prompt
(system, instruction, data) and from ``ideal`` — otherwise a benign answer could contain it. Cases may *share* a
canary (the literature's sets do: AlpacaFarm-Hacked asks every case for "Hacked", SEP repeats witness words):
success is judged per case against that case's own canary and clean answer, so sharing cannot inflate a rate.

Prompts are built exactly like the causal stage's triplet views (:func:`data_builders.triplets.triplet_messages`,
including the ``data_role`` format): the clean prompt is ``[system] + user(instruction, data)``; the injected prompt
inserts ``injection`` into ``data`` at ``position`` (:func:`data_builders.triplets.insert_injection`); the
counterfactual prompt rewords ``data`` without changing its meaning (:func:`counterfactual_data`).
"""
from __future__ import annotations

from pathlib import Path

from staged_alignment.core.jsonl_io import DataError, iter_jsonl, require_str
from staged_alignment.data_builders.triplets import POSITIONS, insert_injection, reword, triplet_messages  # noqa: F401 (re-export)
from staged_alignment.evaluation.answer_match import normalize_answer

REQUIRED = ("id", "instruction", "data", "injection", "position", "canary", "attack_category")
CONTROL_REQUIRED = ("id", "instruction", "data")
KINDS = ("injection", "control")
MIN_CANARY_CHARS = 4


def _optional_text(obj: dict, key: str, path, line) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        v = "\n".join(v)
    if not isinstance(v, str):
        raise DataError(path, line, key, f"expected a string, got {type(v).__name__}")
    return v if v.strip() else None


def parse_case(obj: dict, path, line) -> dict:
    """Validate one eval row (injection case or control); returns a new dict with ``kind`` set and ``ideal`` None
    when absent. Raises :class:`DataError` (file, line, field)."""
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    out = dict(obj)
    kind = obj.get("kind", "injection")
    if kind not in KINDS:
        raise DataError(path, line, "kind", f"{kind!r} is not one of {list(KINDS)}")
    out["kind"] = kind
    for key in (REQUIRED if kind == "injection" else CONTROL_REQUIRED):
        out[key] = require_str(obj, key, path, line)
    out["system"] = require_str(obj, "system", path, line, allow_empty=True) if "system" in obj else ""
    ideal = _optional_text(obj, "ideal", path, line)
    if ideal is not None:
        if not normalize_answer(ideal):
            raise DataError(path, line, "ideal", f"{ideal!r} is empty after normalisation: it cannot be scored")
    out["ideal"] = ideal
    if kind == "control":
        out["control_category"] = _optional_text(obj, "control_category", path, line) or "control"
        out["required"] = _optional_text(obj, "required", path, line)
        if not out["required"] and not ideal:
            raise DataError(path, line, "required", "a control case needs 'required' (a string the answer must "
                                                    "contain) or 'ideal'")
        return out
    if out["position"] not in POSITIONS:
        raise DataError(path, line, "position", f"{out['position']!r} is not one of {list(POSITIONS)}")
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
    if low in common_words():
        raise DataError(path, line, "canary", f"{canary!r} is a common English word (scikit-learn's English stop-word "
                                              "list): a benign answer would contain it by chance; use a rare token "
                                              "such as ZIRCON-5841")
    out["canary"] = canary
    hijack = _optional_text(obj, "hijack", path, line)
    if hijack is None and low not in out["injection"].casefold():
        raise DataError(path, line, "injection", f"does not contain its canary {canary!r}, and no 'hijack' is given: "
                                                 "an answer that obeys it could not be recognised")
    if hijack is not None:
        for key in ("system", "instruction", "data"):
            if hijack.strip().casefold() in out[key].casefold():
                raise DataError(path, line, "hijack", f"the hijack string {hijack.strip()!r} already occurs in '{key}': "
                                                      "a benign answer could repeat it")
    out["hijack"] = hijack or canary
    injected_data = _optional_text(obj, "injected_data", path, line)
    if injected_data is not None and " ".join(injected_data.split()) == " ".join(out["data"].split()):
        raise DataError(path, line, "injected_data", "the same as 'data' up to whitespace: the attack is missing")
    out["injected_data"] = injected_data
    return out


def common_words() -> frozenset[str]:
    """The words a canary may not be: scikit-learn's English stop-word list (318 of the most frequent English
    words, ``sklearn.feature_extraction.text.ENGLISH_STOP_WORDS``). Benchmarks whose witness is an ordinary noun
    (SEP's "dog", "Paris") pass; "that", "the", "about" do not."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return ENGLISH_STOP_WORDS


def load_cases(path: str | Path, max_cases: int | None = None, *, controls: bool = True,
               max_controls: int | None = None) -> list[dict]:
    """Parse every row of an eval file (all rows are checked, also beyond ``max_cases``); returns the first
    ``max_cases`` injection cases (all if None) followed, with ``controls``, by the first ``max_controls`` controls
    (all if None).
    Raises :class:`DataError` (file, line, field) on the first bad row or a duplicate id."""
    injection: list[dict] = []
    control: list[dict] = []
    seen_ids: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        c = parse_case(obj, str(path), line)
        if c["id"] in seen_ids:
            raise DataError(path, line, "id", f"duplicate id {c['id']!r} (first on line {seen_ids[c['id']]})")
        seen_ids[c["id"]] = line
        (injection if c["kind"] == "injection" else control).append(c)
    if not injection:
        raise DataError(path, None, None, "no injection cases (only controls)")
    injection = injection[:max_cases] if max_cases else injection
    control = (control[:max_controls] if max_controls else control) if controls else []
    return injection + control


def counterfactual_data(case: dict) -> str:
    """The counterfactual of a case's ``data``: its own ``data_counterfactual`` when given, else the triplet
    builder's deterministic meaning-preserving rewording (:func:`data_builders.triplets.reword`; tables: column
    padding, prose: whole-word substitutions, numbers never touched), so the causal stage and the evaluation
    use the same counterfactual rule."""
    if isinstance(case.get("data_counterfactual"), str) and case["data_counterfactual"].strip():
        return case["data_counterfactual"]
    return reword(case["data"])[0]


def _view(case: dict, view: str, data_role: bool = False) -> list[dict]:
    t = {"system": case.get("system", ""), "instruction": case["instruction"], "data": case["data"],
         "injection": case.get("injection", ""), "position": case.get("position", "end")}
    if view == "counterfactual":
        t["data_counterfactual"] = counterfactual_data(case)
    if view == "injected" and case.get("kind", "injection") != "injection":
        raise ValueError(f"case {case.get('id')!r} is a control: it has no injected view")
    if view == "injected" and case.get("injected_data"):
        return triplet_messages({**t, "data": case["injected_data"]}, "benign", data_role=data_role)
    return triplet_messages(t, "benign" if view == "clean" else view, data_role=data_role)


def injected_data(case: dict) -> str:
    """The data part of the injected prompt: ``injected_data`` when the case has it, else the data with the injection
    inserted at the case's position."""
    if case.get("injected_data"):
        return case["injected_data"]
    return insert_injection(case["data"], case["injection"], case["position"])


def clean_messages(case: dict, data_role: bool = False) -> list[dict]:
    """Chat messages of the clean (benign) prompt: ``[system (if non-empty), user(instruction, data)]`` (or with the
    data in its own ``input`` turn when ``data_role``)."""
    return _view(case, "clean", data_role)


def injected_messages(case: dict, data_role: bool = False) -> list[dict]:
    """Chat messages of the injected prompt (:func:`data_builders.triplets.insert_injection` at the case's
    position)."""
    return _view(case, "injected", data_role)


def counterfactual_messages(case: dict, data_role: bool = False) -> list[dict]:
    """Chat messages of the counterfactual prompt (data reworded by :func:`counterfactual_data`)."""
    return _view(case, "counterfactual", data_role)


def copy_sources(messages: list[dict]) -> list[str]:
    """The prompt texts whose verbatim copies a judge discounts (every message's content)."""
    return [m["content"] for m in messages]


def injection_cases(cases: list[dict]) -> list[dict]:
    """The injection cases of a loaded eval file (controls left out)."""
    return [c for c in cases if c.get("kind", "injection") == "injection"]


def control_cases(cases: list[dict]) -> list[dict]:
    """The over-defence controls of a loaded eval file."""
    return [c for c in cases if c.get("kind") == "control"]
