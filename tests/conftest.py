"""Shared fixtures: a tiny random Llama policy and a matching offline tokenizer.

Everything is built in code (no downloads): a byte-level tokenizer with ChatML special tokens
and a chat template like SmolLM2's, and a 2-layer, 32-wide Llama whose vocab matches it.

* ``tiny_tokenizer`` (session): shared, treat as read-only.
* ``tiny_model`` (function): a FRESH copy of the session model, safe to train or wrap.
* ``tiny_model_readonly`` (session): the shared model itself, for tests that only run it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import build_tiny_model, build_tiny_tokenizer

# The test models are tiny: intra-op threads only add synchronisation, and on a shared 2-core
# machine two spinning threads made one generate() call ~100x slower (5 s instead of 0.03 s).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Shared tiny tokenizer (chat template, eos ``<|im_end|>``, pad ``<|endoftext|>``)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_readonly(tiny_tokenizer):
    """Shared tiny model; do not mutate it (use ``tiny_model`` for that)."""
    return build_tiny_model(tiny_tokenizer)


@pytest.fixture
def tiny_model(tiny_model_readonly):
    """A fresh deep copy of the tiny model, safe to train, wrap with LoRA, or modify."""
    return copy.deepcopy(tiny_model_readonly)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; tests that pick another precision need it reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def cpu_only():
    """Runs are compared bit for bit, which holds on CPUs (GPU kernels need not be
    deterministic): every run of a module using this is on the CPU, also on a machine with a
    GPU (forked children then never touch CUDA either)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield
