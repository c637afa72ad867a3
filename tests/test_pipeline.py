"""The orchestrator end to end on the tiny model: every stage, the manifest, skip on rerun, redo, kill-and-resume.

The pipeline runs as a real subprocess (each stage its own process, as a user runs it). The slow test kills it
with SIGKILL inside each stage in turn (delays from a fixed seed list) and checks that the rerun completes
without redoing finished stages and without duplicated or lost records.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, write_tiny_pipeline_config

STAGES = ["sft", "dpo", "causal", "evaluate"]


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO))


def _cmd(cfg: Path, *extra) -> list[str]:
    return [sys.executable, str(REPO / "stages" / "pipeline.py"), "--config", str(cfg), *extra]


def _run(cfg: Path, *extra, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(cfg, *extra), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def _ids(path: Path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _check_records(run_dir: Path, n_train_prompts: int = 8) -> None:
    """Every train prompt (dpo.max_prompts = 8) is recorded exactly once, accepted or rejected; triplet ids are
    unique; no evaluation answer is recorded twice."""
    pairs = _ids(run_dir / "data" / "pairs.jsonl")
    rejected = _ids(run_dir / "data" / "pairs.rejected.jsonl")
    assert len(pairs) == len(set(pairs)) and len(rejected) == len(set(rejected))
    assert not set(pairs) & set(rejected)
    assert len(pairs) + len(rejected) == n_train_prompts
    trip = _ids(run_dir / "data" / "triplets.jsonl")
    assert trip and len(trip) == len(set(trip))
    gen_files = sorted((run_dir / "eval").rglob("generations.jsonl"))
    assert gen_files
    for f in gen_files:
        gens = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        keys = [(g["key"], g["kind"], g["id"]) for g in gens]
        assert len(keys) == len(set(keys)), f"an evaluation record was written twice in {f}"


def _check_complete(run_dir: Path) -> dict:
    m = _manifest(run_dir)
    assert [m[s]["status"] for s in STAGES] == ["done"] * 4, m
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"base", "sft", "dpo", "causal"}
    for label, row in metrics["models"].items():
        assert 0.0 <= row["attack_success_rate"] <= 1.0 and row["n_cases"] == 6
    for s in ("sft", "dpo", "causal"):
        assert (run_dir / s / "merged" / "config.json").exists() and (run_dir / s / "adapter").is_dir()
    # the default objective has no contrastive term, so no projection head is trained or saved
    assert not (run_dir / "causal" / "adapter" / "causal_projection.safetensors").exists()
    assert (run_dir / "eval" / "report.md").exists()
    assert {(r["model"], r["reference"]) for r in metrics["paired"]} == {("sft", "base"), ("dpo", "sft"),
                                                                         ("causal", "dpo")}
    return m


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    cfg = write_tiny_pipeline_config(tmp, tiny_model_dir, name="e2e")
    t0 = time.time()
    res = _run(cfg)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return cfg, tmp / "runs" / "e2e", res, time.time() - t0


def test_pipeline_end_to_end(finished_run):
    cfg, run_dir, res, _ = finished_run
    m = _check_complete(run_dir)
    _check_records(run_dir)
    assert "| model |" in res.stdout and str(run_dir / "eval" / "report.md") in res.stdout  # table + report path
    lines = res.stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("| model |"))
    table = [x for x in lines[start:start + 7] if x.startswith("|")]
    assert len(table) == 2 + 4 and set(table[1]) == {"|", "-"}  # header, separator, one row per model
    assert "| causal | dpo | ASR |" in res.stdout  # the paired tests against the model each stage started from
    assert len({x.count("|") for x in table}) == 1
    for s in STAGES:
        assert m[s]["config_hash"] and m[s]["input_hashes"] and m[s]["seconds"] >= 0
    # the DPO stage is bound to the SFT model it trained on, the causal stage to the DPO model
    assert "base" in m["dpo"]["input_hashes"] and "base" in m["causal"]["input_hashes"]
    resolved = (run_dir / "resolved_config.yaml").read_text()
    assert "max_steps: 4" in resolved


def test_rerun_skips_finished_stages_and_from_stage_redoes(finished_run):
    cfg, run_dir, _, _ = finished_run
    before = _manifest(run_dir)
    res = _run(cfg)
    assert res.returncode == 0, res.stderr[-2000:]
    assert all(f"[{s}] done with the same config and inputs: skipped" in res.stdout for s in STAGES)
    assert _manifest(run_dir) == before  # nothing rerun, nothing rewritten
    # --from-stage evaluate redoes only the evaluation
    res = _run(cfg, "--from-stage", "evaluate")
    assert res.returncode == 0, res.stderr[-2000:]
    after = _manifest(run_dir)
    assert all(after[s]["finished"] == before[s]["finished"] for s in ("sft", "dpo", "causal"))
    assert after["evaluate"]["finished"] != before["evaluate"]["finished"]
    # a changed causal setting reruns causal (fresh: no checkpoint of the old settings reused) and evaluate
    res = _run(cfg, "causal.loss.lambda_lm_injected=0.5")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[sft] done" in res.stdout and "[dpo] done" in res.stdout and "[causal] running" in res.stdout
    assert "[evaluate] running" in res.stdout  # its input (causal/merged) changed
    changed = _manifest(run_dir)
    assert changed["causal"]["config_hash"] != before["causal"]["config_hash"]
    hist = json.loads((run_dir / "causal" / "log_history.json").read_text())
    assert [h["step"] for h in hist if "loss" in h] == [1, 2, 3]  # trained from step 1, not resumed at step 3


def _wait_for_stage(proc, run_dir: Path, stage: str, timeout=600) -> bool:
    """Wait until ``stage`` is running in the manifest; False if the process ended first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        try:
            if _manifest(run_dir).get(stage, {}).get("status") == "running" and \
                    not _manifest(run_dir).get(stage, {}).get("redo"):
                return True
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass  # not written yet (never corrupt: written atomically; the decode error would fail below)
        time.sleep(0.2)
    raise TimeoutError(stage)


