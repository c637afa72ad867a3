"""``staged-align``: the console script a ``pip install`` provides (TRL-like: one command, a verb per stage).

    staged-align run    --config C [--dry-run [--target cuda]] [--smoke] [overrides]   # stages/pipeline.py
    staged-align sft    --config C [overrides]        # stages/stage0_sft.py   (also dpo, causal)
    staged-align eval   --config C [--model M …]      # stages/evaluate.py
    staged-align ablate --config C [--arms …]         # stages/ablate.py
    staged-align configs                              # the recipes this install ships
    staged-align dpo --accelerate [--accelerate-config F] --config C …   # through `accelerate launch -m staged_alignment.stages.…`

Overrides are the scripts' own (``key=value`` or ``--key value``). ``--accelerate`` re-runs the stage under
``accelerate launch`` (with ``--accelerate-config F``: ``--config_file F``), exactly as
``accelerate launch stages/stage1_dpo.py …`` would; every exit code is the stage's own.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from staged_alignment.core.config import SHARE

VERBS = {"run": "staged_alignment.stages.pipeline", "sft": "staged_alignment.stages.stage0_sft", "dpo": "staged_alignment.stages.stage1_dpo",
         "causal": "staged_alignment.stages.stage2_causal", "eval": "staged_alignment.stages.evaluate", "evaluate": "staged_alignment.stages.evaluate",
         "ablate": "staged_alignment.stages.ablate"}
USAGE = ("usage: staged-align {run,sft,dpo,causal,eval,ablate,configs} [--accelerate [--accelerate-config F]] "
         "--config C [options and overrides]\n(see: staged-align <verb> --help)")


def bundled_configs() -> list[Path]:
    """The recipe YAMLs next to this code (a checkout) or under ``<prefix>/share/staged-alignment`` (a wheel)."""
    roots = [Path(__file__).resolve().parents[1] / "configs", Path(sys.prefix).joinpath(*SHARE) / "configs"]
    return sorted({p for r in roots if r.is_dir() for p in r.glob("*.yaml")})


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__.strip())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb == "configs":
        for p in bundled_configs():
            print(p)
        return 0
    if verb not in VERBS:
        print(f"error: command line: staged-align: unknown verb {verb!r}\n{USAGE}", file=sys.stderr)
        return 2
    if "--accelerate" in rest:
        rest = [a for a in rest if a != "--accelerate"]
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        if "--accelerate-config" in rest:
            i = rest.index("--accelerate-config")
            if i + 1 >= len(rest):
                print("error: command line: staged-align: --accelerate-config needs a file", file=sys.stderr)
                return 2
            launch += ["--config_file", rest[i + 1]]
            rest = rest[:i] + rest[i + 2:]
        return subprocess.call(launch + ["-m", VERBS[verb], *rest])
    return importlib.import_module(VERBS[verb]).main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
