"""Tables of trained and evaluated runs: ``python -m experiments.report runs/default``.

Finds every run directory under the given paths (a ``config.json`` written by
``experiments.run`` beside ``metrics.jsonl``/``summary.json``), reads the evaluations in
``round_<t>/eval/<benchmark>.json``, and writes ``report.md`` and ``report.csv``: one row per
run (and evaluated round), one column per benchmark with its 95% interval, and the paired
difference against the SFT baseline on the same items (paired bootstrap interval, exact McNemar
p) from :func:`gsil.evaluation.results.compare_results`.

Runs named ``<stage>-seed<s>`` (with ``seed: s``, as a pipeline stage repeated over seeds names
them) form one method. ``report.md``'s scores section gives per stage its seeds' scores and their
mean with an interval inside the score's range (:func:`seeds_score_interval`), and the stage its
runs started from. Each run is compared with the baseline's run of the same seed, and
``report.md``'s methods section (``report_methods.csv``) gives per method and benchmark the
per-seed scores and differences, their mean with a 95% Student-t interval across seeds, the
pooled paired test over every seed's items, and the minimal detectable difference (80% power,
alpha 0.05) at the pooled n and observed discordance. A difference is claimed only where the
interval across seeds (with one seed: the paired interval) excludes 0.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

from experiments.config import RunConfig, load_saved_config
from gsil.evaluation.results import (
    CONFIDENCE,
    DetectableDifference,
    compare_results,
    detectable_difference,
    mean_interval,
    pooled_comparison,
)
from gsil.io import read_json, read_jsonl
from gsil.layout import EVAL_REQUEST, RunLayout, run_of_model
from gsil.layout import round_index as index_of_round


@dataclass
class RunInfo:
    """One run directory: its configuration, summary, metrics and evaluations per round."""

    name: str
    path: Path
    config: RunConfig
    summary: dict[str, Any] | None
    evals: dict[int, dict[str, Path]] = field(default_factory=dict)  # round -> bench -> json

    @property
    def method(self) -> str:
        """``sft``, ``spin`` or ``gsil-<loss>``."""
        goal = self.config.objective
        return f"gsil-{goal.loss}" if goal.method == "gsil" else goal.method

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def rounds(self) -> list[dict[str, Any]]:
        """The per-round summaries (finished rounds only)."""
        if self.summary:
            return self.summary.get("rounds", [])
        found = []
        layout = RunLayout(self.path)
        for round_index in layout.finished_rounds():
            found.append(read_json(layout.round_summary(round_index)))
        return found

    def global_steps(self) -> int:
        rounds = self.rounds()
        return int(rounds[-1].get("global_step", 0)) if rounds else 0

    def metrics(self) -> list[dict[str, Any]]:
        path = RunLayout(self.path).metrics
        return read_jsonl(path) if path.exists() else []


SEED_SUFFIX = re.compile(r"^(?P<stage>.+)-seed(?P<seed>\d+)$")


def stage_of(run: RunInfo) -> tuple[str, int | None]:
    """``("spin", 1)`` for a run named ``spin-seed1`` whose seed is 1 (one seed of a repeated
    stage); ``(run.name, None)`` for any other run."""
    match = SEED_SUFFIX.match(run.name)
    if match and int(match["seed"]) == run.config.seed:
        return match["stage"], run.config.seed
    return run.name, None


@dataclass
class RunGroup:
    """A method: one stage's runs, one per seed (or a single run)."""

    name: str
    runs: list[RunInfo]
    repeated: bool = False  # runs named <name>-seed<s>

    @property
    def method(self) -> str:
        return self.runs[0].method

    def run_for(self, run: RunInfo) -> RunInfo | None:
        """This group's run to compare ``run`` with: the same seed's run of a repeated stage,
        else the one run; None when there is none (or ``run`` is one of this group's)."""
        if any(own is run for own in self.runs):
            return None
        if not self.repeated:
            return self.runs[0]
        return next((own for own in self.runs if own.config.seed == run.config.seed), None)


