"""Population links, finite-sample log-ratio error and calibration per loss (analysis.calibration,
analysis.ratio_fit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.calibration import population_links
from analysis.gradients import DEFAULT_ESTIMATORS
from analysis.ratio_fit import categorical_problem, gaussian_problem, sample_size_sweep
from paper_figs.style import color, figure, save_figure, save_numbers

NAME = "calibration"


def draw(out_dir: Path) -> list[Path]:
    links = population_links(DEFAULT_ESTIMATORS)
    sweeps = {
        "gaussian, quadratic logit": sample_size_sweep(gaussian_problem("quadratic")),
        "gaussian, RBF logit": sample_size_sweep(gaussian_problem("rbf"), seeds=(0, 1)),
        "categorical, one-hot logit": sample_size_sweep(categorical_problem()),
    }
    fig, axes = figure(2, 3, height=2.1)
    ax = axes[0, 0]
    for name, link in links.items():
        recovered = link["recovered_log_ratio"]
        y = recovered if np.isfinite(recovered).all() else link["minimiser"]
        ax.plot(
            link["log_ratio"],
            y,
            color=color(name),
            label=name + ("" if y is recovered else " (f*, no link)"),
        )
    ax.set_xlabel("true log r = log p/q (nats)")
    ax.set_ylabel("ratio_scale * f* (nats)")
    ax.legend(fontsize=6)
    for ax, (title, sweep) in zip(
        axes[0, 1:].tolist() + [axes[1, 0]], sweeps.items(), strict=False
    ):
        for name, res in sweep.items():
            if np.isfinite(res["log_ratio_rmse"]).all():
                ax.plot(
                    res["sizes"], res["log_ratio_rmse"], "o-", ms=3, color=color(name), label=name
                )
        ax.set(xscale="log", yscale="log", title=title, ylim=(1e-2, 1e2))
        ax.set_xlabel("samples per class")
        ax.set_ylabel("RMSE of recovered log r (nats)")
    gauss = sweeps["gaussian, quadratic logit"]
    ax = axes[1, 1]
    for name, res in gauss.items():
        ax.plot(res["sizes"], res["ece"], "o-", ms=3, color=color(name), label=name)
    ax.set(xscale="log", yscale="log", title="gaussian, quadratic logit")
    ax.set_xlabel("samples per class")
    ax.set_ylabel("ECE of sigmoid(ratio_scale f)")
    ax.legend(fontsize=6)
    ax = axes[1, 2]
    for name, res in gauss.items():
        bins = res["bins"]
        ax.plot(bins["confidence"], bins["frequency"], "o-", ms=3, color=color(name), label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("predicted P(demo) (probability)")
    ax.set_ylabel("observed fraction of demos")
    ax.set_title(f"reliability, n = {gauss['logistic']['sizes'][-1]} per class")
    fig.tight_layout()
    save_numbers({"links": links, "sweeps": sweeps}, out_dir, NAME)
    return save_figure(fig, out_dir, NAME)
