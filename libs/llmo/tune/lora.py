"""LoRA and QLoRA fine-tuning of a Llama checkpoint with PEFT.

One seeded loop for both: QLoRA swaps the decoder projections for a frozen 4-bit module
first (:mod:`llmo.tune.quant4`). The epoch order is a function of (seed, epoch) and the
checkpoint carries the optimizer and RNG state, so ``resume`` continues the very run an
interruption stopped. The result is a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads on the fp base.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from llmo.core.logging import get_logger
from llmo.tune import checkpoints
from llmo.tune.base import (
    load_llama,
    load_tokenizer,
    make_readable,
    read_config,
    resolve_device,
    weight_bytes,
)
from llmo.tune.data import Example, batches, collate, epoch_order, read_jsonl, split_eval, tokenize
from llmo.tune.events import Event, Listener, ignore
from llmo.tune.metrics import forward_logits, perplexity, token_nll
from llmo.tune.quant4 import (
    BACKENDS,
    DEFAULT_GROUP_SIZE,
    PROJECTIONS,
    load_llama_4bit,
    lora_config_for,
    quiet_peft_warnings,
)

log = get_logger(__name__)
SUMMARY_FILE = "training_summary.json"


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = PROJECTIONS


@dataclass(frozen=True)
class TrainConfig:
    base: Path
    data: Path
    output: Path
    lora: LoraSpec = field(default_factory=LoraSpec)
    quantize: str | None = None  # None: LoRA on the fp32 base; a quant4.BACKENDS name: QLoRA
    group_size: int = DEFAULT_GROUP_SIZE
    lr: float = 5e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 1
    max_steps: int | None = None  # stop early (still evaluates at the end)
    batch_size: int = 8
    max_length: int = 256
    eval_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 50  # steps; 0 writes none
    keep_checkpoints: int = 2
    resume: bool = False
    skip_bad_lines: bool = False


@dataclass
class TrainResult:
    output: Path
    steps: int
    total_steps: int
    train_examples: int
    eval_examples: int
    skipped_lines: list[tuple[int, str]]
    history: list[dict[str, Any]]
    final_eval_perplexity: float | None
    train_seconds: float
    train_tokens: int
    median_seconds_per_step: float  # robust to a busy machine, unlike the mean
    trainable_parameters: int
    base_weight_bytes: int
    peak_rss_bytes: int
    resumed_from: Path | None
    quantize: str | None
    device: str
    model: PeftModel | None = field(default=None, repr=False, compare=False)  # the trained model, in eval mode

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / self.steps if self.steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else float("nan")

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(replace(self, model=None)).items() if k != "model"}
        data["output"] = str(self.output)
        data["resumed_from"] = str(self.resumed_from) if self.resumed_from else None
        data["skipped_lines"] = [{"line": n, "reason": r} for n, r in self.skipped_lines]
        data["seconds_per_step"] = self.seconds_per_step
        data["tokens_per_s"] = self.tokens_per_s
        return data


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(config: TrainConfig) -> dict[str, Any]:
    """Settings a resumed run must share with the one that wrote the checkpoint."""
    return {"base": str(config.base.resolve()), "data_sha256": _file_digest(config.data),
            "rank": config.lora.rank, "alpha": config.lora.alpha, "dropout": config.lora.dropout,
            "target_modules": sorted(config.lora.target_modules), "quantize": config.quantize,
            "group_size": config.group_size, "lr": config.lr, "weight_decay": config.weight_decay,
            "grad_clip": config.grad_clip, "epochs": config.epochs, "batch_size": config.batch_size,
            "max_length": config.max_length, "eval_fraction": config.eval_fraction, "seed": config.seed,
            "skip_bad_lines": config.skip_bad_lines}


def _check(config: TrainConfig) -> None:
    if config.quantize is not None and config.quantize not in BACKENDS:
        raise ValueError(f"unknown 4-bit backend {config.quantize!r}; choose one of {', '.join(BACKENDS)}")
    positive = {"rank": config.lora.rank, "epochs": config.epochs, "batch size": config.batch_size}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not 0.0 <= config.lora.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.lora.dropout}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max steps must be at least 1, got {config.max_steps}")
    if not config.lora.target_modules:
        raise ValueError("name at least one target module")


def _missing_targets(model: torch.nn.Module, targets: tuple[str, ...]) -> list[str]:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [t for t in targets if t not in present]


def build_model(config: TrainConfig, device: torch.device) -> PeftModel:
    """The base (quantized for QLoRA) with freshly initialised LoRA weights (seeded)."""
    if config.quantize is None:
        model = load_llama(config.base, device)
    else:
        model = load_llama_4bit(config.base, config.quantize, config.group_size, device)
    missing = _missing_targets(model, config.lora.target_modules)
    if missing:
        raise ValueError(f"target modules not in {config.base}: {', '.join(missing)} "
                         f"(Llama has {', '.join(PROJECTIONS)})")
    torch.manual_seed(config.seed)
    lora = lora_config_for(config.quantize, LoraConfig(
        r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules), bias="none", task_type="CAUSAL_LM"))
    with quiet_peft_warnings():
        peft_model = get_peft_model(model, lora)
    assert isinstance(peft_model, PeftModel)
    return peft_model


def train(config: TrainConfig, on_event: Listener = ignore) -> TrainResult:
    """Fine-tune, evaluate on the held-out split after every epoch, save the adapter to ``config.output``."""
    _check(config)
    notify = on_event
    device = resolve_device(config.device)
    model_config = read_config(config.base)
    tok = load_tokenizer(config.base, model_config)
    context = int(model_config.get("max_position_embeddings") or config.max_length)
    if config.max_length > context:
        raise ValueError(f"max length {config.max_length} exceeds the model's context ({context} positions)")
    parsed = read_jsonl(config.data, skip_bad_lines=config.skip_bad_lines)
    train_records, eval_records = split_eval(parsed.records, config.eval_fraction, config.seed)
    train_set = tokenize(train_records, tok, tok.eos_id, config.max_length)
    eval_set = tokenize(eval_records, tok, tok.eos_id, config.max_length)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    ckpt_root = config.output / "checkpoints"
    if not config.resume and checkpoints.checkpoint_dirs(ckpt_root):
        raise checkpoints.ResumeError(f"{ckpt_root} holds checkpoints of an earlier run: pass resume to continue "
                                      "it, or choose another output directory")
    model = build_model(config, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    fingerprint = _fingerprint(config)
    state = checkpoints.TrainState(0, [], 0.0, 0, fingerprint)
    resumed_from: Path | None = None
    if config.resume:
        state, resumed_from = checkpoints.load_latest(ckpt_root, model, optimizer, fingerprint)
        log.info("tune_resumed", checkpoint=str(resumed_from), step=state.step)
    notify(Event("start", state.step, total_steps, state.step // max(steps_per_epoch, 1)))

    model.train()
    while state.step < total_steps:
        epoch, offset = divmod(state.step, steps_per_epoch)
        groups = list(batches(train_set, config.batch_size, epoch_order(len(train_set), config.seed, epoch)))
        for index in range(offset, len(groups)):
            began = time.perf_counter()
            batch = {k: v.to(device) for k, v in collate(groups[index], tok.pad_id).items()}
            nll, count = token_nll(forward_logits(model, batch), batch["labels"])
            loss = nll / max(count, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            state.step += 1
            state.step_seconds.append(time.perf_counter() - began)
            state.train_seconds += state.step_seconds[-1]
            state.train_tokens += int(batch["attention_mask"].sum())
            loss_value = float(loss.detach())
            notify(Event("step", state.step, total_steps, epoch, loss=loss_value,
                         tokens_per_s=state.train_tokens / max(state.train_seconds, 1e-9)))
            if index == len(groups) - 1 or state.step == total_steps:
                _evaluate(model, eval_set, tok.pad_id, config, device, state, epoch, loss_value, total_steps, notify)
            if state.step == total_steps:
                break
            if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                path = checkpoints.save(ckpt_root, model, optimizer, state, config.keep_checkpoints)
                notify(Event("checkpoint", state.step, total_steps, epoch, path=path))

    config.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(config.output))
    make_readable(config.output)
    # The finished adapter supersedes them (and a rerun into this directory starts afresh).
    shutil.rmtree(ckpt_root, ignore_errors=True)
    final = state.history[-1]["eval_perplexity"] if state.history and eval_set else None
    result = TrainResult(
        output=config.output, steps=state.step, total_steps=total_steps, train_examples=len(train_set),
        eval_examples=len(eval_set), skipped_lines=parsed.skipped, history=state.history,
        final_eval_perplexity=final, train_seconds=state.train_seconds, train_tokens=state.train_tokens,
        median_seconds_per_step=statistics.median(state.step_seconds) if state.step_seconds else float("nan"),
        trainable_parameters=sum(p.numel() for p in trainable),
        base_weight_bytes=weight_bytes(model.get_base_model()) - sum(p.numel() * p.element_size() for p in trainable),
        peak_rss_bytes=peak_rss_bytes(), resumed_from=resumed_from, quantize=config.quantize, device=str(device),
        model=model.eval())
    (config.output / SUMMARY_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    log.info("tune_finished", output=str(config.output), steps=state.step, eval_perplexity=final)
    return result


def _evaluate(model: PeftModel, eval_set: list[Example], pad_id: int, config: TrainConfig, device: torch.device,
              state: checkpoints.TrainState, epoch: int, train_loss: float, total_steps: int,
              notify: Listener) -> None:
    entry: dict[str, Any] = {"epoch": epoch + 1, "step": state.step, "train_loss": train_loss}
    if eval_set:
        result = perplexity(model, eval_set, pad_id, config.batch_size, device)
        entry |= {"eval_loss": result.loss, "eval_perplexity": result.perplexity, "eval_tokens": result.tokens}
    state.history.append(entry)
    notify(Event("eval", state.step, total_steps, epoch, loss=train_loss, eval_perplexity=entry.get("eval_perplexity")))


def load_adapter(base: Path | str, adapter: Path | str, quantize: str | None = None,
                 group_size: int = DEFAULT_GROUP_SIZE, device: str = "cpu") -> PeftModel:
    """A saved adapter on its base for evaluation: on the fp32 base, or on a 4-bit base (as QLoRA trained)."""
    if quantize is None:
        model = load_llama(base, resolve_device(device))
    else:
        model = load_llama_4bit(base, quantize, group_size, resolve_device(device))
    with quiet_peft_warnings():
        if quantize == "llmo-int4":
            # PeftModel.from_pretrained builds its LoraConfig from the file: register the INT4 layer on it.
            config = LoraConfig.from_pretrained(str(adapter))
            peft_model = PeftModel.from_pretrained(model, str(adapter), config=lora_config_for(quantize, config))
        else:
            peft_model = PeftModel.from_pretrained(model, str(adapter))
    peft_model.eval()
    return peft_model