def group_runs(runs: Sequence[RunInfo]) -> list[RunGroup]:
    """The runs grouped by stage (``spin-seed0``, ``spin-seed1`` -> ``spin``), in run order."""
    groups: dict[tuple[str, bool], RunGroup] = {}  # a run "spin" beside "spin-seed1": apart
    for run in runs:
        name, seed = stage_of(run)
        key = (name, seed is not None)
        groups.setdefault(key, RunGroup(name, [], seed is not None)).runs.append(run)
    return list(groups.values())


def _is_run_dir(path: Path) -> bool:
    layout = RunLayout(path)
    if path.name in ("model", "checkpoint") or not layout.is_run():
        return False
    try:
        load_saved_config(layout.config)
    except ValueError:  # another tool's config.json, or one this version cannot read
        return False
    return True


def discover_runs(paths: Iterable[str | Path]) -> list[RunInfo]:
    """Every run directory at or below ``paths``, in path order (names relative to them)."""
    runs: dict[Path, RunInfo] = {}
    for root in map(Path, paths):
        if not root.exists():
            continue
        candidates = [root] if _is_run_dir(root) else []
        candidates += sorted(p.parent for p in root.rglob("config.json") if _is_run_dir(p.parent))
        for path in candidates:
            if path in runs:
                continue
            name = path.name if path == root else str(path.relative_to(root))
            summary_path = RunLayout(path).summary
            info = RunInfo(
                name=name,
                path=path,
                config=load_saved_config(path / "config.json"),
                summary=read_json(summary_path) if summary_path.exists() else None,
            )
            layout = RunLayout(path)
            for round_dir in layout.round_dirs():
                index = index_of_round(round_dir)
                for eval_json in sorted(layout.eval_dir(index).glob("*.json")):
                    if _is_result(eval_json):
                        info.evals.setdefault(index, {})[eval_json.stem] = eval_json
            runs[path] = info
    return list(runs.values())


def _is_result(path: Path) -> bool:
    if path.name in ("summary.json", EVAL_REQUEST):
        return False
    try:
        data = read_json(path)
    except ValueError:
        return False
    return isinstance(data, dict) and "benchmark" in data and "score" in data


def pick_baseline(runs: Sequence[RunInfo], name: str | None) -> RunGroup | None:
    """The stage named ``name`` (all its seeds' runs) or the run so named (its directory name),
    else the evaluated SFT stage with the most optimizer steps."""
    groups = group_runs(runs)
    if name:
        for group in groups:
            if group.name == name:
                return group
        for run in runs:
            if run.name == name or run.path.name == name:
                return RunGroup(run.name, [run])
        raise SystemExit(f"baseline {name!r} is not among the runs: {[r.name for r in runs]}")
    sft = [g for g in groups if g.method == "sft" and any(r.evals for r in g.runs)]
    return max(sft, key=lambda g: max(r.global_steps() for r in g.runs)) if sft else None


def experiment_baseline(paths: Iterable[str | Path], runs: Sequence[RunInfo]) -> str | None:
    """The baseline an experiment's ``pipeline.json`` names (``evaluation.baseline``), as the
    stage name the runs under ``paths`` group into (``default/sft-continued`` when ``paths`` is
    the directory above the experiment); None unless exactly one such stage is among ``runs``."""
    stages = {group.name for group in group_runs(runs)}
    found = set()
    for root in map(Path, paths):
        if not root.is_dir():
            continue
        for plan_path in sorted(root.rglob("pipeline.json")):
            try:
                name = (read_json(plan_path).get("evaluation") or {}).get("baseline")
            except ValueError:
                continue
            if name:
                prefix = plan_path.parent.relative_to(root)
                found.add(name if prefix == Path(".") else f"{prefix.as_posix()}/{name}")
    found &= stages
    return found.pop() if len(found) == 1 else None


