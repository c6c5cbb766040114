"""Exact measures from per-sample log-probabilities: KL in both directions, entropy, fit.

Every function takes arrays of exact per-sample log-probabilities (``log p_data(y | x)`` from
:meth:`~analysis.testbed.distribution.TaskDistribution.log_prob`, ``log pi(y | x)`` from
:func:`~analysis.testbed.model.sequence_logps`), so each estimate is a mean of exact
per-sample terms with a 95% t-interval (GSIL_THEORY.md section 7):

- forward KL ``KL(p_data || pi) = E_{y ~ p_data}[log p_data(y|x) - log pi(y|x)]`` on held-out
  demonstrations;
- reverse KL ``KL(pi || p_data) = E_{y ~ pi}[log pi(y|x) - log p_data(y|x)]`` on the policy's
  samples, with the share of samples outside p_data's support (log p_data = -inf, or an
  incomplete sample: unterminated, or holding a special token) reported apart, never mixed in;
- entropy ``H(pi) = -E_{y ~ pi}[log pi(y|x)]`` on the policy's samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ArrayLike = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` samples and its 95% t-interval ``[low, high]`` (nan bounds if n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


@dataclass(frozen=True)
class ReverseKL:
    """Reverse KL on the samples inside p_data's support, and the share outside it.

    ``kl`` is ``E[log pi - log p_data]`` over the in-support samples only (None when there is
    none); ``outside_mass`` the share of all ``n`` samples that are outside (an estimate of the
    mass pi puts there).
    """

    kl: Estimate | None
    outside_mass: float
    n: int

    def to_dict(self) -> dict:
        return {
            "kl": None if self.kl is None else self.kl.to_dict(),
            "outside_mass": self.outside_mass,
            "n": self.n,
        }


def _as_array(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def mean_interval(values: ArrayLike, confidence: float = 0.95) -> Estimate:
    """Mean of ``values`` with its t-interval: ``mean +- t_{n-1} sd / sqrt(n)``."""
    array = _as_array(values, "values")
    if array.size == 0:
        raise ValueError("cannot estimate a mean from no values")
    if not np.all(np.isfinite(array)):
        raise ValueError("values must be finite (a -inf log-probability belongs in outside_mass)")
    mean = float(array.mean())
    if array.size < 2:
        return Estimate(mean, math.nan, math.nan, 1)
    half = float(
        stats.t.ppf(0.5 + confidence / 2, array.size - 1)
        * array.std(ddof=1)
        / math.sqrt(array.size)
    )
    return Estimate(mean, mean - half, mean + half, int(array.size))


def paired_difference(values: ArrayLike, baseline: ArrayLike) -> Estimate:
    """Mean of ``values - baseline`` (paired, e.g. by seed) with its t-interval."""
    first, second = _as_array(values, "values"), _as_array(baseline, "baseline")
    if first.shape != second.shape:
        raise ValueError(f"paired arrays differ in length: {first.size} and {second.size}")
    return mean_interval(first - second)


def forward_kl(data_logps: ArrayLike, policy_logps: ArrayLike) -> Estimate:
    """``KL(p_data || pi)`` from held-out demonstrations ``y_i ~ p_data``: mean of
    ``log p_data(y_i) - log pi(y_i)``, unbiased, with its 95% t-interval."""
    data, policy = _as_array(data_logps, "data_logps"), _as_array(policy_logps, "policy_logps")
    if data.shape != policy.shape:
        raise ValueError(f"data_logps has {data.size} values, policy_logps {policy.size}")
    return mean_interval(data - policy)


def reverse_kl(
    policy_logps: ArrayLike, data_logps: ArrayLike, complete: Sequence[bool] | None = None
) -> ReverseKL:
    """``KL(pi || p_data)`` from the policy's own samples ``y_i ~ pi``.

    A sample is outside p_data's support when its ``data_logps`` is -inf or ``complete`` marks
    it False (unterminated or holding a special token, see
    :class:`~analysis.testbed.model.PolicySamples`); the share of those is ``outside_mass`` and
    the KL estimate is the mean of ``log pi - log p_data`` over the others.
    """
    policy, data = _as_array(policy_logps, "policy_logps"), _as_array(data_logps, "data_logps")
    if data.shape != policy.shape:
        raise ValueError(f"policy_logps has {policy.size} values, data_logps {data.size}")
    if policy.size == 0:
        raise ValueError("reverse_kl needs at least one sample")
    inside = np.isfinite(data)
    if complete is not None:
        mask = np.asarray(complete, dtype=bool)
        if mask.shape != policy.shape:
            raise ValueError(f"complete has {mask.size} values, policy_logps {policy.size}")
        inside &= mask
    kl = mean_interval(policy[inside] - data[inside]) if inside.any() else None
    return ReverseKL(kl=kl, outside_mass=float(1.0 - inside.mean()), n=int(policy.size))


def entropy(policy_logps: ArrayLike, complete: Sequence[bool] | None = None) -> Estimate:
    """``H(pi) = -E_{y ~ pi}[log pi(y)]`` from the policy's own samples (complete ones only when
    ``complete`` is given: an unterminated sample has no complete-string probability)."""
    policy = _as_array(policy_logps, "policy_logps")
    if complete is not None:
        mask = np.asarray(complete, dtype=bool)
        if mask.shape != policy.shape:
            raise ValueError(f"complete has {mask.size} values, policy_logps {policy.size}")
        policy = policy[mask]
    return mean_interval(-policy)


def proportion(successes: Sequence[bool], confidence: float = 0.95) -> Estimate:
    """A share (e.g. answer accuracy) with its Wilson score interval, inside [0, 1]."""
    flags = np.asarray(successes, dtype=bool)
    if flags.ndim != 1 or flags.size == 0:
        raise ValueError("proportion needs a non-empty one-dimensional list of booleans")
    n = flags.size
    share = float(flags.mean())
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(share, max(0.0, centre - half), min(1.0, centre + half), int(n))


def classifier_fit(f_values: ArrayLike, target_values: ArrayLike) -> dict[str, float]:
    """How well an implicit classifier ``f(x, y)`` matches its exact target (e.g.
    ``log p_data/pi_ref``): ``rmse``, Pearson ``correlation``, ``mean_difference`` (mean of
    ``f - target``: an offset a per-prompt normaliser can cause) and ``n``."""
    f, target = _as_array(f_values, "f_values"), _as_array(target_values, "target_values")
    if f.shape != target.shape:
        raise ValueError(f"f_values has {f.size} values, target_values {target.size}")
    if f.size < 2:
        raise ValueError("classifier_fit needs at least two values")
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(target))):
        raise ValueError("classifier_fit needs finite values")
    difference = f - target
    constant = np.ptp(f) == 0 or np.ptp(target) == 0
    return {
        "rmse": float(np.sqrt(np.mean(difference**2))),
        "correlation": math.nan if constant else float(stats.pearsonr(f, target)[0]),
        "mean_difference": float(difference.mean()),
        "n": int(f.size),
    }
