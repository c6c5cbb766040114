"""Dry-run plans: how big a run or an experiment is, and how long it should take.

:func:`plan_run` / :func:`plan_pipeline` make the ``--dry-run`` plan from known data sizes and
stated throughput assumptions (:data:`CPU_COSTS` measured here, :data:`GPU_COSTS` assumed for a
~7B model), without loading weights or data. :func:`plan_power` adds, per comparison the report
will make, the minimal detectable paired difference (80% power, alpha 0.05) for one seed's
items and for the items pooled over seeds.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from experiments.config import Pipeline, RunConfig, Stage
from experiments.training import run_status
from gsil.evaluation.options import DEFAULT_ITEMS_PER_TASK
from gsil.evaluation.results import detectable_difference, paired_scores
from gsil.generation import VLLM, resolve_backend
from gsil.io import read_json
from gsil.layout import RunLayout, run_of_model
from gsil.methods import METHODS

# Known sizes of hub datasets (a dry run loads nothing): (name, split) -> records.
KNOWN_SIZES = {
    ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"): 61_135,
    ("HuggingFaceH4/ultrafeedback_binarized", "train_sft"): 61_135,
    ("HuggingFaceH4/ultrafeedback_binarized", "test_prefs"): 2_000,
}
HUMANEVAL_PROBLEMS = 164

# Mean token counts assumed by the plan, per data source (prompt, demonstration, generated).
TOKEN_ASSUMPTIONS = {
    "rg": {
        "prompt": 65,
        "response": 45,
        "generated": 50,
        "source": "measured on SmolLM2's tokenizer (chain_sum + basic_arithmetic)",
    },
    "ultrafeedback": {
        "prompt": 180,
        "response": 290,
        "generated": 230,
        "source": "assumed for UltraFeedback with a Mistral tokenizer; "
        "generations are often cut at 256",
    },
    "other": {"prompt": 150, "response": 250, "generated": 200, "source": "a rough guess"},
}

# Per-unit costs on this project's 2-core AVX2 machine with SmolLM2-135M in fp32. Training,
# reference and round-generation costs were re-measured on a quiet machine in the default
# experiment's make run (2026-11-26: SFT 128 sequences in 227 s, SPIN/GSIL rounds of 8 pairs
# in 25 s of training, 8 s of reference pass and 18 s of greedy generation); the HF reasoning
# evaluation's by benchmarks/generation.py on the same day; HumanEval's is the evaluator's
# earlier measurement under load (~53 s per batch of 8), so it is loose. See
# experiments/README.md.
CPU_COSTS = {
    "sft_step_s_per_sequence": 2.0,  # forward + backward, ~110-token sequences
    "pair_step_s_per_pair": 3.2,  # GSIL/SPIN: demo + generated rows in one forward
    "reference_s_per_pair": 1.0,  # one no-grad forward of demo + generated rows
    "generate_s_per_prompt": 2.5,  # HF, greedy, batches of 8-32, up to 96 new tokens
    # HF, greedy, batches of 32, 160 new tokens: 200 items of the default run's SFT model in
    # 342 s, generation alone, quiet (benchmarks/generation.py; vLLM: 92 s)
    "eval_reasoning_s_per_item": 1.7,
    "eval_humaneval_s_per_item": 4.5,  # HF, greedy, 256 new tokens + sandboxed test run
    # vLLM's CPU build, one engine for the whole evaluation: 0.49 s per reasoning item in
    # make run (weights pushed per model included); HumanEval from benchmarks/generation.py's
    # 6.6x HF tokens/s plus the sandbox, not measured inside a pipeline
    "eval_reasoning_s_per_item_vllm": 0.5,
    "eval_humaneval_s_per_item_vllm": 1.0,
    "vllm_engine_start_s": 45.0,
}

# GPU assumptions for a ~7B model (stated in the plan; edit to your hardware).
GPU_COSTS = {
    "train_tokens_per_s_per_gpu": 1_500,  # ZeRO-3 + CPU offload + grad checkpointing, bf16
    "reference_tokens_per_s_per_gpu": 6_000,  # no-grad forward
    "generate_tokens_per_s_per_gpu": 2_500,  # vLLM greedy, output tokens
    "gpu": "A100/H100 80GB",
}


def known_data_size(config: RunConfig) -> tuple[int | None, str]:
    """How many demonstrations a run will use, and where that number comes from."""
    known = KNOWN_SIZES.get((config.data.source, config.data.split))
    if config.data.source.startswith("rg:"):
        return config.data.num_demos, "--num-demos (reasoning-gym items are generated)"
    if known is not None:
        if config.data.num_demos is not None and config.data.num_demos < known:
            return (
                config.data.num_demos,
                f"--num-demos (of {known} in {config.data.source}:{config.data.split})",
            )
        return known, f"known size of {config.data.source} split {config.data.split}"
    return config.data.num_demos, "--num-demos (size of the source unknown to the plan)"


def _token_assumptions(config: RunConfig) -> dict:
    if config.data.source.startswith("rg:"):
        return TOKEN_ASSUMPTIONS["rg"]
    if "ultrafeedback" in config.data.source.lower():
        return TOKEN_ASSUMPTIONS["ultrafeedback"]
    return TOKEN_ASSUMPTIONS["other"]


def _params_billions(model: str) -> float:
    if model == "smollm2-135m":
        return 0.135
    match = re.search(r"(\d+(?:\.\d+)?)\s*([bm])\b", model.lower().replace("-", " "))
    if not match:
        return 7.0
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "m" else value


def accelerate_processes(config_file: Path) -> int:
    """``num_processes`` of an accelerate YAML config (1 if absent)."""
    import yaml

    return int(yaml.safe_load(config_file.read_text()).get("num_processes", 1))


PAPER_ACCELERATE_CONFIG = Path(__file__).parent / "accelerate" / "deepspeed_zero3.yaml"


def plan_run(
    config: RunConfig, processes: int | None = None, base_model: str | None = None
) -> dict:
    """The dry-run plan of one run: sizes, steps, tokens and estimated time.

    On the embedded model the time comes from :data:`CPU_COSTS` (measured here); on any other
    model from :data:`GPU_COSTS` (assumptions for a ~7B model) over ``processes`` GPUs
    (default: ``num_processes`` of ``experiments/accelerate/deepspeed_zero3.yaml``).
    ``base_model`` names the model family when ``config.model`` is an earlier stage's output.
    """
    family = base_model or config.model.name_or_path
    demos, size_source = known_data_size(config)
    demos = demos or 0
    on_cpu = family == "smollm2-135m" or _params_billions(family) < 0.5
    if processes is None:
        processes = 1 if on_cpu else accelerate_processes(PAPER_ACCELERATE_CONFIG)
    # a method that samples trains on pairs (SDFT: the teacher's forward in place of the
    # reference pass, priced alike)
    pairs = METHODS[config.objective.method].needs_generations
    # k responses per prompt: a step forwards the demonstration and k generated rows
    k = config.generation.num_samples if pairs else 0
    per_step = config.optim.batch_size * config.optim.grad_accum * processes
    mixed = mixed_rounds(config)  # rounds that train on 2N pairs (their own set + the one before)

    def steps_per_round(examples: int) -> int:
        return math.ceil(
            math.ceil(examples / config.optim.batch_size / processes) / config.optim.grad_accum
        )

    total_steps = config.optim.epochs * (
        steps_per_round(demos) * (config.rounds - mixed) + steps_per_round(2 * demos) * mixed
    )
    tokens = _token_assumptions(config)
    prompt = min(tokens["prompt"], config.data.max_prompt_length)
    response = min(tokens["response"], config.data.max_length - prompt)
    generated = min(
        tokens["generated"], config.generation.max_new_tokens, config.data.max_length - prompt
    )
    demo_tokens = demos * (prompt + response)
    gen_tokens = demos * k * (prompt + generated)
    # an epoch trains on m of the k samples (--samples-per-epoch), the reference scores all k
    trained_k = min(config.optim.samples_per_epoch or k, k)
    trained_gen_tokens = demos * trained_k * (prompt + generated)
    train_tokens = (
        (demo_tokens + trained_gen_tokens) * config.optim.epochs * (config.rounds + mixed)
    )
    reference_tokens = (demo_tokens + gen_tokens) * (config.rounds + mixed) if pairs else 0
    new_tokens = demos * k * generated * config.rounds
    plan: dict[str, Any] = {
        "run": config.run_name(),
        "run_dir": str(config.run_dir()),
        "model": config.model.name_or_path,
        "method": config.objective.method
        + (f"-{config.objective.loss}" if config.objective.method == "gsil" else ""),
        "data": f"{config.data.source} (split {config.data.split})",
        "demonstrations": demos,
        "demonstrations_source": size_source,
        "rounds": config.rounds,
        "epochs_per_round": config.optim.epochs,
        "rounds_mixing_the_set_before": mixed,
        "prompts_per_optimizer_step": per_step,
        "optimizer_steps": total_steps,
        "generated_responses": demos * k * config.rounds,
        "tokens": {
            "trained": train_tokens,
            "reference_pass": reference_tokens,
            "generated": new_tokens,
        },
        "token_assumptions": tokens,
    }
    if config.generation.prompt_format == "instruction" and pairs:
        plan["warning"] = INSTRUCTION_FORMAT_WARNING
    if on_cpu:
        costs = CPU_COSTS
        # a pair's cost is two sequences' (demonstration + one response): 1 + k sequences
        sequence = costs["pair_step_s_per_pair"] / 2 if pairs else costs["sft_step_s_per_sequence"]
        seconds = total_steps * per_step * sequence * (1 + trained_k)
        if pairs:
            seconds += (
                config.rounds
                * demos
                * (k * costs["generate_s_per_prompt"] + (1 + k) / 2 * costs["reference_s_per_pair"])
            )
        plan["estimate"] = {"minutes_on_this_cpu": round(seconds / 60, 1), "costs": costs}
    else:
        billions = _params_billions(family)
        scale = 7.0 / billions  # the throughputs are for 7B; scale inversely with size
        gpu_seconds = (
            train_tokens / (GPU_COSTS["train_tokens_per_s_per_gpu"] * scale)
            + reference_tokens / (GPU_COSTS["reference_tokens_per_s_per_gpu"] * scale)
            + new_tokens / (GPU_COSTS["generate_tokens_per_s_per_gpu"] * scale)
        )
        plan["estimate"] = {
            "gpus": processes,
            "gpu_hours": round(gpu_seconds / 3600, 1),
            "wall_hours": round(gpu_seconds / 3600 / processes, 1),
            "assumptions": {**GPU_COSTS, "model_billion_params": billions},
            "train_flops": f"{6 * billions * 1e9 * train_tokens:.2e} (6 * params * tokens; "
            "gradient checkpointing adds a forward, ~8x)",
        }
    return plan


INSTRUCTION_FORMAT_WARNING = (
    "--gen-prompt-format instruction: the round generates with '### Instruction: ... ### "
    "Response: ' but trains and scores with the chat template, as SPIN's and GSIL's public code "
    "did; a defect of that code (theory page section 6), for exact replication only"
)


def mixed_rounds(config: RunConfig) -> int:
    """How many of a run's rounds train on the set before theirs too
    (``mix_previous_generations``): every round but the first, and the first when the model
    is an earlier run's round model (a pipeline's ``init_from``)."""
    if not config.mix_previous_generations:
        return 0
    return config.rounds - 1 + (run_of_model(config.model.name_or_path) is not None)


def format_plan(plan: dict) -> str:
    """A plan as indented JSON under a heading (what ``--dry-run`` prints)."""
    return "dry run: nothing is loaded or trained\n" + json.dumps(plan, indent=2)


def plan_pipeline(pipeline: Pipeline) -> dict:
    """The dry-run plan of a pipeline: each stage's plan, the evaluation, the total time."""
    stages = []
    for stage in pipeline.stages:
        root = stage
        while root.init_from is not None:
            root = pipeline.stage(root.init_from)
        plan = plan_run(stage.config, base_model=root.config.model.name_or_path)
        plan["starts_from"] = stage.init_from or stage.config.model.name_or_path
        plan["status"] = run_status(stage.config)
        if stage.repeated:
            plan.update(stage=stage.group, seed=stage.config.seed)
        stages.append(plan)
    result: dict[str, Any] = {
        "pipeline": pipeline.name,
        "directory": str(pipeline.root),
        "stages": stages,
    }
    minutes = sum(s["estimate"].get("minutes_on_this_cpu", 0.0) for s in stages)
    if pipeline.evaluate:
        spec = pipeline.evaluate
        tasks = pipeline.reasoning_tasks()
        items = {}
        if "reasoning" in spec.benchmarks:
            items["reasoning"] = (spec.limit or DEFAULT_ITEMS_PER_TASK) * len(tasks)
        if "reasoning-heldout" in spec.benchmarks:
            heldout = len(spec.heldout_tasks or ())
            items["reasoning-heldout"] = (spec.limit or DEFAULT_ITEMS_PER_TASK) * heldout
        if "humaneval" in spec.benchmarks:
            items["humaneval"] = min(spec.humaneval_limit or HUMANEVAL_PROBLEMS, HUMANEVAL_PROBLEMS)
        evaluated = {name: pipeline.runs_of(name) for name in spec.runs}
        # the backend the evaluation will use here: vLLM (one engine for every model) or HF
        backend = resolve_backend(spec.backend)
        suffix = "_vllm" if backend == VLLM else ""
        eval_seconds = sum(map(len, evaluated.values())) * sum(
            count * CPU_COSTS.get(f"eval_{name.removesuffix('-heldout')}_s_per_item{suffix}", 5.0)
            for name, count in items.items()
        ) + (CPU_COSTS["vllm_engine_start_s"] if backend == VLLM else 0.0)
        result["evaluation"] = {
            "runs": spec.runs,
            "seeds": {
                name: [s.config.seed for s in runs]
                for name, runs in evaluated.items()
                if runs[0].repeated
            },
            "items_per_run": items,
            "reasoning_tasks": tasks,
            "baseline": spec.baseline,
            "backend": backend,
            "minutes_on_this_cpu": round(eval_seconds / 60, 1),
            "power": plan_power(pipeline, items),
        }
        minutes += eval_seconds / 60
    result["total_minutes_on_this_cpu"] = round(minutes, 1)
    if pipeline.departures:
        result["departures_from_the_authors"] = pipeline.departures
    return result


