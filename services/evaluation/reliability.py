"""`AssessJudgeReliability`: how far a judged metric can be trusted on a dataset with human scores.

Every example that has an output and a human score (`human_scores[label_key]`) is judged `repeats`
times by the judge and by each of `other_judges` (each repeat is a separate, uncached judge call).
Scores are normalised to [0, 1] (G-Eval: (raw - min) / (max - min); human scores on the rubric's
scale likewise, other human scores are read as already in [0, 1]). Reported:

- agreement with humans on the mean judge score per example: Spearman, Kendall's tau-b, the mean
  absolute error, and (G-Eval) quadratic-weighted Cohen's kappa on the rubric's integer scale;
- self-consistency: 1 - the mean standard deviation across repeats; Krippendorff's alpha (interval)
  with each repeat a coder; the flip rate, the share of examples whose pass/fail verdict (at the
  metric's pass threshold, else 0.5) is not the same in every repeat;
- across judges: Krippendorff's alpha over the judges' mean scores;
- the mean judge score, its standard deviation over examples and the 95% bootstrap CI of the mean;
- for PAIRWISE: position bias (the mean of the output's preference with the output shown first minus
  with it shown second) and the swap flip rate (the share of judgements whose preferred side changes
  when the order is swapped);
- examples whose judgement failed in any repeat (left out of the statistics above).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import numpy as np

from llmo.core.errors import failed_precondition, invalid_argument, not_found
from llmo.core.resources import parse_name
from llmo.evaluation import stats
from llmo.evaluation.convert import usd
from llmo.evaluation.evaluate import ResolvedMetric, StoredSteps, check_judge, resolve, score_case
from llmo.evaluation.scoring import Case, MetricError, Scorer, Spent, validate_specs
from llmo.evaluation.storage import EvaluationStore
from llmo.protos.common.v1 import common_pb2
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

MAX_EXAMPLES = 500
MAX_OTHER_JUDGES = 4
DEFAULT_REPEATS = 3
IN_FLIGHT = 32  # judgements scheduled at once (the judge's own limit still applies)


def _finite(value: float) -> float:
    """NaN (undefined, e.g. no variance) is reported as 0 on the wire; the docs say so."""
    return float(value) if math.isfinite(value) else 0.0


class ReliabilityAssessor:
    def __init__(self, store: EvaluationStore, scorer: Scorer, steps: StoredSteps) -> None:
        self.store, self.scorer, self.steps = store, scorer, steps

    async def assess(self, request: pb.AssessJudgeReliabilityRequest, *, tenant: str
                     ) -> pb.AssessJudgeReliabilityResponse:
        (dataset_id,) = parse_name(request.dataset, "datasets")
        if request.metric.metric == pb.METRIC_UNSPECIFIED:
            raise invalid_argument("MISSING_METRIC", "name the metric whose judge is assessed", field="metric")
        validate_specs([request.metric])
        repeats = request.repeats or DEFAULT_REPEATS
        if not 1 <= repeats <= 10:
            raise invalid_argument("INVALID_REPEATS", "repeats must be in 1..10", field="repeats")
        if len(request.other_judges) > MAX_OTHER_JUDGES:
            raise invalid_argument("INVALID_JUDGE_CONFIG", f"at most {MAX_OTHER_JUDGES} other judges",
                                   field="other_judges")
        judges = [request.judge, *request.other_judges]
        for i, judge in enumerate(judges):
            check_judge(judge, "judge" if i == 0 else f"other_judges[{i - 1}]")
        (metric,) = await resolve(self.store, tenant, [request.metric])
        rows = await asyncio.to_thread(self.store.list_examples, tenant, dataset_id, "", MAX_EXAMPLES + 1)
        if rows is None:
            raise not_found("DATASET_NOT_FOUND", f"no dataset {request.dataset}", dataset=dataset_id)
        if len(rows) > MAX_EXAMPLES:
            raise failed_precondition("DATASET_TOO_LARGE", f"more than {MAX_EXAMPLES} examples; use a run",
                                      dataset=dataset_id)
        label = request.label_key or (metric.rubric.name if metric.rubric else metric.name)
        examples = [pb.Example.FromString(r.body) for r in rows]
        labelled = [e for e in examples if label in e.human_scores and e.output]
        if not labelled:
            raise failed_precondition("NO_HUMAN_LABELS", f"no example has an output and human_scores[{label!r}]",
                                      label_key=label)
        scale = (metric.rubric.min_score, metric.rubric.max_score) if metric.rubric else None
        scores, spent = await self._judge_all(labelled, metric, judges, repeats, tenant)
        reliability = await asyncio.to_thread(self._statistics, labelled, label, scores, scale, metric)
        if metric.spec.metric == pb.METRIC_PAIRWISE:
            bias, swap_flips = await self._position_bias(labelled, judges[0], repeats, tenant, spent)
            reliability.position_bias, reliability.swap_flip_rate = bias, swap_flips
        return pb.AssessJudgeReliabilityResponse(
            reliability=reliability, usage=common_pb2.Usage(input_tokens=spent.input_tokens,
                                                            output_tokens=spent.output_tokens),
            cost=usd(spent.cost_micros))

    async def _judge_all(self, examples: Sequence[pb.Example], metric: ResolvedMetric,
                         judges: Sequence[pb.JudgeConfig], repeats: int, tenant: str) -> tuple[np.ndarray, Spent]:
        """scores[judge, repeat, example], NaN where the judgement failed."""
        scores = np.full((len(judges), repeats, len(examples)), np.nan)
        spent = Spent()
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def one(j: int, r: int, e: int) -> None:
            example = examples[e]
            case = Case(input=example.input, output=example.output, contexts=tuple(example.contexts),
                        reference=example.reference)
            async with limit:
                scored = await score_case(self.scorer, case, [metric], judges[j], tenant=tenant,
                                          request_id=f"reliability/{e}/{j}/{r}", steps=self.steps, repeat=r)
            spent.add(scored.spent)
            if scored.results:
                scores[j, r, e] = scored.results[0].score

        await asyncio.gather(*(one(j, r, e) for j in range(len(judges)) for r in range(repeats)
                               for e in range(len(examples))))
        return scores, spent

    @staticmethod
    def _statistics(examples: Sequence[pb.Example], label: str, scores: np.ndarray, scale: tuple[int, int] | None,
                    metric: ResolvedMetric) -> pb.JudgeReliability:
        primary = scores[0]  # repeats x examples
        ok = ~np.isnan(primary).any(axis=0)
        human_raw = np.array([e.human_scores[label] for e in examples], dtype=float)
        human = (human_raw - scale[0]) / (scale[1] - scale[0]) if scale else human_raw
        out = pb.JudgeReliability(examples=int(ok.sum()), failed_examples=int((~ok).sum()))
        if not ok.any():
            return out
        judged = primary[:, ok]
        means = judged.mean(axis=0)
        humans = human[ok]
        out.spearman = _finite(stats.spearman(means, humans))
        out.kendall_tau = _finite(stats.kendall_tau(means, humans))
        out.mean_absolute_error = _finite(stats.mean_absolute_error(means, humans))
        if scale:
            span = scale[1] - scale[0]
            out.cohen_kappa = _finite(stats.quadratic_kappa(np.rint(means * span + scale[0]).astype(int),
                                                            np.rint(human_raw[ok]).astype(int)))
        repeats = judged.shape[0]
        out.self_consistency = _finite(1.0 - float(judged.std(axis=0, ddof=1).mean())) if repeats > 1 else 1.0
        if repeats > 1:
            out.alpha_across_repeats = _finite(stats.krippendorff_alpha(judged))
            threshold = metric.spec.pass_threshold or 0.5
            verdicts = judged.T >= threshold
            if metric.spec.metric == pb.METRIC_HALLUCINATION and metric.spec.pass_threshold:
                verdicts = judged.T <= threshold
            out.flip_rate = _finite(stats.flip_rate(verdicts))
        if scores.shape[0] > 1:
            judge_means = np.nanmean(scores, axis=1)  # judges x examples
            out.alpha_across_judges = _finite(stats.krippendorff_alpha(judge_means))
        summary = stats.summarize(list(means))
        out.score_mean, out.score_stddev = summary.mean, summary.stddev
        out.ci_low, out.ci_high = summary.ci_low, summary.ci_high
        return out

    async def _position_bias(self, examples: Sequence[pb.Example], judge: pb.JudgeConfig, repeats: int, tenant: str,
                             spent: Spent) -> tuple[float, float]:
        """(mean preference of the output shown first minus shown second, share of swaps that flip)."""
        differences: list[float] = []
        flips: list[bool] = []
        for e, example in enumerate(examples):
            case = Case(input=example.input, output=example.output, contexts=tuple(example.contexts),
                        reference=example.reference)
            for r in range(repeats):
                try:
                    first, second, used = await self.scorer.pairwise_orders(
                        case, judge, tenant=tenant, request_id=f"reliability/{e}/swap/{r}", repeat=r)
                except MetricError:
                    continue
                spent.add(used)
                differences.append(first - second)
                flips.append((first > 0.5) != (second > 0.5) or (first == 0.5) != (second == 0.5))
        if not differences:
            return 0.0, 0.0
        return float(np.mean(differences)), float(np.mean(flips))
