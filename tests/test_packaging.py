"""The package as users install it: a wheel (no editable install) in a fresh virtualenv, its console script, and
a dry run that finds the shipped recipe, constitution, seed data and held-out set outside the repository."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=600):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_installs_and_its_console_script_runs_a_dry_run(tmp_path):
    import shutil

    # built from a copy: a build in the checkout would leave build/ and *.egg-info there (and a stale build/lib
    # could slip old files into a later wheel)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                              "__pycache__"))
    wheels = tmp_path / "wheels"
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                 str(src)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("staged_alignment-*.whl")
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path).returncode == 0
    py = venv / "bin" / "python"
    proc = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the dependencies (torch, transformers, …) come from this environment's site-packages, added as a plain path:
    # its .pth files (this checkout's editable install among them) are not processed, so only the wheel provides
    # the project's own modules
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    (site / "deps-from-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    where = _run([str(py), "-c", "import staged_alignment.stages as s, staged_alignment.core as c, staged_alignment.trainers "
                  "as t; print(s.__file__); print(c.__file__); print(t.__file__)"], cwd=tmp_path, env=env)
    assert where.returncode == 0 and all(line.startswith(str(venv)) for line in where.stdout.split()), where
    # one top-level name in site-packages: none of the repository's folder names is importable on its own
    for generic in ("stages", "trainers", "data_builders", "evaluation", "core"):
        gone = _run([str(py), "-c", f"import {generic}"], cwd=tmp_path, env=env)
        assert gone.returncode == 1 and f"No module named '{generic}'" in gone.stderr, (generic, gone.stderr)
    tops = sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name not in (
        "pip", "_distutils_hack", "setuptools", "pkg_resources", "__pycache__"))
    assert tops == ["staged_alignment"], tops
    script = venv / "bin" / "staged-align"
    assert _run([str(script), "--help"], cwd=tmp_path, env=env).returncode == 0
    listed = _run([str(script), "configs"], cwd=tmp_path, env=env).stdout.split()
    assert any(p.startswith(str(venv)) and p.endswith("smollm2-135m_smoke-pipeline_cpu.yaml") for p in listed), listed
    proc = _run([str(script), "run", "--config", "configs/smollm2-135m_smoke-pipeline_cpu.yaml", "--dry-run",
                 f"output_dir={tmp_path / 'runs'}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "dry run: plan valid" in proc.stdout
    # the shipped constitution, not a file of this checkout
    assert (venv / "share" / "staged-alignment" / "constitutions" / "default.json").is_file()
    bad = _run([str(script), "train"], cwd=tmp_path, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: command line: staged-align: unknown verb 'train'")
