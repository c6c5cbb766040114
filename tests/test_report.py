"""experiments.report and paper_figs.fig_experiments on synthetic run directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from experiments import report
from gsil.evaluation.results import BenchmarkResult, proportion_interval, write_result
from gsil.io import write_json

N = 200


def make_run(root: Path, name: str, method: str, scores: list[int], rounds: int = 2, **cfg):
    """A finished run with metrics and a reasoning evaluation of its last round."""
    run = root / name
    write_json(run / "config.json", {"method": method, "loss": cfg.get("loss", "logistic")})
    round_summaries = [
        {"round": r, "global_step": 4 * (r + 1), "ties": 3 + r} for r in range(rounds)
    ]
    write_json(run / "summary.json", {"rounds": round_summaries})
    rows = [
        {"round": s // 4, "step": s + 1, "rewards/margins": 0.1 * s, "logps/chosen": -50 + s}
        for s in range(4 * rounds)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = [{"id": f"item{i}", "prompt": "p", "completion": "c", "score": float(s)}
               for i, s in enumerate(scores)]  # fmt: skip
    correct = sum(scores)
    result = BenchmarkResult("reasoning", "accuracy", correct / N, N,
                             list(proportion_interval(correct, N)), "wilson")  # fmt: skip
    write_result(result, records, run / f"round_{rounds - 1}" / "eval")
    (run / f"round_{rounds - 1}" / "model").mkdir()
    write_json(run / f"round_{rounds - 1}" / "model" / "config.json", {"model_type": "llama"})
    return run


def make_experiment(root: Path) -> Path:
    base = [1] * 80 + [0] * 120
    make_run(root, "sft-continued", "sft", base)
    make_run(root, "spin", "spin", base)  # the same answers: no difference
    make_run(root, "gsil-logistic", "gsil", [1] * 130 + [0] * 70)  # +25 points, paired
    return root


def test_report_table_intervals_and_paired_differences(tmp_path):
    root = make_experiment(tmp_path / "exp")
    md_path, csv_path = report.write_report([root], root, baseline="sft-continued")
    text = md_path.read_text()
    assert "| sft-continued (round 1) | sft | 8 | 3, 4 | 40.0 [" in text
    assert "baseline" in text
    lines = {line.split(" vs ")[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert "no difference resolved" in lines["- spin"]
    assert "higher than sft-continued" in lines["- gsil-logistic"]
    assert "+25.0 [" in lines["- gsil-logistic"]
    rows = {r["run"]: r for r in csv.DictReader(csv_path.open())}
    assert set(rows) == {"sft-continued", "spin", "gsil-logistic"}
    assert float(rows["gsil-logistic"]["difference"]) == 0.25
    assert float(rows["gsil-logistic"]["diff_low"]) > 0
    assert float(rows["spin"]["difference"]) == 0.0
    assert rows["gsil-logistic"]["method"] == "gsil-logistic"
    assert float(rows["spin"]["mcnemar_p"]) == 1.0


def test_baseline_defaults_to_longest_sft_run_and_model_dirs_are_not_runs(tmp_path):
    root = make_experiment(tmp_path / "exp")
    make_run(root, "sft", "sft", [0] * N, rounds=1)
    runs = report.discover_runs([root])
    assert sorted(r.name for r in runs) == ["gsil-logistic", "sft", "sft-continued", "spin"]
    assert report.pick_baseline(runs, None).name == "sft-continued"


def test_report_cli_without_runs_fails_with_a_message(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no runs found" in capsys.readouterr().err


def test_experiment_figures(tmp_path, capsys):
    from paper_figs import figure_names
    from paper_figs.fig_experiments import draw

    assert "experiments" in figure_names()
    assert draw(tmp_path / "figs", runs_dir=tmp_path / "empty") == []
    assert "no runs" in capsys.readouterr().out
    root = make_experiment(tmp_path / "exp")
    paths = draw(tmp_path / "figs", runs_dir=root)
    names = sorted(p.name for p in paths)
    assert names == ["experiments_scores.pdf", "experiments_scores.png",
                     "experiments_training.pdf", "experiments_training.png"]  # fmt: skip
    assert all(p.stat().st_size > 0 for p in paths)
    numbers = json.loads((tmp_path / "figs" / "experiments.json").read_text())
    assert numbers["scores"]["reasoning"]["gsil-logistic"][0][0] == 2  # after 2 rounds
