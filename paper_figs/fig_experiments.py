"""Experiment figures from trained runs, drawn from the numbers the report states
(:func:`experiments.report.build_report`), so that figure and report always agree.

``experiments_scores``, one row per benchmark: on the left each stage's score (a categorical
axis, one colour per stage): every seed's score as a faint point and their mean with the
report's 95% interval (:func:`experiments.report.seeds_score_interval`, within the score's range
by construction); the model the stages started from (the SFT parent), when it was evaluated, is
a dashed line with its interval as a band. On the right, each method's paired difference against
the baseline's run of the same seed: per seed, and their mean with the interval the report's
verdict uses (Student-t across seeds; one seed: the paired bootstrap).
``experiments_training``: the training curves (rewards, margins, log-probs, loss) of every run
per optimizer step, one colour per stage, round boundaries dotted.

Reads the runs under ``$GSIL_RUNS_DIR`` (default ``runs/``; the default pipeline writes
``runs/default/``). With no runs it prints a message and draws nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from experiments.report import (
    Report,
    RunGroup,
    RunInfo,
    build_report,
    fmt_score_value,
    group_runs,
)
from gsil import env
from paper_figs.style import PALETTE, figure, save_figure, save_numbers

NAME = "experiments"
CURVES = [
    ("rewards/margins", "reward margin (demo - generated)"),
    ("rewards/chosen", "reward of demonstrations"),
    ("rewards/rejected", "reward of generations"),
    ("logps/chosen", "log pi(demo) (nats / sequence)"),
    ("logps/rejected", "log pi(generated) (nats / sequence)"),
    ("loss", "loss"),
]
SEED_ALPHA = 0.45  # each seed's point: faint, in its stage's colour
SFT_GREYS = ["#333333", "#8c8c8c", "#b0b0b0"]
SPARE_COLORS = ["#17becf", "#bcbd22", "#8c564b", "#e377c2", "#9467bd", "#7f7f7f", "#ff7f0e"]


def default_runs_dir() -> Path:
    return env.runs_dir()


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def stage_colors(groups: Sequence[RunGroup]) -> dict[str, str]:
    """One colour per stage: its method's (``spin`` red, ``gsil-logistic`` blue), greys for
    SFT stages (darkest first: the parent, then continued SFT); a stage whose method has no
    colour, or whose colour another stage took, gets one no stage has yet."""
    greys = iter(SFT_GREYS)
    taken: set[str] = set()
    colors = {}
    for group in groups:
        if group.method == "sft":
            choice = next(greys, None)
        else:
            choice = PALETTE.get(group.method.removeprefix("gsil-"))
        if choice is None or choice in taken:
            choice = next((c for c in SPARE_COLORS if c not in taken), SPARE_COLORS[0])
        colors[group.name] = choice
        taken.add(choice)
    return colors


def _common_prefix(names: Sequence[str]) -> str:
    """``default/`` when every stage lives under that directory (``python -m paper_figs`` on
    ``runs/``), else ``""``."""
    heads = {name.rsplit("/", 1)[0] + "/" if "/" in name else "" for name in names}
    return heads.pop() if len(heads) == 1 else ""


def _differences(report: Report, bench: str, shown: set[str]) -> list[dict[str, Any]]:
    """The :func:`summarize_methods` entries of the ``shown`` stages on ``bench``: per-seed
    differences, their mean, and the interval the verdict uses (across seeds, else paired)."""
    differences = []
    for m in report.methods:
        if m["benchmark"] != bench or m["method"] not in shown:
            continue
        differences.append(
            {
                "method": m["method"],
                "seeds": [s["seed"] for s in m["seeds"]],
                "differences": [s["difference"] for s in m["seeds"]],
                "mean_difference": m["mean_difference"],
                "interval": list(m["across_interval"] or m["pooled"]["interval"]),
                "interval_kind": "t across seeds" if m["across_interval"] else "paired bootstrap",
            }
        )
    return differences


def scores_data(report: Report) -> dict[str, dict[str, Any]]:
    """What ``experiments_scores`` plots, per benchmark, taken from the report's summaries.

    ``stages``: the compared stages, the baseline first, then in report order (each a
    :func:`experiments.report.summarize_scores` entry: ``seeds`` with their scores, ``mean``,
    ``interval``); ``starts``: the stages the others started from (reference lines);
    ``unevaluated_starts``: starting models without a score; ``differences``:
    :func:`_differences` of the compared stages.
    """
    data: dict[str, dict[str, Any]] = {}
    base = report.baseline.name if report.baseline else None
    for bench in report.benchmarks:
        summaries = [s for s in report.scores if s["benchmark"] == bench]
        if not summaries:
            continue
        start_of = {s["method"]: s["starts_from"] for s in summaries}
        # a stage the others started from, itself started from none of them: a reference line
        references = {
            start
            for start in start_of.values()
            if start in start_of and start_of[start] not in start_of
        }
        stages = [s for s in summaries if s["method"] not in references]
        stages.sort(key=lambda s: s["method"] != base)  # the baseline first, then report order
        data[bench] = {
            "bounds": summaries[0]["bounds"],
            "baseline": base,
            "stages": stages,
            "starts": [s for s in summaries if s["method"] in references],
            "unevaluated_starts": sorted({s["starts_from"] for s in stages} - set(start_of)),
            "differences": _differences(report, bench, {s["method"] for s in stages}),
        }
    return data


def _scale(bounds: Sequence[float]) -> float:
    """Drawn units per score unit: percent (100) for a proportion, as is (1) for a rating."""
    return 100.0 if tuple(bounds) == (0.0, 1.0) else 1.0


def _offsets(k: int) -> np.ndarray:
    """Horizontal offsets of ``k`` seeds' points: a strip left of their mean's marker."""
    return -0.22 + (np.linspace(-0.07, 0.07, k) if k > 1 else np.zeros(1))


@dataclass(frozen=True)
class StageMark:
    """One stage on a categorical axis: its seeds' values, their mean and interval, in the
    axis' units, its colour and the text beside the mean."""

    values: list[float]
    mean: float
    interval: tuple[float, float]
    tint: str
    text: str


