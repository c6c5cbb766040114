"""One GSIL round in 1 process against the same round in 2 processes, in one run.

    python -m benchmarks.multiprocess_round [--num-demos 32] [--max-new-tokens 48]

Both train the embedded model (SmolLM2-135M, fp32) on the same demonstrations with the same
global batch: 1 process with micro-batch 2b (and every core's threads) against 2 processes
(``accelerate launch --multi_gpu --num_processes 2``: torchrun and gloo, no GPU needed) with
micro-batch b and one thread each. Each run's ``round_0/summary.json`` gives generation,
reference-pass and training wall times; printed side by side with their ratios. Run it on a
quiet machine: another job on the cores changes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from gsil.data import DataSettings

PHASES = ("generation_seconds", "reference_seconds", "training_seconds")


def run_args(args: argparse.Namespace, name: str, batch_size: int) -> list[str]:
    return [
        "-m",
        "experiments.run",
        "--model",
        args.model,
        "--data",
        DataSettings.source,
        "--num-demos",
        str(args.num_demos),
        "--rounds",
        "1",
        "--method",
        "gsil",
        "--batch-size",
        str(batch_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--gen-batch-size",
        str(args.gen_batch_size),
        "--max-prompt-length",
        "192",
        "--max-length",
        "384",
        "--checkpoint-every",
        "0",
        "--precision",
        "fp32",
        "--generator",
        "hf",
        "--output-dir",
        str(args.out),
        "--name",
        name,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model id or directory")
    parser.add_argument("--num-demos", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gen-batch-size", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-multiprocess"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    one = timed([sys.executable, *run_args(args, "one-process", args.global_batch)], env)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    two = timed(
        launch + run_args(args, "two-process", args.global_batch // 2),
        {**env, "OMP_NUM_THREADS": "1"},
    )
    rounds = {
        name: json.loads((args.out / name / "round_0" / "summary.json").read_text())
        for name in ("one-process", "two-process")
    }
    rows = {phase: (rounds["one-process"][phase], rounds["two-process"][phase]) for phase in PHASES}
    rows["command wall (incl. start-up)"] = (one, two)
    print(
        f"\nGSIL round, {args.num_demos} demos, global batch {args.global_batch}, "
        f"{args.max_new_tokens} new tokens, {args.model} fp32, {os.cpu_count()} cores"
    )
    print(f"{'phase':<32}{'1 process':>12}{'2 processes':>14}{'2p / 1p':>10}")
    for phase, (single, double) in rows.items():
        print(f"{phase:<32}{single:>11.1f}s{double:>13.1f}s{double / single:>10.2f}")
    return {phase: {"one": a, "two": b, "ratio": b / a} for phase, (a, b) in rows.items()}


if __name__ == "__main__":
    main()
