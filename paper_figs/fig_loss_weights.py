"""Losses and gradient weights per estimator (analysis.gradients)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.gradients import format_table, implied_log_ratio, loss_grid, weight_summary
from paper_figs.style import color, figure, save_figure, save_numbers

NAME = "loss_weights"


def draw(out_dir: Path) -> list[Path]:
    grid = loss_grid()
    fig, axes = figure(2, 3, height=2.0)
    panels = [
        (axes[0, 0], "demo_loss", "demo loss l_demo(f)", "linear"),
        (axes[0, 1], "gen_loss", "generated loss l_gen(f)", "linear"),
        (axes[1, 0], "demo_weight", "w_demo(f) = -l_demo'(f)", "log"),
        (axes[1, 1], "gen_weight", "w_gen(f) = l_gen'(f)", "log"),
        (axes[0, 2], "demo_share", "demo share of weight", "linear"),
    ]
    for ax, key, ylabel, scale in panels:
        for name, curves in grid.items():
            ax.plot(curves["logits"], curves[key], color=color(name), label=name)
        ax.set_yscale(scale)
        ax.set_xlabel("logit f = beta * Delta + shift (nats)")
        ax.set_ylabel(ylabel + (" (nats)" if "loss" in key else ""))
        if key.endswith("_loss"):
            ax.set_ylim(-5, 8)
        if key.endswith("weight"):
            ax.set_ylim(1e-4, 1e3)
    ax = axes[1, 2]
    f = np.linspace(-3, 3, 301)
    for name in grid:
        ax.plot(
            f,
            implied_log_ratio(name if name != "power(0.5)" else "power", f),
            color=color(name),
            label=name,
        )
    ax.set_xlabel("logit f (nats)")
    ax.set_ylabel("implied log r = log(w_g/w_d) (nats)")
    ax.set_ylim(-6.5, 6.5)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for one legend row under the panels
    fig.legend(handles, labels, ncol=len(labels), loc="lower center", frameon=False)
    rows = weight_summary()
    (Path(out_dir) / f"{NAME}_table.md").write_text(format_table(rows) + "\n")
    save_numbers({"summary": rows}, out_dir, NAME)
    return save_figure(fig, out_dir, NAME)
