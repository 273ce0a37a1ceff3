from __future__ import annotations

import csv
from pathlib import Path

import pytest

from llmo.router.learned.embed import Embedder

EASY = [
    "What color is the sky on a clear day?",
    "Which animal barks?",
    "What is the capital of France?",
    "How many legs does a dog have?",
    "What do bees make?",
    "Which planet do we live on?",
    "What is frozen water called?",
    "What is the opposite of hot?",
    "Which fruit is yellow and curved?",
    "What do cows drink?",
]
HARD = [
    "Compute the integral of x^3 * e^(2x) dx from 0 to 5 and give 4 decimals.",
    "Let G be a group of order 56 with 8 Sylow 7-subgroups; find the number of elements of order 7.",
    "Solve 17x^2 - 43x + 12 = 0 and report both roots to 3 decimals.",
    "Find the eigenvalues of the 3x3 matrix [[2,1,0],[1,3,1],[0,1,4]].",
    "A train leaves at 14:35 at 83 km/h; another at 15:10 at 97 km/h. When does the second catch up?",
    "Evaluate the sum of 1/(n^2 + 3n + 2) for n from 1 to 1000 exactly.",
    "Prove that the polynomial x^5 - 6x + 3 is irreducible over Q and compute its Galois group.",
    "Compute 7^(2^20) mod 1000003 using Fermat's little theorem.",
    "Given f(x) = ln(x^2 + 1) / (x - 3), find f''(2) exactly.",
    "How many lattice paths from (0,0) to (12,9) avoid the point (5,4)?",
]


def write_routing_csv(path: Path, rows: list[tuple[str, bool, bool]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "weak/model", "strong/model"])
        for prompt, weak, strong in rows:
            w.writerow([prompt, str(weak), str(strong)])


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    return Embedder(cache_dir=tmp_path_factory.mktemp("embeddings"))


@pytest.fixture
def routing_dir(tmp_path: Path) -> Path:
    """Four subjects; hard (math) prompts need the strong model, easy ones do not."""
    d = tmp_path / "toy"
    d.mkdir()
    for s in range(4):
        rows: list[tuple[str, bool, bool]] = []
        for i, q in enumerate(EASY):
            rows.append((f"[{s}] {q}", True, i % 5 != 0))
        for i, q in enumerate(HARD):
            rows.append((f"[{s}] {q}", i % 4 == 0, True))
        write_routing_csv(d / f"toy_subject{s}.csv", rows)
    return d


@pytest.fixture
def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    from llmo.router.store import open_store

    eng = open_store(f"sqlite:///{tmp_path / 'router.db'}")
    yield eng
    eng.dispose()


@pytest.fixture
async def backend():  # type: ignore[no-untyped-def]
    from llmo.router.fake_backend import FakeBackend

    fb = await FakeBackend(tokens=6, hang_s=30).start()
    yield fb
    await fb.stop()
