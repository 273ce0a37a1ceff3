"""Share-of-voice runs as long-running jobs.

A run asks every query to every engine `samples_per_query` times. Each answer is stored as it
arrives, with the brands it names and the domains it cites, in one transaction with the run's
counters; a restart resumes with the answers not yet stored. An engine that times out, refuses or
returns garbage fails that answer only. When every answer is in, the metrics of `sov_stats` are
computed per engine and over all engines (each with its bootstrap interval), the run is compared with
the project's previous succeeded run (a permutation test over queries) and every significant change
of the brand's mention rate is announced as `llmo.visibility.v1.share_of_voice_changed`.

Answers through the router are charged to the tenant who started the run: the service authenticates
with its own key and names that tenant in `x-llmo-tenant`.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmo.chat_client import ChatClient, ChatError, Completion
from llmo.core import context as ctx
from llmo.core.logging import get_logger
from llmo.core.resources import timestamp
from llmo.protos.common.v1 import common_pb2
from llmo.protos.events.v1 import events_pb2
from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.visibility.convert import brand_share_proto
from llmo.visibility.events import EventAnnouncer, event_row
from llmo.visibility.jobs import JobExecutor
from llmo.visibility.mentions import AnswerAnalysis, BrandSpec, analyze_answer
from llmo.visibility.settings import VisibilitySettings
from llmo.visibility.sov_stats import Answer, brand_metrics, change_test
from llmo.visibility.storage import CANCELLED, FAILED, SUCCEEDED, AnswerRow, RunRow, VisibilityStore

log = get_logger(__name__)
ALL_ENGINES = "all"
CHANGE_METRIC = "mention_rate"


@dataclass(frozen=True)
class EngineRef:
    name: str
    model: str
    base_url: str  # "" means the router (settings.engine_url)
    surface: int
    api_key_env: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "base_url": self.base_url, "surface": self.surface,
                "api_key_env": self.api_key_env}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineRef:
        return cls(name=str(data["name"]), model=str(data["model"]), base_url=str(data["base_url"]),
                   surface=int(data["surface"]), api_key_env=str(data.get("api_key_env", "")))


def brands_of(project: pb.Project) -> list[BrandSpec]:
    """The project's brand first, then its competitors."""
    brands = [BrandSpec(name=project.brand.name, aliases=tuple(project.brand.aliases),
                        domains=tuple(project.domains), is_project_brand=True)]
    brands += [BrandSpec(name=c.name, aliases=tuple(c.aliases), domains=tuple(c.domains))
               for c in project.competitors if c.name.strip()]
    return brands


def brands_json(brands: Sequence[BrandSpec]) -> list[dict[str, Any]]:
    return [{"name": b.name, "aliases": list(b.aliases), "domains": list(b.domains),
             "is_project_brand": b.is_project_brand} for b in brands]


def brands_from_json(data: Sequence[dict[str, Any]]) -> list[BrandSpec]:
    return [BrandSpec(name=d["name"], aliases=tuple(d["aliases"]), domains=tuple(d["domains"]),
                      is_project_brand=bool(d["is_project_brand"])) for d in data]


def analysis_json(analysis: AnswerAnalysis) -> dict[str, Any]:
    return {"mentioned": analysis.mentioned, "positions": analysis.positions, "cited": analysis.cited,
            "citations": analysis.citations}


def analysis_from_json(data: dict[str, Any]) -> AnswerAnalysis:
    return AnswerAnalysis(mentioned=dict(data.get("mentioned", {})), positions=dict(data.get("positions", {})),
                          cited=dict(data.get("cited", {})), citations=list(data.get("citations", [])))


class EngineClients:
    """One chat client per engine endpoint, shared by every run."""

    def __init__(self, settings: VisibilitySettings) -> None:
        self.settings = settings
        self._clients: dict[tuple[str, str], ChatClient] = {}
        self.slots = asyncio.Semaphore(settings.engine_concurrency)

    def client(self, engine: EngineRef) -> ChatClient:
        base = engine.base_url or self.settings.engine_url
        key = os.environ.get(engine.api_key_env, "") if engine.api_key_env else self.settings.engine_api_key
        client = self._clients.get((base, key))
        if client is None:
            client = ChatClient(base, api_key=key, model=engine.model, timeout_s=self.settings.engine_timeout_s,
                                max_tokens=self.settings.engine_max_tokens)
            self._clients[(base, key)] = client
        return client

    async def ask(self, engine: EngineRef, query: str, *, tenant: str, purpose: str) -> Completion:
        client = self.client(engine)
        attempt = 0
        while True:
            try:
                async with self.slots:
                    # Sampling on: repeated answers are independent draws, which is what the intervals measure.
                    return await client.complete([{"role": "user", "content": query}], tenant=tenant,
                                                 purpose=purpose, model=engine.model, temperature=1.0)
            except ChatError as error:
                if error.reason not in ("TIMEOUT", "UNAVAILABLE") or attempt >= self.settings.engine_retries:
                    raise
                attempt += 1
                await asyncio.sleep(0.2 * 2**attempt)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


