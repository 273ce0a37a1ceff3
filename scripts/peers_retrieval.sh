#!/usr/bin/env bash
# The peers of `llmo bench retrieval` that stay out of the project's venv (and out of `make test`):
# tantivy (Rust BM25 engine, Python bindings) in a venv of its own at .peers/retrieval.
# Idempotent: an existing venv with the pinned tantivy is left as it is.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.peers/retrieval
TANTIVY=0.27.0

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import sys, tantivy, numpy; from importlib.metadata import version; sys.exit(version('tantivy') != '$TANTIVY')" 2>/dev/null; then
    echo "$VENV: tantivy $TANTIVY already installed"
    exit 0
fi
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "tantivy==$TANTIVY" numpy
echo "$VENV: tantivy $("$VENV/bin/python" -c "from importlib.metadata import version; print(version('tantivy'))") installed"
