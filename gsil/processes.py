"""The launch's processes: the accelerator, checks that the launch is what it asked for,
DeepSpeed's configuration, and ZeRO-3's gathered parameters.

One process or several (``accelerate launch``: DDP, FSDP, DeepSpeed), on CPUs or GPUs; the
code that trains and generates is the same, and this module is where the launch is read.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.utils import InitProcessGroupKwargs

from gsil.tracking import accelerator_tracking_kwargs


class EngineSettings(Protocol):
    """What DeepSpeed's configuration takes from a run (``gsil.optimization.OptimSettings``)."""

    batch_size: int
    grad_accum: int
    max_grad_norm: float
    optimizer: str


def configure_engine(accelerator: Accelerator, settings: EngineSettings) -> None:
    """Hand the run's batch, accumulation and clipping to DeepSpeed (its "auto" fields)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type != DistributedType.DEEPSPEED or plugin is None:
        return
    # resolve from the launch's own config each time, never from an earlier round's resolution
    if not hasattr(plugin, "gsil_launch_config"):
        plugin.gsil_launch_config = copy.deepcopy(plugin.deepspeed_config)
    resolved = resolve_deepspeed_config(
        copy.deepcopy(plugin.gsil_launch_config), settings, accelerator.num_processes
    )
    plugin.deepspeed_config.clear()  # the dict accelerate reads when it builds the engine
    plugin.deepspeed_config.update(resolved)


def resolve_deepspeed_config(ds_config: dict, settings: EngineSettings, num_processes: int) -> dict:
    """Fill a DeepSpeed config's batch, accumulation and clipping from the run (in place).

    A field that is ``"auto"`` (or absent) takes the run's value; one that disagrees is refused:
    DeepSpeed would otherwise step, clip or batch differently from what the run records. So is
    an optimizer or scheduler defined in the DeepSpeed config (the run builds its own), and
    optimizer offload with an optimizer other than AdamW (accelerate would silently replace it
    with DeepSpeedCPUAdam). Under ZeRO-3 the weights are gathered on save (each round's model is
    the next round's reference).

    Raises:
        ValueError: naming each field that disagrees and the fix.
    """
    wanted = {
        "train_micro_batch_size_per_gpu": settings.batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "gradient_clipping": settings.max_grad_norm,
        "train_batch_size": settings.batch_size * settings.grad_accum * num_processes,
    }
    flags = {
        "train_micro_batch_size_per_gpu": "--batch-size",
        "gradient_accumulation_steps": "--grad-accum",
        "gradient_clipping": "--max-grad-norm",
        "train_batch_size": "--batch-size x --grad-accum x processes",
    }
    problems = []
    for key, value in wanted.items():
        given = ds_config.get(key, "auto")
        if given not in ("auto", None) and float(given) != float(value):
            problems.append(f"{key}={given} but the run has {flags[key]} = {value}")
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            problems.append(
                f"the DeepSpeed config defines '{section}'; gsil builds its own "
                f"(--optimizer, --lr, --warmup-steps): remove '{section}'"
            )
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
    if offload.get("device") not in (None, "none") and settings.optimizer != "adamw":
        problems.append(
            f"optimizer offload to {offload['device']} replaces --optimizer {settings.optimizer} "
            "with DeepSpeedCPUAdam; use --optimizer adamw or turn optimizer offload off"
        )
    if problems:
        raise ValueError(
            "DeepSpeed config disagrees with the run: "
            + "; ".join(problems)
            + " (set those DeepSpeed fields to 'auto' to take the run's values)"
        )
    ds_config.update(wanted)
    zero = ds_config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # every round saves the full policy (the next round's reference): ZeRO-3 must gather it
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return ds_config


def make_accelerator(
    mixed_precision: str = "no",
    grad_accum: int = 1,
    report_to: str | Sequence[str] | None = (),
    project_dir: str | Path | None = None,
) -> Accelerator:
    """The run's ``Accelerator``: GPUs when present, else CPU processes, as launched.

    ``report_to`` names the trackers (:data:`gsil.tracking.TRACKERS`; empty or ``none``: no
    tracker), validated here, before any work; ``project_dir`` is the run directory, under whose
    ``trackers/`` they write. Start them with :func:`gsil.tracking.start_trackers`.

    On CPU processes DeepSpeed needs the gloo backend named: without it accelerate (1.15) starts
    DeepSpeed's communication but counts one process per rank, and every rank would do all the
    work.
    """
    settings = dict(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        **accelerator_tracking_kwargs(report_to, project_dir),
    )
    if _deepspeed_on_cpu():
        handlers = [InitProcessGroupKwargs(backend="gloo")]
        accelerator = Accelerator(kwargs_handlers=handlers, **settings)
    else:
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), **settings)
    check_processes(accelerator)
    return accelerator


def process_state() -> PartialState:
    """The launch's processes (rank, barrier) for code that runs before or around the
    ``Accelerator`` of :func:`make_accelerator`; it joins the same process group."""
    if _deepspeed_on_cpu():
        return PartialState(backend="gloo")
    return PartialState(cpu=not torch.cuda.is_available())


def _deepspeed_on_cpu() -> bool:
    return not torch.cuda.is_available() and _env_flag("ACCELERATE_USE_DEEPSPEED")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true")


def check_processes(accelerator: Accelerator) -> None:
    """Refuse a launch that is not what it asked for, before any work is done.

    * ``accelerate launch --cpu --num_processes N`` starts ONE process (accelerate's path for
      several CPU processes goes through mpirun): the run would do N times the steps asked for.
    * A process that does not see its launch's other processes (``WORLD_SIZE``) would train
      alone on every example.
    * ``--use_fsdp`` or ``--use_deepspeed`` that accelerate did not turn on (FSDP needs GPUs in
      accelerate 1.15) would silently run as plain data parallelism.
    """
    env = os.environ
    problems = []
    if (
        accelerator.num_processes == 1
        and _env_flag("ACCELERATE_USE_CPU")
        and "MASTER_ADDR" in env
        and "WORLD_SIZE" not in env
    ):
        problems.append(
            "accelerate launch --cpu --num_processes N started ONE process, not N: on CPUs start "
            "several with `accelerate launch --multi_gpu --num_processes N ...` (torchrun and "
            "gloo; no GPU needed) or `torchrun --nproc_per_node N -m experiments.run ...`"
        )
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world != accelerator.num_processes:
        problems.append(
            f"the launcher started {world} processes but accelerate joined "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); every process "
            "would train alone on all the data"
        )
    for flag, engine in (
        ("ACCELERATE_USE_FSDP", DistributedType.FSDP),
        ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED),
    ):
        if _env_flag(flag) and accelerator.distributed_type != engine:
            problems.append(
                f"the launch asked for {engine.value} but accelerate runs "
                f"{accelerator.distributed_type.value} (accelerate enables FSDP on GPUs only)"
            )
    if problems:
        raise RuntimeError("; ".join(problems))


def is_zero3(accelerator: Accelerator) -> bool:
    """Whether DeepSpeed ZeRO stage 3 partitions the parameters across processes."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and plugin is not None
        and plugin.zero_stage == 3
    )


@contextmanager
def full_parameters(accelerator: Accelerator, model) -> Iterator[None]:
    """Gather ZeRO-3's partitioned parameters for the duration (generation, reference pass).

    Outside DeepSpeed ZeRO-3 (or before the model is partitioned) this does nothing. Under it a
    module's own parameters are empty placeholders; ``GatheredParameters`` brings the full
    tensors onto every process and releases them afterwards (read only: ``modifier_rank=None``).
    """
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not (is_zero3(accelerator) and partitioned):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
