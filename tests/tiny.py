"""A tiny random Llama policy and a matching offline tokenizer, built in code (no downloads).

A byte-level tokenizer with ChatML special tokens and a chat template like SmolLM2's, and a
2-layer, 32-wide Llama whose vocab matches it. Shared by the pytest fixtures (``conftest.py``)
and by the multi-process scripts that ``accelerate launch`` runs (``distributed_run.py``).
"""

from __future__ import annotations

import torch

from gsil.methods import Method

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


class Spy(Method):
    """A method that behaves as ``inner`` and lets ``around(inner.loss, batch)`` compute each
    loss (to count, interrupt or poison calls)."""

    def __init__(self, inner: Method, around) -> None:
        self.inner, self.around = inner, around

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def needs_generations(self) -> bool:
        return self.inner.needs_generations

    @property
    def needs_reference(self) -> bool:
        return self.inner.needs_reference

    @property
    def needs_prob_weighted_logps(self) -> bool:
        return self.inner.needs_prob_weighted_logps

    @property
    def state_key(self) -> str | None:
        return self.inner.state_key

    def initial_state(self, num_examples: int):
        return self.inner.initial_state(num_examples)

    @property
    def keeps_state_across_rounds(self) -> bool:
        return self.inner.keeps_state_across_rounds

    def loss(self, batch):
        return self.around(self.inner.loss, batch)

    def check_launch(self, accelerator) -> None:
        self.inner.check_launch(accelerator)

    def teacher_prompt_ids(self, tokenizer, prompt, demonstration):
        return self.inner.teacher_prompt_ids(tokenizer, prompt, demonstration)

    def model_loss(self, policy, accelerator):
        inner = self.inner.model_loss(policy, accelerator)
        return None if inner is None else _SpiedModelLoss(inner, self.around)


class _SpiedModelLoss:
    """A method's :class:`gsil.methods.ModelLoss` whose calls go through ``around`` too."""

    def __init__(self, inner, around) -> None:
        self.inner, self.around = inner, around

    def __call__(self, model, batch):
        return self.around(lambda spied: self.inner(model, spied), batch)

    def after_update(self, model) -> None:
        self.inner.after_update(model)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)

    def carried_state(self):
        return self.inner.carried_state()


def interrupting(objective: Method, after_calls: int) -> Method:
    """The same method, raising :class:`Interrupt` on call ``after_calls + 1``."""
    calls = {"n": 0}

    def around(loss, batch):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Interrupt
        return loss(batch)

    return Spy(objective, around)


def tiny_pipeline_base(model_dir, **overrides) -> dict:
    """The run settings (flat recipe keys) that tiny pipelines in the tests share: two
    reasoning-gym demonstrations, micro-batches of 2, 4 new tokens, fp32, no checkpoints."""
    return {
        "model": str(model_dir),
        "data": "rg:chain_sum",
        "num_demos": 2,
        "batch_size": 2,
        "max_prompt_length": 400,
        "max_length": 440,
        "max_new_tokens": 4,
        "gen_batch_size": 2,
        "checkpoint_every": 0,
        "precision": "fp32",
        **overrides,
    }


def doubling_experiment(model_dir, data, **overrides) -> dict:
    """A one-stage GSIL experiment on the "double i" demonstrations (2 rounds of 3 steps),
    evaluated on 2 reasoning items per task: the crash and determinism tests' reference."""
    base = {
        "model": str(model_dir),
        "data": str(data),
        "num_demos": 6,
        "rounds": 2,
        "batch_size": 2,
        "max_new_tokens": 6,
        "max_prompt_length": 64,
        "max_length": 96,
        "gen_batch_size": 4,
        "lr": 1e-2,
        "checkpoint_every": 2,
        "precision": "fp32",
        **overrides,
    }
    return {
        "pipeline": "exp",
        "base": base,
        "stages": [{"name": "gsil", "method": "gsil"}],
        "evaluate": {
            "benchmarks": ["reasoning"],
            "limit": 2,
            "dtype": "float32" if base["precision"] == "fp32" else "auto",
            "max_new_tokens": {"reasoning": 8},
            "batch_size": 4,
        },
    }


def save_doubling_inputs(root, count: int = 6):
    """A saved tiny model and ``count`` "double i" -> "2i" demonstrations (JSONL) under
    ``root``: the inputs of :func:`doubling_experiment`. Returns ``(model_dir, data)``."""
    import json

    from gsil.models import save_model

    tokenizer = build_tiny_tokenizer()
    model_dir = save_model(build_tiny_model(tokenizer), tokenizer, root / "model")
    data = root / "demos.jsonl"
    rows = [{"prompt": f"double {i}", "response": f"{2 * i}"} for i in range(count)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model_dir, data
