"""One round of optimisation: batches, gradient steps, metrics rows and resumable checkpoints.

The method is a :class:`~gsil.methods.Method`; nothing here knows which loss it is. ``accelerate`` prepares the model and optimizer, so the same code runs on a CPU,
one GPU or several (``accelerate launch``).

A ``metrics.jsonl`` row (one per optimizer step; the same values go to the trackers of
:mod:`gsil.tracking`) uses TRL's ``DPOTrainer`` names where the quantity is the same, the
demonstration being the *chosen* response and the policy's own sample the *rejected* one (as in
SPIN). Per-example statistics are means over the step's examples (on all processes); a reward is
``beta * (log pi_theta - log pi_ref)`` of a response (DFT: its discriminative logit ``s / tau``).
With k own samples per prompt (``--num-samples``) a quantity of the rejected side is its mean
over the prompt's k samples, and an accuracy the fraction of its k pairs the demonstration wins.

    key                           TRL name             quantity
    ----------------------------  -------------------  -------------------------------------------
    loss                          loss                 the objective (every method's)
    grad_norm                     grad_norm            gradient norm before clipping
    learning_rate                 learning_rate        after this step's scheduler step
    epoch                         epoch                fractional epochs done in this round
    rewards/chosen                rewards/chosen       reward of the demonstrations
    rewards/rejected              rewards/rejected     reward of the own samples
    rewards/margins               rewards/margins      chosen minus rejected reward
    rewards/accuracies            rewards/accuracies   fraction with chosen reward > rejected
    logps/chosen                  logps/chosen         log pi_theta(demo) (summed; length-averaged
                                                       with average_logps)
    logps/rejected                logps/rejected       log pi_theta(own sample), likewise
    classifier_logits/chosen      (none) [1]           GSIL's classifier logit f = reward + shift
    classifier_logits/rejected    (none) [1]           the same for the own samples
    loss/chosen, loss/rejected    (none)               GSIL's (and DFT's) two loss parts (sum: loss)
    dft/log_normalizer            (none)               DFT: log u, each prompt's moving average of
                                                       the discriminative normaliser
    dft/weights                   (none)               DFT: mean importance weight of the samples
    logps/chosen_per_token        (none)               SFT, Dynamic FT: token-mean log pi(demo)
    sdft/teacher_logps            (none)               SDFT: log-prob of the own sample under the
                                                       EMA teacher shown the demonstration
    tokens                        (none) [2]           non-padding tokens in the step
    step, round, round_step       (step: global step)  global step, round, step within the round
    skipped                       (none)               1: a non-finite loss or gradient, update
                                                       dropped (--on-nonfinite skip); else 0
    step_seconds                  (none)               wall time of the step

    [1] TRL's logits/chosen and logits/rejected are mean LM-head logits, another quantity.
    [2] TRL's num_tokens counts all tokens seen so far; tokens here is per step.

Before TRL's names these were ``rewards/demo|gen|margin|accuracy``, ``logps/demo|gen``,
``logits/demo|gen``, ``loss/demo|gen``, ``logps/demo_per_token``, ``lr`` and an integer
``epoch``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import get_scheduler

from gsil.batching import Example, collate, split_demo_gen
from gsil.checkpoints import (
    load_carried_state,
    load_method_state,
    load_model_loss_state,
    save_carried_state,
    save_checkpoint,
)
from gsil.faults import kill_point
from gsil.integrity import write_recorded
from gsil.layout import RunLayout
from gsil.logprobs import LOGPROB_PATHS, SequenceLogps, model_sequence_logps
from gsil.methods import LogpBatch, Method
from gsil.models import disable_activation_checkpointing, enable_activation_checkpointing
from gsil.nonfinite import check_step, nonfinite_rows
from gsil.objectives import sample_mean
from gsil.processes import configure_engine
from gsil.tracking import log_metrics

logger = logging.getLogger(__name__)


def _opt(default, help: str, **metadata):
    """A settings field whose ``help`` is its command-line documentation (experiments.config)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class OptimSettings:
    """How each round is optimised: the run configuration's ``optim`` section."""

    learning_rate: float = _opt(1e-5, "peak learning rate", aliases=("lr",))
    optimizer: str = _opt(
        "adamw", "optimizer (rmsprop: the paper's script)", choices=("adamw", "rmsprop")
    )
    weight_decay: float = _opt(0.0, "weight decay")
    warmup_steps: int = _opt(0, "linear warm-up steps (then --lr-scheduler's decay to 0)")
    warmup_ratio: float = _opt(
        0.0,
        "warm-up as a fraction of the round's optimizer steps, rounded up (transformers' "
        "warmup_ratio; SPIN's and DFT's authors: 0.1); only when --warmup-steps is 0",
    )
    epochs: int = _opt(1, "epochs over the demonstrations per round")
    batch_size: int = _opt(
        8,
        "prompts per micro-batch and device (GSIL/SPIN/DFT forward "
        "(1 + k)x rows, k = --num-samples)",
    )
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm")
    average_logps: bool = _opt(False, "length-averaged log-probs instead of sums (the default)")
    checkpoint_every: int = _opt(
        50, "optimizer steps between resumable checkpoints (0: at the end of each round only)"
    )
    gradient_checkpointing: bool = _opt(
        False, "recompute decoder layers' activations in the backward instead of keeping them"
    )
    checkpoint_layers_every: int = _opt(
        1,
        "with --gradient-checkpointing, checkpoint every n-th decoder layer only (1: every "
        "layer, least memory; 2: half of them, about half the recompute; needs transformers "
        ">= 5.20 for n > 1)",
    )
    on_nonfinite: str = _opt(
        "stop",
        "a NaN or inf loss or gradient norm: stop (raise before the "
        "optimizer steps, naming the examples) or skip (drop that step's "
        "update, record skipped=1)",
        choices=("stop", "skip"),
    )
    lr_scheduler: str = _opt(
        "linear",
        "decay after warm-up, to 0 at the round's last step: linear or cosine (transformers' "
        "get_linear/get_cosine_schedule_with_warmup; DFT's authors: cosine)",
        choices=("linear", "cosine"),
    )
    samples_per_epoch: int = _opt(
        0,
        "m: each epoch trains on m of the k own samples of every prompt, a fresh block each "
        "epoch (epoch e: samples e*m .. e*m+m-1, modulo k), as DFT's authors (their "
        "samples_per_prompt with sample: true); 0: all k every epoch",
    )
    logprob_path: str = _opt(
        "lean",
        "how response log-probs are computed: lean (only response positions through the "
        "output layer, in chunks recomputed in the backward: no batch x length x vocabulary "
        "logits) or plain (the model's full logits)",
        choices=LOGPROB_PATHS,
    )


