# make demo: set up and run the main job. make test: set up and run lint + the whole test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean chromium

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/preftune demo --output demo_out

lint: $(STAMP)
	$(BIN)/ruff check preftune tests bench

# The report test drives headless Chromium: install Debian's package when it is missing and we are root
# (instant when present). Elsewhere it only says what to run; the test then fails with the same command.
chromium:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "make: chromium is missing; run: sudo apt-get install -y chromium"; fi; }

test: $(STAMP) lint chromium
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[test,bench]"
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) demo_out bench_out
