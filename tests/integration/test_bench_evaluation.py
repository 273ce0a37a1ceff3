"""`llmo bench evaluation`: the smoke run measures every area end to end on generated data (no ../shared,
no peers' venv: the peers are reported as skipped with the reason), and the fake judge answers each
library's faithfulness prompts so that every system scores the workload's known truth."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_evaluation.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_evaluation_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_the_generated_data_loads_with_every_label(tmp_path: Path) -> None:
    bench = load_bench()
    from llmo.evaluation.detector.data import LABELS, load_all

    examples = load_all(bench.write_tiny_data(tmp_path))
    for source in ("scifact", "climate-fever"):
        assert {e.label for e in examples if e.source == source} == set(LABELS)
    workload, known = bench.faithfulness_examples(tmp_path, 30)
    assert len(workload) == 30
    for example in workload:
        sentences = bench._sentences(example.output)
        assert 3 <= len(sentences) <= 5
        assert example.expected == sum(s in known for s in sentences) / len(sentences)
        assert all(s in example.contexts[0] for s in sentences if s in known)
    assert {e.expected == 1.0 for e in workload} == {True, False}  # some answers carry foreign sentences


def test_the_claim_judge_answers_each_prompt_in_its_parsers_shape() -> None:
    bench = load_bench()
    judge = bench.ClaimJudge(frozenset({"The sky is blue."}))
    ours = json.loads(judge(f"{bench.FAITHFULNESS_SYSTEM}\nContext:\n[0] The sky is blue.\n\n"
                            "Answer to evaluate:\nThe sky is blue. Grass is red."))
    assert [(c["claim"], c["verdict"]) for c in ours["claims"]] == [("The sky is blue.", "supported"),
                                                                     ("Grass is red.", "unsupported")]
    ragas = json.loads(judge('Judge the statements.\ninput: {\n "context": "The sky is blue.",\n'
                             ' "statements": ["The sky is blue.", "Grass is red."]\n}\nOutput: '))
    assert [s["verdict"] for s in ragas["statements"]] == [1, 0]
    deepeval = json.loads(judge("with the 'verdicts' key as a list\nClaims:\n['The sky is blue.', \"Grass's red.\"]\nJSON: "))
    assert [v["verdict"] for v in deepeval["verdicts"]] == ["yes", "no"]
    with pytest.raises(ValueError, match="unknown prompt"):
        judge("Write a poem.")


def test_the_smoke_bench_measures_every_area_and_reports_skipped_peers(tmp_path: Path) -> None:
    bench = load_bench()
    out = tmp_path / "result.json"
    result = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["machine"]["cores"] >= 1

    detector = result["detector"]
    for source in ("scifact", "climate-fever"):
        for system in (detector["detector"][source], detector["baselines"]["embedding_similarity"][source],
                       detector["baselines"]["token_overlap"][source]):
            assert 0.0 <= system["binary_f1"] <= 1.0 and 0.0 <= system["macro_f1"] <= 1.0
        assert len(detector["baselines"]["token_overlap"][source]["thresholds"]) == 2  # one per fold
        assert detector["goals"][source]["met"] == (detector["detector"][source]["binary_f1"] >= 0.75
                                                    and detector["detector"][source]["macro_f1"] >= 0.60)
    assert "skipped" in detector["baselines"]["nli"]
    latency = detector["latency_per_pair"]
    assert latency["pairs"] == 10 and latency["detector"]["p99_ms"] >= latency["detector"]["p50_ms"] > 0

    orchestration = result["orchestration"]
    run = orchestration["ours"]["run"]
    assert run["state"] == "RUN_STATE_SUCCEEDED" and run["examples"] == 20
    assert run["judge_calls_per_example"] == 1.0 and run["unanswered_prompts"] == 0
    # The fake judge is exact, so the service's faithfulness is the workload's truth, through both RPCs.
    assert run["mean_faithfulness"] == orchestration["expected_mean_faithfulness"] < 1.0
    assert orchestration["ours"]["evaluate_calls"]["mean_faithfulness"] == run["mean_faithfulness"]
    assert orchestration["ours"]["local_detector_run"]["judge_calls_per_example"] == 0.0
    for name in ("ragas", "deepeval"):
        assert "--smoke" in orchestration["peers"][name]["skipped"]
    assert orchestration["goals"]["fewer_judge_calls"]["met"] is None

    (level,) = result["reliability"]["levels"]
    assert level["sigma"] == 0.5 and level["trials"] == 4
    assert 0.0 < level["reported_alpha"] <= 1.0 and 0.0 <= level["reported_flip_rate"] <= 1.0
    assert 0.0 < level["expected_alpha"] <= 1.0 and 0.0 <= level["ci_coverage"] <= 1.0


@pytest.mark.skipif(not load_bench().DEFAULT_PEERS_PYTHON.is_file(),
                    reason="the peers' venv is missing: scripts/peers_evaluation.sh builds it")
def test_ragas_and_deepeval_score_the_same_workload_against_the_same_judge(tmp_path: Path) -> None:
    bench = load_bench()
    result = bench.main(["--data", str(bench.write_tiny_data(tmp_path)), "--areas", "orchestration", "--examples", "6"])
    orchestration = result["orchestration"]
    expected = orchestration["expected_mean_faithfulness"]
    calls = {"ragas": 2.0, "deepeval": 4.0}  # statements + verdicts; truths + claims + verdicts + reason
    for name, per_example in calls.items():
        peer = orchestration["peers"][name]
        assert peer["unanswered_prompts"] == 0 and peer["unscored_examples"] == 0, peer
        assert peer["judge_calls_per_example"] == per_example
        assert peer["scores_equal_to_truth"] == 6 and peer["mean_faithfulness"] == expected
        assert orchestration["ratios_ours_over_peer"][name]["judge_calls_per_example"] == round(1 / per_example, 3)
    assert orchestration["goals"]["fewer_judge_calls"]["met"] is True
