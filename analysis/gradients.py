"""Losses and gradient weights of every estimator over a grid of logits (theory, section 2).

With ``f = beta * (log pi_theta - log pi_ref) + shift``, one example's gradient is
``l'(f) * df/dtheta``, so the estimator acts only through two weights:

    w_demo(f) = -d l_demo / df   (how hard a demonstration is pushed up)
    w_gen(f)  =  d l_gen  / df   (how hard an own sample is pushed down)

The pointwise first-order condition ``p w_demo(f) = q w_gen(f)`` makes
``log(w_gen(f) / w_demo(f))`` the log ratio a logit stands for: :func:`implied_log_ratio`
recovers each loss's link from its weights alone (``ratio_scale * f`` when calibrated).
"""

from __future__ import annotations

import numpy as np
import torch

from gsil.estimators import DensityRatioEstimator, get_estimator

DEFAULT_ESTIMATORS = ("logistic", "brier", "exponential", "kliep", "lsif", "power", "hinge")


def resolve_estimator(spec: str | DensityRatioEstimator) -> DensityRatioEstimator:
    """An estimator instance from a name (``power`` means power(gamma = 0.5)) or itself."""
    if isinstance(spec, DensityRatioEstimator):
        return spec
    return get_estimator(spec, gamma=0.5) if spec == "power" else get_estimator(spec)


def label(spec: str | DensityRatioEstimator) -> str:
    """A display name: ``power(0.5)`` for the power estimator, else its name."""
    est = resolve_estimator(spec)
    return f"power({est.gamma:g})" if est.name == "power" else est.name


def loss_grid(
    estimators: tuple[str | DensityRatioEstimator, ...] = DEFAULT_ESTIMATORS,
    logits: np.ndarray | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{name: {logits, demo_loss, gen_loss, demo_weight, gen_weight, demo_share}}``.

    ``demo_share = w_demo / (w_demo + w_gen)``: the demonstration's share of the gradient
    when a demonstration and an own sample sit at the same logit (1/2 at f = 0 for all
    built-ins; ``sigmoid(-shift)`` for the logistic loss at initialisation, where f = shift).
    Computed in float64; ``power`` is power(gamma = 0.5).
    """
    grid = np.linspace(-6.0, 6.0, 601) if logits is None else np.asarray(logits, dtype=float)
    f = torch.as_tensor(grid, dtype=torch.float64)
    out: dict[str, dict[str, np.ndarray]] = {}
    for spec in estimators:
        est = resolve_estimator(spec)
        w_demo, w_gen = est.demo_weight(f), est.gen_weight(f)
        total = w_demo + w_gen
        share = torch.where(total > 0, w_demo / total.clamp(min=1e-300), torch.nan)
        out[label(spec)] = {
            "logits": grid,
            "demo_loss": est.demo_loss(f).numpy(),
            "gen_loss": est.gen_loss(f).numpy(),
            "demo_weight": w_demo.numpy(),
            "gen_weight": w_gen.numpy(),
            "demo_share": share.numpy(),
        }
    return out


def implied_log_ratio(estimator: str | DensityRatioEstimator, logits: np.ndarray) -> np.ndarray:
    """``log(w_gen(f) / w_demo(f))``: the log ratio ``log(p/q)`` at which ``f`` is optimal.

    NaN where both weights vanish (the hinge outside [-1, 1] on one side); for the hinge the
    result is 0 inside (-1, 1) and +-inf outside: it carries no ratio.
    """
    est = resolve_estimator(estimator)
    f = torch.as_tensor(np.asarray(logits, dtype=float), dtype=torch.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(est.gen_weight(f).numpy()) - np.log(est.demo_weight(f).numpy())


def weight_summary(
    estimators: tuple[str | DensityRatioEstimator, ...] = DEFAULT_ESTIMATORS,
    far: float = 20.0,
    near: float = 10.0,
    vanish: float = 1e-3,
) -> list[dict]:
    """One row per estimator: where its weights are bounded and where they vanish.

    ``*_bounded``: the weight at ``|f| = far`` exceeds its maximum over
    ``|f| <= near`` by at most 1% (it stops growing); ``*_at_-inf`` / ``*_at_+inf``: the weight at
    ``f = -far`` / ``+far``; ``demo_vanishes_when_wrong``: ``w_demo(-far) < vanish`` (a
    confidently misclassified demonstration stops being pulled up);
    ``gen_vanishes_when_right``: ``w_gen(-far) < vanish`` (own samples already classified as
    generated stop being pushed down); ``demo_share_at_0``; ``calibrated``, ``ratio_scale``.
    """
    near_grid = torch.linspace(-near, near, 401, dtype=torch.float64)
    ends = torch.tensor([-far, far], dtype=torch.float64)
    rows = []
    for spec in estimators:
        est = resolve_estimator(spec)
        row: dict = {"name": label(spec), "calibrated": est.calibrated}
        row["ratio_scale"] = est.ratio_scale if est.calibrated else None
        for side, fn in (("demo", est.demo_weight), ("gen", est.gen_weight)):
            at_ends = fn(ends)
            row[f"{side}_bounded"] = bool(at_ends.max() <= fn(near_grid).max() * 1.01)
            row[f"{side}_at_-inf"] = at_ends[0].item()
            row[f"{side}_at_+inf"] = at_ends[1].item()
        row["demo_vanishes_when_wrong"] = row["demo_at_-inf"] < vanish
        row["gen_vanishes_when_right"] = row["gen_at_-inf"] < vanish
        zero = torch.zeros(1, dtype=torch.float64)
        w_d, w_g = est.demo_weight(zero).item(), est.gen_weight(zero).item()
        row["demo_share_at_0"] = w_d / (w_d + w_g)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`weight_summary` rows (numbers to 3 significant digits)."""
    if not rows:
        return ""
    keys = list(rows[0])

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
