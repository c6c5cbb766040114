"""Launch a script or module on several CPU processes with ``accelerate launch`` (gloo), as the
multi-process tests do: no GPU, one thread a process, a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

DDP = ["--multi_gpu"]  # on a machine without GPUs: torchrun, gloo, DistributedDataParallel
ZERO3 = ["--use_deepspeed", "--zero_stage", "3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(
    args: list[str], *, engine: list[str] = DDP, num_processes: int = 2, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``accelerate launch`` ``args`` (a script and its arguments, or ``-m module ...``) from the
    repository root; fails the test with the output's tail if it exits non-zero."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *engine,
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *args,
    ]
    root = Path(__file__).parents[1]
    # a script's process puts only the script's folder on sys.path, so without the repository
    # root first it would import the installed gsil (an editable install of another checkout)
    python_path = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": python_path,
    }
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, cwd=root
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result