def _wait_group_gone(pgid: int, timeout=300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)
    raise TimeoutError(f"process group {pgid} still alive {timeout} s after the signal")


@pytest.mark.slow
@pytest.mark.parametrize("seed,sig", [(0, signal.SIGKILL), (1, signal.SIGTERM), (2, signal.SIGKILL)])
def test_kill_in_each_stage_then_rerun(tiny_model_dir, tmp_path, seed, sig):
    """SIGKILL or SIGTERM the whole pipeline (process group) inside each stage in turn, at a seeded random moment
    (loading, generation, training, merging, evaluation or a manifest write); every rerun completes, finished
    stages are not redone, records are neither lost nor duplicated, the manifest always parses."""
    rng = random.Random(seed)
    cfg = write_tiny_pipeline_config(tmp_path, tiny_model_dir, name="kill")
    run_dir = tmp_path / "runs" / "kill"
    killed_in = []
    for i, stage in enumerate(STAGES):
        extra = [] if i == 0 else ["--from-stage", stage]
        before = _manifest(run_dir) if (run_dir / "manifest.json").exists() else {}
        proc = subprocess.Popen(_cmd(cfg, *extra), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            assert _wait_for_stage(proc, run_dir, stage), f"pipeline ended before {stage} started"
            time.sleep(rng.uniform(0.5, 6.0))  # somewhere in loading, generation, training, merge or writing
            os.killpg(proc.pid, sig)
        finally:
            proc.wait()
            _wait_group_gone(proc.pid)  # a SIGTERMed stage saves its checkpoint before it exits
        m = _manifest(run_dir)  # parses: never half-written
        killed_in.append((stage, m[stage]["status"]))
        for s in STAGES[:i]:  # stages before the killed one are untouched
            assert m[s]["status"] == "done" and m[s]["finished"] == before[s]["finished"]
        res = _run(cfg)
        assert res.returncode == 0, f"rerun after kill in {stage}: " + res.stdout[-2000:] + res.stderr[-2000:]
        for s in STAGES[:i]:
            assert f"[{s}] done with the same config and inputs: skipped" in res.stdout
        _check_complete(run_dir)
        _check_records(run_dir)
    # each kill landed in the stage it targeted, or just after it finished (status done): both must recover
    assert [k[0] for k in killed_in] == STAGES
