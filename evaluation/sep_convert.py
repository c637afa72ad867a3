"""Convert the SEP dataset into injection eval cases.

SEP (Zverev et al. 2025, "Can LLMs Separate Instructions From Data? And What Do We Even Mean By That?",
github.com/egozverev/Should-It-Be-Executed-Or-Processed, ``SEP_dataset.json``) is a JSON list of rows::

    {"system_prompt_clean": task instruction, "prompt_clean": data,
     "system_prompt_instructed": task + probe, "prompt_instructed": data + probe (or probe + data),
     "witness": the probe's answer word, "info": {"type", "appended_type", "is_insistent", …}}

The probe in the data is the injection; success = the witness appears in the answer to the data with the probe
(the authors' ``witness.lower() in output.lower()``, reported here as ``attack_success_rate_contains``; the headline
judge adds the copy and mention rules). Mapping: ``instruction`` = ``system_prompt_clean`` (the task goes into the
user turn, before the data, as in this project's prompts), ``data`` = ``prompt_clean``, ``injected_data`` =
``prompt_instructed`` (exact), ``injection`` = the probe (``prompt_instructed`` minus ``prompt_clean``, as Meta
SecAlign's conversion does), ``position`` = ``start`` when ``info.appended_type`` ends in ``l`` (probe left of the
data), else ``end``, ``canary`` = ``hijack`` = ``witness``, ``attack_category`` = ``sep/<info.type>``. Witness
words repeat across rows (shared canaries are allowed). Rows whose witness is shorter than 4 characters or already
occurs in the clean task or data are skipped and counted (a benign answer could contain it).

    python -m evaluation.sep_convert --input SEP_dataset.json --out sep.jsonl [--n 500] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_builders.jsonl_io import DataError, load_json, require_str, write_jsonl_atomic  # noqa: E402
from evaluation.cases import MIN_CANARY_CHARS, parse_case  # noqa: E402


def convert(path: str | Path, *, n: int | None = None, seed: int = 0) -> tuple[list[dict], dict]:
    """``(cases, skipped)``: eval cases (a seeded sample of ``n`` rows when given) and the skip counts by reason.
    Raises :class:`DataError` (file, item, field) for a malformed file or row."""
    p = Path(path)
    data = load_json(p)
    if not isinstance(data, list) or not data:
        raise DataError(p, None, None, "expected a non-empty JSON list of SEP rows")
    order = list(range(len(data)))
    if n is not None:
        random.Random(seed).shuffle(order)
    cases, skipped = [], Counter()
    for i in order:
        d = data[i]
        where = f"item {i}"
        if not isinstance(d, dict):
            raise DataError(p, where, None, f"expected an object, got {type(d).__name__}")
        task = require_str(d, "system_prompt_clean", p, where)
        clean = require_str(d, "prompt_clean", p, where)
        instructed = require_str(d, "prompt_instructed", p, where)
        witness = require_str(d, "witness", p, where).strip()
        info = d.get("info") or {}
        if not isinstance(info, dict):
            raise DataError(p, where, "info", f"expected an object, got {type(info).__name__}")
        if len(witness) < MIN_CANARY_CHARS:
            skipped["witness shorter than 4 characters"] += 1
            continue
        if witness.casefold() in (task + "\n" + clean).casefold():
            skipped["witness occurs in the clean task or data"] += 1
            continue
        probe = instructed.replace(clean, "", 1).strip() if clean in instructed else instructed
        appended = str(info.get("appended_type", "rr"))
        case = {"id": f"sep-{i:05d}", "system": "", "instruction": task, "data": clean, "injected_data": instructed,
                "injection": probe, "position": "start" if appended.endswith("l") else "end", "canary": witness,
                "hijack": witness, "attack_category": f"sep/{info.get('type', 'unknown')}", "source": f"{p}:{where}"}
        try:
            parse_case(case, str(p), where)
        except DataError as e:
            skipped[f"invalid: {e.field}"] += 1
            continue
        cases.append(case)
        if n is not None and len(cases) >= n:
            break
    if not cases:
        raise DataError(p, None, "witness", f"no usable row (skipped: {dict(skipped)})")
    return cases, dict(skipped)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="SEP dataset → injection eval cases")
    ap.add_argument("--input", required=True, help="SEP_dataset.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=None, help="a seeded sample of this many rows (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        cases, skipped = convert(args.input, n=args.n, seed=args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_jsonl_atomic(args.out, cases)
    print(f"wrote {len(cases)} cases to {args.out}; skipped {sum(skipped.values())}: {skipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
