"""Prompt tokens served from inference's prefix cache are billed once (a defect the kill -9
suite found, fixed in 2393fc8).

The native engine's usage counts the cached tokens inside `prompt_tokens` (as OpenAI's
`usage` does), while `llmo.common.v1.Usage.input_tokens` excludes them. Inference used to
publish `input_tokens=prompt_tokens, cached_input_tokens=cached_tokens`: the ledger
charged every cached prompt token twice, and a router call more or less depending on which
of its two events reached the ledger first. A tenant calling inference directly (its own
key) leaves only the inference event in the ledger, so a double count would show every time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from llmo.cli.stack import Stack
from tests.faults.harness import Totals, read_price, settled_ledger

pytestmark = pytest.mark.slow

PROMPT = "Good morrow, gentle cousin; what news from the court of the king this fair morning? ROMEO:"
CALLS = 3


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    env = {"LLMO_API_KEYS": "k1=tenantA,kf=finops", "LLMO_ADMIN_TENANTS": "finops", "LLMO_DRAIN_SECONDS": "1"}
    running = Stack(tmp_path, services=["cost", "inference"], random_ports=True, env=env)
    await running.start(health_timeout=120)
    try:
        yield running
    finally:
        await running.stop()


async def test_prompt_tokens_served_from_the_prefix_cache_are_billed_once(stack: Stack) -> None:
    inference, cost = stack.state.services["inference"], stack.state.services["cost"]
    price = await read_price(cost.grpc, "kf", "llmo-demo")
    usages = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for _ in range(CALLS):
            async with http.post(
                f"{inference.http}/v1/chat/completions", headers={"authorization": "Bearer k1"},
                json={"model": "llmo-demo", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4},
            ) as reply:
                assert reply.status == 200, await reply.text()
                usages.append((await reply.json())["usage"])
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert cached > 0, f"the repeated prompt was never served from the prefix cache: {usages}"
    told_totals = Totals()
    for usage in usages:
        told_totals += Totals.of_response(usage, price)
    told = {"tenantA": told_totals}

    ledger = await settled_ledger(cost.grpc, "kf", lambda seen: sum(t.requests for t in seen.values()) >= CALLS)
    print(f"\nprefix cache billing: told {told}, ledger {ledger}")
    assert ledger == told
