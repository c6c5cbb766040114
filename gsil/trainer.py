"""The self-imitation round loop (theory page, section 5) and its optimisation.

    pi_0 = the starting model
    for t in 0..T-1:
        y_gen ~ pi_t(.|x) for every demonstration prompt           (generated set, cached JSONL)
        log pi_t(y_demo|x), log pi_t(y_gen|x), once, without grad   (stored: no reference model)
        train pi_theta from pi_t on the objective with pi_ref = pi_t
        pi_{t+1} = pi_theta                                        (saved as round_t/model)

The trainer gets a :class:`~gsil.methods.Method` and never asks which loss it is; the method's
flags say whether generations and reference log-probs are needed. Each round is four named
stages of :class:`SelfImitation` -- :meth:`~SelfImitation.generate`,
:meth:`~SelfImitation.reference_pass`, :meth:`~SelfImitation.train`,
:meth:`~SelfImitation.save` -- and :func:`run_rounds` runs them round after round. ``accelerate``
carries the same code from a CPU to several GPUs (``accelerate launch``, DDP/FSDP/DeepSpeed).

Run directory layout::

    metrics.jsonl                 one row per optimizer step
    round_<t>/generated.jsonl     the round's self-generated set (+ .settings.json)
    round_<t>/reference_logps.pt  the round's reference log-probs
    round_<t>/method_state.pt     a stateful method's state at the round's end (DFT's u)
    round_<t>/model/              the policy after the round
    round_<t>/summary.json        the round's figures; its presence marks the round done
    checkpoint/                   latest in-round state (model, optimizer, scheduler, RNG, step)
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from gsil.batching import Example, GeneratedResponses, build_examples
from gsil.checkpoints import load_checkpoint, save_round_model, truncate_metrics
from gsil.data import TokenLimits, tie_mask, with_system_message
from gsil.faults import kill_point
from gsil.generation import (
    VLLM,
    GenerationSettings,
    SetRequest,
    generate_set,
    read_previous_set,
    resolve_backend,
)
from gsil.integrity import CorruptFileError, read_recorded, verify_manifest, write_recorded
from gsil.io import read_json, write_json
from gsil.layout import RunLayout
from gsil.methods import Method
from gsil.models import apply_lora, is_peft_model
from gsil.optimization import OptimSettings, RoundData, RoundPlace, reference_logps, train_round
from gsil.processes import check_processes, full_parameters, is_zero3
from gsil.tracking import finish_trackers, restart_trackers_at

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundsSettings:
    """What the round loop needs of the run configuration: where the run writes, how many
    rounds, its seed, and the sections of each stage (``optim`` trains, ``generation``
    generates, the token limits shape the examples).

    Round ``t`` samples with seed ``seed + t``. ``drop_ties`` leaves each generated response
    equal to its demonstration out of the loss (a prompt whose k responses all tie is dropped).
    ``lora_rank`` > 0: the policy is trained through LoRA adapters, merged after each round.
    ``resume``: finished rounds are skipped and an interrupted round continues from its
    checkpoint, so the final weights equal those of an uninterrupted run.

    ``mix_previous_generations``: round ``t`` trains on its own generated set and on the set
    of the round before it, concatenated (each demonstration twice, paired once with each;
    SPIN's ``config_iter1.yaml``), both scored by the round's reference pi_t. The set before
    round 0 is ``previous_generations`` (the last round of the run whose model this one
    starts from); without it round 0 trains on its own set alone.
    """

    run_dir: Path
    max_prompt_length: int | None
    max_length: int
    rounds: int = 1
    seed: int = 0
    optim: OptimSettings = field(default_factory=OptimSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    drop_ties: bool = False
    lora_rank: int = 0
    resume: bool = False
    mix_previous_generations: bool = False
    previous_generations: Path | None = None


@dataclass
class OwnSamples:
    """A round's generated set, lined up with the demonstrations it keeps."""

    demos: list
    responses: list[str] | None = None  # response j to demos[i] at i * k + j
    mask: list[bool] | None = None  # the responses that count (--drop-ties)
    info: dict = field(default_factory=dict)


def run_rounds(
    model,
    tokenizer,
    demos: Sequence,
    method: Method,
    settings: RoundsSettings,
    *,
    accelerator: Accelerator | None = None,
) -> dict:
    """Run ``settings.rounds`` self-imitation rounds; returns (and writes) the run summary.

    Each metrics row also goes to the accelerator's trackers (started by the caller with
    :func:`gsil.tracking.start_trackers`); they are finished when the run ends, even by an error.
    """
    recipe = SelfImitation(tokenizer, demos, method, settings, accelerator)
    try:
        return recipe.run(model)
    finally:
        recipe.close()


class SelfImitation:
    """The self-imitation rounds as named stages over one run directory.

    for each round t:   generate  ->  reference_pass  ->  train  ->  save
    """

    def __init__(
        self,
        tokenizer,
        demos: Sequence,
        method: Method,
        settings: RoundsSettings,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.tokenizer, self.demos, self.method, self.settings = tokenizer, demos, method, settings
        self.layout = RunLayout(settings.run_dir)
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        check_processes(self.accelerator)
        method.check_launch(self.accelerator)
        # one vLLM engine for the whole run (if vLLM generates), holding each round's policy
        self.vllm = _RunEngine(method.needs_generations, settings, tokenizer, self.accelerator)

    def close(self) -> None:
        self.vllm.close()
        finish_trackers(self.accelerator)

    def run(self, model) -> dict:
        """Every round in turn (finished ones skipped on resume); the run summary."""
        settings, layout, accelerator = self.settings, self.layout, self.accelerator
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        # Round 0's generation and reference pass run before accelerate prepares the model, on
        # batches placed on accelerator.device: a policy given on another device goes there
        # first. ZeRO-3 places its own shards.
        if not is_zero3(accelerator):
            model = model.to(accelerator.device)
        if not settings.resume and accelerator.is_main_process:
            _reset_run_outputs(layout)
        accelerator.wait_for_everyone()
        checkpoint = load_checkpoint(settings.run_dir) if settings.resume else None
        summary: dict = {"objective": self.method.name, "rounds": []}
        global_step = 0
        restarted = not settings.resume  # a resumed run first drops what the last attempt logged
        for round_index in range(settings.rounds):
            done_file = layout.round_summary(round_index)
            if settings.resume and done_file.exists():
                round_summary = read_json(done_file)
                summary["rounds"].append(round_summary)
                global_step = round_summary["global_step"]
                if not layout.round_summary(round_index + 1).exists():
                    # the last finished round: continue from its policy
                    model = _load_round_weights(
                        model,
                        layout.model(round_index),
                        settings.lora_rank,
                        settings.seed + round_index + 1,
                    )
                continue
            torch.manual_seed(settings.seed + round_index)
            started = time.perf_counter()
            data, info = self.prepare(model, round_index)
            resume_state = checkpoint if checkpoint and checkpoint["round"] == round_index else None
            if not restarted:
                # the interrupted attempt may have logged steps past the point this one
                # restarts from (its checkpoint, else the last finished round): done again
                kept = resume_state["global_step"] if resume_state else global_step
                if accelerator.is_main_process:
                    truncate_metrics(layout.metrics, kept)
                restart_trackers_at(accelerator, kept + 1)
                restarted = True
            place = RoundPlace(layout, round_index, settings.seed, global_step, resume_state)
            training_started = time.perf_counter()
            last, prepared = self.train(model, data, place)
            info["training_seconds"] = round(time.perf_counter() - training_started, 3)
            global_step = last.get("step", global_step)
            round_summary = {
                "round": round_index,
                **info,
                "num_processes": accelerator.num_processes,
                "global_step": global_step,
                "seconds": round(time.perf_counter() - started, 2),
                "last_step": last,
            }
            model = self.save(prepared, round_summary)
            summary["rounds"].append(round_summary)
        return summary

    def prepare(self, model, round_index: int) -> tuple[RoundData, dict]:
        """Stages 1 and 2: what the round trains on, and its figures (ties, timings)."""
        own = self.generate(model, round_index)
        return self.reference_pass(model, own, round_index), own.info

    def generate(self, model, round_index: int) -> OwnSamples:
        """Stage 1: the round's own responses, ``generation.num_samples`` (k) per prompt,
        generated (or reused from the cached set) when the method needs them.

        Ties (a response equal to its demonstration) are counted per response
        (``info["ties"]``); ``drop_ties`` leaves each tied response out of the loss, and drops a
        prompt whose k responses all tie."""
        settings, accelerator = self.settings, self.accelerator
        own = OwnSamples(list(self.demos), info={"num_demonstrations": len(self.demos)})
        started = time.perf_counter()
        if self.method.needs_generations:
            generation = settings.generation
            k = generation.num_samples
            # the same precision as training (bf16 autocast when mixed precision is on); each
            # process generates its share, the main process writes the set
            engine = self.vllm.engine_for(model)
            policy = accelerator.unwrap_model(model)
            asked, max_prompt_length = own.demos, settings.max_prompt_length
            if generation.prompt_format != "chat" and accelerator.is_main_process:
                logger.warning(
                    "round %d generates with the %s prompt format but trains on the chat "
                    "template (exact replication of SPIN's and GSIL's code only)",
                    round_index,
                    generation.prompt_format,
                )
            if generation.system_prompt is not None:
                # generation alone sees it; the limit is the training prompt's, without it
                system = generation.system_prompt
                asked = [replace(d, prompt=with_system_message(d.prompt, system)) for d in asked]
                max_prompt_length = None
            with accelerator.autocast(), full_parameters(accelerator, policy):
                own.responses = generate_set(
                    engine or policy,
                    self.tokenizer,
                    asked,
                    self.layout.generated(round_index),
                    SetRequest(
                        generation,
                        seed=settings.seed + round_index,
                        max_prompt_length=max_prompt_length,
                        extra_settings={
                            "round": round_index,
                            "mixed_precision": accelerator.mixed_precision,
                        },
                        progress=accelerator.is_main_process,
                    ),
                    accelerator,
                )
            kill_point("generation")  # test hook (gsil.faults): the set is written
            if settings.mix_previous_generations:
                self._add_previous_generations(own, round_index)
            ties = tie_mask([d.response for d in own.demos for _ in range(k)], own.responses)
            own.info["ties"] = sum(ties)
            if settings.drop_ties:
                _drop_ties(own, ties, k)
            own.info["num_trained"] = len(own.demos)
        own.info["generation_seconds"] = round(time.perf_counter() - started, 3)
        return own

    def _add_previous_generations(self, own: OwnSamples, round_index: int) -> None:
        """Append the set of the round before ``round_index`` (``mix_previous_generations``):
        every demonstration once more, paired with its earlier responses."""
        previous = (
            self.layout.generated(round_index - 1)
            if round_index > 0
            else self.settings.previous_generations
        )
        if previous is None:
            return
        k = self.settings.generation.num_samples
        own.responses = own.responses + read_previous_set(previous, self.demos, k)
        own.demos = own.demos + list(self.demos)
        own.info["mixed_previous_generations"] = str(previous)

    def reference_pass(self, model, own: OwnSamples, round_index: int) -> RoundData:
        """Stage 2: the round's examples and, when the method needs them, the reference
        log-probs of every demonstration and own sample under the round's starting policy
        (stored once; reused, after checking, by a resumed run)."""
        settings, accelerator = self.settings, self.accelerator
        started = time.perf_counter()
        generated = None
        if own.responses is not None:
            k = settings.generation.num_samples
            generated = GeneratedResponses(own.responses, num_samples=k, mask=own.mask)
        examples = build_examples(
            self.tokenizer,
            [d.prompt for d in own.demos],
            [d.response for d in own.demos],
            TokenLimits(settings.max_prompt_length, settings.max_length),
            generated=generated,
            teacher_prompt=self.method.teacher_prompt_ids,
        )
        ref_demo = ref_gen = None
        if self.method.needs_reference:
            ref_demo, ref_gen = self._reference_logps(model, examples, round_index)
            own.info["ref_logps/chosen"] = float(ref_demo.mean())
            if ref_gen is not None:
                own.info["ref_logps/rejected"] = float(ref_gen.mean())
        own.info["reference_seconds"] = round(time.perf_counter() - started, 3)
        accelerator.wait_for_everyone()
        ids = [d.id for d in own.demos]
        return RoundData(
            examples,
            ref_demo,
            ref_gen,
            ids=ids,
            pad_id=self.tokenizer.pad_token_id,
            initial_state=self._carried_state(round_index, ids),
        )

    def _carried_state(self, round_index: int, ids: list) -> torch.Tensor | None:
        """The state round ``round_index`` starts from when the method keeps it across rounds:
        the round before's final value of each demonstration (by id; one it did not train on,
        ``--drop-ties``, starts from the method's initial value). None: the method's own."""
        if round_index == 0 or not self.method.keeps_state_across_rounds:
            return None
        path = self.layout.method_state(round_index - 1)
        fix = f"Delete {path.parent} and the later rounds to train them again"
        carried = read_recorded(path, torch.load, what="method state", fix=fix)
        ended = dict(zip(carried["ids"], carried["state"].tolist(), strict=True))
        state = self.method.initial_state(len(ids))
        for position, demo_id in enumerate(ids):
            if demo_id in ended:
                state[position] = ended[demo_id]
        return state

    def _reference_logps(self, model, examples: list[Example], round_index: int):
        path = self.layout.reference_logps(round_index)
        if path.exists():
            return _load_reference_logps(path, len(examples))
        accelerator = self.accelerator
        # autocast like the training forward, so that Delta = 0 at the first step
        with accelerator.autocast(), full_parameters(accelerator, model):
            ref_demo, ref_gen = reference_logps(
                model,
                examples,
                self.settings.optim,
                pad_id=self.tokenizer.pad_token_id,
                accelerator=accelerator,
                with_generations=self.method.needs_generations,
            )
        if accelerator.is_main_process:
            write_recorded(
                path, lambda handle: torch.save({"demo": ref_demo, "gen": ref_gen}, handle)
            )
        return ref_demo, ref_gen

    def train(self, model, data: RoundData, place: RoundPlace):
        """Stage 3: optimise the policy on the round's data (:func:`gsil.optimization.train_round`);
        the last step's metrics and the prepared model."""
        return train_round(model, data, self.method, self.settings.optim, place, self.accelerator)

    def save(self, prepared, round_summary: dict):
        """Stage 4: the round's policy saved (it is the next round's reference) and its summary
        written, which marks the round done; returns the policy the next round starts from."""
        settings, layout, accelerator = self.settings, self.layout, self.accelerator
        round_index = round_summary["round"]
        save_round_model(accelerator, prepared, self.tokenizer, layout.model(round_index))
        policy = accelerator.unwrap_model(prepared)
        # drop the wrapper and the optimizer state before the next round generates
        del prepared
        accelerator.free_memory()
        if accelerator.is_main_process:
            write_json(layout.round_summary(round_index), round_summary)
            shutil.rmtree(layout.checkpoint, ignore_errors=True)
        if is_peft_model(policy) and round_index + 1 < settings.rounds:
            # pi_{t+1} is the merged policy; the next round trains fresh adapters on it
            policy = _fresh_adapters(
                policy.merge_and_unload(), settings.lora_rank, settings.seed + round_index + 1
            )
        accelerator.wait_for_everyone()
        return policy


def _drop_ties(own: OwnSamples, ties: list[bool], k: int) -> None:
    """Leave tied responses out of the loss; drop a prompt whose k responses all tie."""
    kept = [not all(ties[i * k : (i + 1) * k]) for i in range(len(own.demos))]
    own.demos = [d for d, keep in zip(own.demos, kept, strict=True) if keep]
    own.responses = [g for n, g in enumerate(own.responses) if kept[n // k]]
    own.mask = [not tie for n, tie in enumerate(ties) if kept[n // k]]
    if not own.demos:
        raise RuntimeError(
            "every generated response equals its demonstration; nothing to contrast "
            "(run without --drop-ties or with sampled generation)"
        )


class _RunEngine:
    """The run's vLLM engine: started at the first round that generates (40-60 s on 2 CPU cores),
    then given each later round's policy in memory; closed when the run ends."""

    def __init__(self, needed: bool, settings: RoundsSettings, tokenizer, accelerator):
        generation = settings.generation
        self.used = needed and resolve_backend(generation.backend) == VLLM
        self.tokenizer, self.accelerator = tokenizer, accelerator
        # a prompt may take max_length - 1 tokens, and its response max_new_tokens more
        self.max_length = settings.max_length + generation.max_new_tokens
        self.seed = settings.seed
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


def _read_logps(path: Path) -> dict:
    stored = torch.load(path)
    return {"demo": stored["demo"], "gen": stored["gen"]}


def _load_reference_logps(path: Path, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A round's stored reference log-probs, checked against their manifest and the round's
    ``count`` examples (on every process alike).

    Raises:
        CorruptFileError: the file is truncated, changed, unreadable or holds another number
            of examples; the message names it and the fix.
    """
    fix = f"Delete {path} (and its .manifest.json) to compute them again, or start without --resume"
    stored = read_recorded(path, _read_logps, what="reference log-probs", fix=fix)
    demo, gen = stored["demo"], stored["gen"]
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