def warmup_steps(settings: OptimSettings, total_steps: int) -> int:
    """The round's warm-up steps: ``warmup_steps``, else ``ceil(warmup_ratio * total_steps)``
    (as transformers' ``TrainingArguments.get_warmup_steps``)."""
    return settings.warmup_steps or math.ceil(settings.warmup_ratio * total_steps)


@dataclass(frozen=True)
class RoundData:
    """Everything a round trains on: token ids (padded with ``pad_id``) and the stored
    reference log-probs."""

    examples: list[Example]
    ref_demo_logps: torch.Tensor | None
    ref_gen_logps: torch.Tensor | None
    ids: Sequence | None = None  # the demonstrations' ids, by example index (errors name them)
    pad_id: int = field(kw_only=True)
    # a stateful method's per-example state at the round's start (None: its initial_state)
    initial_state: torch.Tensor | None = field(default=None, kw_only=True)


def epoch_samples(num_samples: int, per_epoch: int, epoch: int) -> list[int]:
    """Which of the k = ``num_samples`` own samples of each prompt epoch ``epoch`` trains on:
    block ``epoch`` of ``per_epoch`` (m) consecutive samples, wrapping around modulo k (so
    fresh ones while ``(epoch + 1) * m <= k``); all k when m is 0."""
    if per_epoch == 0:
        return list(range(num_samples))
    if not 0 < per_epoch <= num_samples:
        raise ValueError(f"{per_epoch} samples per epoch of {num_samples} per prompt")
    return [(epoch * per_epoch + j) % num_samples for j in range(per_epoch)]


