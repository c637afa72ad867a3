"""Critique-and-rewrite: conversation structure, filters and their counts, row schema, resume (also after SIGKILL)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from staged_alignment.core.jsonl_io import DataError
from staged_alignment.data_builders.constitution import Constitution, Principle, draw_principle, load_constitution
from staged_alignment.data_builders.critique_rewrite import (
    REJECT_REASONS,
    build_backend,
    default_side_paths,
    ensure_full_precision,
    generate_pairs,
    normalize_ws,
    read_pairs,
    require_vllm,
    strip_preamble,
)

ROOT = Path(__file__).resolve().parents[1]
PAIR_KEYS = {"id", "prompt", "chosen", "rejected", "principle_id", "critique", "source"}


@pytest.fixture
def constitution():
    return Constitution(name="t", principles=[Principle("a", "CRIT-A", "REV-A"), Principle("b", "CRIT-B", "REV-B"),
                                              Principle("c", "CRIT-C", "REV-C")],
                        few_shot=[[{"role": "user", "content": "FS-Q"}, {"role": "assistant", "content": "FS-A"}],
                                  [{"role": "user", "content": "FS2-Q"}, {"role": "assistant", "content": "FS2-A"}]])


class ScriptedBackend:
    """Answers by (prompt id, step) from a script; records every conversation it was asked to answer."""

    name = "scripted"

    def __init__(self, script: dict, default=None):
        self.script, self.calls = script, []
        self.default = default or {"response": "Reply to the prompt", "critique": "Critique",
                                   "revision": "Safer words on this prompt"}

    def generate(self, conversations, ids, step):
        self.calls.append((step, list(ids), [list(c) for c in conversations]))
        out = []
        for pid in ids:
            v = self.script.get(pid, {}).get(step, self.default[step] + f" for {pid}")
            text, trunc = (v, False) if isinstance(v, str) else v
            out.append({"text": text, "n_tokens": len(text.split()), "truncated": trunc})
        return out


def _prompts(n, prefix="q"):
    return [{"id": f"{prefix}{i}", "prompt": f"prompt {i}", "source": "unit"} for i in range(n)]


@pytest.mark.parametrize("text, rest, had", [
    ("Sure, here is a revised response:\n\nI can't help with that.", "I can't help with that.", True),
    ("Here's a rewritten version of the response:\n\"Please don't do that.\"", "Please don't do that.", True),
    ("Revised response: Talk to your neighbour instead.", "Talk to your neighbour instead.", True),
    ("Here is a more age-appropriate version of the response: Pranks can hurt.", "Pranks can hurt.", True),
    ("Certainly! Here’s a safer, kinder reply:\n\nLet's talk.", "Let's talk.", True),
    ("Sure, here is a revised version.", "", True),
    ("Here are some tips to stay safe: ventilate rooms.", "Here are some tips to stay safe: ventilate rooms.", False),
    ("Sure, I can help with that. Pranks are fun.", "Sure, I can help with that. Pranks are fun.", False),
    ("I cannot help with that.", "I cannot help with that.", False),
])
def test_strip_preamble(text, rest, had):
    assert strip_preamble(text) == (rest, had)


def test_normalize_ws():
    assert normalize_ws("  a\n\n b\t c ") == "a b c"


def test_conversation_structure_and_row_schema(tmp_path, constitution):
    be = ScriptedBackend({})
    out = tmp_path / "pairs.jsonl"
    stats = generate_pairs(be, _prompts(3), constitution, out, seed=11, num_few_shot=1, batch_size=2, progress=False)
    assert [c[0] for c in be.calls] == ["response", "critique", "revision"] * 2  # 2 batches × 3 steps
    step, ids, convs = be.calls[2]  # revision step of the first batch
    pr = draw_principle(constitution, 11, "q0")
    assert ids == ["q0", "q1"] and convs[0] == [
        {"role": "user", "content": "FS-Q"}, {"role": "assistant", "content": "FS-A"},  # one few-shot conversation
        {"role": "user", "content": "prompt 0"}, {"role": "assistant", "content": "Reply to the prompt for q0"},
        {"role": "user", "content": pr.critique}, {"role": "assistant", "content": "Critique for q0"},
        {"role": "user", "content": pr.revision}]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"] and all(set(r) == PAIR_KEYS for r in rows)
    assert rows[0] == {"id": "q0", "prompt": [{"role": "user", "content": "prompt 0"}],
                       "chosen": [{"role": "assistant", "content": "Safer words on this prompt for q0"}],
                       "rejected": [{"role": "assistant", "content": "Reply to the prompt for q0"}],
                       "principle_id": pr.id, "critique": "Critique for q0", "source": "unit"}
    assert stats["accepted"] == 3 and stats["files"]["prompts_covered"] == 3
    assert json.loads(default_side_paths(out)[1].read_text())["accepted"] == 3
    assert read_pairs(out) == rows


def test_filters_are_counted(tmp_path, constitution):
    crit = "The answer gives dangerous advice that could hurt someone badly."
    script = {
        "q0": {"response": "  "},                                            # empty_response
        "q1": {"response": ("long answer", True)},                           # truncated_response
        "q2": {"critique": ""},                                              # empty_critique
        "q3": {"revision": ""},                                              # empty_revision
        "q4": {"revision": ("A cut-off prompt reply", True)},                # truncated_revision
        "q5": {"revision": "Sure, here is a revised response:"},             # meta_revision
        "q6": {"response": "Same  text\nhere", "revision": "Same text here"},  # identical
        "q7": {"critique": crit, "revision": crit.upper()},                  # copies_critique
        "q8": {"revision": "Here's a rewritten version of the response:\n\nI won't help with that, sorry."},
        "q9": {"critique": ("a long critique", True)},                       # counted, kept
    }
    be = ScriptedBackend(script)
    out = tmp_path / "pairs.jsonl"
    stats = generate_pairs(be, _prompts(11), constitution, out, seed=1, batch_size=4, progress=False)
    seen = ["empty_response", "truncated_response", "empty_critique", "empty_revision", "truncated_revision",
            "meta_revision", "identical", "copies_critique"]
    expected = {r: int(r in seen) for r in REJECT_REASONS}
    assert stats["rejected"] == expected and stats["accepted"] == 3
    assert stats["preamble_stripped"] == 1 and stats["truncated"] == {"response": 1, "critique": 1, "revision": 1}
    assert stats["empty"] == {"response": 1, "critique": 1, "revision": 1}
    acc = {r["id"]: r for r in read_pairs(out)}
    assert sorted(acc) == ["q10", "q8", "q9"]
    assert acc["q8"]["chosen"][0]["content"] == "I won't help with that, sorry."
    rej = [json.loads(x) for x in default_side_paths(out)[0].read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in rej} == {f"q{i}": seen[i] for i in range(8)}
    assert rej[-1]["filter"]["sim_critique"] == 1.0  # the measurements travel with the rejected row
    assert stats["files"]["rejected_by_reason"] == {k: v for k, v in expected.items() if v}
    # an empty or truncated response stops the chain: no critique/revision generated for q0, q1
    later_ids = [i for step, ids, _ in be.calls if step != "response" for i in ids]
    assert "q0" not in later_ids and "q1" not in later_ids
    # keep truncated outputs when asked (still counted)
    out2 = tmp_path / "keep.jsonl"
    s2 = generate_pairs(ScriptedBackend(script), _prompts(11), constitution, out2, seed=1, drop_truncated=False,
                        progress=False)
    assert s2["rejected"]["truncated_response"] == s2["rejected"]["truncated_revision"] == 0
    assert s2["truncated"]["response"] == 1 and s2["accepted"] == 5


def test_resume_skips_done_and_rejected_ids_and_repairs_torn_tail(tmp_path, constitution):
    script = {"q1": {"response": ""}}
    out = tmp_path / "pairs.jsonl"

    class Stop(Exception):
        pass

    def stop_after_first(n):
        raise Stop

    with pytest.raises(Stop):
        generate_pairs(ScriptedBackend(script), _prompts(7), constitution, out, batch_size=3, progress=False,
                       on_batch=stop_after_first)
    assert len(out.read_text().splitlines()) == 2 and len(default_side_paths(out)[0].read_text().splitlines()) == 1
    with open(out, "ab") as fh:  # a kill in the middle of a write leaves a torn last line
        fh.write(b'{"id": "q3", "prompt": [{"ro')
    be = ScriptedBackend(script)
    stats = generate_pairs(be, _prompts(7), constitution, out, batch_size=3, progress=False)
    assert stats["skipped_done"] == 3 and stats["processed"] == 4
    assert sorted({i for _, ids, _ in be.calls for i in ids}) == ["q3", "q4", "q5", "q6"]
    acc = [r["id"] for r in read_pairs(out)]
    rej = [json.loads(x)["id"] for x in default_side_paths(out)[0].read_text().splitlines()]
    assert sorted(acc + rej) == [f"q{i}" for i in range(7)] and rej == ["q1"]
    # a third run generates nothing
    be3 = ScriptedBackend(script)
    assert generate_pairs(be3, _prompts(7), constitution, out, progress=False)["processed"] == 0 and not be3.calls


def test_read_pairs_errors(tmp_path):
    good = {"id": "x", "prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}], "principle_id": "a", "critique": "k", "source": "s"}
    cases = [({"chosen": [{"role": "user", "content": "c"}]}, "chosen[0].role"),
             ({"rejected": []}, "rejected"),
             ({"prompt": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}]}, "prompt[1].role"),
             ({"principle_id": None}, "principle_id")]
    for patch, field in cases:
        p = tmp_path / "bad.jsonl"
        p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "y", **patch}) + "\n")
        with pytest.raises(DataError) as e:
            read_pairs(p)
        assert (e.value.line, e.value.field) == (2, field)
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match="duplicate id 'x' \\(first at line 1\\)"):
        read_pairs(p)


def test_refuses_quantized_or_unmerged_models():
    class FourBit:
        is_loaded_in_4bit = True

    class Cfg:
        quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}

    class QuantCfg:
        config = Cfg()

    class Peft:
        peft_config = {"default": None}

        def disable_adapter(self):
            pass

    for m in (FourBit(), QuantCfg(), Peft()):
        with pytest.raises(ValueError, match="merged"):
            ensure_full_precision(m)


def test_vllm_backend_clear_error_without_vllm_or_cuda(tiny_model_dir):
    import importlib.util

    import torch

    from staged_alignment.core.config import GenerationSection, ModelSection

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vllm and CUDA present")
    with pytest.raises(RuntimeError, match="generation.backend 'vllm' cannot run") as e:
        build_backend(GenerationSection(backend="vllm"), tiny_model_dir, ModelSection(), seed=1)
    msg = str(e.value)
    assert ("'vllm' package is not installed" in msg) == (importlib.util.find_spec("vllm") is None)
    assert ("no CUDA device" in msg) == (not torch.cuda.is_available())
    with pytest.raises(RuntimeError):
        require_vllm()


# ------------------------------------------------------------------------------ real model, real subprocess
@pytest.fixture(scope="module")
def eos_biased_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a constant embedding direction read by the eos logit: under sampling it ends some
    answers at once (empty → rejected), some within 8 tokens (accepted) and runs out on others (truncated)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-eos")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[tok.eos_token_id, 0] = 0.3
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.endswith("}")]


def test_cli_resumes_after_sigkill_without_duplicates(tmp_path, eos_biased_model_dir):
    n = 24
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i:02d}", "prompt": f"How do I do bad thing number {i}?"}) + "\n"
                               for i in range(n)))
    out = tmp_path / "pairs.jsonl"
    rejected = default_side_paths(out)[0]
    cmd = [sys.executable, "-m", "staged_alignment.data_builders.critique_rewrite", "--model", str(eos_biased_model_dir),
           "--prompts", str(prompts), "--constitution", str(ROOT / "constitutions" / "default.json"),
           "--out", str(out), "--max-new-tokens", "8", "--batch-size", "2", "--seed", "3", "--device", "cpu",
           "--no-progress", "--no-content-filters"]  # a random tiny model's pairs would all be filtered out
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(cmd + ["--throttle-seconds", "0.4"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if len(_ids(out)) + len(_ids(rejected)) >= 1:
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    before_acc, before_rej = out.read_text() if out.exists() else "", rejected.read_text() if rejected.exists() else ""
    done = len(_ids(out)) + len(_ids(rejected))
    assert 1 <= done < n, f"killed after {done} of {n} prompts"
    with open(out, "ab") as fh:  # and simulate a kill in the middle of a line
        fh.write(b'{"id": "r2')
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    acc, rej = _ids(out), _ids(rejected)
    assert sorted(acc + rej) == [f"r{i:02d}" for i in range(n)]  # every prompt exactly once, in one of the files
    assert acc and rej  # this model gives both outcomes
    assert out.read_text().startswith(before_acc) and rejected.read_text().startswith(before_rej)  # appended only
    rows = read_pairs(out)
    assert all(set(r) == PAIR_KEYS and r["chosen"][0]["role"] == "assistant" for r in rows)
    stats = json.loads(default_side_paths(out)[1].read_text())
    assert stats["skipped_done"] == done and stats["processed"] == n - done
    assert stats["files"]["prompts_covered"] == n and stats["files"]["accepted"] == len(acc)
    c = load_constitution(ROOT / "constitutions" / "default.json")
    assert all(r["principle_id"] == draw_principle(c, 3, r["id"]).id for r in rows)
