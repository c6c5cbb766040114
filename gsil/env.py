"""Every ``GSIL_*`` environment variable, read here and nowhere else.

Only what must not be in a recipe lives in the environment: machine-specific places and tuning,
secrets, test hooks and debugging switches. Everything a run's results depend on is a recipe
key (``experiments.config``).

    GSIL_CACHE              where the de-quantised embedded model is cached (~/.cache/gsil)
    GSIL_TRACEBACK=1        print the traceback of a user error too
    GSIL_RUNS_DIR           where ``gsil figures`` looks for experiment runs (runs)
    GSIL_TESTBED_DIR        where ``gsil figures`` looks for the testbed's grid
    GSIL_VLLM_GPU_MEMORY    share of the GPU a vLLM engine takes beside the policy (0.5)
    GSIL_VLLM_EAGER         1: vLLM eager, 0: its compiled graph (default: eager on CPUs only)
    GSIL_JUDGE_*            the MT-Bench endpoint judge (BASE_URL, MODEL, API_KEY, TIMEOUT,
                            MAX_RETRIES): a secret and a machine's endpoint
    GSIL_TEST_KILL_AT       test hook of :mod:`gsil.faults` (kill the process at a phase)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CACHE = "GSIL_CACHE"
TRACEBACK = "GSIL_TRACEBACK"
RUNS_DIR = "GSIL_RUNS_DIR"
TESTBED_DIR = "GSIL_TESTBED_DIR"
VLLM_GPU_MEMORY = "GSIL_VLLM_GPU_MEMORY"
VLLM_EAGER = "GSIL_VLLM_EAGER"
JUDGE_PREFIX = "GSIL_JUDGE_"
TEST_KILL_AT = "GSIL_TEST_KILL_AT"


def cache_dir() -> Path:
    """``$GSIL_CACHE`` or ``~/.cache/gsil``."""
    root = os.environ.get(CACHE)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "gsil"


def traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK) == "1"


def runs_dir(default: str = "runs") -> Path:
    return Path(os.environ.get(RUNS_DIR, default))


def testbed_dir(default: str = "runs-testbed/testbed") -> Path:
    return Path(os.environ.get(TESTBED_DIR, default))


def vllm_gpu_memory(default: float = 0.5) -> float:
    return float(os.environ.get(VLLM_GPU_MEMORY, default))


def vllm_eager() -> bool | None:
    """``GSIL_VLLM_EAGER`` as a choice (None when unset).

    Raises:
        ValueError: a value other than 0 or 1.
    """
    setting = os.environ.get(VLLM_EAGER, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{VLLM_EAGER}={setting!r}: use 1 (eager) or 0 (vLLM's compiled graph)")
    return None if setting == "" else setting == "1"


def judge_variables() -> Mapping[str, str]:
    """The ``GSIL_JUDGE_*`` variables that are set."""
    return {k: v for k, v in os.environ.items() if k.startswith(JUDGE_PREFIX)}


def kill_at() -> str | None:
    return os.environ.get(TEST_KILL_AT)
