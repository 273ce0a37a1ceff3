"""`llmo evaluation ...` (alias `llmo eval`): datasets, runs, gates and comparisons on the evaluation
service, and the local faithfulness detector's scores on labelled claim/document pairs (offline)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

out = Console()
err = Console(stderr=True)
BATCH = 8  # pairs per detector call


class InputError(click.ClickException):
    """Bad input file: one line, naming file and line, exit status 2."""

    exit_code = 2


@dataclass(frozen=True)
class Pair:
    line: int
    claim: str
    doc_id: str
    label: str


def _object_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as error:
        raise InputError(f"{path}: {error.strerror or error}") from error
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path} line {number}: not JSON ({error.msg})") from error
                if not isinstance(row, dict):
                    raise InputError(f"{path} line {number}: expected a JSON object")
                rows.append((number, row))
        except UnicodeDecodeError as error:
            raise InputError(f"{path}: not UTF-8 text ({error.reason})") from error
    return rows


def read_corpus(path: Path) -> dict[str, str]:
    """BEIR corpus.jsonl: `_id` -> `text` (the context the detector reads; titles are left out)."""
    corpus: dict[str, str] = {}
    for number, row in _object_lines(path):
        doc_id, text = row.get("_id"), row.get("text")
        if not isinstance(doc_id, str | int) or isinstance(doc_id, bool) or not str(doc_id):
            raise InputError(f"{path} line {number}: `_id` must be a non-empty string")
        if not isinstance(text, str):
            raise InputError(f"{path} line {number}: `text` must be a string")
        corpus[str(doc_id)] = text
    return corpus


def read_pairs(path: Path, corpus: dict[str, str]) -> list[Pair]:
    from llmo.evaluation.detector.data import label_of

    pairs = []
    for number, row in _object_lines(path):
        claim, doc_id, label = row.get("claim"), row.get("doc_id"), row.get("label")
        if not isinstance(claim, str) or not claim.strip():
            raise InputError(f"{path} line {number}: `claim` must be a non-empty string")
        if not isinstance(doc_id, str | int) or isinstance(doc_id, bool) or str(doc_id) not in corpus:
            raise InputError(f"{path} line {number}: `doc_id` {doc_id!r} is not in the corpus")
        try:
            gold = label_of(label)
        except ValueError as error:
            raise InputError(f"{path} line {number}: {error}") from error
        pairs.append(Pair(number, claim, str(doc_id), gold))
    if not pairs:
        raise InputError(f"{path}: no pairs")
    return pairs


@click.group(short_help="Evaluation datasets, runs and gates (alias: eval).")
@click.option("--endpoint", "--address", "endpoint", envvar="LLMO_EVALUATION_ENDPOINT", default=None,
              help="Evaluation service host:port (env LLMO_EVALUATION_ENDPOINT) [default: the running `llmo up` "
                   "stack's, else 127.0.0.1:50054].")
@click.option("--api-key", envvar="LLMO_API_KEY", default=None, help="API key (Bearer) when the service requires one.")
@click.pass_context
def cli(ctx: click.Context, endpoint: str | None, api_key: str | None) -> None:
    """Evaluation, also as `llmo eval`: `import` a dataset, `run` metrics over it (progress bar,
    summaries with 95% CIs), `gate` a run for CI pipelines (exit status 1 when it fails), `compare`
    two runs; `faithfulness` scores the local detector offline."""
    ctx.obj = {"endpoint": endpoint, "api_key": api_key}


@cli.command()
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help="PAIRS.jsonl: one {claim, doc_id, label: SUPPORT|CONTRADICT|NEI} per line.")
@click.option("--corpus", "corpus_path", type=click.Path(path_type=Path), required=True,
              help="BEIR corpus.jsonl holding every doc_id (its `text` is the context).")
@click.option("--artifact", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="A detector artifact directory (default: the committed one).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def faithfulness(data_path: Path, corpus_path: Path, artifact: Path | None, as_json: bool) -> None:
    """Score the local faithfulness detector on labelled (claim, document) pairs: binary
    (supported vs not) precision, recall and F1, three-way macro-F1, AUROC, latency per pair."""
    from llmo.evaluation.detector import ArtifactError, Detector
    from llmo.evaluation.detector.metrics import score

    corpus = read_corpus(corpus_path)
    pairs = read_pairs(data_path, corpus)
    try:
        detector = Detector.load(artifact)
    except ArtifactError as error:
        raise click.ClickException(str(error)) from error
    detector.judge(corpus[pairs[0].doc_id], pairs[0].claim)  # loads MiniLM outside the timing
    verdicts = []
    progress = Progress(TextColumn("[bold]judging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, disable=not err.is_terminal)
    elapsed = 0.0
    with progress:
        task = progress.add_task("judging", total=len(pairs))
        for start in range(0, len(pairs), BATCH):
            batch = pairs[start:start + BATCH]
            began = time.perf_counter()
            verdicts += detector.judge_many([(corpus[p.doc_id], p.claim) for p in batch])
            elapsed += time.perf_counter() - began
            progress.advance(task, len(batch))
    scores = score([p.label for p in pairs], [v.label for v in verdicts],
                   [v.probabilities["SUPPORTED"] for v in verdicts])
    result = {"pairs": scores.pairs, "detector_version": detector.version,
              "binary": {"precision": scores.binary_precision, "recall": scores.binary_recall, "f1": scores.binary_f1},
              "macro_f1": scores.macro_f1, "f1_per_label": scores.f1_per_label, "auroc": scores.auroc,
              "latency_ms_per_pair": elapsed * 1000 / len(pairs)}
    if as_json:
        click.echo(json.dumps(result))
        return
    table = Table(title=f"Faithfulness detector {detector.version} on {len(pairs)} pairs")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("binary precision (SUPPORTED vs not)", f"{scores.binary_precision:.3f}")
    table.add_row("binary recall", f"{scores.binary_recall:.3f}")
    table.add_row("binary F1", f"{scores.binary_f1:.3f}")
    table.add_row("three-way macro-F1", f"{scores.macro_f1:.3f}")
    for label, f1 in scores.f1_per_label.items():
        table.add_row(f"  F1 {label}", f"{f1:.3f}")
    table.add_row("AUROC of P(SUPPORTED)", "n/a (one class)" if scores.auroc is None else f"{scores.auroc:.3f}")
    table.add_row("latency per pair", f"{result['latency_ms_per_pair']:.1f} ms")
    out.print(table)


# --- the service ----------------------------------------------------------------------------

SERVICE_TIMEOUT_S = 120.0
IMPORT_BATCH = 500
METRIC_CHOICES = ("faithfulness", "hallucination", "answer_relevancy", "context_relevancy", "context_precision",
                  "context_recall", "exact_match")


def _call(ctx: click.Context, action: Any) -> Any:
    from llmo.cli.service_client import call_service, default_endpoint
    from llmo.protos.evaluation.v1 import evaluation_service_pb2_grpc as pb_grpc

    endpoint = ctx.obj["endpoint"] or default_endpoint("evaluation")
    return call_service("evaluation", endpoint, ctx.obj["api_key"], pb_grpc.EvaluationServiceStub, action)


def read_examples(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """JSONL (one object per line) or CSV (a header row) of examples: `input` (required), `output`,
    `reference`, `contexts` (a list, or in CSV a JSON list or one context), `id`, `human_*` columns
    (human scores by label) and anything else as metadata."""
    if path.suffix.lower() == ".csv":
        import csv

        try:
            with path.open(encoding="utf-8-sig", newline="") as handle:
                rows = [(n, dict(r)) for n, r in enumerate(csv.DictReader(handle), start=2)]
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise InputError(f"{path}: {error}") from error
    else:
        rows = _object_lines(path)
    if not rows:
        raise InputError(f"{path}: no examples")
    return rows


def example_of(path: Path, line: int, row: dict[str, Any]) -> tuple[str, Any]:
    from google.protobuf import struct_pb2

    from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

    where = f"{path} line {line}"
    text = row.get("input")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: `input` must be a non-empty string")
    contexts = row.get("contexts") or []
    if isinstance(contexts, str):
        try:
            contexts = json.loads(contexts) if contexts.lstrip().startswith("[") else [contexts]
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: `contexts` is not a JSON list ({error.msg})") from error
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise InputError(f"{where}: `contexts` must be a list of strings")
    human: dict[str, float] = {}
    metadata = struct_pb2.Struct()
    for key, value in row.items():
        if key.startswith("human_") and value not in ("", None):
            try:
                human[key.removeprefix("human_")] = float(value)
            except (TypeError, ValueError) as error:
                raise InputError(f"{where}: `{key}` must be a number") from error
        elif key not in ("input", "output", "reference", "contexts", "id") and value not in ("", None):
            metadata[key] = value
    for key in ("output", "reference"):
        if not isinstance(row.get(key) or "", str):
            raise InputError(f"{where}: `{key}` must be a string")
    example = pb.Example(input=text, output=row.get("output") or "", reference=row.get("reference") or "",
                         contexts=contexts, human_scores=human, metadata=metadata)
    return str(row.get("id") or ""), example


@cli.command("import")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--dataset", "dataset_id", required=True, help="Dataset id; created when it does not exist.")
@click.pass_context
def import_examples(ctx: click.Context, path: Path, dataset_id: str) -> None:
    """Import examples from JSONL or CSV into a dataset (batches of 500, each all or none)."""
    import grpc

    from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

    examples = [example_of(path, line, row) for line, row in read_examples(path)]

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> int:
        try:
            await stub.CreateDataset(pb.CreateDatasetRequest(dataset_id=dataset_id), metadata=metadata,
                                     timeout=SERVICE_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        added = 0
        with Progress(TextColumn("importing"), BarColumn(), MofNCompleteColumn(), console=err,
                      transient=True) as progress:
            task = progress.add_task("import", total=len(examples))
            for start in range(0, len(examples), IMPORT_BATCH):
                batch = examples[start:start + IMPORT_BATCH]
                reply = await stub.BatchCreateExamples(pb.BatchCreateExamplesRequest(
                    parent=f"datasets/{dataset_id}", requests=[pb.CreateExampleRequest(example_id=i, example=e)
                                                               for i, e in batch]),
                    metadata=metadata, timeout=SERVICE_TIMEOUT_S)
                added += len(reply.examples)
                progress.advance(task, len(batch))
        return added

    added = _call(ctx, action)
    out.print(f"imported {added} examples into datasets/{dataset_id}")


def _summary_table(run: Any) -> Table:
    table = Table(title=f"{run.name} ({run.progress.examples_completed} scored, {run.progress.examples_failed} failed)")
    for column in ("metric", "n", "mean", "95% CI", "p10", "min", "pass rate"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for s in run.summaries:
        table.add_row(s.metric, str(s.count), f"{s.mean:.3f}", f"[{s.ci_low:.3f}, {s.ci_high:.3f}]", f"{s.p10:.3f}",
                      f"{s.min:.3f}", f"{s.pass_rate:.2f}")
    return table


@cli.command("run")
@click.option("--dataset", "dataset_id", required=True, help="Dataset id.")
@click.option("--metric", "metrics", multiple=True, type=click.Choice(METRIC_CHOICES), required=True,
              help="A metric to score (repeat the option for several).")
@click.option("--rubric", "rubrics", multiple=True, help="A published rubric for G-Eval, `id` or `id@version`.")
@click.option("--gate", "gates", multiple=True, help="A gate id checked when the run succeeds.")
@click.option("--target-model", default="", help="Model that answers examples without an output.")
@click.option("--run-id", default="", help="Run id (default: server-assigned).")
@click.option("--json", "as_json", is_flag=True, help="Print the finished run as JSON.")
@click.pass_context
def run_dataset(ctx: click.Context, dataset_id: str, metrics: tuple[str, ...], rubrics: tuple[str, ...],
                gates: tuple[str, ...], target_model: str, run_id: str, as_json: bool) -> None:
    """Run metrics over a dataset and follow it to the end; exit status 1 when the run or a gate fails."""
    import uuid

    from google.protobuf import json_format

    from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

    specs = [pb.MetricSpec(metric=pb.Metric.Value(f"METRIC_{m.upper()}")) for m in metrics]
    specs += [pb.MetricSpec(metric=pb.METRIC_G_EVAL, rubric_ref=f"rubrics/{r}") for r in rubrics]
    run = pb.Run(dataset=f"datasets/{dataset_id}", metrics=specs, gates=[f"gates/{g}" for g in gates],
                 target=pb.RunTarget(model=target_model))

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> Any:
        created = (await stub.CreateRun(pb.CreateRunRequest(run_id=run_id, run=run, request_id=str(uuid.uuid4())),
                                        metadata=metadata, timeout=SERVICE_TIMEOUT_S)).run
        last = created
        with Progress(TextColumn(created.name), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                      transient=True) as progress:
            task = progress.add_task("run", total=created.progress.examples_total)
            async for reply in stub.WatchRun(pb.WatchRunRequest(name=created.name), metadata=metadata):
                last = reply.run
                progress.update(task, completed=last.progress.examples_completed + last.progress.examples_failed)
        return last

    final = _call(ctx, action)
    if as_json:
        out.print_json(json_format.MessageToJson(final))
    else:
        out.print(_summary_table(final))
        for gate in final.gate_results:
            out.print(f"gate {gate.gate}: {'[green]passed' if gate.passed else '[red]FAILED'}[/]")
    state = pb.RunState.Name(final.state).removeprefix("RUN_STATE_")
    if final.state != pb.RUN_STATE_SUCCEEDED:
        raise click.ClickException(f"{final.name} ended {state}: {final.error_reason} {final.error_message}".strip())
    if any(not g.passed for g in final.gate_results):
        raise SystemExit(1)


@cli.command("gate")
@click.option("--gate", "gate_id", required=True, help="Gate id.")
@click.option("--run", "run_id", required=True, help="Run id (a finished run).")
@click.option("--json", "as_json", is_flag=True, help="Print the gate result as JSON.")
@click.pass_context
def gate(ctx: click.Context, gate_id: str, run_id: str, as_json: bool) -> None:
    """Check a finished run against a gate; exit status 1 when it fails (for CI pipelines)."""
    from google.protobuf import json_format

    from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> Any:
        return (await stub.CheckGate(pb.CheckGateRequest(gate=f"gates/{gate_id}", run=f"runs/{run_id}"),
                                     metadata=metadata, timeout=SERVICE_TIMEOUT_S)).result

    result = _call(ctx, action)
    if as_json:
        out.print_json(json_format.MessageToJson(result))
    else:
        table = Table(title=f"gates/{gate_id} on runs/{run_id}: {'PASSED' if result.passed else 'FAILED'}")
        for column in ("metric", "aggregate", "observed", "threshold", "ok"):
            table.add_column(column)
        for c in result.conditions:
            op = ">=" if c.condition.comparator == pb.COMPARATOR_GREATER_THAN_OR_EQUAL else "<="
            table.add_row(c.condition.metric, pb.Aggregation.Name(c.condition.aggregation).removeprefix("AGGREGATION_"),
                          f"{c.observed:.3f}", f"{op} {c.condition.threshold}", "yes" if c.passed else "NO")
        out.print(table)
    if not result.passed:
        raise SystemExit(1)


@cli.command("compare")
@click.argument("base_run")
@click.argument("candidate_run")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.pass_context
def compare(ctx: click.Context, base_run: str, candidate_run: str, as_json: bool) -> None:
    """Compare two finished runs example by example: mean delta with a paired bootstrap 95% CI, win rate."""
    from google.protobuf import json_format

    from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb

    async def action(stub: Any, metadata: list[tuple[str, str]]) -> Any:
        return await stub.CompareRuns(pb.CompareRunsRequest(base_run=f"runs/{base_run}",
                                                            candidate_run=f"runs/{candidate_run}"),
                                      metadata=metadata, timeout=SERVICE_TIMEOUT_S)

    reply = _call(ctx, action)
    if as_json:
        out.print_json(json_format.MessageToJson(reply))
        return
    table = Table(title=f"{candidate_run} vs {base_run}")
    for column in ("metric", "n", "base", "candidate", "delta", "95% CI", "win", "tie", "loss"):
        table.add_column(column)
    for c in reply.comparisons:
        table.add_row(c.metric, str(c.paired_examples), f"{c.base_mean:.3f}", f"{c.candidate_mean:.3f}",
                      f"{c.mean_delta:+.3f}", f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]", f"{c.win_rate:.2f}",
                      f"{c.tie_rate:.2f}", f"{c.loss_rate:.2f}")
    out.print(table)


@cli.command("meta")
@click.option("--data", "data_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="JSONL or CSV: one metric score and one human label per row (optionally a group).")
@click.option("--score-field", default="score", show_default=True, help="Field holding the metric's score.")
@click.option("--human-field", default="human", show_default=True, help="Field holding the human label.")
@click.option("--group-field", default="group", show_default=True,
              help="Field grouping rows (e.g. the source document) for per-group correlations.")
@click.option("--threshold", default=0.5, show_default=True, help="Score at which a binary label is predicted.")
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(100, 100_000),
              help="Bootstrap resamples per CI.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of tables.")
def meta(data_path: Path, score_field: str, human_field: str, group_field: str, threshold: float, resamples: int,
         as_json: bool) -> None:
    """How well a metric agrees with human labels: Spearman and Kendall (overall and averaged over
    groups), accuracy / precision / recall / F1 / AUROC for binary labels, each with a bootstrap 95% CI."""
    from llmo.evaluation.meta import MetaInputError, load_rows, meta_evaluate

    try:
        rows = load_rows(data_path, score_field=score_field, human_field=human_field, group_field=group_field)
    except MetaInputError as error:
        raise InputError(str(error)) from error
    with err.status(f"bootstrapping {len(rows)} rows..."):
        report = meta_evaluate(rows, threshold=threshold, resamples=resamples)
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=f"{data_path.name}: {report['rows']} rows" + (f", {report['groups']} groups"
                                                                      if "groups" in report else ""))
    for column in ("figure", "value", "95% CI"):
        table.add_column(column)

    def row(name: str, figure: dict[str, Any]) -> None:
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        table.add_row(name, fmt(figure["value"]), f"[{fmt(figure['ci_low'])}, {fmt(figure['ci_high'])}]")

    for key in ("spearman", "kendall", "spearman_per_group_mean", "kendall_per_group_mean"):
        if key in report:
            row(key.replace("_", " "), report[key])
    for key in ("accuracy", "precision", "recall", "f1", "auroc"):
        if "binary" in report:
            row(f"{key} (>= {threshold})", report["binary"][key])
    out.print(table)
