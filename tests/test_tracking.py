"""Evaluation metrics and generations reach TensorBoard and W&B (offline), as the training stages' logs do."""
from __future__ import annotations

import json

from staged_alignment.evaluation.tracking import generation_rows, log_evaluation, scalar_metrics

METRICS = {"models": {"base": {"attack_success_rate": 0.25, "utility_clean": 0.5, "ci": {"low": 0.1, "high": 0.4},
                               "note": "text", "flag": True, "nan": float("nan")},
                      "causal": {"attack_success_rate": 0.0}}}


def _generations(tmp_path):
    rows = [{"model": "base", "kind": "attack", "id": f"c{i}", "text": f"answer {i}", "attack": i % 2 == 0,
             "prompt_sha": "x"} for i in range(5)]
    (tmp_path / "generations.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_scalars_flatten_numbers_only():
    assert scalar_metrics(METRICS) == {"eval/base/attack_success_rate": 0.25, "eval/base/utility_clean": 0.5,
                                       "eval/base/ci/low": 0.1, "eval/base/ci/high": 0.4,
                                       "eval/causal/attack_success_rate": 0.0}


def test_tensorboard_gets_the_scalars_and_the_generations(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from staged_alignment.core.config import PipelineConfig

    _generations(tmp_path)
    assert [r[2] for r in generation_rows(tmp_path / "generations.jsonl", 3)] == ["c0", "c1", "c2"]
    cfg = PipelineConfig(run_name="t", output_dir=str(tmp_path))
    cfg.logging.report_to = ["tensorboard"]
    assert log_evaluation(cfg, METRICS, tmp_path) == ["tensorboard"]
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    tags = acc.Tags()
    assert "eval/causal/attack_success_rate" in tags["scalars"] or "eval/causal/attack_success_rate" in tags["tensors"]
    text = [t for t in tags["tensors"] if t.startswith("eval/generations")]
    assert text, tags


def test_wandb_offline_run_holds_the_table(tmp_path, monkeypatch):
    from staged_alignment.core.config import PipelineConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _generations(tmp_path)
    cfg = PipelineConfig(run_name="t", output_dir=str(tmp_path / "runs"))
    cfg.logging.report_to = ["wandb"]
    cfg.run_dir.mkdir(parents=True)
    assert log_evaluation(cfg, METRICS, tmp_path) == ["wandb"]
    runs = list((cfg.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    import time

    (record,) = runs[0].glob("*.wandb")  # the offline run's record (protobuf): the scalars are in it
    deadline = time.time() + 60  # W&B's service process may still be flushing it after run.finish() returns
    while b"eval/causal" not in record.read_bytes() and time.time() < deadline:
        time.sleep(0.5)
    assert b"eval/base/attack_success_rate" in record.read_bytes() and b"eval/causal" in record.read_bytes()
    (table,) = runs[0].glob("files/media/table/eval/generations_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"] == ["model", "kind", "id", "answer", "outcome"] and len(data["data"]) == 5
    assert data["data"][0][:4] == ["base", "attack", "c0", "answer 0"] and json.loads(data["data"][0][4]) == \
        {"attack": True}
