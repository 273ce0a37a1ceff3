from __future__ import annotations

from llmo.router.demo import run_demo
from llmo.router.fake_backend import FakeBackend


async def test_demo_routes_real_requests_to_an_openai_compatible_endpoint() -> None:
    backend = await FakeBackend(tokens=4).start()
    try:
        from aiohttp import web

        # The demo discovers the upstream model from GET /v1/models.
        async def models(_: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": "demo-model"}]})

        app = backend.app()
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        lines = await run_demo({"inference_http": f"http://127.0.0.1:{port}"})
        await runner.cleanup()
    finally:
        await backend.stop()
    text = "\n".join(lines)
    assert "model demo-model" in text
    assert "routed to local-small [explicit]" not in text
    assert "routed to local-careful [constraints]" in text
    assert "cache_hit=True" in text
    assert "demo-model-w0" in text


async def test_demo_without_inference_uses_a_local_backend() -> None:
    lines = await run_demo({})
    assert "local fake" in lines[0]
    assert any("answered" in line for line in lines)
