# Two commands on a fresh machine: `make demo` and `make test`.
# Needs only Python 3.11, pip and a C++ compiler (npm is used for `buf` when present).

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LLMO := $(VENV)/bin/llmo
BUF := .tools/node_modules/.bin/buf
STAMP := $(VENV)/.installed
# pip's local-mirror configuration warns once per package; keep the output readable.
QUIET := 2>&1 | { grep -v -e 'is ignored: it is neither' -e '^ *$$' || true; }
REQS := $(wildcard requirements/*.txt) pyproject.toml setup.py
NATIVE_SRC := $(shell find native -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name 'CMakeLists.txt' -o -name 'pyproject.toml' -o -name '*.py' \) -not -path 'native/build/*' 2>/dev/null)

.PHONY: all install native protos check-protos lint buf test test-fast demo bench clean

all: install

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel $(QUIET)

$(STAMP): $(VENV)/bin/python $(REQS)
	$(PIP) install -q torch==2.13.0 $(QUIET)
	$(PIP) install -q -r requirements/dev.txt $(QUIET)
	$(PIP) install -q -e . --no-build-isolation $(QUIET)
	touch $@

$(VENV)/.native: $(STAMP) $(NATIVE_SRC)
	@if [ -f native/pyproject.toml ]; then \
		$(PIP) install -q --no-build-isolation ./native $(QUIET) || exit 1; \
	fi
	touch $@

install: $(STAMP) $(VENV)/.native

native: $(STAMP)
	$(PIP) install --no-build-isolation ./native
	touch $(VENV)/.native

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

check-protos: $(STAMP)
	$(PY) scripts/gen_protos.py --check

$(BUF):
	@mkdir -p .tools
	@if command -v npm >/dev/null 2>&1; then npm install --silent --prefix .tools @bufbuild/buf@1.75.0 >/dev/null; fi

buf: $(BUF)
	@if [ -x $(BUF) ]; then \
		echo "buf lint" && $(BUF) lint && \
		if git rev-parse -q --verify HEAD~1 >/dev/null 2>&1 && git ls-tree -d HEAD~1 protos >/dev/null 2>&1 && [ -n "$$(git ls-tree HEAD~1 protos)" ]; then \
			echo "buf breaking (against HEAD~1)" && $(BUF) breaking --against '.git#ref=HEAD~1'; \
		else echo "buf breaking: no earlier protos to compare against"; fi; \
	else echo "buf: skipped (npm not available to install @bufbuild/buf)"; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check libs services tests scripts
	$(PY) scripts/typecheck.py

test: install lint check-protos buf
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -x tests/unit

demo: install
	$(LLMO) demo

bench: install
	@echo "usage: $(LLMO) bench <area>   (areas: $$($(LLMO) bench --list))"

clean:
	rm -rf $(VENV) .tools native/build build *.egg-info
