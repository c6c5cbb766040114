"""lm-evaluation-harness on a policy in memory: what ``gsm8k`` and ``ifeval`` share.

Both run one of lm-eval's own tasks through ``lm_eval.simple_evaluate`` on the model in memory
(``HFLM(pretrained=model, tokenizer=...)``). This module wraps the model, keeps the caller's
random states and model mode as they were, names the seeds lm-eval used and the harness
version, and turns lm-eval's output into JSON. Seeds left unset are lm-eval's own defaults
(the signature of the installed ``simple_evaluate``), which is where those defaults live.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

LM_EVAL_DISTRIBUTION = "lm-eval"
# simple_evaluate's seed arguments, and where its output's "config" records them.
SEED_ARGUMENTS = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")
SEED_CONFIG_KEYS = {
    "random": "random_seed",
    "numpy": "numpy_seed",
    "torch": "torch_seed",
    "fewshot": "fewshot_seed",
}


def lm_eval_version() -> str | None:
    """The installed harness's version (``lm_eval.__version__``, else the distribution's)."""
    try:
        import lm_eval
    except ImportError:
        return None
    version = getattr(lm_eval, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(LM_EVAL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def seed_arguments(seed: int | None) -> dict[str, int]:
    """``simple_evaluate``'s four seed arguments all set to ``seed``; none for ``None``
    (lm-eval's defaults then apply)."""
    return {} if seed is None else dict.fromkeys(SEED_ARGUMENTS, seed)


def recorded_seeds(output: dict[str, Any]) -> dict[str, Any]:
    """The seeds a ``simple_evaluate`` run used, as its output records them."""
    return {name: output["config"].get(key) for name, key in SEED_CONFIG_KEYS.items()}


@contextlib.contextmanager
def model_for_lm_eval(model: Any, tokenizer: Any, batch_size: Any, benchmark: str) -> Iterator[Any]:
    """An lm-eval ``LM`` for ``model``: itself, or ``HFLM`` around the model in memory.

    HFLM puts the model in eval mode (restored here) and gives a tokenizer without a pad token
    one (done to a copy here, so the caller's tokenizer is not changed).

    Raises:
        ValueError: a model in memory without its tokenizer (``benchmark`` named).
    """
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        yield model
        return
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise ValueError(f"{benchmark} through lm-eval needs the model's tokenizer")
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer = copy.deepcopy(tokenizer)
    options = {} if batch_size is None else {"batch_size": batch_size}
    was_training = bool(getattr(model, "training", False))
    try:
        yield HFLM(pretrained=model, tokenizer=tokenizer, **options)
    finally:
        model.train(was_training)


@contextlib.contextmanager
def global_rng_restored() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global random states on exit (``simple_evaluate``
    seeds all three globally, and dataset loading draws from them)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def json_ready(value: Any) -> Any:
    """``value`` with NumPy scalars made floats and anything else unknown made a string."""

    def convert(obj: Any) -> Any:
        return obj.item() if isinstance(obj, np.generic) else str(obj)

    return json.loads(json.dumps(value, default=convert))
