"""The same seed gives the same experiment, bit for bit; another seed gives another (issue 13,
part 5).

An experiment here is a one-stage pipeline (a 2-round GSIL run on a tiny model, then its
evaluation on held-out reasoning items): run once in this process (torch on 1 thread, see
conftest.py) and once as a fresh ``python -m experiments.run`` process with torch's default
thread count, their weights, generated sets, reference log-probs, metrics, summaries and result
files (timings aside) must be equal. With ``--seed 1`` the data order differs, so the weights
and the training curve must differ. What may still vary across machines is in README.md
("Reproducibility").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import doubling_experiment, save_doubling_inputs

import experiments.run

ROOT = Path(__file__).resolve().parent.parent
TIMING = re.compile(r"seconds|wall_s$")
ROUNDS = (0, 1)


# runs are compared bit for bit: on the CPU only (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_only")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    model_dir, data = save_doubling_inputs(root)
    path = root / "exp.json"
    experiment = doubling_experiment(model_dir, data, checkpoint_every=0, precision="auto")
    path.write_text(json.dumps(experiment))
    return path


@pytest.fixture(scope="module")
def in_process(recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a")
    experiments.run.main(["--config", str(recipe), "--output-dir", str(out)])
    return out / "exp"


def strip(value, root: Path):
    """A JSON value without timings, with the experiment's directory made generic."""
    if isinstance(value, dict):
        return {k: strip(v, root) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [strip(v, root) for v in value]
    return value.replace(str(root), "<root>") if isinstance(value, str) else value


def read(path: Path, root: Path):
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [strip(json.loads(line), root) for line in text.splitlines()]
    return strip(json.loads(text), root)


def outputs(root: Path) -> dict[str, object]:
    """Everything the experiment produced that a seed determines, by relative path."""
    run = root / "gsil"
    found: dict[str, object] = {}
    for index in ROUNDS:
        for name in ("model/model.safetensors", "reference_logps.pt"):
            found[f"round_{index}/{name}"] = (run / f"round_{index}" / name).read_bytes()
        for name in ("generated.jsonl", "summary.json"):
            found[f"round_{index}/{name}"] = read(run / f"round_{index}" / name, root)
    for name in ("metrics.jsonl", "summary.json"):
        found[name] = read(run / name, root)
    for name in ("reasoning.json", "reasoning.records.jsonl", "summary.json"):
        found[f"eval/{name}"] = read(run / "round_1" / "eval" / name, root)
    return found


def test_the_same_seed_gives_identical_results_across_processes(recipe, in_process, tmp_path):
    """A fresh process (torch's default threads, here every core) repeats this process's
    experiment (1 thread) exactly: weights bit for bit, generated sets, result files."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "--config",
            str(recipe),
            "--output-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = outputs(in_process), outputs(tmp_path / "exp")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], f"{key} differs between two runs of the same seed"


def test_another_seed_gives_other_weights(recipe, in_process, tmp_path):
    experiments.run.main(["--config", str(recipe), "--output-dir", str(tmp_path), "--seed", "1"])
    ours, theirs = outputs(in_process), outputs(tmp_path / "exp")
    for index in ROUNDS:
        weights = f"round_{index}/model/model.safetensors"
        assert ours[weights] != theirs[weights]
    losses = [[row["loss"] for row in found["metrics.jsonl"]] for found in (ours, theirs)]
    assert losses[0] != losses[1]  # another data order: another training curve
    assert ours["round_1/generated.jsonl"] != theirs["round_1/generated.jsonl"]
