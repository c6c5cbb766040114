"""The fixed-point bias of the unpaired loss: per loss, beta and shift (exact testbed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm

from analysis.toy_sweeps import normaliser_bias_grid
from paper_figs.style import figure, save_figure, save_numbers

NAME = "normaliser_bias"
ROWS = (
    ("kl_to_target", "KL(target || pi_1)"),
    ("kl_to_data", "KL(pi_data || pi_1)"),
    ("final_kl_to_data", "KL(pi_data || pi_T)"),
)


def draw(out_dir: Path) -> list[Path]:
    grid = normaliser_bias_grid()
    losses, betas, shifts = grid["losses"], grid["betas"], grid["shifts"]
    fig, axes = figure(len(ROWS), len(losses), height=1.6)
    norm = LogNorm(vmin=1e-6, vmax=3.0)
    for row, (key, title) in enumerate(ROWS):
        for col, loss in enumerate(losses):
            ax = axes[row, col]
            values = np.clip(np.nan_to_num(grid[key][col], nan=np.inf), 1e-6, 3.0)  # inf: diverged
            image = ax.imshow(values, norm=norm, cmap="viridis", origin="lower", aspect="auto")
            ax.set_xticks(range(len(shifts)), [f"{s:g}" for s in shifts])
            ax.set_yticks(range(len(betas)), [f"{b:g}" for b in betas] if col == 0 else [])
            ax.grid(False)
            if row == 0:
                ax.set_title(loss)
            if row == len(ROWS) - 1:
                ax.set_xlabel("shift (nats)")
            if col == 0:
                ax.set_ylabel(f"{title}\nbeta")
    cbar = fig.colorbar(image, ax=axes, shrink=0.8)
    cbar.set_label("KL (nats), log scale")
    save_numbers(grid, out_dir, NAME)
    return save_figure(fig, out_dir, NAME)
