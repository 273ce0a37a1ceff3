"""`llmo tune ...`: LoRA / QLoRA adapters and distilled students from a Llama checkpoint.

Heavy imports (torch, transformers, PEFT) happen inside the commands so `llmo --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from llmo.tune.events import Event

out = Console()
err = Console(stderr=True)

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group()
def tune() -> None:
    """Fine-tune Llama checkpoints: LoRA / QLoRA adapters (PEFT format) and distilled students."""


@contextmanager
def _progress(label: str) -> Iterator[Callable[[Event], None]]:
    """A listener that draws the run as a progress bar (on a terminal) and prints each eval
    and checkpoint line (always, on stderr)."""
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=not err.is_terminal)
    task = progress.add_task(label, total=None, loss="-", speed="")

    def listen(event: Event) -> None:
        if event.kind == "start":
            progress.update(task, total=event.total_steps, completed=event.step)
            if event.step:
                progress.console.print(f"resumed at step {event.step}/{event.total_steps}")
        elif event.kind == "step":
            speed = f"{event.tokens_per_s:,.0f} tok/s" if event.tokens_per_s else ""
            progress.update(task, completed=event.step, loss=f"{event.loss:.4f}", speed=speed)
        elif event.kind == "eval" and event.eval_perplexity is not None:
            progress.console.print(f"epoch {event.epoch + 1} (step {event.step}): "
                                   f"eval perplexity {event.eval_perplexity:.3f}")
        elif event.kind == "checkpoint":
            progress.console.print(f"checkpoint: {event.path}")

    with progress:
        yield listen


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _fail_cleanly(action: Callable[[], Any], resume_hint: bool = False) -> Any:
    """Run `action`, turning the library's input errors into CLI errors and Ctrl-C into a hint."""
    from llmo.tune import CheckpointError, DatasetError, ResumeError

    try:
        return action()
    except (CheckpointError, DatasetError, ResumeError, FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    except KeyboardInterrupt:
        hint = "; rerun the same command with --resume to continue from the last checkpoint" if resume_hint else ""
        err.print(f"[yellow]interrupted{hint}[/]")
        sys.exit(130)


def _train_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--base", required=True, type=EXISTING_DIR, help="Hugging Face Llama checkpoint directory."),
        click.option("--data", required=True, type=EXISTING_FILE,
                     help='JSONL: {"text": ...} or {"prompt": ..., "completion": ...} lines.'),
        click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Where the adapter (adapter_config.json + adapter_model.safetensors) goes."),
        click.option("--target-modules", default=DEFAULT_TARGETS, show_default=True,
                     help="Comma list of module names LoRA adapts."),
        click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank r."),
        click.option("--alpha", type=int, default=16, show_default=True, help="LoRA alpha (scale alpha / r)."),
        click.option("--dropout", type=float, default=0.05, show_default=True, help="LoRA dropout."),
        click.option("--lr", type=float, default=5e-4, show_default=True, help="AdamW learning rate."),
        click.option("--epochs", type=int, default=1, show_default=True),
        click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps."),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--max-length", type=int, default=256, show_default=True, help="Tokens per example."),
        click.option("--eval-fraction", type=float, default=0.1, show_default=True,
                     help="Share of lines held out for the per-epoch perplexity."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--checkpoint-every", type=int, default=50, show_default=True,
                     help="Write a resumable checkpoint every N steps (0: never)."),
        click.option("--keep-checkpoints", type=int, default=2, show_default=True),
        click.option("--resume", is_flag=True, help="Continue from the newest checkpoint under OUTPUT."),
        click.option("--skip-bad-lines", is_flag=True, help="Skip (and count) unusable dataset lines."),
        click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run_training(quantize: str | None, group_size: int, kwargs: dict[str, Any]) -> None:
    from llmo.tune.lora import LoraSpec, TrainConfig, train

    _threads(kwargs.pop("threads"))
    as_json = kwargs.pop("as_json")
    targets = tuple(t.strip() for t in kwargs.pop("target_modules").split(",") if t.strip())
    spec = LoraSpec(rank=kwargs.pop("rank"), alpha=kwargs.pop("alpha"), dropout=kwargs.pop("dropout"),
                    target_modules=targets)
    config = TrainConfig(lora=spec, quantize=quantize, group_size=group_size, **kwargs)
    label = "qlora" if quantize else "lora"

    def run() -> Any:
        with _progress(label) as listen:
            return train(config, listen)

    result = _fail_cleanly(run, resume_hint=config.checkpoint_every > 0)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    if result.skipped_lines:
        err.print(f"[yellow]skipped {len(result.skipped_lines)} bad lines[/] "
                  f"(first: line {result.skipped_lines[0][0]}: {result.skipped_lines[0][1]})")
    table = Table(title=f"{label} adapter: {result.output}")
    for column in ("epoch", "step", "train loss", "eval perplexity"):
        table.add_column(column, justify="right")
    for entry in result.history:
        ppl = entry.get("eval_perplexity")
        table.add_row(str(entry["epoch"]), str(entry["step"]), f"{entry['train_loss']:.4f}",
                      "-" if ppl is None else f"{ppl:.3f}")
    out.print(table)
    out.print(f"{result.steps} steps, {result.seconds_per_step:.2f} s/step, {result.tokens_per_s:,.0f} tok/s, "
              f"{result.trainable_parameters:,} trainable parameters, peak RSS {result.peak_rss_bytes / 2**20:,.0f} MiB")


