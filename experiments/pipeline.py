"""Multi-stage experiments, skip/resume of runs, and dry-run plans.

A *pipeline preset* (``experiments/presets/default.json``) is a JSON object with::

    "pipeline": "<name>"          the experiment directory: OUTPUT_DIR/<name>/ (--name overrides)
    "base": {RunConfig fields}    shared by every stage
    "stages": [{"name": ..., "init_from": <stage>, RunConfig fields...}, ...]
    "evaluate": {"runs": [...], "benchmarks": [...], "limit": N, ...}   (optional)

``python -m experiments.run --preset default`` trains the stages in order (each a run directory
``OUTPUT_DIR/<name>/<stage>/``; ``init_from`` starts a stage from the last round's model of an
earlier one), evaluates the listed runs, and writes ``report.md``/``report.csv`` and the
figures into ``OUTPUT_DIR/<name>/``. Run flags typed on the command line (``--num-demos 16``,
``--precision fp32``...) override every stage; ``--name``/``--output-dir`` move the whole
experiment. Re-running skips what is finished: a run with ``summary.json`` (and the same
configuration), a benchmark whose result was written for the same request.

:func:`plan_run` / :func:`plan_pipeline` make the ``--dry-run`` plan from known data sizes and
stated throughput assumptions, without loading weights or data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.config import RunConfig, preset_path, validate
from gsil.io import read_json, write_json

logger = logging.getLogger("experiments.pipeline")

STAGE_KEYS = ("name", "init_from", "share_round0_generations")
EVAL_DEFAULTS: dict[str, Any] = {
    "runs": None,  # stage names to evaluate (default: every stage)
    "benchmarks": ["reasoning", "humaneval"],
    "limit": 300,  # items per reasoning task
    "humaneval_limit": None,  # HumanEval problems (None: all 164)
    "tasks": None,  # reasoning tasks (default: those of the training data)
    "max_new_tokens": {"reasoning": 160, "humaneval": 384},
    "batch_size": 32,
    "dtype": None,  # e.g. "bfloat16" (None: the evaluator's default)
    "seed": 0,
    "baseline": None,  # the run every other is compared with, item by item
    "backend": None,  # generation backend (None: the runs' --generator, by default auto)
}

# --------------------------------------------------------------------------- sizes and costs

# Known sizes of hub datasets (a dry run loads nothing): (name, split) -> records.
KNOWN_SIZES = {
    ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"): 61_135,
    ("HuggingFaceH4/ultrafeedback_binarized", "test_prefs"): 2_000,
}
HUMANEVAL_PROBLEMS = 164

# Mean token counts assumed by the plan, per data source (prompt, demonstration, generated).
TOKEN_ASSUMPTIONS = {
    "rg": {"prompt": 65, "response": 45, "generated": 50,
           "source": "measured on SmolLM2's tokenizer (chain_sum + basic_arithmetic)"},
    "ultrafeedback": {"prompt": 180, "response": 290, "generated": 230,
                      "source": "assumed for UltraFeedback with a Mistral tokenizer; "
                      "generations are often cut at 256"},
    "other": {"prompt": 150, "response": 250, "generated": 200, "source": "a rough guess"},
}  # fmt: skip

# Per-unit costs on this project's 2-core CPU machine with SmolLM2-135M while other jobs run
# (load ~3): the pilot's training and generation timings, the evaluator's baseline measurement
# (400 reasoning items in 515 s, 164 HumanEval problems at ~53 s per batch of 8 with 384 new
# tokens), and this module's shrunk default run (62-80 s per SFT step of 8 under heavier load:
# the costs are loose, a quiet machine is 2-4x faster). See experiments/README.md.
CPU_COSTS = {
    "sft_step_s_per_sequence": 2.0,  # forward + backward, ~110-token sequences
    "pair_step_s_per_pair": 4.0,  # GSIL/SPIN: demo + generated rows in one forward
    "reference_s_per_pair": 1.0,  # one no-grad forward of demo + generated rows
    "generate_s_per_prompt": 4.0,  # greedy, batches of 16-32, up to 96 new tokens (fp32)
    "eval_reasoning_s_per_item": 1.3,  # greedy, batch 16-32, up to 160-256 new tokens
    "eval_humaneval_s_per_item": 4.5,  # greedy, 256 new tokens + sandboxed test run
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
    known = KNOWN_SIZES.get((config.data, config.split))
    if config.data.startswith("rg:"):
        return config.num_demos, "--num-demos (reasoning-gym items are generated)"
    if known is not None:
        if config.num_demos is not None and config.num_demos < known:
            return config.num_demos, f"--num-demos (of {known} in {config.data}:{config.split})"
        return known, f"known size of {config.data} split {config.split}"
    return config.num_demos, "--num-demos (size of the source unknown to the plan)"


def _token_assumptions(config: RunConfig) -> dict:
    if config.data.startswith("rg:"):
        return TOKEN_ASSUMPTIONS["rg"]
    if "ultrafeedback" in config.data.lower():
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
    family = base_model or config.model
    demos, size_source = known_data_size(config)
    demos = demos or 0
    on_cpu = family == "smollm2-135m" or _params_billions(family) < 0.5
    if processes is None:
        processes = 1 if on_cpu else accelerate_processes(PAPER_ACCELERATE_CONFIG)
    pairs = config.method in ("gsil", "spin")
    per_step = config.batch_size * config.grad_accum * processes
    steps_per_round = math.ceil(
        math.ceil(demos / config.batch_size / processes) / config.grad_accum
    )
    total_steps = steps_per_round * config.epochs * config.rounds
    tokens = _token_assumptions(config)
    prompt = min(tokens["prompt"], config.max_prompt_length)
    response = min(tokens["response"], config.max_length - prompt)
    generated = min(tokens["generated"], config.max_new_tokens, config.max_length - prompt)
    demo_tokens = demos * (prompt + response)
    gen_tokens = demos * (prompt + generated) if pairs else 0
    train_tokens = (demo_tokens + gen_tokens) * config.epochs * config.rounds
    reference_tokens = (demo_tokens + gen_tokens) * config.rounds if pairs else 0
    new_tokens = demos * generated * config.rounds if pairs else 0
    plan: dict[str, Any] = {
        "run": config.run_name(),
        "run_dir": str(config.run_dir()),
        "model": config.model,
        "method": config.method + (f"-{config.loss}" if config.method == "gsil" else ""),
        "data": f"{config.data} (split {config.split})",
        "demonstrations": demos,
        "demonstrations_source": size_source,
        "rounds": config.rounds,
        "epochs_per_round": config.epochs,
        "prompts_per_optimizer_step": per_step,
        "optimizer_steps": total_steps,
        "generated_responses": demos * config.rounds if pairs else 0,
        "tokens": {
            "trained": train_tokens,
            "reference_pass": reference_tokens,
            "generated": new_tokens,
        },  # fmt: skip
        "token_assumptions": tokens,
    }
    if on_cpu:
        costs = CPU_COSTS
        seconds = (
            total_steps
            * per_step
            * (costs["pair_step_s_per_pair"] if pairs else costs["sft_step_s_per_sequence"])
        )
        if pairs:
            seconds += (
                config.rounds
                * demos
                * (costs["generate_s_per_prompt"] + costs["reference_s_per_pair"])
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


def format_plan(plan: dict) -> str:
    """A plan as indented JSON under a heading (what ``--dry-run`` prints)."""
    return "dry run: nothing is loaded or trained\n" + json.dumps(plan, indent=2)


# --------------------------------------------------------------------------- pipelines


@dataclass
class Stage:
    """One run of a pipeline: its resolved configuration and the stage it starts from."""

    name: str
    config: RunConfig
    init_from: str | None = None
    share_round0_generations: str | None = None  # a stage starting from the same model


@dataclass
class Pipeline:
    """A resolved pipeline preset: where it writes, its stages and its evaluation."""

    name: str
    root: Path
    stages: list[Stage]
    evaluate: dict[str, Any] | None = None
    comment: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise SystemExit(f"pipeline {self.name}: no stage {name!r}")


def final_model_dir(config: RunConfig) -> Path:
    """The model a run ends with: ``<run>/round_<last>/model``."""
    return config.run_dir() / f"round_{config.rounds - 1}" / "model"


def load_pipeline(
    preset: str, overrides: dict[str, Any] | None = None, eval_overrides: dict | None = None
) -> Pipeline:
    """Resolve a pipeline preset with command-line ``overrides`` (RunConfig fields)."""
    path = preset_path(preset)
    spec = json.loads(path.read_text())
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(RunConfig)}
    output_dir = overrides.pop("output_dir", None) or spec.get("output_dir", "runs")
    name = overrides.pop("name", None) or spec["pipeline"]
    root = Path(output_dir) / name
    base = dict(spec.get("base", {}))
    stages: list[Stage] = []
    for raw in spec["stages"]:
        values = {**base, **{k: v for k, v in raw.items() if k not in STAGE_KEYS}, **overrides}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"{path}: stage {raw.get('name')}: unknown field(s) {unknown}")
        init_from = raw.get("init_from")
        if init_from is not None:
            parent = next((s for s in stages if s.name == init_from), None)
            if parent is None:
                raise SystemExit(f"{path}: stage {raw['name']} starts from unknown {init_from!r}")
            values["model"] = str(final_model_dir(parent.config))
        values.update(output_dir=str(root), name=raw["name"], resume=False)
        config = RunConfig(**values)
        validate(config)
        share = raw.get("share_round0_generations")
        if share is not None and share not in {s.name for s in stages}:
            raise SystemExit(f"{path}: stage {raw['name']} shares generations of unknown {share!r}")
        stages.append(Stage(raw["name"], config, init_from, share))
    evaluate = None
    if spec.get("evaluate") is not None:
        evaluate = {**EVAL_DEFAULTS, **spec["evaluate"], **(eval_overrides or {})}
        evaluate["runs"] = evaluate["runs"] or [s.name for s in stages]
        if isinstance(evaluate["benchmarks"], str):
            evaluate["benchmarks"] = [b for b in evaluate["benchmarks"].split(",") if b]
        for run in evaluate["runs"] + [evaluate["baseline"]] * bool(evaluate["baseline"]):
            if run not in {s.name for s in stages}:
                raise SystemExit(f"{path}: evaluate names unknown stage {run!r}")
    return Pipeline(name, root, stages, evaluate, spec.get("_comment", ""))


def _reasoning_tasks(pipeline: Pipeline) -> list[str]:
    if pipeline.evaluate and pipeline.evaluate.get("tasks"):
        tasks = pipeline.evaluate["tasks"]
        return tasks.split(",") if isinstance(tasks, str) else list(tasks)
    data = pipeline.stages[0].config.data
    return data[3:].split(",") if data.startswith("rg:") else ["chain_sum", "basic_arithmetic"]


def plan_pipeline(pipeline: Pipeline) -> dict:
    """The dry-run plan of a pipeline: each stage's plan, the evaluation, the total time."""
    stages = []
    for stage in pipeline.stages:
        root = stage
        while root.init_from is not None:
            root = pipeline.stage(root.init_from)
        plan = plan_run(stage.config, base_model=root.config.model)
        plan["starts_from"] = stage.init_from or stage.config.model
        plan["status"] = run_status(stage.config)
        stages.append(plan)
    result: dict[str, Any] = {"pipeline": pipeline.name, "directory": str(pipeline.root),
                              "stages": stages}  # fmt: skip
    minutes = sum(s["estimate"].get("minutes_on_this_cpu", 0.0) for s in stages)
    if pipeline.evaluate:
        spec = pipeline.evaluate
        tasks = _reasoning_tasks(pipeline)
        items = {}
        if "reasoning" in spec["benchmarks"]:
            items["reasoning"] = spec["limit"] * len(tasks)
        if "humaneval" in spec["benchmarks"]:
            items["humaneval"] = min(spec["humaneval_limit"] or HUMANEVAL_PROBLEMS,
                                     HUMANEVAL_PROBLEMS)  # fmt: skip
        eval_seconds = len(spec["runs"]) * sum(
            count * CPU_COSTS.get(f"eval_{name}_s_per_item", 5.0) for name, count in items.items()
        )
        result["evaluation"] = {
            "runs": spec["runs"],
            "items_per_run": items,
            "reasoning_tasks": tasks,
            "baseline": spec["baseline"],
            "minutes_on_this_cpu": round(eval_seconds / 60, 1),
        }
        minutes += eval_seconds / 60
    result["total_minutes_on_this_cpu"] = round(minutes, 1)
    return result


