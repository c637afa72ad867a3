"""Evaluation results in the run's experiment trackers (``logging.report_to``: wandb, tensorboard).

The training stages log through the Trainer; the evaluation stage has no Trainer, so :func:`log_evaluation`
writes its figures itself, into the same places:

* W&B: one run ``<run_name>-evaluate`` in the pipeline's group (``core.common.report_to_env``), with every
  per-model scalar of ``metrics.json`` as ``eval/<model>/<metric>`` in its summary and a ``generations`` table
  (model, kind, id, answer, judged outcome) of at most ``max_rows`` rows; works with ``WANDB_MODE=offline``.
  (``generations.jsonl`` keeps prompt hashes, not prompts: the cases are in the eval file by id.)
* TensorBoard: ``<run_dir>/eval/tensorboard``, the same scalars (step 0) and the first generations as a Markdown
  text (``add_text``).
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from staged_alignment.core.common import report_to_env

log = logging.getLogger(__name__)
TABLE_COLUMNS = ["model", "kind", "id", "answer", "outcome"]
OUTCOME_KEYS = ("attack", "attack_begins", "utility_clean", "utility_under_attack", "complied", "refused",
                "over_refused")


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """``{"eval/<model>/<metric>": value}`` for every finite number in ``metrics["models"]`` (nested dicts are
    flattened with ``/``; booleans, strings, lists and NaN are left out)."""
    out = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
            out[prefix] = float(node)

    for label, m in (metrics.get("models") or {}).items():
        walk(f"eval/{label}", m)
    return out


def generation_rows(generations: Path, max_rows: int) -> list[list]:
    """Rows of ``generations.jsonl`` for the table (:data:`TABLE_COLUMNS`), at most ``max_rows``; unreadable
    lines are skipped."""
    rows: list[list] = []
    if not Path(generations).is_file():
        return rows
    with open(generations, encoding="utf-8") as f:
        for line in f:
            if len(rows) >= max_rows:
                break
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            outcome = {k: r[k] for k in OUTCOME_KEYS if k in r}
            rows.append([r.get("model"), r.get("kind"), r.get("id"), str(r.get("text", ""))[:2000],
                         json.dumps(outcome)])
    return rows


def log_evaluation(cfg, metrics: dict, out_dir: str | os.PathLike, *, max_rows: int = 200) -> list[str]:
    """Log ``metrics`` and the generations of ``out_dir/generations.jsonl`` to the trackers in
    ``cfg.logging.report_to``; returns the trackers written. A tracker that fails is logged as a warning (the
    evaluation's files are written already and stay the record)."""
    out_dir = Path(out_dir)
    scalars = scalar_metrics(metrics)
    rows = generation_rows(out_dir / "generations.jsonl", max_rows)
    done = []
    targets = set(cfg.logging.report_to or []) - {"none"}
    if "tensorboard" in targets:
        try:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=str(out_dir / "tensorboard")) as w:
                for k, v in scalars.items():
                    w.add_scalar(k, v, 0)
                table = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
                table += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ")[:200] for c in r) + " |"
                          for r in rows[:50]]
                w.add_text("eval/generations", "\n".join(table), 0)
            done.append("tensorboard")
        except Exception as e:  # noqa: BLE001 - a tracker must not fail the evaluation
            log.warning("tensorboard logging of the evaluation failed: %s", e)
    if "wandb" in targets:
        try:
            import wandb

            report_to_env(cfg, "evaluate")
            run = wandb.init(project=os.environ.get("WANDB_PROJECT"), group=os.environ.get("WANDB_RUN_GROUP"),
                             name=os.environ.get("WANDB_NAME"), dir=os.environ.get("WANDB_DIR"), job_type="evaluate",
                             reinit="finish_previous")
            run.summary.update(scalars)
            run.log({**scalars, "eval/generations": wandb.Table(columns=TABLE_COLUMNS, data=rows)})
            run.finish()
            done.append("wandb")
        except Exception as e:  # noqa: BLE001
            log.warning("W&B logging of the evaluation failed: %s", e)
    return done
