"""Train one resolved configuration: the lifecycle of a run directory.

:func:`execute` loads the model and demonstrations, builds the objective and calls
``gsil.trainer.run_rounds``; :func:`ensure_run` skips a finished run and resumes an interrupted
one; :func:`run_status` says which it is. ``experiments.run`` (the command line), the pipeline
and the sweep all train through here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed

from experiments.config import ConfigError, RunConfig, leaves, load_saved_config
from gsil.data import load_demonstrations
from gsil.io import read_json, read_jsonl, write_json
from gsil.layout import RunLayout, run_of_model
from gsil.methods import build_method
from gsil.models import load_model, native_bf16, resolve_device
from gsil.processes import make_accelerator as gsil_accelerator
from gsil.tracking import start_trackers
from gsil.trainer import RoundsSettings, run_rounds

logger = logging.getLogger("experiments.training")


def resolve_precision(precision: str) -> str:
    """``"auto"``: bf16 where this machine computes it natively (a GPU, an AVX-512 BF16 or AMX
    CPU), else fp32. An explicit bf16 without native support is kept, with a warning."""
    device = resolve_device()
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        logger.warning(
            "precision bf16 on a %s without native bf16 (no AVX-512 BF16/AMX): PyTorch emulates "
            "it, about 100x slower than fp32 on such a CPU; use --precision auto or fp32",
            device.type,
        )
    return precision


def make_accelerator(config: RunConfig) -> Accelerator:
    """The run's accelerator: its precision, accumulation and experiment trackers."""
    precision = resolve_precision(config.model.precision)
    mixed_precision = "bf16" if precision == "bf16" else "no"
    return gsil_accelerator(
        mixed_precision=mixed_precision,
        grad_accum=config.optim.grad_accum,
        report_to=config.logging.report_to,
        project_dir=config.run_dir(),
    )


# leaves a resumed run may change: how to react to a non-finite step (a run stopped by a NaN
# can continue with --on-nonfinite skip), and the resume flag itself
RESUMABLE_CHANGES = (("resume",), ("optim", "on_nonfinite"))


def config_changes(saved: RunConfig, config: RunConfig) -> dict[str, tuple]:
    """``{"optim.learning_rate": (saved, now), ...}``: the leaves that differ (resume aside)."""
    before, after = saved.to_dict(), config.to_dict()
    return {
        ".".join(leaf.path): (leaf.value_in(before), leaf.value_in(after))
        for leaf in leaves()
        if leaf.path not in RESUMABLE_CHANGES and leaf.value_in(before) != leaf.value_in(after)
    }


def check_resume(config: RunConfig) -> None:
    """A resumed run must use the configuration it started with."""
    saved_path = RunLayout(config.run_dir()).config
    if not saved_path.exists():
        raise SystemExit(f"--resume: {saved_path} does not exist; nothing to resume")
    changed = config_changes(load_saved_config(saved_path), config)
    if changed:
        raise SystemExit(
            f"--resume: the configuration differs from {saved_path}: {changed} "
            "(resume with the same flags, or start a new run with another --name)"
        )


def progress_figures(run_dir) -> dict:
    """First and last step of the metrics: did demos rise, generations fall, accuracy rise?"""
    path = RunLayout(run_dir).metrics
    if not path.exists():
        return {}
    rows = read_jsonl(path)
    keys = ["loss", "logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/margins"]
    return {
        key: {"first": rows[0][key], "last": rows[-1][key]}
        for key in keys
        if rows and key in rows[0]
    }


def rounds_settings(config: RunConfig) -> RoundsSettings:
    """The round loop's sections of a run configuration."""
    return RoundsSettings(
        run_dir=config.run_dir(),
        max_prompt_length=config.data.max_prompt_length,
        max_length=config.data.max_length,
        rounds=config.rounds,
        seed=config.seed,
        optim=config.optim,
        generation=config.generation,
        drop_ties=config.objective.drop_ties,
        lora_rank=config.model.lora_rank,
        resume=config.resume,
        mix_previous_generations=config.mix_previous_generations,
        previous_generations=previous_generations(config),
    )


