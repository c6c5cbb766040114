"""One round of optimisation: batches, gradient steps, metrics rows and resumable checkpoints.

The objective is a callable (:class:`~gsil.objectives.Objective`); nothing here knows which
loss it is. ``accelerate`` prepares the model and optimizer, so the same code runs on a CPU,
one GPU or several (``accelerate launch``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from gsil.batching import Example, collate, count_tokens, split_demo_gen
from gsil.io import atomic_dir, read_json, write_json
from gsil.logprobs import sequence_logps
from gsil.objectives import Objective


@dataclass(frozen=True)
class OptimSettings:
    """How each round is optimised (plain values; the run config builds this)."""

    learning_rate: float = 5e-6
    optimizer: str = "adamw"  # or "rmsprop" (the paper's script)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    epochs: int = 1
    batch_size: int = 8  # prompts per micro-batch (and device); a GSIL batch has 2x rows
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    average_logps: bool = False  # length-averaged log-probs instead of sums
    checkpoint_every: int = 50  # optimizer steps; 0 saves only at round end
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class RoundData:
    """Everything a round trains on: token ids and the stored reference log-probs."""

    examples: list[Example]
    ref_demo_logps: torch.Tensor | None
    ref_gen_logps: torch.Tensor | None


def forward_logps(model, batch: dict, average: bool) -> torch.Tensor:
    """Per-row response log-probs of a (demos, then generations) batch, in one forward."""
    outputs = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    return sequence_logps(outputs.logits, batch["labels"], average=average)


def _loader(examples: Sequence[Example], batch_size: int, pad_id: int, with_gen: bool):
    return DataLoader(
        list(examples),
        batch_size=batch_size,
        shuffle=False,  # order is fixed by the caller, so a resumed run sees the same batches
        collate_fn=lambda items: collate(items, pad_id, with_gen),
    )


@torch.no_grad()
def reference_logps(
    model, examples: Sequence[Example], pad_id: int, batch_size: int, average: bool,
    accelerator: Accelerator, with_generations: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Log-probs of every demo (and generated) response under the current model, no grad."""
    model.eval()
    count = len(examples)
    demo = torch.zeros(count, dtype=torch.float32)
    gen = torch.zeros(count, dtype=torch.float32) if with_generations else None
    loader = accelerator.prepare(_loader(examples, batch_size, pad_id, with_generations))
    for batch in tqdm(loader, desc="reference log-probs", disable=not accelerator.is_main_process):
        logps = forward_logps(model, batch, average)
        index = accelerator.gather_for_metrics(batch["index"]).cpu()
        demo_part, gen_part = split_demo_gen(logps, len(batch["index"]))
        demo[index] = accelerator.gather_for_metrics(demo_part).float().cpu()
        if gen is not None:
            gen[index] = accelerator.gather_for_metrics(gen_part).float().cpu()
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
) -> dict:
    """Optimise ``model`` on one round's data; returns the round's last-step metrics.

    Writes one metrics row per optimizer step to ``run_dir/metrics.jsonl`` and a checkpoint every
    ``settings.checkpoint_every`` steps; ``resume_state`` (from :func:`_load_checkpoint`)
    continues exactly where that checkpoint stopped.
    """
    with_gen = objective.needs_generations
    # batches each process sees per epoch (accelerate shards the loader across processes)
    batches_per_epoch = math.ceil(
        math.ceil(len(data.examples) / settings.batch_size) / accelerator.num_processes
    )
    steps_per_epoch = math.ceil(batches_per_epoch / settings.grad_accum)
    total_steps = steps_per_epoch * settings.epochs
    accelerator.free_memory()  # forget the previous round's prepared objects
    optimizer = _make_optimizer(model, settings)
    scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, total_steps)
    # the scheduler is not prepared: accelerate would step it once per process per update
    model, optimizer = accelerator.prepare(model, optimizer)
    step = 0
    if resume_state is not None:
        accelerator.load_state(str(run_dir / "checkpoint"))
        scheduler.load_state_dict(torch.load(run_dir / "checkpoint" / "scheduler_state.pt"))
        step = resume_state["step_in_round"]
    if settings.gradient_checkpointing:
        accelerator.unwrap_model(model).gradient_checkpointing_enable()
    model.train()
    metrics_path = run_dir / "metrics.jsonl"
    last_metrics: dict = {}
    progress = tqdm(
        total=total_steps, initial=step, desc=f"round {round_index} ({objective.name})",
        disable=not accelerator.is_main_process,
    )  # fmt: skip
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, settings.epochs):
        order = _epoch_order(len(data.examples), seed, round_index, epoch)
        loader = accelerator.prepare(
            _loader([data.examples[i] for i in order], settings.batch_size, pad_id, with_gen)
        )
        skip_steps = step - epoch * steps_per_epoch
        if skip_steps > 0:
            loader = accelerator.skip_first_batches(loader, skip_steps * settings.grad_accum)
        micro_batches: list[dict] = []
        for batch_number, batch in enumerate(loader, start=skip_steps * settings.grad_accum):
            micro_batches.append(batch)
            is_last = batch_number + 1 == batches_per_epoch
            if len(micro_batches) < settings.grad_accum and not is_last:
                continue
            step_start = time.perf_counter()
            stats = optimizer_step(
                model, micro_batches, data, objective, settings, optimizer, scheduler, accelerator
            )
            micro_batches = []
            step += 1
            last_metrics = {
                "round": round_index,
                "step": global_step_offset + step,
                "round_step": step,
                "epoch": epoch,
                "lr": scheduler.get_last_lr()[0],
                **stats,
                "step_seconds": round(time.perf_counter() - step_start, 4),
            }
            if accelerator.is_main_process:
                with metrics_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(last_metrics) + "\n")
            progress.update(1)
            progress.set_postfix(loss=f"{stats['loss']:.4f}")
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                _save_checkpoint(
                    accelerator, scheduler, run_dir, round_index, step, global_step_offset
                )
    progress.close()
    model.eval()
    if settings.gradient_checkpointing:
        accelerator.unwrap_model(model).gradient_checkpointing_disable()
    accelerator.free_memory()
    return last_metrics


