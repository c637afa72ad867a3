"""The interface every stage script implements, so the entry point and the pipeline call stages one way.

A stage validates once: ``validate(cfg)`` parses every input and setting without loading a model and returns the
stage's plan (a dataclass of what it parsed: ``SFTPlan``, ``DPOPlan``, ``CausalPlan``, ``EvalPlan``), and
``run(cfg, plan)`` trains or evaluates from that plan without parsing again. The entry point
(:func:`core.common.run_stage_main`) and the pipeline's up-front check (``stages/pipeline.py``) call ``validate``.

A stage script module is the implementation (PEP 544: a module can satisfy a protocol): it defines the two
constants and five functions below at its top level.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stage(Protocol):
    """One stage of the pipeline (``stages/stage0_sft.py``, ``stage1_dpo.py``, ``stage2_causal.py``,
    ``evaluate.py``).

    ``STAGE``: its name (``sft``, ``dpo``, ``causal``, ``evaluate``), the manifest key and config section.
    ``MAIN_PROCESS_ONLY``: True when, under several processes, only the main one runs it (the others exit 0).
    """

    STAGE: str
    MAIN_PROCESS_ONLY: bool

    def validate(self, cfg) -> Any:
        """Every input and setting, parsed and checked, no model loaded: the stage's plan. Raises ``DataError``
        (file, line, field) or ``ConfigError``."""

    def check_upstream(self, cfg) -> None:
        """What an earlier stage must have produced (its merged model), checked before the run starts. Raises
        ``FileNotFoundError`` or ``ConfigError``."""

    def input_paths(self, cfg) -> dict[str, str]:
        """``{name: path or Hub id}`` of the inputs whose hashes the manifest records (a change reruns the
        stage)."""

    def resume_state(self, cfg) -> list[Path]:
        """The files a rerun resumes from (checkpoints, append-only records), set aside when the stage starts
        fresh."""

    def run(self, cfg, plan) -> dict:
        """Run from ``plan`` (what ``validate`` returned); returns ``{"outputs": {...}, "metrics": {...}}``."""
