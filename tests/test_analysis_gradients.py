"""Loss/weight grids and the summary table agree with the theory page's tables."""

import numpy as np
import pytest
import torch

from analysis.gradients import DEFAULT_ESTIMATORS, implied_log_ratio, loss_grid, weight_summary
from gsil.estimators import get_estimator


def test_weights_are_derivatives_of_the_losses():
    grid = loss_grid(logits=np.linspace(-5, 5, 2001))
    for name, curves in grid.items():
        f = curves["logits"]
        smooth = (np.abs(np.abs(f) - 1) > 0.01)[1:-1]  # the hinge has kinks at f = +-1
        for key, sign in (("demo", -1), ("gen", 1)):
            numeric = sign * np.gradient(curves[f"{key}_loss"], f)[1:-1]
            np.testing.assert_allclose(
                numeric[smooth],
                curves[f"{key}_weight"][1:-1][smooth],
                atol=2e-2,
                rtol=1e-3,
                err_msg=f"{name} {key}",
            )


def test_summary_matches_theory_table():
    rows = {row["name"]: row for row in weight_summary()}
    assert set(rows) == {"logistic", "brier", "exponential", "kliep", "lsif", "power(0.5)", "hinge"}
    for name in ("logistic", "brier", "hinge"):
        assert rows[name]["demo_bounded"] and rows[name]["gen_bounded"], name
    for name in ("exponential", "lsif", "power(0.5)"):
        assert not rows[name]["demo_bounded"] and not rows[name]["gen_bounded"], name
    assert rows["kliep"]["demo_bounded"] and not rows["kliep"]["gen_bounded"]
    assert rows["kliep"]["demo_at_-inf"] == rows["kliep"]["demo_at_+inf"] == 1.0
    assert (
        rows["brier"]["demo_vanishes_when_wrong"]
        and not rows["logistic"]["demo_vanishes_when_wrong"]
    )
    assert not rows["hinge"]["calibrated"] and rows["exponential"]["ratio_scale"] == 2.0
    assert all(row["demo_share_at_0"] == pytest.approx(0.5) for row in rows.values())


@pytest.mark.parametrize("name", [n for n in DEFAULT_ESTIMATORS if n != "hinge"])
def test_weights_imply_the_link(name):
    f = np.linspace(-3, 3, 13)
    scale = get_estimator(name, **({"gamma": 0.5} if name == "power" else {})).ratio_scale
    np.testing.assert_allclose(implied_log_ratio(name, f), scale * f, atol=1e-9)


def test_logistic_share_at_shift_is_sigmoid_of_minus_shift():
    share = loss_grid(("logistic",), logits=np.array([2.0]))["logistic"]["demo_share"]
    assert share[0] == pytest.approx(torch.sigmoid(torch.tensor(-2.0)).item())
