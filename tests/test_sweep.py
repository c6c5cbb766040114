"""experiments.sweep: parsing, naming, and an interrupted sweep that finishes only what is
missing (tiny random Llama saved to disk, a handful of reasoning-gym demonstrations)."""

from __future__ import annotations

import json

import pytest

import experiments.run
import experiments.training
from experiments import sweep
from gsil.models import save_model


def test_parse_sweep_converts_to_field_types():
    parsed = sweep.parse_sweep(
        ["loss=logistic,brier", "beta=0.1,1", "seed=0,1,2", "drop-ties=true"]
    )
    assert parsed == {
        "loss": ["logistic", "brier"],
        "beta": [0.1, 1.0],
        "seed": [0, 1, 2],
        "drop_ties": [True],
    }
    assert isinstance(parsed["beta"][1], float) and isinstance(parsed["seed"][0], int)


@pytest.mark.parametrize(
    "item", ["loss", "nosuch=1", "beta=abc", "loss=nosuch", "seed=", "name=a,b"]
)
def test_parse_sweep_rejects_bad_items(item):
    with pytest.raises(SystemExit):
        sweep.parse_sweep([item])


def test_combo_name_is_a_plain_directory_name():
    assert (
        sweep.combo_name({"loss": "brier", "beta": 1.0, "seed": 2}) == "loss-brier_beta-1.0_seed-2"
    )
    assert "/" not in sweep.combo_name({"model": "a/b"})


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_model, tiny_tokenizer):
    return save_model(tiny_model, tiny_tokenizer, tmp_path / "tiny")


def _argv(model_dir, out_dir, *extra):
    return [
        "--sweep", "loss=logistic,brier", "seed=0,1",
        "--model", str(model_dir), "--data", "rg:chain_sum", "--num-demos", "2",
        "--batch-size", "2", "--max-prompt-length", "400", "--max-length", "440",
        "--max-new-tokens", "4", "--gen-batch-size", "2", "--checkpoint-every", "0",
        "--precision", "fp32", "--output-dir", str(out_dir), "--name", "t", *extra,
    ]  # fmt: skip


def test_interrupted_sweep_reruns_only_missing_runs(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "runs"
    argv = _argv(tiny_model_dir, out)
    executed: list[str] = []
    real_execute = experiments.training.execute

    def counting(config):
        executed.append(config.run_name())
        return real_execute(config)

    monkeypatch.setattr(experiments.training, "execute", counting)
    # 1) stop after the first run
    first = sweep.main([*argv, "--max-runs", "1"])
    assert [r["status"] for r in first] == ["ran"]
    assert executed == ["loss-logistic_seed-0"]

    # 2) a crash in the middle: the second run fails
    def crashing(config):
        executed.append(config.run_name())
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(experiments.training, "execute", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sweep.main(argv)
    assert executed == ["loss-logistic_seed-0", "loss-logistic_seed-1"]

    # 3) rerun: the finished run is skipped, the three missing ones run, each in its own dir
    monkeypatch.setattr(experiments.training, "execute", counting)
    executed.clear()
    finished = out / "sweep-t" / "loss-logistic_seed-0" / "summary.json"
    stamp = finished.stat().st_mtime_ns
    done = sweep.main(argv)
    assert [r["status"] for r in done] == ["skipped", "ran", "ran", "ran"]
    assert executed == ["loss-logistic_seed-1", "loss-brier_seed-0", "loss-brier_seed-1"]
    assert finished.stat().st_mtime_ns == stamp
    for name in ["loss-logistic_seed-1", "loss-brier_seed-0", "loss-brier_seed-1"]:
        config = json.loads((out / "sweep-t" / name / "config.json").read_text())
        assert config["objective"]["loss"] == name.split("_")[0].split("-")[1]
        assert config["seed"] == int(name[-1])
        assert (out / "sweep-t" / name / "summary.json").exists()

    # 4) everything done: nothing runs
    executed.clear()
    assert {r["status"] for r in sweep.main(argv)} == {"skipped"}
    assert executed == []


def test_changed_flags_do_not_silently_skip(tmp_path, tiny_model_dir):
    out = tmp_path / "runs"
    argv = _argv(tiny_model_dir, out)
    argv[argv.index("seed=0,1")] = "seed=0"
    argv[argv.index("loss=logistic,brier")] = "loss=logistic"
    sweep.main(argv)
    with pytest.raises(SystemExit, match="another configuration"):
        sweep.main([*argv, "--lr", "3e-5"])