def _draw_stage(ax, x: int, mark: StageMark) -> None:
    """``mark`` at ``x``: the seeds as a faint strip left of the mean's marker and bar."""
    ax.plot(
        x + _offsets(len(mark.values)),
        mark.values,
        ls="none",
        marker="o",
        ms=4,
        alpha=SEED_ALPHA,
        color=mark.tint,
        mec="none",
    )
    low, high = mark.interval
    ax.errorbar(
        [x],
        [mark.mean],
        yerr=[[max(0.0, mark.mean - low)], [max(0.0, high - mark.mean)]],
        marker="D",
        ms=5,
        capsize=4,
        lw=1.6,
        color=mark.tint,
        mec="k",
        mew=0.6,
    )
    ax.annotate(mark.text, (x + 0.12, mark.mean), fontsize=6, va="center", color=mark.tint)


def _stage_axis(ax, names: Sequence[str], labels: Sequence[str], colors: dict[str, str]) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(labels)
    for label, name in zip(ax.get_xticklabels(), names, strict=True):
        label.set_color(colors[name])
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.grid(axis="x", visible=False)


def _draw_stage_scores(ax, panel: dict[str, Any], colors: dict[str, str], prefix: str) -> None:
    bounds = panel["bounds"]
    scale = _scale(bounds)
    for x, stage in enumerate(panel["stages"]):
        mark = StageMark(
            values=[scale * s["score"] for s in stage["seeds"]],
            mean=scale * stage["mean"],
            interval=(scale * stage["interval"][0], scale * stage["interval"][1]),
            tint=colors[stage["method"]],
            text=fmt_score_value(stage["mean"], bounds),
        )
        _draw_stage(ax, x, mark)
    for start in panel["starts"]:
        low, high = start["interval"]
        ax.axhline(scale * start["mean"], ls="--", lw=1.0, color="k")
        ax.axhspan(scale * low, scale * high, color="k", alpha=0.08, lw=0)
    names = [s["method"] for s in panel["stages"]]
    labels = []
    for stage in panel["stages"]:
        k = len(stage["seeds"])
        labels.append(f"{stage['method'].removeprefix(prefix)}\n({k} seed{'s' * (k != 1)})")
    _stage_axis(ax, names, labels, colors)
    tops = [scale * s["interval"][1] for s in panel["stages"] + panel["starts"]]
    ax.set_ylim(scale * bounds[0], min(scale * bounds[1], 1.15 * max(tops) + 0.02 * scale))


