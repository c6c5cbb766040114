"""The testbed grid (issue 21): equal rows for every N, the statistics and the power rule, bad
input, the command going through ``run_rounds``, and an interrupted grid resuming."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from analysis.testbed.grid import (
    BASELINE,
    GridSpec,
    build_report,
    dominates,
    empirical_log_probs,
    format_report,
    paired,
    plan_chains,
    round_rows,
)
from experiments.config import read_recipe
from experiments.errors import run_command
from gsil.demonstrations import Demonstration

ROOT = Path(__file__).resolve().parents[1]


def _demos(count: int) -> list[Demonstration]:
    return [
        Demonstration(prompt=f"{i}+1", response=f"Answer: {i + 1}", id=f"d{i}")
        for i in range(count)
    ]


# --------------------------------------------------------------------------- rows and plan


@pytest.mark.parametrize("n", [3, 32, 100])
def test_every_n_gets_the_same_rows_a_round_cycling_through_its_demonstrations(n):
    demos = _demos(n)
    first, second = round_rows(demos, 64, 0), round_rows(demos, 64, 1)
    assert len(first) == len(second) == 64
    ids = [row.id for row in first + second]
    assert len(set(ids)) == 128  # unique ids within a chain
    # row k of the chain is demonstration k mod n: round 1 continues where round 0 stopped
    for k, row in enumerate(first + second):
        assert (row.prompt, row.response) == (demos[k % n].prompt, demos[k % n].response)


def test_the_empirical_distribution_counts_repeated_prompts():
    demos = [
        Demonstration("1+1", "Answer: 2", "a"),
        Demonstration("1+1", "Answer: 2", "b"),
        Demonstration("1+1", "Answer: 3", "c"),
        Demonstration("2+2", "Answer: 4", "d"),
    ]
    assert empirical_log_probs(demos) == pytest.approx(
        [math.log(2 / 3), math.log(2 / 3), math.log(1 / 3), 0.0]
    )


def test_the_plan_pairs_methods_by_seed_and_adds_the_losses_at_one_n():
    spec = GridSpec(ns=(32, 128), seeds=(0, 1), losses=("logistic", "hinge"), loss_n=32)
    chains = plan_chains(spec)
    at = {(c.name, c.n) for c in chains if c.seed == 0}
    assert {(BASELINE, 32), ("spin", 128), ("gsil-logistic", 128), ("dft", 32)} <= at
    assert ("gsil-hinge", 32) in at and ("gsil-hinge", 128) not in at
    assert ("negative-control", 32) in at
    assert ("sdft", 32) in at and ("sdft", 128) not in at  # methods_at_loss_n
    assert ("dynamic-ft", 32) in at and ("dynamic-ft", 128) in at
    assert {c.name for c in chains if c.seed == 0} == {c.name for c in chains if c.seed == 1}
    everywhere = plan_chains(GridSpec(ns=(32, 128), seeds=(0,), loss_n=32, methods=("sdft",)))
    assert {("sdft", 32), ("sdft", 128)} <= {(c.name, c.n) for c in everywhere}


# --------------------------------------------------------------------------- statistics


def test_paired_difference_is_a_t_interval_over_common_seeds():
    values, baseline = {0: 3.0, 1: 5.0, 2: 7.0, 9: 100.0}, {0: 2.0, 1: 3.0, 2: 4.0}
    result = paired(values, baseline)  # differences 1, 2, 3 (seed 9 has no partner)
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd of (1, 2, 3) is 1
    assert result["n"] == 3 and result["mean"] == pytest.approx(2.0)
    assert (result["low"], result["high"]) == pytest.approx((2.0 - half, 2.0 + half))


def test_a_method_beats_sft_only_on_the_whole_frontier():
    sft = [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]
    assert dominates([(0.9, 2.9), (1.9, 1.9), (2.9, 0.9)], sft)
    # better at one temperature (lower forward KL) but not at the high-temperature end
    assert not dominates([(0.5, 3.5), (1.5, 2.5)], sft)
    assert not dominates(sft, sft)  # equal is not better


def _synthetic(ns, shift_by_n, seeds=range(8), rounds=2):
    """Results where continued SFT's forward KL is ``10 - shift_by_n[n]`` plus seed noise."""
    noise = [0.3, -0.2, 0.1, -0.4, 0.25, -0.1, 0.05, 0.0]
    results = {}
    for name, offset in ((BASELINE, 0.0), ("gsil-logistic", -0.5), ("spin", 0.4)):
        for n in ns:
            for seed in seeds:
                kl = 10.0 - shift_by_n[n] + offset + noise[seed] * (1 + 0.3 * (name == "spin"))
                rounds_list = [
                    {"forward_kl": {"mean": kl + 2 - t}, "demo_logp": -20 + t}
                    for t in range(rounds + 1)
                ]
                results.setdefault(name, {}).setdefault(n, {})[seed] = rounds_list
    return results


