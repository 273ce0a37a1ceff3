"""`llmo router ...`: train and evaluate the learned complexity router."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from llmo.core.logging import configure_logging
from llmo.embedding import Embedder
from llmo.router.learned.data import RoutingDataError, load_routing_data
from llmo.router.learned.model import (
    DEFAULT_HEAD_WEIGHT,
    DEFAULT_OPTION_WEIGHT,
    ArtifactError,
    ComplexityRouter,
)
from llmo.router.learned.train import (
    DEFAULT_C,
    TrainConfig,
    default_cache_dir,
    evaluate_router,
    holdout_evaluation,
    signal_report,
    train_router,
)


def _embedder(cache_dir: Path | None, no_cache: bool, progress: bool) -> Embedder:
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:
        pass
    return Embedder(cache_dir=None if no_cache else (cache_dir or default_cache_dir()), progress=progress)


def _load(path: Path) -> Any:
    try:
        return load_routing_data(path)
    except RoutingDataError as exc:
        raise click.ClickException(str(exc)) from exc


def _emit(result: dict[str, Any]) -> None:
    click.echo(json.dumps(result, indent=2))


def _progress(as_json: bool) -> bool:
    """Embedding a dataset takes minutes on a CPU: show a bar to people, never in --json mode."""
    return not as_json and sys.stderr.isatty()


def _metrics_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    columns = [("APGR", "apgr", "{:.3f}"), ("CPT(50%)", "cpt50", "{:.1%}"), ("CPT(80%)", "cpt80", "{:.1%}"),
               ("weak acc.", "weak_accuracy", "{:.1%}"), ("strong acc.", "strong_accuracy", "{:.1%}"), ("prompts", "n", "{}")]
    shown = [c for c in columns if all(c[1] in m for _, m in rows)]
    table = Table(title=title)
    table.add_column("data")
    for header, _, _ in shown:
        table.add_column(header, justify="right")
    for label, m in rows:
        table.add_row(Path(label).name, *(fmt.format(m[key]) for _, key, fmt in shown))
    return table


def _print_evaluation(result: dict[str, Any]) -> None:
    console = Console()
    if "runs" not in result:
        rows = [(result["data"], result["metrics"]), *result.get("also", {}).items()]
        console.print(_metrics_table(f"router {result['router_version']}", rows))
        return
    table = Table(title=f"{result['data']}: leave-subjects-out (held-out subjects never seen in training)")
    for column in ("seed", "train", "test", "subjects", "APGR", "CPT(50%)", "CPT(80%)", "random", "oracle"):
        table.add_column(column, justify="right")
    for run in result["runs"]:
        m = run["metrics"]
        table.add_row(
            str(run["seed"]),
            str(run["train_prompts"]),
            str(run["test_prompts"]),
            str(len(run["test_subjects"])),
            f"{m['apgr']:.3f}",
            f"{m['cpt50']:.1%}",
            f"{m['cpt80']:.1%}",
            f"{run['random_apgr']:.3f}",
            f"{run['subject_oracle_apgr']:.3f}",
        )
    mean = result["mean"]
    table.add_row(
        "mean", "", "", "", f"{mean['apgr']:.3f}", f"{mean['cpt50']:.1%}", f"{mean['cpt80']:.1%}",
        f"{mean['random_apgr']:.3f}", f"{mean['subject_oracle_apgr']:.3f}", style="bold",
    )
    console.print(table)
    console.print("train / test: prompts; random: APGR of random routing on the same split (about 0.5);")
    console.print(
        "oracle: APGR of a subject oracle, a router that knew each held-out subject's exact difficulty "
        "and nothing about single prompts."
    )
    for run in result["runs"]:
        console.print(f"seed {run['seed']} held out: " + ", ".join(run["test_subjects"]))
    for name, m in result.get("also_mean", {}).items():
        console.print(_metrics_table(f"{name}: the same trained routers (mean over seeds)", [(name, m)]))


@click.group()
def cli() -> None:
    """Learned complexity routing: train and evaluate the router model."""
    configure_logging("router", level=os.environ.get("LLMO_LOG_LEVEL", "warning"))


_cache_opt = click.option(
    "--cache-dir", type=click.Path(path_type=Path), default=None, help="Embedding cache (default .llmo/router/embeddings)."
)
_no_cache_opt = click.option("--no-cache", is_flag=True, help="Do not cache embeddings on disk.")
_json_opt = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Routing outcome data (CSV file or directory).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path(".llmo/router/model"), show_default=True)
@click.option("--c", "c", type=float, default=DEFAULT_C, show_default=True, help="Inverse L2 strength of the learned head.")
@click.option("--head-weight", type=float, default=DEFAULT_HEAD_WEIGHT, show_default=True, help="Weight of the learned head vs the complexity prior.")
@click.option("--option-weight", type=float, default=DEFAULT_OPTION_WEIGHT, show_default=True, help="Weight of the answer-option similarity.")
@click.option("--version", "version", default=None, help="Artifact version (default: UTC timestamp).")
@_cache_opt
@_no_cache_opt
@_json_opt
def train(
    data_dir: Path,
    out_dir: Path,
    c: float,
    head_weight: float,
    option_weight: float,
    version: str | None,
    cache_dir: Path | None,
    no_cache: bool,
    as_json: bool,
) -> None:
    """Train on all of DATA and write a versioned router artifact to OUT."""
    data = _load(data_dir)
    embedder = _embedder(cache_dir, no_cache, _progress(as_json))
    try:
        router = train_router(data, embedder, TrainConfig(c=c, head_weight=head_weight, option_weight=option_weight), version=version)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    router.save(out_dir)
    summary = {
        "artifact": str(out_dir),
        "version": router.version,
        "weak_model": router.weak_model,
        "strong_model": router.strong_model,
        "train_prompts": len(data),
    }
    if as_json:
        _emit(summary)
        return
    table = Table(title="router trained")
    table.add_column("")
    table.add_column("")
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), str(value))
    Console().print(table)


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Routing outcome data (CSV file or directory).")
@click.option("--router", "router_dir", type=click.Path(path_type=Path), default=None, help="Evaluate this artifact on all of DATA instead of a held-out split.")
@click.option("--also", "also", multiple=True, type=click.Path(path_type=Path), help="Report the same trained router on other data too (e.g. gsm8k).")
@click.option("--test-fraction", type=float, default=0.25, show_default=True, help="Share of prompts (whole subjects) held out.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subject split; repeat with --seeds for a mean.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Number of split seeds to average over.")
@click.option("--c", "c", type=float, default=DEFAULT_C, show_default=True)
@click.option("--head-weight", type=float, default=DEFAULT_HEAD_WEIGHT, show_default=True)
@click.option("--option-weight", type=float, default=DEFAULT_OPTION_WEIGHT, show_default=True)
@_cache_opt
@_no_cache_opt
@_json_opt
def evaluate(
    data_dir: Path,
    router_dir: Path | None,
    also: tuple[Path, ...],
    test_fraction: float,
    seed: int,
    seeds: int,
    c: float,
    head_weight: float,
    option_weight: float,
    cache_dir: Path | None,
    no_cache: bool,
    as_json: bool,
) -> None:
    """Report APGR, CPT(50%) and CPT(80%) (RouteLLM's definitions).

    Without --router: leave-subjects-out split of DATA, train on the rest, report the held-out
    subjects. With --router: the given artifact on all of DATA.
    """
    data = _load(data_dir)
    extra = {str(p): _load(p) for p in also}
    embedder = _embedder(cache_dir, no_cache, _progress(as_json))
    result: dict[str, Any] = {"data": str(data_dir)}
    try:
        if router_dir is not None:
            try:
                router = ComplexityRouter.load(router_dir)
            except ArtifactError as exc:
                raise click.ClickException(str(exc)) from exc
            result["router_version"] = router.version
            result["metrics"] = evaluate_router(router, embedder, data).as_dict()
            for name, other in extra.items():
                result.setdefault("also", {})[name] = evaluate_router(router, embedder, other).as_dict()
        else:
            runs = []
            for s in range(seed, seed + seeds):
                router, report = holdout_evaluation(data, embedder, test_fraction, s, TrainConfig(c=c, head_weight=head_weight, option_weight=option_weight, seed=s))
                run: dict[str, Any] = {
                    "seed": s,
                    "train_prompts": report.train_size,
                    "test_prompts": report.test_size,
                    "test_subjects": report.test_subjects,
                    "metrics": report.metrics.as_dict(),
                    "random_apgr": round(report.random_apgr, 4),
                    "subject_oracle_apgr": round(report.subject_oracle_apgr, 4),
                }
                for name, other in extra.items():
                    run.setdefault("also", {})[name] = evaluate_router(router, embedder, other).as_dict()
                runs.append(run)
            result["split"] = "leave-subjects-out"
            result["runs"] = runs
            result["mean"] = _mean([r["metrics"] for r in runs])
            for key in ("random_apgr", "subject_oracle_apgr"):
                result["mean"][key] = round(sum(float(r[key]) for r in runs) / len(runs), 4)
            for name in extra:
                result.setdefault("also_mean", {})[name] = _mean([r["also"][name] for r in runs])
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        _emit(result)
    else:
        _print_evaluation(result)


def _mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("apgr", "cpt50", "cpt80")
    return {k: round(sum(float(r[k]) for r in rows) / len(rows), 4) for k in keys}


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Routing outcome data (CSV file or directory).")
@_json_opt
def signals(data_dir: Path, as_json: bool) -> None:
    """APGR of single cheap text signals (and the subject oracle) as routing scores on all of DATA.

    No training and no embeddings: a quick screen of what in a prompt predicts that the strong
    model is needed. 0.5 is random; below 0.5 the signal works reversed.
    """
    data = _load(data_dir)
    try:
        rows = signal_report(data)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        _emit({"data": str(data_dir), "prompts": len(data), "apgr": {name: round(v, 4) for name, v in rows}})
        return
    table = Table(title=f"{data_dir}: single signals as routing scores ({len(data)} prompts)")
    table.add_column("signal")
    table.add_column("APGR", justify="right")
    table.add_column("reversed", justify="right")
    for name, value in sorted(rows, key=lambda r: -abs(r[1] - 0.5)):
        table.add_row(name, f"{value:.3f}", f"{1.0 - value:.3f}" if name != "subject oracle" else "")
    Console().print(table)


if __name__ == "__main__":
    cli()