# --------------------------------------------------------------------------- running


def run_status(config: RunConfig) -> str:
    """``done`` (summary.json, same config), ``partial`` (interrupted, same config), ``new``,
    or ``conflict`` (finished with another configuration: neither rerun nor skipped)."""
    run_dir = config.run_dir()
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return "new"
    saved = read_json(saved_path)
    wanted = {k: v for k, v in config.to_dict().items() if k != "resume"}
    same = {k: v for k, v in saved.items() if k != "resume"} == wanted
    if (run_dir / "summary.json").exists():
        return "done" if same else "conflict"
    return "partial" if same else "new"


def share_generations(stage: Stage, source: Stage) -> bool:
    """Seed a new stage's round 0 with ``source``'s generated set (same model, same prompts).

    Greedy round-0 generations of two runs that start from the same model with the same
    demonstrations and decoding are identical; ``gsil.generation.generate_set`` re-checks the
    settings recorded beside the file and regenerates if anything differs. Returns whether the
    set was copied (the stage then starts as a resumed run so that the copy is kept).
    """
    if run_status(stage.config) != "new" or stage.config.model != source.config.model:
        return False
    source_dir = source.config.run_dir() / "round_0"
    files = [source_dir / "generated.jsonl", source_dir / "generated.settings.json"]
    if not all(f.exists() for f in files):
        return False
    target = stage.config.run_dir() / "round_0"
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy2(file, target / file.name)
    write_json(stage.config.run_dir() / "config.json", stage.config.to_dict())
    logger.info("%s: round 0 reuses the generations of %s", stage.name, source.name)
    return True


