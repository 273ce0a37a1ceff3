"""The committed faithfulness detector (real MiniLM, the artifact in the repository) on obvious
cases, its artifact checks, sentence splitting and the metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmo.evaluation.detector import (
    BUILTIN_DIR,
    CONTRADICTED,
    LABELS,
    NOT_ENOUGH_INFO,
    SUPPORTED,
    ArtifactError,
    Detector,
    DetectorModel,
    split_sentences,
)
from llmo.evaluation.detector.metrics import auroc, score

CLAIM = "Daily aspirin reduces the risk of a first heart attack in adults over fifty."
CONTEXT = (
    "The trial enrolled 12,000 volunteers in four countries. "
    "Daily aspirin reduces the risk of a first heart attack in adults over fifty. "
    "Bleeding events were rare and mostly minor."
)
UNRELATED = (
    "The football club signed a new goalkeeper before the winter transfer window closed. "
    "Ticket prices for the season stayed the same."
)


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.load()


def test_a_sentence_stating_the_claim_supports_it(detector: Detector) -> None:
    verdict = detector.judge(CONTEXT, CLAIM)
    assert verdict.label == SUPPORTED
    assert verdict.supporting_sentences[0].text == CLAIM
    first = verdict.supporting_sentences[0]
    assert CONTEXT[first.start:first.end] == CLAIM
    assert verdict.probabilities[SUPPORTED] == max(verdict.probabilities.values())


def test_an_unrelated_context_is_not_enough_info(detector: Detector) -> None:
    verdict = detector.judge(UNRELATED, CLAIM)
    assert verdict.label == NOT_ENOUGH_INFO
    assert verdict.supporting_sentences == ()


def test_a_direct_negation_is_not_supported(detector: Detector) -> None:
    negated = "Daily aspirin does not reduce the risk of a first heart attack in adults over fifty."
    context = f"The trial enrolled 12,000 volunteers in four countries. {negated}"
    verdict = detector.judge(context, CLAIM)
    assert verdict.label != SUPPORTED
    assert verdict.probabilities[SUPPORTED] < detector.judge(CONTEXT, CLAIM).probabilities[SUPPORTED]


def test_probabilities_sum_to_one_and_cover_every_label(detector: Detector) -> None:
    for context in (CONTEXT, UNRELATED, "", "One sentence only"):
        verdict = detector.judge(context, CLAIM)
        assert set(verdict.probabilities) == set(LABELS)
        assert sum(verdict.probabilities.values()) == pytest.approx(1.0)
        assert all(0.0 <= p <= 1.0 for p in verdict.probabilities.values())
    assert detector.judge("", CLAIM).label == NOT_ENOUGH_INFO


def test_judging_is_deterministic_and_batching_changes_nothing(detector: Detector) -> None:
    pairs = [(CONTEXT, CLAIM), (UNRELATED, CLAIM), (CONTEXT, "Bleeding events were rare.")]
    batched = detector.judge_many(pairs)
    assert batched == detector.judge_many(pairs)
    for (context, claim), verdict in zip(pairs, batched, strict=True):
        single = detector.judge(context, claim)
        assert single.label == verdict.label
        for label in LABELS:
            assert single.probabilities[label] == pytest.approx(verdict.probabilities[label], abs=1e-5)


def test_faithfulness_is_the_share_of_supported_claims(detector: Detector) -> None:
    result = detector.faithfulness(CONTEXT, [CLAIM, "The football club signed a new goalkeeper."])
    assert [v.label == SUPPORTED for v in result.verdicts] == [True, False]
    assert result.score == 0.5
    with pytest.raises(ValueError, match="at least one claim"):
        detector.faithfulness(CONTEXT, [])
    with pytest.raises(ValueError, match="non-empty"):
        detector.judge(CONTEXT, "  ")


def test_the_committed_artifact_is_versioned_by_its_bytes(tmp_path: Path) -> None:
    model = DetectorModel.load(BUILTIN_DIR)
    assert model.version.startswith("fd-")
    copy = model.save(tmp_path / "copy")
    assert (copy / "weights.safetensors").read_bytes() == (BUILTIN_DIR / "weights.safetensors").read_bytes()
    assert DetectorModel.load(copy).version == model.version


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "artifact"
    shutil.copytree(BUILTIN_DIR, target)
    return target


def test_a_corrupt_artifact_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    flipped = _copy(tmp_path / "a")
    weights = bytearray((flipped / "weights.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (flipped / "weights.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ArtifactError, match="corrupt"):
        Detector.load(flipped)

    truncated = _copy(tmp_path / "b")
    (truncated / "weights.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ArtifactError, match="corrupt"):
        DetectorModel.load(truncated)

    bad_meta = _copy(tmp_path / "c")
    (bad_meta / "detector.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        DetectorModel.load(bad_meta)

    other = _copy(tmp_path / "d")
    meta = json.loads((other / "detector.json").read_text())
    meta["features"] = meta["features"][:-1]
    (other / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="other features"):
        DetectorModel.load(other)

    with pytest.raises(ArtifactError, match="not a detector artifact"):
        DetectorModel.load(tmp_path / "missing")


def test_sentences_are_exact_slices_even_without_spaces() -> None:
    text = "Results were clear.A second trial, e.g. in mice, agreed! Was it 0.05?  Yes\n\nNew paragraph"
    sentences = split_sentences(text)
    assert [s.text for s in sentences] == [
        "Results were clear.", "A second trial, e.g. in mice, agreed!", "Was it 0.05?", "Yes", "New paragraph"]
    assert all(text[s.start:s.end] == s.text for s in sentences)
    assert split_sentences("   ") == []


def test_scores_match_a_hand_computation() -> None:
    gold = [SUPPORTED, SUPPORTED, CONTRADICTED, NOT_ENOUGH_INFO]
    predicted = [SUPPORTED, NOT_ENOUGH_INFO, SUPPORTED, NOT_ENOUGH_INFO]
    scores = score(gold, predicted, [0.9, 0.4, 0.6, 0.1])
    assert scores.binary_precision == 0.5 and scores.binary_recall == 0.5 and scores.binary_f1 == 0.5
    # F1: SUPPORTED 0.5, CONTRADICTED 0, NOT_ENOUGH_INFO 2/3
    assert scores.macro_f1 == pytest.approx((0.5 + 0.0 + 2 / 3) / 3)
    assert scores.auroc == pytest.approx(0.75)  # positives 0.9, 0.4 vs negatives 0.6, 0.1: 3 of 4 pairs
    assert auroc([True, False], [0.5, 0.5]) == 0.5
    assert auroc([True, True], [0.1, 0.2]) is None
