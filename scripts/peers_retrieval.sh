#!/usr/bin/env bash
# The peers of `llmo bench retrieval` that stay out of the project's venv (and out of `make test`):
# - tantivy (Rust BM25 engine, Python bindings) in a venv of its own at .peers/retrieval;
# - LangChain's hybrid retriever (EnsembleRetriever over BM25Retriever/rank_bm25 + a FAISS vectorstore)
#   at .peers/retrieval-langchain, fed precomputed MiniLM vectors by the bench (no torch installed there).
# Idempotent: a venv that already has its pinned versions is left as it is.
set -euo pipefail

cd "$(dirname "$0")/.."
TANTIVY=0.27.0
LANGCHAIN_PINS=(langchain-classic==1.0.8 langchain-community==0.4.2 langchain-core==1.8.3 rank-bm25==0.2.2 faiss-cpu==1.15.1)

# has VENV PIN...: the venv's python exists and has every name==version installed
has() {
    local venv=$1
    shift
    [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$@" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(any(version(name) != pinned for name, pinned in (p.split("==") for p in sys.argv[1:])))
except PackageNotFoundError:
    sys.exit(1)
EOF
}

# venv VENV PACKAGE...: make (or complete) the venv with the packages, unless it has the pins already
venv() {
    local venv=$1
    shift
    local pins=()
    for p in "$@"; do [[ $p == *==* ]] && pins+=("$p"); done
    if has "$venv" "${pins[@]}"; then
        echo "$venv: ${pins[*]} already installed"
        return
    fi
    python3.11 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
    has "$venv" "${pins[@]}" || { echo "$venv: pins not satisfied after install" >&2; exit 1; }
    echo "$venv: ${pins[*]} installed"
}

venv .peers/retrieval "tantivy==$TANTIVY" numpy
venv .peers/retrieval-langchain "${LANGCHAIN_PINS[@]}" numpy
