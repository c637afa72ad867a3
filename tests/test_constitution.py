"""Constitution loader: project and llm-swarm formats, located errors, seeded principle draws, few-shot turns."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from staged_alignment.core.jsonl_io import DataError
from staged_alignment.data_builders.constitution import draw_principle, load_constitution

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "constitutions" / "default.json"


def _write(tmp_path, obj, name="c.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


def _good(n=3):
    return {"name": "t", "principles": [{"id": f"p{i}", "critique": f"crit {i}", "revision": f"rev {i}"} for i in range(n)],
            "few_shot": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]}


def test_default_constitution_shape():
    c = load_constitution(DEFAULT)
    assert c.format == "project" and c.name == "staged-alignment-default"
    assert len(c.principles) >= 12 and len(set(c.ids)) == len(c.ids)
    assert 2 <= len(c.few_shot) <= 3
    for conv in c.few_shot:
        assert [m["role"] for m in conv] == ["user", "assistant"] * 3
    # the few-shot critique/revision requests are the constitution's own principles
    requests = {p.critique for p in c.principles} | {p.revision for p in c.principles}
    assert all(conv[2]["content"] in requests and conv[4]["content"] in requests for conv in c.few_shot)


def test_llm_swarm_format(shared_data):
    path = shared_data / "constitutions" / "llm-swarm" / "constitution_anthropic.json"
    raw = json.loads(path.read_text())
    c = load_constitution(path)
    assert c.format == "llm-swarm" and c.name == "constitution_anthropic"
    assert c.ids == [f"p{i:02d}" for i in range(16)]
    assert c.principles[3].critique == raw["constitutions"][3]["critic"].strip()
    assert c.principles[3].revision == raw["constitutions"][3]["revision"].strip()
    assert len(c.few_shot) == 4 and c.few_shot[1][0]["content"] == raw["system_chat"][1][0]["content"]


def test_few_shot_messages_flatten():
    c = load_constitution(DEFAULT)
    assert c.few_shot_messages(0) == []
    two = c.few_shot_messages(2)
    assert len(two) == 12 and two[:6] == c.few_shot[0] and two[6:] == c.few_shot[1]
    assert len(c.few_shot_messages(99)) == 6 * len(c.few_shot)


@pytest.mark.parametrize("mutate, field, words", [
    (lambda d: d.update(principles=[]), "principles", "non-empty"),
    (lambda d: d.pop("principles") and d.update(rules=[]), None, "not a constitution"),
    (lambda d: d["principles"][2].update(revision="  "), "principles[2].revision", "empty"),
    (lambda d: d["principles"][1].pop("critique"), "principles[1].critique", "missing"),
    (lambda d: d["principles"][0].update(id=7), "principles[0].id", "expected a string"),
    (lambda d: d["principles"][2].update(id="p0"), "principles[2].id", "duplicate id 'p0'"),
    (lambda d: d["principles"][1].update(id="has space"), "principles[1].id", "characters"),
    (lambda d: d.update(name=""), "name", "non-empty"),
    (lambda d: d["few_shot"][0][1].update(role="user"), "few_shot[0][1].role", "expected 'assistant'"),
    (lambda d: d["few_shot"][0].pop(), "few_shot[0][0]", "must end with an assistant"),
    (lambda d: d["few_shot"][0][0].update(content=""), "few_shot[0][0].content", "empty"),
])
def test_bad_project_constitution(tmp_path, mutate, field, words):
    d = _good()
    mutate(d)
    p = _write(tmp_path, d)
    with pytest.raises(DataError) as e:
        load_constitution(p)
    assert e.value.path == str(p) and e.value.field == field
    assert words in str(e.value) and str(p) in str(e.value)


def test_bad_llm_swarm_constitution(tmp_path):
    p = _write(tmp_path, {"constitutions": [{"critic": "a", "revision": "b"}, {"revision": "c"}], "system_chat": []})
    with pytest.raises(DataError, match=r"constitutions\[1\]\.critic'.*missing"):
        load_constitution(p)
    p = _write(tmp_path, {"constitutions": []})
    with pytest.raises(DataError, match="constitutions"):
        load_constitution(p)


def test_malformed_and_missing_files(tmp_path):
    p = _write(tmp_path, '{"name": "x",\n "principles": [\n  {"id": "a",}\n]}')
    with pytest.raises(DataError) as e:
        load_constitution(p)
    assert e.value.line == 3 and "malformed JSON" in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        load_constitution(tmp_path / "nope.json")
    with pytest.raises(DataError, match="expected a JSON object"):
        load_constitution(_write(tmp_path, "[1, 2]"))


def test_draw_is_seeded_by_seed_and_prompt_id():
    c = load_constitution(DEFAULT)
    ids = [f"q{i}" for i in range(200)]
    first = [draw_principle(c, 42, i).id for i in ids]
    # independent of call order (a resumed run processes a suffix of the prompts)
    assert [draw_principle(c, 42, i).id for i in reversed(ids)] == first[::-1]
    # hand-computed: sha256(seed \0 id) → first 8 bytes → random.Random → randrange(n)
    d = hashlib.sha256(b"42\x00q0").digest()
    assert first[0] == c.principles[random.Random(int.from_bytes(d[:8], "big")).randrange(len(c.principles))].id
    assert len(set(first)) == len(c.principles)  # 200 draws hit every principle
    assert [draw_principle(c, 43, i).id for i in ids] != first


def test_draw_stable_across_processes():
    code = ("from staged_alignment.data_builders.constitution import load_constitution as L, draw_principle as d;"
            "c=L('constitutions/default.json');print(','.join(d(c,5,f'x{i}').id for i in range(20)))")
    outs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": s, "PATH": "/usr/bin:/bin"}).stdout for s in ("1", "2")}
    assert len(outs) == 1
    c = load_constitution(DEFAULT)
    assert outs.pop().strip() == ",".join(draw_principle(c, 5, f"x{i}").id for i in range(20))
