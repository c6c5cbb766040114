"""What a round leaves on disk to resume from: the in-round checkpoint (model, optimizer,
scheduler, RNG states, step, a stateful method's state) and each finished round's model.

Every process takes part (``save_state`` and ``get_state_dict`` are collectives under DeepSpeed
and FSDP); the main process records each artefact's manifest (:mod:`gsil.integrity`) and swaps
it in whole, so a crash leaves the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from gsil.integrity import (
    CorruptFileError,
    read_recorded,
    verify_manifest,
    write_manifest,
    write_recorded,
)
from gsil.io import read_json, replace_dir, write_json
from gsil.layout import RunLayout

OBJECTIVE_STATE_FILE = "objective_state.pt"  # in the checkpoint, beside scheduler_state.pt
MODEL_LOSS_STATE_FILE = "model_loss_state.pt"  # a ModelLoss's state (SDFT's EMA teacher)


def save_round_model(accelerator: Accelerator, model, tokenizer, path: Path) -> None:
    """Write the full policy to ``path`` from the main process; a collective on every process.

    ``get_state_dict`` gathers the whole state dict (16-bit under ZeRO-3, full under sharded
    FSDP); the module's own tensors would be partitioned placeholders there. A LoRA policy is
    saved merged from its unwrapped module (its adapters are not sharded by DDP).
    """
    from gsil.models import is_peft_model, save_model

    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(model)
        save_model(policy, tokenizer, path, None if is_peft_model(policy) else state_dict)
        # before the round's summary marks it done: a finished round's model has its manifest
        write_manifest(path)
    accelerator.wait_for_everyone()


def save_checkpoint(
    accelerator: Accelerator,
    scheduler,
    layout: RunLayout,
    position: dict[str, int],
    method_state: torch.Tensor | None = None,
    model_loss_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """The round's state (model, optimizer, ``scheduler``, every process's RNG state, a
    stateful method's state and a :class:`gsil.methods.ModelLoss`'s state, each the same on
    every process) at ``position`` (``round``, ``step_in_round``, ``global_step``), replaced
    whole.

    ``save_state`` runs on every process: it is a collective under DeepSpeed and FSDP, and each
    process writes its own RNG state. The main process then records every file's size and
    sha256 in ``manifest.json`` (:mod:`gsil.integrity`) and swaps the new directory in.
    """
    staging = layout.checkpoint_staging
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), staging / "scheduler_state.pt")
        if method_state is not None:
            torch.save(method_state.clone(), staging / OBJECTIVE_STATE_FILE)
        if model_loss_state is not None:
            torch.save(model_loss_state, staging / MODEL_LOSS_STATE_FILE)
        write_json(staging / "trainer_state.json", position)
        write_manifest(staging)
        replace_dir(staging, layout.checkpoint)
    accelerator.wait_for_everyone()


def load_method_state(checkpoint: Path, initial: torch.Tensor) -> torch.Tensor:
    """A stateful method's per-example state saved in ``checkpoint``, checked against the
    round's ``initial`` state (same shape).

    Raises:
        RuntimeError: the file is missing or holds another number of examples; the message
            names it and the fix.
    """
    path = checkpoint / OBJECTIVE_STATE_FILE
    fix = (
        f"delete {checkpoint} to train the interrupted round again from its start, or start "
        "without --resume"
    )
    if not path.exists():
        raise RuntimeError(
            f"{path} is missing: this objective keeps a per-example state (DFT's "
            f"moving average) that the checkpoint must hold; {fix}"
        )
    state = torch.load(path)
    if state.shape != initial.shape:
        raise RuntimeError(
            f"{path} holds {tuple(state.shape)} values but the round has "
            f"{tuple(initial.shape)} examples; {fix}"
        )
    return state.to(initial.dtype)


def load_model_loss_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A :class:`gsil.methods.ModelLoss`'s state saved in ``checkpoint`` (on CPU).

    Raises:
        RuntimeError: the file is missing; the message names it and the fix.
    """
    path = checkpoint / MODEL_LOSS_STATE_FILE
    if not path.exists():
        raise RuntimeError(
            f"{path} is missing: this method keeps a state of its own (SDFT's EMA teacher) that "
            f"the checkpoint must hold; delete {checkpoint} to train the interrupted round again "
            "from its start, or start without --resume"
        )
    return torch.load(path, map_location="cpu")


def save_carried_state(
    accelerator: Accelerator, path: Path, state: dict[str, torch.Tensor]
) -> None:
    """What a round's :class:`gsil.methods.ModelLoss` hands the next round (the same on every
    process), written atomically with its manifest by the main process."""
    if accelerator.is_main_process:
        write_recorded(path, lambda handle: torch.save(state, handle))
    accelerator.wait_for_everyone()


def load_carried_state(path: Path) -> dict[str, torch.Tensor] | None:
    """The state :func:`save_carried_state` wrote (on CPU), checked against its manifest;
    None when the round left none.

    Raises:
        CorruptFileError: the file is truncated, changed or unreadable.
    """
    if not path.exists():
        return None
    fix = (
        f"Delete {path.parent} and the later round_<t> directories (trained from it), then "
        "rerun with --resume; or start without --resume"
    )
    return read_recorded(
        path,
        lambda p: torch.load(p, map_location="cpu"),
        what="state carried to the next round",
        fix=fix,
    )


def load_checkpoint(run_dir: Path) -> dict | None:
    """The checkpoint's trainer state (round, step), after checking every file of it against
    its manifest (:func:`gsil.integrity.verify_manifest`; on every process, before
    :func:`gsil.optimization.train_round` loads it); None without a checkpoint.

    Raises:
        CorruptFileError: a checkpoint file is missing, truncated or changed, or its state
            unreadable; the message names the file and the fix.
    """
    checkpoint = RunLayout(run_dir).checkpoint
    state_file = checkpoint / "trainer_state.json"
    if not state_file.exists():
        return None
    fix = (
        f"Delete {checkpoint} to resume from the last finished round (the interrupted round "
        "is trained again from its start), or start without --resume"
    )
    verify_manifest(checkpoint, what="checkpoint", fix=fix)
    try:
        state = read_json(state_file)
        for key in ("round", "step_in_round", "global_step"):
            int(state[key])
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptFileError(
            state_file, f"unreadable checkpoint state ({error!r})", fix
        ) from error
    return state


def truncate_metrics(metrics_path: Path, global_step: int) -> None:
    """Drop metrics rows written after the checkpoint a resumed run restarts from."""
    if not metrics_path.exists():
        return
    kept = [
        line
        for line in metrics_path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= global_step
    ]
    metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