# benchmarks whose per-item score is 0 or 1 (McNemar applies): HumanEval with one sample;
# IFEval per prompt (its prompt-level strict verdict)
BINARY_BENCHMARKS = ("reasoning", "reasoning-heldout", "humaneval", "gsm8k", "gsm8k-chat", "ifeval")


def _result_path(stage: Stage, benchmark: str) -> Path:
    """Where the pipeline's evaluation writes ``benchmark``'s result for a run's final model."""
    return RunLayout(stage.config.run_dir()).eval_dir(stage.config.rounds - 1) / f"{benchmark}.json"


def _observed(
    pairs: list[tuple[Stage, Stage]], benchmark: str
) -> tuple[float | None, float | None]:
    """``(baseline accuracy, discordance)`` observed over the pairs (method run, baseline run):
    the accuracy once every baseline run is scored, the discordance once every pair is."""
    base_paths = [_result_path(base, benchmark) for _, base in pairs]
    if not pairs or not all(path.exists() for path in base_paths):
        return None, None
    results = [read_json(path) for path in base_paths]
    total = sum(r.get("n") or 0 for r in results)
    if any(r.get("score") is None for r in results) or not total:
        return None, None
    accuracy = sum(r["score"] * r["n"] for r in results) / total
    disagreements, items = 0, 0
    for (run, _), base_path in zip(pairs, base_paths, strict=True):
        path = _result_path(run, benchmark)
        if not path.exists():
            return accuracy, None
        try:
            _, a, b = paired_scores(path, base_path)
        except ValueError:  # other items (e.g. another --eval-limit): the report says so
            return accuracy, None
        disagreements += int((a != b).sum())
        items += a.size
    return accuracy, disagreements / items if items else None


