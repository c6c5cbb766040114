"""Demonstrations' log-likelihood during round 1 (Adam steps): SPIN against GSIL and SFT."""

from __future__ import annotations

from pathlib import Path

import torch

from analysis.toy_sweeps import demo_loglik_trajectories, setup
from paper_figs.style import color, figure, save_figure, save_numbers

NAME = "demo_loglik"


def draw(out_dir: Path) -> list[Path]:
    trajectories = demo_loglik_trajectories()
    _, data_probs, _ = setup()
    best = (data_probs * torch.log(data_probs)).sum(-1).mean().item()  # -H(pi_data)
    fig, axes = figure(1, len(trajectories), height=2.4)
    for ax, (regime, runs) in zip(axes[0], trajectories.items(), strict=True):
        for name, logliks in runs.items():
            ax.plot(range(len(logliks)), logliks, color=color(name), label=name)
        ax.axhline(best, color="k", ls=":", lw=1, label="-H(pi_data) (maximum)")
        ax.set_title(f"pairs: {regime} (beta 0.5 for SPIN/GSIL)")
        ax.set_xlabel("Adam step within round 1 (lr 0.05)")
        ax.set_ylabel("E_data[log pi(y|x)] (nats / sequence)")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    save_numbers({"trajectories": trajectories, "max_demo_loglik": best}, out_dir, NAME)
    return save_figure(fig, out_dir, NAME)