def _score_legend(ax, panel: dict[str, Any], prefix: str) -> None:
    handles = [
        Line2D([], [], ls="none", marker="o", ms=4, alpha=SEED_ALPHA, color="0.4", mec="none"),
        Line2D([], [], marker="D", ms=5, color="0.4", mec="k", mew=0.6),
    ]
    labels = ["one seed", "mean over seeds, 95% interval"]
    for start in panel["starts"]:
        k = len(start["seeds"])
        handles.append(
            (Patch(color="k", alpha=0.08, lw=0), Line2D([], [], ls="--", lw=1.0, color="k"))
        )
        labels.append(
            f"starting model: {start['method'].removeprefix(prefix)} "
            f"({fmt_score_value(start['mean'], panel['bounds'])}"
            f"{'%' if _scale(panel['bounds']) == 100.0 else ''}"
            f"{', ' + str(k) + ' seeds' if k > 1 else ''}; band: 95% interval)"
        )
    for name in panel["unevaluated_starts"]:
        handles.append(Line2D([], [], ls="none"))
        labels.append(f"starting model {name.removeprefix(prefix)}: not evaluated")
    ax.legend(  # below the stage names, clear of the data
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=2,
        fontsize=6,
        frameon=False,
    )


def _draw_differences(ax, panel: dict[str, Any], colors: dict[str, str], prefix: str) -> None:
    bounds = panel["bounds"]
    scale = _scale(bounds)
    width = bounds[1] - bounds[0]  # a difference lies within +-width
    by_name = {d["method"]: d for d in panel["differences"]}
    names = [s["method"] for s in panel["stages"]]
    ax.axhline(0.0, color="k", lw=0.8)
    for x, name in enumerate(names):
        if name == panel["baseline"]:
            ax.annotate("baseline", (x, 0.0), ha="center", va="bottom", fontsize=6)
        if name not in by_name:
            continue
        diff = by_name[name]
        mean, (low, high) = scale * diff["mean_difference"], diff["interval"]
        mark = StageMark(
            values=[scale * d for d in diff["differences"]],
            mean=mean,
            interval=(scale * max(-width, low), scale * min(width, high)),
            tint=colors[name],
            text=f"{mean:+.1f}" if scale == 100.0 else f"{mean:+.2f}",
        )
        _draw_stage(ax, x, mark)
    _stage_axis(ax, names, [n.removeprefix(prefix) for n in names], colors)


