"""Token cache: warm vs cold build of the tokenized triplet dataset (``build_token_cache``), time ratio.

The triplets are built once with the project's ``data_builders.triplets.build_triplets`` and written to JSONL:

* ``seed``: ``data_builders/seed/tasks.jsonl`` × ``attacks_train.json`` + ``attacks_train_canary.json`` (the smoke
  run's causal data);
* ``bipia``: every task of ``../shared/data/injection/bipia-train/{email,table,code}/train.jsonl`` × its
  ``text_attack_train.json`` / ``code_attack_train.json`` (larger, longer data; only when the folder exists).

Cold = ``build_token_cache(triplets, tokenizer, max_length, <fresh empty dir>)``: read and validate the JSONL,
fingerprint, tokenize the four sequences of every triplet through ``datasets.map`` and write the Arrow file.
Warm = the same call on the directory the previous build filled: everything but the tokenization (the JSONL is
still read and validated, the fingerprint still hashes the file and the tokenizer) and the Arrow file is
memory-mapped. Both return the same rows (checked). Runs alternate cold, warm after one warm-up of each; the
ratio is the median of the paired cold/warm ratios. Goal: cold / warm ≥ 20 (on the largest source).

    python bench/bench_token_cache.py [--reps 5] [--max-length 320] [--sources seed,bipia] [--quick]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ATTACKS_SEED,
    ATTACKS_SEED_CANARY,
    ROOT,
    TASKS_SEED,
    fill_hijacks,
    interleave,
    median,
    report,
    setup,
    smollm2_path,
)

GOAL = 20.0
BIPIA = ROOT.parent / "shared" / "data" / "injection" / "bipia-train"


def write_sources(tmp: Path, names: list[str], max_bipia: int | None) -> dict[str, Path]:
    from staged_alignment.data_builders.triplets import build_triplets, read_attacks, read_tasks, write_triplets

    out = {}
    if "seed" in names:
        res = build_triplets(read_tasks(str(TASKS_SEED)), [read_attacks(str(ATTACKS_SEED)),
                                                           read_attacks(str(ATTACKS_SEED_CANARY))], seed=42)
        out["seed"] = write_triplets(tmp / "seed.jsonl", fill_hijacks(res.triplets))
    if "bipia" in names and BIPIA.is_dir():
        tasks = []
        for kind in ("email", "table", "code"):
            f = BIPIA / kind / "train.jsonl"
            if f.is_file():
                tasks += read_tasks(str(f), "bipia", max_rows=max_bipia)
        attacks = [read_attacks(str(f)) for f in (BIPIA / "text_attack_train.json", BIPIA / "code_attack_train.json")
                   if f.is_file()]
        if tasks and attacks:
            res = build_triplets(tasks, attacks, seed=42)
            out["bipia"] = write_triplets(tmp / "bipia.jsonl", fill_hijacks(res.triplets))
    return out


def bench_source(name: str, path: Path, tok, max_length: int, reps: int, tmp: Path) -> dict:
    from staged_alignment.data_builders.token_cache import build_token_cache

    warm_dir = tmp / f"{name}-warm"
    build_token_cache(path, tok, max_length, warm_dir)  # fill the warm cache once
    seen: dict[str, object] = {}
    n = [0]

    def cold():
        n[0] += 1
        d = tmp / f"{name}-cold-{n[0]}"
        t0 = time.perf_counter()
        ds, info = build_token_cache(path, tok, max_length, d)
        dt = time.perf_counter() - t0
        assert not info.from_cache
        seen["cold"] = (ds, info)
        shutil.rmtree(d, ignore_errors=True)
        return dt

    def warm():
        t0 = time.perf_counter()
        ds, info = build_token_cache(path, tok, max_length, warm_dir)
        dt = time.perf_counter() - t0
        assert info.from_cache
        seen["warm"] = (ds, info)
        return dt

    res = interleave({"cold": cold, "warm": warm}, reps=reps, warmup=1)
    (cds, cinfo), (wds, _) = seen["cold"], seen["warm"]
    same = cds.to_list() == wds.to_list()
    ratios = [c / w for c, w in zip(res["cold"], res["warm"])]
    return {f"{name}_triplets": cinfo.n_total, f"{name}_kept": cinfo.n_kept,
            f"{name}_triplet_file_kib": round(path.stat().st_size / 1024, 1),
            f"{name}_cold_s": round(median(res["cold"]), 4), f"{name}_warm_s": round(median(res["warm"]), 4),
            f"{name}_ratio": round(median(ratios), 2), f"{name}_paired_ratios": [round(r, 1) for r in ratios],
            f"{name}_same_rows": same}


def warm_breakdown(path: Path, tok, max_length: int, tmp: Path) -> dict:
    """Where the warm build's time goes (one call each, for the README): read+validate, fingerprint, load."""
    from staged_alignment.data_builders.token_cache import cache_fingerprint
    from staged_alignment.data_builders.triplets import read_triplets

    t0 = time.perf_counter()
    read_triplets(path)
    t1 = time.perf_counter()
    cache_fingerprint(path, tok, max_length)
    t2 = time.perf_counter()
    return {"warm_read_validate_s": round(t1 - t0, 4), "warm_fingerprint_s": round(t2 - t1, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved cold/warm rounds after one warm-up each")
    ap.add_argument("--max-length", type=int, default=320, help="the shared-data config's max_seq_length")
    ap.add_argument("--sources", default="seed,bipia")
    ap.add_argument("--max-bipia", type=int, default=None, help="tasks per BIPIA task file (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 rounds, at most 100 BIPIA tasks per file")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.max_bipia = 2, a.max_bipia or 100
    setup(a.threads)
    from staged_alignment.core.config import ModelSection
    from staged_alignment.core.models import load_tokenizer

    tok = load_tokenizer(smollm2_path(), ModelSection())
    figures = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sources = write_sources(tmp, a.sources.split(","), a.max_bipia)
        if "bipia" in a.sources and "bipia" not in sources:
            figures["bipia_skipped"] = f"{BIPIA} not found"
        for name, path in sources.items():
            figures.update(bench_source(name, path, tok, a.max_length, a.reps, tmp))
        main_src = "bipia" if "bipia" in sources else next(iter(sources))
        figures.update(warm_breakdown(sources[main_src], tok, a.max_length, tmp))
    value = figures[f"{main_src}_ratio"]
    report("token_cache", figures, headline=f"cold / warm build_token_cache time ({main_src} triplets)",
           value=value, goal=f">= {GOAL}", met=value >= GOAL,
           notes=f"max_length {a.max_length}, SmolLM2 tokenizer (Zephyr template), median of paired cold/warm "
                 f"ratios over {a.reps} rounds; cold = fresh cache dir, warm = the same filled dir")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
