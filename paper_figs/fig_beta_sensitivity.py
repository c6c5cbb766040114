"""Exact testbed: how beta sets the speed (or divergence) of self-imitation rounds."""

from __future__ import annotations

from pathlib import Path

from analysis.toy_sweeps import beta_sweep
from paper_figs.style import color, figure, save_figure, save_numbers

NAME = "beta_sensitivity"
FLOOR = 1e-16


def draw(out_dir: Path) -> list[Path]:
    sweep = beta_sweep()
    fig, axes = figure(1, 2, height=2.5)
    ax = axes[0, 0]
    for name, per_beta in sweep.items():
        betas = sorted(per_beta)
        final = [max(per_beta[b]["forward_kl"][-1], FLOOR) for b in betas]
        ax.plot(betas, final, "o-", ms=3, color=color(name), label=name)
    ax.set(xscale="log", yscale="log")
    ax.set_xlabel("beta (scale of the logit, dimensionless)")
    n_rounds = len(next(iter(next(iter(sweep.values())).values()))["forward_kl"]) - 1
    ax.set_ylabel(f"KL(pi_data || pi_{n_rounds}) (nats)")
    ax.legend(fontsize=6)
    ax = axes[0, 1]
    logistic = sweep["gsil-logistic"]
    for i, beta in enumerate(sorted(logistic)):
        kls = [max(v, FLOOR) for v in logistic[beta]["forward_kl"]]
        ax.plot(
            range(len(kls)),
            kls,
            "o-",
            ms=3,
            alpha=0.4 + 0.6 * i / len(logistic),
            color=color("logistic"),
            label=f"gsil-logistic, beta {beta:g}",
        )
        kls = [max(v, FLOOR) for v in sweep["spin"][beta]["forward_kl"]]
        ax.plot(
            range(len(kls)), kls, "--", color=color("spin"), alpha=0.4 + 0.6 * i / len(logistic)
        )
    ax.set(yscale="log", title="solid: GSIL-logistic, dashed: SPIN")
    ax.set_xlabel("round t")
    ax.set_ylabel("KL(pi_data || pi_t) (nats)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_numbers(sweep, out_dir, NAME)
    return save_figure(fig, out_dir, NAME)
