"""The router demo's verdict on the ledger: it fails the demo for every way a completion can
be charged wrongly. (The live path itself is driven in tests/e2e/test_demo_path.py.)"""

from __future__ import annotations

import pytest

from llmo.router.demo import LedgerRow, Sent, reconcile, run_demo, tenant_totals


def sent(request_id: str, tenant: str, prompt: int = 10, completion: int = 4) -> Sent:
    return Sent(request_id, tenant, f"user-{request_id}", "llmo-demo", prompt, completion, False, "text")


def row(s: Sent, tenant: str = "", requests: int = 1, output: int | None = None, model: str = "llmo-demo") -> LedgerRow:
    out = s.completion_tokens if output is None else output
    return LedgerRow(tenant or s.tenant, s.request_id, model, "default model", requests, s.prompt_tokens, out, 5)


def test_each_request_charged_once_to_its_tenant_passes() -> None:
    a, b = sent("r1", "tenantA"), sent("r2", "tenantB")
    assert reconcile([a, b], [row(a), row(b)]) == []
    assert tenant_totals([row(a), row(b)], {a.request_id}) == {"tenantA": (1, 5)}


A = sent("r1", "tenantA")
WRONG = {
    "missing": ([], "r1 (tenantA) is not in the ledger"),
    "router's tenant": ([row(A, tenant="llmo-router")], "r1 was sent by tenantA but charged to llmo-router"),
    "twice in one row": ([row(A, requests=2)], "r1 (tenantA) is charged more than once: tenantA x2"),
    "two rows": ([row(A), row(A, tenant="llmo-router")], "r1 (tenantA) is charged more than once: tenantA x1, llmo-router x1"),
    "tokens": ([row(A, output=9)], "r1: the ledger has 10+9 tokens, the client was told 10+4"),
    "model": ([row(A, model="other")], "r1: the ledger has model 'other', the client was told 'llmo-demo'"),
}


@pytest.mark.parametrize("case", WRONG)
def test_every_wrong_charge_is_reported(case: str) -> None:
    ledger, problem = WRONG[case]
    assert reconcile([A], ledger) == [problem]


async def test_the_demo_says_which_services_it_needs() -> None:
    with pytest.raises(RuntimeError, match="needs the router, inference and cost services running"):
        await run_demo({"router_http": "http://127.0.0.1:1"})
