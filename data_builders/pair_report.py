"""``dpo/pairs_report.md``: what critique-and-rewrite produced and why pairs were kept or dropped.

Counts by reason and by principle, ten accepted and ten rejected examples side by side (prompt, original,
critique, revision) with the filter measurements and the refusal/harm judge's verdict on each answer
(:func:`data_builders.pair_filters.check_pair`, recomputed here for accepted pairs: it is deterministic).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from staged_alignment.core.jsonl_io import atomic_write_text, read_jsonl_tolerant
from staged_alignment.core.markdown import md_escape
from staged_alignment.data_builders.constitution import Constitution
from staged_alignment.data_builders.critique_rewrite import default_side_paths
from staged_alignment.data_builders.pair_filters import PairFilterSettings, check_pair

EXAMPLES = 10


def pair_filter_settings(gen) -> PairFilterSettings:
    """The filter thresholds of a ``dpo.generation`` section (:class:`core.config.GenerationSection`)."""
    return PairFilterSettings(**{k: getattr(gen, k) for k in PairFilterSettings.__dataclass_fields__})


def _cell(text, limit: int = 220) -> str:
    """Model-written text as one safe table cell (:func:`core.markdown.md_escape`)."""
    return md_escape(" ".join(str(text or "").split()), max_chars=limit)


def _verdict(j: dict | None) -> str:
    if not j:
        return "—"
    return "refusal" if j.get("refused") else ("harmful" if j.get("harmful") else "neither")


def pairs_report(pairs_path: str | Path, constitution: Constitution, settings: PairFilterSettings) -> str:
    """The report's Markdown for the accepted ``pairs_path`` and its ``<stem>.rejected.jsonl``."""
    pairs_path = Path(pairs_path)
    rejected_path = default_side_paths(pairs_path)[0]
    acc = read_jsonl_tolerant(pairs_path) if pairs_path.exists() else []
    rej = read_jsonl_tolerant(rejected_path) if rejected_path.exists() else []
    principles = {p.id: p for p in constitution.principles}
    by_reason = Counter(r.get("reason", "?") for r in rej)
    by_principle: dict[str, Counter] = {}
    for r in acc:
        by_principle.setdefault(r.get("principle_id", "?"), Counter())["accepted"] += 1
    for r in rej:
        by_principle.setdefault(r.get("principle_id", "?"), Counter())["rejected"] += 1
    n = len(acc) + len(rej)
    out = [f"# Preference pairs: {len(acc)} accepted, {len(rej)} rejected of {n}", "",
           f"Pairs: `{pairs_path}`; rejected: `{rejected_path}`. Filters (`data_builders/pair_filters.py`): "
           + ", ".join(f"{k}={v}" for k, v in settings.as_dict().items()) + ".", "",
           "## Rejected by reason", "", "| reason | pairs |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1])] or ["| — | 0 |"]
    out += ["", "## By principle", "", "| principle | accepted | rejected |", "|---|---|---|"]
    out += [f"| {k} | {c['accepted']} | {c['rejected']} |" for k, c in sorted(by_principle.items())]
    head = ("| id | prompt | original (rejected) | critique | revision (chosen) | measured | judge: original / "
            "revision |")
    out += ["", f"## Accepted (first {EXAMPLES})", "", head, "|---|---|---|---|---|---|---|"]
    for r in acc[:EXAMPLES]:
        prompt = r["prompt"][-1]["content"]
        original, revision = r["rejected"][0]["content"], r["chosen"][0]["content"]
        req = principles[r["principle_id"]].revision if r.get("principle_id") in principles else ""
        _, d = check_pair(prompt, original, r.get("critique", ""), revision, req, settings)
        out.append(f"| {r['id']} | {_cell(prompt)} | {_cell(original)} | {_cell(r.get('critique'))} | "
                   f"{_cell(revision)} | sim orig {d['sim_original']}, crit {d['sim_critique']}, req "
                   f"{d['sim_request']}, len× {d['length_ratio']} | {_verdict(d['judge_rejected'])} / "
                   f"{_verdict(d['judge_chosen'])} |")
    out += ["", f"## Rejected (first {EXAMPLES})", "",
            "| id | reason | prompt | original | critique | revision | measured | judge: original / revision |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rej[:EXAMPLES]:
        d = r.get("filter") or {}
        measured = (f"sim orig {d.get('sim_original')}, crit {d.get('sim_critique')}, req {d.get('sim_request')}, "
                    f"len× {d.get('length_ratio')}" if d else "—")
        out.append(f"| {r['id']} | {r.get('reason')} | {_cell(r.get('prompt'))} | {_cell(r.get('response'))} | "
                   f"{_cell(r.get('critique'))} | {_cell(r.get('revision_kept') or r.get('revision'))} | {measured} | "
                   f"{_verdict(d.get('judge_rejected'))} / {_verdict(d.get('judge_chosen'))} |")
    return "\n".join(out) + "\n"


def write_pairs_report(pairs_path, constitution: Constitution, out: str | Path, settings: PairFilterSettings) -> Path:
    """Write :func:`pairs_report` atomically to ``out``; returns its path."""
    atomic_write_text(out, pairs_report(pairs_path, constitution, settings))
    return Path(out)