@tune.command()
@_train_options
def lora(**kwargs: Any) -> None:
    """LoRA on the fp32 base; saves a PEFT adapter to OUTPUT."""
    _run_training(None, 64, kwargs)


@tune.command()
@_train_options
@click.option("--quant-backend", type=click.Choice(["llmo-int4", "bnb-nf4"]), default="llmo-int4", show_default=True,
              help="Frozen 4-bit base: the project's INT4 (llmo.ops) or bitsandbytes NF4.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="llmo-int4 quantization group.")
def qlora(quant_backend: str, group_size: str, **kwargs: Any) -> None:
    """QLoRA: LoRA on a frozen 4-bit base; saves a PEFT adapter (it loads on the fp base too)."""
    _run_training(quant_backend, int(group_size), kwargs)


@tune.command()
@click.option("--teacher", required=True, type=EXISTING_DIR, help="Teacher: a Hugging Face Llama checkpoint.")
@click.option("--teacher-adapter", type=EXISTING_DIR, default=None, help="PEFT adapter merged into the teacher.")
@click.option("--corpus", required=True, type=EXISTING_FILE, help="Plain text, or JSONL as for `tune lora`.")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Student checkpoint directory (config.json + model.safetensors + tokenizer).")
@click.option("--layers", type=int, default=None, help="Student layers (default: half the teacher's).")
@click.option("--hidden", type=int, default=None, help="Student hidden size (default: the teacher's).")
@click.option("--intermediate", type=int, default=None, help="Student MLP size (default: scaled with hidden).")
@click.option("--heads", type=int, default=None, help="Student attention heads.")
@click.option("--kv-heads", type=int, default=None, help="Student key/value heads.")
@click.option("--init", type=click.Choice(["auto", "teacher", "random"]), default="auto", show_default=True,
              help="Start from the teacher's layers (needs its widths) or at random.")
@click.option("--temperature", type=float, default=2.0, show_default=True, help="Distillation temperature T.")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Weight of the KL term; 1 - alpha goes to the LM loss.")
@click.option("--steps", type=int, default=200, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--eval-fraction", type=float, default=0.1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--skip-bad-lines", is_flag=True)
@click.option("--speed-prompts", type=int, default=4, show_default=True, help="Prompts timed for tokens/s.")
@click.option("--speed-tokens", type=int, default=32, show_default=True, help="Greedy tokens per timed prompt.")
@click.option("--threads", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def distill(layers: int | None, hidden: int | None, intermediate: int | None, heads: int | None,
            kv_heads: int | None, threads: int | None, as_json: bool, **kwargs: Any) -> None:
    """Distil a smaller student from the teacher's logits; reports size, perplexity and speed of both."""
    from llmo.tune.distill import DistillConfig, StudentShape
    from llmo.tune.distill import distill as run_distill

    _threads(threads)
    shape = StudentShape(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads)
    config = DistillConfig(student=shape, **kwargs)

    def run() -> Any:
        with _progress("distill") as listen:
            return run_distill(config, listen)

    result = _fail_cleanly(run)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    table = Table(title=f"student: {result.output}")
    for column in ("model", "parameters", "weights MiB", "eval perplexity", "greedy tok/s"):
        table.add_column(column, justify="right")
    for name, report in (("teacher", result.teacher), ("student", result.student)):
        table.add_row(name, f"{report.parameters:,}", f"{report.weight_bytes / 2**20:.1f}",
                      f"{report.eval_perplexity:.3f}", f"{report.greedy_tokens_per_s:.1f}")
    out.print(table)
    shape_text = ", ".join(f"{k}={v}" for k, v in result.student_config.items())
    out.print(f"{result.steps} steps in {result.train_seconds:.0f} s (init: {result.init}); {shape_text}")
