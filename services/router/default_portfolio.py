"""The portfolio the router writes for itself when none is configured: one model served
by the inference service (`LLMO_INFERENCE_HTTP_URL`, `LLMO_ROUTER_INFERENCE_MODEL`).

The file starts with a marker holding the hash of what was generated. While the file is
unchanged it stays the router's own and is rewritten on every start from the current
settings, so a restart that moved the inference service (`llmo up --random-ports`) follows
it. Once a user edits it (the hash no longer matches) it is theirs and is never rewritten.

The inference provider reads its key from `LLMO_ROUTER_INFERENCE_API_KEY` (`api_key_env`),
so with API keys on the router presents a service key and inference charges the end tenant
the router names; `llmo up` mints that key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmo.core.logging import get_logger
from llmo.router.settings import RouterSettings

log = get_logger(__name__)

INFERENCE_KEY_ENV = "LLMO_ROUTER_INFERENCE_API_KEY"
MARKER = "# llmo-router generated default portfolio, sha256="

_BODY = """\
# Rewritten on each router start while unchanged; edit it to make it yours (it is then kept,
# and hot-reloaded). The inference key is read from {key_env}.
providers:
  inference:
    kind: openai
    base_url: {base}
    api_key_env: {key_env}
    first_token_timeout_s: 60
    idle_timeout_s: 30
    timeout_s: 300
models:
  - name: {model}
    provider: inference
    input_price_micros_per_mtok: 50000
    output_price_micros_per_mtok: 100000
    context_window: 2048
    max_output_tokens: 256
    quality: 0.3
    latency: {{ttft_ms: 100, tokens_per_s: 50}}
routing:
  default_model: {model}
"""


def portfolio_path(settings: RouterSettings) -> Path:
    return Path(settings.portfolio_path) if settings.portfolio_path else settings.platform.data_dir / "router" / "portfolio.yaml"


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def render(settings: RouterSettings) -> str:
    base = settings.inference_http_url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    body = _BODY.format(base=base, model=settings.inference_model, key_env=INFERENCE_KEY_ENV)
    return f"{MARKER}{_digest(body)}\n{body}"


def is_generated(text: str) -> bool:
    """Whether `text` is a generated default nobody has edited since."""
    first, _, body = text.partition("\n")
    return first.startswith(MARKER) and first.removeprefix(MARKER) == _digest(body)


def ensure_portfolio(settings: RouterSettings) -> Path:
    """The portfolio path; the generated default is written when absent or still unedited."""
    path = portfolio_path(settings)
    wanted = render(settings)
    if path.exists():
        current = path.read_text(encoding="utf-8", errors="replace")
        if current == wanted or not is_generated(current):
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(wanted, encoding="utf-8")
    tmp.replace(path)
    log.info("router.default_portfolio_written", path=str(path), upstream=settings.inference_http_url)
    return path
