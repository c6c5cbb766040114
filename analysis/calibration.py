"""Calibration: what each loss's logit means, and how well a classifier's logits match it.

Population view. For densities p (demonstrations) and q (own samples) with ``r = p/q``, the
pointwise minimiser of ``p l_demo(f) + q l_gen(f)`` is ``f*(r)``; a calibrated loss inverts it
with its link, ``log r = ratio_scale * f*`` (2 for the exponential loss, 1 otherwise); the hinge
gives ``f* = sign(log r)`` and no ratio.

Probability of "demonstration". With equal numbers of demonstrations and own samples the
Bayes posterior is ``P(demo | y) = p / (p + q) = sigmoid(log r)``, so the probability a logit
stands for is ``sigmoid(ratio_scale * f)``: ``sigmoid(f)`` for logistic, Brier, KLIEP, LSIF and
power (logistic and Brier are proper losses on exactly this link), ``sigmoid(2 f)`` for the
exponential loss. With ``n_demo != n_gen`` multiply the odds by ``n_demo / n_gen``. The hinge
has no such probability; ``sigmoid(f)`` is reported for it anyway and is miscalibrated by design.

A trained run. The implicit classifier of a GSIL policy is its logit
``f = beta * (log pi_theta - log pi_ref) + shift``; :func:`classifier_metrics` scores held-out
demonstrations against fresh generations, and :func:`calibrate_run` reads them from a run dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from analysis.gradients import label, resolve_estimator
from gsil.estimators import DensityRatioEstimator

IMPLICIT_LOGITS_FILE = "implicit_logits.jsonl"


def population_links(
    estimators: tuple[str | DensityRatioEstimator, ...],
    log_ratios: np.ndarray | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{name: {log_ratio, minimiser, recovered_log_ratio, numeric_minimiser}}``.

    ``minimiser`` is the estimator's closed-form ``f*(log r)``; ``numeric_minimiser`` minimises
    ``sigmoid(log r) l_demo(f) + sigmoid(-log r) l_gen(f)`` over f directly (bisection on the
    first-order condition ``p w_demo(f) = q w_gen(f)``, float64), an independent check;
    ``recovered_log_ratio`` is ``ratio_scale * f*`` (NaN for an uncalibrated loss).
    """
    grid = np.linspace(-4.0, 4.0, 161) if log_ratios is None else np.asarray(log_ratios, float)
    log_r = torch.as_tensor(grid, dtype=torch.float64)
    p, q = torch.sigmoid(log_r), torch.sigmoid(-log_r)
    out = {}
    for spec in estimators:
        est = resolve_estimator(spec)
        minimiser = est.minimiser(log_r)
        lo = torch.full_like(log_r, -20.0)
        hi = torch.full_like(log_r, 20.0)
        for _ in range(80):  # the derivative p(-w_demo) + q w_gen is non-decreasing in f
            mid = (lo + hi) / 2
            slope = q * est.gen_weight(mid) - p * est.demo_weight(mid)
            hi = torch.where(slope > 0, mid, hi)
            lo = torch.where(slope > 0, lo, mid)
        recovered = est.log_ratio(minimiser) if est.calibrated else torch.full_like(log_r, np.nan)
        out[label(spec)] = {
            "log_ratio": grid,
            "minimiser": minimiser.numpy(),
            "numeric_minimiser": ((lo + hi) / 2).numpy(),
            "recovered_log_ratio": recovered.numpy(),
        }
    return out


def demo_probability(logits: np.ndarray, ratio_scale: float = 1.0) -> np.ndarray:
    """``P(demo | y) = sigmoid(ratio_scale * f)`` under balanced classes."""
    return np.exp(-np.logaddexp(0.0, -ratio_scale * np.asarray(logits, dtype=float)))


