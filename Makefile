# make demo: set up and run the main job. make test: set up and run lint + the whole test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/preftune demo --output demo_out

lint: $(STAMP)
	$(BIN)/ruff check preftune tests bench

test: $(STAMP) lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[test,bench]"
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) demo_out bench_out
