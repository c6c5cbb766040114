"""Experiment figures from trained runs: benchmark scores per method and round, and the
training curves (rewards, margins, log-probs) of ``metrics.jsonl``. A stage repeated over seeds
(runs ``<stage>-seed<s>``) is drawn as its per-seed points and their mean with a 95% Student-t
interval across seeds.

Reads the runs under ``$GSIL_RUNS_DIR`` (default ``runs/``; the default pipeline writes
``runs/default/``). With no runs it prints a message and draws nothing.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from experiments.report import RunInfo, discover_runs, group_runs
from gsil.evaluation.results import mean_interval
from gsil.io import read_json
from gsil.layout import run_of_model
from paper_figs.style import color, figure, save_figure, save_numbers

NAME = "experiments"
CURVES = [
    ("rewards/margins", "reward margin (demo - generated)"),
    ("rewards/chosen", "reward of demonstrations"),
    ("rewards/rejected", "reward of generations"),
    ("logps/chosen", "log pi(demo) (nats / sequence)"),
    ("logps/rejected", "log pi(generated) (nats / sequence)"),
    ("loss", "loss"),
]
MAX_RUNS = 12  # more runs than this: the curves become unreadable, the first ones are drawn


def default_runs_dir() -> Path:
    return Path(os.environ.get("GSIL_RUNS_DIR", "runs"))


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


def _start_score(run: RunInfo, bench: str) -> tuple[float, list[float]] | None:
    """The score of the model the run started from, when that model was evaluated."""
    found = run_of_model(run.config.model.name_or_path)
    path = found and found[0].eval_dir(found[1]) / f"{bench}.json"
    if path and path.exists():
        result = read_json(path)
        if result.get("score") is not None:
            return result["score"], result["interval"]
    return None


def _score_points(run: RunInfo, bench: str) -> list[tuple[int, float, list[float]]]:
    """``(rounds trained, score, interval)`` of a run on ``bench``, from its starting model on."""
    points = []
    start = _start_score(run, bench)
    if start is not None:
        points.append((0, start[0], start[1]))
    for round_index, evals in sorted(run.evals.items()):
        if bench in evals:
            result = read_json(evals[bench])
            if result.get("score") is not None:
                points.append((round_index + 1, result["score"], result["interval"]))
    return points


def _seed_mean(per_seed: list[list[tuple]]) -> list[tuple[int, float, list[float], int]]:
    """Per round: the mean score over seeds, its 95% t-interval across seeds, and the count."""
    by_round: dict[int, list[float]] = defaultdict(list)
    for points in per_seed:
        for x, score, _ in points:
            by_round[x].append(score)
    means = []
    for x, scores in sorted(by_round.items()):
        mean = sum(scores) / len(scores)
        low, high = mean_interval(scores) if len(scores) > 1 else (mean, mean)
        means.append((x, mean, [low, high], len(scores)))
    return means


def draw_scores(runs: list[RunInfo], out_dir: Path) -> tuple[list[Path], dict]:
    """Score (with 95% interval) against rounds trained, one line per run and benchmark; for a
    stage repeated over seeds, its seeds' points and their mean (interval across seeds)."""
    benches = sorted({b for run in runs for evals in run.evals.values() for b in evals})
    if not benches:
        return [], {}
    fig, axes = figure(1, len(benches), height=2.6)
    numbers: dict = {}
    groups = group_runs(runs)
    tints = _run_colors({group.name: group.method for group in groups})  # greys for SFT
    for ax, bench in zip(axes[0], benches, strict=True):
        for offset, group in enumerate(groups):
            per_run = {run.name: _score_points(run, bench) for run in group.runs}
            per_run = {name: points for name, points in per_run.items() if points}
            if not per_run:
                continue
            numbers.setdefault(bench, {}).update(per_run)
            shift = 0.04 * (offset - len(groups) / 2)
            if group.repeated:
                means = _seed_mean(list(per_run.values()))
                numbers[bench][f"{group.name} (mean over seeds)"] = means
                label = f"{group.name} (mean of {len(per_run)} seeds)"
                points = [(x, mean, interval) for x, mean, interval, _ in means]
            else:
                label, points = group.name, next(iter(per_run.values()))
            xs = [p[0] + shift for p in points]
            ys = [100 * p[1] for p in points]
            errs = [
                [100 * (p[1] - p[2][0]) for p in points],
                [100 * (p[2][1] - p[1]) for p in points],
            ]
            ax.errorbar(
                xs, ys, yerr=errs, marker="o", ms=3, capsize=2, label=label, color=tints[group.name]
            )
            if group.repeated:  # each seed's score, in the line's colour
                for seed_points in per_run.values():
                    ax.plot(
                        [p[0] + shift for p in seed_points],
                        [100 * p[1] for p in seed_points],
                        ls="none",
                        marker=".",
                        ms=3,
                        alpha=0.5,
                        color=tints[group.name],
                    )
        ax.set_title(bench)
        ax.set_xlabel("rounds trained (0: the starting model)")
        ax.set_ylabel("score (%) with 95% interval")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, out_dir, f"{NAME}_scores"), numbers


