"""Calibration: population links, finite-sample recovery, classifier metrics, run files."""

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit

from analysis.calibration import (
    calibrate_run,
    classifier_metrics,
    population_links,
    rank_auc,
    reliability,
)
from analysis.gradients import DEFAULT_ESTIMATORS, resolve_estimator
from analysis.ratio_fit import categorical_problem, evaluate_fit, gaussian_problem

CALIBRATED = ("logistic", "brier", "exponential", "kliep", "lsif", "power")
TOLERANCE = 0.15  # nats: RMSE of the recovered log ratio, 20000 samples per class


# Theory page, section 2: each loss pair written out by hand (float64 numpy, independent of
# gsil.estimators), its population minimiser f*(log r) and its link (the log ratio a logit
# stands for). power is power(gamma = 0.5), as in analysis.gradients.
GAMMA = 0.5
THEORY = {
    "logistic": (
        lambda f: np.logaddexp(0, -f),
        lambda f: np.logaddexp(0, f),
        lambda lr: lr,
        lambda f: f,
    ),
    "brier": (lambda f: (1 - expit(f)) ** 2, lambda f: expit(f) ** 2, lambda lr: lr, lambda f: f),
    "exponential": (lambda f: np.exp(-f), np.exp, lambda lr: lr / 2, lambda f: 2 * f),
    "kliep": (lambda f: -f, np.exp, lambda lr: lr, lambda f: f),
    "lsif": (lambda f: -np.exp(f), lambda f: np.exp(2 * f) / 2, lambda lr: lr, lambda f: f),
    "power(0.5)": (
        lambda f: -(1 + 1 / GAMMA) * np.exp(GAMMA * f),
        lambda f: np.exp((1 + GAMMA) * f),
        lambda lr: lr,
        lambda f: f,
    ),
}


def _minimise_table_losses(demo_loss, gen_loss, log_r: float) -> float:
    """argmin over f of ``p l_demo(f) + q l_gen(f)`` with ``p / q = exp(log_r)``, ``p + q = 1``."""
    p, q = expit(log_r), expit(-log_r)
    found = minimize_scalar(
        lambda f: p * demo_loss(f) + q * gen_loss(f),
        bounds=(-8.0, 8.0),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return float(found.x)


def test_population_minimisers_and_links():
    """Every column of ``population_links`` against the theory page's table, computed apart.

    ``minimiser`` (the estimator's closed form) and ``numeric_minimiser`` (bisection on the
    estimator's weights) must both equal the table's ``f*``, which must in turn minimise the
    table's own losses ``p l_demo(f) + q l_gen(f)`` (scipy, on the formulas written out above);
    the estimator's link must be the table's "ratio from f" column, and
    ``recovered_log_ratio`` the log ratio itself. The hinge: ``sign(log r)``, no link.
    """
    grid = np.array([-3.0, -1.2, -0.3, 0.0, 0.45, 1.0, 2.5])
    links = population_links(DEFAULT_ESTIMATORS, grid)
    assert set(links) == set(THEORY) | {"hinge"}
    for name, (demo_loss, gen_loss, f_star, link) in THEORY.items():
        got = links[name]
        np.testing.assert_allclose(got["log_ratio"], grid)
        np.testing.assert_allclose(got["minimiser"], f_star(grid), atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got["numeric_minimiser"], f_star(grid), atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got["recovered_log_ratio"], grid, atol=1e-12, err_msg=name)
        for log_r in grid:
            found = _minimise_table_losses(demo_loss, gen_loss, log_r)
            assert found == pytest.approx(f_star(log_r), abs=1e-5), (name, log_r)
        logits = np.linspace(-3.0, 3.0, 13)
        est = resolve_estimator("power" if name.startswith("power") else name)
        recovered = est.log_ratio(torch.as_tensor(logits, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(recovered, link(logits), atol=1e-12, err_msg=name)
    hinge = links["hinge"]
    off_zero = grid != 0
    np.testing.assert_array_equal(hinge["minimiser"][off_zero], np.sign(grid[off_zero]))
    np.testing.assert_allclose(
        hinge["numeric_minimiser"][off_zero], np.sign(grid[off_zero]), atol=1e-6
    )
    # at p = q every f in [-1, 1] minimises relu(1 - f) + relu(1 + f) = 2
    assert abs(hinge["minimiser"][~off_zero][0]) <= 1
    assert np.isnan(hinge["recovered_log_ratio"]).all()


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
