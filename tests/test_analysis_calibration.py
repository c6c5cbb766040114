"""Calibration: population links, finite-sample recovery, classifier metrics, run files."""

import json

import numpy as np
import pytest

from analysis.calibration import (
    calibrate_run,
    classifier_metrics,
    population_links,
    rank_auc,
    reliability,
)
from analysis.gradients import DEFAULT_ESTIMATORS
from analysis.ratio_fit import categorical_problem, evaluate_fit, gaussian_problem

CALIBRATED = ("logistic", "brier", "exponential", "kliep", "lsif", "power")
TOLERANCE = 0.15  # nats: RMSE of the recovered log ratio, 20000 samples per class


def test_population_minimisers_and_links():
    links = population_links(DEFAULT_ESTIMATORS)
    for name, link in links.items():
        np.testing.assert_allclose(link["minimiser"], link["numeric_minimiser"], atol=1e-9,
                                   err_msg=name) if name != "hinge" else None  # fmt: skip
        if name != "hinge":
            np.testing.assert_allclose(link["recovered_log_ratio"], link["log_ratio"], atol=1e-12)
    hinge = links["hinge"]
    assert np.isnan(hinge["recovered_log_ratio"]).all()
    assert set(np.unique(hinge["minimiser"])) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("name", CALIBRATED)
def test_calibrated_losses_recover_gaussian_log_ratio(name):
    result = evaluate_fit(gaussian_problem("quadratic"), name, n_samples=20000, seed=0, n_test=5000)
    assert result["calibrated"]
    assert result["log_ratio_rmse"] < TOLERANCE, result["log_ratio_rmse"]
    assert result["ece"] < 0.03


def test_hinge_is_reported_uncalibrated():
    result = evaluate_fit(gaussian_problem("quadratic"), "hinge", n_samples=20000, n_test=5000)
    logistic = evaluate_fit(gaussian_problem("quadratic"), "logistic", n_samples=20000, n_test=5000)
    assert not result["calibrated"] and np.isnan(result["log_ratio_rmse"])
    # its logit is not the log ratio: several times the calibrated loss's error, which does not
    # shrink with more samples (|log r| < ~1.5 in the bulk here, so the gap is moderate)
    assert result["logit_rmse"] > 3 * logistic["log_ratio_rmse"]
    assert result["prob_mae"] > 3 * logistic["prob_mae"]


def test_categorical_recovery_improves_with_samples():
    small = evaluate_fit(categorical_problem(), "logistic", n_samples=100, seed=1)
    large = evaluate_fit(categorical_problem(), "logistic", n_samples=20000, seed=1)
    assert large["log_ratio_rmse"] < 0.1 < small["log_ratio_rmse"]


def test_rank_auc_handles_ties_and_extremes():
    assert rank_auc([3, 4], [1, 2]) == 1.0
    assert rank_auc([1, 2], [3, 4]) == 0.0
    assert rank_auc([1, 1], [1, 1]) == 0.5
    assert rank_auc([2, 1], [1, 0]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def test_reliability_of_calibrated_probabilities_is_small():
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=200000)
    labels = rng.uniform(size=probs.size) < probs
    assert reliability(probs, labels)["ece"] < 0.01
    assert reliability(probs, ~labels)["ece"] > 0.4


def test_classifier_metrics_and_calibrate_run(tmp_path):
    rng = np.random.default_rng(0)
    demo, gen = rng.normal(1, 1, 4000), rng.normal(-1, 1, 4000)  # log r(f) = 2 f under N(+-1, 1)
    metrics = classifier_metrics(demo, gen, ratio_scale=2.0)
    assert metrics["auc"] == pytest.approx(0.92, abs=0.02) and metrics["ece"] < 0.03
    assert classifier_metrics(demo, gen, ratio_scale=1.0)["ece"] > 0.05
    with pytest.raises(FileNotFoundError, match="implicit_logits.jsonl"):
        calibrate_run(tmp_path)
    lines = [json.dumps({"demo_logit": d, "gen_logit": g}) for d, g in zip(demo, gen, strict=True)]
    (tmp_path / "implicit_logits.jsonl").write_text("\n".join(lines) + "\n\n")
    from_file = calibrate_run(tmp_path, ratio_scale=2.0)
    assert from_file["auc"] == pytest.approx(metrics["auc"]) and from_file["n_demo"] == 4000