class RunExecutor(JobExecutor):
    """Executes PENDING and interrupted RUNNING runs, `run_workers` at a time."""

    kind = "share-of-voice run"

    def __init__(self, store: VisibilityStore, settings: VisibilitySettings, engines: EngineClients,
                 announcer: EventAnnouncer) -> None:
        super().__init__(settings.run_workers)
        self.store, self.settings, self.engines, self.announcer = store, settings, engines, announcer
        self.changed = asyncio.Condition()  # notified whenever a run records an answer or ends

    def runnable(self) -> list[int]:
        return self.store.runnable_runs()

    def fail(self, pk: int, reason: str, message: str) -> None:
        self.store.finish_run(pk, FAILED, b"", reason, message)

    def ended(self, pk: int) -> None:
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def execute(self, pk: int) -> None:
        row = await asyncio.to_thread(self.store.run_by_pk, pk)
        if row is None:
            return
        project_row = await asyncio.to_thread(self.store.project_by_pk, row.project_pk)
        if project_row is None:
            return
        await asyncio.to_thread(self.store.start_run, pk)
        spec = pb.ShareOfVoiceRun.FromString(row.spec)
        engines = [EngineRef.from_json(e) for e in row.plan["engines"]]
        brands = brands_from_json(row.plan["brands"])
        samples = spec.samples_per_query
        done = await asyncio.to_thread(self.store.answer_keys, pk)
        todo = [(qi, engine, s) for qi in range(len(spec.queries)) for engine in engines for s in range(samples)
                if (qi, engine.name, s) not in done]
        name = f"projects/{project_row.project_id}/shareOfVoiceRuns/{row.run_id}"
        queue = collections.deque(todo)
        cancelled = False

        async def worker() -> None:
            # Each worker checks for a cancel or a stop before every answer it asks.
            nonlocal cancelled
            while queue and not cancelled and not self.stopping:
                qi, engine, sample = queue.popleft()
                await self._answer(pk, name, project_row.tenant, spec.queries[qi], qi, engine, sample, brands)
                current = await asyncio.to_thread(self.store.run_by_pk, pk)
                cancelled = cancelled or (current is not None and current.cancel_requested)

        with ctx.bind(tenant=project_row.tenant, request_id=f"sov/{project_row.project_id}/{row.run_id}"):
            await asyncio.gather(*(worker() for _ in range(min(self.settings.engine_concurrency, len(todo)))))
        if self.stopping:
            return  # the service is stopping: the run stays RUNNING and resumes on the next start
        current = await asyncio.to_thread(self.store.run_by_pk, pk)
        if current is None:
            return
        if current.cancel_requested:
            await asyncio.to_thread(self.store.finish_run, pk, CANCELLED, b"")
            return
        await self._finish(current, name, project_row.tenant, spec, engines, brands)

    async def _answer(self, pk: int, run_name: str, tenant: str, query: str, qi: int, engine: EngineRef,
                      sample: int, brands: Sequence[BrandSpec]) -> None:
        answer = pb.Answer(query=query, engine=engine.name, sample=sample, surface=engine.surface)  # type: ignore[arg-type]
        answer.create_time.CopyFrom(timestamp(time.time_ns() // 1000))
        analysis = AnswerAnalysis(mentioned={}, positions={}, cited={}, citations=[])
        usage = (0, 0, 0)
        failed = False
        try:
            completion = await self.engines.ask(engine, query, tenant=tenant,
                                                purpose=f"sov-{qi}-{engine.name}-{sample}")
            analysis = await asyncio.to_thread(analyze_answer, completion.text, brands, completion.citations)
            answer.text = completion.text
            answer.brands_mentioned[:] = sorted(analysis.positions, key=lambda b: analysis.positions[b])
            answer.cited_domains[:] = analysis.citations
            usage = (completion.input_tokens, completion.output_tokens, completion.cost_micros)
            answer.usage.CopyFrom(common_pb2.Usage(input_tokens=usage[0], output_tokens=usage[1]))
        except ChatError as error:
            failed = True
            answer.error_reason = {"TIMEOUT": "ENGINE_TIMEOUT", "UNAVAILABLE": "ENGINE_UNAVAILABLE",
                                   "REJECTED": "ENGINE_REJECTED"}.get(error.reason, "ENGINE_BAD_OUTPUT")
            answer.error_message = error.detail[:500]
        stored = AnswerRow(query_index=qi, engine=engine.name, sample=sample, failed=failed,
                           body=answer.SerializeToString(), analysis=analysis_json(analysis))
        await asyncio.to_thread(self.store.record_answer, pk, stored, *usage)
        await self._notify()

    async def _finish(self, row: RunRow, name: str, tenant: str, spec: pb.ShareOfVoiceRun,
                      engines: Sequence[EngineRef], brands: Sequence[BrandSpec]) -> None:
        stored = await asyncio.to_thread(self.store.run_answers, row.pk)
        weights = list(row.plan.get("weights") or [1.0] * len(spec.queries))
        answers = to_answers(stored, spec.queries, weights)
        if not answers:
            await asyncio.to_thread(self.store.finish_run, row.pk, FAILED, b"", "ALL_ANSWERS_FAILED",
                                    "every engine failed every answer; see ListAnswers for the reasons")
            return
        previous = await asyncio.to_thread(self._previous_run, row)
        outcome, changes = await asyncio.to_thread(
            self._outcome, answers, engines, brands, previous, self.settings.sov_resamples)
        if previous is not None:
            outcome.previous_run = name.rsplit("/", 1)[0] + "/" + previous[0].run_id
        outcome.changes.extend(changes)
        events = [event_row(events_pb2.ShareOfVoiceChanged(
            event_id=f"sov_changed/{tenant}/{name}/{c.engine}/{c.brand}/{c.metric}",
            occurred_at=timestamp(time.time_ns() // 1000), tenant=tenant, run=name, previous_run=outcome.previous_run,
            engine=c.engine, brand=c.brand, metric=c.metric, before=c.before, after=c.after,
            difference_low=c.difference.low, difference_high=c.difference.high, p_value=c.p_value))
            for c in changes if c.significant]
        await asyncio.to_thread(self.store.finish_run, row.pk, SUCCEEDED, outcome.SerializeToString(), "", "", events)
        self.announcer.wake()
        await self._notify()
        log.info("share-of-voice run finished", run=name, answers=len(answers),
                 share=round(outcome.overall_share_of_voice, 4), significant_changes=len(events))

    def _previous_run(self, row: RunRow) -> tuple[RunRow, list[Answer]] | None:
        earlier = [r for r in self.store.succeeded_runs(row.project_pk) if r.pk != row.pk]
        if not earlier:
            return None
        last = earlier[-1]
        spec = pb.ShareOfVoiceRun.FromString(last.spec)
        weights = list(last.plan.get("weights") or [1.0] * len(spec.queries))
        return last, to_answers(self.store.run_answers(last.pk), spec.queries, weights)

    @staticmethod
    def _outcome(answers: Sequence[Answer], engines: Sequence[EngineRef], brands: Sequence[BrandSpec],
                 previous: tuple[RunRow, list[Answer]] | None, resamples: int
                 ) -> tuple[pb.ShareOfVoiceRun, list[pb.ShareOfVoiceChange]]:
        outcome = pb.ShareOfVoiceRun()
        project_brand = brands[0].name
        for engine in engines:
            mine = [a for a in answers if a.engine == engine.name]
            share = pb.EngineShare(engine=engine.name, answers=len(mine), surface=engine.surface)  # type: ignore[arg-type]
            if mine:
                for metrics in brand_metrics(mine, brands, resamples=resamples):
                    share.brands.append(brand_share_proto(metrics, *_counts(mine, metrics.brand)))
            outcome.engine_shares.append(share)
        overall = brand_metrics(answers, brands, resamples=resamples)
        outcome.overall.CopyFrom(brand_share_proto(overall[0], *_counts(answers, project_brand)))
        outcome.overall_share_of_voice = overall[0].mention_sov.estimate
        changes: list[pb.ShareOfVoiceChange] = []
        if previous is not None:
            before = previous[1]
            # "all" pools every engine; with one engine it would repeat that engine's test.
            scopes = [e.name for e in engines] if len(engines) == 1 else [ALL_ENGINES, *[e.name for e in engines]]
            for scope in scopes:
                a = [x for x in before if scope == ALL_ENGINES or x.engine == scope]
                b = [x for x in answers if scope == ALL_ENGINES or x.engine == scope]
                if not a or not b:
                    continue
                test = change_test(a, b, project_brand, brands, CHANGE_METRIC, resamples=resamples)
                changes.append(pb.ShareOfVoiceChange(
                    engine=scope, brand=project_brand, metric=CHANGE_METRIC, before=test.before, after=test.after,
                    difference=pb.Interval(estimate=test.difference, low=test.low, high=test.high),
                    p_value=test.p_value, significant=test.significant))
        return outcome, changes


def _counts(answers: Sequence[Answer], brand: str) -> tuple[int, int]:
    return (sum(1 for a in answers if a.analysis.mentioned.get(brand)),
            sum(1 for a in answers if a.analysis.cited.get(brand)))


def to_answers(rows: Sequence[AnswerRow], queries: Sequence[str], weights: Sequence[float]) -> list[Answer]:
    """The stored answers that did not fail, as the statistics' records."""
    return [Answer(prompt=queries[r.query_index], engine=r.engine, sample=r.sample,
                   analysis=analysis_from_json(r.analysis), weight=float(weights[r.query_index]))
            for r in rows if not r.failed and r.query_index < len(queries)]
