"""`llmo bench evaluation`: the evaluation service measured, one JSON object.

Areas (`--areas`, default all):
- `detector`: the local faithfulness detector cross-validated on SciFact train claims and
  Climate-FEVER (`llmo.evaluation.detector.crossval`, 5 folds grouped by claim), against the
  issue's goals (binary F1 >= 0.75, 3-way macro-F1 >= 0.60). Needs `--data` (../shared/data).
- `reliability`: a judge with a known noise level (true rubric score + Gaussian noise, rounded and
  clipped to 1..5) served on 127.0.0.1; AssessJudgeReliability through the real service reports
  alpha and flip rate, set next to the values expected from the noise model (simulated apart);
  and over `--trials` fresh datasets, the share of reported 95% CIs that cover the true mean.
- `orchestration`: a `--examples`-example faithfulness run through the real service against an
  instant, deterministic local judge: judge calls per example and examples per second. RAGAS and
  DeepEval run the same examples in `.peers/evaluation` (scripts/peers_evaluation.sh) when it
  exists; otherwise they are reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from llmo.core.settings import PlatformSettings
from llmo.evaluation import stats
from llmo.evaluation.main import start
from llmo.evaluation.settings import EvaluationSettings
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb
from llmo.protos.evaluation.v1 import evaluation_service_pb2_grpc as pb_grpc

AREAS = ("detector", "reliability", "orchestration")
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
PEERS = Path(__file__).resolve().parents[2] / ".peers" / "evaluation" / "bin" / "python"
RUBRIC = pb.Rubric(name="quality", criteria="How good is the answer?", min_score=1, max_score=5,
                   evaluation_steps=["Read the answer.", "Score its quality."])
CONTEXT = "The Eiffel Tower is in Paris. It was completed in 1889. It is 330 metres tall."


def machine() -> dict[str, Any]:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    import os

    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version()}


class Judge:
    """An OpenAI-compatible judge on 127.0.0.1: `answer(prompt) -> text`; counts requests."""

    def __init__(self, answer: Any) -> None:
        self.answer, self.requests, self.port = answer, 0, 0
        self._runner: web.AppRunner | None = None

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        return web.json_response({"model": "fake-judge", "choices": [{"index": 0, "message": {
            "role": "assistant", "content": self.answer(prompt)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": 4}})

    async def __aenter__(self) -> Judge:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *_: Any) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def service(data: Path, judge_port: int) -> Any:
    data.mkdir(parents=True, exist_ok=True)
    settings = EvaluationSettings(database_url=f"sqlite:///{data / 'evaluation.db'}", metrics_port=-1,
                                  judge_url=f"http://127.0.0.1:{judge_port}/v1", target_url="",
                                  consume_events=False, publish_events=False, judge_concurrency=32,
                                  run_example_concurrency=32, judge_cache_entries=0,
                                  platform=PlatformSettings(data_dir=data, nats_url="nats://127.0.0.1:1",
                                                            drain_seconds=0.2))
    return await start(settings, port=0, metrics=False)


def noisy(rng: random.Random, true: int, sigma: float) -> int:
    return int(min(5, max(1, round(true + rng.gauss(0.0, sigma)))))


def expected_reliability(sigma: float, examples: int, repeats: int, seed: int = 1) -> dict[str, float]:
    """alpha and flip rate of the noise model, simulated apart from the service (many datasets)."""
    rng = random.Random(seed)
    alphas, flips = [], []
    for _ in range(50):
        truths = [rng.randint(1, 5) for _ in range(examples)]
        ratings = np.array([[(noisy(rng, t, sigma) - 1) / 4 for t in truths] for _ in range(repeats)])
        alphas.append(stats.krippendorff_alpha(ratings))
        flips.append(stats.flip_rate(ratings.T >= 0.5))
    return {"alpha": float(np.nanmean(alphas)), "flip_rate": float(np.mean(flips))}


def true_mean(sigma: float, draws: int = 200_000, seed: int = 2) -> float:
    rng = random.Random(seed)
    return float(np.mean([(noisy(rng, rng.randint(1, 5), sigma) - 1) / 4 for _ in range(draws)]))


async def reliability(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    sigma_now = {"value": 0.0}

    def answer(prompt: str) -> str:
        found = re.search(r"quality (\d)", prompt)
        return str(noisy(rng, int(found.group(1)) if found else 3, sigma_now["value"]))

    out: dict[str, Any] = {"examples": args.reliability_examples, "repeats": args.repeats, "levels": []}
    async with Judge(answer) as judge:
        running = await service(data, judge.port)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        stub = pb_grpc.EvaluationServiceStub(channel)
        try:
            for level, sigma in enumerate(args.sigmas):
                sigma_now["value"] = sigma
                covered, reported_alpha, reported_flip = 0, [], []
                truth = true_mean(sigma)
                for trial in range(args.trials):
                    dataset = f"rel-{level}-{trial}"
                    await stub.CreateDataset(pb.CreateDatasetRequest(dataset_id=dataset))
                    examples = []
                    for i in range(args.reliability_examples):
                        t = rng.randint(1, 5)
                        examples.append(pb.CreateExampleRequest(example_id=f"e{i}", example=pb.Example(
                            input=f"question {i}", output=f"an answer of quality {t}", human_scores={"quality": t})))
                    await stub.BatchCreateExamples(pb.BatchCreateExamplesRequest(parent=f"datasets/{dataset}",
                                                                                 requests=examples))
                    reply = await stub.AssessJudgeReliability(pb.AssessJudgeReliabilityRequest(
                        dataset=f"datasets/{dataset}", metric=pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=RUBRIC),
                        judge=pb.JudgeConfig(temperature=1.0), repeats=args.repeats if trial == 0 else 1))
                    r = reply.reliability
                    if trial == 0:
                        reported_alpha.append(r.alpha_across_repeats)
                        reported_flip.append(r.flip_rate)
                    covered += int(r.ci_low <= truth <= r.ci_high)
                expected = expected_reliability(sigma, args.reliability_examples, args.repeats)
                out["levels"].append({
                    "sigma": sigma, "reported_alpha": round(reported_alpha[0], 3),
                    "expected_alpha": round(expected["alpha"], 3), "reported_flip_rate": round(reported_flip[0], 3),
                    "expected_flip_rate": round(expected["flip_rate"], 3), "true_mean": round(truth, 4),
                    "ci_coverage": round(covered / args.trials, 3), "trials": args.trials})
        finally:
            await channel.close()
            await running.stop()
    return out


def faithfulness_examples(n: int) -> list[pb.CreateExampleRequest]:
    answers = ["The Eiffel Tower is in Paris. It was completed in 1889. It is 330 metres tall.",
               "The Eiffel Tower is in Rome. It was completed in 1889. It is 20 metres tall. It is blue."]
    return [pb.CreateExampleRequest(example_id=f"e{i}", example=pb.Example(
        input="Tell me about the Eiffel Tower.", output=answers[i % 2], contexts=[CONTEXT])) for i in range(n)]


def claims_answer(prompt: str) -> str:
    answer = prompt.rsplit("Answer to evaluate:", 1)[-1]
    sentences = [s.strip() for s in answer.split(".") if s.strip()]
    return json.dumps({"claims": [{"claim": s, "verdict": "supported" if s in CONTEXT else "unsupported",
                                   "context": 0, "explanation": ""} for s in sentences]})


async def orchestration(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    async with Judge(claims_answer) as judge:
        running = await service(data, judge.port)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        stub = pb_grpc.EvaluationServiceStub(channel)
        try:
            await stub.CreateDataset(pb.CreateDatasetRequest(dataset_id="orchestration"))
            await stub.BatchCreateExamples(pb.BatchCreateExamplesRequest(
                parent="datasets/orchestration", requests=faithfulness_examples(args.examples)))
            started = time.perf_counter()
            created = (await stub.CreateRun(pb.CreateRunRequest(run=pb.Run(
                dataset="datasets/orchestration", metrics=[pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS)])))).run
            final = None
            async for reply in stub.WatchRun(pb.WatchRunRequest(name=created.name)):
                final = reply.run
            wall = time.perf_counter() - started
        finally:
            await channel.close()
            await running.stop()
    assert final is not None
    ours = {"examples": args.examples, "state": pb.RunState.Name(final.state), "wall_s": round(wall, 3),
            "examples_per_s": round(args.examples / wall, 1), "judge_calls_per_example": judge.requests / args.examples,
            "mean_faithfulness": round(final.summaries[0].mean, 3)}
    peers: dict[str, Any] = {}
    for name in ("ragas", "deepeval"):
        peers[name] = {"skipped": f"{PEERS} is missing: run scripts/peers_evaluation.sh"} if not PEERS.exists() else \
            {"skipped": "the peer harness is not written yet (see issue 15 notes)"}
    return {"ours": ours, "peers": peers}


def detector(args: argparse.Namespace) -> dict[str, Any]:
    from llmo.evaluation.detector.crossval import crossval

    result = crossval(args.data, folds=args.folds, cache_dir=args.cache)
    goals = {"binary_f1": 0.75, "macro_f1": 0.60}
    result["goals"] = goals
    return result


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="llmo bench evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the reference data folder (detector)")
    parser.add_argument("--areas", default=",".join(AREAS), help=f"comma-separated subset of {','.join(AREAS)}")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=None, help="MiniLM embedding cache for the detector area")
    parser.add_argument("--examples", type=int, default=200, help="examples of the orchestration run")
    parser.add_argument("--reliability-examples", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trials", type=int, default=100, help="fresh datasets per noise level (CI coverage)")
    parser.add_argument("--sigmas", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.8, 1.5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no detector area (for the test suite)")
    args = parser.parse_args(argv)
    areas = [a for a in args.areas.split(",") if a]
    unknown = set(areas) - set(AREAS)
    if unknown:
        parser.error(f"unknown areas {sorted(unknown)}")
    if args.smoke:
        args.examples, args.reliability_examples, args.repeats, args.trials = 20, 12, 3, 4
        args.sigmas = [0.5]
        areas = [a for a in areas if a != "detector"]
    result: dict[str, Any] = {"bench": "evaluation", "machine": machine(), "smoke": args.smoke}
    with tempfile.TemporaryDirectory(prefix="llmo-bench-eval-") as tmp:
        if "detector" in areas:
            result["detector"] = detector(args)
        if "reliability" in areas:
            result["reliability"] = asyncio.run(reliability(args, Path(tmp) / "reliability"))
        if "orchestration" in areas:
            result["orchestration"] = asyncio.run(orchestration(args, Path(tmp) / "orchestration"))
    if "reliability" in result:
        coverage = [lvl["ci_coverage"] for lvl in result["reliability"]["levels"]]
        result["reliability"]["ci_coverage_mean"] = round(float(np.mean(coverage)), 3) if coverage else math.nan
    return result
