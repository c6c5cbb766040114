"""The convex family against the theory page: minimisers, weights, stability, generators."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from gsil.estimators import (
    ESTIMATORS,
    GENERATORS,
    BregmanEstimator,
    get_estimator,
    power_generator,
    safe_exp,
)

ALL = ["logistic", "brier", "exponential", "kliep", "lsif", "power", "hinge"]
CALIBRATED = ["logistic", "brier", "exponential", "kliep", "lsif", "power"]
DENSITY_PAIRS = [(0.7, 0.3), (0.2, 0.8), (0.5, 0.5), (0.05, 0.9), (3.0, 0.4)]


def pointwise_risk(estimator, p: float, q: float):
    def risk(f: float) -> float:
        logit = torch.tensor([f], dtype=torch.float64)
        return float((p * estimator.demo_loss(logit) + q * estimator.gen_loss(logit)).detach())

    return risk


@pytest.mark.parametrize("name", CALIBRATED)
@pytest.mark.parametrize("p,q", DENSITY_PAIRS)
def test_numerical_minimiser_matches_closed_form(name, p, q):
    estimator = get_estimator(name)
    result = minimize_scalar(
        pointwise_risk(estimator, p, q),
        bounds=(-12, 12),
        method="bounded",
        options={"xatol": 1e-10},
    )
    closed_form = float(estimator.minimiser(torch.tensor(math.log(p / q))))
    assert result.x == pytest.approx(closed_form, abs=1e-4)
    # and the link recovers the true log ratio from it
    assert float(estimator.log_ratio(torch.tensor(result.x))) == pytest.approx(
        math.log(p / q), abs=2e-4
    )


def test_exponential_minimiser_is_half_log_ratio():
    estimator = get_estimator("exponential")
    result = minimize_scalar(pointwise_risk(estimator, 0.8, 0.2), bounds=(-5, 5), method="bounded")
    assert result.x == pytest.approx(0.5 * math.log(4.0), abs=1e-4)


@pytest.mark.parametrize("p,q", [(0.7, 0.3), (0.2, 0.8)])
def test_hinge_minimiser_is_sign_and_uncalibrated(p, q):
    hinge = get_estimator("hinge")
    grid = np.linspace(-3, 3, 6001)
    risks = [pointwise_risk(hinge, p, q)(f) for f in grid]
    assert grid[int(np.argmin(risks))] == pytest.approx(np.sign(math.log(p / q)), abs=1e-3)
    assert not hinge.calibrated
    with pytest.raises(ValueError, match="not calibrated"):
        hinge.log_ratio(torch.tensor([0.3]))


@pytest.mark.parametrize("name", CALIBRATED)
@pytest.mark.parametrize("p,q", DENSITY_PAIRS)
def test_first_order_condition_at_minimiser(name, p, q):
    estimator = get_estimator(name)
    f_star = estimator.minimiser(torch.tensor([math.log(p / q)], dtype=torch.float64))
    # p * l_demo'(f*) + q * l_gen'(f*) = -p w_demo + q w_gen = 0
    residual = -p * estimator.demo_weight(f_star) + q * estimator.gen_weight(f_star)
    assert float(residual.abs()) < 1e-9


@pytest.mark.parametrize("name", ALL)
def test_autograd_equals_closed_form_weights(name):
    estimator = get_estimator(name)
    # avoid the hinge kinks at +-1, where the derivative is not defined
    logits = torch.linspace(-40, 40, 801, dtype=torch.float64)
    logits = logits[(logits - 1).abs() > 1e-6]
    logits = logits[(logits + 1).abs() > 1e-6].requires_grad_(True)
    (demo_grad,) = torch.autograd.grad(estimator.demo_loss(logits).sum(), logits)
    (gen_grad,) = torch.autograd.grad(estimator.gen_loss(logits).sum(), logits)
    # rtol 1e-7: torch's softplus switches to the identity past 20, where sigmoid is 1 - 2e-9
    weights = (estimator.demo_weight(logits.detach()), estimator.gen_weight(logits.detach()))
    torch.testing.assert_close(-demo_grad, weights[0], rtol=1e-7, atol=1e-14)
    torch.testing.assert_close(gen_grad, weights[1], rtol=1e-7, atol=1e-14)
    assert (estimator.demo_weight(logits.detach()) >= 0).all()
    assert (estimator.gen_weight(logits.detach()) >= 0).all()


@pytest.mark.parametrize("name", ALL)
def test_weights_match_theory_table_in_exact_range(name):
    logits = torch.linspace(-10, 10, 41, dtype=torch.float64)
    s = torch.sigmoid(logits)
    table = {
        "logistic": (torch.sigmoid(-logits), s),
        "brier": (2 * s * (1 - s) ** 2, 2 * s**2 * (1 - s)),
        "exponential": (torch.exp(-logits), torch.exp(logits)),
        "kliep": (torch.ones_like(logits), torch.exp(logits)),
        "lsif": (torch.exp(logits), torch.exp(2 * logits)),
        "power": (2 * torch.exp(logits), 2 * torch.exp(2 * logits)),  # gamma = 1
        "hinge": ((logits < 1).double(), (logits > -1).double()),
    }
    estimator = get_estimator(name)
    torch.testing.assert_close(estimator.demo_weight(logits), table[name][0])
    torch.testing.assert_close(estimator.gen_weight(logits), table[name][1])


def test_power_one_is_twice_lsif():
    logits = torch.linspace(-20, 20, 101, dtype=torch.float64)
    power, lsif = get_estimator("power", gamma=1.0), get_estimator("lsif")
    torch.testing.assert_close(power.demo_loss(logits), 2 * lsif.demo_loss(logits))
    torch.testing.assert_close(power.gen_loss(logits), 2 * lsif.gen_loss(logits))


def test_power_tends_to_kliep_as_gamma_vanishes():
    # power demo loss + (1 + 1/gamma) = -(1 + 1/gamma)(exp(gamma f) - 1) -> -f as gamma -> 0;
    # gen loss exp((1 + gamma) f) -> exp(f). The gap shrinks linearly in gamma.
    logits = torch.linspace(-3, 3, 61, dtype=torch.float64)
    kliep = get_estimator("kliep")
    previous_gap = math.inf
    for gamma in [1e-1, 1e-2, 1e-3, 1e-4]:
        power = get_estimator("power", gamma=gamma)
        rescaled_demo = power.demo_loss(logits) + (1 + 1 / gamma)
        gap = float((rescaled_demo - kliep.demo_loss(logits)).abs().max())
        gap += float((power.gen_loss(logits) - kliep.gen_loss(logits)).abs().max())
        assert gap < previous_gap / 5
        previous_gap = gap
    assert previous_gap < 1e-2


@pytest.mark.parametrize("name", ALL)
def test_finite_losses_and_gradients_at_extreme_logits_float32(name):
    estimator = get_estimator(name)
    logits = torch.tensor([-1e4, -1e3, -50.0, 0.0, 50.0, 1e3, 1e4], requires_grad=True)
    total = estimator.demo_loss(logits).sum() + estimator.gen_loss(logits).sum()
    (grad,) = torch.autograd.grad(total, logits)
    assert torch.isfinite(estimator.demo_loss(logits)).all()
    assert torch.isfinite(estimator.gen_loss(logits)).all()
    assert torch.isfinite(grad).all()
    assert torch.isfinite(estimator.demo_weight(logits.detach())).all()
    assert torch.isfinite(estimator.gen_weight(logits.detach())).all()


def test_safe_exp_is_exact_below_threshold_and_linear_above():
    x = torch.tensor([-5.0, 0.0, 29.0, 30.0, 31.0, 1e4], dtype=torch.float64)
    out = safe_exp(x)
    torch.testing.assert_close(out[:4], torch.exp(x[:4]))
    assert float(out[4]) == pytest.approx(math.exp(30) * 2)
    assert math.isfinite(float(safe_exp(torch.tensor([1e4]))))


@pytest.mark.parametrize("name", list(GENERATORS))
def test_generic_bregman_form_agrees_with_closed_form(name):
    generator, ratio_scale = GENERATORS[name]
    generic = BregmanEstimator(generator, name=f"generic-{name}", ratio_scale=ratio_scale)
    builtin = get_estimator(name)
    logits = torch.linspace(-8, 8, 81, dtype=torch.float64)
    # losses agree up to an additive constant; weights agree exactly
    for generic_loss, builtin_loss in [
        (generic.demo_loss(logits), builtin.demo_loss(logits)),
        (generic.gen_loss(logits), builtin.gen_loss(logits)),
    ]:
        difference = generic_loss - builtin_loss
        torch.testing.assert_close(difference, difference[0].expand_as(difference))
    torch.testing.assert_close(generic.demo_weight(logits), builtin.demo_weight(logits))
    torch.testing.assert_close(generic.gen_weight(logits), builtin.gen_weight(logits))


@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.5])
def test_generic_power_generator_agrees(gamma):
    generic = BregmanEstimator(power_generator(gamma), name="generic-power")
    builtin = get_estimator("power", gamma=gamma)
    logits = torch.linspace(-5, 5, 41, dtype=torch.float64)
    torch.testing.assert_close(generic.demo_weight(logits), builtin.demo_weight(logits))
    torch.testing.assert_close(generic.gen_weight(logits), builtin.gen_weight(logits))


def test_generic_estimator_minimiser_from_generator_alone():
    # a new loss written only as h: h(r) = r log r - r + (r - 1)^2 / 2 (h'' = 1/r + 1 > 0) is not
    # one of the built-ins; its minimiser must still be log r (Bregman matching is calibrated)
    custom = BregmanEstimator(
        lambda r: r * torch.log(r) - r + (r - 1) ** 2 / 2, name="kl-plus-lsif"
    )
    for p, q in DENSITY_PAIRS[:3]:
        result = minimize_scalar(
            pointwise_risk(custom, p, q), bounds=(-6, 6), method="bounded", options={"xatol": 1e-10}
        )
        assert result.x == pytest.approx(math.log(p / q), abs=1e-4)


def test_generic_losses_are_differentiable_for_training():
    generic = BregmanEstimator(GENERATORS["logistic"][0])
    logits = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    generic.demo_loss(logits).sum().backward()
    torch.testing.assert_close(-logits.grad, torch.sigmoid(-logits.detach()))


def test_lookup_errors_list_choices():
    with pytest.raises(ValueError, match="logistic, brier, exponential"):
        get_estimator("nope")
    with pytest.raises(ValueError, match="gamma > 0"):
        get_estimator("power", gamma=0.0)
    with pytest.raises(ValueError, match="gamma > 0"):
        get_estimator("power", gamma=-1)
    with pytest.raises(ValueError, match="takes no parameters"):
        get_estimator("logistic", gamma=2.0)
    assert set(ESTIMATORS) == set(ALL)
    assert get_estimator(" Logistic ").name == "logistic"
