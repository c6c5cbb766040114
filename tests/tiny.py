"""A tiny random Llama policy and a matching offline tokenizer, built in code (no downloads).

A byte-level tokenizer with ChatML special tokens and a chat template like SmolLM2's, and a
2-layer, 32-wide Llama whose vocab matches it. Shared by the pytest fixtures (``conftest.py``)
and by the multi-process scripts that ``accelerate launch`` runs (``distributed_run.py``).
"""

from __future__ import annotations

import torch

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


def build_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 32):
    """A random 2-layer Llama (~29k parameters) in fp32, eval mode, tied embeddings.

    vLLM's CPU attention needs a head size of at least 32: ``hidden_size=128`` (2 heads of 64).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
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


def tiny_demos(count: int = 8) -> list:
    """Arithmetic demonstrations short enough for the tiny model's lengths."""
    from gsil.data import Demonstration

    return [
        Demonstration(prompt=f"add {i} and {i + 1}", response=f"{2 * i + 1}", id=f"d{i}")
        for i in range(count)
    ]


class Interrupt(Exception):
    """Stands for a crash in the middle of a round (raised by :func:`interrupting`)."""


def interrupting(objective, after_calls: int):
    """The same objective, raising :class:`Interrupt` on call ``after_calls + 1``."""
    calls = {"n": 0}

    def fn(*args):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Interrupt
        return objective.fn(*args)

    return type(objective)(objective.name, fn, objective.needs_generations,
                           objective.needs_reference)  # fmt: skip
