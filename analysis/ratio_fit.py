"""Finite-sample density-ratio estimation with each loss, on distributions with a known ratio.

A logit model linear in fixed features, ``f(y) = phi(y) . w``, is fitted full-batch (float64
L-BFGS, seeded samples) by minimising

    mean_{y ~ P} l_demo(f(y)) + mean_{y ~ Q} l_gen(f(y)) + ridge * |w|^2

which is convex in ``w`` for every built-in loss, so the fit is deterministic. The recovered
log ratio is ``ratio_scale * f`` (:mod:`analysis.calibration`); it is compared with the true
``log p/q`` on fresh samples, and ``sigmoid(ratio_scale * f)`` is scored as a probability of
"demonstration" (reliability, ECE, AUC).

Problems: ``gaussian`` (P = N(0.5, 1), Q = N(-0.5, 1.3^2), so ``log r`` is a concave
quadratic) and ``categorical`` (8 categories, seeded softmax probabilities, one-hot features).
Features for the Gaussian: ``quadratic`` (1, y, y^2: well specified) or ``rbf`` (1, y and 9
Gaussian bumps of width 0.75 on [-3, 3]: flexible, misspecified in the tails).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from analysis.calibration import classifier_metrics, demo_probability
from analysis.gradients import label, resolve_estimator
from analysis.toy import single_thread
from gsil.estimators import DensityRatioEstimator


@dataclass(frozen=True)
class RatioProblem:
    """Two samplers and the exact log ratio ``log p(y) - log q(y)``."""

    name: str
    sample_p: Callable[[int, np.random.Generator], np.ndarray]
    sample_q: Callable[[int, np.random.Generator], np.ndarray]
    log_ratio: Callable[[np.ndarray], np.ndarray]
    features: Callable[[np.ndarray], np.ndarray]


def _normal_logpdf(y: np.ndarray, mean: float, std: float) -> np.ndarray:
    return -0.5 * ((y - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)


def gaussian_problem(features: str = "quadratic") -> RatioProblem:
    """P = N(0.5, 1), Q = N(-0.5, 1.3^2); ``features`` is ``quadratic`` or ``rbf``."""
    (mp, sp), (mq, sq) = (0.5, 1.0), (-0.5, 1.3)
    if features == "quadratic":

        def phi(y: np.ndarray) -> np.ndarray:
            return np.stack([np.ones_like(y), y, y**2], axis=-1)

    elif features == "rbf":
        centres = np.linspace(-3.0, 3.0, 9)

        def phi(y: np.ndarray) -> np.ndarray:
            bumps = np.exp(-0.5 * ((y[:, None] - centres[None, :]) / 0.75) ** 2)
            return np.concatenate([np.ones((y.size, 1)), y[:, None], bumps], axis=1)

    else:
        raise ValueError(f"unknown features {features!r}; choose quadratic or rbf")
    return RatioProblem(
        f"gaussian-{features}",
        lambda n, rng: rng.normal(mp, sp, n),
        lambda n, rng: rng.normal(mq, sq, n),
        lambda y: _normal_logpdf(y, mp, sp) - _normal_logpdf(y, mq, sq),
        phi,
    )


def categorical_problem(n_categories: int = 8, seed: int = 0) -> RatioProblem:
    """Two seeded categorical distributions (logits ~ N(0, 1)); one-hot features."""
    rng = np.random.default_rng(seed)
    logits_p, logits_q = rng.normal(size=n_categories), rng.normal(size=n_categories)
    p = np.exp(logits_p) / np.exp(logits_p).sum()
    q = np.exp(logits_q) / np.exp(logits_q).sum()
    return RatioProblem(
        "categorical",
        lambda n, g: g.choice(n_categories, n, p=p).astype(float),
        lambda n, g: g.choice(n_categories, n, p=q).astype(float),
        lambda y: np.log(p[y.astype(int)]) - np.log(q[y.astype(int)]),
        lambda y: np.eye(n_categories)[y.astype(int)],
    )


@single_thread()
def fit_logit(
    demo_features: np.ndarray,
    gen_features: np.ndarray,
    estimator: DensityRatioEstimator,
    ridge: float = 1e-4,
    max_iter: int = 500,
) -> np.ndarray:
    """The weights ``w`` minimising the regularised empirical loss (float64 L-BFGS from 0)."""
    phi_p = torch.as_tensor(demo_features, dtype=torch.float64)
    phi_q = torch.as_tensor(gen_features, dtype=torch.float64)
    w = torch.zeros(phi_p.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = estimator.demo_loss(phi_p @ w).mean() + estimator.gen_loss(phi_q @ w).mean()
        loss = loss + ridge * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def evaluate_fit(
    problem: RatioProblem,
    estimator: str | DensityRatioEstimator,
    n_samples: int,
    seed: int = 0,
    n_test: int = 20000,
    n_bins: int = 10,
) -> dict:
    """Fit on ``n_samples`` from each of P and Q and score on ``n_test`` fresh ones of each.

    ``log_ratio_rmse``: RMSE of ``ratio_scale * f`` against ``log r`` over the pooled test
    sample (NaN for the hinge, which has no ratio; ``logit_rmse`` is the same for raw ``f``).
    ``prob_mae``: mean ``|sigmoid(ratio_scale f) - sigmoid(log r)|``; ``ece``, ``auc``, ``bins``
    from :func:`analysis.calibration.classifier_metrics`.
    """
    est = resolve_estimator(estimator)
    rng = np.random.default_rng(seed)
    y_p, y_q = problem.sample_p(n_samples, rng), problem.sample_q(n_samples, rng)
    w = fit_logit(problem.features(y_p), problem.features(y_q), est)
    test_p, test_q = problem.sample_p(n_test, rng), problem.sample_q(n_test, rng)
    f_p, f_q = problem.features(test_p) @ w, problem.features(test_q) @ w
    true = problem.log_ratio(np.concatenate([test_p, test_q]))
    logits = np.concatenate([f_p, f_q])
    scale = est.ratio_scale if est.calibrated else 1.0
    metrics = classifier_metrics(f_p, f_q, ratio_scale=scale, n_bins=n_bins)
    return {
        "estimator": label(est),
        "calibrated": est.calibrated,
        "n_samples": n_samples,
        "weights": w,
        "log_ratio_rmse": (
            float(np.sqrt(np.mean((scale * logits - true) ** 2))) if est.calibrated else np.nan
        ),
        "logit_rmse": float(np.sqrt(np.mean((logits - true) ** 2))),
        "prob_mae": float(
            np.mean(np.abs(demo_probability(logits, scale) - demo_probability(true)))
        ),
        "ece": metrics["ece"],
        "auc": metrics["auc"],
        "bins": metrics["bins"],
    }


def sample_size_sweep(
    problem: RatioProblem,
    estimators: tuple[str, ...] = ("logistic", "brier", "exponential", "kliep", "lsif", "hinge"),
    sizes: tuple[int, ...] = (50, 200, 1000, 5000),
    seeds: tuple[int, ...] = (0, 1, 2),
    n_test: int = 5000,
) -> dict[str, dict[str, np.ndarray]]:
    """``{estimator: {sizes, log_ratio_rmse, prob_mae, ece, auc}}``, means over ``seeds``
    (arrays over ``sizes``), plus ``bins`` of the largest size and first seed."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in estimators:
        rows = {k: np.zeros((len(sizes), len(seeds))) for k in ("rmse", "prob", "ece", "auc")}
        bins = None
        for i, n in enumerate(sizes):
            for j, seed in enumerate(seeds):
                result = evaluate_fit(problem, name, n, seed=seed, n_test=n_test)
                rows["rmse"][i, j] = result["log_ratio_rmse"]
                rows["prob"][i, j] = result["prob_mae"]
                rows["ece"][i, j] = result["ece"]
                rows["auc"][i, j] = result["auc"]
                if i == len(sizes) - 1 and j == 0:
                    bins = result["bins"]
        out[label(name)] = {
            "sizes": np.asarray(sizes),
            "log_ratio_rmse": rows["rmse"].mean(1),
            "prob_mae": rows["prob"].mean(1),
            "ece": rows["ece"].mean(1),
            "auc": rows["auc"].mean(1),
            "bins": bins,
        }
    return out
