"""The ledger's consumers of usage events, on the core consumer.

:class:`llmo.core.events.Consumer` does the transport and the guarantees: the
durable, the lean batched pulls, acks only after a batch committed, bounded
redelivery, the dead-letter subject, metrics and spans. What is cost's own:

- decoding: each payload is parsed and priced into a :class:`LedgerRecord` while
  the previous batch commits; an event that cannot be priced is parked with its
  reason (``unknown_model``, ...);
- the handler: one ledger transaction per batch, idempotent on the event id;
- the failure policy: a failing commit is a database outage until proven
  otherwise, so the batch is held and retried (``RetryInPlace``); a record the
  database refuses while others commit is parked as ``storage_error``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from llmo.core.events import Consumer, Delivery, EventBus, Rejected, RetryInPlace
from llmo.cost.engine import USAGE_REJECTED, CostEngine
from llmo.cost.prices import PriceCatalog
from llmo.cost.records import LedgerRecord, RecordRejected, price_inference_event, price_router_event
from llmo.protos.events.v1 import events_pb2


@dataclass(frozen=True, slots=True)
class UsageSource:
    """A usage event type and how one is priced into a ledger record."""

    message_type: type[Message]
    price: Callable[[Any, PriceCatalog], LedgerRecord]


INFERENCE = UsageSource(events_pb2.InferenceCompleted, price_inference_event)
ROUTER = UsageSource(events_pb2.RouterCompleted, price_router_event)


class UsageConsumer:
    """Durable consumer of one usage subject, writing batches to the ledger."""

    def __init__(
        self,
        bus: EventBus,
        engine: CostEngine,
        source: UsageSource,
        durable: str,
        *,
        batch: int = 1000,
        ack_wait: float = 30.0,
        max_deliver: int = 5,
        fetch_timeout: float = 0.25,
        backoff: tuple[float, ...] = (0.2, 1.0, 5.0),
    ) -> None:
        self.engine = engine
        self.consumer: Consumer[LedgerRecord] = Consumer(
            bus, source.message_type, durable, self._commit,
            decode=_decoder(source, engine), on_failure=RetryInPlace(poison_reason="storage_error"),
            batch=batch, ack_wait=ack_wait, max_deliver=max_deliver, backoff=backoff, fetch_timeout=fetch_timeout,
        )

    async def start(self) -> None:
        await self.consumer.open()
        self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    async def _commit(self, deliveries: list[Delivery[LedgerRecord]]) -> None:
        await self.engine.ingest([d.event for d in deliveries])


def _decoder(source: UsageSource, engine: CostEngine) -> Callable[[bytes], LedgerRecord]:
    parse, price = source.message_type.FromString, source.price

    def decode(payload: bytes) -> LedgerRecord:
        try:
            return price(parse(payload), engine.catalog)
        except RecordRejected as error:
            USAGE_REJECTED.labels(error.reason.value).inc()
            raise Rejected(error.reason.value, error.detail) from error

    return decode
