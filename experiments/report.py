"""Tables of trained and evaluated runs: ``python -m experiments.report runs/default``.

Finds every run directory under the given paths (a ``config.json`` written by
``experiments.run`` beside ``metrics.jsonl``/``summary.json``), reads the evaluations in
``round_<t>/eval/<benchmark>.json``, and writes ``report.md`` and ``report.csv``: one row per
run (and evaluated round), one column per benchmark with its 95% interval, and the paired
difference against the SFT baseline on the same items (paired bootstrap interval, exact McNemar
p) from :func:`gsil.evaluation.results.compare_results`. Where the paired interval contains 0
the report says that the comparison shows no difference.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.config import RunConfig, load_saved_config
from gsil.evaluation.results import compare_results
from gsil.io import read_json, read_jsonl
from gsil.layout import RunLayout
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
    if path.name in ("summary.json", "request.json"):
        return False
    try:
        data = read_json(path)
    except ValueError:
        return False
    return isinstance(data, dict) and "benchmark" in data and "score" in data


def pick_baseline(runs: Sequence[RunInfo], name: str | None) -> RunInfo | None:
    """The run named ``name`` (its directory name), else the SFT run with the most steps."""
    if name:
        for run in runs:
            if run.name == name or run.path.name == name:
                return run
        raise SystemExit(f"baseline {name!r} is not among the runs: {[r.name for r in runs]}")
    sft = [r for r in runs if r.method == "sft" and r.evals]
    return max(sft, key=lambda r: r.global_steps()) if sft else None


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


def build_rows(runs: Sequence[RunInfo], baseline: RunInfo | None) -> list[dict[str, Any]]:
    """One row per (run, evaluated round) with every benchmark's result and comparison."""
    rows = []
    base_evals = baseline.evals[max(baseline.evals)] if baseline and baseline.evals else {}
    for run in runs:
        for round_index in sorted(run.evals) or [None]:
            results, comparisons = {}, {}
            for bench, path in (run.evals.get(round_index) or {}).items():
                results[bench] = read_json(path)
                if bench in base_evals and base_evals[bench] != path:
                    try:
                        comparisons[bench] = compare_results(path, base_evals[bench])
                    except (ValueError, OSError) as err:
                        comparisons[bench] = {"error": str(err)}
            round_summaries = run.rounds()
            rows.append(
                {
                    "run": run.name,
                    "method": run.method,
                    "round": round_index,
                    "rounds_trained": len(round_summaries),
                    "steps": run.global_steps(),
                    "ties": [r.get("ties") for r in round_summaries if "ties" in r],
                    "finished": run.finished,
                    "is_baseline": run is baseline,
                    "results": results,
                    "comparisons": comparisons,
                }
            )
    return rows


def to_markdown(rows: Sequence[dict[str, Any]], benchmarks: Sequence[str], baseline: str | None):
    """The markdown report: the table, then one line per paired comparison."""
    header = ["run", "method", "steps", "ties/round"] + [f"{b} (%)" for b in benchmarks]
    header += [f"Δ {b} vs {baseline} (pts)" for b in benchmarks] if baseline else []
    lines = [
        "# Results",
        "",
        "Scores in percent with 95% intervals (Wilson); Δ: paired difference against "
        f"{baseline or 'the baseline'} on the same items (paired bootstrap 95% interval, "
        "exact McNemar p).",
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
    findings = _findings(rows, benchmarks, baseline)
    if findings:
        lines += ["", "## Paired comparisons", "", *findings]
    tasks = _task_lines(rows)
    if tasks:
        lines += ["", "## Reasoning tasks", "", *tasks]
    return "\n".join(lines) + "\n"


def _findings(rows, benchmarks, baseline) -> list[str]:
    lines = []
    for row in rows:
        for bench in benchmarks:
            comparison = row["comparisons"].get(bench)
            if not comparison or row["is_baseline"]:
                continue
            if "error" in comparison:
                lines.append(f"- {row['run']} vs {baseline} on {bench}: {comparison['error']}")
                continue
            low, high = comparison["interval"]
            if low <= 0 <= high:
                verdict = "no difference resolved (the interval contains 0)"
            else:
                verdict = "higher" if low > 0 else "lower"
                verdict = f"{verdict} than {baseline} (the interval excludes 0)"
            lines.append(
                f"- {row['run']} vs {baseline} on {bench} (n={comparison['n']}): "
                f"Δ {_fmt_diff(comparison)} (points): {verdict}"
            )
    return lines


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


CSV_FIELDS = ["run", "method", "round", "steps", "ties", "benchmark", "metric", "score", "low",
              "high", "n", "baseline", "difference", "diff_low", "diff_high", "mcnemar_p"]  # fmt: skip


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
                    "run": row["run"], "method": row["method"], "round": row["round"],
                    "steps": row["steps"], "ties": " ".join(map(str, row["ties"])),
                    "benchmark": bench, "metric": result.get("metric"),
                    "score": result.get("score"), "low": low, "high": high, "n": result.get("n"),
                    "baseline": baseline if comparison and "error" not in comparison else None,
                    "difference": comparison.get("difference"), "diff_low": diff_low,
                    "diff_high": diff_high,
                    "mcnemar_p": comparison.get("mcnemar", {}).get("p_value"),
                }
            )  # fmt: skip
    return out


def write_report(
    paths: Sequence[str | Path], out_dir: str | Path, baseline: str | None = None
) -> list[Path]:
    """Write ``report.md`` and ``report.csv`` for the runs under ``paths``; return their paths."""
    runs = discover_runs(paths)
    base = pick_baseline(runs, baseline)
    benchmarks = benchmarks_of(runs)
    rows = build_rows(runs, base)
    base_name = base.name if base else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / "report.md", out / "report.csv"
    if not runs:
        md_path.write_text(f"# Results\n\nNo runs found under {', '.join(map(str, paths))}.\n")
    else:
        md_path.write_text(to_markdown(rows, benchmarks, base_name))
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(to_csv_rows(rows, base_name))
    return [md_path, csv_path]


def main(argv: list[str] | None = None, prog: str = "python -m experiments.report") -> int:
    """``python -m experiments.report PATH [PATH ...] [--baseline RUN] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("paths", nargs="*", default=["runs"], help="runs or directories of runs")
    parser.add_argument("--baseline", help="run name to compare against (default: the SFT run "
                        "with the most optimizer steps)")  # fmt: skip
    parser.add_argument("--out", help="where to write report.md/.csv (default: the first path)")
    args = parser.parse_args(argv)
    out = args.out or args.paths[0]
    if not discover_runs(args.paths):
        print(f"no runs found under {', '.join(args.paths)}", file=sys.stderr)
        return 1
    md_path, csv_path = write_report(args.paths, out, args.baseline)
    print(md_path.read_text())
    print(f"written: {md_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
