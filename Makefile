# `make demo` and `make test` each create the environment they need (.venv) first.
VENV := .venv/bin
export VLLM_CPU_OMP_THREADS_BIND ?= 0-1
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: env demo test test-fast lint fallback-demo

env:
	@bash scripts/setup-env.sh

demo: env
	$(VENV)/python -m polykv_vllm.demo

fallback-demo: env
	$(VENV)/python -m polykv_vllm.apps.hf_demo

lint: env
	$(VENV)/ruff format --check polykv_vllm tests benchmarks
	$(VENV)/ruff check polykv_vllm tests benchmarks
	$(VENV)/mypy

test: lint
	$(VENV)/python -m pytest -q -rs tests

# Everything but the real-engine tests (no vLLM servers or engines started).
test-fast: lint
	$(VENV)/python -m pytest -q -rs -m "not vllm" tests