def previous_generations(config: RunConfig) -> Path | None:
    """The generated set before round 0 that ``mix_previous_generations`` mixes in: the last
    round's of the run whose model ``config`` starts from (None: not a run's round model)."""
    found = run_of_model(config.model.name_or_path)
    if not config.mix_previous_generations or found is None:
        return None
    layout, round_index = found
    return layout.generated(round_index)


def execute(config: RunConfig) -> dict:
    """Train one resolved configuration to the end; returns (and writes) its summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_dir = config.run_dir()
    layout = RunLayout(run_dir)
    if config.resume:
        check_resume(config)
    accelerator = make_accelerator(config)
    method = build_method(config.objective)
    try:  # before any work: a method may not run under this launch (SDFT under ZeRO-3)
        method.check_launch(accelerator)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if accelerator.is_main_process:
        write_json(layout.config, config.to_dict())
    set_seed(config.seed)
    started = time.perf_counter()

    data = config.data
    model, tokenizer = load_model(config.model, dtype="float32", device=accelerator.device)
    demos = load_demonstrations(data, seed=config.seed, tokenizer=tokenizer)
    logger.info(
        "%d demonstrations from %s (skipped: %s)",
        len(demos),
        data.source,
        dict(demos.skipped) or "none",
    )
    # last before training: run_rounds closes the trackers, even when it fails
    start_trackers(accelerator, "gsil", config.to_dict(), resume=config.resume)
    summary = run_rounds(
        model, tokenizer, demos, method, rounds_settings(config), accelerator=accelerator
    )
    summary.update(
        {
            "run_dir": str(run_dir),
            "num_demonstrations": len(demos),
            "skipped_records": dict(demos.skipped),
            "progress": progress_figures(run_dir),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "final_model": str(layout.model(config.rounds - 1)),
        }
    )
    if accelerator.is_main_process:
        write_json(layout.summary, summary)
        print(f"\nrun finished in {summary['wall_seconds']} s: {run_dir}")
        for key, values in summary["progress"].items():
            print(
                f"  {key:<18} first step {values['first']:+.4f}   last step {values['last']:+.4f}"
            )
    return summary


def run_status(config: RunConfig) -> str:
    """``done`` (summary.json, same config), ``partial`` (interrupted, same config), ``new``,
    or ``conflict`` (finished with another configuration: neither rerun nor skipped)."""
    layout = RunLayout(config.run_dir())
    if not layout.config.exists():
        return "new"
    try:
        same = not config_changes(load_saved_config(layout.config), config)
    except ValueError:  # a config.json this version cannot read: not the same run
        same = False
    if layout.summary.exists():
        return "done" if same else "conflict"
    return "partial" if same else "new"


def ensure_run(config: RunConfig, force_resume: bool = False) -> tuple[str, dict]:
    """Train ``config`` unless it is finished; an interrupted run continues (``--resume``).

    Returns ``(what happened, summary)``: ``skipped``, ``resumed`` or ``ran``.

    Raises:
        SystemExit: the run directory holds a finished run with another configuration.
    """
    from gsil.processes import process_state

    status = run_status(config)
    # every process has read the run directory before the main process writes into it
    process_state().wait_for_everyone()
    run_dir = config.run_dir()
    layout = RunLayout(run_dir)
    if status == "done":
        logger.info("%s: finished earlier, skipped", run_dir)
        return "skipped", read_json(layout.summary)
    if status == "conflict":
        raise SystemExit(
            f"{run_dir} holds a finished run with another configuration (see its config.json); "
            "remove it or choose another --output-dir/--name"
        )
    resumable = (
        force_resume
        or status == "partial"
        and (layout.checkpoint.exists() or bool(layout.finished_rounds()))
    )
    config = dataclasses.replace(config, resume=resumable)
    return ("resumed" if resumable else "ran"), execute(config)
