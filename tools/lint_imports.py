"""The import contracts of ``.importlinter``, run on the package as it installs.

In a checkout the subpackages of ``staged_alignment`` are the repository's top-level folders (``package-dir`` in
``pyproject.toml``), which grimp cannot walk, so this copies the ``.py`` files into ``<tmp>/staged_alignment/…`` by
that mapping and runs ``lint-imports`` there. Exit status: lint-imports' own (0 = every contract kept).

    python tools/lint_imports.py [--graph]     # --graph also prints the package-level import graph
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: tools/ is not a package on the path
    sys.path.insert(0, str(ROOT))

from tools.import_rules import package_files  # noqa: E402


def package_tree(dest: Path) -> Path:
    """Copy every module of the package (:func:`tools.import_rules.package_files`) to ``dest``, laid out as
    installed; returns ``dest``."""
    for module, src in package_files().items():
        parts = module.split(".")
        target = dest.joinpath(*parts, "__init__.py") if src.name == "__init__.py" else \
            dest.joinpath(*parts[:-1], parts[-1] + ".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return dest


def lint(tree: Path) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` with ``.importlinter`` on the package tree ``tree`` (see :func:`package_tree`)."""
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe) if exe.exists() else "lint-imports", str(ROOT / ".importlinter"), "--no-cache"]
    return subprocess.run(cmd, cwd=tree, env={"PYTHONPATH": str(tree), "PATH": str(Path(sys.executable).parent)},
                          capture_output=True, text=True, timeout=300)


def package_graph(tree: Path) -> list[str]:
    """One line per subpackage: the subpackages it imports (grimp, every import including those in functions)."""
    import grimp

    sys.path.insert(0, str(tree))
    g = grimp.build_graph("staged_alignment", cache_dir=None)
    pkgs = sorted(g.find_children("staged_alignment"))
    return [f"{a.split('.')[1]:>14} -> " + (", ".join(sorted(b.split(".")[1] for b in pkgs if b != a and g.direct_import_exists(
        importer=a, imported=b, as_packages=True))) or "-") for a in pkgs]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as tmp:
        proc = lint(package_tree(Path(tmp)))
        print(proc.stdout + proc.stderr, end="")
        if "--graph" in argv:
            print("\n".join(package_graph(Path(tmp))))
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
