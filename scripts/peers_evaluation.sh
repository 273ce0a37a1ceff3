#!/usr/bin/env bash
# The peers of `llmo bench evaluation` that stay out of the project's venv (and out of `make test`):
# RAGAS and DeepEval in one venv of their own at .peers/evaluation (the pinned pair installs together;
# neither pulls torch). The bench runs tests/benchmarks/peers/*.py with this venv's python.
# Idempotent: an existing venv with the pinned versions is left as it is.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.peers/evaluation
export DEEPEVAL_TELEMETRY_OPT_OUT=YES RAGAS_DO_NOT_TRACK=true  # no phoning home from the import checks
RAGAS=0.4.3
DEEPEVAL=4.3.1
# ragas 0.4.3 imports langchain_community.chat_models.vertexai, which langchain-community 0.4 removed
LANGCHAIN_COMMUNITY=0.3.31

installed() {
    "$VENV/bin/python" - "$RAGAS" "$DEEPEVAL" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
try:
    ok = version("ragas") == sys.argv[1] and version("deepeval") == sys.argv[2]
    import deepeval, ragas  # noqa: F401  (an import error means a broken set)
except ImportError:  # PackageNotFoundError is one
    ok = False
sys.exit(0 if ok else 1)
EOF
}

if [ -x "$VENV/bin/python" ] && installed; then
    echo "$VENV: ragas $RAGAS and deepeval $DEEPEVAL already installed"
    exit 0
fi
python3.11 -m venv "$VENV"
pip_install() {  # the local index's "is ignored" notes for packages it lacks are noise
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_install "ragas==$RAGAS" "deepeval==$DEEPEVAL" "langchain-community==$LANGCHAIN_COMMUNITY"
if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    echo "$VENV: torch was pulled in; pinning torch==2.13.0" >&2
    pip_install "torch==2.13.0"
fi
"$VENV/bin/python" -c "import ragas, deepeval" >/dev/null
echo "$VENV: ragas $("$VENV/bin/python" -c "from importlib.metadata import version; print(version('ragas'))")," \
     "deepeval $("$VENV/bin/python" -c "from importlib.metadata import version; print(version('deepeval'))") installed"