def test_a_grid_without_power_states_no_verdicts():
    spec = GridSpec(
        ns=(32, 128),
        seeds=tuple(range(8)),
        methods=("continued-sft", "gsil"),
        losses=("logistic",),
        loss_n=32,
    )
    # 4N is no better than N: the positive control is not resolved
    report = build_report(_synthetic((32, 128), {32: 0.0, 128: 0.0}), spec, rounds=2)
    assert report["positive_control"]["has_power"] is False
    assert report["verdicts"] is None
    text = format_report(report)
    assert "no power" in text
    assert "a_sample_efficiency" not in text and "lower forward KL than" not in text


def test_a_grid_with_power_states_its_verdicts():
    spec = GridSpec(
        ns=(32, 128),
        seeds=tuple(range(8)),
        methods=("continued-sft", "gsil"),
        losses=("logistic",),
        loss_n=32,
    )
    report = build_report(_synthetic((32, 128), {32: 0.0, 128: 1.0}), spec, rounds=2)
    assert report["positive_control"]["has_power"] is True
    assert report["positive_control"]["pairs"][0]["difference"]["mean"] == pytest.approx(-1.0)
    verdict = report["verdicts"]["a_sample_efficiency"]
    assert "gsil at N=32: lower forward KL than continued SFT" in verdict
    assert "lower forward KL than" in format_report(report)


def test_a_pair_beyond_the_rows_a_chain_sees_does_not_count():
    """N=128 -> 512 is resolved; 512 -> 2048 is not, but a chain of 1024 rows cannot use up
    2048 demonstrations: that pair is reported, not counted, and the grid has power. Without
    the budget (or with one that covers 2048 rows) the unresolved pair takes the power away."""
    ns = (128, 512, 2048)
    spec = GridSpec(ns=ns, seeds=tuple(range(8)), methods=("continued-sft", "gsil"), loss_n=128)
    results = _synthetic(ns, {128: 0.0, 512: 1.0, 2048: 1.0})
    report = build_report(results, spec, rounds=2, rows_seen=1024)
    control = report["positive_control"]
    assert [p["within_budget"] for p in control["pairs"]] == [True, False]
    assert [p["resolved"] for p in control["pairs"]] == [True, False]
    assert control["has_power"] is True and report["verdicts"] is not None
    assert "not counted: a chain sees 1024 rows" in format_report(report)
    for rows_seen in (None, 2048):
        report = build_report(results, spec, rounds=2, rows_seen=rows_seen)
        assert report["positive_control"]["has_power"] is False, rows_seen
        assert report["verdicts"] is None


# --------------------------------------------------------------------------- the command


