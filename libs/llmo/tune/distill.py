"""Logit distillation: a smaller Llama student learns a teacher's next-token distributions.

Loss per step: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * LM loss``, the KL
over every real position at temperature ``T``, the LM loss over the labelled tokens. The
student keeps the teacher's tokenizer (logits must share the vocabulary) and, when its widths
match the teacher's, starts from the teacher's embeddings, head and an evenly spread subset of
its layers. It is saved as a Hugging Face checkpoint directory in the teacher's layout
(config.json, model.safetensors, tokenizer files), which the inference engine serves as is.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from llmo.core.logging import get_logger
from llmo.tune.base import (
    TOKENIZER_FILES,
    TokenizerInfo,
    load_llama,
    load_tokenizer,
    make_readable,
    parameter_count,
    read_config,
    resolve_device,
)
from llmo.tune.data import Example, batches, collate, epoch_order, read_jsonl, split_eval, tokenize
from llmo.tune.events import Event, Listener, ignore
from llmo.tune.metrics import forward_logits, greedy_speed, perplexity, token_nll

log = get_logger(__name__)
SUMMARY_FILE = "distill_summary.json"
INITS = ("auto", "teacher", "random")


@dataclass(frozen=True)
class StudentShape:
    """Overrides of the teacher's shape; None keeps the teacher's value (layers: half of it)."""

    layers: int | None = None
    hidden: int | None = None
    intermediate: int | None = None
    heads: int | None = None
    kv_heads: int | None = None


@dataclass(frozen=True)
class DistillConfig:
    teacher: Path
    corpus: Path  # .jsonl (text or prompt/completion lines) or plain text
    output: Path
    student: StudentShape = field(default_factory=StudentShape)
    teacher_adapter: Path | None = None  # a PEFT adapter merged into the teacher first
    temperature: float = 2.0
    alpha: float = 0.5
    steps: int = 200
    batch_size: int = 8
    max_length: int = 256
    lr: float = 1e-3
    grad_clip: float = 1.0
    eval_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    init: str = "auto"
    skip_bad_lines: bool = False
    speed_prompts: int = 4
    speed_tokens: int = 32


@dataclass
class ModelReport:
    parameters: int
    weight_bytes: int
    eval_perplexity: float
    greedy_tokens_per_s: float


@dataclass
class DistillResult:
    output: Path
    steps: int
    train_seconds: float
    train_tokens: int
    student_config: dict[str, int]
    init: str
    student: ModelReport
    teacher: ModelReport
    eval_tokens: int
    final_loss: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"] = str(self.output)
        data["size_ratio"] = self.student.parameters / self.teacher.parameters
        data["speedup"] = self.student.greedy_tokens_per_s / self.teacher.greedy_tokens_per_s
        return data


def student_config(teacher: LlamaConfig, shape: StudentShape) -> LlamaConfig:
    """The teacher's config with the student's depth and widths (head_dim follows hidden / heads)."""
    config = copy.deepcopy(teacher)
    layers = shape.layers if shape.layers is not None else max(1, teacher.num_hidden_layers // 2)
    hidden = shape.hidden or teacher.hidden_size
    teacher_head_dim = getattr(teacher, "head_dim", None) or teacher.hidden_size // teacher.num_attention_heads
    heads = shape.heads or (teacher.num_attention_heads if hidden == teacher.hidden_size
                            else max(1, hidden // teacher_head_dim))
    kv_heads = shape.kv_heads or min(teacher.num_key_value_heads or teacher.num_attention_heads, heads)
    intermediate = shape.intermediate or (teacher.intermediate_size if hidden == teacher.hidden_size
                                          else int(teacher.intermediate_size * hidden / teacher.hidden_size))
    checks = [(layers >= 1, f"layers must be at least 1, got {layers}"),
              (hidden >= 1 and intermediate >= 1, "hidden and intermediate sizes must be positive"),
              (hidden % heads == 0, f"hidden size {hidden} must be a multiple of the head count {heads}"),
              (heads % kv_heads == 0, f"heads ({heads}) must be a multiple of kv heads ({kv_heads})"),
              ((hidden // heads) % 2 == 0, f"head_dim {hidden // heads} must be even (rotary embeddings)")]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"student shape: {message}")
    config.num_hidden_layers = layers
    config.hidden_size = hidden
    config.intermediate_size = intermediate
    config.num_attention_heads = heads
    config.num_key_value_heads = kv_heads
    config.head_dim = hidden // heads
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = list(config.layer_types)[:1] * layers
    return config


def _same_widths(a: LlamaConfig, b: LlamaConfig) -> bool:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    return all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


def spread_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer indices a student starts from: evenly spread, first and last included."""
    if student_layers >= teacher_layers:
        return list(range(teacher_layers)) + [teacher_layers - 1] * (student_layers - teacher_layers)
    if student_layers == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def build_student(teacher: LlamaForCausalLM, config: LlamaConfig, init: str, seed: int) -> tuple[LlamaForCausalLM, str]:
    """The student and the init actually used ("teacher" or "random")."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    matches = _same_widths(teacher.config, config)
    if init == "teacher" and not matches:
        raise ValueError("init from the teacher needs the teacher's widths (hidden, intermediate, heads)")
    torch.manual_seed(seed)
    student = LlamaForCausalLM(config).to(next(teacher.parameters()).device)  # type: ignore[arg-type]
    if init == "random" or not matches:
        return student, "random"
    student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    student.model.norm.load_state_dict(teacher.model.norm.state_dict())
    student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    for mine, theirs in zip(student.model.layers, spread_layers(len(teacher.model.layers), config.num_hidden_layers),
                            strict=True):
        mine.load_state_dict(teacher.model.layers[theirs].state_dict())
    return student, "teacher"


def load_teacher(path: Path, adapter: Path | None, device: torch.device) -> LlamaForCausalLM:
    if adapter is None:
        return load_llama(path, device)
    from llmo.tune.lora import load_adapter

    merged = load_adapter(path, adapter, device=str(device)).merge_and_unload()
    assert isinstance(merged, LlamaForCausalLM)
    return merged


def corpus_examples(path: Path, tok: TokenizerInfo, max_length: int, eval_fraction: float, seed: int,
                    skip_bad_lines: bool) -> tuple[list[Example], list[Example]]:
    """(train, eval). JSONL: lines split at random (seeded). Plain text: windows of ``max_length``
    tokens, the last ``eval_fraction`` of the text held out (as the demo model's own split)."""
    if path.suffix == ".jsonl":
        parsed = read_jsonl(path, skip_bad_lines=skip_bad_lines)
        train_records, eval_records = split_eval(parsed.records, eval_fraction, seed)
        return (tokenize(train_records, tok, tok.eos_id, max_length),
                tokenize(eval_records, tok, tok.eos_id, max_length))
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * (1 - eval_fraction))

    def windows(part: str) -> list[Example]:
        ids = tok.encode(part)
        return [Example(ids[i:i + max_length], ids[i:i + max_length]) for i in range(0, len(ids) - 1, max_length)
                if len(ids[i:i + max_length]) >= 2]

    train_set, eval_set = windows(text[:cut]), windows(text[cut:]) if eval_fraction > 0 else []
    if not train_set:
        raise ValueError(f"{path} is too short to distill on")
    return train_set, eval_set


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict[str, torch.Tensor],
                 temperature: float, alpha: float) -> tuple[torch.Tensor, float, float]:
    """(loss, KL term, LM term) of one batch."""
    mask = batch["attention_mask"].bool()
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
    nll, count = token_nll(student_logits, batch["labels"])
    lm = nll / max(count, 1)
    return alpha * kl + (1 - alpha) * lm, float(kl.detach()), float(lm.detach())


