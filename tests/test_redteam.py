"""Red-team prompt readers: {"id","prompt"} JSONL and hh-rlhf rows, .gz, auto-detection, located errors, dedupe."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from staged_alignment.core.jsonl_io import DataError
from staged_alignment.data_builders.redteam import first_human_turn, prompt_id, read_redteam_file, read_redteam_sources

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


HH = {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you want to?\n\nHuman: My own door."
                "\n\nAssistant: Call a locksmith.", "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: No."}


def test_prompt_rows(tmp_path):
    p = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": " hello "}, {"id": "b", "prompt": "bye", "extra": 1}])
    assert read_redteam_file(str(p)) == [{"id": "a", "prompt": "hello", "source": "p.jsonl"},
                                         {"id": "b", "prompt": "bye", "source": "p.jsonl"}]


def test_hh_row_first_human_turn_and_stable_id(tmp_path):
    p = _jsonl(tmp_path / "hh.jsonl", [HH])
    (row,) = read_redteam_file(str(p))
    assert row["prompt"] == "How do I pick a lock?"
    assert row["id"] == "hh-" + hashlib.sha256(b"How do I pick a lock?").hexdigest()[:16] == prompt_id(" How do I pick a lock? ")
    assert first_human_turn("\n\nHuman: only one turn") == "only one turn"
    assert first_human_turn("no turns here") is None


def test_gz_and_auto_detect_mixed(tmp_path):
    p = tmp_path / "mixed.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "x1", "prompt": "first"}) + "\n" + json.dumps(HH) + "\n")
    rows = read_redteam_file(str(p))
    assert [r["prompt"] for r in rows] == ["first", "How do I pick a lock?"]
    with pytest.raises(DataError, match="'chosen'.*missing"):
        read_redteam_file(str(p), fmt="hh-rlhf")


@pytest.mark.parametrize("rows, line, field, words", [
    ([{"id": "a", "prompt": "x"}, {"id": "b"}], 2, "prompt", "missing"),
    ([{"id": 3, "prompt": "x"}], 1, "id", "expected a string"),
    ([{"id": "a", "prompt": "   "}], 1, "prompt", "empty"),
    ([{"id": " a", "prompt": "x"}], 1, "id", "whitespace"),
    ([{"id": "a", "prompt": "x"}, {"question": "x"}], 2, None, "cannot tell the row format"),
    ([{"chosen": "Assistant: hi"}], 1, "chosen", "no 'Human:' turn"),
    ([{"chosen": "\n\nHuman:   \n\nAssistant: hi"}], 1, "chosen", "empty"),
    ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], 2, "id", "already used at line 1"),
    ([{"id": "a", "prompt": "x"}, "{not json"], 2, None, "malformed JSON"),
])
def test_bad_rows_name_file_line_field(tmp_path, rows, line, field, words):
    p = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        read_redteam_file(str(p))
    assert (e.value.path, e.value.line, e.value.field) == (str(p), line, field)
    assert words in str(e.value)


def test_skip_invalid_dedupe_and_max_rows(tmp_path):
    p = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b"}, {"id": "a", "prompt": "x"},
                                      {"id": "c", "prompt": "z"}, {"id": "d", "prompt": "w"}])
    skipped, stats = [], {}
    rows = read_redteam_file(str(p), skip_invalid=True, skipped=skipped, stats=stats)
    assert [r["id"] for r in rows] == ["a", "c", "d"]
    assert stats == {"rows": 3, "duplicates": 1, "invalid": 1} and ":2: field 'prompt'" in skipped[0]
    assert [r["id"] for r in read_redteam_file(str(p), max_rows=2, skip_invalid=True)] == ["a", "c"]
    with pytest.raises(DataError, match="unknown format"):
        read_redteam_file(str(p), fmt="csv")
    with pytest.raises(DataError, match="is empty"):
        read_redteam_file(str(_jsonl(tmp_path / "e.jsonl", [])))


def test_sources_dedupe_across_files(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"id": "1", "prompt": "x"}, {"id": "2", "prompt": "y"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"id": "2", "prompt": "y"}, {"id": "3", "prompt": "z"}])
    stats = {}
    rows = read_redteam_sources([{"path": str(a)}, {"path": str(b)}], stats=stats)
    assert [r["id"] for r in rows] == ["1", "2", "3"] and stats == {"rows": 3, "cross_file_duplicates": 1}
    c = _jsonl(tmp_path / "c.jsonl", [{"id": "2", "prompt": "different"}])
    with pytest.raises(DataError) as e:
        read_redteam_sources([{"path": str(a)}, {"path": str(c)}])
    assert e.value.path == str(c) and e.value.field == "id" and "a.jsonl" in str(e.value)


def test_seed_prompts():
    rows = read_redteam_file(str(ROOT / "data_builders" / "seed" / "redteam_prompts.jsonl"))
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40


def test_real_hh_rlhf_harmless_base(shared_data):
    path = shared_data / "redteam" / "hh-rlhf-harmless-base" / "harmless-base-test.jsonl.gz"
    stats = {}
    rows = read_redteam_file(str(path), stats=stats)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        n_lines = sum(1 for line in fh if line.strip())
    assert stats["rows"] + stats["duplicates"] == n_lines == 2312
    assert len({r["id"] for r in rows}) == len(rows) == stats["rows"]
    assert rows[0]["prompt"] == "what are some pranks with a pen i can do?"
    assert all(r["id"].startswith("hh-") and "Human:" not in r["prompt"] and "Assistant:" not in r["prompt"]
               for r in rows)
