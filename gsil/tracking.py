"""Experiment trackers through accelerate: TensorBoard, Weights & Biases, Trackio, MLflow.

``--report-to`` names any of :data:`TRACKERS` (several at once) or ``none``. accelerate's own
integrations do the logging; this module validates the names, keeps everything on the machine
unless asked otherwise, and turns the run's configuration and metrics rows into what the
trackers accept. Their files go under the run's ``trackers/`` directory
(:attr:`gsil.layout.RunLayout.trackers`):

* TensorBoard writes event files under ``trackers/<project>/`` (the hyper-parameters in a
  timestamped sub-directory, as ``SummaryWriter.add_hparams`` does).
* W&B runs offline (``WANDB_MODE=offline``, files under ``trackers/wandb/``) unless
  ``WANDB_MODE`` is set; ``wandb sync`` uploads them later.
* MLflow logs to ``file:<run>/trackers/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set.
* Trackio logs to its local database (no Space is given, so nothing leaves the machine).

Call order, one run (the first two by the entry point, the rest by ``gsil.optimization`` and
``gsil.trainer``)::

    accelerator = make_accelerator(..., report_to=["tensorboard"], project_dir=run_dir)
    start_trackers(accelerator, "gsil", config_dict, resume=resume)  # hyper-parameters
    restart_trackers_at(accelerator, first_step)      # run_rounds, on resume
    log_metrics(accelerator, row, step=row["step"])   # train_round, each metrics.jsonl row
    finish_trackers(accelerator)                      # run_rounds' end: closes the files

Logging happens on the main process only (accelerate's trackers check it themselves).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import (
    ProjectConfiguration,
    is_mlflow_available,
    is_tensorboard_available,
    is_trackio_available,
    is_wandb_available,
)

from gsil.layout import RunLayout

# tracker name (as accelerate's ``log_with`` spells it) -> the package to pip install
TRACKERS: dict[str, str] = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
}
_AVAILABLE = {
    "tensorboard": is_tensorboard_available,
    "wandb": is_wandb_available,
    "trackio": is_trackio_available,
    "mlflow": is_mlflow_available,
}
NONE = "none"
HParam = int | float | str | bool


def resolve_report_to(
    report_to: str | Sequence[str] | None, check_installed: bool = True
) -> list[str]:
    """The validated tracker names of ``--report-to`` (duplicates dropped; ``[]`` for none).

    A string may hold several names separated by commas. ``check_installed=False`` checks the
    names only (reading a saved configuration needs no tracker installed).

    Raises:
        ValueError: an unknown name (the message lists the valid ones), ``none`` together with
            a tracker, or a tracker whose package is not installed (the message says which
            package to ``pip install``).
    """
    if report_to is None:
        return []
    if isinstance(report_to, str):
        report_to = report_to.split(",")
    names: list[str] = []
    for raw in report_to:
        name = str(raw).strip().lower()
        if name and name not in names:
            names.append(name)
    valid = ", ".join([NONE, *TRACKERS])
    unknown = [name for name in names if name != NONE and name not in TRACKERS]
    if unknown:
        raise ValueError(
            f"unknown tracker(s) {', '.join(unknown)} for --report-to; choose from: {valid}"
        )
    if NONE in names:
        if len(names) > 1:
            raise ValueError(
                f"--report-to none cannot be combined with {names}; give either none or trackers"
            )
        return []
    missing = [name for name in names if check_installed and not _AVAILABLE[name]()]
    if missing:
        packages = " ".join(TRACKERS[name] for name in missing)
        raise ValueError(
            f"--report-to {' '.join(missing)}: not installed here; pip install {packages}"
        )
    return names


def accelerator_tracking_kwargs(
    report_to: str | Sequence[str] | None, project_dir: str | Path | None
) -> dict[str, Any]:
    """``Accelerator`` keyword arguments for the trackers: ``log_with`` and ``project_config``.

    ``project_dir`` is the run directory; the trackers write under its ``trackers/``, so
    TensorBoard needs one.
    """
    names = resolve_report_to(report_to)
    kwargs: dict[str, Any] = {"log_with": names or None}
    if project_dir is not None:
        kwargs["project_config"] = ProjectConfiguration(
            project_dir=str(project_dir), logging_dir=str(RunLayout(project_dir).trackers)
        )
    elif "tensorboard" in names:
        raise ValueError("--report-to tensorboard needs the run directory (project_dir)")
    return kwargs


def flatten_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, HParam]:
    """A nested configuration as flat ``section.key`` hyper-parameters of tracker-safe types.

    TensorBoard's hparams take only int, float, str and bool: ``None``, lists and other values
    become strings (JSON where they are JSON, e.g. ``null``, ``["a", "b"]``).
    """
    flat: dict[str, HParam] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, prefix=f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            try:
                flat[name] = json.dumps(value)
            except TypeError:
                flat[name] = str(value)
    return flat


def start_trackers(
    accelerator: Accelerator,
    project_name: str,
    config: Mapping[str, Any],
    run_name: str | None = None,
    resume: bool = False,
) -> None:
    """Start the accelerator's trackers and log the resolved ``config`` as hyper-parameters.

    ``project_name`` is the W&B / Trackio project, the MLflow experiment and TensorBoard's
    sub-directory; ``run_name`` (default: the run directory's name) names the run in W&B,
    Trackio and MLflow. A fresh run (``resume=False``) first removes the TensorBoard files an
    earlier run of the same directory left, as :func:`gsil.trainer.run_rounds` removes its
    metrics. A no-op without trackers. Call it on every process (accelerate starts them on the
    main one).
    """
    if not accelerator.log_with:
        return
    project_dir = Path(accelerator.project_dir) if accelerator.project_dir else None
    files = Path(accelerator.logging_dir) if accelerator.logging_dir else None
    if not resume and accelerator.is_main_process and files is not None:
        shutil.rmtree(files / project_name, ignore_errors=True)  # TensorBoard's
    if resume and accelerator.is_main_process and files is not None:
        _after_earlier_event_files(files / project_name)
    if run_name is None and project_dir is not None:
        run_name = project_dir.name
    names = {str(tracker) for tracker in accelerator.log_with}
    init_kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        init_kwargs["wandb"] = {"name": run_name}
        if "WANDB_MODE" not in os.environ:
            init_kwargs["wandb"]["mode"] = "offline"
        if files is not None and "WANDB_DIR" not in os.environ:
            files.mkdir(parents=True, exist_ok=True)
            init_kwargs["wandb"]["dir"] = str(files)
    if "trackio" in names:
        init_kwargs["trackio"] = {"name": run_name}
    if "mlflow" in names:
        init_kwargs["mlflow"] = {"run_name": run_name}
        if "MLFLOW_TRACKING_URI" not in os.environ and accelerator.is_main_process:
            import mlflow

            where = (files or Path.cwd()) / "mlruns"
            mlflow.set_tracking_uri(where.resolve().as_uri())
    accelerator.init_trackers(project_name, config=flatten_hparams(config), init_kwargs=init_kwargs)


def _after_earlier_event_files(directory: Path) -> None:
    """Wait, if needed, until a new TensorBoard event file sorts after the earlier ones.

    TensorBoard reads a directory's event files in name order, and a name carries the whole
    second it was created in, then a per-process counter (``...1796257135.host.589.10`` sorts
    before ``...1796257135.host.589.8``). A run resumed within the second its interrupted
    attempt started in would be read first, and the purge of the steps it redoes (see
    :func:`restart_trackers_at`) would not apply; at most one second of waiting avoids it.
    """
    stamps = [
        int(parts[3])
        for path in directory.glob("events.out.tfevents.*")
        if len(parts := path.name.split(".")) > 3 and parts[3].isdigit()
    ]
    if stamps and time.time() < max(stamps) + 1:
        time.sleep(max(stamps) + 1 - time.time())


def tracker_values(row: Mapping[str, Any]) -> dict[str, int | float]:
    """The numeric entries of a metrics row (strings and other values are for the JSONL only;
    booleans become 0/1)."""
    values: dict[str, int | float] = {}
    for key, value in row.items():
        if isinstance(value, bool):
            values[key] = int(value)
        elif isinstance(value, int | float):
            values[key] = value
    return values


def log_metrics(accelerator: Accelerator, row: Mapping[str, Any], step: int) -> None:
    """Log one metrics row's numeric values to every tracker at ``step`` (main process)."""
    if accelerator.trackers:
        accelerator.log(tracker_values(row), step=step)


def restart_trackers_at(accelerator: Accelerator, step: int) -> None:
    """A resumed run continues at ``step``: TensorBoard forgets what it logged from there on.

    The interrupted attempt may have logged steps past the checkpoint it resumes from;
    ``metrics.jsonl`` drops those rows, and a TensorBoard ``SessionLog.START`` event at
    ``step`` makes its readers drop them too (TensorBoard's purge of orphaned data). W&B,
    Trackio and MLflow start a new run on resume, with only the new steps.
    """
    from accelerate.tracking import TensorBoardTracker

    for tracker in accelerator.trackers:
        if isinstance(tracker, TensorBoardTracker) and accelerator.is_main_process:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            writer = tracker.writer._get_file_writer()
            writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
            writer.flush()


def finish_trackers(accelerator: Accelerator) -> None:
    """Close every tracker (flush and finish the runs) and forget them.

    This is the tracker half of ``Accelerator.end_training``, which would also destroy the
    process group that later work of the same launch (the pipeline's next stage, evaluation)
    still needs.
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
