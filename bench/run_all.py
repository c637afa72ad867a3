"""Run the benchmarks, each as its own process, collect their ``BENCH_RESULT`` lines, print a table and write
``bench/results.json`` atomically (``make bench`` calls this).

Benchmarks run one after the other (never in parallel: they time the same CPU). A benchmark that fails or
prints no ``BENCH_RESULT`` is recorded with its exit status and the tail of its output, and the others still
run. With ``--only``, the entries of the other benchmarks already in the results file are kept.

    python bench/run_all.py [--quick] [--only generation,token_cache] [--out bench/results.json] [--verbose]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name (as in BENCH_RESULT) → script; run in this order
BENCHES = {
    "stage_overhead": "bench_stage_overhead.py",
    "generation": "bench_generation.py",
    "token_cache": "bench_token_cache.py",
    "causal_step": "bench_causal_step.py",
    "length_grouping": "bench_length_grouping.py",
    "memory": "bench_memory.py",
    "utilisation": "bench_utilisation.py",
    "attacks": "bench_attacks.py",
}


def run_one(name: str, script: str, extra: list[str], verbose: bool) -> dict:
    cmd = [sys.executable, str(HERE / script), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    t0 = time.perf_counter()
    tail: deque[str] = deque(maxlen=40)
    result = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=str(HERE.parent)) as p:
        for line in p.stdout:
            if line.startswith("BENCH_RESULT "):
                result = json.loads(line[len("BENCH_RESULT "):])
            else:
                tail.append(line.rstrip("\n"))
                if verbose:
                    print("   | " + line, end="", flush=True)
        rc = p.wait()
    wall = round(time.perf_counter() - t0, 1)
    if result is None or rc != 0:
        return {"name": name, "error": f"exit status {rc}" + ("" if result is None else " after BENCH_RESULT"),
                "output_tail": "\n".join(tail), "wall_s": wall, "command": " ".join(cmd[1:]),
                **({"partial": result} if result else {})}
    result.update(wall_s=wall, command=" ".join(["python", *[str(Path(c).relative_to(HERE.parent))
                                                              if c.startswith(str(HERE)) else c for c in cmd[1:]]]))
    return result


def write_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fmt_value(r: dict) -> str:
    return "error" if "error" in r else f"{r['value']:.3g}"


def table(results: list[dict]) -> str:
    rows = [("benchmark", "value", "goal", "met", "wall s", "headline")]
    for r in results:
        met = "-" if r.get("met") is None else ("yes" if r["met"] else "NO")
        rows.append((r["name"], fmt_value(r), str(r.get("goal") or "-"), "error" if "error" in r else met,
                     str(r.get("wall_s", "")), r.get("headline", r.get("error", ""))))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    out = []
    for i, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * 8)
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (a check, not figures)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--verbose", action="store_true", help="echo each benchmark's output")
    a = ap.parse_args(argv)
    names = list(BENCHES) if not a.only else [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHES)}")
    extra = ["--quick"] if a.quick else []
    results = []
    for n in names:
        print(f"== {n}: python bench/{BENCHES[n]} {' '.join(extra)}".rstrip(), flush=True)
        r = run_one(n, BENCHES[n], extra, a.verbose)
        r["quick"] = a.quick
        results.append(r)
        if "error" in r:
            print(f"   FAILED ({r['error']}, {r['wall_s']} s):\n" + "\n".join("   | " + x for x in
                                                                         r["output_tail"].splitlines()[-15:]))
        else:
            print(f"   {r['headline']} = {r['value']:.3f}" + (f" (goal {r['goal']})" if r.get("goal") else "") +
                  f"  [{r['wall_s']} s]", flush=True)

    out = Path(a.out)
    merged = {r["name"]: r for r in results}
    if a.only and out.is_file():
        try:
            old = json.loads(out.read_text())
            merged = {**{r["name"]: r for r in old.get("results", [])}, **merged}
        except (ValueError, KeyError, AttributeError):
            pass
    order = [n for n in BENCHES if n in merged] + [n for n in merged if n not in BENCHES]
    doc = {"written": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "results": [merged[n] for n in order]}
    write_atomic(out, doc)
    print("\n" + table(results))
    print(f"\nwrote {out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
