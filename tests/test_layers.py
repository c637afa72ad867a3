"""The package's import structure: one namespace, the layer contracts of ``.importlinter`` (no upward import, no
cycle) and the rule for imports inside functions (``tools/import_rules.py``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import import_rules as R
from tools import lint_imports as L


def test_import_contracts_hold_and_an_upward_import_breaks_them(tmp_path):
    tree = L.package_tree(tmp_path / "ok")
    proc = L.lint(tree)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout
    # the same tree with core reaching up into a stage script, and two evaluation modules importing each other
    bad = L.package_tree(tmp_path / "bad")
    cfg = bad / "staged_alignment" / "core" / "config.py"
    cfg.write_text(cfg.read_text() + "\nfrom staged_alignment.stages import pipeline  # noqa\n")
    cases = bad / "staged_alignment" / "evaluation" / "cases.py"
    cases.write_text(cases.read_text() + "\nfrom staged_alignment.evaluation import metrics  # noqa\n")
    proc = L.lint(bad)
    assert proc.returncode == 1 and "Contracts: 0 kept, 2 broken." in proc.stdout, proc.stdout[-3000:]
    assert "staged_alignment.core.config -> staged_alignment.stages.pipeline" in proc.stdout
    assert ".metrics -> .cases" in proc.stdout or ".cases -> .metrics" in proc.stdout


def test_the_layers_as_built():
    """The package-level import graph (grimp, every import including those inside functions), as
    ``python tools/lint_imports.py --graph`` prints it: a subprocess, since this process has the checkout's
    ``staged_alignment`` imported."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "lint_imports.py"), "--graph"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    graph = {a.strip(): b.strip() for a, b in (line.split("->") for line in proc.stdout.splitlines() if "->" in line
                                               and "staged_alignment" not in line)}
    assert graph == {"core": "-", "data_builders": "core", "trainers": "core, data_builders",
                     "evaluation": "core, data_builders, trainers",
                     "stages": "core, data_builders, evaluation, trainers"}


def test_every_module_is_in_the_namespace():
    files = R.package_files()
    assert all(m == "staged_alignment" or m.startswith("staged_alignment.") for m in files)
    assert {"staged_alignment.core.config", "staged_alignment.evaluation.runner",
            "staged_alignment.stages.pipeline", "staged_alignment.trainers.causal"} <= set(files)
    # no module imports a repository folder by its bare name (it would load a second copy of the module)
    bare = [f"{i.module}:{i.line} {i.target}" for m, p in files.items() for i in R.imports_of(m, p, set(files))
            if i.target.split(".")[0] in ("stages", "trainers", "data_builders", "evaluation", "core")]
    assert bare == []


def test_imports_inside_functions_have_a_reason():
    assert R.violations() == []
    n = R.counts()
    assert n["inside_functions"] < n["imports"] / 3, n


def test_the_rule_flags_a_light_import_in_a_function_and_allows_a_costly_one(tmp_path):
    light = tmp_path / "light.py"
    light.write_text("import json\n")
    heavy = tmp_path / "heavy.py"
    heavy.write_text("import torch\n")
    user = tmp_path / "user.py"
    user.write_text("def f():\n    import json\n    import torch\n    from pkg import heavy\n    from pkg.light import x\n"
                    "    import unsloth\n    return x\n")
    files = {"pkg.light": light, "pkg.heavy": heavy, "pkg.user": user}
    assert R.costly_modules(files) == {"pkg.heavy": "torch"}
    assert [v.split(":", 1)[1] for v in R.violations(files)] == ["2: json", "5: pkg.light"]
