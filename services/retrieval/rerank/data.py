"""Relevance-judged collections for training and evaluating the reranker.

Two layouts are read:

- BEIR: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`) and
  `qrels/<split>.tsv` (`query-id corpus-id score` with a header line; score > 0 is relevant);
- the classic SMART files of CISI-like collections: `*.ALL` (`.I` / `.T` / `.W` fields),
  `*.QRY` and `*.REL` (`query doc ...`, every listed pair relevant). They have one set of
  judgements, read whatever the split.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Dataset:
    name: str
    corpus: dict[str, tuple[str, str]]  # document id -> (title, text)
    queries: dict[str, str]  # query id -> text, only the judged ones
    qrels: dict[str, dict[str, int]]  # query id -> document id -> grade (> 0)


def load(folder: Path, split: str = "test") -> Dataset:
    folder = Path(folder)
    if (folder / "corpus.jsonl").is_file():
        return _load_beir(folder, split)
    smart = sorted(folder.glob("*.ALL"))
    if smart:
        return _load_smart(folder, smart[0].stem)
    raise FileNotFoundError(f"{folder}: neither BEIR (corpus.jsonl) nor SMART (*.ALL) files")


def _jsonl(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _load_beir(folder: Path, split: str) -> Dataset:
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise FileNotFoundError(f"{qrels_path}: no judgements for split {split!r}")
    corpus = {str(d["_id"]): (str(d.get("title", "")), str(d.get("text", ""))) for d in _jsonl(folder / "corpus.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(encoding="utf-8") as rows:
        reader = csv.reader(rows, delimiter="\t")
        next(reader, None)  # header
        for row in reader:
            if len(row) >= 3 and int(float(row[2])) > 0 and row[1] in corpus:
                qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
    queries = {str(q["_id"]): str(q["text"]) for q in _jsonl(folder / "queries.jsonl") if str(q["_id"]) in qrels}
    return Dataset(folder.name, corpus, queries, {q: qrels[q] for q in queries})


_FIELD = re.compile(r"^\.([A-Z])\s*(.*)$")


def _smart_records(path: Path) -> dict[str, dict[str, str]]:
    records: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    field = ""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _FIELD.match(line)
        if match and match.group(1) == "I":
            current = {}
            records[match.group(2).strip()] = current
            field = ""
        elif match and len(line.strip()) == 2:
            field = match.group(1)
            current.setdefault(field, [])
        elif field:
            current[field].append(line.strip())
    return {rid: {f: " ".join(v).strip() for f, v in fields.items()} for rid, fields in records.items()}


def _load_smart(folder: Path, stem: str) -> Dataset:
    docs = _smart_records(folder / f"{stem}.ALL")
    corpus = {rid: (fields.get("T", ""), fields.get("W", "")) for rid, fields in docs.items()}
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / f"{stem}.REL").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in corpus:
            qrels.setdefault(parts[0], {})[parts[1]] = 1
    queries = {rid: " ".join(filter(None, (f.get("T", ""), f.get("W", ""))))
               for rid, f in _smart_records(folder / f"{stem}.QRY").items() if rid in qrels}
    return Dataset(folder.name, corpus, queries, {q: qrels[q] for q in queries})
