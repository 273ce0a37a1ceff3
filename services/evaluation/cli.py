"""`llmo evaluation ...` (alias `llmo eval`): offline evaluation tools; for now the local
faithfulness detector's scores on labelled claim/document pairs."""

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


@click.group(short_help="Evaluation tools (alias: eval).")
def cli() -> None:
    """Evaluation tools, also as `llmo eval`: for now the local faithfulness detector's scores
    (`faithfulness`). The evaluation service itself is not built yet."""


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
