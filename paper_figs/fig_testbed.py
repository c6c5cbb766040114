"""The testbed's figures (``gsil testbed``, issue 21), from its ``report.json``, every point a
mean over seeds with its 95% t-interval:

- ``testbed_sample_efficiency``: forward KL to p_data against N per method (log N);
- ``testbed_demo_loglik``: the demonstrations' log-likelihood round by round (claim b);
- ``testbed_classifier``: GSIL's implicit classifier against the exact log ratios (claim c);
- ``testbed_rounds``: forward KL after each round (claim d), the negative control beside it;
- ``testbed_frontier``: (forward KL, reverse KL) over sampling temperature per method.

Reads ``$GSIL_TESTBED_DIR/report.json`` (default ``runs-testbed/testbed``, where ``gsil
testbed`` writes); without it prints a message and draws nothing.
"""

from __future__ import annotations

from pathlib import Path

from analysis.testbed.grid import ROUND_METHODS
from gsil import env
from gsil.io import read_json
from paper_figs.style import color, figure, save_figure, save_numbers

NAME = "testbed"
EXTRA_COLORS = {
    "continued-sft": "#888888",
    "dft": "#bcbd22",
    "dynamic-ft": "#17becf",
    "sdft": "#8c564b",
    "negative-control": "#000000",
}


def default_testbed_dir() -> Path:
    return env.testbed_dir()


def _color(name: str) -> str:
    return EXTRA_COLORS.get(name) or color("logistic" if name == "gsil" else name)


def _errorbar(ax, xs, estimates, label, name, **kwargs) -> None:
    """Points with their 95% intervals (a point without an interval is drawn alone)."""
    points = [(x, e) for x, e in zip(xs, estimates, strict=True) if e is not None]
    if not points:
        return
    means = [e["mean"] for _, e in points]
    low = [e["mean"] - e["low"] if e["low"] is not None else 0.0 for _, e in points]
    high = [e["high"] - e["mean"] if e["high"] is not None else 0.0 for _, e in points]
    ax.errorbar(
        [x for x, _ in points],
        means,
        yerr=[low, high],
        label=label,
        color=_color(name),
        marker="o",
        ms=3,
        capsize=2,
        **kwargs,
    )


