"""Readers for red-team prompts, all producing ``{"id": str, "prompt": str, "source": str}`` rows.

Accepted shapes (docs/architecture.md, "Red-team prompt"), JSONL, optionally gzip-compressed (``.gz``):

- ``prompts``: ``{"id": str, "prompt": str}`` (both required, non-empty);
- ``hh-rlhf``: Anthropic hh-rlhf rows ``{"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": …}``. The prompt is
  the first ``Human:`` turn of ``chosen`` (later turns are ignored: the red-team set is single-turn); the id is
  ``hh-`` + the first 16 hex digits of sha256 of the prompt text (stable across files, runs and machines).

``format: auto`` decides per row: a ``prompt`` key means ``prompts``, a ``chosen`` key means ``hh-rlhf`` (a row
with only ``id`` is read as ``prompts``, so the error names the missing ``prompt``).
Rows are de-duplicated by id (the first occurrence wins; later duplicates are counted in ``stats``). The same id
with a *different* prompt is an error, because the id is what resume and held-out splits rely on.
Every problem raises :class:`~core.jsonl_io.DataError` naming file, line and field.
``source`` (the file name) is provenance only; it is not part of the outward prompt schema.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from staged_alignment.core.jsonl_io import DataError, iter_jsonl, require_str, write_jsonl_atomic
from staged_alignment.core.sources import iter_source

FORMATS = ("auto", "prompts", "hh-rlhf", "transcript")
_HUMAN = re.compile(r"(?:^|\n\n)Human:[ \t]*")
_NEXT_TURN = re.compile(r"\n\n(?:Assistant|Human):")


def prompt_id(text: str) -> str:
    """Stable id of a prompt without one: ``hh-`` + 16 hex digits of sha256(prompt stripped, UTF-8)."""
    return "hh-" + hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


def first_human_turn(transcript: str) -> str | None:
    """The text of the first ``Human:`` turn of an hh-rlhf transcript (up to the next turn), or None."""
    m = _HUMAN.search(transcript)
    if not m:
        return None
    rest = transcript[m.end():]
    end = _NEXT_TURN.search(rest)
    return (rest[:end.start()] if end else rest).strip()


def detect_format(obj: dict) -> str:
    """``prompts`` if the row has ``prompt``, ``hh-rlhf`` if it has ``chosen``, ``prompts`` if it has only ``id``
    (so the error names the missing ``prompt``), else ``unknown``."""
    if "prompt" in obj:
        return "prompts"
    if "chosen" in obj:
        return "hh-rlhf"
    if "transcript" in obj:
        return "transcript"
    if "id" in obj:
        return "prompts"
    return "unknown"


def _parse_prompt_row(obj, path, line) -> dict:
    rid = require_str(obj, "id", path, line)
    if rid != rid.strip():
        raise DataError(path, line, "id", "has leading or trailing whitespace")
    return {"id": rid, "prompt": require_str(obj, "prompt", path, line).strip()}


def _parse_hh_row(obj, path, line, field: str = "chosen") -> dict:
    text = require_str({field: obj["chosen"]} if "chosen" in obj else {}, field, path, line)
    prompt = first_human_turn(text)
    if prompt is None:
        raise DataError(path, line, field, "no 'Human:' turn found (expected '\\n\\nHuman: …\\n\\nAssistant: …')")
    if not prompt:
        raise DataError(path, line, field, "the first 'Human:' turn is empty")
    return {"id": prompt_id(prompt), "prompt": prompt}


def _parse_transcript_row(obj, path, line) -> dict:
    """hh-rlhf red-team-attempts rows: the first human turn of ``transcript``."""
    return _parse_hh_row({"chosen": obj["transcript"]} if "transcript" in obj else {}, path, line, field="transcript")


PARSERS = {"prompts": _parse_prompt_row, "hh-rlhf": _parse_hh_row, "transcript": _parse_transcript_row}


def read_redteam_file(path: str, fmt: str = "auto", max_rows: int | None = None, skip_invalid: bool = False,
                      skipped: list | None = None, stats: dict | None = None) -> list[dict]:
    """Read one red-team prompt file into ``{"id", "prompt", "source"}`` rows, de-duplicated by id.

    ``max_rows`` counts distinct output rows. With ``skip_invalid`` bad rows are dropped and their errors appended
    to ``skipped`` (a malformed file, as opposed to a bad row, still raises). ``stats`` (if given) receives
    ``rows``, ``duplicates`` and ``invalid`` counts. Raises :class:`DataError`.
    """
    return read_redteam_source({"path": path, "format": fmt, "max_rows": max_rows, "skip_invalid": skip_invalid},
                               skipped, stats)


def read_redteam_source(source: dict, skipped: list | None = None, stats: dict | None = None) -> list[dict]:
    """One red-team source (a ``DataSource`` mapping: a file, or a Hub id / dataset folder / parquet through
    ``datasets``, :mod:`core.sources`); see :func:`read_redteam_file`."""
    path, fmt = source["path"], source.get("format") or "auto"
    max_rows, skip_invalid = source.get("max_rows"), source.get("skip_invalid", False)
    if fmt not in FORMATS:
        raise DataError(path, None, "format", f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    label, rows_iter = iter_source(source, iter_jsonl, "red-team prompt file")
    p = Path(label)
    rows: list[dict] = []
    seen: dict[str, tuple[str, int]] = {}
    counts = {"rows": 0, "duplicates": 0, "invalid": 0}
    for line, obj in rows_iter:
        f = fmt if fmt != "auto" else detect_format(obj)
        try:
            if f == "unknown":
                raise DataError(p, line, None, "cannot tell the row format: expected 'id'+'prompt', an hh-rlhf "
                                               "row with 'chosen', or a red-team 'transcript'; or set format / "
                                               "columns")
            row = PARSERS[f](obj, p, line)
        except DataError as e:
            if not skip_invalid:
                raise
            counts["invalid"] += 1
            if skipped is not None:
                skipped.append(str(e))
            continue
        if row["id"] in seen:
            first_prompt, first_line = seen[row["id"]]
            if first_prompt != row["prompt"]:
                raise DataError(p, line, "id", f"id {row['id']!r} was already used at line {first_line} for a "
                                               "different prompt")
            counts["duplicates"] += 1
            continue
        seen[row["id"]] = (row["prompt"], line)
        row["source"] = p.name
        rows.append(row)
        if max_rows is not None and len(rows) >= max_rows:
            break
    counts["rows"] = len(rows)
    if stats is not None:
        stats.update(counts)
    return rows


def read_redteam_sources(sources: list[dict], skipped: list | None = None, stats: dict | None = None) -> list[dict]:
    """Concatenate several ``{path, format, max_rows, skip_invalid}`` sources, de-duplicated by id across files.

    An id that appears in two files with different prompts raises :class:`DataError` (second file, field ``id``).
    """
    out: list[dict] = []
    by_id: dict[str, dict] = {}
    dup = 0
    for s in sources:
        rows = read_redteam_source(s, skipped)
        for r in rows:
            if r["id"] in by_id:
                if by_id[r["id"]]["prompt"] != r["prompt"]:
                    raise DataError(s["path"], None, "id", f"id {r['id']!r} is also used in {by_id[r['id']]['source']} "
                                                           "for a different prompt")
                dup += 1
                continue
            by_id[r["id"]] = r
            out.append(r)
    if stats is not None:
        stats.update({"rows": len(out), "cross_file_duplicates": dup})
    return out


def write_prompts(path: str | Path, rows: list[dict]) -> None:
    """Write ``{"id", "prompt"}`` rows (the outward schema; ``source`` dropped) atomically."""
    write_jsonl_atomic(path, [{"id": r["id"], "prompt": r["prompt"]} for r in rows])
