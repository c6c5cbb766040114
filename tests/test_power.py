"""Statistical power of paired 0/1 comparisons: the minimal detectable difference (MDE) of
gsil.evaluation.results against a hand computation and against Monte-Carlo simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gsil.evaluation.results import (
    PowerTarget,
    detectable_difference,
    independent_discordance,
    mcnemar_power,
    minimal_detectable_difference,
)

# two-sided alpha 0.05 and power 0.8, from a normal table
Z_ALPHA, Z_BETA = 1.959964, 0.841621
REPS = 4000  # simulated experiments per check: power's standard error sqrt(.16 / 4000) = 0.0063


def simulate_power(rng, n: int, p10: float, p01: float) -> tuple[float, float]:
    """Rejection rates at alpha 0.05 of the asymptotic and the exact McNemar tests over ``REPS``
    simulated experiments of ``n`` items, each item (a=1,b=0) w.p. p10, (a=0,b=1) w.p. p01."""
    counts = rng.multinomial(n, [p10, p01, 1.0 - p10 - p01], size=REPS)
    a_only, b_only = counts[:, 0], counts[:, 1]
    discordant = a_only + b_only
    z = (a_only - b_only) / np.sqrt(np.maximum(discordant, 1))
    asymptotic = float((np.abs(z) > Z_ALPHA).mean())
    exact_p = np.minimum(1.0, 2 * stats.binom.cdf(np.minimum(a_only, b_only), discordant, 0.5))
    return asymptotic, float((exact_p < 0.05).mean())


def test_mde_by_hand():
    # n = 400 items, 30% discordant: inside = 1 + (zb^2 - za^2) / n, then the closed form
    inside = 1 + (Z_BETA**2 - Z_ALPHA**2) / 400
    by_hand = math.sqrt(0.3 / 400) * (Z_ALPHA + Z_BETA * math.sqrt(inside)) / (1 + Z_BETA**2 / 400)
    assert by_hand == pytest.approx(0.07650, abs=5e-5)
    assert minimal_detectable_difference(400, 0.3) == pytest.approx(by_hand, rel=1e-5)
    # the large-n form (za + zb) sqrt(p_d / n), and the power function it inverts
    assert minimal_detectable_difference(100_000, 0.3) == pytest.approx(
        (Z_ALPHA + Z_BETA) * math.sqrt(0.3 / 100_000), rel=1e-3
    )
    assert mcnemar_power(400, 0.3, by_hand) == pytest.approx(0.8, abs=1e-4)
    assert mcnemar_power(400, 0.3, 2 * by_hand) > 0.99


@pytest.mark.parametrize(("n", "discordance"), [(200, 0.2), (400, 0.3), (1200, 0.48)])
def test_power_at_the_mde_is_80_percent_by_simulation(n, discordance):
    rng = np.random.default_rng(12)
    delta = minimal_detectable_difference(n, discordance)
    asymptotic, exact = simulate_power(rng, n, (discordance + delta) / 2, (discordance - delta) / 2)
    assert asymptotic == pytest.approx(0.8, abs=0.03)
    # the exact test the report runs is a little conservative at the same difference
    assert 0.74 <= exact <= asymptotic + 0.01
    # half the MDE is clearly underpowered
    half, _ = simulate_power(rng, n, (discordance + delta / 2) / 2, (discordance - delta / 2) / 2)
    assert half < 0.45


def test_the_assumed_discordance_from_accuracy_before_results_exist():
    assert independent_discordance(0.5) == 0.5
    assert independent_discordance(0.1) == pytest.approx(0.18)
    rng = np.random.default_rng(3)
    n = 600
    planned = detectable_difference(n, baseline_accuracy=0.5)
    assert "independent errors" in planned.assumption and planned.discordance == 0.5
    # two systems with independent errors (at accuracy 0.5 the discordance is 0.5 for any delta)
    delta = planned.difference
    a = rng.random((REPS, n)) < 0.5 + delta
    b = rng.random((REPS, n)) < 0.5
    a_only, b_only = (a & ~b).sum(1), (~a & b).sum(1)
    z = (a_only - b_only) / np.sqrt(a_only + b_only)
    assert float((np.abs(z) > Z_ALPHA).mean()) == pytest.approx(0.8, abs=0.03)
    # positively correlated systems disagree less: the assumed MDE is then conservative
    correlated_discordance = 0.25  # < 2 p (1 - p) = 0.5
    power, _ = simulate_power(
        rng, n, (correlated_discordance + delta) / 2, (correlated_discordance - delta) / 2
    )
    assert power > 0.95
    observed = detectable_difference(n, discordance=correlated_discordance)
    assert observed.difference < planned.difference and observed.assumption == "observed"


def test_a_stricter_test_needs_a_larger_difference():
    strict = detectable_difference(600, discordance=0.3, target=PowerTarget(alpha=0.01, power=0.9))
    usual = detectable_difference(600, discordance=0.3)
    assert (strict.alpha, strict.power) == (0.01, 0.9) and (usual.alpha, usual.power) == (0.05, 0.8)
    assert strict.difference > usual.difference
    # the forward power of McNemar's test at that difference is the target's
    assert mcnemar_power(600, 0.3, strict.difference, alpha=0.01) == pytest.approx(0.9, abs=1e-6)


def test_too_few_items_and_no_disagreement_are_said_so():
    assert minimal_detectable_difference(3, 0.5) == math.inf  # n < za^2 - zb^2
    assert math.isnan(minimal_detectable_difference(100, 0.0))
    small = detectable_difference(10, discordance=0.2)
    assert not small.attainable and "none at n=10" in small.summary()
    assert "no discordant items" in detectable_difference(50, discordance=0.0).summary()
    assert detectable_difference(600, discordance=0.3).summary().startswith("MDE 6.")
    with pytest.raises(ValueError, match="discordance or the baseline accuracy"):
        detectable_difference(100)
    with pytest.raises(ValueError, match="cannot exceed the discordance"):
        mcnemar_power(100, 0.1, 0.2)


def test_partial_credit_mde_by_hand_and_by_simulation():
    # scores with partial credit (reasoning-gym gives 0.5 for some near answers): the MDE is the
    # paired z-test's, (za + zb) sd / sqrt(n), from the observed SD of the differences
    from gsil.evaluation.results import paired_comparison, paired_detectable_difference

    n, sd = 600, 0.24
    assert paired_detectable_difference(n, sd) == pytest.approx(
        (Z_ALPHA + Z_BETA) * sd / math.sqrt(n), rel=1e-5
    )
    assert math.isnan(paired_detectable_difference(n, 0.0))
    # simulated paired differences with that SD and mean = the MDE: the paired t-test
    # rejects in about 80% of experiments, at half the MDE far less often
    rng = np.random.default_rng(3)
    delta = paired_detectable_difference(n, sd)
    for mean, low, high in [(delta, 0.77, 0.83), (delta / 2, 0.0, 0.35)]:
        d = rng.normal(mean, sd, size=(REPS, n))
        t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
        assert low <= float((np.abs(t) > Z_ALPHA).mean()) <= high
    # paired_comparison reports the SD and share differing for any scores, and the MDE
    # object built from them says which test it is
    a = np.array([1.0, 0.5, 0.0, 0.0, 1.0, 0.0])
    b = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    comparison = paired_comparison(a, b, resamples=200)
    assert "discordance" not in comparison  # not McNemar's: the scores are not all 0/1
    assert comparison["difference_sd"] == pytest.approx(np.std(a - b, ddof=1))
    assert comparison["differing"] == pytest.approx(3 / 6)
    mde = detectable_difference(6, discordance=0.5, difference_sd=comparison["difference_sd"])
    assert mde.difference_sd == comparison["difference_sd"] and "paired z-test" in mde.assumption
    assert mde.difference == pytest.approx(paired_detectable_difference(6, mde.difference_sd))