def with_samples(data: RoundData, chosen: Sequence[int]) -> RoundData:
    """``data`` with each example's own samples (and their reference log-probs ``(N, k)``)
    cut to the sample numbers ``chosen``, in that order."""
    examples = [
        dataclasses.replace(
            example,
            gen_ids=tuple(example.gen_ids[j] for j in chosen),
            gen_mask=None
            if example.gen_mask is None
            else tuple(example.gen_mask[j] for j in chosen),
        )
        for example in data.examples
    ]
    ref_gen = None if data.ref_gen_logps is None else data.ref_gen_logps[:, list(chosen)]
    return dataclasses.replace(data, examples=examples, ref_gen_logps=ref_gen)


def forward_logps(
    model,
    batch: dict,
    average: bool,
    *,
    path: str = OptimSettings.logprob_path,
    prob_weighted: bool = False,
) -> torch.Tensor | SequenceLogps:
    """Per-row response log-probs of a (demos, then generations) batch, in one forward, by the
    log-prob ``path`` (:func:`gsil.logprobs.model_sequence_logps`; ``prob_weighted`` adds
    each row's ``sum_t sg(p_t) log p_t``)."""
    return model_sequence_logps(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        average=average,
        path=path,
        prob_weighted=prob_weighted,
    )


@dataclass(frozen=True)
class MicroBatch:
    """What one process runs in one micro-step: example indices and their loss weights.

    A weight is 1 for a real example and 0 for a filler: a process whose share of the last
    (partial) batch is empty still runs one example, so that every process takes part in every
    collective (DDP's gradient all-reduce, ZeRO's gathers) the same number of times.
    """

    indices: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step on this process: exactly ``grad_accum`` micro-batches (fillers pad a
    short last step, so every engine steps once per optimizer step), the number of real
    examples the step has across all processes (the loss is their mean) and their
    demonstration tokens (``--sft-token-mean step`` divides by it; None when not counted)."""

    micro_batches: tuple[MicroBatch, ...]
    num_examples: int
    demo_tokens: int | None = None

    @property
    def mean_demo_tokens(self) -> float | None:
        """The step's demonstration tokens per example (None when they were not counted)."""
        return None if self.demo_tokens is None else self.demo_tokens / self.num_examples


def rank_share(batch: Sequence[int], num_processes: int, rank: int) -> MicroBatch:
    """This process's contiguous share of one global micro-batch (sizes differ by at most 1)."""
    base, extra = divmod(len(batch), num_processes)
    start = rank * base + min(rank, extra)
    size = base + (rank < extra)
    if size == 0:
        return MicroBatch((batch[0],), (0.0,))
    return MicroBatch(tuple(batch[start : start + size]), (1.0,) * size)


def plan_steps(
    order: Sequence[int],
    batch_size: int,
    grad_accum: int,
    num_processes: int,
    rank: int,
    demo_lengths: Sequence[int] | None = None,
) -> list[StepPlan]:
    """Split one epoch's example order into this process's optimizer steps.

    A global micro-batch is ``batch_size * num_processes`` consecutive examples of ``order``;
    each process takes its share. So N processes with micro-batch b see, step by step, the same
    examples as one process with micro-batch N b: the same global batch, the same result.
    ``demo_lengths`` (per example index): each step counts its demonstration tokens over
    every process, with no communication (every process holds the round's examples).
    """
    width = batch_size * num_processes
    global_batches = [order[i : i + width] for i in range(0, len(order), width)]
    steps = []
    for first in range(0, len(global_batches), grad_accum):
        group = global_batches[first : first + grad_accum]
        micro = [rank_share(batch, num_processes, rank) for batch in group]
        filler = MicroBatch((group[0][0],), (0.0,))
        micro += [filler] * (grad_accum - len(micro))
        tokens = None
        if demo_lengths is not None:
            tokens = sum(demo_lengths[i] for batch in group for i in batch)
        steps.append(StepPlan(tuple(micro), sum(len(batch) for batch in group), tokens))
    return steps


