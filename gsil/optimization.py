"""One round of optimisation: batches, gradient steps, metrics rows and resumable checkpoints.

The objective is a callable (:class:`~gsil.objectives.Objective`); nothing here knows which
loss it is. ``accelerate`` prepares the model and optimizer, so the same code runs on a CPU,
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
    loss                          loss                 the objective (GSIL, SPIN, SFT or DFT)
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
    logps/chosen_per_token        (none)               SFT: token-mean log pi_theta(demo)
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

import copy
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.utils import InitProcessGroupKwargs, gather_object
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from gsil.batching import Example, collate, split_demo_gen
from gsil.faults import kill_point
from gsil.integrity import (
    CorruptFileError,
    NonFiniteError,
    all_processes,
    any_process,
    nonfinite_rows,
    verify_manifest,
    write_manifest,
)
from gsil.io import read_json, replace_dir, write_json
from gsil.layout import RunLayout
from gsil.logprobs import LOGPROB_PATHS, model_sequence_logps
from gsil.objectives import Objective, sample_mean
from gsil.tracking import accelerator_tracking_kwargs, log_metrics

logger = logging.getLogger(__name__)


OBJECTIVE_STATE_FILE = "objective_state.pt"  # in the checkpoint, beside scheduler_state.pt


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
    warmup_steps: int = _opt(0, "linear warm-up steps (then linear decay to 0 over the round)")
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
    gradient_checkpointing: bool = _opt(False, "trade compute for activation memory")
    on_nonfinite: str = _opt(
        "stop",
        "a NaN or inf loss or gradient norm: stop (raise before the "
        "optimizer steps, naming the examples) or skip (drop that step's "
        "update, record skipped=1)",
        choices=("stop", "skip"),
    )
    logprob_path: str = _opt(
        "lean",
        "how response log-probs are computed: lean (only response positions through the "
        "output layer, in chunks recomputed in the backward: no batch x length x vocabulary "
        "logits) or plain (the model's full logits)",
        choices=LOGPROB_PATHS,
    )


@dataclass(frozen=True)
class RoundData:
    """Everything a round trains on: token ids and the stored reference log-probs."""

    examples: list[Example]
    ref_demo_logps: torch.Tensor | None
    ref_gen_logps: torch.Tensor | None
    ids: Sequence | None = None  # the demonstrations' ids, by example index (errors name them)


def forward_logps(
    model, batch: dict, average: bool, *, path: str = OptimSettings.logprob_path
) -> torch.Tensor:
    """Per-row response log-probs of a (demos, then generations) batch, in one forward, by the
    log-prob ``path`` (:func:`gsil.logprobs.model_sequence_logps`)."""
    return model_sequence_logps(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        average=average,
        path=path,
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
    short last step, so every engine steps once per optimizer step) and the number of real
    examples the step has across all processes (the loss is their mean)."""

    micro_batches: tuple[MicroBatch, ...]
    num_examples: int


def rank_share(batch: Sequence[int], num_processes: int, rank: int) -> MicroBatch:
    """This process's contiguous share of one global micro-batch (sizes differ by at most 1)."""
    base, extra = divmod(len(batch), num_processes)
    start = rank * base + min(rank, extra)
    size = base + (rank < extra)
    if size == 0:
        return MicroBatch((batch[0],), (0.0,))
    return MicroBatch(tuple(batch[start : start + size]), (1.0,) * size)


