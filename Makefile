# lambdaskip: the two commands the README promises, and helpers.
#   make book   — set up .venv (pinned) and build the executed HTML book into _build/html
#   make test   — set up .venv, then unit tests + notebooks (nbval, CI profile) + book markup check
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lambdaskip-installed
# Notebook cell timeout (seconds) for nbval.
CELL_TIMEOUT ?= 600
JOBS ?= 2

.PHONY: setup book test unit notebooks check-book sync clean help

help:
	@echo "make book   build the executed book into _build/html (profile: book)"
	@echo "make test   unit tests, notebooks under nbval (profile: ci), book markup check"
	@echo "make sync   regenerate the .ipynb twins from the book/*.md sources"
	@echo "make clean  remove build outputs (keeps .venv)"

$(STAMP): requirements-pinned.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-pinned.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

setup: $(STAMP)

# The executed book. Execution results are cached in _build/.jupyter_cache (keyed on notebook
# content); the CI profile never writes there (its checks run in a separate folder).
book: setup
	@start=$$(date +%s); rc=1; \
	for attempt in 1 2; do \
	  LAMBDASKIP_PROFILE=book $(VENV)/bin/jupyter-book build . -W -n --keep-going && { rc=0; break; }; rc=$$?; \
	  if [ $$attempt = 1 ]; then echo "== make book: build failed (exit $$rc); trying once more: chapters that finished come from the cache, so only the failed one re-runs =="; fi; \
	done; \
	echo "== make book: $$(( $$(date +%s) - start )) s (exit $$rc) =="; exit $$rc

test: setup check-book
	@start=$$(date +%s); \
	LAMBDASKIP_PROFILE=ci $(PY) -m pytest tests book -n $(JOBS) --dist loadfile \
	  --nbval-lax --nbval-current-env --nbval-cell-timeout=$(CELL_TIMEOUT) \
	  --durations=15 -q; rc=$$?; \
	echo "== pytest (unit tests + notebooks): $$(( $$(date +%s) - start )) s =="; exit $$rc

unit: setup
	LAMBDASKIP_PROFILE=ci $(PY) -m pytest tests -n $(JOBS) -q

notebooks: setup
	LAMBDASKIP_PROFILE=ci $(PY) -m pytest book -n $(JOBS) --dist loadfile --nbval-lax --nbval-current-env --nbval-cell-timeout=$(CELL_TIMEOUT) -q

# Markup + table-of-contents check with warnings as errors, without executing the notebooks,
# in its own output folder so that nothing it writes can reach the real book build.
check-book: setup
	@start=$$(date +%s); \
	$(PY) tools/noexec_config.py _config.yml _build/check/_config.yml && \
	$(VENV)/bin/jupyter-book build . --config _build/check/_config.yml --path-output _build/check -W -n --keep-going -q; rc=$$?; \
	echo "== book markup check: $$(( $$(date +%s) - start )) s =="; exit $$rc

sync: setup
	$(VENV)/bin/jupytext --sync book/*.md
	$(PY) tools/strip_outputs.py book

clean:
	rm -rf _build
