"""Exact testbed: distance to pi_data per method over self-imitation rounds (beta 1, shift 0)."""

from __future__ import annotations

from pathlib import Path

from analysis.toy import DATA_KINDS
from analysis.toy_sweeps import convergence_sweep
from paper_figs.style import color, figure, save_figure, save_numbers

NAME = "toy_convergence"
FLOOR = 1e-16  # KL values below float64 resolution are drawn at this floor


def draw(out_dir: Path) -> list[Path]:
    sweep = convergence_sweep(n_rounds=4, data_kinds=DATA_KINDS)
    fig, axes = figure(2, 3, height=2.1)
    for ax, kind in zip(axes[0], DATA_KINDS, strict=True):
        for name, metrics in sweep[kind].items():
            kls = [max(v, FLOOR) for v in metrics["forward_kl"]]
            ax.plot(range(len(kls)), kls, "o-", ms=3, color=color(name), label=name)
        ax.set(yscale="log", title=f"pi_data: {kind}")
        ax.set_xlabel("round t")
        ax.set_ylabel("KL(pi_data || pi_t) (nats)")
    multimodal = sweep["multimodal"]
    for ax, key, ylabel in zip(
        axes[1],
        ("reverse_kl", "tv", "mode_mass"),
        (
            "KL(pi_t || pi_data) (nats)",
            "total variation (probability)",
            "mass on data modes (prob.)",
        ),
        strict=True,
    ):
        for name, metrics in multimodal.items():
            values = [max(v, FLOOR) for v in metrics[key]] if key != "mode_mass" else metrics[key]
            ax.plot(range(len(values)), values, "o-", ms=3, color=color(name), label=name)
        if key != "mode_mass":
            ax.set_yscale("log")
        else:
            ax.axhline(multimodal["sft"]["data_mode_mass"][0], color="k", ls=":", lw=1)
        ax.set_xlabel("round t (pi_data: multimodal)")
        ax.set_ylabel(ylabel)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for one legend row under the panels
    fig.legend(handles, labels, ncol=len(labels), loc="lower center", frameon=False)
    save_numbers(sweep, out_dir, NAME)
    return save_figure(fig, out_dir, NAME)