def plan_steps(
    order: Sequence[int], batch_size: int, grad_accum: int, num_processes: int, rank: int
) -> list[StepPlan]:
    """Split one epoch's example order into this process's optimizer steps.

    A global micro-batch is ``batch_size * num_processes`` consecutive examples of ``order``;
    each process takes its share. So N processes with micro-batch b see, step by step, the same
    examples as one process with micro-batch N b: the same global batch, the same result.
    """
    width = batch_size * num_processes
    global_batches = [order[i : i + width] for i in range(0, len(order), width)]
    steps = []
    for first in range(0, len(global_batches), grad_accum):
        group = global_batches[first : first + grad_accum]
        micro = [rank_share(batch, num_processes, rank) for batch in group]
        filler = MicroBatch((group[0][0],), (0.0,))
        micro += [filler] * (grad_accum - len(micro))
        steps.append(StepPlan(tuple(micro), sum(len(batch) for batch in group)))
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
    pad_id: int,
    batch_size: int,
    average: bool,
    accelerator: Accelerator,
    with_generations: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of every demo (and generated) response under the current model, no grad:
    demonstrations ``(N,)``, generated responses ``(N, k)`` (None without generations).

    Each process scores its share of every batch; one gather at the end puts the values back
    in example order on every process.
    """
    model.eval()
    count = len(examples)
    num_samples = len(examples[0].gen_ids) if with_generations and examples else 1
    plan = plan_steps(
        range(count), batch_size, 1, accelerator.num_processes, accelerator.process_index
    )
    local: list[tuple[int, float, list[float]]] = []
    for step in tqdm(plan, desc="reference log-probs", disable=not accelerator.is_main_process):
        (micro,) = step.micro_batches
        batch = _to_device(_collate(examples, micro, pad_id, with_generations), accelerator.device)
        demo_part, gen_part = split_demo_gen(
            forward_logps(model, batch, average), len(micro.indices)
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


def train_round(
    model,
    data: RoundData,
    objective: Objective,
    settings: OptimSettings,
    *,
    round_index: int,
    seed: int,
    pad_id: int,
    run_dir: Path,
    accelerator: Accelerator,
    resume_state: dict | None = None,
    global_step_offset: int = 0,
) -> tuple[dict, torch.nn.Module]:
    """Optimise ``model`` on one round's data; returns the last step's metrics and the prepared
    (wrapped) model, which the caller saves with :func:`save_round_model`.

    Writes one metrics row per optimizer step to ``run_dir/metrics.jsonl`` (main process), logs
    it to the accelerator's trackers (:func:`gsil.tracking.log_metrics`), and writes a
    checkpoint every ``settings.checkpoint_every`` steps (every process); ``resume_state`` (from
    :func:`load_checkpoint`) continues exactly where that checkpoint stopped.

    A stateful objective (DFT's per-prompt moving average) starts the round from
    :meth:`~gsil.objectives.Objective.initial_state`; its state lives on every process (the
    same values: each step's updates are gathered), is saved in every checkpoint
    (``objective_state.pt``) and loaded with it on resume. A new round starts it afresh: the
    round's reference and samples are new.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = len(
        plan_steps(range(len(data.examples)), settings.batch_size, settings.grad_accum, world, rank)
    )
    total_steps = steps_per_epoch * settings.epochs
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
    scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, total_steps)
    # the scheduler is not prepared: accelerate would step it once per process per update
    model, optimizer = accelerator.prepare(model, optimizer)
    step = 0
    if resume_state is not None:
        checkpoint = RunLayout(run_dir).checkpoint
        accelerator.load_state(str(checkpoint))
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler_state.pt"))
        step = resume_state["step_in_round"]
    objective_state = objective.initial_state(len(data.examples))
    if resume_state is not None and objective_state is not None:
        objective_state = _load_objective_state(RunLayout(run_dir).checkpoint, objective_state)
    if settings.gradient_checkpointing:
        accelerator.unwrap_model(model).gradient_checkpointing_enable()
    model.train()
    metrics_path = RunLayout(run_dir).metrics
    last_metrics: dict = {}
    progress = tqdm(
        total=total_steps,
        initial=step,
        desc=f"round {round_index} ({objective.name})",
        disable=not accelerator.is_main_process,
    )
    for epoch in range(step // steps_per_epoch, settings.epochs):
        order = _epoch_order(len(data.examples), seed, round_index, epoch)
        plan = plan_steps(order, settings.batch_size, settings.grad_accum, world, rank)
        for step_plan in plan[step - epoch * steps_per_epoch :]:
            step_start = time.perf_counter()
            stats = optimizer_step(
                model,
                step_plan,
                data,
                objective,
                settings,
                optimizer,
                scheduler,
                accelerator,
                pad_id,
                where=f"round {round_index}, step {global_step_offset + step + 1} "
                f"(step {step + 1} of the round)",
                objective_state=objective_state,
            )
            step += 1
            last_metrics = {
                "round": round_index,
                "step": global_step_offset + step,
                "round_step": step,
                "epoch": step / steps_per_epoch,  # fractional, within the round (as TRL's)
                "learning_rate": scheduler.get_last_lr()[0],
                **stats,
                "step_seconds": round(time.perf_counter() - step_start, 4),
            }
            if accelerator.is_main_process:
                with metrics_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(last_metrics) + "\n")
            log_metrics(accelerator, last_metrics, step=last_metrics["step"])
            progress.update(1)
            progress.set_postfix(loss=f"{stats['loss']:.4f}")
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                _save_checkpoint(
                    accelerator,
                    scheduler,
                    run_dir,
                    round_index,
                    step,
                    global_step_offset,
                    objective_state=objective_state,
                )
            kill_point("training")  # test hook (gsil.faults): after the step and its checkpoint
    progress.close()
    model.eval()
    if settings.gradient_checkpointing:
        accelerator.unwrap_model(model).gradient_checkpointing_disable()
    return last_metrics, model


