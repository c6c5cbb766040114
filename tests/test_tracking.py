"""Trackers through accelerate: TensorBoard files read back against metrics.jsonl (seconds)."""

import copy
import json
import math
import time
from pathlib import Path

import pytest
from tiny import Interrupt, interrupting, tiny_demos

from gsil import tracking
from gsil.estimators import get_estimator
from gsil.generation import GenerationSettings
from gsil.layout import RunLayout
from gsil.methods import get_method
from gsil.processes import make_accelerator
from gsil.trainer import OptimSettings, RoundsSettings, run_rounds

GENERATION = GenerationSettings(max_new_tokens=6, do_sample=False, batch_size=4)
PROJECT = "gsil"
CONFIG = {
    "method": "gsil",
    "seed": 0,
    "optim": {"learning_rate": 1e-2, "epochs": 2, "average_logps": False},
    "logging": {"report_to": ["tensorboard"], "note": None},
    "model": {"name": "tiny", "lora": {"rank": 0}},
}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_dir(run_dir: Path) -> Path:
    return RunLayout(run_dir).trackers / PROJECT


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard's own reader finds: tag -> [(step, value)] in logged order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(tensorboard_dir(run_dir)), size_guidance={"scalars": 0})
    reader.Reload()
    return {
        tag: [(event.step, event.value) for event in reader.Scalars(tag)]
        for tag in reader.Tags()["scalars"]
    }


def read_hparams(run_dir: Path) -> dict:
    """The hyper-parameters of the run's TensorBoard hparams session(s), by name."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for events in sorted(tensorboard_dir(run_dir).glob("*/events.out.tfevents.*")):
        reader = EventAccumulator(str(events.parent))
        reader.Reload()
        content = reader.PluginTagToContent("hparams").get("_hparams_/session_start_info")
        if content is None:
            continue
        info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        for name, value in info.hparams.items():
            found[name] = getattr(value, value.WhichOneof("kind"))
    return found


def assert_tensorboard_has_every_metric(run_dir: Path) -> None:
    """Every numeric value of every metrics.jsonl row is in TensorBoard at the row's step, once."""
    rows = read_metrics(run_dir)
    scalars = read_scalars(run_dir)
    assert rows
    for key in {key for row in rows for key in row}:
        expected = [
            (row["step"], row[key]) for row in rows if isinstance(row.get(key), int | float)
        ]
        assert key in scalars, f"{key} is in metrics.jsonl but not in TensorBoard"
        logged = scalars[key]
        assert [step for step, _ in logged] == [step for step, _ in expected], key
        for (step, value), (_, want) in zip(logged, expected, strict=True):
            if math.isnan(want):
                assert math.isnan(value), (key, step)
            else:  # TensorBoard stores float32
                assert value == pytest.approx(want, rel=1e-6, abs=1e-12), (key, step)


def gsil_objective():
    return get_method("gsil", get_estimator("logistic"), beta=0.5, shift=0.0)


def train(run_dir: Path, model, tokenizer, objective=None, resume: bool = False, **optim):
    accelerator = make_accelerator(report_to=["tensorboard"], project_dir=run_dir)
    tracking.start_trackers(accelerator, PROJECT, CONFIG, resume=resume)
    settings = {
        "learning_rate": 1e-2,
        "epochs": 2,
        "batch_size": 2,
        "grad_accum": 2,
        "checkpoint_every": 1,
        **optim,
    }
    return run_rounds(
        model,
        tokenizer,
        tiny_demos(8),
        objective or gsil_objective(),
        RoundsSettings(
            run_dir=run_dir,
            rounds=2,
            optim=OptimSettings(**settings),
            generation=GENERATION,
            max_prompt_length=64,
            max_length=96,
            seed=0,
            resume=resume,
        ),
        accelerator=accelerator,
    )


def test_tensorboard_files_hold_every_metric_and_the_hparams(tiny_model, tiny_tokenizer, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, tiny_model, tiny_tokenizer)
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 9))
    # TRL's names for the same quantities, fractional epochs within each round
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "learning_rate",
        "grad_norm",
        "loss",
    ]:
        assert key in rows[0], key
    assert [row["epoch"] for row in rows[:4]] == [0.5, 1.0, 1.5, 2.0]
    assert_tensorboard_has_every_metric(run_dir)
    hparams = read_hparams(run_dir)
    assert hparams["method"] == "gsil"
    assert hparams["seed"] == 0
    assert hparams["optim.learning_rate"] == pytest.approx(1e-2)
    assert hparams["optim.average_logps"] == 0  # torch writes a bool as a number
    assert hparams["model.lora.rank"] == 0
    assert hparams["logging.report_to"] == '["tensorboard"]'
    assert hparams["logging.note"] == "null"


