# Two commands a newcomer needs: `make demo` (the main job) and `make test`. Both create .venv if missing.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check lkv_jax pallas_kernels experiments tests

test: $(STAMP) lint
	$(PY) -m pytest -n 2 tests

demo: $(STAMP)
	$(PY) experiments/demo.py

clean:
	rm -rf .venv runs