def _recipe(tmp_path: Path, **grid) -> str:
    """A micro testbed recipe: 2 seeds, N 4 and 16, two rounds of 2 steps, a 32-wide model."""
    recipe = read_recipe("testbed-quick")[1]
    recipe["grid"].update(
        {
            "ns": [4, 16],
            "seeds": [0, 1],
            "methods": ["sft", "continued-sft", "gsil"],
            "methods_at_loss_n": [],
            "losses": ["logistic"],
            "loss_n": 4,
            "steps_per_round": 2,
            "pool": 16,
            "temperatures": [1.0],
            "test_size": 8,
            "validation_size": 8,
            "policy_samples": 4,
            "negative_shift": 0.0,
            "workers": 1,
            **grid,
        }
    )
    recipe["run"].update({"batch_size": 2, "max_new_tokens": 8, "output_dir": str(tmp_path)})
    recipe["pretrain"] = {"steps": 2, "batch_size": 4, "num_examples": 8, "warmup_steps": 1}
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(recipe))
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ns", "32,4096"], "larger than the pool"),
        (["--seeds", ""], "at least one seed"),
        (["--methods", "sft,ppo"], "unknown ['ppo']"),
        (["--methods-at-loss-n", "rlhf"], "--methods-at-loss-n: unknown ['rlhf']"),
        (["--losses", "logistic,focal"], "unknown ['focal']"),
        (["--lr", "1e-3"], "--lr: the testbed sets it"),
        (["--ns", "a,b"], "--ns: cannot read"),
    ],
)
def test_bad_input_is_one_clear_error_and_status_2(capsys, argv, message):
    from experiments.testbed import main

    assert run_command(main, ["--quick", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_the_testbed_trains_through_run_rounds(tmp_path, monkeypatch):
    """Every round of every chain (and every selection run) is one call of the LLM path's
    ``run_rounds``, counted by a spy that then runs the real thing."""
    import experiments.training
    from experiments.testbed import main

    calls = []
    real = experiments.training.run_rounds

    def spy(*args, **kwargs):
        calls.append((kwargs["objective"] if "objective" in kwargs else args[3]).name)
        return real(*args, **kwargs)

    monkeypatch.setattr(experiments.training, "run_rounds", spy)
    report = main(["--config", _recipe(tmp_path), "--name", "spy"])
    # chains: continued SFT and GSIL at N 4 and 16, for 2 seeds: 8 chains of 2 rounds;
    # selection: continued SFT and GSIL, one lr, beta, seed and round each
    assert len(calls) == 8 * 2 + 2
    assert report["positive_control"]["pairs"][0]["n"] == 4
    assert (tmp_path / "spy" / "report.md").exists()
    from paper_figs.fig_testbed import draw

    figures = draw(tmp_path / "figures", tmp_path / "spy")  # the real report's schema
    assert len(figures) == 10 and all(p.stat().st_size > 1000 for p in figures)
    calls.clear()
    main(["--config", _recipe(tmp_path), "--name", "spy"])  # a rerun trains nothing
    assert calls == []


def test_quick_interrupted_resumes_and_leaves_nothing_half_written(tmp_path):
    """``gsil testbed --quick`` (the command ``make test`` runs), killed in the middle of the
    grid (SIGKILL after an optimizer step), then run again: it finishes where it stopped."""
    command = [
        sys.executable,
        "-m",
        "experiments.testbed",
        "--quick",
        "--output-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "GSIL_TEST_KILL_AT": "training:40"}
    killed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert killed.returncode == 2, killed.stderr[-2000:]  # a worker died: the grid stops
    assert "run the same command again" in killed.stderr
    root = tmp_path / "testbed-quick"
    assert not (root / "report.md").exists()
    env.pop("GSIL_TEST_KILL_AT")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped" in done.stdout  # the rounds finished before the kill were not trained again
    report = json.loads((root / "report.json").read_text())
    assert set(report["results"]["gsil-logistic"]) == {"32", "128"}
    assert set(report["results"]["gsil-hinge"]["32"]) == {"0", "1", "2"}
    left = [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert left == []


def test_the_figures_skip_without_a_report(tmp_path, capsys):
    from paper_figs.fig_testbed import draw

    assert draw(tmp_path / "out", tmp_path / "nothing") == []
    assert "nothing drawn" in capsys.readouterr().out


def test_the_dry_run_prices_the_grid_from_measured_step_costs(tmp_path, capsys):
    from experiments.testbed import main, measured_costs
    from gsil.io import write_json

    timings = [
        {"kind": "sampled", "steps": 4, "training_seconds": 2.0, "seconds": 5.0},
        {"kind": "sampled", "steps": 4, "training_seconds": 1.0, "seconds": 3.0},
        {"kind": "sft", "steps": 4, "training_seconds": 0.4, "seconds": 1.4},
    ]
    costs = measured_costs(timings)
    assert costs["sampled"] == {"step": 0.375, "overhead": 2.5}  # 3 s / 8 steps; (3 + 2) / 2
    assert costs["sft"] == {"step": 0.1, "overhead": 1.0}
    argv = ["--quick", "--dry-run", "--output-dir", str(tmp_path), "--workers", "1"]
    write_json(tmp_path / "testbed-quick" / "timings.json", {"costs": costs})
    plan = main(argv)
    doubled = main([*argv, "--steps-per-round", "8"])
    assert plan["costs_from"].endswith("timings.json")
    # continued SFT and Dynamic FT (no sampling): 3 seeds x 2 N x 2 rounds, and a selection run each
    sft_rounds = 2 * (3 * 2 * 2 + 1)
    sampled_rounds = plan["rounds_trained"] + plan["selection_rounds"] - sft_rounds
    extra = 4 * (sft_rounds * 0.1 + sampled_rounds * 0.375)  # 4 more steps a round
    assert doubled["estimated_seconds"] - plan["estimated_seconds"] == pytest.approx(extra, abs=1)
