"""paper_figs.fig_experiments draws every run, from the numbers the report states.

The synthetic experiment mirrors ``make run``'s: an SFT parent, then continued SFT, SPIN,
GSIL-logistic and DFT over 3 seeds each started from it (13 runs), evaluated on 200 items.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from scipy import stats
from test_report import N, make_run

from experiments import report
from gsil.evaluation.results import proportion_interval
from gsil.io import write_json

# items right of 200, per seed 0, 1, 2 (on top of the baseline's first items)
PARENT_RIGHT = 18
BASELINE_RIGHT = [16, 20, 24]
EXTRA_RIGHT = {"spin": [0, 0, 30], "gsil-logistic": [2, 4, 6], "dft": [-10, -12, -14]}
STAGES = ["sft-continued", "dft", "gsil-logistic", "spin"]  # the baseline first, then by name


def make_llm_experiment(root: Path, parent_evaluated: bool = True) -> Path:
    """``sft`` (3 rounds: more optimizer steps than any other SFT run), and from its last
    model ``<stage>-seed<s>`` for every stage and seed 0-2; ``pipeline.json`` names the
    baseline, ``sft-continued``, as the pipeline writes it."""
    parent = make_run(root, "sft", "sft", [1] * PARENT_RIGHT + [0] * (N - PARENT_RIGHT), rounds=3)
    if not parent_evaluated:
        for path in (parent / "round_2" / "eval").iterdir():
            path.unlink()
    start = str(parent / "round_2" / "model")
    for s in range(3):
        base = BASELINE_RIGHT[s]
        make_run(
            root,
            f"sft-continued-seed{s}",
            "sft",
            [1] * base + [0] * (N - base),
            seed=s,
            model=start,
        )
        for stage, extra in EXTRA_RIGHT.items():
            right = base + extra[s]
            method, loss = (stage.split("-") + ["logistic"])[:2]
            make_run(
                root,
                f"{stage}-seed{s}",
                method,
                [1] * right + [0] * (N - right),
                seed=s,
                loss=loss,
                model=start,
            )
    write_json(root / "pipeline.json", {"evaluation": {"baseline": "sft-continued"}})
    return root


def _table(text: str, heading: str) -> dict[tuple[str, str], list[str]]:
    """The first markdown table under ``heading``: (first cell, second cell) -> cells."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = {}
    for line in lines[start + 2 : end]:  # past the header and its rule
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[(cells[0], cells[1])] = cells
    return table


def _drawn(tmp_path: Path, root: Path) -> dict:
    from paper_figs.fig_experiments import draw

    paths = draw(tmp_path / "figs", runs_dir=root)
    assert sorted(p.name for p in paths) == [
        "experiments_scores.pdf",
        "experiments_scores.png",
        "experiments_training.pdf",
        "experiments_training.png",
    ]
    return json.loads((tmp_path / "figs" / "experiments.json").read_text())


def test_the_figure_draws_every_run_with_the_reports_seeds_and_numbers(tmp_path):
    root = make_llm_experiment(tmp_path / "default")
    figure = _drawn(tmp_path, root)
    md_path, _, methods_path = report.write_report([root], root)  # baseline: pipeline.json's
    panel = figure["scores"]["reasoning"]

    # the report's scores table: the same stages, seeds and numbers, as printed
    scores = _table(md_path.read_text(), "## Scores per stage")
    drawn = panel["stages"] + panel["starts"]
    assert sorted(key[0] for key in scores) == sorted(s["method"] for s in drawn)
    for stage in drawn:
        cells = scores[(stage["method"], "reasoning (%)")]
        seeds = ", ".join(str(s["seed"]) for s in stage["seeds"])
        assert cells[3] == f"{seeds} ({len(stage['seeds'])})"
        assert cells[4] == ", ".join(f"{100 * s['score']:.1f}" for s in stage["seeds"])
        low, high = stage["interval"]
        assert cells[5] == f"{100 * stage['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
        assert 0 <= low <= stage["mean"] <= high <= 1
    # the differences: the report's methods CSV, seed by seed
    methods = {r["method"]: r for r in csv.DictReader(methods_path.open())}
    assert [d["method"] for d in panel["differences"]] == [
        m for m in methods if m not in {s["method"] for s in panel["starts"]}
    ]
    for diff in panel["differences"]:
        row = methods[diff["method"]]
        assert row["baseline"] == panel["baseline"]
        assert row["seeds"] == " ".join(map(str, diff["seeds"]))
        assert [float(d) for d in row["differences"].split()] == diff["differences"]
        assert diff["mean_difference"] == pytest.approx(float(row["mean_difference"]))
        assert diff["interval"] == pytest.approx(
            [float(row["across_low"]), float(row["across_high"])]
        )

    # and what both should say, by hand: every run, every seed
    assert len(figure["runs"]) == 13
    assert set(figure["training"]["rewards/margins"]) == {
        r.name for r in report.discover_runs([root])
    }
    assert [s["method"] for s in panel["stages"]] == STAGES  # a category per stage
    assert [s["method"] for s in panel["starts"]] == ["sft"]  # the parent: a reference line
    assert scores[("spin", "reasoning (%)")][2] == "sft"  # started from the parent
    assert panel["baseline"] == "sft-continued"  # pipeline.json's, not the parent (more steps)
    assert all([s["seed"] for s in stage["seeds"]] == [0, 1, 2] for stage in panel["stages"])
    assert all(d["seeds"] == [0, 1, 2] for d in panel["differences"])
    # spin's seeds score 16, 20, 54 of 200
    spin = next(s for s in panel["stages"] if s["method"] == "spin")
    assert [s["score"] for s in spin["seeds"]] == [0.08, 0.10, 0.27]
    assert spin["mean"] == pytest.approx(0.15)
    # the Student-t interval across these seeds runs below 0; the figure's stays on scale
    t_low = 0.15 - stats.t.ppf(0.975, 2) * stats.sem([0.08, 0.10, 0.27])
    assert t_low < 0 < spin["interval"][0] < 0.15 < spin["interval"][1] < 1
    dft = next(d for d in panel["differences"] if d["method"] == "dft")
    assert dft["differences"] == [-0.05, -0.06, -0.07]  # 10, 12, 14 of 200 fewer