def ensure_run(config: RunConfig, force_resume: bool = False) -> tuple[str, dict]:
    """Train ``config`` unless it is finished; an interrupted run continues (``--resume``).

    Returns ``(what happened, summary)``: ``skipped``, ``resumed`` or ``ran``.

    Raises:
        SystemExit: the run directory holds a finished run with another configuration.
    """
    from experiments.run import execute
    from gsil.optimization import process_state

    status = run_status(config)
    # every process has read the run directory before the main process writes into it
    process_state().wait_for_everyone()
    run_dir = config.run_dir()
    if status == "done":
        logger.info("%s: finished earlier, skipped", run_dir)
        return "skipped", read_json(run_dir / "summary.json")
    if status == "conflict":
        raise SystemExit(
            f"{run_dir} holds a finished run with another configuration (see its config.json); "
            "remove it or choose another --output-dir/--name"
        )
    resumable = (
        force_resume
        or status == "partial"
        and ((run_dir / "checkpoint").exists() or any(run_dir.glob("round_*/summary.json")))
    )
    config = dataclasses.replace(config, resume=resumable)
    return ("resumed" if resumable else "ran"), execute(config)


def eval_dtype(dtype: str | None) -> str | None:
    """The evaluation's dtype: ``"auto"`` is bf16 where this machine computes it natively (a
    GPU, an AVX-512 BF16 or AMX CPU), else fp32; ``None`` leaves it to the evaluator."""
    if dtype != "auto":
        return dtype
    from gsil.models import native_bf16, resolve_device

    return "bfloat16" if native_bf16(resolve_device()) else "float32"


