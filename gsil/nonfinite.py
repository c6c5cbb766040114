"""The non-finite guard: a NaN or infinite loss or gradient norm stops the run or drops the
step's update, decided alike on every process (one vote per check).

:class:`NonFiniteError` is what ``--on-nonfinite stop`` raises (before the optimizer steps);
:func:`any_process` and :func:`all_processes` are the votes that make each decision the same on
every process; :func:`check_step` is the one call the optimizer step makes per check.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import DistributedType

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A micro-batch loss or the gradient norm of an optimizer step is NaN or infinite.

    Raised (``--on-nonfinite stop``) before the optimizer steps, on every process alike:
    the weights are those before the step and the last checkpoint on disk is untouched.
    ``quantity`` is ``"loss"`` or ``"gradient norm"``, ``example_ids`` the offending examples
    (those with a non-finite loss; for the gradient, every example of the step), ``where`` the
    round and step once :func:`gsil.optimization.train_round` has filled it in.
    """

    def __init__(
        self, quantity: str, example_ids: Sequence[Any], where: str = "", applied: bool = False
    ) -> None:
        self.quantity, self.example_ids, self.applied = quantity, list(example_ids), applied
        self.where = where
        super().__init__(quantity)

    def __reduce__(self):
        return type(self), (self.quantity, self.example_ids, self.where, self.applied)

    def describe(self) -> str:
        """What was non-finite, where, and for which examples."""
        where = f" at {self.where}" if self.where else ""
        return f"non-finite {self.quantity}{where}, examples {self.example_ids}"

    def __str__(self) -> str:
        state = (
            "DeepSpeed had already applied this step (its engine steps inside backward): the "
            "weights in memory are not to be trusted; the last checkpoint on disk is untouched"
            if self.applied
            else "the optimizer did not step: the weights are those before this step and the "
            "last checkpoint on disk is untouched"
        )
        return (
            f"{self.describe()}: {state}. Check these examples and the learning rate (a "
            "resumed run repeats the same step); --on-nonfinite skip drops such steps' updates "
            "instead"
        )


def nonfinite_rows(losses: torch.Tensor, indices: Sequence[int]) -> list[int]:
    """The entries of ``indices`` whose loss (row of ``losses``: one per index, any trailing
    dimensions) is NaN or infinite; all of ``indices`` if the shapes do not pair up."""
    values = losses.detach()
    if values.numel() and bool(torch.isfinite(values).all()):
        return []
    if values.dim() == 0 or values.shape[0] != len(indices):
        return list(indices)
    bad = ~torch.isfinite(values.reshape(len(indices), -1)).all(dim=1)
    return [index for index, flag in zip(indices, bad.tolist(), strict=True) if flag]


def any_process(accelerator: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on any process: one all-reduce, so every process must call it
    (and then takes the same decision)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(
        torch.tensor([float(flag)], device=accelerator.device), reduction="sum"
    )
    return bool(total.item() > 0)


def all_processes(accelerator: Any, local: Sequence[Any]) -> list[Any]:
    """Every process's ``local`` items, concatenated in rank order (a collective)."""
    if accelerator.num_processes == 1:
        return list(local)
    from accelerate.utils import gather_object

    return list(gather_object(list(local)))


def check_step(
    accelerator: Any,
    on_nonfinite: str,
    quantity: str,
    local: Sequence[int],
    where: str,
    ids: Sequence[Any] | None,
) -> bool:
    """Whether to drop this step's update for a non-finite ``quantity`` found at the example
    indices ``local`` on this process (a collective: every process calls it, all decide alike).

    Returns False when no process found one; with ``on_nonfinite == "skip"`` logs a warning and
    returns True; with ``"stop"`` raises :class:`NonFiniteError` on every process, naming
    ``where`` and the examples by ``ids`` (their index when None). Under DeepSpeed a gradient
    norm is seen only after its engine stepped: that is always an error, and says so.
    """
    if not any_process(accelerator, bool(local)):
        return False
    indices = list(dict.fromkeys(all_processes(accelerator, local)))
    named = [ids[i] if ids is not None else f"#{i}" for i in indices]
    applied = quantity != "loss" and accelerator.distributed_type == DistributedType.DEEPSPEED
    error = NonFiniteError(quantity, named, where, applied=applied)
    if on_nonfinite == "stop" or applied:
        raise error
    logger.warning("%s: this step's update is dropped (--on-nonfinite skip)", error.describe())
    return True
