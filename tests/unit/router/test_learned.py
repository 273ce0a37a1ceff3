from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llmo.router.cli import cli
from llmo.router.learned.data import RoutingDataError, leave_subjects_out_split, load_routing_data
from llmo.router.learned.embed import Embedder
from llmo.router.learned.features import FEATURE_NAMES, feature_matrix
from llmo.router.learned.metrics import pgr_curve, router_metrics
from llmo.router.learned.model import ArtifactError, ComplexityRouter
from llmo.router.learned.train import TrainConfig, evaluate_router, holdout_evaluation, train_router

from .conftest import write_routing_csv


def test_oracle_and_inverse_routers_bound_apgr() -> None:
    weak = np.array([1, 0, 0, 1, 0, 1, 1, 0], dtype=bool)
    strong = np.array([1, 1, 1, 1, 0, 0, 1, 1], dtype=bool)
    gain = strong.astype(int) - weak.astype(int)
    oracle = router_metrics(gain.astype(float), weak, strong)
    inverse = router_metrics(-gain.astype(float), weak, strong)
    assert oracle.apgr > 0.9
    assert inverse.apgr < 0.1
    # The gap is 2 prompts of 8 (3 strong wins, 1 strong loss): the oracle closes half of
    # it with 1 strong call and all of it with 2.
    assert oracle.cpt50 == pytest.approx(1 / 8)
    assert oracle.cpt80 == pytest.approx(2 / 8)
    share, pgr = pgr_curve(gain.astype(float), weak, strong)
    assert pgr[0] == pytest.approx(0.0) and pgr[-1] == pytest.approx(1.0)
    assert share[-1] == 1.0


def test_random_router_scores_about_half() -> None:
    rng = np.random.default_rng(1)
    weak = rng.random(4000) < 0.6
    strong = weak | (rng.random(4000) < 0.4)
    apgrs = [router_metrics(rng.random(4000), weak, strong).apgr for _ in range(5)]
    assert 0.45 < float(np.mean(apgrs)) < 0.55


def test_metrics_reject_data_without_a_gap() -> None:
    same = np.array([True, False])
    with pytest.raises(ValueError, match="not more accurate"):
        router_metrics(np.array([0.1, 0.2]), same, same)


