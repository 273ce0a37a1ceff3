"""`llmo eval faithfulness` (alias of `llmo evaluation faithfulness`) on a tiny hand-written PAIRS +
BEIR corpus, with the committed detector and the real MiniLM model: the table, the JSON object,
and bad input lines (exit 2, naming the line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CORPUS = [
    {"_id": "d1", "title": "Aspirin trial", "text": "The trial enrolled 12,000 volunteers in four countries. "
     "Daily aspirin reduces the risk of a first heart attack in adults over fifty. Bleeding events were rare."},
    {"_id": "d2", "title": "Football", "text": "The football club signed a new goalkeeper before the winter "
     "transfer window closed. Ticket prices for the season stayed the same."},
]
PAIRS = [
    {"claim": "Daily aspirin reduces the risk of a first heart attack in adults over fifty.", "doc_id": "d1",
     "label": "SUPPORT"},
    {"claim": "Daily aspirin reduces the risk of a first heart attack in adults over fifty.", "doc_id": "d2",
     "label": "NEI"},
    {"claim": "The football club signed a new goalkeeper.", "doc_id": "d2", "label": "SUPPORT"},
    {"claim": "Vitamin C cures the common cold.", "doc_id": "d1", "label": "NEI"},
]


def _write(path: Path, rows: list[dict[str, object]] | list[str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _llmo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmo.cli.main", *args], capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return _write(tmp_path / "pairs.jsonl", PAIRS), _write(tmp_path / "corpus.jsonl", CORPUS)


def test_json_reports_every_metric(files: tuple[Path, Path]) -> None:
    pairs, corpus = files
    done = _llmo("eval", "faithfulness", "--data", str(pairs), "--corpus", str(corpus), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["pairs"] == 4
    assert result["detector_version"].startswith("fd-")
    assert set(result["binary"]) == {"precision", "recall", "f1"}
    for value in (*result["binary"].values(), result["macro_f1"], result["auroc"]):
        assert 0.0 <= value <= 1.0
    assert result["latency_ms_per_pair"] > 0
    assert result["binary"]["recall"] > 0  # the sentence that states the claim is found


def test_the_table_and_the_long_name(files: tuple[Path, Path]) -> None:
    pairs, corpus = files
    done = _llmo("evaluation", "faithfulness", "--data", str(pairs), "--corpus", str(corpus))
    assert done.returncode == 0, done.stderr
    for text in ("binary F1", "three-way macro-F1", "AUROC", "latency per pair"):
        assert text in done.stdout


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "line 2: not JSON"),
    (json.dumps({"claim": "x", "doc_id": "nowhere", "label": "SUPPORT"}), "line 2: `doc_id` 'nowhere' is not in"),
    (json.dumps({"claim": "x", "doc_id": "d1", "label": "MAYBE"}), "line 2: label 'MAYBE'"),
    (json.dumps({"claim": "", "doc_id": "d1", "label": "NEI"}), "line 2: `claim` must be"),
    (json.dumps([1, 2]), "line 2: expected a JSON object"),
])
def test_a_bad_line_exits_2_naming_it(tmp_path: Path, files: tuple[Path, Path], line: str, message: str) -> None:
    _, corpus = files
    pairs = _write(tmp_path / "bad.jsonl", [json.dumps(PAIRS[0]), line])
    done = _llmo("eval", "faithfulness", "--data", str(pairs), "--corpus", str(corpus))
    assert done.returncode == 2
    assert message in done.stderr
    assert str(pairs) in done.stderr


def test_a_bad_corpus_line_exits_2(tmp_path: Path, files: tuple[Path, Path]) -> None:
    pairs, _ = files
    corpus = _write(tmp_path / "corpus.jsonl", [json.dumps(CORPUS[0]), json.dumps({"_id": "d2"})])
    done = _llmo("eval", "faithfulness", "--data", str(pairs), "--corpus", str(corpus), "--json")
    assert done.returncode == 2
    assert "line 2: `text` must be a string" in done.stderr
    assert done.stdout == ""


def test_help_lists_the_evaluation_commands() -> None:
    done = _llmo("--help")
    assert done.returncode == 0
    assert "evaluation" in done.stdout and "alias: eval" in done.stdout
