"""Run an experiment: train its stages in order, evaluate, report and draw (orchestration only).

``python -m experiments.run --preset default`` (or ``gsil train --config recipe.yaml``) with a
pipeline recipe (see :class:`experiments.config.Pipeline`) trains the stages in order (each a
run directory ``OUTPUT_DIR/<name>/<stage>/``; ``init_from`` starts a stage from the last
round's model of an earlier one; a stage repeated over ``seeds`` is one run per seed,
``<stage>-seed<s>``), evaluates the listed stages (every seed's run), and writes
``report.md``/``report.csv`` and the figures into ``OUTPUT_DIR/<name>/``. Run flags typed on the
command line (``--num-demos 16``, ``--precision fp32``...) override every stage;
``--name``/``--output-dir`` move the whole experiment. Re-running skips what is finished: a run
with ``summary.json`` (and the same configuration), a benchmark whose result was written for
the same request. The recipe format lives in ``experiments.config``, the dry-run plan in
``experiments.planning``, a run's lifecycle in ``experiments.training``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

from experiments.config import Pipeline, Stage, final_model_dir, flag_overrides, load_pipeline
from experiments.planning import format_plan, plan_pipeline
from experiments.training import ensure_run, run_status
from gsil.io import read_json, write_json
from gsil.layout import EVAL_REQUEST, RunLayout

logger = logging.getLogger("experiments.pipeline")


def share_generations(stage: Stage, source: Stage) -> bool:
    """Seed a new stage's round 0 with ``source``'s generated set (same model, same prompts).

    Greedy round-0 generations of two runs that start from the same model with the same
    demonstrations and decoding are identical; ``gsil.generation.generate_set`` re-checks the
    settings recorded beside the file and regenerates if anything differs. Returns whether the
    set was copied (the stage then starts as a resumed run so that the copy is kept).
    """
    if run_status(stage.config) != "new" or stage.config.model != source.config.model:
        return False
    source_run, target_run = RunLayout(source.config.run_dir()), RunLayout(stage.config.run_dir())
    files = [source_run.generated(0), source_run.generated_settings(0)]
    if not all(f.exists() for f in files):
        return False
    target_run.round_dir(0).mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy2(file, target_run.round_dir(0) / file.name)
    write_json(target_run.config, stage.config.to_dict())
    logger.info("%s: round 0 reuses the generations of %s", stage.name, source.name)
    return True


def evaluate_stage(pipeline: Pipeline, stage: Stage, engine: Any = None) -> dict[str, Path]:
    """Evaluate a stage's final model on the pipeline's benchmarks (skipping finished ones).

    Results go to ``<run>/round_<last>/eval/``; ``request.json`` there records what each
    benchmark was asked for, so a finished benchmark is not redone. With an ``engine`` (a
    ``gsil.generation.vllm_engine.EngineSlot``), answers come from its one vLLM engine, shared
    by every evaluated run.
    """
    from gsil.evaluation.runner import EvalRequest, default_out_dir, eval_dtype, evaluate_model

    spec = pipeline.evaluate
    model_dir = final_model_dir(stage.config)
    out_dir = default_out_dir(model_dir)
    request_path = out_dir / EVAL_REQUEST
    requests = read_json(request_path) if request_path.exists() else {}
    tasks = tuple(pipeline.reasoning_tasks())
    paths = {}
    for benchmark in spec.benchmarks:
        limit = spec.humaneval_limit if benchmark == "humaneval" else spec.limit
        max_new = spec.max_new_tokens_for(benchmark)
        dtype = eval_dtype(spec.dtype)
        request = {
            "limit": limit,
            "tasks": list(spec.heldout_tasks or ())
            if benchmark == "reasoning-heldout"
            else list(tasks),
            "max_new_tokens": max_new,
            "seed": spec.seed,
            "dtype": dtype,
        }
        result_path = out_dir / f"{benchmark}.json"
        if requests.get(benchmark) == request and result_path.exists():
            logger.info("%s: %s evaluated earlier, skipped", stage.name, benchmark)
            paths[benchmark] = result_path
            continue
        options = spec.options(tasks=tasks)
        evaluation = EvalRequest(options, limit, spec.seed, dtype=dtype)
        evaluate_model(str(model_dir), [benchmark], out_dir, evaluation, engine=engine)
        requests[benchmark] = request
        write_json(request_path, requests)
        paths[benchmark] = result_path
    return paths


def run_pipeline(pipeline: Pipeline) -> dict:
    """Train every stage, evaluate, and write the report and figures; returns a summary."""
    from accelerate.utils import broadcast_object_list

    from gsil.processes import process_state

    # Under accelerate launch every process trains every stage (collectives); the main process
    # alone writes shared files, evaluates, reports and draws, while the others finish.
    state = process_state()
    if state.is_main_process:
        pipeline.root.mkdir(parents=True, exist_ok=True)
        write_json(pipeline.root / "pipeline.json", plan_pipeline(pipeline))
    outcome: dict[str, Any] = {
        "pipeline": pipeline.name,
        "directory": str(pipeline.root),
        "stages": {},
    }
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
        from gsil.generation import VLLM, resolve_backend

        backend = pipeline.evaluate.backend
        engine = None  # with vLLM: one engine for every evaluated run, started at the first
        if resolve_backend(backend) == VLLM:
            from gsil.generation.vllm_engine import EngineSlot

            engine = EngineSlot()
        try:
            for name in pipeline.evaluate.runs:  # a stage's runs: one per seed when repeated
                for stage in pipeline.runs_of(name):
                    evaluate_stage(pipeline, stage, engine)
        finally:
            if engine is not None:
                engine.close()
    from experiments.report import write_report

    report = write_report(
        [pipeline.root], pipeline.root, baseline=pipeline.evaluate and pipeline.evaluate.baseline
    )
    outcome["report"] = [str(p) for p in report]
    write_json(pipeline.root / "summary.json", outcome)
    print(f"\nexperiment {pipeline.name} finished: {pipeline.root}")
    for path in outcome["report"]:
        print(f"  {path}")
    return outcome


def main_pipeline(args: argparse.Namespace) -> dict:
    """``experiments.run`` with a pipeline preset: flags override every stage."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = flag_overrides(args)
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