def draw_sample_efficiency(report: dict, out_dir: Path) -> list[Path]:
    fig, axes = figure(1, 1, width=3.6, height=2.6)
    ax = axes[0, 0]
    for method, row in report["table"].items():
        ns = sorted(row, key=int)
        _errorbar(ax, [int(n) for n in ns], [row[n]["forward_kl"] for n in ns], method, method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("demonstrations N")
    ax.set_ylabel("KL(p_data || pi) (nats / sequence)")
    ax.set_title(f"after {report['rounds']} round(s), equal optimizer steps")
    ax.legend(fontsize=6)
    return save_figure(fig, out_dir, f"{NAME}_sample_efficiency")


def _per_round(report: dict, key: str, names: list[str], ax, ylabel: str) -> None:
    for name in names:
        rounds = report["per_round"].get(name)
        if not rounds:
            continue
        ts = sorted(rounds, key=int)
        _errorbar(ax, [int(t) for t in ts], [rounds[t][key] for t in ts], name, name)
    ax.set_xlabel("round (0: the base)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"N = {report['grid']['loss_n']}")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=6)


def draw_demo_loglik(report: dict, out_dir: Path) -> list[Path]:
    fig, axes = figure(1, 1, width=3.6, height=2.6)
    names = list(ROUND_METHODS)
    _per_round(report, "demo_logp", names, axes[0, 0], "mean log pi(training demo) (nats)")
    return save_figure(fig, out_dir, f"{NAME}_demo_loglik")


def draw_rounds(report: dict, out_dir: Path) -> list[Path]:
    fig, axes = figure(1, 1, width=3.6, height=2.6)
    names = [*ROUND_METHODS, "negative-control"]
    _per_round(report, "forward_kl", names, axes[0, 0], "KL(p_data || pi) (nats / sequence)")
    return save_figure(fig, out_dir, f"{NAME}_rounds")


def draw_classifier(report: dict, out_dir: Path) -> list[Path]:
    example = report.get("classifier_example")
    fig, axes = figure(1, 2, height=2.6)
    left, right = axes[0]
    if example:
        left.scatter(example["data"], example["f"], s=4, alpha=0.5, label="log p_data/pi_ref")
        left.scatter(example["empirical"], example["f"], s=4, alpha=0.5, label="log p_N/pi_ref")
        values = example["data"] + example["empirical"]
        lo, hi = min(values), max(values)
        left.plot([lo, hi], [lo, hi], "k:", lw=1, label="f = target")
        left.set_xlabel("exact log ratio on the training demos")
        left.set_ylabel("f = beta (log pi_1 - log pi_ref) + shift")
        left.set_title(f"GSIL-logistic, round 1, seed {example['seed']}")
        left.legend(fontsize=6)
    names = list(report["losses"])
    for offset, (target, marker) in enumerate((("empirical", "o"), ("data", "s"))):
        estimates = [report["losses"][n]["classifier"][f"{target}_correlation"] for n in names]
        xs = [i + 0.15 * (offset - 0.5) for i in range(len(names))]
        points = [(x, e) for x, e in zip(xs, estimates, strict=True) if e]
        if points:
            right.errorbar(
                [x for x, _ in points],
                [e["mean"] for _, e in points],
                yerr=[
                    [e["mean"] - e["low"] for _, e in points],
                    [e["high"] - e["mean"] for _, e in points],
                ],
                fmt=marker,
                ms=3,
                capsize=2,
                label=f"vs log p_{'N' if target == 'empirical' else 'data'}/pi_ref",
            )
    right.set_xticks(range(len(names)), [n.removeprefix("gsil-") for n in names], rotation=30)
    right.set_ylabel("correlation of f with its target")
    right.axhline(0, color="k", lw=0.5)
    right.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{NAME}_classifier")


def draw_frontier(report: dict, out_dir: Path) -> list[Path]:
    fig, axes = figure(1, 1, width=3.6, height=2.8)
    ax = axes[0, 0]
    for name, points in report["frontier"].items():
        points = [p for p in points if p.get("forward_kl") and p.get("reverse_kl")]
        if not points:
            continue
        fkl = [p["forward_kl"] for p in points]
        rkl = [p["reverse_kl"] for p in points]
        ax.errorbar(
            [f["mean"] for f in fkl],
            [r["mean"] for r in rkl],
            xerr=[[f["mean"] - f["low"] for f in fkl], [f["high"] - f["mean"] for f in fkl]],
            yerr=[[r["mean"] - r["low"] for r in rkl], [r["high"] - r["mean"] for r in rkl]],
            color=_color(name),
            marker="o",
            ms=3,
            capsize=2,
            label=name,
        )
        for point, f, r in zip(points, fkl, rkl, strict=True):
            ax.annotate(f"T={point['temperature']:g}", (f["mean"], r["mean"]), fontsize=5)
    ax.set_xlabel("forward KL(p_data || pi_T)")
    ax.set_ylabel("reverse KL(pi_T || p_data), in support")
    ax.set_title(f"temperature frontier, N = {report['grid']['loss_n']}")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=6)
    return save_figure(fig, out_dir, f"{NAME}_frontier")


def draw(out_dir: Path, testbed_dir: Path | None = None) -> list[Path]:
    """Draw the testbed figures from ``testbed_dir/report.json``."""
    testbed_dir = Path(testbed_dir) if testbed_dir is not None else default_testbed_dir()
    path = testbed_dir / "report.json"
    if not path.exists():
        print(f"{NAME}: no {path} (run `gsil testbed`, or set GSIL_TESTBED_DIR); nothing drawn")
        return []
    report = read_json(path)
    paths = []
    for drawer in (
        draw_sample_efficiency,
        draw_demo_loglik,
        draw_classifier,
        draw_rounds,
        draw_frontier,
    ):
        paths += drawer(report, Path(out_dir))
    numbers = {key: report[key] for key in ("table", "per_round", "losses", "frontier")}
    save_numbers({"testbed_dir": str(testbed_dir), **numbers}, Path(out_dir), NAME)
    return paths