def rank_auc(demo_scores: np.ndarray, gen_scores: np.ndarray) -> float:
    """ROC AUC ``P(s_demo > s_gen) + P(s_demo = s_gen) / 2`` by the Mann-Whitney rank formula.

    ``AUC = (R_demo - n_d (n_d + 1) / 2) / (n_d n_g)`` with ``R_demo`` the sum of the
    demonstrations' average ranks in the pooled sample (ties get their mean rank).
    """
    demo, gen = np.asarray(demo_scores, float).ravel(), np.asarray(gen_scores, float).ravel()
    n_d, n_g = demo.size, gen.size
    if n_d == 0 or n_g == 0:
        raise ValueError("rank_auc needs at least one demonstration and one generated score")
    pooled = np.concatenate([demo, gen])
    order = np.argsort(pooled, kind="mergesort")
    sorted_vals = pooled[order]
    ranks = np.empty(pooled.size)
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], pooled.size]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of 1-based ranks start+1..end
    return float((ranks[:n_d].sum() - n_d * (n_d + 1) / 2) / (n_d * n_g))


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> dict:
    """Equal-width reliability diagram and expected calibration error.

    ``ece = sum_b (n_b / n) |mean(label in b) - mean(prob in b)|``; per bin: ``edges``,
    ``confidence`` (mean predicted probability), ``frequency`` (fraction of demonstrations),
    ``count``; empty bins hold NaN and count 0.
    """
    probs, labels = np.asarray(probs, float).ravel(), np.asarray(labels, float).ravel()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(probs, edges[1:-1]), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    sum_p = np.bincount(index, weights=probs, minlength=n_bins)
    sum_y = np.bincount(index, weights=labels, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence, frequency = sum_p / count, sum_y / count
    ece = float(np.abs(sum_y - sum_p).sum() / max(probs.size, 1))
    return {
        "ece": ece,
        "edges": edges,
        "confidence": confidence,
        "frequency": frequency,
        "count": count,
    }


def classifier_metrics(
    demo_logits: np.ndarray, gen_logits: np.ndarray, ratio_scale: float = 1.0, n_bins: int = 10
) -> dict:
    """Score an implicit classifier: demonstrations (label 1) against own samples (label 0).

    Returns ``auc`` (rank formula, :func:`rank_auc`), ``ece`` and ``bins`` (the reliability
    diagram of ``P(demo) = sigmoid(ratio_scale * f)``, :func:`reliability`), ``n_demo``,
    ``n_gen``. Balanced classes are assumed for the probability (see the module docstring).
    """
    demo, gen = np.asarray(demo_logits, float).ravel(), np.asarray(gen_logits, float).ravel()
    probs = demo_probability(np.concatenate([demo, gen]), ratio_scale)
    labels = np.concatenate([np.ones(demo.size), np.zeros(gen.size)])
    bins = reliability(probs, labels, n_bins)
    ece = bins.pop("ece")
    return {
        "auc": rank_auc(demo, gen),
        "ece": ece,
        "bins": bins,
        "n_demo": demo.size,
        "n_gen": gen.size,
    }


def read_implicit_logits(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``implicit_logits.jsonl``: one JSON object per line,

        {"demo_logit": float, "gen_logit": float}

    where ``demo_logit = beta * (log pi_theta - log pi_ref)(x, y_demo) + shift`` on a held-out
    demonstration and ``gen_logit`` the same on a fresh generation for the same prompt (summed
    response log-probs, as in training). Either key may be null/absent on a row (then that
    side is skipped); blank lines are ignored.
    """
    demo, gen = [], []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err})") from None
            if row.get("demo_logit") is not None:
                demo.append(float(row["demo_logit"]))
            if row.get("gen_logit") is not None:
                gen.append(float(row["gen_logit"]))
    return np.asarray(demo), np.asarray(gen)


def calibrate_run(run_dir: str | Path, ratio_scale: float = 1.0, n_bins: int = 10) -> dict:
    """:func:`classifier_metrics` of ``run_dir/implicit_logits.jsonl`` (see
    :func:`read_implicit_logits` for the format). Pass ``ratio_scale = 2`` for a run trained
    with the exponential loss. Raises ``FileNotFoundError`` naming the expected file."""
    path = Path(run_dir) / IMPLICIT_LOGITS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the evaluator writes one row per held-out prompt, "
            '{"demo_logit": float, "gen_logit": float}'
        )
    demo, gen = read_implicit_logits(path)
    result = classifier_metrics(demo, gen, ratio_scale, n_bins)
    result["path"] = str(path)
    return result