def benchmarks_of(runs: Sequence[RunInfo]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for benches in run.evals.values():
            names += [b for b in benches if b not in names]
    return names


def _fmt_score(result: dict[str, Any]) -> str:
    if result.get("score") is None:
        return "not scored"
    low, high = result.get("interval") or (math.nan, math.nan)
    return f"{100 * result['score']:.1f} [{100 * low:.1f}, {100 * high:.1f}] (n={result['n']})"


def _fmt_diff(comparison: dict[str, Any] | None) -> str:
    if comparison is None:
        return ""
    if "error" in comparison:
        return "n/a"
    low, high = comparison["interval"]
    p = comparison.get("mcnemar", {}).get("p_value")
    p_text = f", p={p:.2g}" if p is not None else ""
    return f"{100 * comparison['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]{p_text}"


def build_rows(runs: Sequence[RunInfo], baseline: RunGroup | None) -> list[dict[str, Any]]:
    """One row per (run, evaluated round) with every benchmark's result and its comparison with
    the baseline's run of the same seed (its last evaluated round)."""
    rows = []
    for run in runs:
        base_run = baseline.run_for(run) if baseline else None
        base_evals = base_run.evals[max(base_run.evals)] if base_run and base_run.evals else {}
        for round_index in sorted(run.evals) or [None]:
            results, comparisons = {}, {}
            dtypes = {}  # the weights' dtype each benchmark was evaluated in
            for bench, path in (run.evals.get(round_index) or {}).items():
                results[bench] = read_json(path)
                dtypes[bench] = eval_dtype_of(path)
                if bench in base_evals and base_evals[bench] != path:
                    try:
                        comparisons[bench] = compare_results(path, base_evals[bench])
                    except (ValueError, OSError) as err:
                        comparisons[bench] = {"error": str(err)}
            round_summaries = run.rounds()
            rows.append(
                {
                    "run": run.name,
                    "stage": stage_of(run)[0],
                    "seed": run.config.seed,
                    "method": run.method,
                    "round": round_index,
                    "rounds_trained": len(round_summaries),
                    "steps": run.global_steps(),
                    "ties": [r.get("ties") for r in round_summaries if "ties" in r],
                    "finished": run.finished,
                    "is_baseline": bool(baseline) and any(r is run for r in baseline.runs),
                    "baseline_run": base_run.name if base_run else None,
                    "results": results,
                    "dtypes": dtypes,
                    "comparisons": comparisons,
                }
            )
    return rows


def eval_dtype_of(result_path: Path) -> str | None:
    """The dtype a benchmark result was evaluated in: its ``request.json`` (written beside it
    by the evaluation), else its settings; None when neither says."""
    bench = result_path.stem
    request = result_path.parent / EVAL_REQUEST
    if request.is_file():
        dtype = (read_json(request).get(bench) or {}).get("dtype")
        if dtype:
            return str(dtype)
    return (read_json(result_path).get("settings") or {}).get("dtype")


def precision_line(rows: Sequence[dict[str, Any]]) -> str:
    """``Evaluated in float32 (reasoning).``, or which runs used which dtype when they differ."""
    by_dtype: dict[str, set[str]] = {}
    for row in rows:
        for bench, dtype in row.get("dtypes", {}).items():
            by_dtype.setdefault(dtype or "an unrecorded dtype", set()).add(f"{row['run']}:{bench}")
    if not by_dtype:
        return ""
    if len(by_dtype) == 1:
        ((dtype, where),) = by_dtype.items()
        benches = sorted({w.split(":", 1)[1] for w in where})
        return f"Evaluated in {dtype} ({', '.join(benches)}; each run's eval/request.json)."
    parts = [f"{dtype}: {', '.join(sorted(where))}" for dtype, where in sorted(by_dtype.items())]
    return (
        "Evaluated in different precisions, so differences mix methods and dtypes: "
        + "; ".join(parts)
        + "."
    )


def to_markdown(
    rows: Sequence[dict[str, Any]],
    benchmarks: Sequence[str],
    baseline: str | None,
    methods: Sequence[dict[str, Any]] = (),
    scores: Sequence[dict[str, Any]] = (),
) -> str:
    """The markdown report: the table of runs, per stage its score over seeds
    (:func:`summarize_scores`), then per method (:func:`summarize_methods`) the seeds, the
    interval across seeds, the pooled paired test, the MDE and a verdict."""
    header = ["run", "method", "steps", "ties/round"] + [f"{b} (%)" for b in benchmarks]
    header += [f"Δ {b} vs {baseline} (pts)" for b in benchmarks] if baseline else []
    lines = [
        "# Results",
        "",
        "Scores in percent with 95% intervals (Wilson); Δ: paired difference against "
        f"{baseline or 'the baseline'} (its run of the same seed) on the same items (paired "
        "bootstrap 95% interval, exact McNemar p). " + precision_line(rows),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        label = row["run"] + (f" (round {row['round']})" if row["round"] is not None else "")
        label += "" if row["finished"] else " (unfinished)"
        ties = ", ".join(str(t) for t in row["ties"]) or "-"
        cells = [label, row["method"], str(row["steps"]), ties]
        cells += [_fmt_score(row["results"][b]) if b in row["results"] else "-" for b in benchmarks]
        if baseline:
            cells += [
                "baseline" if row["is_baseline"] else _fmt_diff(row["comparisons"].get(b)) or "-"
                for b in benchmarks
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if scores:
        lines += ["", "## Scores per stage", "", SCORES_NOTE, "", *_scores_table(scores)]
    if methods:
        lines += [
            "",
            f"## Methods against {baseline}",
            "",
            *_methods_table(methods),
            "",
            *(_method_line(m, baseline) for m in methods),
        ]
    tasks = _task_lines(rows)
    if tasks:
        lines += ["", "## Reasoning tasks", "", *tasks]
    return "\n".join(lines) + "\n"


def summarize_methods(
    groups: Sequence[RunGroup],
    baseline: RunGroup | None,
    rows: Sequence[dict[str, Any]],
    benchmarks: Sequence[str],
) -> list[dict[str, Any]]:
    """Per method (a stage's runs over seeds) and benchmark, against the baseline.

    Each run's last evaluated round is compared with the baseline's run of the same seed
    (``rows`` hold those comparisons). Returns dicts with ``seeds`` (per seed: run, score, n,
    difference, interval), ``mean_difference`` and ``across_interval`` (Student-t 95% over the
    per-seed differences; None with fewer than 2 seeds), ``pooled`` (one paired comparison over
    every seed's items, :func:`gsil.evaluation.results.pooled_comparison`), ``mde``
    (:class:`gsil.evaluation.results.DetectableDifference` at the pooled n and observed
    discordance; None unless every score is 0/1) and ``verdict``.
    """
    if baseline is None:
        return []
    by_run = {(row["run"], row["round"]): row for row in rows}
    summaries = []
    for group in groups:
        if group is baseline:
            continue
        for bench in benchmarks:
            seeds, pairs, comparisons = [], [], []
            for run in group.runs:
                base_run = baseline.run_for(run)
                if not run.evals or base_run is None or not base_run.evals:
                    continue
                row = by_run[(run.name, max(run.evals))]
                comparison = row["comparisons"].get(bench)
                if not comparison or "error" in comparison:
                    continue
                comparisons.append(comparison)
                seeds.append(
                    {
                        "seed": run.config.seed,
                        "run": run.name,
                        "round": row["round"],
                        "score": row["results"][bench].get("score"),
                        "baseline_run": base_run.name,
                        "n": comparison["n"],
                        "difference": comparison["difference"],
                        "interval": comparison["interval"],
                    }
                )
                pairs.append((comparison["a"], comparison["b"]))
            if not seeds:
                continue
            differences = [s["difference"] for s in seeds]
            across = mean_interval(differences) if len(differences) >= 2 else None
            # one seed: its comparison is the pooled one (no second bootstrap)
            pooled = pooled_comparison(pairs) if len(pairs) > 1 else comparisons[0]
            mde = None
            if "discordance" in pooled:
                mde = detectable_difference(
                    pooled["n"],
                    baseline_accuracy=pooled["mean_b"],
                    discordance=pooled["discordance"],
                )
            elif pooled.get("difference_sd") is not None:  # partial credit: not McNemar's
                mde = detectable_difference(
                    pooled["n"],
                    baseline_accuracy=pooled["mean_b"],
                    discordance=pooled["differing"],
                    difference_sd=pooled["difference_sd"],
                )
            summary = {
                "method": group.name,
                "benchmark": bench,
                "baseline": baseline.name,
                "seeds": seeds,
                "mean_difference": sum(differences) / len(differences),
                "across_interval": list(across) if across else None,
                "pooled": pooled,
                "mde": mde,
            }
            summary["verdict"] = verdict(summary)
            summaries.append(summary)
    return summaries


def score_bounds(metric: str | None) -> tuple[float, float]:
    """The range a benchmark's score lives in: ``(1, 10)`` for a rating (MT-Bench), else
    ``(0, 1)`` (accuracy, pass@1)."""
    return (1.0, 10.0) if metric and "rating" in metric else (0.0, 1.0)


def seeds_score_interval(
    scores: Sequence[float],
    ns: Sequence[int],
    bounds: tuple[float, float] = (0.0, 1.0),
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Interval of the mean score over seeds that lies within ``bounds`` by construction.

    Scores map to ``u = (score - low) / (high - low)`` in [0, 1]. With ``k`` seeds, mean ``p``
    of the ``u`` and ``N = sum(ns)`` items, the variance of the mean is the larger of the
    binomial ``p (1 - p) / N`` and the across-seed ``s^2 / k`` (``s``: the SD of the ``u`` over
    seeds), so the effective sample size (Kish) is ``n_eff = p (1 - p) / variance <= N``. The
    interval is Wilson's at ``n_eff`` with the Student-t quantile of ``k - 1`` df in place of
    ``z`` (Korn & Graubard 1998); with one seed, Wilson's at its ``n`` (for an accuracy, the
    run's own interval). Wilson's interval of a proportion never leaves [0, 1]. For partial
    credit or a rating, ``p (1 - p)`` is the largest variance a score in [0, 1] with mean ``p``
    can have, so the floor is conservative.
    """
    if len(scores) != len(ns) or not scores:
        raise ValueError(f"one item count per score: {len(scores)} scores, {len(ns)} counts")
    low, high = bounds
    u = [(score - low) / (high - low) for score in scores]
    k, total = len(u), sum(ns)
    if total <= 0:
        return (low, high)
    p = sum(u) / k
    if k == 1:
        quantile, n_eff = float(stats.norm.ppf(0.5 + confidence / 2)), float(total)
    else:
        quantile = float(stats.t.ppf(0.5 + confidence / 2, df=k - 1))
        across = sum((x - p) ** 2 for x in u) / (k - 1) / k
        n_eff = min(float(total), p * (1 - p) / across) if across > 0 else float(total)
    q2n = quantile**2 / n_eff
    centre = (p + q2n / 2) / (1 + q2n)
    half = quantile / (1 + q2n) * math.sqrt(p * (1 - p) / n_eff + q2n / (4 * n_eff))
    # Wilson's interval holds p and lies in [0, 1]; min/max only undo rounding at 0 and 1
    lo_u, hi_u = min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))
    return (low + lo_u * (high - low), low + hi_u * (high - low))


def _start_of(run: RunInfo, stage_of_path: dict[Path, str]) -> str:
    """The stage whose run's model ``run`` started from (``sft``), or the model's name."""
    model = run.config.model.name_or_path
    found = run_of_model(model)
    if found:
        parent = found[0].root
        for candidate in (parent, run.path.parent / parent.name):
            name = stage_of_path.get(candidate.resolve())
            if name is not None:
                return name
    return model


def summarize_scores(
    groups: Sequence[RunGroup], rows: Sequence[dict[str, Any]], benchmarks: Sequence[str]
) -> list[dict[str, Any]]:
    """Per stage (its runs over seeds) and benchmark: each seed's score at its run's last
    evaluated round, their mean with :func:`seeds_score_interval` (within the score's range),
    and ``starts_from``, the stage (or model) its runs started from."""
    by_run = {(row["run"], row["round"]): row for row in rows}
    stage_of_path = {run.path.resolve(): group.name for group in groups for run in group.runs}
    summaries = []
    for group in groups:
        starts = {_start_of(run, stage_of_path) for run in group.runs}
        for bench in benchmarks:
            seeds = []
            for run in group.runs:
                if not run.evals:
                    continue
                result = by_run[(run.name, max(run.evals))]["results"].get(bench)
                if result is None or result.get("score") is None:
                    continue
                seeds.append(
                    {
                        "seed": run.config.seed,
                        "run": run.name,
                        "round": max(run.evals),
                        "score": result["score"],
                        "n": result["n"],
                        "metric": result.get("metric"),
                    }
                )
            if not seeds:
                continue
            bounds = score_bounds(seeds[0]["metric"])
            scores = [s["score"] for s in seeds]
            interval = seeds_score_interval(scores, [s["n"] for s in seeds], bounds)
            summaries.append(
                {
                    "method": group.name,
                    "kind": group.method,
                    "benchmark": bench,
                    "seeds": seeds,
                    "mean": sum(scores) / len(scores),
                    "interval": list(interval),
                    "bounds": list(bounds),
                    "starts_from": ", ".join(sorted(starts)),
                }
            )
    return summaries


def _excludes_zero(interval: Sequence[float] | None) -> bool:
    if interval is None or any(map(math.isnan, interval)):
        return False
    return interval[0] > 0 or interval[1] < 0


def verdict(summary: dict[str, Any]) -> str:
    """Plain words for a method's comparison that claim no difference the intervals do not
    support: with several seeds the interval across seeds decides (the pooled item-level test
    ignores seed-to-seed variation), with one seed the paired interval does."""
    base, k = summary["baseline"], len(summary["seeds"])
    across, pooled = summary["across_interval"], summary["pooled"]["interval"]
    mde = summary["mde"]
    if across is not None:
        if _excludes_zero(across):
            text = (
                f"{'higher' if across[0] > 0 else 'lower'} than {base} across {k} seeds "
                "(the 95% interval across seeds excludes 0)"
            )
            if not _excludes_zero(pooled):
                text += "; the pooled item-level interval contains 0"
            return text
        text = f"no difference resolved across {k} seeds (the interval across seeds contains 0"
        if _excludes_zero(pooled):
            text += (
                "; the pooled item-level interval excludes 0, but it ignores seed-to-seed "
                "variation, so no difference is claimed)"
            )
        else:
            text += ", as does the pooled item-level interval)"
    elif _excludes_zero(pooled):
        text = (
            f"{'higher' if pooled[0] > 0 else 'lower'} than {base} (the interval excludes 0"
            "; one seed: seed-to-seed variation not measured)"
        )
        return text
    else:
        text = "no difference resolved (the interval contains 0)"
    if mde is not None and mde.attainable and not _excludes_zero(pooled):
        text += f"; differences under {100 * mde.difference:.1f} points would likely be missed"
    return text


SCORES_NOTE = (
    "Each seed's score at its run's last evaluated round; their mean with a 95% interval that "
    "stays within the score's range: Wilson's at the effective sample size the spread over "
    "seeds leaves, with the t quantile of seeds - 1 df (one seed: the run's Wilson interval)."
)


def fmt_score_value(value: float, bounds: Sequence[float]) -> str:
    """A score as the report prints it: percent for a proportion, as is for a rating."""
    return f"{100 * value:.1f}" if tuple(bounds) == (0.0, 1.0) else f"{value:.2f}"


def _scores_table(scores: Sequence[dict[str, Any]]) -> list[str]:
    header = [
        "stage",
        "benchmark",
        "started from",
        "seeds",
        "score per seed",
        "mean score, 95% interval",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in scores:
        bounds, seeds = m["bounds"], m["seeds"]
        unit = " (%)" if tuple(bounds) == (0.0, 1.0) else ""
        low, high = m["interval"]
        cells = [
            m["method"],
            m["benchmark"] + unit,
            m["starts_from"],
            ", ".join(str(s["seed"]) for s in seeds) + f" ({len(seeds)})",
            ", ".join(fmt_score_value(s["score"], bounds) for s in seeds),
            f"{fmt_score_value(m['mean'], bounds)} [{fmt_score_value(low, bounds)}, "
            f"{fmt_score_value(high, bounds)}]",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt_points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _methods_table(methods: Sequence[dict[str, Any]]) -> list[str]:
    header = [
        "method",
        "benchmark",
        "seeds",
        "score per seed (%)",
        "Δ per seed (pts)",
        "mean Δ, 95% t across seeds",
        "pooled Δ (paired bootstrap), McNemar p",
        "MDE of the pooled test (80% power, α 0.05)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        seeds = m["seeds"]
        scores = ", ".join("-" if s["score"] is None else f"{100 * s['score']:.1f}" for s in seeds)
        across = m["across_interval"]
        across_text = (
            f"{_fmt_points(m['mean_difference'])} [{_fmt_points(across[0])}, "
            f"{_fmt_points(across[1])}]"
            if across
            else "n/a (one seed)"
        )
        pooled = m["pooled"]
        mde = m["mde"]
        mde_text = "n/a" if mde is None else _fmt_mde(mde)
        cells = [
            m["method"],
            m["benchmark"],
            ", ".join(str(s["seed"]) for s in seeds) + f" ({len(seeds)})",
            scores,
            ", ".join(_fmt_points(s["difference"]) for s in seeds),
            across_text,
            f"{_fmt_diff(pooled)} (n={pooled['n']})",
            mde_text,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt_mde(mde: DetectableDifference) -> str:
    """``6.1 pts (n=600, discordance 0.24)``; ``none``/``undefined`` with the reason."""
    where = f"n={mde.n}, discordance {mde.discordance:.2f}"
    if mde.difference_sd is not None:
        where = f"n={mde.n}, SD of paired differences {mde.difference_sd:.2f}: paired z-test"
    if math.isnan(mde.difference):
        return f"undefined ({where}: no item differs)"
    if not mde.attainable:
        return f"none ({where}: too few items)"
    return f"{100 * mde.difference:.1f} pts ({where})"


def _method_line(m: dict[str, Any], baseline: str | None) -> str:
    k = len(m["seeds"])
    seeds = f"{k} seed{'s' * (k != 1)}, pooled n={m['pooled']['n']}"
    return (
        f"- {m['method']} vs {baseline} on {m['benchmark']} ({seeds}): "
        f"Δ {_fmt_diff(m['pooled'])} (points): {m['verdict']}"
    )


def _task_lines(rows) -> list[str]:
    lines = []
    for row in rows:
        result = row["results"].get("reasoning")
        tasks = (result or {}).get("breakdown", {}).get("tasks", {})
        parts = [
            f"{task} {_fmt_score({'score': t['accuracy'], 'interval': t['interval'], 'n': t['n']})}"
            for task, t in tasks.items()
            if t.get("accuracy") is not None
        ]
        if parts:
            lines.append(f"- {row['run']}: " + "; ".join(parts))
    return lines


CSV_FIELDS = [
    "run",
    "method",
    "round",
    "steps",
    "ties",
    "benchmark",
    "metric",
    "score",
    "low",
    "high",
    "n",
    "baseline",
    "difference",
    "diff_low",
    "diff_high",
    "mcnemar_p",
    "stage",
    "seed",
]
METHOD_CSV_FIELDS = [
    "method",
    "benchmark",
    "baseline",
    "seeds",
    "scores",
    "differences",
    "mean_difference",
    "across_low",
    "across_high",
    "pooled_n",
    "pooled_difference",
    "pooled_low",
    "pooled_high",
    "mcnemar_p",
    "discordance",
    "mde",
    "verdict",
]


def to_csv_rows(rows, baseline: str | None) -> list[dict[str, Any]]:
    """Long format: one CSV row per (run, round, benchmark)."""
    out = []
    for row in rows:
        for bench, result in row["results"].items():
            comparison = row["comparisons"].get(bench) or {}
            low, high = result.get("interval") or (None, None)
            diff_low, diff_high = comparison.get("interval") or (None, None)
            out.append(
                {
                    "run": row["run"],
                    "method": row["method"],
                    "round": row["round"],
                    "steps": row["steps"],
                    "ties": " ".join(map(str, row["ties"])),
                    "benchmark": bench,
                    "metric": result.get("metric"),
                    "score": result.get("score"),
                    "low": low,
                    "high": high,
                    "n": result.get("n"),
                    "baseline": baseline if comparison and "error" not in comparison else None,
                    "difference": comparison.get("difference"),
                    "diff_low": diff_low,
                    "diff_high": diff_high,
                    "mcnemar_p": comparison.get("mcnemar", {}).get("p_value"),
                    "stage": row["stage"],
                    "seed": row["seed"],
                }
            )
    return out


def methods_csv_rows(methods: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CSV row per (method, benchmark) of :func:`summarize_methods` (proportions)."""
    out = []
    for m in methods:
        across = m["across_interval"] or (None, None)
        pooled = m["pooled"]
        out.append(
            {
                "method": m["method"],
                "benchmark": m["benchmark"],
                "baseline": m["baseline"],
                "seeds": " ".join(str(s["seed"]) for s in m["seeds"]),
                "scores": " ".join(str(s["score"]) for s in m["seeds"]),
                "differences": " ".join(str(s["difference"]) for s in m["seeds"]),
                "mean_difference": m["mean_difference"],
                "across_low": across[0],
                "across_high": across[1],
                "pooled_n": pooled["n"],
                "pooled_difference": pooled["difference"],
                "pooled_low": pooled["interval"][0],
                "pooled_high": pooled["interval"][1],
                "mcnemar_p": pooled.get("mcnemar", {}).get("p_value"),
                "discordance": pooled.get("discordance"),
                "mde": m["mde"].difference if m["mde"] is not None else None,
                "verdict": m["verdict"],
            }
        )
    return out


@dataclass
class Report:
    """Everything the report states, computed once: what ``report.md`` and the experiment
    figures (:mod:`paper_figs.fig_experiments`) both draw from."""

    runs: list[RunInfo]
    baseline: RunGroup | None
    benchmarks: list[str]
    rows: list[dict[str, Any]]  # build_rows
    scores: list[dict[str, Any]]  # summarize_scores
    methods: list[dict[str, Any]]  # summarize_methods


def build_report(paths: Sequence[str | Path], baseline: str | None = None) -> Report:
    """The report of the runs under ``paths`` against ``baseline`` (default: the one the
    experiment's ``pipeline.json`` names, else :func:`pick_baseline`'s)."""
    runs = discover_runs(paths)
    base = pick_baseline(runs, baseline or experiment_baseline(paths, runs))
    benchmarks = benchmarks_of(runs)
    rows = build_rows(runs, base)
    groups = group_runs(runs)
    scores = summarize_scores(groups, rows, benchmarks)
    methods = summarize_methods(groups, base, rows, benchmarks)
    return Report(runs, base, benchmarks, rows, scores, methods)


def write_report(
    paths: Sequence[str | Path], out_dir: str | Path, baseline: str | None = None
) -> list[Path]:
    """Write ``report.md``, ``report.csv`` (per run) and ``report_methods.csv`` (per method, over
    seeds) for the runs under ``paths``; return their paths."""
    built = build_report(paths, baseline)
    runs, base, benchmarks, rows = built.runs, built.baseline, built.benchmarks, built.rows
    methods = built.methods
    base_name = base.name if base else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / "report.md", out / "report.csv"
    methods_path = out / "report_methods.csv"
    if not runs:
        md_path.write_text(f"# Results\n\nNo runs found under {', '.join(map(str, paths))}.\n")
    else:
        md_path.write_text(to_markdown(rows, benchmarks, base_name, methods, built.scores))
    for path, fields, table in (
        (csv_path, CSV_FIELDS, to_csv_rows(rows, base_name)),
        (methods_path, METHOD_CSV_FIELDS, methods_csv_rows(methods)),
    ):
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
    return [md_path, csv_path, methods_path]


def main(argv: list[str] | None = None, prog: str = "python -m experiments.report") -> int:
    """``python -m experiments.report PATH [PATH ...] [--baseline RUN] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="*", default=["runs"], help="runs or directories of runs")
    parser.add_argument(
        "--baseline",
        help="stage (all its seeds' runs) or run to compare against "
        "(default: the experiment's, from its pipeline.json, else the SFT stage with the most "
        "optimizer steps)",
    )
    parser.add_argument("--out", help="where to write report.md/.csv (default: the first path)")
    args = parser.parse_args(argv)
    out = args.out or args.paths[0]
    for path in args.paths:
        if not Path(path).exists():
            raise FileNotFoundError(
                f"{path}: no such run or directory of runs; give the "
                "run directories to report (default: runs)"
            )
    if not discover_runs(args.paths):
        print(f"no runs found under {', '.join(args.paths)}", file=sys.stderr)
        return 1
    md_path, *tables = write_report(args.paths, out, args.baseline)
    print(md_path.read_text())
    print(f"written: {md_path}, {', '.join(map(str, tables))}")
    return 0


if __name__ == "__main__":
    from experiments.errors import run_command

    sys.exit(run_command(main))
