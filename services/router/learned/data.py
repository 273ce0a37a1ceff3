"""Routing outcome data: per prompt, whether a weak and a strong model answered correctly.

The on-disk format is RouteLLM's: CSV files whose first column is `prompt`, followed by
one boolean column for the weak model and one for the strong model (extra columns such
as full responses are ignored). A directory may hold several CSVs (one per subject,
e.g. `mmlu_astronomy.csv`); the file stem minus a leading `<dir>_` prefix is the
subject. `contaminated_prompts.jsonl` lists prompts (its `eval_prompt` field) that
overlap router training data; they are always excluded.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONTAMINATED_FILE = "contaminated_prompts.jsonl"
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


class RoutingDataError(ValueError):
    """The routing data directory or a file in it is not in the expected format."""


@dataclass(frozen=True)
class RoutingDataset:
    prompts: list[str]
    weak_correct: np.ndarray  # bool, shape (n,)
    strong_correct: np.ndarray  # bool, shape (n,)
    subjects: list[str]
    weak_model: str
    strong_model: str

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, mask: np.ndarray) -> RoutingDataset:
        idx = np.flatnonzero(mask)
        return RoutingDataset(
            prompts=[self.prompts[i] for i in idx],
            weak_correct=self.weak_correct[idx],
            strong_correct=self.strong_correct[idx],
            subjects=[self.subjects[i] for i in idx],
            weak_model=self.weak_model,
            strong_model=self.strong_model,
        )


def _parse_bool(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise RoutingDataError(f"{where}: expected True/False, got {value!r}")


def _contaminated(directory: Path) -> set[str]:
    path = directory / CONTAMINATED_FILE
    if not path.exists():
        return set()
    out: set[str] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RoutingDataError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
        if "eval_prompt" in record:
            out.add(str(record["eval_prompt"]))
    return out


def _subject(path: Path) -> str:
    prefix = path.parent.name + "_"
    stem = path.stem
    return stem[len(prefix) :] if stem.startswith(prefix) else stem


def load_routing_data(path: Path) -> RoutingDataset:
    """Load one CSV or every CSV in a directory, excluding contaminated prompts."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        directory = path
    elif path.is_file():
        files = [path]
        directory = path.parent
    else:
        raise RoutingDataError(f"{path}: no such file or directory")
    if not files:
        raise RoutingDataError(f"{path}: no .csv files found")
    csv.field_size_limit(sys.maxsize)
    banned = _contaminated(directory)
    prompts: list[str] = []
    weak: list[bool] = []
    strong: list[bool] = []
    subjects: list[str] = []
    models: tuple[str, str] | None = None
    for file in files:
        with file.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or len(header) < 3 or header[0].strip() != "prompt":
                raise RoutingDataError(
                    f"{file}: header must be 'prompt,<weak model>,<strong model>[,...]', got {header!r}"
                )
            file_models = (header[1].strip(), header[2].strip())
            if models is None:
                models = file_models
            elif models != file_models:
                raise RoutingDataError(f"{file}: models {file_models} differ from {models} in other files")
            subject = _subject(file)
            for line_no, row in enumerate(reader, 2):
                if len(row) < 3:
                    raise RoutingDataError(f"{file}:{line_no}: expected at least 3 columns, got {len(row)}")
                if row[0] in banned:
                    continue
                prompts.append(row[0])
                weak.append(_parse_bool(row[1], f"{file}:{line_no}"))
                strong.append(_parse_bool(row[2], f"{file}:{line_no}"))
                subjects.append(subject)
    assert models is not None
    if not prompts:
        raise RoutingDataError(f"{path}: no usable rows")
    return RoutingDataset(
        prompts=prompts,
        weak_correct=np.array(weak, dtype=bool),
        strong_correct=np.array(strong, dtype=bool),
        subjects=subjects,
        weak_model=models[0],
        strong_model=models[1],
    )


def leave_subjects_out_split(
    data: RoutingDataset, test_fraction: float = 0.25, seed: int = 0
) -> tuple[RoutingDataset, RoutingDataset]:
    """Hold out whole subjects (about `test_fraction` of rows) so the test split has unseen topics.

    With a single subject there is nothing to hold out by topic, so rows are split at random.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be in (0, 1)")
    rng = np.random.default_rng(seed)
    names = sorted(set(data.subjects))
    subjects = np.array(data.subjects)
    if len(names) < 2:
        mask = rng.random(len(data)) < test_fraction
    else:
        order = rng.permutation(len(names))
        target = test_fraction * len(data)
        held: list[str] = []
        count = 0
        for i in order:
            if count >= target or len(held) == len(names) - 1:
                break
            held.append(names[i])
            count += int((subjects == names[i]).sum())
        mask = np.isin(subjects, held)
    return data.subset(~mask), data.subset(mask)
