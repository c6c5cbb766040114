"""Crash anywhere, lose nothing (issue 13, part 1).

A run is killed with SIGKILL -- no exception, no ``finally`` -- at each phase
(:data:`gsil.faults.KILL_POINTS`: the test hook ``GSIL_TEST_KILL_AT``), then resumed (``--resume``,
or the same pipeline or sweep command again). The result must equal an uninterrupted run's:
every round's weights bit for bit, the generated sets, metrics rows and summaries (timings
aside) and the evaluation's result files, with no temporary, staging or duplicated file left.

One uninterrupted experiment (a one-stage pipeline: a 2-round GSIL run, then its evaluation,
report and figures) is the reference for every phase. The killed attempts run in forked
children of this process (the imports are done once; a fork is killed for real) and one in a
fresh ``python -m experiments.run`` process; resumes run in-process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from tiny import doubling_experiment, save_doubling_inputs

import experiments.run
from experiments import sweep
from gsil.faults import ENV

ROOT = Path(__file__).resolve().parent.parent
# every file a write leaves behind when it is interrupted (gsil.io, save_model, checkpoints)
LEFTOVER = re.compile(r"\.tmp|staging|\.old-")
TIMING = re.compile(r"seconds|wall_s$")


# runs are compared bit for bit: on the CPU only (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_only")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_doubling_inputs(tmp_path_factory.mktemp("inputs"))


def run_args(inputs, out: Path, name: str = "gsil", *extra: str) -> list[str]:
    """A 2-round GSIL run: 3 optimizer steps per round, a checkpoint every 2."""
    model_dir, data = inputs
    return [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--num-demos",
        "6",
        "--rounds",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--max-prompt-length",
        "64",
        "--max-length",
        "96",
        "--gen-batch-size",
        "4",
        "--lr",
        "1e-2",
        "--checkpoint-every",
        "2",
        "--precision",
        "fp32",
        "--output-dir",
        str(out),
        "--name",
        name,
        *extra,
    ]


def write_recipe(inputs, path: Path) -> Path:
    """The reference experiment: the run of :func:`run_args` as a stage, evaluated."""
    model_dir, data = inputs
    path.write_text(json.dumps(doubling_experiment(model_dir, data)))
    return path


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The uninterrupted experiment's directory (its stage is the run ``gsil``)."""
    out = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(inputs, out / "exp.json")
    experiments.run.main(["--config", str(recipe), "--output-dir", str(out)])
    return out / "exp"


def _child(main, argv: list[str], kill_at: str) -> None:
    os.environ[ENV] = kill_at
    try:
        main(argv)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)  # not killed: the test sees 0 instead of -SIGKILL


def killed(main, argv: list[str], kill_at: str) -> None:
    """Run ``main(argv)`` in a forked child that SIGKILLs itself at ``kill_at``."""
    child = multiprocessing.get_context("fork").Process(target=_child, args=(main, argv, kill_at))
    child.start()
    child.join(timeout=300)
    if child.is_alive():
        child.kill()
        pytest.fail(f"the run meant to die at {kill_at} hung")
    assert child.exitcode == -signal.SIGKILL, f"not killed at {kill_at} (exit {child.exitcode})"


