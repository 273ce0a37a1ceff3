"""JSONL fine-tuning data: parsing, tokenization with loss masks, the eval split and batching.

Each line is one JSON object, either ``{"text": ...}`` (loss on every token) or
``{"prompt": ..., "completion": ...}`` (loss on the completion's tokens only). Blank lines
are ignored. Every example ends with the end-of-text token so the model learns to stop.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

IGNORE_INDEX = -100  # label of a position that carries no loss (PyTorch's cross-entropy default)


class DatasetError(ValueError):
    """A dataset line that cannot be used; names the file and the 1-based line number."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}: line {line}: {reason}" if line else f"{path}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Record:
    """One parsed dataset line: ``text`` set, or ``prompt`` and ``completion`` set."""

    line: int
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None


@dataclass(frozen=True)
class Example:
    """Token ids of one training sequence and its labels (``IGNORE_INDEX`` where no loss)."""

    input_ids: list[int]
    labels: list[int]
    line: int = 0

    @property
    def label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class ParsedDataset:
    records: list[Record]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) with skip_bad_lines


def _parse_line(raw: str, number: int) -> tuple[Record | None, str]:
    """A record from one stripped line, or None and the reason it is unusable."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    has_text = "text" in obj
    has_pair = "prompt" in obj or "completion" in obj
    if has_text and has_pair:
        return None, 'has both "text" and "prompt"/"completion"; use one form per line'
    if has_text:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            return None, '"text" must be a non-empty string'
        return Record(number, text=obj["text"]), ""
    if has_pair:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str):
            return None, '"prompt" must be a string'
        if not isinstance(completion, str) or not completion.strip():
            return None, '"completion" must be a non-empty string'
        return Record(number, prompt=prompt, completion=completion), ""
    return None, 'needs a "text" field or "prompt" and "completion" fields'


def read_jsonl(path: Path | str, *, skip_bad_lines: bool = False) -> ParsedDataset:
    """Parse a JSONL dataset. A bad line raises :class:`DatasetError` naming it, unless
    ``skip_bad_lines``, which counts it in ``skipped`` instead."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"dataset {source} does not exist")
    records: list[Record] = []
    skipped: list[tuple[int, str]] = []
    number = 0
    with source.open("rb") as handle:  # bytes, so a bad encoding is reported at its own line
        for number, data in enumerate(handle, start=1):
            try:
                raw = data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                record, reason = None, f"not UTF-8 text ({exc.reason})"
            else:
                if not raw.strip():
                    continue
                record, reason = _parse_line(raw, number)
            if record is None:
                if not skip_bad_lines:
                    raise DatasetError(source, number, reason)
                skipped.append((number, reason))
                continue
            records.append(record)
    if not records:
        raise DatasetError(source, 0, f"no usable lines ({len(skipped)} bad, the rest blank)")
    return ParsedDataset(records, skipped)


def tokenize(records: Sequence[Record], encoder: Encoder, eos_id: int, max_length: int) -> list[Example]:
    """Examples of at most ``max_length`` tokens.

    A text longer than that is cut into consecutive windows (all tokens learned). A
    prompt/completion pair that does not fit loses the start of its prompt first, then the end
    of its completion, so every example keeps some loss.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    examples: list[Example] = []
    for record in records:
        if record.text is not None:
            ids = [*encoder.encode(record.text), eos_id]
            for start in range(0, len(ids), max_length):
                window = ids[start:start + max_length]
                if len(window) >= 2:
                    examples.append(Example(window, list(window), record.line))
            continue
        prompt = encoder.encode(record.prompt or "")
        completion = [*encoder.encode(record.completion or ""), eos_id][: max_length - 1]
        room = max_length - len(completion)
        if len(prompt) > room:
            prompt = prompt[-room:]
        if not prompt:
            # The first position is never predicted: keep one context token in front of the completion.
            prompt, completion = completion[:1], completion[1:]
        ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
        examples.append(Example(ids, labels, record.line))
    return examples


def split_eval(items: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, eval): a seeded shuffle, the last ``fraction`` (at least one line when > 0) held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    order = list(items)
    random.Random(seed).shuffle(order)
    held = 0 if fraction == 0 else max(1, round(len(order) * fraction))
    if held >= len(order):
        raise ValueError(f"{len(order)} lines are too few to hold out {fraction:.0%} for evaluation")
    return order[: len(order) - held], order[len(order) - held:]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding carries no loss)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so a resumed run
    replays exactly the batches an uninterrupted one would."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [int(i) for i in torch.randperm(count, generator=generator)]


def batches(examples: Sequence[Example], batch_size: int, order: Sequence[int] | None = None) -> Iterator[list[Example]]:
    indices = list(order) if order is not None else list(range(len(examples)))
    for start in range(0, len(indices), batch_size):
        yield [examples[i] for i in indices[start:start + batch_size]]