def evaluate_stage(pipeline: Pipeline, stage: Stage, engine: Any = None) -> dict[str, Path]:
    """Evaluate a stage's final model on the pipeline's benchmarks (skipping finished ones).

    Results go to ``<run>/round_<last>/eval/``; ``request.json`` there records what each
    benchmark was asked for, so a finished benchmark is not redone. With an ``engine`` (a
    ``gsil.generation.vllm_engine.EngineSlot``), answers come from its one vLLM engine, shared
    by every evaluated run.
    """
    from gsil.evaluation.runner import EvalOptions, default_out_dir, evaluate_model

    spec = pipeline.evaluate or {}
    model_dir = final_model_dir(stage.config)
    out_dir = default_out_dir(model_dir)
    request_path = out_dir / "request.json"
    requests = read_json(request_path) if request_path.exists() else {}
    tasks = tuple(_reasoning_tasks(pipeline))
    paths = {}
    for benchmark in spec["benchmarks"]:
        limit = spec["humaneval_limit"] if benchmark == "humaneval" else spec["limit"]
        max_new = spec["max_new_tokens"]
        max_new = max_new.get(benchmark) if isinstance(max_new, dict) else max_new
        dtype = eval_dtype(spec["dtype"])
        request = {"limit": limit, "tasks": list(tasks), "max_new_tokens": max_new,
                   "seed": spec["seed"], "dtype": dtype}  # fmt: skip
        result_path = out_dir / f"{benchmark}.json"
        if requests.get(benchmark) == request and result_path.exists():
            logger.info("%s: %s evaluated earlier, skipped", stage.name, benchmark)
            paths[benchmark] = result_path
            continue
        options = EvalOptions(tasks=tasks, max_new_tokens=max_new, batch_size=spec["batch_size"])
        evaluate_model(str(model_dir), [benchmark], out_dir, limit, spec["seed"],
                       options=options, dtype=dtype, engine=engine)  # fmt: skip
        requests[benchmark] = request
        write_json(request_path, requests)
        paths[benchmark] = result_path
    return paths


