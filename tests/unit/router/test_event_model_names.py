"""RouterCompleted names the model as the upstream serves it, so the cost ledger can
match it with the upstream's own usage event (same request id and model)."""

from __future__ import annotations

from llmo.router.integrations import NatsEventSink
from llmo.router.portfolio import parse_portfolio

PORTFOLIO = """
providers:
  local:
    kind: openai
    base_url: http://127.0.0.1:9/v1
models:
  - name: local-small
    provider: local
    provider_model: llmo-demo
    input_price_micros_per_mtok: 100000
    output_price_micros_per_mtok: 200000
    context_window: 512
  - name: gpt-4o-mini
    provider: local
    input_price_micros_per_mtok: 150000
    output_price_micros_per_mtok: 600000
    context_window: 128000
  - name: local-math
    provider: local
    provider_model: math-lora
    base_model: llmo-demo
    input_price_micros_per_mtok: 100000
    output_price_micros_per_mtok: 200000
    context_window: 512
"""


def test_completed_events_use_the_served_model_name() -> None:
    portfolio = parse_portfolio(PORTFOLIO)
    sink = NatsEventSink(bus=None, portfolio=lambda: portfolio)  # type: ignore[arg-type]
    assert sink.served_name("local-small") == "llmo-demo"
    assert sink.served_name("gpt-4o-mini") == "gpt-4o-mini"
    assert sink.served_name("not-in-portfolio") == "not-in-portfolio"
    assert sink.provider_of("local-small") == "local"


def test_an_adapter_of_the_portfolio_names_its_base_model() -> None:
    portfolio = parse_portfolio(PORTFOLIO)
    sink = NatsEventSink(bus=None, portfolio=lambda: portfolio)  # type: ignore[arg-type]
    assert sink.served_name("local-math") == "math-lora"
    assert sink.base_model_of("local-math") == "llmo-demo"
    assert sink.base_model_of("local-small") == "" and sink.base_model_of("not-in-portfolio") == ""
