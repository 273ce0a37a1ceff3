"""`llmo router ...`: train and evaluate the learned complexity router."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from llmo.core.logging import configure_logging
from llmo.router.learned.data import RoutingDataError, load_routing_data
from llmo.router.learned.embed import Embedder
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
    train_router,
)


def _embedder(cache_dir: Path | None, no_cache: bool) -> Embedder:
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:
        pass
    return Embedder(cache_dir=None if no_cache else (cache_dir or default_cache_dir()))


def _load(path: Path) -> Any:
    try:
        return load_routing_data(path)
    except RoutingDataError as exc:
        raise click.ClickException(str(exc)) from exc


def _emit(result: dict[str, Any]) -> None:
    click.echo(json.dumps(result, indent=2))


@click.group()
def cli() -> None:
    """Learned complexity routing: train and evaluate the router model."""
    configure_logging("router", level=os.environ.get("LLMO_LOG_LEVEL", "warning"))


_cache_opt = click.option(
    "--cache-dir", type=click.Path(path_type=Path), default=None, help="Embedding cache (default .llmo/router/embeddings)."
)
_no_cache_opt = click.option("--no-cache", is_flag=True, help="Do not cache embeddings on disk.")


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Routing outcome data (CSV file or directory).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path(".llmo/router/model"), show_default=True)
@click.option("--c", "c", type=float, default=DEFAULT_C, show_default=True, help="Inverse L2 strength of the learned head.")
@click.option("--head-weight", type=float, default=DEFAULT_HEAD_WEIGHT, show_default=True, help="Weight of the learned head vs the complexity prior.")
@click.option("--option-weight", type=float, default=DEFAULT_OPTION_WEIGHT, show_default=True, help="Weight of the answer-option similarity.")
@click.option("--version", "version", default=None, help="Artifact version (default: UTC timestamp).")
@_cache_opt
@_no_cache_opt
def train(
    data_dir: Path,
    out_dir: Path,
    c: float,
    head_weight: float,
    option_weight: float,
    version: str | None,
    cache_dir: Path | None,
    no_cache: bool,
) -> None:
    """Train on all of DATA and write a versioned router artifact to OUT."""
    data = _load(data_dir)
    embedder = _embedder(cache_dir, no_cache)
    try:
        router = train_router(data, embedder, TrainConfig(c=c, head_weight=head_weight, option_weight=option_weight), version=version)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    router.save(out_dir)
    _emit(
        {
            "artifact": str(out_dir),
            "version": router.version,
            "weak_model": router.weak_model,
            "strong_model": router.strong_model,
            "train_prompts": len(data),
        }
    )


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
) -> None:
    """Report APGR, CPT(50%) and CPT(80%) (RouteLLM's definitions).

    Without --router: leave-subjects-out split of DATA, train on the rest, report the held-out
    subjects. With --router: the given artifact on all of DATA.
    """
    data = _load(data_dir)
    extra = {str(p): _load(p) for p in also}
    embedder = _embedder(cache_dir, no_cache)
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
                }
                for name, other in extra.items():
                    run.setdefault("also", {})[name] = evaluate_router(router, embedder, other).as_dict()
                runs.append(run)
            result["split"] = "leave-subjects-out"
            result["runs"] = runs
            result["mean"] = _mean([r["metrics"] for r in runs])
            for name in extra:
                result.setdefault("also_mean", {})[name] = _mean([r["also"][name] for r in runs])
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    _emit(result)


def _mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("apgr", "cpt50", "cpt80")
    return {k: round(sum(float(r[k]) for r in rows) / len(rows), 4) for k in keys}


if __name__ == "__main__":
    cli()