def test_loader_reads_subjects_and_excludes_contaminated(routing_dir: Path) -> None:
    first = load_routing_data(routing_dir)
    banned = first.prompts[0]
    (routing_dir / "contaminated_prompts.jsonl").write_text(json.dumps({"eval_prompt": banned}) + "\n")
    data = load_routing_data(routing_dir)
    assert len(data) == len(first) - 1
    assert banned not in data.prompts
    assert set(data.subjects) == {f"subject{i}" for i in range(4)}
    assert data.weak_model == "weak/model" and data.strong_model == "strong/model"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("question,a,b\nx,True,True\n", "header must be"),
        ("prompt,a,b\nx,maybe,True\n", "expected True/False"),
        ("prompt,a,b\nx,True\n", "at least 3 columns"),
    ],
)
def test_loader_reports_bad_files(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(RoutingDataError, match=message):
        load_routing_data(tmp_path)


def test_loader_reports_missing_path(tmp_path: Path) -> None:
    with pytest.raises(RoutingDataError, match="no such file"):
        load_routing_data(tmp_path / "nope")


def test_split_holds_out_whole_subjects(routing_dir: Path) -> None:
    data = load_routing_data(routing_dir)
    train, test = leave_subjects_out_split(data, 0.25, seed=3)
    assert set(train.subjects).isdisjoint(test.subjects)
    assert len(train) + len(test) == len(data)
    assert len(test) > 0


def test_text_features_see_math() -> None:
    feats = feature_matrix(["What is 2+2=?", "Which animal barks"])
    assert feats.shape == (2, len(FEATURE_NAMES))
    math_col = FEATURE_NAMES.index("math_symbol_share")
    assert feats[0, math_col] > feats[1, math_col]


def test_embeddings_are_normalised_and_cached(tmp_path: Path) -> None:
    cached = Embedder(cache_dir=tmp_path / "cache")
    vectors = cached.encode(["hello world", "solve x^2 = 4"])
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert list((tmp_path / "cache").glob("*.npz"))
    again = Embedder(cache_dir=tmp_path / "cache").encode(["solve x^2 = 4"])
    assert np.allclose(again[0], vectors[1], atol=1e-6)


def test_learned_router_beats_random_on_held_out_subjects(routing_dir: Path, embedder: Embedder) -> None:
    data = load_routing_data(routing_dir)
    router, report = holdout_evaluation(data, embedder, 0.25, seed=0, config=TrainConfig())
    assert report.metrics.apgr > 0.75
    assert report.metrics.apgr > report.random_apgr + 0.15
    assert report.metrics.cpt50 < 0.6
    assert router.weak_model == "weak/model"


def test_artifact_round_trip_and_threshold_calibration(routing_dir: Path, embedder: Embedder, tmp_path: Path) -> None:
    data = load_routing_data(routing_dir)
    router = train_router(data, embedder, TrainConfig(), version="v-test")
    out = router.save(tmp_path / "artifact")
    loaded = ComplexityRouter.load(out)
    assert loaded.version == "v-test"
    assert json.loads((out / "router.json").read_text())["format"] == "llmo-router/complexity-v1"
    before = evaluate_router(router, embedder, data)
    after = evaluate_router(loaded, embedder, data)
    assert after.apgr == pytest.approx(before.apgr, abs=0.02)
    emb = embedder.encode(data.prompts)
    scores = loaded.score_features(emb, feature_matrix(data.prompts))
    for share in (0.2, 0.5, 0.8):
        threshold = loaded.threshold_for_strong_share(share)
        assert abs(float((scores > threshold).mean()) - share) < 0.12
    assert loaded.threshold_for_strong_share(0.0) == np.inf
    assert ComplexityRouter.strong_share_for_cost(300, 100, 1100) == pytest.approx(0.2)


def test_loading_a_non_artifact_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a router artifact"):
        ComplexityRouter.load(tmp_path)


def test_training_needs_both_outcomes(tmp_path: Path, embedder: Embedder) -> None:
    write_routing_csv(tmp_path / "x.csv", [(f"q{i}", True, True) for i in range(20)])
    with pytest.raises(ValueError, match="weak model fails"):
        train_router(load_routing_data(tmp_path), embedder)


def test_cli_train_and_evaluate(routing_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "model"
    cache = tmp_path / "cache"
    res = runner.invoke(cli, ["train", "--data", str(routing_dir), "--out", str(out), "--cache-dir", str(cache), "--version", "v1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["version"] == "v1"
    also = str(routing_dir / "toy_subject0.csv")
    res = runner.invoke(cli, ["evaluate", "--data", str(routing_dir), "--cache-dir", str(cache), "--also", also, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["split"] == "leave-subjects-out"
    assert {"apgr", "cpt50", "cpt80", "random_apgr", "subject_oracle_apgr"} <= set(report["mean"])
    assert also in report["also_mean"]
    res = runner.invoke(cli, ["evaluate", "--data", str(routing_dir), "--router", str(out), "--cache-dir", str(cache), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["router_version"] == "v1"


def test_cli_prints_tables_for_people(routing_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cache = tmp_path / "cache"
    res = runner.invoke(cli, ["train", "--data", str(routing_dir), "--out", str(tmp_path / "m"), "--cache-dir", str(cache), "--version", "v7"])
    assert res.exit_code == 0, res.output
    assert "router trained" in res.stdout and "v7" in res.stdout
    res = runner.invoke(cli, ["evaluate", "--data", str(routing_dir), "--cache-dir", str(cache), "--seeds", "2"])
    assert res.exit_code == 0, res.output
    assert "leave-subjects-out" in res.stdout
    assert "subject oracle, a router that knew" in res.stdout
    assert "mean" in res.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(res.stdout)


def test_subject_oracle_ranks_subjects_by_their_true_gain(tmp_path: Path) -> None:
    from llmo.router.learned.train import subject_oracle_apgr

    # Subject "hard": the strong model wins on every prompt; "easy": both models are right.
    write_routing_csv(tmp_path / "mmlu_hard.csv", [(f"h{i}", False, True) for i in range(10)])
    write_routing_csv(tmp_path / "mmlu_easy.csv", [(f"e{i}", True, True) for i in range(10)])
    data = load_routing_data(tmp_path)
    oracle = subject_oracle_apgr(data)
    # Routing the hard half first recovers the whole gap at a 50% strong share: APGR = 0.75.
    assert oracle == pytest.approx(0.75, abs=0.03)


def test_cli_reports_bad_data_without_a_traceback(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["evaluate", "--data", str(tmp_path / "missing")])
    assert res.exit_code != 0
    assert "no such file or directory" in res.output


def test_answer_option_similarity(embedder: Embedder) -> None:
    from llmo.router.learned.features import option_texts
    from llmo.router.learned.model import option_similarities

    close = "Which is a prime?\nA. 91\nB. 87\nC. 97\nD. 93\nAnswer:"
    far = "Which is a fruit?\nA. a red apple\nB. the French revolution\nC. quantum entanglement\nD. a bicycle tyre\nAnswer:"
    assert option_texts(close) == ["91", "87", "97", "93"]
    sims = option_similarities([close, far, "no options here"], embedder.encode)
    assert sims[0] > sims[1]
    assert np.isnan(sims[2])


def test_router_with_option_signal_round_trips(tmp_path: Path, embedder: Embedder) -> None:
    from .conftest import EASY, HARD

    rows = []
    for i, q in enumerate(EASY):
        rows.append((f"{q}\nA. yes\nB. a tree\nC. the moon\nD. music", True, i % 5 != 0))
    for i, q in enumerate(HARD):
        rows.append((f"{q}\nA. {i}1.25\nB. {i}1.52\nC. {i}2.15\nD. {i}2.51", i % 4 == 0, True))
    rows += [(q + " (free text)", True, True) for q in EASY[:4]]
    write_routing_csv(tmp_path / "mc.csv", rows)
    data = load_routing_data(tmp_path / "mc.csv")
    router = train_router(data, embedder, TrainConfig(option_weight=0.25), version="opt")
    assert router.option_quantiles is not None and router.option_weight == 0.25
    loaded = ComplexityRouter.load(router.save(tmp_path / "artifact"))
    assert loaded.option_weight == 0.25 and loaded.option_quantiles is not None
    scores = loaded.score_prompts(data.prompts, embedder.encode)
    assert np.isfinite(scores).all() and scores.min() >= 0 and scores.max() <= 1
    assert np.allclose(scores, router.score_prompts(data.prompts, embedder.encode))
    assert evaluate_router(loaded, embedder, data).apgr > 0.6


def test_cli_signals_screens_text_signals_without_training(tmp_path: Path) -> None:
    # The strong model wins exactly on the long prompts: prompt length must score well above random.
    rows = [(f"short question {i}?", True, True) for i in range(15)]
    rows += [(f"a much longer question number {i} " + "with many more words " * 6 + "?", False, True) for i in range(15)]
    write_routing_csv(tmp_path / "mmlu_toy.csv", rows)
    res = CliRunner().invoke(cli, ["signals", "--data", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["prompts"] == 30
    assert report["apgr"]["log_words"] > 0.7
    assert "subject oracle" not in report["apgr"]  # one subject: no oracle to speak of
    res = CliRunner().invoke(cli, ["signals", "--data", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "log_words" in res.stdout and "reversed" in res.stdout


def test_cli_signals_explains_data_without_a_gap(tmp_path: Path) -> None:
    write_routing_csv(tmp_path / "mmlu_flat.csv", [(f"q{i}", True, True) for i in range(10)])
    res = CliRunner().invoke(cli, ["signals", "--data", str(tmp_path)])
    assert res.exit_code != 0
    assert "not more accurate than the weak one" in res.output
    assert "Traceback" not in res.output
