"""The self-imitation round loop (theory page, section 5) and its optimisation.

    pi_0 = the starting model
    for t in 0..T-1:
        y_gen ~ pi_t(.|x) for every demonstration prompt           (generated set, cached JSONL)
        log pi_t(y_demo|x), log pi_t(y_gen|x), once, without grad   (stored: no reference model)
        train pi_theta from pi_t on the objective with pi_ref = pi_t
        pi_{t+1} = pi_theta                                        (saved as round_t/model)

The trainer gets an :class:`~gsil.objectives.Objective` and never asks which loss it is; the
objective's flags say whether generations and reference log-probs are needed. ``accelerate``
carries the same code from a CPU to several GPUs (``accelerate launch``, DDP/FSDP/DeepSpeed).

Run directory layout::

    metrics.jsonl                 one row per optimizer step
    round_<t>/generated.jsonl     the round's self-generated set (+ .settings.json)
    round_<t>/reference_logps.pt  the round's reference log-probs
    round_<t>/model/              the policy after the round
    round_<t>/summary.json        the round's figures; its presence marks the round done
    checkpoint/                   latest in-round state (model, optimizer, scheduler, RNG, step)
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from gsil.batching import build_examples
from gsil.data import tie_mask
from gsil.faults import kill_point
from gsil.generation import GenerationSettings, generate_set, resolve_backend
from gsil.integrity import CorruptFileError, discard_manifest, verify_manifest, write_manifest
from gsil.io import atomic_file, read_json, write_json
from gsil.layout import RunLayout
from gsil.models import apply_lora, is_peft_model
from gsil.objectives import Objective
from gsil.optimization import (
    OptimSettings,
    RoundData,
    check_processes,
    full_parameters,
    is_zero3,
    load_checkpoint,
    reference_logps,
    save_round_model,
    train_round,
    truncate_metrics,
)
from gsil.tracking import finish_trackers, restart_trackers_at

logger = logging.getLogger(__name__)


def prepare_round(
    model,
    tokenizer,
    demos,
    objective: Objective,
    run: RunLayout,
    round_index: int,
    *,
    generation: GenerationSettings,
    seed: int,
    max_prompt_length: int | None,
    max_length: int,
    batch_size: int,
    average_logps: bool,
    drop_ties: bool,
    accelerator: Accelerator,
    engine: Any = None,
    extra_settings: dict | None = None,
) -> tuple[RoundData, dict]:
    """Generate (or reuse) the round's own responses and store its reference log-probs.

    ``seed`` seeds the round's sampling; ``extra_settings`` (the round, the precision) are
    recorded beside the generated set. ``engine`` (a
    :class:`~gsil.generation.vllm_engine.VLLMEngine` holding this round's policy) generates
    instead of the model itself when given.

    Each prompt gets ``generation.num_samples`` (k) responses. Ties (a response equal to its
    demonstration) are counted per response (``info["ties"]``); ``drop_ties`` leaves each tied
    response out of the loss, and drops a prompt whose k responses all tie."""
    info: dict = {"num_demonstrations": len(demos)}
    generations = gen_mask = None
    num_samples = generation.num_samples
    started = time.perf_counter()
    if objective.needs_generations:
        # the same precision as training (bf16 autocast when mixed precision is on); each
        # process generates its share, the main process writes the set
        policy = accelerator.unwrap_model(model)
        with accelerator.autocast(), full_parameters(accelerator, policy):
            generations = generate_set(
                engine or policy,
                tokenizer,
                demos,
                run.generated(round_index),
                max_new_tokens=generation.max_new_tokens,
                do_sample=generation.do_sample,
                temperature=generation.temperature,
                top_p=generation.top_p,
                top_k=generation.top_k,
                batch_size=generation.batch_size,
                backend=generation.backend,
                seed=seed,
                max_prompt_length=max_prompt_length,
                progress=accelerator.is_main_process,
                extra_settings=extra_settings,
                accelerator=accelerator,
                num_samples=num_samples,
            )
        kill_point("generation")  # test hook (gsil.faults): the set is written
        # response j to demos[i] is generations[i * k + j]; a tie is one response
        ties = tie_mask([d.response for d in demos for _ in range(num_samples)], generations)
        info["ties"] = sum(ties)
        if drop_ties:
            kept = [
                not all(ties[i * num_samples : (i + 1) * num_samples]) for i in range(len(demos))
            ]
            demos = [d for d, keep in zip(demos, kept, strict=True) if keep]
            generations = [g for n, g in enumerate(generations) if kept[n // num_samples]]
            gen_mask = [not tie for n, tie in enumerate(ties) if kept[n // num_samples]]
            if not demos:
                raise RuntimeError(
                    "every generated response equals its demonstration; nothing to contrast "
                    "(run without --drop-ties or with sampled generation)"
                )
        info["num_trained"] = len(demos)
    info["generation_seconds"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    examples = build_examples(
        tokenizer,
        [d.prompt for d in demos],
        [d.response for d in demos],
        generations,
        max_prompt_length=max_prompt_length,
        max_length=max_length,
        num_samples=num_samples if generations is not None else 1,
        gen_mask=gen_mask,
    )
    ref_demo = ref_gen = None
    if objective.needs_reference:
        ref_path = run.reference_logps(round_index)
        if ref_path.exists():
            ref_demo, ref_gen = _load_reference_logps(ref_path, len(examples))
        else:
            pad_id = tokenizer.pad_token_id
            # autocast like the training forward, so that Delta = 0 at the first step
            with accelerator.autocast(), full_parameters(accelerator, model):
                ref_demo, ref_gen = reference_logps(
                    model,
                    examples,
                    pad_id,
                    batch_size,
                    average_logps,
                    accelerator,
                    objective.needs_generations,
                )
            if accelerator.is_main_process:
                discard_manifest(
                    ref_path
                )  # a crash before the new one leaves none, not a stale one
                with atomic_file(ref_path, "wb") as handle:
                    torch.save({"demo": ref_demo, "gen": ref_gen}, handle)
                write_manifest(ref_path)
        info["ref_logps/chosen"] = float(ref_demo.mean())
        if ref_gen is not None:
            info["ref_logps/rejected"] = float(ref_gen.mean())
    info["reference_seconds"] = round(time.perf_counter() - started, 3)
    accelerator.wait_for_everyone()
    return RoundData(examples, ref_demo, ref_gen, ids=[d.id for d in demos]), info


def run_rounds(
    model,
    tokenizer,
    demos: Sequence,
    objective: Objective,
    run_dir: str | Path,
    *,
    rounds: int,
    optim: OptimSettings,
    generation: GenerationSettings | None = None,
    max_prompt_length: int | None,
    max_length: int,
    seed: int = 0,
    drop_ties: bool = False,
    resume: bool = False,
    lora_rank: int = 0,
    accelerator: Accelerator | None = None,
) -> dict:
    """Run ``rounds`` self-imitation rounds; returns (and writes) the run summary.

    With ``resume=True`` finished rounds are skipped (the last round's model is reloaded) and an
    interrupted round continues from its checkpoint, with the same data order, optimizer,
    scheduler and RNG state, so the final weights equal those of an uninterrupted run.
    ``generation`` is how each round generates (default :class:`GenerationSettings`); round
    ``t`` samples with seed ``seed + t``.

    Each metrics row also goes to the accelerator's trackers (started by the caller with
    :func:`gsil.tracking.start_trackers`); they are finished when the run ends, even by an error.
    """
    run_dir = Path(run_dir)
    run = RunLayout(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    check_processes(accelerator)
    # Round 0's generation and reference pass run before accelerate prepares the model, on
    # batches placed on accelerator.device: a policy given on another device goes there first
    # (found on a GPU machine with a policy built on the CPU). ZeRO-3 places its own shards.
    if not is_zero3(accelerator):
        model = model.to(accelerator.device)
    pad_id = tokenizer.pad_token_id
    if not resume and accelerator.is_main_process:
        _reset_run_outputs(run)
    accelerator.wait_for_everyone()
    checkpoint = load_checkpoint(run_dir) if resume else None
    summary: dict = {"objective": objective.name, "rounds": []}
    global_step = 0
    restarted = not resume  # a resumed run first drops what the interrupted attempt logged
    # one vLLM engine for the whole run (if vLLM generates), holding each round's policy
    generation = generation or GenerationSettings()
    vllm = _RunEngine(
        objective.needs_generations, generation, seed, tokenizer, accelerator, max_length
    )
    try:
        for round_index in range(rounds):
            done_file = run.round_summary(round_index)
            if resume and done_file.exists():
                round_summary = read_json(done_file)
                summary["rounds"].append(round_summary)
                global_step = round_summary["global_step"]
                if not run.round_summary(round_index + 1).exists():
                    # the last finished round: continue from its policy
                    model = _load_round_weights(
                        model, run.model(round_index), lora_rank, seed + round_index + 1
                    )
                continue
            torch.manual_seed(seed + round_index)
            started = time.perf_counter()
            data, info = prepare_round(
                model,
                tokenizer,
                demos,
                objective,
                run,
                round_index,
                generation=generation,
                seed=seed + round_index,
                extra_settings={
                    "round": round_index,
                    "mixed_precision": accelerator.mixed_precision,
                },
                max_prompt_length=max_prompt_length,
                max_length=max_length,
                batch_size=optim.batch_size,
                average_logps=optim.average_logps,
                drop_ties=drop_ties,
                accelerator=accelerator,
                engine=vllm.engine_for(model),
            )
            resume_state = checkpoint if checkpoint and checkpoint["round"] == round_index else None
            if not restarted:
                # the interrupted attempt may have logged steps past the point this one restarts
                # from (its checkpoint, else the last finished round): they are done again
                kept = resume_state["global_step"] if resume_state else global_step
                if accelerator.is_main_process:
                    truncate_metrics(run.metrics, kept)
                restart_trackers_at(accelerator, kept + 1)
                restarted = True
            training_started = time.perf_counter()
            last, prepared = train_round(
                model,
                data,
                objective,
                optim,
                round_index=round_index,
                seed=seed,
                pad_id=pad_id,
                run_dir=run_dir,
                accelerator=accelerator,
                resume_state=resume_state,
                global_step_offset=global_step,
            )
            info["training_seconds"] = round(time.perf_counter() - training_started, 3)
            global_step = last.get("step", global_step)
            save_round_model(accelerator, prepared, tokenizer, run.model(round_index))
            policy = accelerator.unwrap_model(prepared)
            # drop the wrapper and the optimizer state before the next round generates
            del prepared
            accelerator.free_memory()
            round_summary = {
                "round": round_index,
                **info,
                "num_processes": accelerator.num_processes,
                "global_step": global_step,
                "seconds": round(time.perf_counter() - started, 2),
                "last_step": last,
            }
            if accelerator.is_main_process:
                write_json(done_file, round_summary)
                shutil.rmtree(run.checkpoint, ignore_errors=True)
            summary["rounds"].append(round_summary)
            if is_peft_model(policy) and round_index + 1 < rounds:
                # pi_{t+1} is the merged policy; the next round trains fresh adapters on it
                model = _fresh_adapters(
                    policy.merge_and_unload(), lora_rank, seed + round_index + 1
                )
            accelerator.wait_for_everyone()
    finally:
        vllm.close()
        finish_trackers(accelerator)
    return summary


class _RunEngine:
    """The run's vLLM engine: started at the first round that generates (40-60 s on 2 CPU cores),
    then given each later round's policy in memory; closed when the run ends."""

    def __init__(
        self,
        needed: bool,
        generation: GenerationSettings,
        seed: int,
        tokenizer,
        accelerator,
        max_length: int,
    ):
        self.used = needed and resolve_backend(generation.backend) == "vllm"
        self.tokenizer, self.accelerator = tokenizer, accelerator
        # a prompt may take max_length - 1 tokens, and its response max_new_tokens more
        self.max_length = max_length + generation.max_new_tokens
        self.seed = seed
        self.slot = None

    def engine_for(self, model):
        if not self.used:
            return None
        if self.slot is None:
            from gsil.generation.vllm_engine import EngineSlot

            bf16 = self.accelerator.mixed_precision == "bf16"
            self.slot = EngineSlot(
                dtype="bfloat16" if bf16 else "float32",
                seed=self.seed,
                max_model_len=self.max_length,
            )
        policy = self.accelerator.unwrap_model(model)
        with full_parameters(self.accelerator, policy):
            return self.slot.serve(policy, self.tokenizer)

    def close(self) -> None:
        if self.slot is not None:
            self.slot.close()


def _reset_run_outputs(run: RunLayout) -> None:
    """A fresh (non-resumed) run must not mix with an earlier run's files in the same dir."""
    for stale in [
        run.metrics,
        run.checkpoint,
        run.checkpoint_staging,
    ]:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    for round_dir in run.round_dirs():
        shutil.rmtree(round_dir)


def _fresh_adapters(base, lora_rank: int, seed: int):
    """New LoRA adapters on ``base`` for the next round, initialised from ``seed`` alone: the
    same whether the run went on without a stop or resumed at the round's start (the global
    RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return apply_lora(base, rank=lora_rank)


def _load_round_weights(model, model_dir: Path, lora_rank: int, seed: int):
    """Load a finished round's (merged) weights into ``model``; fresh adapters if LoRA."""
    from safetensors.torch import load_file

    verify_manifest(
        model_dir,
        what="round model",
        fix=(
            f"Delete {model_dir.parent}, the later round_<t> directories and checkpoint/ beside it "
            "(made from this model), then rerun with --resume to train them again; or start "
            "without --resume"
        ),
    )
    base = model.merge_and_unload() if is_peft_model(model) else model
    state = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = base.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"round weights at {model_dir} do not fit the model: {missing[:3]}")
    if getattr(base.config, "tie_word_embeddings", False):
        base.tie_weights()
    return _fresh_adapters(base, lora_rank, seed) if lora_rank > 0 else base


def _load_reference_logps(path: Path, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A round's stored reference log-probs, checked against their manifest and the round's
    ``count`` examples (on every process alike).

    Raises:
        CorruptFileError: the file is truncated, changed, unreadable or holds another number
            of examples; the message names it and the fix.
    """
    fix = f"Delete {path} (and its .manifest.json) to compute them again, or start without --resume"
    verify_manifest(path, what="reference log-probs", fix=fix)
    try:
        stored = torch.load(path)
        demo, gen = stored["demo"], stored["gen"]
    except Exception as error:  # torch.load raises pickle, zip and runtime errors alike
        raise CorruptFileError(path, f"unreadable reference log-probs ({error!r})", fix) from error
    if demo.shape[0] != count or (gen is not None and gen.shape[0] != count):
        sizes = f"{demo.shape[0]} demonstration" + (
            f" and {gen.shape[0]} own-sample" if gen is not None else ""
        )
        raise CorruptFileError(
            path,
            f"holds {sizes} log-probs, but the round has {count} "
            "examples (another data set, or --drop-ties changed)",
            fix,
        )
    return demo, gen
