"""Knobs of the cost service (`LLMO_COST_*`)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from llmo.core.settings import ServiceSettings


class CostSettings(ServiceSettings):
    service: ClassVar[str] = "cost"

    # Extra price catalogs merged over the shipped prices.yaml, comma-separated paths.
    price_files: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Consume llmo.inference.v1.completed and llmo.router.v1.completed from NATS.
    consume_events: bool = True
    # Durable consumer name prefix (one durable per subject).
    consumer_name: str = "cost"
    # Events per fetch / ledger transaction.
    ingest_batch: int = 1000
    # Seconds an un-acked event waits before NATS redelivers it.
    ack_wait_s: float = 30.0
    # Deliveries of one event before it is parked on the DLQ as max_deliveries_exceeded
    # (and failed batch attempts before records are tried one by one).
    max_deliver: int = 5
    # Seconds between re-reads of budgets and their spend from the database
    # (other replicas' writes become visible to CheckBudget within this time).
    budget_refresh_s: float = 1.0
    # Seconds a CheckBudget reservation lives if its usage never arrives.
    reservation_ttl_s: float = 120.0
    # Seconds to wait for a first NATS connection before serving without events
    # (it keeps retrying in the background; usage events wait in JetStream).
    nats_connect_timeout_s: float = 5.0
    # Seconds between re-publishes of threshold alerts whose publish failed.
    alert_retry_s: float = 5.0

    @field_validator("price_files", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value