def _collate(data: Sequence[Example], micro: MicroBatch, pad_id: int, with_gen: bool) -> dict:
    batch = collate([data[i] for i in micro.indices], pad_id, with_gen)
    batch["weight"] = torch.tensor(micro.weights, dtype=torch.float32)
    return batch


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def reference_logps(
    model,
    examples: Sequence[Example],
    settings: OptimSettings,
    *,
    pad_id: int,
    accelerator: Accelerator,
    with_generations: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of every demo (and generated) response under the current model, no grad:
    demonstrations ``(N,)``, generated responses ``(N, k)`` (None without generations), in
    micro-batches of ``settings.batch_size`` (length-averaged with ``settings.average_logps``).

    Each process scores its share of every batch; one gather at the end puts the values back
    in example order on every process.
    """
    model.eval()
    count = len(examples)
    num_samples = len(examples[0].gen_ids) if with_generations and examples else 1
    plan = plan_steps(
        range(count), settings.batch_size, 1, accelerator.num_processes, accelerator.process_index
    )
    local: list[tuple[int, float, list[float]]] = []
    for step in tqdm(plan, desc="reference log-probs", disable=not accelerator.is_main_process):
        (micro,) = step.micro_batches
        batch = _to_device(_collate(examples, micro, pad_id, with_generations), accelerator.device)
        demo_part, gen_part = split_demo_gen(
            forward_logps(model, batch, settings.average_logps, path=settings.logprob_path),
            len(micro.indices),
        )
        gen_values = (
            gen_part.float().tolist() if gen_part is not None else [[0.0]] * len(micro.indices)
        )
        for index, weight, demo_value, gen_value in zip(
            micro.indices, micro.weights, demo_part.float().tolist(), gen_values, strict=True
        ):
            if weight:
                local.append((index, demo_value, gen_value))
        kill_point("reference")  # test hook (gsil.faults)
    rows = gather_object(local) if accelerator.num_processes > 1 else local
    demo = torch.full((count,), float("nan"), dtype=torch.float32)
    gen = (
        torch.full((count, num_samples), float("nan"), dtype=torch.float32)
        if with_generations
        else None
    )
    for index, demo_value, gen_value in rows:
        demo[index] = demo_value
        if gen is not None:
            gen[index] = torch.tensor(gen_value, dtype=torch.float32)
    if torch.isnan(demo).any() or (gen is not None and torch.isnan(gen).any()):
        raise RuntimeError("reference pass: some examples were scored by no process (a bug)")
    return demo, gen


def _epoch_order(count: int, seed: int, round_index: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + round_index * 1009 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def _make_optimizer(model, settings: OptimSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
    if settings.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; choose adamw or rmsprop")


@dataclass(frozen=True)
class RoundPlace:
    """Where a round trains: the run (its layout and seed), the round, and how far the run
    and this round already got (``resume_state``: an interrupted round's checkpoint state,
    from :func:`gsil.checkpoints.load_checkpoint`)."""

    layout: RunLayout
    round_index: int
    seed: int = 0
    global_step_offset: int = 0
    resume_state: dict | None = None


def train_round(
    model,
    data: RoundData,
    method: Method,
    settings: OptimSettings,
    place: RoundPlace,
    accelerator: Accelerator,
) -> tuple[dict, torch.nn.Module]:
    """Optimise ``model`` on one round's data; returns the last step's metrics and the prepared
    (wrapped) model, which the caller saves with :func:`gsil.checkpoints.save_round_model`.

    Writes one metrics row per optimizer step to the run's ``metrics.jsonl`` (main process),
    logs it to the accelerator's trackers (:func:`gsil.tracking.log_metrics`), and writes a
    checkpoint every ``settings.checkpoint_every`` steps (every process); ``place.resume_state``
    continues exactly where that checkpoint stopped.

    A stateful method (DFT's per-prompt moving average) starts the round from
    ``data.initial_state``, else :meth:`~gsil.methods.Method.initial_state`; its state lives on
    every process (the same values: each step's updates are gathered), is saved in every
    checkpoint and loaded with it on resume, and at the round's end in
    ``round_<t>/method_state.pt`` with the demonstrations' ids.

    ``settings.samples_per_epoch`` (m > 0): epoch e trains on block e of each prompt's own
    samples (:func:`epoch_samples`), the same on a resumed run.

    A method whose loss needs the model itself (:meth:`~gsil.methods.Method.model_loss`: SDFT)
    has the round's :class:`~gsil.methods.ModelLoss` forward each micro-batch, hear of each
    update, save its state in every checkpoint, and hand its carried state on to the next round
    (``round_<t>/model_loss_state.pt``), from which the next round's starts.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = len(
        plan_steps(range(len(data.examples)), settings.batch_size, settings.grad_accum, world, rank)
    )
    total_steps = steps_per_epoch * settings.epochs
    stepper = RoundStepper.prepare(model, data, method, settings, accelerator, total_steps)
    step = 0
    if place.resume_state is not None:
        step = place.resume_state["step_in_round"]
        stepper.load(place.layout.checkpoint)
    else:
        stepper.start_from_previous_round(place)
    metrics_path = place.layout.metrics
    last_metrics: dict = {}
    progress = tqdm(
        total=total_steps,
        initial=step,
        desc=f"round {place.round_index} ({method.name})",
        disable=not accelerator.is_main_process,
    )
    num_samples = len(data.examples[0].gen_ids or ()) if data.examples else 0
    demo_lengths = [len(example.demo_ids) for example in data.examples]
    for epoch in range(step // steps_per_epoch, settings.epochs):
        if settings.samples_per_epoch and num_samples:
            chosen = epoch_samples(num_samples, settings.samples_per_epoch, epoch)
            stepper.data = with_samples(data, chosen)
        order = _epoch_order(len(data.examples), place.seed, place.round_index, epoch)
        plan = plan_steps(
            order, settings.batch_size, settings.grad_accum, world, rank, demo_lengths
        )
        for step_plan in plan[step - epoch * steps_per_epoch :]:
            step_start = time.perf_counter()
            global_step = place.global_step_offset + step + 1
            stats = stepper.step(
                step_plan,
                where=f"round {place.round_index}, step {global_step} (step {step + 1} of the round)",
            )
            step += 1
            last_metrics = {
                "round": place.round_index,
                "step": global_step,
                "round_step": step,
                "epoch": step / steps_per_epoch,  # fractional, within the round (as TRL's)
                "learning_rate": stepper.scheduler.get_last_lr()[0],
                **stats,
                "step_seconds": round(time.perf_counter() - step_start, 4),
            }
            if accelerator.is_main_process:
                with metrics_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(last_metrics) + "\n")
            log_metrics(accelerator, last_metrics, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{stats['loss']:.4f}")
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                stepper.save(place, step)
            kill_point("training")  # test hook (gsil.faults): after the step and its checkpoint
    progress.close()
    if stepper.method_state is not None and accelerator.is_main_process:
        ids = list(data.ids) if data.ids is not None else list(range(len(data.examples)))
        final = {"ids": ids, "state": stepper.method_state.clone()}
        write_recorded(
            place.layout.method_state(place.round_index), lambda out: torch.save(final, out)
        )
    stepper.hand_on(place)
    return last_metrics, stepper.finish()


class Prepared(NamedTuple):
    """What accelerate prepared for a round (the model and optimizer wrapped), and the
    schedule (not prepared: accelerate would step it once per process per update)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


class RoundStepper:
    """One round's optimisation state (the prepared model, optimizer and schedule, a stateful
    method's state) and its optimizer step, in named parts: forward and loss, the non-finite
    checks, backward and clipping, the update, the method's state, the step's statistics."""

    def __init__(
        self,
        prepared: Prepared,
        round_data: RoundData,
        method: Method,
        settings: OptimSettings,
        accelerator: Accelerator,
    ) -> None:
        self.model, self.optimizer, self.scheduler = prepared
        self.data, self.method = round_data, method
        self.settings, self.accelerator = settings, accelerator
        self.method_state = method.initial_state(len(round_data.examples))
        if self.method_state is not None and round_data.initial_state is not None:
            self.method_state = round_data.initial_state.clone()
        # a method whose loss needs the model itself (SDFT): built from the round's start
        self.model_loss = method.model_loss(accelerator.unwrap_model(self.model), accelerator)

    @classmethod
    def prepare(
        cls,
        model,
        round_data: RoundData,
        method: Method,
        settings: OptimSettings,
        accelerator: Accelerator,
        total_steps: int,
    ) -> RoundStepper:
        """Build the optimizer and schedule and hand them with the model to accelerate."""
        accelerator.free_memory()  # forget the previous round's prepared objects
        # accelerate divides each micro-batch loss by this and syncs gradients on its last one
        accelerator.gradient_accumulation_steps = settings.grad_accum
        if (
            settings.on_nonfinite == "skip"
            and accelerator.distributed_type == DistributedType.DEEPSPEED
        ):
            raise ValueError(
                "--on-nonfinite skip cannot drop a step under DeepSpeed (accelerate "
                "steps its engine inside backward): use --on-nonfinite stop"
            )
        configure_engine(accelerator, settings)
        optimizer = _make_optimizer(model, settings)
        scheduler = get_scheduler(
            settings.lr_scheduler, optimizer, warmup_steps(settings, total_steps), total_steps
        )
        # the scheduler is not prepared: accelerate would step it once per process per update
        model, optimizer = accelerator.prepare(model, optimizer)
        if settings.gradient_checkpointing:
            enable_activation_checkpointing(
                accelerator.unwrap_model(model), settings.checkpoint_layers_every
            )
        model.train()
        return cls(Prepared(model, optimizer, scheduler), round_data, method, settings, accelerator)

    def load(self, checkpoint: Path) -> None:
        """Continue from an in-round checkpoint: model, optimizer, RNG, schedule, method state."""
        self.accelerator.load_state(str(checkpoint))
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler_state.pt"))
        if self.method_state is not None:
            self.method_state = load_method_state(checkpoint, self.method_state)
        if self.model_loss is not None:
            self.model_loss.load_state_dict(load_model_loss_state(checkpoint))

    def start_from_previous_round(self, place: RoundPlace) -> None:
        """A :class:`~gsil.methods.ModelLoss` starts from what the previous round handed on
        (SDFT's teacher), if it handed on anything."""
        if self.model_loss is None or place.round_index == 0:
            return
        state = load_carried_state(place.layout.model_loss_state(place.round_index - 1))
        if state is not None:
            self.model_loss.load_state_dict(state)

    def hand_on(self, place: RoundPlace) -> None:
        """Store what the round's :class:`~gsil.methods.ModelLoss` hands the next round."""
        state = self.model_loss.carried_state() if self.model_loss is not None else None
        if state is not None:
            path = place.layout.model_loss_state(place.round_index)
            save_carried_state(self.accelerator, path, state)

    def save(self, place: RoundPlace, step: int) -> None:
        """Write a resumable checkpoint after ``step`` optimizer steps of the round."""
        position = {
            "round": place.round_index,
            "step_in_round": step,
            "global_step": place.global_step_offset + step,
        }
        model_loss_state = self.model_loss.state_dict() if self.model_loss is not None else None
        save_checkpoint(
            self.accelerator,
            self.scheduler,
            place.layout,
            position,
            self.method_state,
            model_loss_state,
        )

    def finish(self) -> torch.nn.Module:
        """The prepared model, back in evaluation mode."""
        self.model.eval()
        if self.settings.gradient_checkpointing:
            disable_activation_checkpointing(self.accelerator.unwrap_model(self.model))
        return self.model

    def step(self, step_plan: StepPlan, where: str = "") -> dict:
        """Accumulate gradients over the step's micro-batches, clip, step; return mean stats.

        A micro-batch of n examples with k own samples each forwards ``n (1 + k)`` rows; the
        method gets the generated side as ``(n, k)`` (:mod:`gsil.batching`), and a statistic of
        that side is its mean over k. A stateful method's state is read for the step's
        examples and updated with the values its loss returns, from every process (one
        gather), unless the step's update is dropped.

        The step's loss is the mean over its ``num_examples`` real examples on all processes.
        Each micro-batch contributes ``sum(weight * loss) / num_examples``, multiplied by the
        number of processes (DDP, FSDP and DeepSpeed average gradients over processes) and by
        ``grad_accum`` (``accelerator.backward`` and DeepSpeed divide by it): exactly the
        one-process gradient.

        Non-finite guard (:mod:`gsil.nonfinite`, ``settings.on_nonfinite``), decided alike on
        every process: a NaN or infinite loss in any micro-batch (checked before the step's
        last backward, inside which DeepSpeed steps) or gradient norm (after the backward,
        before the optimizer steps). ``stop`` raises before the optimizer touches the weights;
        ``skip`` zeroes the gradients and does not step the optimizer but steps the
        learning-rate schedule, so every later step has the learning rate it has in a run
        without the skip; the row records ``skipped: 1``.
        """
        scale = self.accelerator.num_processes * self.settings.grad_accum / step_plan.num_examples
        totals = _StepTotals()
        nonfinite: list[int] = []  # this process's examples whose loss is NaN or infinite
        grad_norm, skip = None, False
        state_updates: list[tuple[int, float]] = []  # (example index, new state), real examples
        for micro in step_plan.micro_batches:
            with self.accelerator.accumulate(self.model):  # syncs gradients on the last one
                batch, losses, stats = self._forward_loss(micro, step_plan.mean_demo_tokens)
                nonfinite += nonfinite_rows(losses, micro.indices)
                if self.accelerator.sync_gradients:  # before the backward in which DeepSpeed steps
                    skip = self._vote("loss", nonfinite, where)
                weight = batch["weight"]
                self.accelerator.backward((losses * weight.to(losses.dtype)).sum() * scale)
                if self.accelerator.sync_gradients:
                    grad_norm = self.accelerator.clip_grad_norm_(
                        self.model.parameters(), self.settings.max_grad_norm
                    )
                    if not skip:  # the same on every process
                        skip = self._check_grad_norm(grad_norm, step_plan, where)
                if not skip:
                    self.optimizer.step()  # a no-op until gradients are synced
                self.optimizer.zero_grad(set_to_none=True)
            state_updates += self._state_updates(micro, stats)
            totals.add(stats, batch)
        with warnings.catch_warnings():  # torch warns when a skipped first step never stepped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()  # also after a skipped update: later steps keep their rate
        self._apply_state(state_updates, skip)
        if self.model_loss is not None and not skip:
            self.model_loss.after_update(self.accelerator.unwrap_model(self.model))
        means = totals.reduce(self.accelerator, step_plan)
        means["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        means["skipped"] = int(skip)
        return means

    def _forward_loss(
        self, micro: MicroBatch, step_mean_demo_tokens: float | None = None
    ) -> tuple[dict, torch.Tensor, dict]:
        """The micro-batch on the device, its per-example losses and statistics."""
        needs_generations = self.method.needs_generations
        batch = _to_device(
            _collate(self.data.examples, micro, self.data.pad_id, needs_generations),
            self.accelerator.device,
        )
        if self.model_loss is not None:  # the method forwards the model itself
            losses, stats = self.model_loss(self.model, batch)
            return batch, losses, {**stats, "loss": losses.detach()}
        index = batch["index"].cpu()
        average = self.settings.average_logps
        logps = forward_logps(
            self.model,
            batch,
            average,
            path=self.settings.logprob_path,
            prob_weighted=self.method.needs_prob_weighted_logps,
        )
        prob_weighted_demo = None
        if isinstance(logps, SequenceLogps):
            prob_weighted_demo, _ = split_demo_gen(logps.prob_weighted, len(index))
            logps = logps.logps
        policy_demo, policy_gen = split_demo_gen(logps, len(index))
        counts = batch["demo_token_counts"].float()
        gen_counts = batch.get("gen_token_counts")
        if gen_counts is not None:
            gen_counts = gen_counts.float()
            if average:  # the log-probs are per token already
                gen_counts = torch.ones_like(gen_counts)
        losses, stats = self.method.loss(
            LogpBatch(
                policy_demo_logps=policy_demo,
                demo_token_counts=torch.ones_like(counts) if average else counts,
                policy_gen_logps=policy_gen,
                ref_demo_logps=_take(self.data.ref_demo_logps, index, logps),
                ref_gen_logps=_take(self.data.ref_gen_logps, index, logps),
                gen_token_counts=gen_counts,
                gen_mask=batch.get("gen_mask"),
                state=_take(self.method_state, index, logps),
                policy_demo_prob_weighted_logps=prob_weighted_demo,
                step_mean_demo_tokens=step_mean_demo_tokens,
            )
        )
        stats = {**stats, "loss": losses.detach(), "logps/chosen": policy_demo.detach()}
        if policy_gen is not None:
            stats["logps/rejected"] = sample_mean(policy_gen.detach(), batch.get("gen_mask"))
        return batch, losses, stats

    def _vote(self, quantity: str, local: list[int], where: str) -> bool:
        return check_step(
            self.accelerator, self.settings.on_nonfinite, quantity, local, where, self.data.ids
        )

    def _check_grad_norm(self, grad_norm, step_plan: StepPlan, where: str) -> bool:
        bad = grad_norm is not None and not math.isfinite(float(grad_norm))
        real = [
            i
            for m in step_plan.micro_batches
            for i, w in zip(m.indices, m.weights, strict=True)
            if w
        ]
        return self._vote("gradient norm", real if bad else [], where)

    def _state_updates(self, micro: MicroBatch, stats: dict) -> list[tuple[int, float]]:
        if self.method_state is None:
            return []
        new_values = stats[self.method.state_key].float().cpu().tolist()
        return [
            (i, value)
            for i, w, value in zip(micro.indices, micro.weights, new_values, strict=True)
            if w
        ]

    def _apply_state(self, updates: list[tuple[int, float]], skip: bool) -> None:
        """Every process applies every process's updates (none when the step is dropped)."""
        if self.method_state is None:
            return
        if self.accelerator.num_processes > 1:
            updates = gather_object(updates)
        if not skip:
            for i, value in updates:
                self.method_state[i] = value


class _StepTotals:
    """One step's statistics summed over this process's real examples, then averaged over
    every process's examples with one collective."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = torch.zeros(())

    def add(self, stats: dict, batch: dict) -> None:
        weight = batch["weight"].cpu()
        for key, values in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + (values.float().cpu() * weight).sum()
        rows = batch["attention_mask"].sum(dim=1).cpu().view(-1, len(weight))  # (1 or 1 + k, n)
        self.tokens = self.tokens + (rows * weight).sum()

    def reduce(self, accelerator: Accelerator, step_plan: StepPlan) -> dict:
        examples = sum(sum(m.weights) for m in step_plan.micro_batches)
        local = torch.cat(
            [
                torch.stack(list(self.sums.values())),
                torch.tensor([examples]),
                self.tokens.view(1),
            ]
        )
        world = accelerator.reduce(local.to(accelerator.device), reduction="sum").tolist()
        world_examples, world_tokens = world[-2], world[-1]
        means = {key: value / world_examples for key, value in zip(self.sums, world, strict=False)}
        means["tokens"] = int(world_tokens)
        return means


def _take(values: torch.Tensor | None, index: torch.Tensor, like: torch.Tensor):
    return None if values is None else values[index].to(device=like.device, dtype=like.dtype)
