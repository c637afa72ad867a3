"""``bench/gpu_check.sh`` on a machine without a GPU: one clear line, exit 2, nothing run, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_check_stops_with_one_line_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the script would run for real")
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_CPU_REHEARSAL"}
    env["PYTHON"] = sys.executable
    before = (ROOT / "bench" / "results-gpu.json").stat().st_mtime if (ROOT / "bench" / "results-gpu.json").exists() \
        else None
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU visible"), lines
    assert "Traceback" not in proc.stderr
    after = (ROOT / "bench" / "results-gpu.json").stat().st_mtime if (ROOT / "bench" / "results-gpu.json").exists() \
        else None
    assert before == after  # nothing written


def test_gpu_check_names_a_python_that_cannot_run(tmp_path):
    env = dict(os.environ, PYTHON=str(tmp_path / "no-such-python"))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).strip() == f"gpu_check: {tmp_path / 'no-such-python'} could not run; nothing was run"