def test_the_parent_is_a_reference_line_with_its_wilson_interval(tmp_path):
    figure = _drawn(tmp_path, make_llm_experiment(tmp_path / "default"))
    (start,) = figure["scores"]["reasoning"]["starts"]
    assert start["mean"] == pytest.approx(PARENT_RIGHT / N)
    assert start["interval"] == pytest.approx(proportion_interval(PARENT_RIGHT, N))


def test_an_unevaluated_parent_is_named_not_drawn(tmp_path):
    figure = _drawn(
        tmp_path / "a", make_llm_experiment(tmp_path / "default", parent_evaluated=False)
    )
    panel = figure["scores"]["reasoning"]
    assert panel["starts"] == [] and panel["unevaluated_starts"] == ["sft"]
    assert [s["method"] for s in panel["stages"]] == STAGES


def test_drawn_from_the_directory_above_the_experiment(tmp_path):
    # `python -m paper_figs` reads runs/, the experiment is runs/default: names gain default/
    make_llm_experiment(tmp_path / "runs" / "default")
    panel = _drawn(tmp_path, tmp_path / "runs")["scores"]["reasoning"]
    assert panel["baseline"] == "default/sft-continued"
    assert [s["method"] for s in panel["starts"]] == ["default/sft"]
    assert len(panel["differences"]) == 3


def test_seeds_score_interval_is_wilsons_at_the_effective_sample_size():
    t = stats.t.ppf(0.975, 3)
    level = 2 * stats.norm.cdf(t) - 1  # Wilson's interval with z = t(0.975, 3 df)

    def wilson(right, n, confidence=0.95):
        ci = stats.binomtest(right, n).proportion_ci(confidence_level=confidence, method="wilson")
        return (ci.low, ci.high)

    # one seed: the run's own Wilson interval
    assert report.seeds_score_interval([0.4], [200]) == pytest.approx(wilson(80, 200))
    # 4 seeds of 200 items, scores 0.45/0.55: mean 0.5, variance of the mean 0.01/12, so the
    # effective sample size is 0.25 / (0.01 / 12) = 300 (< 800 items)
    spread = report.seeds_score_interval([0.45, 0.55, 0.45, 0.55], [200] * 4)
    assert spread == pytest.approx(wilson(150, 300, level))
    # no spread over seeds: the binomial variance of all 800 items
    same = report.seeds_score_interval([0.5] * 4, [200] * 4)
    assert same == pytest.approx(wilson(400, 800, level))
    # on scale whatever the spread: a rating of 1-10 (MT-Bench) too
    for scores, bounds in (([0.0, 0.0, 0.3], (0, 1)), ([1.0, 1.2, 9.5], (1, 10))):
        low, high = report.seeds_score_interval(scores, [80] * 3, bounds)
        assert bounds[0] <= low < sum(scores) / 3 < high <= bounds[1]
    assert report.seeds_score_interval([0.0, 0.0], [2, 2])[0] == 0.0  # exactly, not 1e-17
    assert report.seeds_score_interval([1.0, 1.0, 1.0], [2, 2, 2])[1] == 1.0
    with pytest.raises(ValueError, match="one item count per score"):
        report.seeds_score_interval([0.1, 0.2], [10])


def test_one_colour_per_stage():
    from paper_figs.fig_experiments import stage_colors

    groups = [
        report.RunGroup(name, [_FakeRun(method)])
        for name, method in [
            ("sft", "sft"),
            ("sft-continued", "sft"),
            ("spin", "spin"),
            ("gsil-logistic", "gsil-logistic"),
            ("dft", "dft"),
        ]
    ]
    colors = stage_colors(groups)
    assert len(set(colors.values())) == len(groups)


class _FakeRun:
    def __init__(self, method: str) -> None:
        self.method = method


def test_the_scores_table_prints_ratings_as_they_are():
    summary = {
        "method": "spin",
        "benchmark": "mtbench",
        "starts_from": "sft",
        "seeds": [{"seed": 0, "score": 6.25}],
        "mean": 6.25,
        "interval": [5.5, 7.0],
        "bounds": [1.0, 10.0],
    }
    (line,) = [row for row in report._scores_table([summary]) if row.startswith("| spin")]
    assert "| mtbench | sft | 0 (1) | 6.25 | 6.25 [5.50, 7.00] |" in line
