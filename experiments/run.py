"""Train with GSIL, SPIN or SFT, round after round: ``python -m experiments.run --help``.

Writes ``runs/<name>/``: ``config.json`` (the full resolved config), ``metrics.jsonl`` (one row
per optimizer step), ``round_<t>/`` (generated set, reference log-probs, model) and
``summary.json``. Runs under ``accelerate launch`` unchanged.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from accelerate import Accelerator
from accelerate.utils import set_seed

from experiments.config import (
    RunConfig,
    add_config_arguments,
    is_pipeline_preset,
    resolve_config,
)
from gsil.data import load_demonstrations
from gsil.estimators import get_estimator
from gsil.io import read_json, read_jsonl, write_json
from gsil.models import load_model, native_bf16, resolve_device
from gsil.objectives import make_objective
from gsil.optimization import make_accelerator as gsil_accelerator
from gsil.trainer import OptimSettings, run_rounds

logger = logging.getLogger("experiments.run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description="Fine-tune a causal LM on demonstrations with GSIL (or SPIN / SFT), "
        "for one or more self-imitation rounds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", help="a preset name under experiments/presets/ (quick, "
                        "default, ...) or a JSON file; flags override it")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan (runs, "
                        "data sizes, steps, tokens, estimated time) without loading weights or "
                        "data, and exit")  # fmt: skip
    pipeline = parser.add_argument_group("pipeline presets (e.g. default): the evaluation")
    pipeline.add_argument("--eval-limit", type=int, help="held-out items per reasoning task")
    pipeline.add_argument("--eval-humaneval-limit", type=int, help="HumanEval problems")
    pipeline.add_argument("--eval-benchmarks", help="comma-separated, e.g. reasoning,humaneval")
    add_config_arguments(parser)
    return parser


def resolve_precision(precision: str) -> str:
    """``"auto"``: bf16 where this machine computes it natively (a GPU, an AVX-512 BF16 or AMX
    CPU), else fp32. An explicit bf16 without native support is kept, with a warning."""
    device = resolve_device()
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        logger.warning(
            "precision bf16 on a %s without native bf16 (no AVX-512 BF16/AMX): PyTorch emulates "
            "it, about 100x slower than fp32 on such a CPU; use --precision auto or fp32",
            device.type,
        )
    return precision


def make_accelerator(config: RunConfig) -> Accelerator:
    precision = resolve_precision(config.precision)
    mixed_precision = "bf16" if precision == "bf16" else "no"
    return gsil_accelerator(mixed_precision=mixed_precision, grad_accum=config.grad_accum)


def check_resume(config: RunConfig) -> None:
    """A resumed run must use the configuration it started with."""
    saved_path = config.run_dir() / "config.json"
    if not saved_path.exists():
        raise SystemExit(f"--resume: {saved_path} does not exist; nothing to resume")
    saved = read_json(saved_path)
    changed = {
        key: (saved.get(key), value)
        for key, value in config.to_dict().items()
        if key != "resume" and saved.get(key) != value
    }
    if changed:
        raise SystemExit(
            f"--resume: the configuration differs from {saved_path}: {changed} "
            "(resume with the same flags, or start a new run with another --name)"
        )


def progress_figures(run_dir) -> dict:
    """First and last step of the metrics: did demos rise, generations fall, accuracy rise?"""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = read_jsonl(path)
    keys = ["loss", "logps/demo", "logps/gen", "rewards/accuracy", "rewards/margin"]
    return {
        key: {"first": rows[0][key], "last": rows[-1][key]}
        for key in keys
        if rows and key in rows[0]
    }


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.preset and is_pipeline_preset(args.preset):  # several stages: experiments.pipeline
        from experiments.pipeline import main_pipeline

        return main_pipeline(args)
    config = resolve_config(args, args.preset)
    if args.dry_run:
        from experiments.pipeline import format_plan, plan_run

        print(format_plan(plan_run(config)))
        return {"dry_run": True}
    return execute(config)


def execute(config: RunConfig) -> dict:
    """Train one resolved configuration to the end; returns (and writes) its summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_dir = config.run_dir()
    if config.resume:
        check_resume(config)
    accelerator = make_accelerator(config)
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", config.to_dict())
    set_seed(config.seed)
    started = time.perf_counter()

    model, tokenizer = load_model(
        config.model, dtype="float32", device=accelerator.device, lora_rank=config.lora_rank
    )
    demos = load_demonstrations(
        config.data, prompt_field=config.prompt_field, response_field=config.response_field,
        split=config.split, size=config.num_demos, seed=config.seed,
        skip_invalid=config.skip_invalid, tokenizer=tokenizer,
        max_prompt_length=config.max_prompt_length,
    )  # fmt: skip
    logger.info("%d demonstrations from %s (skipped: %s)", len(demos), config.data,
                dict(demos.skipped) or "none")  # fmt: skip
    estimator = get_estimator(config.loss, **config.estimator_params())
    objective = make_objective(config.method, estimator, beta=config.beta, shift=config.shift)
    optim = OptimSettings(
        learning_rate=config.lr, optimizer=config.optimizer, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps, epochs=config.epochs, batch_size=config.batch_size,
        grad_accum=config.grad_accum, max_grad_norm=config.max_grad_norm,
        average_logps=config.average_logps, checkpoint_every=config.checkpoint_every,
        gradient_checkpointing=config.gradient_checkpointing,
    )  # fmt: skip
    generation = {
        "max_new_tokens": config.max_new_tokens, "do_sample": config.do_sample,
        "temperature": config.temperature, "top_p": config.top_p,
        "batch_size": config.gen_batch_size, "seed": config.seed, "backend": config.generator,
    }  # fmt: skip
    summary = run_rounds(
        model, tokenizer, demos, objective, run_dir, rounds=config.rounds, optim=optim,
        generation=generation, max_prompt_length=config.max_prompt_length,
        max_length=config.max_length, seed=config.seed, drop_ties=config.drop_ties,
        resume=config.resume, lora_rank=config.lora_rank, accelerator=accelerator,
    )  # fmt: skip
    summary.update(
        {
            "run_dir": str(run_dir),
            "num_demonstrations": len(demos),
            "skipped_records": dict(demos.skipped),
            "progress": progress_figures(run_dir),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "final_model": str(run_dir / f"round_{config.rounds - 1}" / "model"),
        }
    )
    if accelerator.is_main_process:
        write_json(run_dir / "summary.json", summary)
        print(f"\nrun finished in {summary['wall_seconds']} s: {run_dir}")
        for key, values in summary["progress"].items():
            print(
                f"  {key:<18} first step {values['first']:+.4f}   last step {values['last']:+.4f}"
            )
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