def plan_power(pipeline: Pipeline, items: dict[str, int]) -> list[dict[str, Any]]:
    """The minimal detectable paired difference (80% power, alpha 0.05, McNemar) of each
    comparison the report will make: per evaluated stage and benchmark, for one seed's items
    and for the items pooled over the seed-matched runs.

    The baseline's accuracy and the discordance are the observed ones where the evaluation's
    results exist; else those stated in the recipe's ``power`` section; else the accuracy is
    taken as 0.5 (the worst case) and the discordance as ``2p(1-p)`` (independent errors, an
    upper bound for models trained from one parent, so the MDE is a conservative one).
    """
    spec = pipeline.evaluate
    if spec is None or not spec.baseline:
        return []
    baseline = pipeline.runs_of(spec.baseline)
    comparisons = []
    for name in spec.runs:
        if name == spec.baseline:
            continue
        pairs = []
        for run in pipeline.runs_of(name):
            match = [b for b in baseline if not b.repeated or b.config.seed == run.config.seed]
            if match and match[0] is not run:
                pairs.append((run, match[0]))
        for bench, n in items.items():
            entry: dict[str, Any] = {
                "comparison": f"{name} vs {spec.baseline}",
                "benchmark": bench,
                "items_per_seed": n,
                "seeds": len(pairs),
            }
            sampled = bench == "humaneval" and spec.humaneval_samples > 1
            if bench not in BINARY_BENCHMARKS or sampled:
                entry["mde"] = "n/a: scores are not 0/1"
                comparisons.append(entry)
                continue
            accuracy, discordance = _observed(pairs, bench) if pairs else (None, None)
            stated_accuracy, stated_discordance = pipeline.power.for_benchmark(bench)
            accuracy_source = "observed" if accuracy is not None else "stated"
            if accuracy is None:
                accuracy = stated_accuracy
            if accuracy is None:
                accuracy, accuracy_source = 0.5, "assumed (worst case)"
            source = "observed"
            if discordance is None and stated_discordance is not None:
                discordance, source = stated_discordance, "stated in the recipe"
            entry.update(
                baseline_accuracy=round(accuracy, 4), baseline_accuracy_source=accuracy_source
            )
            sizes = {"one_seed": n} | ({"pooled": n * len(pairs)} if len(pairs) > 1 else {})
            for key, count in sizes.items():
                mde = detectable_difference(
                    count,
                    baseline_accuracy=accuracy,
                    discordance=discordance,
                    discordance_source=source,
                )
                entry[f"n_{key}"] = count
                entry[f"mde_points_{key}"] = (
                    round(100 * mde.difference, 2) if mde.attainable else "none: too few items"
                )
                entry.update(discordance=round(mde.discordance, 4), premise=mde.assumption)
            comparisons.append(entry)
    return comparisons
