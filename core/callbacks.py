"""Callbacks shared by every stage's trainer: non-finite/exploding loss guard and SIGTERM checkpointing."""
from __future__ import annotations

import logging
import math
import signal

from transformers import TrainerCallback

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss (or a loss above the explosion threshold); the last good checkpoint is kept."""


class LossGuardCallback(TrainerCallback):
    """Stop training with :class:`NonFiniteLossError` when a logged loss is NaN/inf or explodes.

    Explosion: ``loss > explode_factor × min(loss seen so far)`` after ``warmup`` logged values
    (disabled with ``explode_factor=None``). Checked on every log, i.e. every ``logging_steps``.
    No checkpoint is written after a bad loss, so the last checkpoint on disk is the last good one.
    """

    def __init__(self, explode_factor: float | None = 20.0, warmup: int = 3):
        self.explode_factor, self.warmup = explode_factor, warmup
        self.best = math.inf
        self.seen = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss} at step {state.global_step}; stopped, last good checkpoint kept "
                                     f"in {args.output_dir}")
        self.seen += 1
        if self.explode_factor and self.seen > self.warmup and loss > self.explode_factor * max(self.best, 1e-8):
            raise NonFiniteLossError(f"loss exploded to {loss:.4g} (> {self.explode_factor}× best {self.best:.4g}) at "
                                     f"step {state.global_step}; stopped, last good checkpoint kept in {args.output_dir}")
        self.best = min(self.best, loss)


class SigtermCheckpointCallback(TrainerCallback):
    """On SIGTERM, save a checkpoint at the end of the current step and stop training cleanly.

    The stage then exits non-zero (see ``core.common.raise_if_terminated``) and a rerun resumes from that
    checkpoint. SIGKILL cannot be caught: then the last periodic checkpoint is used.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        def handler(signum, frame):
            log.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not in the main thread
            self._previous = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