def run_pipeline(pipeline: Pipeline) -> dict:
    """Train every stage, evaluate, and write the report and figures; returns a summary."""
    from accelerate.utils import broadcast_object_list

    from gsil.optimization import process_state

    # Under accelerate launch every process trains every stage (collectives); the main process
    # alone writes shared files, evaluates, reports and draws, while the others finish.
    state = process_state()
    if state.is_main_process:
        pipeline.root.mkdir(parents=True, exist_ok=True)
        write_json(pipeline.root / "pipeline.json", plan_pipeline(pipeline))
    outcome: dict[str, Any] = {"pipeline": pipeline.name, "directory": str(pipeline.root),
                               "stages": {}}  # fmt: skip
    for stage in pipeline.stages:
        shared = [False]
        if stage.share_round0_generations and state.is_main_process:
            shared = [share_generations(stage, pipeline.stage(stage.share_round0_generations))]
        if state.num_processes > 1:
            broadcast_object_list(shared)  # every process resumes, or none
        what, summary = ensure_run(stage.config, force_resume=shared[0])
        outcome["stages"][stage.name] = {
            "status": what,
            "wall_seconds": summary.get("wall_seconds"),
        }
    if not state.is_main_process:
        return outcome
    if pipeline.evaluate:
        from gsil.generation import resolve_backend

        backend = pipeline.evaluate["backend"] or pipeline.stages[0].config.generator
        engine = None  # with vLLM: one engine for every evaluated run, started at the first
        if resolve_backend(backend) == "vllm":
            from gsil.generation.vllm_engine import EngineSlot

            engine = EngineSlot()
        try:
            for name in pipeline.evaluate["runs"]:
                evaluate_stage(pipeline, pipeline.stage(name), engine)
        finally:
            if engine is not None:
                engine.close()
    from experiments.report import write_report

    report = write_report(
        [pipeline.root], pipeline.root, baseline=(pipeline.evaluate or {}).get("baseline")
    )
    outcome["report"] = [str(p) for p in report]
    from paper_figs.fig_experiments import draw

    outcome["figures"] = [str(p) for p in draw(pipeline.root / "figures", runs_dir=pipeline.root)]
    write_json(pipeline.root / "summary.json", outcome)
    print(f"\nexperiment {pipeline.name} finished: {pipeline.root}")
    for path in outcome["report"] + outcome["figures"]:
        print(f"  {path}")
    return outcome


def main_pipeline(args: argparse.Namespace) -> dict:
    """``experiments.run`` with a pipeline preset: flags override every stage."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(RunConfig)
        if getattr(args, f.name, None) is not None
    }
    eval_overrides = {
        key: getattr(args, f"eval_{key}")
        for key in ("limit", "humaneval_limit", "benchmarks")
        if getattr(args, f"eval_{key}", None) is not None
    }
    pipeline = load_pipeline(args.preset, overrides, eval_overrides)
    if args.dry_run:
        print(format_plan(plan_pipeline(pipeline)))
        return {"dry_run": True}
    return run_pipeline(pipeline)
