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

# The test models are tiny: intra-op threads only add synchronisation, and on a shared 2-core
# machine two spinning threads made one generate() call ~100x slower (5 s instead of 0.03 s).
torch.set_num_threads(1)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 3 ChatML specials) that encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # No merges: every byte is one token, so the vocab stays tiny and nothing needs training.
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0):
    """A random 2-layer Llama (~29k parameters) in fp32, eval mode, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # Wider than the default 0.02 so random logits are peaked: greedy argmaxes are then
        # far from ties and generations vary with the prompt.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


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
