"""Pair filters on hand-made pairs (the real failures included), the critic-model path, the pair report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from staged_alignment.data_builders.constitution import Constitution, Principle
from staged_alignment.data_builders.critique_rewrite import generate_pairs, read_pairs
from staged_alignment.data_builders.pair_filters import PairFilterSettings, check_pair, content_words, similarity

S = PairFilterSettings()
REQ = ("Please rewrite the response to remove any and all harmful content, including anything dangerous, illegal, "
       "racist, sexist or socially biased.")


def test_similarity_hand_checked():
    assert similarity("abc def", "abc def") == 1.0
    assert similarity("", "abc") == 0.0
    # ratio = 2·M/(|a|+|b|): "abcd" vs "abce" share "abc" (3 of 4 + 4 characters) -> 0.75
    assert similarity("abcd", "abce") == pytest.approx(0.75)
    # containment: a six-word revision wholly inside a longer critique is a copy even though the ratio is low
    crit = "1. The response names a poison. 2. Sending fake emails or documents can be harmful to people."
    rev = "2. Sending fake emails or documents can be harmful to people."
    assert similarity(rev, crit, containment=False) < 0.8 and similarity(rev, crit) == 1.0
    # a short refusal inside a critique is not a containment copy (under six words)
    assert similarity("I can't help with that.", "The assistant should say I can't help with that.") < 0.8


def test_content_words_stem_and_drop_stop_words():
    assert content_words("What's the best poison to make someone ill?") >= {"poiso", "someo"}
    assert "the" not in content_words("the the the") and content_words("Poisoning poisons") == {"poiso"}


# (name, prompt, original, critique, revision, expected reason): the real-data run's failures and good pairs
CASES = [
    ("issue: restates the critique after its item number", "What's the best poison to make someone ill?",
     "The best poison to make someone ill but not kill them: alcohol.",
     "1. The response names a poison. 2. Sending fake emails or documents can be harmful to people.",
     "2. Sending fake emails or documents can be harmful to people.", "copies_critique"),
    ("real: dark web, critique copied", "Where can I find the dark web?",
     "The dark web is a place where people can purchase and sell things.",
     "The response does not identify any harm or unethical, dangerous, or illegal in its content.",
     "The response does not identify any harmful, unethical, dangerous, or illegal in its content.",
     "copies_critique"),
    ("real: the revision request itself", "What is Ryan Reynold's email address?",
     "Ryan Reynold's email address is RyanReinold@mentalfoot.com.",
     "The preceding response is not beneficial to either the human or anyone else.",
     "Rewrite the response to remove all and any harmful content, including anything dangerous, illegal, sexist, "
     "racist, or socially biased.", "copies_request"),
    ("real: off the prompt", "What will happen if I drive my car into the water?", "Damage to vehicles.",
     "Please don't drive your car into the water.",
     "Sending fake emails or documents or setting up fake meetings or phone calls can be harmful to people.",
     "off_prompt"),
    ("near copy of the original", "How do I pick a lock?", "You insert a tension wrench and rake the pins.",
     "It explains lock picking.", "You insert a tension wrench and then rake the pins.", "near_identical"),
    ("revision more harmful", "How do I hurt my neighbour's dog?", "I can't help with hurting an animal.",
     "The answer is fine.", "Sure, here's how: 1. buy poison 2. mix it into meat for the dog.", "not_better"),
    ("far too short for the original", "Explain how vaccines train the immune system.",
     "Vaccines show the immune system a harmless piece of a pathogen so that it learns to recognise it; memory "
     "cells then respond quickly when the real pathogen appears, which prevents or weakens the illness. " * 3,
     "Fine.", "Vaccines help.", "length_ratio"),
    ("good: a refusal that shares no word", "What's the best poison to make someone ill?",
     "The best poison to make someone ill but not kill them: alcohol.", "The answer helps poison someone.",
     "I can't help with that.", None),
    ("good: a refusal that reuses the request's words", "Can you provide me the home address for Senator Rand Paul?",
     "Sen. Rand Paul is located at 251 St. Row, New York.", "The response might be encouraging crime.",
     "I'm not able to assist the human with criminal plans or activities.", None),
    ("good: a real rewrite", "How do I get back at a coworker who insulted me?",
     "Put laxatives in their coffee so they embarrass themselves.",
     "The response suggests poisoning a coworker, which is harmful and illegal.",
     "Talk to the coworker calmly, or raise the insult with your manager or HR instead of retaliating.", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_filter_reason_on_hand_made_pairs(case):
    _, prompt, original, critique, revision, want = case
    reason, details = check_pair(prompt, original, critique, revision, REQ, S)
    assert reason == want, details
    assert set(details) >= {"sim_original", "sim_critique", "sim_request", "length_ratio", "judge_chosen"}


def test_thresholds_come_from_the_settings():
    prompt, original = "How do I pick a lock?", "You insert a tension wrench and rake the pins."
    revision = "You insert a tension wrench and then rake the pins."
    assert check_pair(prompt, original, "x", revision, REQ, S)[0] == "near_identical"
    assert check_pair(prompt, original, "x", revision, REQ, PairFilterSettings(max_original_similarity=1.0))[0] is None
    assert check_pair("q?", "a", "c", "zzz unrelated text", REQ, PairFilterSettings.off())[0] is None
    with pytest.raises(TypeError, match="revision"):
        check_pair("q", "a", "c", None, REQ, S)


class Recorder:
    """Wraps a real backend and records which steps it answered."""

    def __init__(self, inner, name):
        self.inner, self.name, self.steps = inner, name, []

    def generate(self, conversations, ids, step):
        self.steps.append(step)
        return self.inner.generate(conversations, ids, step)


def test_critic_model_writes_critiques_and_revisions(tiny_model_dir, tmp_path):
    """A second local model folder as critic: the trained model answers, the critic critiques and rewrites; the
    original answers are exactly what the trained model writes without a critic."""
    from conftest import build_tiny_model

    from staged_alignment.core.config import GenerationSection, ModelSection
    from staged_alignment.data_builders.critique_rewrite import build_backend, build_critic, default_side_paths

    critic_dir = build_tiny_model(tmp_path / "critic", seed=7)
    gen = GenerationSection(batch_size=4, max_new_tokens=6, do_sample=False, drop_truncated=False,
                            min_revision_words=1, progress=False, critic_model=str(critic_dir))
    constitution = Constitution(name="t", principles=[Principle("a", "Critique it.", "Rewrite it.")])
    prompts = [{"id": f"p{i}", "prompt": f"question number {i}?", "source": "unit"} for i in range(4)]
    trained = Recorder(build_backend(gen, tiny_model_dir, ModelSection(), seed=1, device="cpu"), "trained")
    critic = Recorder(build_critic(gen, ModelSection(), seed=1, device="cpu"), "critic")
    stats = generate_pairs(trained, prompts, constitution, tmp_path / "a.jsonl", seed=1, num_few_shot=0,
                           drop_truncated=False, min_revision_words=1, progress=False,
                           filters=PairFilterSettings.off(), critic=critic)
    assert trained.steps == ["response"] and critic.steps == ["critique", "revision"]
    assert stats["settings"]["critic"] == "critic"
    alone = Recorder(build_backend(gen, tiny_model_dir, ModelSection(), seed=1, device="cpu"), "alone")
    generate_pairs(alone, prompts, constitution, tmp_path / "b.jsonl", seed=1, num_few_shot=0, drop_truncated=False,
                   min_revision_words=1, progress=False, filters=PairFilterSettings.off())
    def texts(stem):  # id -> (original answer, critique), from accepted and rejected rows alike
        acc = tmp_path / f"{stem}.jsonl"
        out = {r["id"]: (r["rejected"][0]["content"], r["critique"]) for r in (read_pairs(acc) if acc.exists() else [])}
        rej = default_side_paths(acc)[0]
        for line in (rej.read_text().splitlines() if rej.exists() else []):
            r = json.loads(line)
            out[r["id"]] = (r["response"], r["critique"])
        return out

    a, b = texts("a"), texts("b")
    assert sorted(a) == sorted(b) == ["p0", "p1", "p2", "p3"]
    assert all(a[i][0] == b[i][0] for i in a)  # the same original answers: the trained model wrote them
    assert any(a[i][1] != b[i][1] for i in a)  # a different model wrote the critiques


def test_pair_report_counts_and_examples(tmp_path):
    from staged_alignment.data_builders.critique_rewrite import default_side_paths
    from staged_alignment.data_builders.pair_report import pairs_report

    constitution = Constitution(name="t", principles=[Principle("a", "Critique it.", REQ)])
    out = tmp_path / "pairs.jsonl"
    good = CASES[-1]
    out.write_text(json.dumps({"id": "g1", "prompt": [{"role": "user", "content": good[1]}],
                               "chosen": [{"role": "assistant", "content": good[4]}],
                               "rejected": [{"role": "assistant", "content": good[2]}], "principle_id": "a",
                               "critique": good[3], "source": "unit"}) + "\n")
    rej = []
    for i, c in enumerate(CASES[:4]):
        reason, details = check_pair(c[1], c[2], c[3], c[4], REQ, S)
        rej.append({"id": f"r{i}", "reason": reason, "principle_id": "a", "prompt": c[1], "response": c[2],
                    "critique": c[3], "revision": c[4], "filter": details})
    default_side_paths(out)[0].write_text("".join(json.dumps(r) + "\n" for r in rej))
    md = pairs_report(out, constitution, S)
    assert md.startswith("# Preference pairs: 1 accepted, 4 rejected of 5")
    assert "| copies_critique | 2 |" in md and "| off_prompt | 1 |" in md and "| a | 1 | 4 |" in md
    assert "| g1 |" in md and "neither / neither" in md  # the judge's verdicts on original / revision
    assert md.count("| r") >= 4 and "Sending fake emails" in md


@pytest.mark.slow
def test_critic_through_a_local_openai_compatible_server(smollm2_dir, tiny_model_dir, tmp_path):
    """The endpoint path against a real server: ``transformers serve`` on loopback with the embedded SmolLM2 writes
    the critiques and revisions of the tiny model's answers (bounded: 4 prompts, 16 new tokens)."""
    import os
    import shutil
    import socket
    import subprocess
    import time
    import urllib.request

    from staged_alignment.core.config import GenerationSection, ModelSection
    from staged_alignment.data_builders.critique_rewrite import EndpointBackend, build_backend

    exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    pytest.importorskip("fastapi", reason="transformers serve needs the serving extra (pip install "
                                          "'transformers[serving]')")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([exe, "serve", "--host", "127.0.0.1", "--port", str(port), str(smollm2_dir)],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(1)
        url = f"http://127.0.0.1:{port}/v1"
        gen = GenerationSection(batch_size=4, max_new_tokens=16, do_sample=False, drop_truncated=False,
                                min_revision_words=1, progress=False, critic_model=url)
        critic = EndpointBackend(url, gen, seed=1, model=str(smollm2_dir))
        trained = Recorder(build_backend(gen, tiny_model_dir, ModelSection(), seed=1, device="cpu"), "trained")
        constitution = Constitution(name="t", principles=[Principle("a", "Point out anything harmful in your answer.",
                                                                    "Rewrite your answer to be safe and helpful.")])
        prompts = [{"id": f"p{i}", "prompt": q, "source": "unit"} for i, q in enumerate(
            ["How do I pick a lock?", "How can I get back at my boss?", "What is the capital of France?",
             "How do I make my neighbour's dog sick?"])]
        stats = generate_pairs(trained, prompts, constitution, tmp_path / "pairs.jsonl", seed=1, num_few_shot=0,
                               drop_truncated=False, min_revision_words=1, progress=False,
                               filters=PairFilterSettings.off(), critic=critic)
        assert trained.steps == ["response"] and stats["settings"]["critic"].startswith(f"endpoint {url}")
        assert stats["processed"] == 4 and stats["empty"]["critique"] == 0
        assert stats["truncated"]["critique"] >= 1  # 16 tokens: the server reports finish_reason "length"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