def strip(value, run_dir: Path | None = None):
    """A JSON value without timings (and with the run directory's path made generic)."""
    if isinstance(value, dict):
        return {k: strip(v, run_dir) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [strip(v, run_dir) for v in value]
    if isinstance(value, str) and run_dir is not None:
        return value.replace(str(run_dir), "<run>")
    return value


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Bitwise weights of every round, the same generated sets, reference log-probs, metrics
    and summaries (timings aside), and nothing left behind by the interrupted attempt."""
    for round_index in (0, 1):
        ours, theirs = run_dir / f"round_{round_index}", reference_dir / f"round_{round_index}"
        weights = "model/model.safetensors"
        assert (ours / weights).read_bytes() == (theirs / weights).read_bytes(), round_index
        assert read_jsonl(ours / "generated.jsonl") == read_jsonl(theirs / "generated.jsonl")
        assert (ours / "reference_logps.pt").read_bytes() == (
            theirs / "reference_logps.pt"
        ).read_bytes()
        assert strip(json.loads((ours / "summary.json").read_text())) == strip(
            json.loads((theirs / "summary.json").read_text())
        )
    rows = [strip(row) for row in read_jsonl(run_dir / "metrics.jsonl")]
    assert rows == [strip(row) for row in read_jsonl(reference_dir / "metrics.jsonl")]
    assert [row["step"] for row in rows] == list(range(1, 7))  # each step once
    summary = strip(json.loads((run_dir / "summary.json").read_text()), run_dir)
    assert summary == strip(json.loads((reference_dir / "summary.json").read_text()), reference_dir)
    assert_nothing_left(run_dir)


def assert_nothing_left(directory: Path) -> None:
    left = [p for p in directory.rglob("*") if LEFTOVER.search(p.name)]
    assert left == [], f"left behind: {left}"
    assert not (directory / "checkpoint").exists()


@pytest.mark.parametrize(
    "kill_at",
    [
        "mid_generation:2",  # round 0's second batch generated, its set not yet written
        "generation:2",  # round 1's set written (round 0 finished): resume reuses it
        "reference:1",  # round 0, after the reference pass's first batch
        "training:4",  # round 1 after its first step (no checkpoint of round 1 yet)
        "save_model:1",  # round 0's model in its temporary directory, not renamed
    ],
)
def test_a_run_killed_at_any_phase_resumes_to_the_same_result(kill_at, inputs, reference, tmp_path):
    argv = run_args(inputs, tmp_path)
    killed(experiments.run.main, argv, kill_at)
    assert not (tmp_path / "gsil" / "summary.json").exists()
    experiments.run.main([*argv, "--resume"])
    assert_same_run(tmp_path / "gsil", reference / "gsil")


def test_a_real_process_killed_while_training(inputs, reference, tmp_path):
    """``python -m experiments.run`` killed after round 0's third step (its checkpoint is at
    step 2): the resume restarts from the checkpoint and drops the logged third step."""
    argv = run_args(inputs, tmp_path)
    env = {**os.environ, ENV: "training:3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = tmp_path / "gsil"
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert (
        json.loads((run_dir / "checkpoint" / "trainer_state.json").read_text())["step_in_round"]
        == 2
    )
    experiments.run.main([*argv, "--resume"])
    assert_same_run(run_dir, reference / "gsil")


def test_an_experiment_killed_while_evaluating(inputs, reference, tmp_path):
    """The pipeline dies after writing a benchmark's result, before recording the request:
    running it again skips the finished training, redoes that evaluation, writes the report."""
    recipe = write_recipe(inputs, tmp_path / "exp.json")
    argv = ["--config", str(recipe), "--output-dir", str(tmp_path)]
    killed(experiments.run.main, argv, "evaluation:1")
    root = tmp_path / "exp"
    assert (root / "gsil" / "summary.json").exists() and not (root / "report.md").exists()
    outcome = experiments.run.main(argv)
    assert outcome["stages"]["gsil"]["status"] == "skipped"
    eval_dir, reference_eval = root / "gsil" / "round_1" / "eval", reference / "gsil/round_1/eval"
    for name in ("reasoning.json", "summary.json", "request.json"):
        ours, theirs = (
            json.loads((eval_dir / name).read_text()),
            json.loads((reference_eval / name).read_text()),
        )
        assert strip(ours, root) == strip(theirs, reference), name
    records = "reasoning.records.jsonl"
    assert read_jsonl(eval_dir / records) == read_jsonl(reference_eval / records)
    assert (root / "report.md").read_text() == (reference / "report.md").read_text()
    assert_same_run(root / "gsil", reference / "gsil")
    assert_nothing_left(root)


def test_a_sweep_killed_between_runs_and_inside_one(inputs, reference, tmp_path):
    """Killed after its first run, then inside its second run's training: each rerun of the
    same command skips what is finished and resumes what is not; both runs equal
    uninterrupted ones (the first is the reference run, seed 0)."""
    argv = ["--sweep", "seed=0,1", *run_args(inputs, tmp_path, "s")]
    killed(sweep.main, argv, "sweep:1")
    sweep_dir = tmp_path / "sweep-s"
    assert (sweep_dir / "seed-0" / "summary.json").exists()
    assert not (sweep_dir / "seed-1").exists() and not (sweep_dir / "sweep.json").exists()
    killed(sweep.main, argv, "training:2")  # seed 1, round 0, after its checkpoint at step 2
    assert (sweep_dir / "seed-1" / "checkpoint").exists()
    done = sweep.main(argv)
    assert [d["status"] for d in done] == ["skipped", "resumed"]
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["seed-0", "seed-1", "sweep.json"]
    assert_same_run(sweep_dir / "seed-0", reference / "gsil")
    experiments.run.main(run_args(inputs, tmp_path / "uninterrupted", "seed1", "--seed", "1"))
    assert_same_run(sweep_dir / "seed-1", tmp_path / "uninterrupted" / "seed1")
