#!/usr/bin/env bash
# One GPU check of the whole stack: one command, no network, at most ~8 minutes on one GPU.
#
#   bash bench/gpu_check.sh                 # on a CUDA machine, from anywhere
#   PYTHON=/path/to/python GPU_WHEELS=/path/to/wheelhouse GPU_CHECK_BUDGET_S=470 bash bench/gpu_check.sh
#   GPU_CHECK_CPU_REHEARSAL=1 bash bench/gpu_check.sh   # the script's plumbing on a CPU, tiny model (figures mean nothing)
#
# 1. Stops with one line (exit 2) where no CUDA GPU is visible to torch: nothing else runs.
# 2. Installs the GPU extra from the local pins (requirements-gpu.txt) offline, from a wheelhouse if one exists
#    (GPU_WHEELS, default bench/wheels; made on a networked machine with
#    `pip download -r requirements.txt -r requirements-gpu.txt -d bench/wheels`). Without one, the packages already
#    installed are used and a variant whose package is missing reports "skipped".
# 3. Builds a TinyLlama-1.1B-shaped model with random weights (no download; step time and memory do not depend on the
#    weight values) and runs each variant of bench/gpu_paths.py in its own process (Unsloth must be imported before
#    transformers; a crash or an out-of-memory stays in its variant): bf16 LoRA with SDPA, QLoRA nf4, FlashAttention-2,
#    Liger, the Unsloth loader (SFT and DPO), the DPO and causal trainers, vLLM against transformers generation, and
#    2-GPU DDP where there are two GPUs. Variants that would start past the time budget report "skipped".
# 4. Writes bench/results-gpu.json (step time, tokens/s, peak GPU memory, MFU against the card's dense bf16 peak) and
#    prints a table.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
WHEELS="${GPU_WHEELS:-bench/wheels}"
OUT=bench/results-gpu.json
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled

# 1. a CUDA GPU, or one line
probe=$("$PY" -c '
import os, sys
try:
    import torch
except ImportError:
    print("gpu_check: torch is not importable from " + sys.executable + " (run make setup, or set PYTHON=); nothing was run")
    sys.exit(2)
if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_CPU_REHEARSAL") != "1":
    print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}: torch.cuda.is_available() is False); nothing was run")
    sys.exit(2)
print(torch.cuda.device_count() if torch.cuda.is_available() else 1)' 2>/dev/null)
status=$?
if [ $status -ne 0 ]; then
  echo "${probe:-gpu_check: $PY could not run; nothing was run}" | tail -n 1
  exit 2
fi
NGPU="$probe"

WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG="$WORK/log.txt"
echo "gpu_check: $NGPU GPU(s); log in $LOG; budget ${BUDGET}s"

# 2. the GPU extra, offline
if [ -d "$WHEELS" ]; then
  if "$PY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation -r requirements-gpu.txt >>"$LOG" 2>&1; then
    echo "gpu_check: GPU extra installed from $WHEELS"
  else
    echo "gpu_check: some GPU extras did not install from $WHEELS (see the log); their variants say so"
  fi
else
  echo "gpu_check: no wheelhouse at $WHEELS: using the packages already installed"
fi

# 3. the variants, one process each
TINY=(); SIZE=(--steps 6 --seq 512 --batch 8)
if [ "${GPU_CHECK_CPU_REHEARSAL:-0}" = 1 ]; then
  TINY=(--tiny); SIZE=(--steps 2 --seq 256 --batch 2)
  OUT="$WORK/results-gpu.json"
  echo "gpu_check: CPU rehearsal (tiny model): the figures mean nothing; written to $OUT, not bench/"
fi
MODEL=$("$PY" bench/gpu_paths.py ${TINY[@]+"${TINY[@]}"} --build-model "$WORK/model" 2>>"$LOG" | tail -n 1)
if [ ! -f "$MODEL/config.json" ]; then echo "gpu_check: building the model failed (see $LOG)"; exit 1; fi
ARGS=(--model-dir "$MODEL" "${SIZE[@]}")
RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
run_variant() {  # name, then the command
  local name="$1"; shift
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 30 ]; then
    echo "{\"variant\": \"$name\", \"skipped\": \"time budget (${BUDGET}s) spent\"}" >>"$RESULTS"
    return
  fi
  echo "gpu_check: $name (${left}s left)"
  local out="$WORK/$name.out"
  # output to a file, not a pipe: a leftover grandchild (vLLM engine, torchrun worker) cannot hold the script;
  # -k: SIGKILL 15 s after the budget's SIGTERM
  timeout -k 15 "$left" "$@" >"$out" 2>>"$LOG"
  cat "$out" >>"$LOG"
  out=$(grep '^GPU_RESULT ' "$out" | sed 's/^GPU_RESULT //')
  if [ -n "$out" ]; then echo "$out" >>"$RESULTS"
  else echo "{\"variant\": \"$name\", \"error\": \"no result (crashed or timed out; see the log)\"}" >>"$RESULTS"; fi
}
for v in bf16-sdpa qlora-sdpa bf16-fa2 bf16-sdpa-liger unsloth-sft dpo-bf16 unsloth-dpo causal-bf16 vllm-generate; do
  run_variant "$v" "$PY" bench/gpu_paths.py "${ARGS[@]}" --variants "$v"
done
if [ "$NGPU" -ge 2 ]; then
  run_variant ddp2-bf16-sdpa "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 bench/gpu_paths.py \
    "${ARGS[@]}" --variants bf16-sdpa --name ddp2-bf16-sdpa
else
  echo "{\"variant\": \"ddp2-bf16-sdpa\", \"skipped\": \"one GPU\"}" >>"$RESULTS"
fi

# 4. bench/results-gpu.json and the table
"$PY" - "$RESULTS" "$OUT" "$(( $(date +%s) - START ))" <<'PYEOF'
import json, os, sys, importlib.metadata as md
import torch
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
def version(pkg):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None
cuda = torch.cuda.is_available()
doc = {"gpu": torch.cuda.get_device_name() if cuda else "cpu (rehearsal)", "gpus": torch.cuda.device_count(),
       "torch": torch.__version__,
       "cuda": torch.version.cuda, "wall_s": int(sys.argv[3]),
       "packages": {p: version(p) for p in ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth",
                                            "vllm", "flash-attn", "liger-kernel", "deepspeed")},
       "results": rows}
tmp = sys.argv[2] + ".tmp"
with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
os.replace(tmp, sys.argv[2])
print(f"\n{doc['gpu']} x{doc['gpus']}, torch {doc['torch']} (CUDA {doc['cuda']}), {doc['wall_s']} s")
print(f"{'variant':18s} {'step s':>8s} {'tok/s':>9s} {'GiB':>6s} {'MFU':>6s}  note")
for r in rows:
    note = " ".join((r.get("skipped") or r.get("error") or "").split())
    if "vllm_tokens_per_s" in r:
        note = f"vLLM {r['vllm_tokens_per_s']} tok/s vs transformers {r['transformers_tokens_per_s']} ({r['vllm_over_transformers']}x)"
    step = f"{r['median_step_s']:8.3f}" if "median_step_s" in r else " " * 8
    tps = f"{r['tokens_per_s']:9.0f}" if "tokens_per_s" in r else " " * 9
    gib = f"{r['peak_gpu_gib']:6.1f}" if r.get("peak_gpu_gib") is not None else " " * 6
    mfu = f"{r['mfu']:6.1%}" if r.get("mfu") is not None else " " * 6
    print(f"{r['variant']:18s} {step} {tps} {gib} {mfu}  {note[:90]}")
print(f"\nwritten: {sys.argv[2]}")
PYEOF
