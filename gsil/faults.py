"""A test hook for crash safety: kill the process, for real, at a named phase of a run.

``kill_point(phase)`` is called at a few places of a run (see :data:`KILL_POINTS`). It does
nothing unless the environment variable ``GSIL_TEST_KILL_AT`` names that phase; then the process
sends itself ``SIGKILL`` -- no exception, no ``finally`` block, no flushed buffers, as when the
machine's OOM killer or a preempted job ends it. ``tests/test_crash.py`` kills a run at each
phase this way, resumes it, and checks that the result equals an uninterrupted run's.

    GSIL_TEST_KILL_AT=training      the first time the run reaches the training point
    GSIL_TEST_KILL_AT=training:3    the third time (here: after the third optimizer step)

This is a test hook, not a feature: leave the variable unset.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

from gsil import env

ENV = "GSIL_TEST_KILL_AT"

# where each point is reached (one call each), and what is on disk when it kills
KILL_POINTS = {
    "mid_generation": "gsil.generation.hf.generate_hf: after each generated batch, before the "
    "set is complete (nothing of it is written yet)",
    "generation": "gsil.trainer.SelfImitation.generate: the round's generated set is written, the "
    "reference pass has not started",
    "reference": "gsil.optimization.reference_logps: after each scored batch, before the "
    "reference log-probs are stored",
    "training": "gsil.optimization.train_round: after each optimizer step's metrics row",
    "save_model": "gsil.models.save_model: the model is in its temporary directory, not yet "
    "renamed into place",
    "evaluation": "gsil.evaluation.runner.evaluate_model: after each benchmark's result file, "
    "before summary.json (and the pipeline's request.json)",
    "sweep": "experiments.sweep.main: after each finished run, before sweep.json",
}

_reached: Counter[str] = Counter()


def parse_kill_spec(spec: str) -> tuple[str, int]:
    """``"training:3"`` -> ``("training", 3)``; ``"training"`` -> ``("training", 1)``.

    Raises:
        ValueError: an unknown phase or a count that is not a positive integer (naming the
            variable, so that a typo does not silently kill nothing).
    """
    phase, _, count = spec.strip().partition(":")
    if phase not in KILL_POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown phase {phase!r}; use one of {list(KILL_POINTS)}")
    if count and not (count.isdigit() and int(count) > 0):
        raise ValueError(f"{ENV}={spec!r}: the count after ':' must be a positive integer")
    return phase, int(count or 1)


def kill_point(phase: str) -> None:
    """SIGKILL this process if ``GSIL_TEST_KILL_AT`` asks for ``phase`` at this occurrence."""
    spec = env.kill_at()
    if not spec:
        return
    wanted, count = parse_kill_spec(spec)
    if phase != wanted:
        return
    _reached[phase] += 1
    if _reached[phase] == count:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
