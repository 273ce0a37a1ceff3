"""`llmo bench router`: gateway overhead of the LLMO router vs the LiteLLM proxy.

Both proxies run as their own process in front of the same local OpenAI-compatible
backend (`llmo.router.fake_backend`, its own process, fixed latency), on the same machine,
in one run. For each of non-streaming and streaming `/v1/chat/completions`:

- added latency: sequential requests through each proxy minus the same requests sent
  straight to the backend (p50 and p99 of per-request latency, minus the direct p50/p99);
- sustained throughput: requests/s at each concurrency level in `--concurrency`, keeping the
  best level with no errors.

The router runs with the explicit model (no learned scoring), no semantic cache and no
events, as LiteLLM does; both log at warning level. LiteLLM is not a test dependency:
install it for this benchmark with `.venv/bin/pip install 'litellm[proxy]'`, or in a venv of
its own and pass `--litellm-bin` (keeps its pins out of the project's venv); without it the
benchmark reports the router alone and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

PORTFOLIO = """
providers:
  backend:
    kind: openai
    base_url: {base}
    max_retries: 0
    first_token_timeout_s: 30
    idle_timeout_s: 30
    timeout_s: 60
models:
  - name: small
    provider: backend
    input_price_micros_per_mtok: 100000
    output_price_micros_per_mtok: 200000
    context_window: 8192
"""

LITELLM_CONFIG = """
model_list:
  - model_name: small
    litellm_params:
      model: openai/small
      api_base: {base}
      api_key: sk-bench
litellm_settings:
  telemetry: false
  drop_params: true
  set_verbose: false