def draw_scores(report: Report, out_dir: Path) -> tuple[list[Path], dict[str, dict[str, Any]]]:
    """Draw ``experiments_scores`` (see the module docstring); return its paths and the data
    it plotted (:func:`scores_data`)."""
    data = scores_data(report)
    if not data:
        return [], {}
    with_differences = any(panel["differences"] for panel in data.values())
    colors = stage_colors(group_runs(report.runs))
    prefix = _common_prefix([g.name for g in group_runs(report.runs)])
    n_stages = max(len(panel["stages"]) for panel in data.values())
    width = min(5.0, 1.4 + 0.9 * n_stages) * (2 if with_differences else 1)
    fig, axes = figure(len(data), 2 if with_differences else 1, width=width, height=2.9)
    for row, (bench, panel) in zip(axes, data.items(), strict=True):
        percent = _scale(panel["bounds"]) == 100.0
        _draw_stage_scores(row[0], panel, colors, prefix)
        _score_legend(row[0], panel, prefix)
        row[0].set_title(f"{bench}: score of each stage's final model")
        row[0].set_ylabel("score (%)" if percent else "score")
        if with_differences:
            _draw_differences(row[1], panel, colors, prefix)
            base = (panel["baseline"] or "").removeprefix(prefix)
            row[1].set_title(f"{bench}: paired difference vs {base}, same seed")
            kinds = {d["interval_kind"] for d in panel["differences"]}
            where = kinds.pop() if len(kinds) == 1 else "t across seeds, or paired"
            row[1].set_ylabel(f"Δ ({'points; ' if percent else ''}95%: {where})")
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{NAME}_scores"), data


def draw_curves(runs: list[RunInfo], out_dir: Path) -> tuple[list[Path], dict]:
    """Training curves per optimizer step (smoothed) of every run, one colour per stage (its
    seeds' runs share it), with round boundaries dotted."""
    metrics = {run.name: run.metrics() for run in runs}
    metrics = {name: rows for name, rows in metrics.items() if rows}
    if not metrics:
        return [], {}
    groups = group_runs(runs)
    colors = stage_colors(groups)
    stage_of_run = {run.name: group for group in groups for run in group.runs}
    prefix = _common_prefix([g.name for g in groups])
    fig, axes = figure(2, 3, height=2.2)
    numbers: dict = {}
    for ax, (key, label) in zip(axes.flat, CURVES, strict=True):
        boundaries: set[float] = set()
        for name, rows in metrics.items():
            steps = [row["step"] for row in rows if key in row]
            values = [row[key] for row in rows if key in row]
            if not values:
                continue
            group = stage_of_run[name]
            window = max(1, len(values) // 20)
            k = len(group.runs)
            ax.plot(
                steps,
                _smooth(values, window),
                label=group.name.removeprefix(prefix) + (f" ({k} seeds)" if k > 1 else ""),
                color=colors[group.name],
                lw=1.0 if k > 1 else 1.4,
                alpha=0.75 if k > 1 else 1.0,
            )
            numbers.setdefault(key, {})[name] = {"step": steps, "value": values}
            for row_prev, row in zip(rows, rows[1:], strict=False):
                if row["round"] != row_prev["round"]:
                    boundaries.add(row["step"] - 0.5)
        for step in sorted(boundaries):
            ax.axvline(step, color="k", lw=0.5, ls=":")
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
    labelled = {}  # every stage once, whichever panel drew it
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labelled.setdefault(label, handle)
    ncol = min(len(labelled), 5)
    rows_of_legend = -(-len(labelled) // ncol)
    fig.tight_layout(rect=(0, 0.05 * rows_of_legend, 1, 1))
    fig.legend(labelled.values(), labelled.keys(), ncol=ncol, loc="lower center", frameon=False)
    return save_figure(fig, out_dir, f"{NAME}_training"), numbers


def draw(out_dir: Path, runs_dir: Path | None = None, baseline: str | None = None) -> list[Path]:
    """Draw the score and training-curve figures of every run under ``runs_dir``, against
    ``baseline`` (default: the report's, :func:`experiments.report.build_report`)."""
    runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    report = build_report([runs_dir], baseline)
    if not report.runs:
        print(
            f"{NAME}: no runs under {runs_dir} (train some with `make run`, or set "
            "GSIL_RUNS_DIR); nothing drawn"
        )
        return []
    score_paths, scores = draw_scores(report, out_dir)
    curve_paths, curves = draw_curves(report.runs, out_dir)
    paths = score_paths + curve_paths
    if paths:
        save_numbers(
            {
                "runs_dir": str(runs_dir),
                "runs": [run.name for run in report.runs],
                "scores": scores,
                "training": curves,
            },
            Path(out_dir),
            NAME,
        )
    return paths
