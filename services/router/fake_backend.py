"""A local OpenAI-compatible backend with fixed latency and scripted misbehaviour, for
benchmarks and tests of the gateway's resilience (it is a real HTTP server on a socket).

Behaviours (per model name, so one server can host a healthy and a broken "provider"):
``ok`` streams `tokens` words; ``error`` answers HTTP 500; ``reject`` answers HTTP 400;
``hang`` sends headers and one token, then stalls; ``hang_first`` stalls before any token;
``garbage`` sends two good tokens then a non-JSON event; ``truncate`` closes mid-stream
without a finish reason; ``flaky`` fails with 503 on every other request; ``echo`` answers with
the last user message restated (a relevant answer, for tests that score answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeBackend:
    behaviours: dict[str, str] = field(default_factory=dict)
    latency_s: float = 0.0
    token_delay_s: float = 0.0
    tokens: int = 8
    hang_s: float = 3600.0
    # When set, requests without `authorization: Bearer <api_key>` get 401 (like a server with keys on).
    api_key: str = ""
    calls: dict[str, int] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    # The LLMO headers of each request (x-llmo-*, x-request-id, authorization).
    headers: list[dict[str, str]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def start(self, port: int = 0) -> FakeBackend:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr,attr-defined]
        return self

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hang(self) -> None:
        # Stalls like a stuck upstream, but lets stop() end promptly.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), self.hang_s)

    def _words(self, model: str, body: dict[str, Any]) -> list[str]:
        if self.behaviours.get(model) == "echo":
            asked = next((str(m.get("content", "")) for m in reversed(body.get("messages", []))
                          if m.get("role") == "user"), "")
            return [f"{w} " for w in f"About {asked.rstrip('?')}: here is the answer to {asked}".split()]
        return [f"{model}-w{i} " for i in range(self.tokens)]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model", ""))
        self.requests.append(body)
        self.request_ids.append(request.headers.get("x-request-id", ""))
        self.headers.append(
            {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-") or k.lower() == "authorization"}
        )
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "invalid api key", "code": "API_KEY_INVALID"}}, status=401)
        n = self.calls[model] = self.calls.get(model, 0) + 1
        behaviour = self.behaviours.get(model, "ok")
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if behaviour == "error" or (behaviour == "flaky" and n % 2 == 1):
            return web.json_response({"error": {"message": "boom"}}, status=500 if behaviour == "error" else 503)
        if behaviour == "reject":
            return web.json_response({"error": {"message": "bad request", "param": "messages"}}, status=400)
        words = self._words(model, body)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        if not body.get("stream"):
            if behaviour == "garbage":
                return web.Response(text="{not json", content_type="application/json")
            if behaviour in ("hang", "hang_first"):
                await self._hang()
            text = "".join(words)
            return web.json_response(
                {
                    "id": f"cmpl-{n}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words), "total_tokens": prompt_tokens + len(words)},
                }
            )
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        if behaviour == "hang_first":
            await self._hang()
        for i, word in enumerate(words):
            if behaviour == "garbage" and i == 2:
                await resp.write(b"data: {this is not json\n\n")
                return resp
            if behaviour == "truncate" and i == 2:
                return resp
            if behaviour == "hang" and i == 1:
                await self._hang()
            await resp.write(_event(model, n, {"content": word}, None))
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
        await resp.write(_event(model, n, {}, "stop"))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words), "total_tokens": prompt_tokens + len(words)}
        await resp.write(b"data: " + json.dumps({"id": f"cmpl-{n}", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _event(model: str, n: int, delta: dict[str, str], finish: str | None) -> bytes:
    payload = {
        "id": f"cmpl-{n}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def _serve(port: int, tokens: int, latency_ms: float, token_delay_ms: float) -> None:
    backend = FakeBackend(tokens=tokens, latency_s=latency_ms / 1000, token_delay_s=token_delay_ms / 1000)
    await backend.start(port)
    print(f"fake backend on {backend.base_url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await backend.stop()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Local OpenAI-compatible backend with fixed latency.")
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.tokens, args.latency_ms, args.token_delay_ms))


if __name__ == "__main__":
    main()
