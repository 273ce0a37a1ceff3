"""Drift of live-traffic scores and input features: `GetDriftReport` and a background check.

A report compares a current window with a baseline window of the scores online evaluation recorded
(filtered by tenant, model and prompt version), or of an input feature of the scored requests:
`feature:input_chars`, `feature:output_chars`, or `feature:input_centroid_distance` (cosine
distance of each input's MiniLM embedding to the centroid of the baseline window's inputs). It
reports PSI over 10 bins (equal-width on [0, 1] for scores, baseline quantiles for features), the
two-sample KS statistic and p-value, and a severity from PSI (< 0.1 none, < 0.25 moderate, else
severe).

The background check runs every `drift_check_interval_s` over the last completed window of
`drift_window_s` (windows aligned to multiples of it) against the `drift_baseline_s` before it, per
tenant, model, prompt version and metric (and the input features), and publishes
`llmo.evaluation.v1.drift_detected` once per group and window. PSI alone is biased upward on
small samples (about (bins - 1) * (1/n + 1/m) under no drift: 0.6 at 30 scores a window), so an
alert also needs the KS test to reject equal distributions at p < 0.01.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import numpy as np

from llmo.core.errors import failed_precondition, invalid_argument
from llmo.core.logging import get_logger
from llmo.core.outbox import Publisher
from llmo.core.resources import timestamp
from llmo.evaluation import stats
from llmo.evaluation.settings import EvaluationSettings
from llmo.evaluation.storage import EvaluationStore, now_us
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb
from llmo.protos.events.v1 import events_pb2

log = get_logger(__name__)

FEATURES = ("feature:input_chars", "feature:output_chars", "feature:input_centroid_distance")
ALERT_KS_P = 0.01
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the largest valid Timestamp
SEVERITY = {"none": pb.DRIFT_SEVERITY_NONE, "moderate": pb.DRIFT_SEVERITY_MODERATE, "severe": pb.DRIFT_SEVERITY_SEVERE}


class InsufficientData(Exception):
    pass


def distribution(values: Sequence[float], start_us: int, end_us: int) -> pb.ScoreDistribution:
    array = np.asarray(values, dtype=float)
    return pb.ScoreDistribution(
        start_time=timestamp(start_us), end_time=timestamp(end_us), count=len(array), mean=float(array.mean()),
        stddev=float(array.std(ddof=1)) if len(array) > 1 else 0.0, p10=float(np.percentile(array, 10)),
        p50=float(np.percentile(array, 50)), p90=float(np.percentile(array, 90)))


def compare(metric: str, baseline: Sequence[float], current: Sequence[float], windows: tuple[int, int, int, int]
            ) -> pb.DriftReport:
    base = distribution(baseline, windows[0], windows[1])
    cur = distribution(current, windows[2], windows[3])
    psi = stats.psi(baseline, current, edges="quantile" if metric.startswith("feature:") else "unit")
    ks, p_value = stats.ks_2samp(baseline, current)
    return pb.DriftReport(metric=metric, baseline=base, current=cur, mean_delta=cur.mean - base.mean, psi=psi,
                          ks_statistic=ks, ks_p_value=p_value, severity=SEVERITY[stats.drift_severity(psi)])  # type: ignore[arg-type]


def _vectors(blobs: Sequence[bytes]) -> np.ndarray:
    return np.stack([np.frombuffer(b, dtype=np.float32) for b in blobs]) if blobs else np.zeros((0, 1), np.float32)


def centroid_distances(vectors: np.ndarray, centroid: np.ndarray) -> list[float]:
    norm = np.linalg.norm(centroid)
    if len(vectors) == 0 or norm == 0:
        return []
    sims = vectors @ (centroid / norm) / np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    return [float(1.0 - s) for s in sims]


class DriftMonitor:
    def __init__(self, store: EvaluationStore, settings: EvaluationSettings, publisher: Publisher | None) -> None:
        self.store, self.settings, self.publisher = store, settings, publisher

    def _values(self, metric: str, tenant: str, model: str, prompt_version: str,
                windows: tuple[int, int, int, int]) -> tuple[list[float], list[float]]:
        if not metric.startswith("feature:"):
            return tuple(self.store.score_values(tenant=tenant, metric=metric, start_us=start, end_us=end, model=model,  # type: ignore[return-value]
                                                 prompt_version=prompt_version)
                         for start, end in ((windows[0], windows[1]), (windows[2], windows[3])))
        base, cur = (self.store.scored_inputs(tenant=tenant, start_us=start, end_us=end, model=model,
                                              prompt_version=prompt_version)
                     for start, end in ((windows[0], windows[1]), (windows[2], windows[3])))
        if metric == "feature:input_chars":
            return [float(r[0]) for r in base], [float(r[0]) for r in cur]
        if metric == "feature:output_chars":
            return [float(r[1]) for r in base], [float(r[1]) for r in cur]
        base_vectors, cur_vectors = _vectors([r[2] for r in base]), _vectors([r[2] for r in cur])
        if len(base_vectors) == 0:
            return [], []
        centroid = base_vectors.mean(axis=0)
        return centroid_distances(base_vectors, centroid), centroid_distances(cur_vectors, centroid)

    def _report(self, metric: str, tenant: str, model: str, prompt_version: str, windows: tuple[int, int, int, int],
                min_samples: int) -> pb.DriftReport:
        baseline, current = self._values(metric, tenant, model, prompt_version, windows)
        if len(baseline) < min_samples or len(current) < min_samples:
            raise InsufficientData(f"{len(baseline)} baseline and {len(current)} current values; {min_samples} needed")
        return compare(metric, baseline, current, windows)

    async def report(self, request: pb.GetDriftReportRequest, *, tenant: str) -> pb.DriftReport:
        if not request.metric:
            raise invalid_argument("MISSING_METRIC", "name a metric or feature:...", field="metric")
        if len(request.metric) > 128 or len(request.model) > 256 or len(request.prompt_version) > 256 or \
                len(request.tenant) > 256:
            raise invalid_argument("FIELD_TOO_LONG", "metric is at most 128 characters; model, prompt_version and "
                                   "tenant at most 256", field="metric")
        for name in ("baseline_start_time", "baseline_end_time", "current_start_time", "current_end_time"):
            stamp = getattr(request, name)
            if not (0 <= stamp.seconds <= MAX_SECONDS and 0 <= stamp.nanos < 1_000_000_000):
                raise invalid_argument("INVALID_WINDOW", f"{name} is not a time between 1970 and 9999", field=name)
        if request.metric.startswith("feature:") and request.metric not in FEATURES:
            raise invalid_argument("MISSING_METRIC", f"unknown feature; one of {', '.join(FEATURES)}", field="metric")
        now = now_us()
        window_us = int(self.settings.drift_window_s * 1e6)
        base_us = int(self.settings.drift_baseline_s * 1e6)

        def us(stamp: object, default: int) -> int:
            return stamp.ToMicroseconds() if stamp.seconds or stamp.nanos else default  # type: ignore[attr-defined]

        current_end = us(request.current_end_time, now)
        baseline_end = us(request.baseline_end_time, current_end - window_us)
        baseline_start = us(request.baseline_start_time, baseline_end - base_us)
        current_start = us(request.current_start_time, baseline_end)
        if not (baseline_start < baseline_end <= current_start < current_end):
            raise invalid_argument("INVALID_WINDOW", "windows must satisfy baseline_start < baseline_end <= "
                                   "current_start < current_end", field="current_start_time")
        if request.min_samples < 0:
            raise invalid_argument("INVALID_MIN_SAMPLES", "min_samples must be >= 0", field="min_samples")
        windows = (baseline_start, baseline_end, current_start, current_end)
        try:
            return await asyncio.to_thread(self._report, request.metric, tenant, request.model,
                                           request.prompt_version, windows, request.min_samples or 30)
        except InsufficientData as error:
            raise failed_precondition("INSUFFICIENT_DATA", str(error), metric=request.metric) from None

    # --- background check ----------------------------------------------------------------------

    async def check_once(self, now_s: float | None = None) -> list[events_pb2.EvaluationDriftDetected]:
        """Check the last completed window of every group; publish (once) and return the drifts found."""
        window_us = int(self.settings.drift_window_s * 1e6)
        end = int((now_s if now_s is not None else time.time()) * 1e6) // window_us * window_us
        start = end - window_us
        windows = (start - int(self.settings.drift_baseline_s * 1e6), start, start, end)
        groups = await asyncio.to_thread(self.store.drift_groups, windows[0])
        found = []
        checks: list[tuple[str, str, str, str]] = []
        for tenant, model, prompt_version, metric in groups:
            checks.append((tenant, model, prompt_version, metric))
        for tenant, model, prompt_version in sorted({g[:3] for g in groups}):
            checks += [(tenant, model, prompt_version, feature) for feature in FEATURES]
        for tenant, model, prompt_version, metric in checks:
            try:
                report = await asyncio.to_thread(self._report, metric, tenant, model, prompt_version, windows,
                                                 self.settings.drift_min_samples)
            except InsufficientData:
                continue
            if report.psi < 0.1 or not report.ks_p_value < ALERT_KS_P or not math.isfinite(report.psi):
                continue
            event = await self._announce(tenant, model, prompt_version, report, start, end)
            if event is not None:
                found.append(event)
        return found

    async def _announce(self, tenant: str, model: str, prompt_version: str, report: pb.DriftReport, start: int,
                        end: int) -> events_pb2.EvaluationDriftDetected | None:
        event_id = f"drift/{tenant}/{model}/{prompt_version}/{report.metric}/{start}"
        event = events_pb2.EvaluationDriftDetected(
            event_id=event_id, occurred_at=timestamp(now_us()), tenant=tenant, model=model,
            prompt_version=prompt_version, metric=report.metric, psi=report.psi, ks_statistic=report.ks_statistic,
            ks_p_value=report.ks_p_value, severity=stats.drift_severity(report.psi), baseline_mean=report.baseline.mean,
            current_mean=report.current.mean, window_start=timestamp(start), window_end=timestamp(end))
        # Published before the claim: a crash in between republishes the same event id (dropped downstream).
        if not await asyncio.to_thread(self.store.claim_drift_alert, tenant, model, prompt_version, report.metric,
                                       start, event_id, dry_run=True):
            return None
        if self.publisher is not None and self.settings.publish_events:
            await self.publisher.publish(event, event_id=event_id)
        await asyncio.to_thread(self.store.claim_drift_alert, tenant, model, prompt_version, report.metric, start,
                                event_id)
        log.info("drift detected", tenant=tenant, model=model, metric=report.metric, psi=round(report.psi, 3),
                 ks_p=report.ks_p_value)
        return event

    async def run(self) -> None:
        if self.settings.drift_check_interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.settings.drift_check_interval_s)
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("drift check failed; retrying at the next interval", error=repr(error))
