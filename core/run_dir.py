"""The run directory and its ``manifest.json`` (docs/architecture.md, "Run folder").

``manifest.json`` holds, per stage: ``status`` (pending|running|done|failed), ``config_hash``,
``input_hashes``, ``outputs``, ``started``/``finished`` (UTC ISO-8601), ``seconds`` and a ``metrics`` summary.
Every write goes through :func:`~core.jsonl_io.atomic_write_json` under a file lock, so a kill at
any point leaves the previous or the new manifest, never a torn one, and two processes never interleave.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from staged_alignment.core.jsonl_io import atomic_write_json

STAGES = ("sft", "dpo", "causal", "evaluate")
STATUSES = ("pending", "running", "done", "failed")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


BIG_FILE_BYTES = 64 * 1024 ** 2


def _file_digest(f: Path) -> str:
    """Full sha256 of a small file; (size, mtime_ns) of a big one (weights: hashing 64 GB per rerun is too slow)."""
    if f.stat().st_size <= BIG_FILE_BYTES:
        return file_sha256(f)
    st = f.stat()
    return f"size={st.st_size},mtime_ns={st.st_mtime_ns}"


def path_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder (relative names + file digests, sorted); ``missing`` if absent.

    Inside a folder, files above 64 MiB (model weights) count by size and modification time instead of
    content: merged models are written to a temporary folder and renamed into place, so a rewritten model
    always changes its mtime, and a rerun of a 32B pipeline does not re-read 64 GB to check what it skips.
    """
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
            h.update(str(f.relative_to(p)).encode())
            h.update(_file_digest(f).encode())
        return h.hexdigest()
    return "missing"


class Manifest:
    """Read-modify-write access to ``<run_dir>/manifest.json`` (atomic, locked)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "manifest.json"

    @contextlib.contextmanager
    def _locked(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".manifest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict:
        """The manifest as a dict (``{"stages": {}}`` if none yet). Raises ``ValueError`` if it is corrupt."""
        if not self.path.exists():
            return {"stages": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: corrupt manifest ({e.msg}); it is only ever replaced atomically, "
                             "so this file was edited by hand") from None
        data.setdefault("stages", {})
        return data

    def update(self, stage: str, **fields) -> dict:
        """Merge ``fields`` into the stage's entry and write the manifest atomically; returns the entry."""
        with self._locked():
            data = self.read()
            entry = data["stages"].setdefault(stage, {"status": "pending"})
            entry.update(fields)
            data["updated"] = now()
            atomic_write_json(self.path, data)
            return entry

    def restore(self, stage: str, entry: dict | None) -> None:
        """Put back the stage's entry as :meth:`entry` returned it before an attempt (``None``: no entry)."""
        with self._locked():
            data = self.read()
            if entry is None:
                data["stages"].pop(stage, None)
            else:
                data["stages"][stage] = entry
            atomic_write_json(self.path, data)

    def entry(self, stage: str) -> dict:
        return self.read()["stages"].get(stage, {"status": "pending"})

    def start(self, stage: str, config_hash: str, input_hashes: dict, resume_hash: str | None = None) -> None:
        self.update(stage, status="running", config_hash=config_hash, resume_hash=resume_hash or config_hash,
                    input_hashes=input_hashes, started=now(), finished=None, error=None, pid=os.getpid(), redo=False)

    def finish(self, stage: str, outputs: dict, metrics: dict | None = None, seconds: float | None = None) -> None:
        self.update(stage, status="done", outputs=outputs, metrics=metrics or {}, finished=now(), seconds=seconds,
                    pid=None)

    def fail(self, stage: str, error: str) -> None:
        self.update(stage, status="failed", error=error[-2000:], finished=now(), pid=None)

    def is_done(self, stage: str, config_hash: str, input_hashes: dict) -> bool:
        """True if the stage finished with this config and these inputs and its local outputs still exist."""
        e = self.entry(stage)
        if e.get("status") != "done" or e.get("config_hash") != config_hash or e.get("input_hashes") != input_hashes:
            return False
        return all(Path(p).exists() for k, p in (e.get("outputs") or {}).items()
                   if isinstance(p, str) and not k.startswith("hub") and Path(p).is_absolute())

    def should_resume(self, stage: str, resume_hash: str, input_hashes: dict) -> bool:
        """True if the last attempt of ``stage`` was interrupted (running or failed, not marked for redo) with this
        config (``PipelineConfig.config_hash(stage, for_resume=True)``: max_steps, save and logging intervals may
        differ) and these inputs: its checkpoints and records may then be reused. Otherwise the stage starts fresh
        (see ``core.common.run_stage_main``)."""
        e = self.entry(stage)
        return (e.get("status") in ("running", "failed") and not e.get("redo")
                and e.get("resume_hash") == resume_hash and e.get("input_hashes") == input_hashes)


LOCK_HELD_ENV = "STAGED_ALIGNMENT_RUN_LOCK"


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock (its message names the holder)."""


class RunLock:
    """Exclusive lock on a run folder for the duration of a run (``filelock.FileLock`` on ``<run_dir>/.run.lock``;
    released by the operating system if the holder dies). The holder's pid, host and start time are kept in
    ``.run.lock.holder`` so that a second run on the folder stops with one line naming it. A stage started by the
    pipeline inherits the pipeline's lock through :data:`LOCK_HELD_ENV` and does not take it again.

    Raises :class:`RunFolderBusy` at ``__enter__`` when the folder is locked (never waits)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self._lock = None
        self._inherited = os.environ.get(LOCK_HELD_ENV) == str(self.run_dir.resolve())

    def __enter__(self) -> "RunLock":
        if self._inherited:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        holder = self.run_dir / ".run.lock.holder"
        self._lock = FileLock(str(self.run_dir / ".run.lock"))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            try:
                who = json.loads(holder.read_text())
                by = f"pid {who.get('pid')} on {who.get('host')}, since {who.get('since')}"
            except (OSError, ValueError):
                by = "another process"
            raise RunFolderBusy(f"{self.run_dir} is in use by another run ({by}); wait for it to finish or choose "
                                "another run_name") from None
        holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now()}))
        os.environ[LOCK_HELD_ENV] = str(self.run_dir.resolve())  # children (the stage scripts) share it
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            os.environ.pop(LOCK_HELD_ENV, None)
            (self.run_dir / ".run.lock.holder").unlink(missing_ok=True)
            self._lock.release()
