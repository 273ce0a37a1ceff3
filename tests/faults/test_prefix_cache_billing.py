"""A defect the kill -9 suite found: prompt tokens served from inference's prefix cache are
billed twice.

The native engine's `Usage(prompt_tokens, completion_tokens, cached_tokens)` counts the
cached tokens inside `prompt_tokens` (as OpenAI's `usage` does), but
`llmo.inference.service` publishes `InferenceCompleted.usage` as
`input_tokens=prompt_tokens, cached_input_tokens=cached_tokens`, while
`llmo.common.v1.Usage` says cached input tokens are *not* included in `input_tokens`. The
ledger then charges every cached prompt token twice (once at the input price, once at the
cached price), and a router call is charged more or less depending on whether the inference
or the router event reached the ledger first (the first one's tokens are kept). A tenant
calling inference directly (its own key) makes the ledger hold only the inference event,
so the double count shows every time.

Fix (services/inference/service.py `_emit`, and the same in servicer.py's gRPC usage):
`input_tokens=usage.prompt_tokens - usage.cached_tokens`.
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


class CachedTokensBilledTwice(AssertionError):
    pass


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    env = {"LLMO_API_KEYS": "k1=tenantA,kf=finops", "LLMO_ADMIN_TENANTS": "finops", "LLMO_DRAIN_SECONDS": "1"}
    running = Stack(tmp_path, services=["cost", "inference"], random_ports=True, env=env)
    await running.start(health_timeout=120)
    try:
        yield running
    finally:
        await running.stop()


@pytest.mark.xfail(
    raises=CachedTokensBilledTwice, strict=True,
    reason="defect: InferenceCompleted.usage.input_tokens includes the prefix-cached tokens it also reports as "
    "cached_input_tokens (services/inference/service.py _emit); see the module docstring",
)
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
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    cost_micros = sum(
        (2 * ((u["prompt_tokens"] - c) * price.input + c * price.cached_input + u["completion_tokens"] * price.output)
         + 1_000_000) // 2_000_000
        for u in usages for c in [u["prompt_tokens_details"]["cached_tokens"]]
    )
    told = {"tenantA": Totals(CALLS, prompt, completion, cost_micros)}

    ledger = await settled_ledger(cost.grpc, "kf", lambda seen: sum(t.requests for t in seen.values()) >= CALLS)
    print(f"\nprefix cache billing: told {told}, ledger {ledger} ({cached} of {prompt} prompt tokens cached)")
    assert set(ledger) == {"tenantA"} and ledger["tenantA"].requests == CALLS, ledger
    if ledger != told:
        raise CachedTokensBilledTwice(f"told {told}, ledger {ledger}")
