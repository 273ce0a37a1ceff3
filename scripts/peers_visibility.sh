#!/usr/bin/env bash
# The peers of `llmo bench visibility` that stay out of the project's venv (and out of `make test`):
# Scrapy (the crawl peer, extracting with trafilatura as our crawler does) and readability-lxml (an
# extraction peer) in one venv of their own at .peers/visibility. The bench runs
# tests/benchmarks/peers/{scrapy_crawl,readability_extract}.py with this venv's python.
# Idempotent: an existing venv with the pinned versions is left as it is.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.peers/visibility
SCRAPY=2.19.0
READABILITY=0.9
TRAFILATURA=2.3.1
# readability-lxml asks for lxml[html_clean]; that extra is the separate lxml-html-clean package, named
# here because pip cannot resolve the extra against this lxml wheel
LXML_HTML_CLEAN=0.4.6
PIP=26.3

installed() {
    "$VENV/bin/python" - "$SCRAPY" "$READABILITY" "$TRAFILATURA" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
try:
    ok = (version("scrapy"), version("readability-lxml"), version("trafilatura")) == tuple(sys.argv[1:4])
    import readability, scrapy, trafilatura  # noqa: F401  (an import error means a broken set)
except ImportError:  # PackageNotFoundError is one
    ok = False
sys.exit(0 if ok else 1)
PY
}

if [ -x "$VENV/bin/python" ] && installed; then
    echo "$VENV: scrapy $SCRAPY, readability-lxml $READABILITY and trafilatura $TRAFILATURA already installed"
    exit 0
fi
python3.11 -m venv "$VENV"
pip_install() {  # the local index's "is ignored" notes for packages it lacks are noise
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_install "pip==$PIP"
pip_install "scrapy==$SCRAPY" "readability-lxml==$READABILITY" "trafilatura==$TRAFILATURA" \
    "lxml-html-clean==$LXML_HTML_CLEAN"
"$VENV/bin/python" -c "import readability, scrapy, trafilatura" >/dev/null
echo "$VENV: $("$VENV/bin/python" -c "from importlib.metadata import version as v
print(', '.join(f'{p} {v(p)}' for p in ('scrapy', 'readability-lxml', 'trafilatura', 'lxml')))") installed"