def draw_curves(runs: list[RunInfo], out_dir: Path) -> tuple[list[Path], dict]:
    """Training curves per optimizer step (smoothed), with round boundaries marked."""
    metrics = {run.name: run.metrics() for run in runs}
    metrics = {name: rows for name, rows in metrics.items() if rows}
    if not metrics:
        return [], {}
    fig, axes = figure(2, 3, height=2.2)
    numbers: dict = {}
    run_colors = _run_colors({run.name: run.method for run in runs})
    for ax, (key, label) in zip(axes.flat, CURVES, strict=True):
        for name, rows in metrics.items():
            steps = [row["step"] for row in rows if key in row]
            values = [row[key] for row in rows if key in row]
            if not values:
                continue
            window = max(1, len(values) // 20)
            ax.plot(steps, _smooth(values, window), label=name, color=run_colors[name])
            numbers.setdefault(key, {})[name] = {"step": steps, "value": values}
            for row_prev, row in zip(rows, rows[1:], strict=False):
                if row["round"] != row_prev["round"]:
                    ax.axvline(row["step"] - 0.5, color="k", lw=0.5, ls=":")
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
    labelled = {}  # every run once, whichever panel drew it
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labelled.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(
        labelled.values(), labelled.keys(), ncol=len(labelled), loc="lower center", frameon=False
    )
    return save_figure(fig, out_dir, f"{NAME}_training"), numbers


def _run_colors(methods: dict[str, str]) -> dict[str, str]:
    """The method's colour for GSIL/SPIN runs; greys for the SFT runs, one per run."""
    greys = iter(["#222222", "#888888", "#bbbbbb", "#555555"] * 4)
    return {
        name: next(greys) if method == "sft" else color(method) for name, method in methods.items()
    }


def draw(out_dir: Path, runs_dir: Path | None = None) -> list[Path]:
    """Draw the score and training-curve figures of the runs under ``runs_dir``."""
    runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    runs = discover_runs([runs_dir])
    if not runs:
        print(
            f"{NAME}: no runs under {runs_dir} (train some with `make run`, or set "
            "GSIL_RUNS_DIR); nothing drawn"
        )
        return []
    if len(runs) > MAX_RUNS:
        print(f"{NAME}: {len(runs)} runs under {runs_dir}; drawing the first {MAX_RUNS}")
        runs = runs[:MAX_RUNS]
    score_paths, scores = draw_scores(runs, out_dir)
    curve_paths, curves = draw_curves(runs, out_dir)
    paths = score_paths + curve_paths
    if paths:
        save_numbers(
            {"runs_dir": str(runs_dir), "scores": scores, "training": curves}, Path(out_dir), NAME
        )
    return paths