def optimizer_step(
    model,
    step_plan: StepPlan,
    data: RoundData,
    objective: Objective,
    settings: OptimSettings,
    optimizer,
    scheduler,
    accelerator: Accelerator,
    pad_id: int,
    *,
    where: str = "",
    objective_state: torch.Tensor | None = None,
) -> dict:
    """Accumulate gradients over the step's micro-batches, clip, step; return mean stats.

    A micro-batch of n examples with k own samples each forwards ``n (1 + k)`` rows; the
    objective gets the generated side as ``(n, k)`` (:mod:`gsil.batching`), and a statistic of
    that side is its mean over k. ``objective_state`` (a stateful objective's per-example state,
    ``(N,)``, from :meth:`~gsil.objectives.Objective.initial_state`) is read for the step's
    examples and updated in place with the values the objective returns, from every process
    (one gather), unless the step's update is dropped.

    The step's loss is the mean over its ``num_examples`` real examples on all processes. Each
    micro-batch contributes ``sum(weight * loss) / num_examples``, multiplied by the number of
    processes (DDP, FSDP and DeepSpeed average gradients over processes) and by ``grad_accum``
    (``accelerator.backward`` and DeepSpeed divide by it): exactly the one-process gradient.

    Non-finite guard (``settings.on_nonfinite``), decided alike on every process (an
    all-reduce of a flag per check): a NaN or infinite loss in any micro-batch (checked before
    the step's last backward, inside which DeepSpeed steps) or gradient norm (after the
    backward, before the optimizer steps). ``stop`` raises :class:`~gsil.integrity.NonFiniteError`
    naming ``where`` and the examples' ids, before the optimizer touches the weights (under
    DeepSpeed a non-finite gradient with finite losses is seen only after its engine stepped,
    and the error says so). ``skip`` zeroes the gradients and does not step the optimizer
    (its state is untouched) but steps the learning-rate schedule, so every later step has
    the learning rate it has in a run without the skip; the row records ``skipped: 1``.
    """
    scale = accelerator.num_processes * settings.grad_accum / step_plan.num_examples
    sums: dict[str, torch.Tensor] = {}  # per-key weighted sums over this process's examples
    tokens = torch.zeros(())
    grad_norm = None
    nonfinite: list[int] = []  # this process's examples whose loss is NaN or infinite
    skip = False
    state_updates: list[tuple[int, float]] = []  # (example index, new state) of real examples
    for micro in step_plan.micro_batches:
        batch = _to_device(
            _collate(data.examples, micro, pad_id, objective.needs_generations), accelerator.device
        )
        weight = batch["weight"]
        index = batch["index"].cpu()
        with accelerator.accumulate(model):  # syncs gradients on the step's last micro-batch
            logps = forward_logps(model, batch, settings.average_logps)
            policy_demo, policy_gen = split_demo_gen(logps, len(index))
            counts = batch["demo_token_counts"].float()
            ref_demo = _take(data.ref_demo_logps, index, logps)
            ref_gen = _take(data.ref_gen_logps, index, logps)
            gen_counts = batch.get("gen_token_counts")
            if gen_counts is not None:
                gen_counts = gen_counts.float()
                if settings.average_logps:  # the log-probs are per token already
                    gen_counts = torch.ones_like(gen_counts)
            losses, stats = objective(
                policy_demo,
                policy_gen,
                ref_demo,
                ref_gen,
                torch.ones_like(counts) if settings.average_logps else counts,
                gen_mask=batch.get("gen_mask"),
                gen_token_counts=gen_counts,
                state=_take(objective_state, index, logps),
            )
            nonfinite += nonfinite_rows(losses, micro.indices)
            if accelerator.sync_gradients:  # before the backward in which DeepSpeed steps
                skip = _nonfinite_step(accelerator, settings, data, "loss", nonfinite, where)
            accelerator.backward((losses * weight.to(losses.dtype)).sum() * scale)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                if not skip:  # the same on every process
                    bad = grad_norm is not None and not math.isfinite(float(grad_norm))
                    real = [
                        i
                        for m in step_plan.micro_batches
                        for i, w in zip(m.indices, m.weights, strict=True)
                        if w
                    ]
                    skip = _nonfinite_step(
                        accelerator, settings, data, "gradient norm", real if bad else [], where
                    )
            if not skip:
                optimizer.step()  # a no-op until gradients are synced
            optimizer.zero_grad(set_to_none=True)
        stats = {**stats, "loss": losses.detach(), "logps/chosen": policy_demo.detach()}
        if policy_gen is not None:
            stats["logps/rejected"] = sample_mean(policy_gen.detach(), batch.get("gen_mask"))
        if objective_state is not None:
            new_values = stats[objective.state_key].float().cpu().tolist()
            state_updates += [
                (i, value)
                for i, w, value in zip(micro.indices, micro.weights, new_values, strict=True)
                if w
            ]
        for key, values in stats.items():
            sums[key] = sums.get(key, 0.0) + (values.float().cpu() * weight.cpu()).sum()
        rows = batch["attention_mask"].sum(dim=1).cpu().view(-1, len(index))  # (1 or 1 + k, n)
        tokens = tokens + (rows * weight.cpu()).sum()
    with warnings.catch_warnings():  # torch warns when a skipped first step never stepped
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()  # also after a skipped update: later steps keep their learning rate
    if objective_state is not None:  # every process applies every process's updates
        if accelerator.num_processes > 1:
            state_updates = gather_object(state_updates)
        if not skip:
            for i, value in state_updates:
                objective_state[i] = value
    # one collective per step: every key's sum, the example count and the token count
    local = torch.cat(
        [
            torch.stack(list(sums.values())),
            torch.tensor([sum(sum(m.weights) for m in step_plan.micro_batches)]),
            tokens.view(1),
        ]
    )
    world = accelerator.reduce(local.to(accelerator.device), reduction="sum").tolist()
    world_examples, world_tokens = world[-2], world[-1]
    means = {key: value / world_examples for key, value in zip(sums, world, strict=False)}
    means["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    means["tokens"] = int(world_tokens)
    means["skipped"] = int(skip)
    return means


def _nonfinite_step(
    accelerator: Accelerator,
    settings: OptimSettings,
    data: RoundData,
    quantity: str,
    local: Sequence[int],
    where: str,
) -> bool:
    """Whether to drop this step's update for a non-finite ``quantity`` found at the example
    indices ``local`` on this process (a collective: every process calls it, all decide alike).

    Returns False when no process found one; with ``on_nonfinite == "skip"`` logs a warning
    and returns True; with ``"stop"`` raises :class:`NonFiniteError` on every process.
    """
    if not any_process(accelerator, bool(local)):
        return False
    indices = list(dict.fromkeys(all_processes(accelerator, local)))
    ids = [data.ids[i] if data.ids is not None else f"#{i}" for i in indices]
    applied = quantity != "loss" and accelerator.distributed_type == DistributedType.DEEPSPEED
    error = NonFiniteError(quantity, ids, where, applied=applied)
    if settings.on_nonfinite == "stop" or applied:
        raise error
    logger.warning("%s: this step's update is dropped (--on-nonfinite skip)", error.describe())
    return True


def _take(values: torch.Tensor | None, index: torch.Tensor, like: torch.Tensor):
    return None if values is None else values[index].to(device=like.device, dtype=like.dtype)


def configure_engine(accelerator: Accelerator, settings: OptimSettings) -> None:
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


def resolve_deepspeed_config(ds_config: dict, settings: OptimSettings, num_processes: int) -> dict:
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


def _save_checkpoint(
    accelerator,
    scheduler,
    run_dir: Path,
    round_index: int,
    step: int,
    offset,
    objective_state: torch.Tensor | None = None,
):
    """Model, optimizer, scheduler and every process's RNG state plus the step (and a stateful
    objective's state, the same on every process), replaced whole.

    ``save_state`` runs on every process: it is a collective under DeepSpeed and FSDP, and each
    process writes its own RNG state. The main process then records every file's size and
    sha256 in ``manifest.json`` (:mod:`gsil.integrity`) and swaps the new directory in.
    """
    staging = RunLayout(run_dir).checkpoint_staging
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), staging / "scheduler_state.pt")
        if objective_state is not None:
            torch.save(objective_state.clone(), staging / OBJECTIVE_STATE_FILE)
        write_json(
            staging / "trainer_state.json",
            {"round": round_index, "step_in_round": step, "global_step": offset + step},
        )
        write_manifest(staging)
        replace_dir(staging, RunLayout(run_dir).checkpoint)
    accelerator.wait_for_everyone()


def _load_objective_state(checkpoint: Path, initial: torch.Tensor) -> torch.Tensor:
    """A stateful objective's per-example state saved in ``checkpoint``, checked against the
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


def load_checkpoint(run_dir: Path) -> dict | None:
    """The checkpoint's trainer state (round, step), after checking every file of it against
    its manifest (:func:`gsil.integrity.verify_manifest`; on every process, before
    :func:`train_round` loads it); None without a checkpoint.

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