def optimizer_step(
    model, micro_batches, data: RoundData, objective, settings, optimizer, scheduler, accelerator
) -> dict:
    """Accumulate gradients over ``micro_batches``, clip, step; return the step's mean stats."""
    total_examples = sum(len(b["index"]) for b in micro_batches)
    sums: dict[str, torch.Tensor] = {}  # per-key sums over this process's examples
    tokens = 0
    for position, batch in enumerate(micro_batches):
        index = batch["index"].cpu()
        num = len(index)
        logps = forward_logps(model, batch, settings.average_logps)
        policy_demo, policy_gen = split_demo_gen(logps, num)
        counts = batch["demo_token_counts"].to(logps.device).float()
        ref_demo = _take(data.ref_demo_logps, index, logps)
        ref_gen = _take(data.ref_gen_logps, index, logps)
        losses, stats = objective(
            policy_demo, policy_gen, ref_demo, ref_gen,
            torch.ones_like(counts) if settings.average_logps else counts,
        )  # fmt: skip
        # each micro-batch's share of the step's mean over examples
        loss = losses.sum() / total_examples
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed divides by its own gradient_accumulation_steps (= grad_accum) again
            loss = loss * len(micro_batches)
        syncing = position == len(micro_batches) - 1
        context = accelerator.no_sync(model) if not syncing else nullcontext()
        with context:
            accelerator.backward(loss)
        stats = {**stats, "loss": losses.detach(), "logps/demo": policy_demo.detach()}
        if policy_gen is not None:
            stats["logps/gen"] = policy_gen.detach()
        for key, values in stats.items():
            sums[key] = sums.get(key, 0.0) + values.float().sum()
        tokens += count_tokens(batch)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # one collective per step: every key's sum, the example count and the token count
    counts = torch.tensor([float(total_examples), float(tokens)])
    local = torch.cat([torch.stack([v.cpu() for v in sums.values()]), counts])
    world = accelerator.reduce(local.to(accelerator.device), reduction="sum").tolist()
    world_examples, world_tokens = world[-2], world[-1]
    means = {key: value / world_examples for key, value in zip(sums, world, strict=False)}
    means["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    means["tokens"] = int(world_tokens)
    return means


def _take(values: torch.Tensor | None, index: torch.Tensor, like: torch.Tensor):
    return None if values is None else values[index].to(device=like.device, dtype=like.dtype)


def _save_checkpoint(accelerator, scheduler, run_dir: Path, round_index: int, step: int, offset):
    """Model, optimizer, scheduler and RNG states plus the step, replaced atomically."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(run_dir / "checkpoint") as staging:
            accelerator.save_state(str(staging))
            torch.save(scheduler.state_dict(), staging / "scheduler_state.pt")
            write_json(
                staging / "trainer_state.json",
                {"round": round_index, "step_in_round": step, "global_step": offset + step},
            )
    accelerator.wait_for_everyone()


def load_checkpoint(run_dir: Path) -> dict | None:
    state_file = run_dir / "checkpoint" / "trainer_state.json"
    return read_json(state_file) if state_file.exists() else None


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