def _speed_prompts(examples: list[Example], count: int) -> list[list[int]]:
    prompts = []
    for e in examples[:count]:
        first_label = next((i for i, t in enumerate(e.labels) if t >= 0 and i > 0), 1)
        prompts.append(e.input_ids[: max(1, min(first_label, 32))])
    return prompts


def distill(config: DistillConfig, on_event: Listener = ignore) -> DistillResult:
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError("steps and batch size must be at least 1")
    if not 0.0 <= config.alpha <= 1.0 or config.temperature <= 0:
        raise ValueError("alpha must be in [0, 1] and the temperature positive")
    device = resolve_device(config.device)
    tok = load_tokenizer(config.teacher, read_config(config.teacher))
    train_set, eval_set = corpus_examples(config.corpus, tok, config.max_length, config.eval_fraction, config.seed,
                                          config.skip_bad_lines)
    teacher = load_teacher(config.teacher, config.teacher_adapter, device).eval().requires_grad_(False)
    student, init = build_student(teacher, student_config(teacher.config, config.student), config.init, config.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(train_set) / config.batch_size)
    on_event(Event("start", 0, config.steps, 0))
    student.train()
    step, seconds, tokens, loss_value = 0, 0.0, 0, float("nan")
    while step < config.steps:
        epoch = step // per_epoch
        for group in batches(train_set, config.batch_size, epoch_order(len(train_set), config.seed, epoch)):
            began = time.perf_counter()
            batch = {k: v.to(device) for k, v in collate(group, tok.pad_id).items()}
            with torch.no_grad():
                teacher_logits = forward_logits(teacher, batch)
            loss, _, _ = distill_loss(forward_logits(student, batch), teacher_logits, batch, config.temperature,
                                      config.alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            seconds += time.perf_counter() - began
            tokens += int(batch["attention_mask"].sum())
            loss_value = float(loss.detach())
            on_event(Event("step", step, config.steps, epoch, loss=loss_value, tokens_per_s=tokens / max(seconds, 1e-9)))
            if step == config.steps:
                break
    student.eval()
    save_checkpoint(student, config.teacher, config.output)
    report_set = eval_set or train_set[: max(1, len(train_set) // 10)]
    prompts = _speed_prompts(report_set, config.speed_prompts)
    reports = {}
    for name, model in (("student", student), ("teacher", teacher)):
        ppl = perplexity(model, report_set, tok.pad_id, config.batch_size, device)
        speed = greedy_speed(model, prompts, config.speed_tokens, tok.pad_id, device)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        reports[name] = (ModelReport(parameter_count(model), size, ppl.perplexity, speed.tokens_per_s), ppl.tokens)
    on_event(Event("eval", step, config.steps, 0, loss=loss_value, eval_perplexity=reports["student"][0].eval_perplexity))
    shape = {k: int(getattr(student.config, k)) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                          "num_attention_heads", "num_key_value_heads", "head_dim")}
    result = DistillResult(config.output, step, seconds, tokens, shape, init, reports["student"][0],
                           reports["teacher"][0], reports["student"][1], loss_value)
    (config.output / SUMMARY_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    log.info("distill_finished", output=str(config.output), student_ppl=result.student.eval_perplexity,
             teacher_ppl=result.teacher.eval_perplexity)
    return result


def save_checkpoint(model: LlamaForCausalLM, tokenizer_from: Path, output: Path) -> None:
    """config.json + model.safetensors, with the tokenizer and generation files of ``tokenizer_from``."""
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output))
    make_readable(output)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, output / name)
