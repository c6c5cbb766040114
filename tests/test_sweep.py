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
        "--sweep",
        "loss=logistic,brier",
        "seed=0,1",
        "--model",
        str(model_dir),
        "--data",
        "rg:chain_sum",
        "--num-demos",
        "2",
        "--batch-size",
        "2",
        "--max-prompt-length",
        "400",
        "--max-length",
        "440",
        "--max-new-tokens",
        "4",
        "--gen-batch-size",
        "2",
        "--checkpoint-every",
        "0",
        "--precision",
        "fp32",
        "--output-dir",
        str(out_dir),
        "--name",
        "t",
        *extra,
    ]


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


def test_validation_items_never_meet_train_or_test_items():
    from gsil.reasoning_tasks import MAX_SEED, split_seed

    # item seeds of a split are [base, base + items) with items < 2**30 (see SPLITS)
    spans = {
        split: (split_seed(0, split), split_seed(MAX_SEED - 1, split) + 2**30)
        for split in ("train", "test", "validation")
    }
    ordered = sorted(spans.values())
    assert all(end <= start for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False))
    from gsil.evaluation.reasoning import load_test_items

    test = load_test_items(("chain_sum",), 20, seed=0, split="test")
    validation = load_test_items(("chain_sum",), 20, seed=0, split="validation")
    assert {d.prompt for d in test}.isdisjoint({d.prompt for d in validation})


def test_select_settings_picks_the_best_mean_over_seeds_per_method():
    sweep_values = {"method": ["spin", "gsil"], "lr": [1e-5, 1e-4], "seed": [0, 1]}
    # validation scores in sweep order (method, lr, seed)
    scores = [
        0.10,
        0.30,
        0.25,
        0.25,  # spin: lr 1e-5 mean 0.20, lr 1e-4 mean 0.25
        0.40,
        0.40,
        0.10,
        0.70,
    ]  # gsil: both means 0.40 -> the first listed wins
    done = [{"validation": {"score": s}} for s in scores]
    selection = sweep.select_settings([None] * len(done), done, sweep_values)
    assert selection["tuned"] == ["lr"]
    spin, gsil = selection["methods"]["method-spin"], selection["methods"]["method-gsil"]
    assert spin["setting"] == {"lr": 1e-4} and spin["validation_mean"] == pytest.approx(0.25)
    assert spin["seeds"] == 2
    assert gsil["setting"] == {"lr": 1e-5} and gsil["validation_mean"] == pytest.approx(0.40)


def test_sweep_selects_on_validation_items_only(tmp_path, tiny_model_dir):
    out = tmp_path / "runs"
    argv = [
        "--sweep",
        "method=sft",
        "lr=1e-3,1e-2",
        "--model",
        str(tiny_model_dir),
        "--data",
        "rg:chain_sum",
        "--num-demos",
        "2",
        "--batch-size",
        "2",
        "--max-prompt-length",
        "400",
        "--max-length",
        "440",
        "--checkpoint-every",
        "0",
        "--precision",
        "fp32",
        "--output-dir",
        str(out),
        "--name",
        "sel",
        "--select-on",
        "validation",
        "--select-limit",
        "2",
    ]
    done = sweep.main(argv)
    assert [d["validation"]["n"] for d in done] == [2, 2]
    root = out / "sweep-sel"
    selection = json.loads((root / "selection.json").read_text())
    assert selection["split"] == "validation" and selection["tuned"] == ["lr"]
    assert selection["methods"]["method-sft"]["setting"]["lr"] in (1e-3, 1e-2)
    for name in ("method-sft_lr-0.001", "method-sft_lr-0.01"):
        round_dir = root / name / "round_0"
        result = json.loads((round_dir / "eval-validation" / "reasoning.json").read_text())
        assert result["settings"]["split"] == "validation"
        assert not (round_dir / "eval").exists()  # no test item was looked at
