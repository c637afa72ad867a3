"""The rule for imports inside functions, checked by ``tests/test_layers.py``.

A module imports what it needs at its top. An import inside a function is allowed only for a reason in
:data:`LAZY_REASONS`: an optional dependency that a CPU install lacks, or a module whose import costs start-up time
that validation, ``--help`` and ``--dry-run`` should not pay (figures: ``python -X importtime`` on the 2-core
development machine). A project module counts as costly when its own top-level imports reach one of those
(:func:`costly_modules`); everything else (the standard library, yaml, numpy, tqdm, filelock, light project modules)
is imported at the top.

    python tools/import_rules.py          # prints each import inside a function that breaks the rule
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

START_UP = "start-up cost: validation, --help and --dry-run never import it"
OPTIONAL = "optional: not installed on a CPU machine (a GPU extra or a tracker)"
LAZY_REASONS = {
    "torch": START_UP + " (6.1 s)",
    "transformers": START_UP + " (3.5 s, and it pulls torch)",
    "trl": START_UP + " (pulls transformers and torch)",
    "peft": START_UP + " (pulls transformers and torch)",
    "accelerate": START_UP + " (1.4 s)",
    "datasets": START_UP + " (1.9 s)",
    "huggingface_hub": START_UP + " (its HTTP client stack; only fetching and pushing need it)",
    "safetensors": START_UP + " (pulls torch for its torch API)",
    "matplotlib": START_UP + " (0.5 s; only the report's plots)",
    "statsmodels": START_UP + " (5.2 s; only the paired tests and intervals)",
    "scipy": START_UP + " (0.9 s)",
    "sklearn": START_UP + " (1.2 s)",
    "causallearn": START_UP + " (pulls torch; only the PC check)",
    "hyppo": START_UP + " (3.6 s; only the HSIC check)",
    "gguf": START_UP + " (only the one-time conversion of the embedded model)",
    "wandb": OPTIONAL + " (and 0.9 s)",
    "openai": OPTIONAL + " (an OpenAI-compatible critic or judge, 1.4 s)",
    "unsloth": OPTIONAL, "unsloth_zoo": OPTIONAL, "vllm": OPTIONAL, "deepspeed": OPTIONAL,
    "bitsandbytes": OPTIONAL, "flash_attn": OPTIONAL, "liger_kernel": OPTIONAL, "kernels": OPTIONAL,
    "grimp": "development tool: only tools/lint_imports.py --graph",
}


def package_files() -> dict[str, Path]:
    """``{module name: file}`` of every module of the package, from ``package-dir`` in ``pyproject.toml``."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = {}
    for name, folder in mapping.items():
        for py in sorted((ROOT / folder).rglob("*.py")):
            rel = py.relative_to(ROOT / folder).with_suffix("")
            if "__pycache__" in rel.parts or (name == "staged_alignment" and len(rel.parts) > 1):
                continue
            mod = ".".join((name, *rel.parts)).removesuffix(".__init__")
            sub = ".".join(mod.split(".")[:2])
            if name == "staged_alignment" and sub in mapping and sub != name:
                continue
            out.setdefault(mod, py)
    return out


@dataclass(frozen=True)
class Import:
    """One import statement: the importing module, its line, the module imported, and whether it is inside a
    function."""
    module: str
    line: int
    target: str
    in_function: bool


def imports_of(module: str, path: Path, modules: set[str]) -> list[Import]:
    """Every import statement of ``path``, ``from X import y`` resolved to ``X.y`` when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[Import] = []

    def walk(node, infn: bool):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.Import):
                out.extend(Import(module, ch.lineno, a.name, infn) for a in ch.names)
            elif isinstance(ch, ast.ImportFrom) and not ch.level and ch.module:
                for a in ch.names:
                    sub = f"{ch.module}.{a.name}"
                    out.append(Import(module, ch.lineno, sub if sub in modules else ch.module, infn))
            elif isinstance(ch, ast.If) and isinstance(ch.test, ast.Name) and ch.test.id == "TYPE_CHECKING":
                continue
            walk(ch, infn or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return out


def costly_modules(files: dict[str, Path] | None = None) -> dict[str, str]:
    """``{project module: the costly dependency its top-level imports reach}`` (transitively)."""
    files = files or package_files()
    mods = set(files)
    top = {m: [i.target for i in imports_of(m, p, mods) if not i.in_function] for m, p in files.items()}
    memo: dict[str, str | None] = {}

    def reach(m: str, seen: frozenset) -> str | None:
        if m in memo:
            return memo[m]
        found = None
        for t in top.get(m, []):
            root = t.split(".")[0]
            if root in LAZY_REASONS:
                found = root
            elif t in files and t not in seen:
                found = reach(t, seen | {t})
            if found:
                break
        memo[m] = found
        return found

    return {m: r for m in files if (r := reach(m, frozenset({m})))}


def violations(files: dict[str, Path] | None = None) -> list[str]:
    """``file:line: module`` for each import inside a function that the rule does not allow (``files``: ``{module:
    path}``, default the package's)."""
    files = files or package_files()
    costly = costly_modules(files)
    out = []
    for m, p in files.items():
        for i in imports_of(m, p, set(files)):
            if not i.in_function:
                continue
            root = i.target.split(".")[0]
            if root in LAZY_REASONS or i.target in costly:
                continue
            out.append(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}:{i.line}: {i.target}")
    return out


def counts() -> dict[str, int]:
    """Import statements of the package: all, and those inside functions."""
    files = package_files()
    mods = set(files)
    stmts = {(m, i.line, i.in_function) for m, p in files.items() for i in imports_of(m, p, mods)}
    return {"imports": len(stmts), "inside_functions": sum(1 for s in stmts if s[2])}


if __name__ == "__main__":
    v = violations()
    print("\n".join(v))
    print(counts(), f"{len(v)} not allowed", file=sys.stderr)
    sys.exit(1 if v else 0)