"""


# Both proxies authenticate every request with this key (LiteLLM refuses to start without one).
API_KEY = "sk-bench-0123456789abcdef0123456789abcdef"
HEADERS = {"authorization": f"Bearer {API_KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    body = {"model": "small", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 4}
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        while True:
            try:
                async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    if resp.status == 200:
                        await resp.read()
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not become ready")
            await asyncio.sleep(0.3)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    fh = log.open("wb")
    return subprocess.Popen(args, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT)


async def _one(session: aiohttp.ClientSession, url: str, stream: bool, tokens: int) -> float:
    body = {
        "model": "small",
        "messages": [{"role": "user", "content": "Write one short sentence about the sea."}],
        "max_tokens": tokens,
        "stream": stream,
    }
    start = time.perf_counter()
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        if stream:
            async for _ in resp.content:
                pass
        else:
            await resp.read()
    return time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _latency(url: str, stream: bool, n: int, tokens: int) -> dict[str, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), headers=HEADERS) as session:
        for _ in range(max(5, n // 10)):
            await _one(session, url, stream, tokens)
        samples = [await _one(session, url, stream, tokens) for _ in range(n)]
    return {"p50_ms": _pct(samples, 50) * 1000, "p99_ms": _pct(samples, 99) * 1000, "mean_ms": statistics.fmean(samples) * 1000}


async def _throughput(url: str, stream: bool, concurrency: int, duration: float, tokens: int) -> dict[str, float]:
    done = 0
    errors = 0
    stop_at = time.perf_counter() + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done, errors
        while time.perf_counter() < stop_at:
            try:
                await _one(session, url, stream, tokens)
                done += 1
            except (RuntimeError, aiohttp.ClientError, TimeoutError):
                errors += 1

    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=HEADERS) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"req_per_s": done / elapsed, "errors": errors, "concurrency": concurrency}


async def _measure(name: str, url: str, direct: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, stream in (("non_stream", False), ("stream", True)):
        lat = await _latency(url, stream, args.requests, args.tokens)
        entry: dict[str, Any] = {"latency": {k: round(v, 3) for k, v in lat.items()}}
        if direct is not None:
            base = direct[mode]["latency"]
            entry["added_p50_ms"] = round(lat["p50_ms"] - base["p50_ms"], 3)
            entry["added_p99_ms"] = round(lat["p99_ms"] - base["p99_ms"], 3)
        levels = [await _throughput(url, stream, c, args.duration, args.tokens) for c in args.concurrency]
        ok = [lv for lv in levels if lv["errors"] == 0] or levels
        best = max(ok, key=lambda lv: lv["req_per_s"])
        entry["throughput"] = [{k: round(v, 1) if isinstance(v, float) else v for k, v in lv.items()} for lv in levels]
        entry["max_sustained_req_per_s"] = round(best["req_per_s"], 1)
        out[mode] = entry
        print(f"[bench router] {name} {mode}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    return out


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    py = sys.executable
    backend_port, router_port, litellm_port = _free_port(), _free_port(), _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {
        "machine": f"{os.cpu_count()}-core {os.uname().machine}",
        "backend": {"tokens": args.tokens, "latency_ms": args.backend_latency_ms},
        "requests": args.requests,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
    }
    try:
        procs.append(
            _spawn(
                [py, "-m", "llmo.router.fake_backend", "--port", str(backend_port), "--tokens", str(args.tokens), "--latency-ms", str(args.backend_latency_ms)],
                {},
                tmp / "backend.log",
            )
        )
        base = f"http://127.0.0.1:{backend_port}/v1"
        await _wait_ready(base + "/chat/completions")
        (tmp / "portfolio.yaml").write_text(PORTFOLIO.format(base=base))
        router_env = {
            "LLMO_DATA_DIR": str(tmp / "data"),
            "LLMO_LOG_LEVEL": "warning",
            "LLMO_API_KEYS": f"{API_KEY}=bench",
            "LLMO_ROUTER_PORTFOLIO_PATH": str(tmp / "portfolio.yaml"),
            "LLMO_ROUTER_HTTP_PORT": str(router_port),
            "LLMO_ROUTER_GRPC_PORT": str(_free_port()),
            "LLMO_ROUTER_METRICS_PORT": "-1",
            "LLMO_ROUTER_EVENTS": "false",
            "LLMO_ROUTER_CACHE_ENABLED": "false",
        }
        procs.append(_spawn([py, "-c", "import asyncio; from llmo.router.main import serve; asyncio.run(serve())"], router_env, tmp / "router.log"))
        router_url = f"http://127.0.0.1:{router_port}/v1/chat/completions"
        await _wait_ready(router_url)
        litellm_bin = None if args.skip_litellm else args.litellm_bin or shutil.which("litellm", path=str(Path(py).parent))
        litellm_url = None
        if litellm_bin:
            (tmp / "litellm.yaml").write_text(LITELLM_CONFIG.format(base=base))
            env = {
                "LITELLM_LOG": "ERROR",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_TELEMETRY": "False",
                "LITELLM_MASTER_KEY": API_KEY,
            }
            procs.append(
                _spawn([litellm_bin, "--config", str(tmp / "litellm.yaml"), "--host", "127.0.0.1", "--port", str(litellm_port), "--num_workers", "1"], env, tmp / "litellm.log")
            )
            litellm_url = f"http://127.0.0.1:{litellm_port}/v1/chat/completions"
            await _wait_ready(litellm_url, timeout=240)
        direct = await _measure("direct", base + "/chat/completions", None, args)
        result["direct"] = direct
        result["llmo_router"] = await _measure("llmo_router", router_url, direct, args)
        if litellm_url is not None:
            result["litellm"] = await _measure("litellm", litellm_url, direct, args)
            ratios: dict[str, Any] = {}
            for mode in ("non_stream", "stream"):
                ours, theirs = result["llmo_router"][mode], result["litellm"][mode]
                ratios[mode] = {
                    "added_p50_router_over_litellm": round(ours["added_p50_ms"] / theirs["added_p50_ms"], 3) if theirs["added_p50_ms"] > 0 else None,
                    "added_p99_router_over_litellm": round(ours["added_p99_ms"] / theirs["added_p99_ms"], 3) if theirs["added_p99_ms"] > 0 else None,
                    "throughput_router_over_litellm": round(ours["max_sustained_req_per_s"] / theirs["max_sustained_req_per_s"], 3),
                }
            result["ratios"] = ratios
        else:
            result["litellm"] = "not installed: .venv/bin/pip install 'litellm[proxy]' (or pass --litellm-bin)"
    finally:
        for p in reversed(procs):
            _stop(p)
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            result["logs"] = str(tmp)
    return result


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="llmo bench router", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="Sequential requests per latency measurement.")
    parser.add_argument("--duration", type=float, default=5.0, help="Seconds per throughput level.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64], help="Concurrency levels for throughput.")
    parser.add_argument("--tokens", type=int, default=16, help="Tokens the backend streams per answer.")
    parser.add_argument("--backend-latency-ms", type=float, default=5.0, help="Fixed backend latency per request.")
    parser.add_argument("--skip-litellm", action="store_true", help="Measure the router only.")
    parser.add_argument("--litellm-bin", default=None,
                        help="The `litellm` proxy executable (default: next to this Python), e.g. from a venv of its own.")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(args))
    return {}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
