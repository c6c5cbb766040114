"""Self-generated responses: the current policy answers the demonstration prompts.

* :mod:`~gsil.generation.core`: ``generate`` / ``generate_from_ids`` over both backends, sharded
  across processes.
* :mod:`~gsil.generation.hf` and :mod:`~gsil.generation.vllm_engine`: the backends.
* :mod:`~gsil.generation.sets`: the trainer's cached generated sets.
* :mod:`~gsil.generation.common`: the result type, eos handling and batch plans they share.
"""

from gsil.generation.common import (
    AUTO,
    BACKENDS,
    HF,
    VLLM,
    Decoding,
    GenerationBackendError,
    GenerationResult,
    GenerationSettings,
    deal_batches,
    plan_batches,
)
from gsil.generation.core import generate, generate_from_ids, resolve_backend
from gsil.generation.sets import (
    SETTINGS_FORMAT_VERSION,
    SetRequest,
    generate_set,
    read_generated_set,
    read_previous_set,
    settings_path,
)

__all__ = [
    "AUTO",
    "BACKENDS",
    "HF",
    "VLLM",
    "SETTINGS_FORMAT_VERSION",
    "Decoding",
    "GenerationBackendError",
    "GenerationResult",
    "GenerationSettings",
    "SetRequest",
    "deal_batches",
    "generate",
    "generate_from_ids",
    "generate_set",
    "plan_batches",
    "read_generated_set",
    "read_previous_set",
    "resolve_backend",
    "settings_path",
]
