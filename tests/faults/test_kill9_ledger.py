"""kill -9 of nats-server and of the cost service while two tenants call the router.

Real processes: nats-server (JetStream), inference with the demo model and the router
(the `llmo up` stack), and the cost service as its own subprocess. Two tenants call the
router's OpenAI HTTP API with concurrent clients; mid-flow nats-server is SIGKILLed and
restarted on the same port and store, then the cost service is SIGKILLed while the events
held back by the outage drain into it, and restarted on the same port and data dir.
Afterwards every tenant's ledger equals what its clients were told by the 200 responses
(OpenAI `usage`, priced with the ledger's own price of the model), to the token and the
micro-dollar: same request count (nothing lost, nothing counted twice, refused requests not
billed), input, prefix-cached input and output tokens, cost, and no usage charged to the
router's own service tenant or anyone else.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from llmo.cli.stack import ROUTER_SERVICE_TENANT, Stack
from tests.faults.harness import (
    USAGE_SUBJECTS,
    CostProcess,
    Totals,
    Traffic,
    kill9_nats,
    quiesced,
    read_ledger,
    read_price,
    restart_nats,
    settled_ledger,
)

pytestmark = pytest.mark.slow

KEYS = {"tenantA": "k1", "tenantB": "k2"}
FINOPS_KEY = "kf"
WORKERS_PER_TENANT = 2
# responses per phase; the request loop never sends more than their sum plus the workers in flight
WARM, NATS_DOWN, DRAINING, COST_DOWN, RECOVERED = 30, 40, 10, 40, 30
INVALID_EVERY = 10
LIMIT = WARM + NATS_DOWN + DRAINING + COST_DOWN + RECOVERED + 2 * WORKERS_PER_TENANT


@dataclass
class Faulty:
    stack: Stack
    cost: CostProcess

    @property
    def router_url(self) -> str:
        return self.stack.state.services["router"].http


@pytest_asyncio.fixture
async def faulty(tmp_path: Path) -> AsyncIterator[Faulty]:
    env = {
        "LLMO_API_KEYS": ",".join(f"{key}={tenant}" for tenant, key in KEYS.items()) + f",{FINOPS_KEY}=finops",
        "LLMO_ADMIN_TENANTS": "finops",
        "LLMO_DRAIN_SECONDS": "1",
        # every request reaches inference and is billed (a cache hit is free by design)
        "LLMO_ROUTER_CACHE_ENABLED": "false",
        "LLMO_ROUTER_COMPRESSION_MODEL_DIR": "none",
        # events pulled by a cost process that is then SIGKILLed come back after this (default 30 s)
        "LLMO_COST_ACK_WAIT_S": "3",
    }
    stack = Stack(tmp_path, services=["inference", "router"], random_ports=True, env=env)
    # the router's service key (an admin tenant) minted by the stack is known to cost too
    cost = CostProcess(stack.data_dir, {**os.environ, **env, **stack.shared_env, "LLMO_NATS_URL": stack.nats.url})
    stack.extra_env["LLMO_COST_ADDRESS"] = cost.address
    try:
        await stack.start(health_timeout=120)
        await cost.start()
        yield Faulty(stack, cost)
    finally:
        await cost.stop()
        await stack.stop()


def table(sent: dict[str, Totals], ledger: dict[str, Totals]) -> str:
    lines = ["tenant    source  requests  input_tokens  cached_input_tokens  output_tokens  cost_micros"]
    for tenant in sorted(set(sent) | set(ledger)):
        for source, totals in (("sent", sent.get(tenant)), ("ledger", ledger.get(tenant))):
            t = totals or Totals()
            lines.append(
                f"{tenant:<9} {source:<7} {t.requests:>8} {t.input_tokens:>13} {t.cached_input_tokens:>20} "
                f"{t.output_tokens:>14} {t.cost_micros:>12}"
            )
    return "\n".join(lines)


async def test_kill9_of_nats_and_cost_mid_flow_bills_each_tenant_exactly_what_it_was_told(faulty: Faulty) -> None:
    stack, cost = faulty.stack, faulty.cost
    price = await read_price(cost.address, FINOPS_KEY, "llmo-demo")
    traffic = Traffic(faulty.router_url, KEYS, limit=LIMIT, per_tenant=WORKERS_PER_TENANT, invalid_every=INVALID_EVERY)
    traffic.start()
    try:
        await traffic.wait_for(WARM)

        traffic.phase = "nats_down"
        await kill9_nats(stack)
        await traffic.wait_for(WARM + NATS_DOWN)
        await restart_nats(stack)

        # the outboxes now flush the outage's events into JetStream and on into cost: kill it then
        traffic.phase = "draining"
        await traffic.wait_for(WARM + NATS_DOWN + DRAINING)
        at_kill = await read_ledger(cost.address, FINOPS_KEY)
        answered_at_kill = sum(1 for o in traffic.outcomes if o.status == 200)
        traffic.phase = "cost_down"
        await cost.kill9()
        await traffic.wait_for(WARM + NATS_DOWN + DRAINING + COST_DOWN)
        await cost.start()

        traffic.phase = "recovered"
        await traffic.wait_for(WARM + NATS_DOWN + DRAINING + COST_DOWN + RECOVERED)
    finally:
        await traffic.finish()

    sent = traffic.sent(price)
    ledger = await settled_ledger(cost.address, FINOPS_KEY, lambda seen: seen == sent)
    quiet = await quiesced(stack, {USAGE_SUBJECTS[0]: "cost-inference", USAGE_SUBJECTS[1]: "cost-router"})
    final = await read_ledger(cost.address, FINOPS_KEY)
    own_views = {tenant: await read_ledger(cost.address, key) for tenant, key in KEYS.items()}

    failed = [o for o in traffic.outcomes if o.valid and o.status != 200]
    refused = [o for o in traffic.outcomes if not o.valid]
    print(f"\nkill -9 fault suite: {len(traffic.outcomes)} requests; {len(refused)} invalid ones answered "
          f"{sorted({o.status for o in refused})}; valid ones not 200: {len(failed)} {sorted({o.status for o in failed})}; "
          f"answered during the NATS outage: {len(traffic.answered_within('nats_down'))}, while cost was dead or "
          f"starting: {len(traffic.answered_within('cost_down'))}; "
          f"when cost was killed its ledger held {sum(t.requests for t in at_kill.values())} of the "
          f"{answered_at_kill} calls answered so far; price of llmo-demo (micros/Mtok) in {price.input} out {price.output}; after settling: {quiet}")
    print(table(sent, final))

    # the faults really hit live traffic: all but the requests in flight when a phase began or ended
    # (every tenant's workers, at both ends) were sent and answered within the fault
    in_flight = len(KEYS) * WORKERS_PER_TENANT
    assert len(traffic.answered_within("nats_down")) >= NATS_DOWN - 2 * in_flight
    assert len(traffic.answered_within("cost_down")) >= COST_DOWN - 2 * in_flight
    assert all(sent[tenant].requests > 0 for tenant in KEYS)
    # neither NATS nor cost is on a request's path: a valid request is answered whatever they do
    assert not failed, f"valid requests failed during the faults: {failed}"
    assert refused and all(o.status == 400 for o in refused), f"invalid requests: {refused}"
    assert quiet["quiet"], f"events still on their way after settling: {quiet}"
    assert quiet["dead_lettered"] == 0, f"usage events were dead-lettered instead of billed: {quiet}"

    assert ledger == sent, "the ledger never matched what the tenants were told:\n" + table(sent, ledger)
    assert final == sent, "the ledger changed after settling (a late duplicate?):\n" + table(sent, final)
    assert ROUTER_SERVICE_TENANT not in final and "finops" not in final
    for tenant in KEYS:
        assert own_views[tenant] == {tenant: sent[tenant]}, f"{tenant}'s own view of its ledger: {own_views[tenant]}"
