"""experiments.report and paper_figs.fig_experiments on synthetic run directories."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments import report
from gsil.evaluation.results import BenchmarkResult, proportion_interval, write_result
from gsil.io import write_json

N = 200


def make_run(root: Path, name: str, method: str, scores: list[int], rounds: int = 2, **cfg):
    """A finished run with metrics and a reasoning evaluation of its last round."""
    run = root / name
    config = {"method": method, "loss": cfg.get("loss", "logistic"), "seed": cfg.get("seed", 0)}
    if method == "dft":  # DFT samples its negatives (greedy DFT is refused)
        config["do_sample"] = True
    write_json(run / "config.json", config | ({"model": cfg["model"]} if "model" in cfg else {}))
    round_summaries = [
        {"round": r, "global_step": 4 * (r + 1), "ties": 3 + r} for r in range(rounds)
    ]
    write_json(run / "summary.json", {"rounds": round_summaries})
    rows = [
        {"round": s // 4, "step": s + 1, "rewards/margins": 0.1 * s, "logps/chosen": -50 + s}
        for s in range(4 * rounds)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = [
        {"id": f"item{i}", "prompt": "p", "completion": "c", "score": float(s)}
        for i, s in enumerate(scores)
    ]
    correct = sum(scores)
    result = BenchmarkResult(
        "reasoning", "accuracy", correct / N, N, list(proportion_interval(correct, N)), "wilson"
    )
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
    md_path, csv_path, _ = report.write_report([root], root, baseline="sft-continued")
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
    assert names == [
        "experiments_scores.pdf",
        "experiments_scores.png",
        "experiments_training.pdf",
        "experiments_training.png",
    ]
    assert all(p.stat().st_size > 0 for p in paths)
    numbers = json.loads((tmp_path / "figs" / "experiments.json").read_text())
    panel = numbers["scores"]["reasoning"]
    assert [s["method"] for s in panel["stages"]] == ["sft-continued", "gsil-logistic", "spin"]
    gsil = panel["stages"][1]
    assert [(s["score"], s["round"]) for s in gsil["seeds"]] == [(0.65, 1)]  # after 2 rounds
    assert gsil["interval"] == pytest.approx(proportion_interval(130, N))  # one run: its Wilson
    assert panel["differences"][0]["differences"] == [0.25]
    assert panel["differences"][0]["interval_kind"] == "paired bootstrap"


def make_seeded_experiment(root: Path, extra: dict[str, list[int]]) -> Path:
    """``sft-continued-seed<s>`` (70 + 10 s of 200 items right) and, per method, runs
    ``<method>-seed<s>`` right on those items and ``extra[method][i]`` more (seed i)."""
    for s in range(3):
        base = [1] * (70 + 10 * s) + [0] * (130 - 10 * s)
        make_run(root, f"sft-continued-seed{s}", "sft", base, seed=s)
        for method, more in extra.items():
            scores = [1] * (70 + 10 * s + more[s]) + [0] * (130 - 10 * s - more[s])
            make_run(root, f"{method}-seed{s}", method, scores, seed=s)
    return root


def test_seeds_per_seed_rows_interval_across_seeds_pooled_test_and_mde(tmp_path):
    from gsil.evaluation.results import minimal_detectable_difference

    # spin: +2, +5, +8 points (of 200 items) over the seeds; gsil: +9, +10, +11
    root = make_seeded_experiment(tmp_path / "exp", {"spin": [4, 10, 16], "gsil": [18, 20, 22]})
    md_path, csv_path, methods_path = report.write_report([root], root)  # default baseline
    text = md_path.read_text()
    for s in range(3):
        assert f"| spin-seed{s} (round 1) | spin |" in text
    # each seed is compared with the baseline's run of the same seed
    rows = {r["run"]: r for r in csv.DictReader(csv_path.open())}
    assert [float(rows[f"spin-seed{s}"]["difference"]) for s in range(3)] == [0.02, 0.05, 0.08]
    assert rows["spin-seed1"]["stage"] == "spin" and rows["spin-seed1"]["seed"] == "1"
    assert rows["sft-continued-seed2"]["baseline"] == ""  # the baseline itself

    methods = {r["method"]: r for r in csv.DictReader(methods_path.open())}
    assert set(methods) == {"spin", "gsil"} and methods["spin"]["baseline"] == "sft-continued"
    spin = methods["spin"]
    assert spin["seeds"] == "0 1 2" and spin["scores"] == "0.37 0.45 0.53"
    # by hand: mean 0.05, sd 0.03, t(0.975, df 2) = 4.303 from a t table
    half = 4.303 * 0.03 / math.sqrt(3)
    assert float(spin["mean_difference"]) == pytest.approx(0.05)
    assert float(spin["across_low"]) == pytest.approx(0.05 - half, abs=1e-4)
    assert float(spin["across_high"]) == pytest.approx(0.05 + half, abs=1e-4)
    # pooled over 600 items: 30 right only for spin, none only for the baseline
    assert int(spin["pooled_n"]) == 600
    assert float(spin["pooled_difference"]) == pytest.approx(0.05)
    assert float(spin["pooled_low"]) > 0
    assert float(spin["mcnemar_p"]) == pytest.approx(2 * 0.5**30)
    assert float(spin["discordance"]) == pytest.approx(30 / 600)
    assert float(spin["mde"]) == pytest.approx(minimal_detectable_difference(600, 0.05))
    gsil = methods["gsil"]
    half = 4.303 * 0.01 / math.sqrt(3)
    assert float(gsil["across_low"]) == pytest.approx(0.10 - half, abs=1e-4)

    # the verdict follows the interval across seeds, not the pooled item-level test
    assert "no difference resolved across 3 seeds" in spin["verdict"]
    assert "no difference is claimed" in spin["verdict"]
    assert gsil["verdict"].startswith("higher than sft-continued across 3 seeds")
    lines = {line.split(" vs ")[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert "(3 seeds, pooled n=600)" in lines["- spin"]
    assert "higher than" not in lines["- spin"]
    assert "higher than sft-continued across 3 seeds" in lines["- gsil"]
    table = next(line for line in text.splitlines() if line.startswith("| spin | reasoning |"))
    assert "| 0, 1, 2 (3) | 37.0, 45.0, 53.0 | +2.0, +5.0, +8.0 | +5.0 [-2.5, +12.5] |" in table
    assert "(n=600)" in table and "pts (n=600, discordance 0.05)" in table


def test_a_baseline_seed_missing_leaves_that_seed_out(tmp_path):
    root = make_seeded_experiment(tmp_path / "exp", {"spin": [4, 10, 16]})
    make_run(root, "spin-seed7", "spin", [1] * 90 + [0] * 110, seed=7)  # no sft-continued-seed7
    runs = report.discover_runs([root])
    groups = {g.name: g for g in report.group_runs(runs)}
    assert sorted(r.name for r in groups["spin"].runs) == [f"spin-seed{s}" for s in (0, 1, 2, 7)]
    baseline = report.pick_baseline(runs, "sft-continued")
    assert baseline.repeated and len(baseline.runs) == 3
    rows = report.build_rows(runs, baseline)
    (methods,) = report.summarize_methods([groups["spin"]], baseline, rows, ["reasoning"])
    assert [s["seed"] for s in methods["seeds"]] == [0, 1, 2]
    assert methods["pooled"]["n"] == 600


def test_experiment_figures_draw_seeds_and_their_mean(tmp_path):
    from paper_figs.fig_experiments import draw

    root = make_seeded_experiment(tmp_path / "exp", {"spin": [4, 10, 16]})
    assert len(draw(tmp_path / "figs", runs_dir=root)) == 4
    scores = json.loads((tmp_path / "figs" / "experiments.json").read_text())["scores"]
    reasoning = scores["reasoning"]
    stages = {s["method"]: s for s in reasoning["stages"]}
    assert list(stages) == ["sft-continued", "spin"]
    assert [(s["seed"], s["score"]) for s in stages["spin"]["seeds"]] == [
        (0, 0.37),
        (1, 0.45),
        (2, 0.53),
    ]
    assert stages["spin"]["mean"] == pytest.approx(0.45)
    (diff,) = reasoning["differences"]
    # differences 0.02, 0.05, 0.08: mean 0.05, sd 0.03, t(0.975, df 2) = 4.303
    assert diff["differences"] == [0.02, 0.05, 0.08] and diff["interval_kind"] == "t across seeds"
    assert diff["interval"] == pytest.approx(
        (0.05 - 4.303 * 0.03 / 3**0.5, 0.05 + 4.303 * 0.03 / 3**0.5), abs=1e-4
    )


def test_the_verdict_claims_only_what_its_interval_supports():
    from gsil.evaluation.results import detectable_difference

    def summary(across, pooled, seeds=3):
        return {
            "baseline": "b",
            "seeds": [{}] * seeds,
            "across_interval": across,
            "pooled": {"interval": pooled},
            "mde": detectable_difference(600, discordance=0.2),
        }

    # one seed: the paired interval decides, and seed-to-seed variation is said unmeasured
    one = report.verdict(summary(None, [0.01, 0.05], seeds=1))
    assert one.startswith("higher than b") and "seed-to-seed variation not measured" in one
    none = report.verdict(summary(None, [-0.02, 0.03], seeds=1))
    assert none.startswith("no difference resolved")
    assert "under 5.1 points" in none  # 2.8 sqrt(0.2 / 600)
    # several seeds: the interval across seeds decides, whatever the pooled test says
    assert report.verdict(summary([-0.04, -0.01], [-0.03, 0.01])).startswith(
        "lower than b across 3 seeds"
    )
    assert "pooled item-level interval contains 0" in report.verdict(
        summary([0.01, 0.04], [-0.01, 0.05])
    )
    split = report.verdict(summary([-0.01, 0.09], [0.02, 0.06]))
    assert split.startswith("no difference resolved across 3 seeds") and "higher" not in split
    assert "would likely be missed" not in split  # the pooled test did see it


def test_partial_credit_scores_get_the_paired_z_test_mde(tmp_path):
    from gsil.evaluation.results import paired_detectable_difference

    # reasoning-gym gives partial credit on some tasks (0.5 here): no McNemar test, but the
    # report still gives an MDE, the paired z-test's from the SD of the differences
    root = make_seeded_experiment(tmp_path / "exp", {"spin": [4, 10, 16]})
    for s in range(3):
        records_path = root / f"spin-seed{s}" / "round_1" / "eval" / "reasoning.records.jsonl"
        records = [json.loads(line) for line in records_path.read_text().splitlines()]
        records[-1]["score"] = 0.5  # one item, wrong for both, half right for spin
        records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    md_path, _, methods_path = report.write_report([root], root)
    (spin,) = csv.DictReader(methods_path.open())
    assert spin["mcnemar_p"] == "" and spin["mde"] != ""
    differences = np.concatenate(
        [np.r_[np.ones(more), np.zeros(199 - more), 0.5] for more in (4, 10, 16)]
    )
    expected = paired_detectable_difference(600, float(np.std(differences, ddof=1)))
    assert float(spin["mde"]) == pytest.approx(expected)
    table = next(
        line for line in md_path.read_text().splitlines() if line.startswith("| spin | reasoning |")
    )
    assert "SD of paired differences" in table and "paired z-test" in table


def test_the_report_states_the_evaluation_dtype_and_flags_a_mix(tmp_path):
    root = make_experiment(tmp_path / "exp")
    for name in ("sft-continued", "spin", "gsil-logistic"):
        write_json(
            root / name / "round_1" / "eval" / "request.json",
            {"reasoning": {"limit": 100, "dtype": "float32"}},
        )
    md_path, _, _ = report.write_report([root], root)
    assert "Evaluated in float32 (reasoning; each run's eval/request.json)." in md_path.read_text()
    write_json(
        root / "spin" / "round_1" / "eval" / "request.json",
        {"reasoning": {"limit": 100, "dtype": "bfloat16"}},
    )
    md_path, _, _ = report.write_report([root], root)
    text = md_path.read_text()
    assert "Evaluated in different precisions" in text
    assert "bfloat16: spin:reasoning" in text and "float32: gsil-logistic:reasoning" in text
