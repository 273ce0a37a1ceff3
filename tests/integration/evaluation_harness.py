"""Shared by the evaluation service's integration tests: the service on real gRPC with a real
nats-server, and a scriptable OpenAI-compatible judge on 127.0.0.1 (it stands in for a paid LLM)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

from llmo.core.errors import error_info
from llmo.core.settings import PlatformSettings
from llmo.evaluation.main import RunningEvaluation, start
from llmo.evaluation.settings import EvaluationSettings
from llmo.protos.evaluation.v1 import evaluation_service_pb2_grpc as pb_grpc

KEYS = {"ka": "tenantA", "kb": "tenantB", "kadmin": "admin"}
A, B, ADMIN = [("authorization", "Bearer ka")], [("authorization", "Bearer kb")], [("authorization", "Bearer kadmin")]

Answer = Callable[[dict[str, Any]], "str | tuple[int, str] | None"]


def completion(text: str, model: str = "judge-1") -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}


@dataclass
class FakeJudge:
    """Answers each chat completion with `answer(body)`: a text, (HTTP status, message), or None to hang."""

    answer: Answer
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-")})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        reply = self.answer(body)
        if reply is None:
            await asyncio.sleep(3600)
            reply = ""
        if isinstance(reply, tuple):
            status, message = reply
            return web.json_response({"error": {"message": message}}, status=status)
        return web.json_response(completion(reply))

    async def start(self) -> FakeJudge:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def prompt_text(body: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []))


def score_answer(score_of: Callable[[str], int]) -> Answer:
    """A G-Eval judge: generated steps when asked for steps, else `score_of(prompt)` as the answer."""

    def answer(body: dict[str, Any]) -> str:
        text = prompt_text(body)
        if re.search(r"evaluation steps", text, re.I) and re.search(r"(write|generate|list)", text, re.I) \
                and "Score:" not in text and "score only" not in text.lower():
            return "1. Read the answer.\n2. Compare it with the criteria.\n3. Decide a score."
        return str(score_of(text))

    return answer


def claims_answer(verdict: str = "supported") -> Answer:
    def answer(body: dict[str, Any]) -> str:
        return json.dumps({"claims": [{"claim": "c", "verdict": verdict, "context": 0, "explanation": "e"}]})

    return answer


def settings(database_url: str, data: Path, nats_url: str = "nats://127.0.0.1:1", **knobs: Any) -> EvaluationSettings:
    knobs.setdefault("judge_url", "")
    knobs.setdefault("target_url", "")
    return EvaluationSettings(database_url=database_url, metrics_port=-1, platform=PlatformSettings(
        nats_url=nats_url, data_dir=data, drain_seconds=0.5, api_keys=KEYS, admin_tenants="admin"), **knobs)


async def started(config: EvaluationSettings) -> tuple[RunningEvaluation, grpc.aio.Channel, pb_grpc.EvaluationServiceStub]:
    running = await start(config, port=0, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return running, channel, pb_grpc.EvaluationServiceStub(channel)


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    info = error_info(raised.value)
    return raised.value.code(), info.reason if info else ""