def test_resumed_run_keeps_one_tensorboard_value_per_step(
    tiny_model_readonly, tiny_tokenizer, tmp_path
):
    run_dir = tmp_path / "run"
    objective = gsil_objective()
    # 2 micro-batches a step, 4 steps a round: round 1 checkpoints after step 6, logs step 7
    # and stops in step 8
    with pytest.raises(Interrupt):
        train(
            run_dir,
            copy.deepcopy(tiny_model_readonly),
            tiny_tokenizer,
            interrupting(objective, 14),
            checkpoint_every=2,
        )
    assert [step for step, _ in read_scalars(run_dir)["loss"]] == [1, 2, 3, 4, 5, 6, 7]
    # the resumed attempt restarts from step 6's checkpoint: step 7 is logged again, and only
    # the new value counts
    train(
        run_dir,
        copy.deepcopy(tiny_model_readonly),
        tiny_tokenizer,
        objective,
        resume=True,
        checkpoint_every=2,
    )
    assert_tensorboard_has_every_metric(run_dir)


def test_resume_without_an_in_round_checkpoint_drops_the_unfinished_rounds_rows(
    tiny_model_readonly, tiny_tokenizer, tmp_path
):
    run_dir = tmp_path / "run"
    objective = gsil_objective()
    with pytest.raises(Interrupt):  # in round 1, which saves no checkpoint
        train(
            run_dir,
            copy.deepcopy(tiny_model_readonly),
            tiny_tokenizer,
            interrupting(objective, 13),
            checkpoint_every=0,
        )
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    train(
        run_dir,
        copy.deepcopy(tiny_model_readonly),
        tiny_tokenizer,
        objective,
        resume=True,
        checkpoint_every=0,
    )
    assert [row["step"] for row in read_metrics(run_dir)] == list(range(1, 9))
    assert_tensorboard_has_every_metric(run_dir)


def test_a_fresh_run_removes_an_earlier_runs_tensorboard_files(tmp_path):
    stale = tensorboard_dir(tmp_path) / "events.out.tfevents.0.old"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    accelerator = make_accelerator(report_to="tensorboard", project_dir=tmp_path)
    tracking.start_trackers(accelerator, PROJECT, {"seed": 0})
    tracking.log_metrics(accelerator, {"loss": 1.0, "note": "text is skipped"}, step=1)
    tracking.finish_trackers(accelerator)
    assert not stale.exists()
    assert read_scalars(tmp_path) == {"loss": [(1, 1.0)]}
    assert not accelerator.trackers


def test_report_to_names_are_validated():
    assert tracking.resolve_report_to(()) == []
    assert tracking.resolve_report_to(None) == []
    assert tracking.resolve_report_to(["none"]) == []
    assert tracking.resolve_report_to("tensorboard") == ["tensorboard"]
    assert tracking.resolve_report_to(["TensorBoard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker.*tensorbored.*tensorboard, wandb"):
        tracking.resolve_report_to(["tensorbored"])
    with pytest.raises(ValueError, match="unknown tracker"):
        make_accelerator(report_to=["comet"])
    with pytest.raises(ValueError, match="none cannot be combined"):
        tracking.resolve_report_to(["none", "tensorboard"])
    with pytest.raises(ValueError, match="needs the run directory"):
        make_accelerator(report_to=["tensorboard"])


def test_a_tracker_that_is_not_installed_names_its_package(monkeypatch):
    monkeypatch.setitem(tracking._AVAILABLE, "wandb", lambda: False)
    monkeypatch.setitem(tracking._AVAILABLE, "mlflow", lambda: False)
    with pytest.raises(ValueError, match="pip install wandb mlflow"):
        tracking.resolve_report_to("wandb,mlflow")


def test_no_tracker_is_a_no_op(tmp_path):
    accelerator = make_accelerator(report_to=["none"], project_dir=tmp_path)
    tracking.start_trackers(accelerator, PROJECT, CONFIG)
    tracking.log_metrics(accelerator, {"loss": 1.0}, step=1)
    tracking.finish_trackers(accelerator)
    assert not RunLayout(tmp_path).trackers.exists()


def test_hparams_are_flat_and_of_tensorboard_types():
    flat = tracking.flatten_hparams(
        {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": Path("x"), "g": True}
    )
    assert flat == {"a.b": 1, "a.c.d": "[1, 2]", "e": "null", "f": "x", "g": True}
    assert tracking.tracker_values({"a": 1, "b": 0.5, "c": "s", "d": True, "e": None}) == {
        "a": 1,
        "b": 0.5,
        "d": 1,
    }


def test_a_resumed_runs_event_file_sorts_after_the_interrupted_ones(tmp_path):
    """TensorBoard reads event files in name order; names carry the creation second, then a
    per-process counter ("...589.10" sorts before "...589.8"), so a resume within the same
    second must wait for the next one."""
    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now}.host.589.8").write_bytes(b"")
    tracking._after_earlier_event_files(tmp_path)
    assert int(time.time()) > now
    later = f"events.out.tfevents.{int(time.time())}.host.589.10"
    assert sorted([later, f"events.out.tfevents.{now}.host.589.8"])[-1] == later
