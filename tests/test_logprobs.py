"""Memory-lean sequence log-probs agree with the naive log_softmax().gather()."""

import copy

import pytest
import torch

from gsil.logprobs import (
    IGNORE_INDEX,
    naive_sequence_logps,
    sequence_logps,
    sequence_logps_from_hidden,
)


def masked_batch(batch=3, length=9, vocab=50, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, length, vocab, generator=generator, dtype=dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    prompt_lengths = [2, 4, 1]
    pad_from = [9, 6, 7]  # right padding
    for row in range(batch):
        labels[row, : prompt_lengths[row]] = IGNORE_INDEX
        labels[row, pad_from[row] :] = IGNORE_INDEX
    return logits, labels


def by_hand(logits, labels, average):
    """Explicit loop: the definition, position by position."""
    out = []
    for row in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(labels.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target == IGNORE_INDEX:
                continue
            total += float(torch.log_softmax(logits[row, t].double(), -1)[target])
            count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_chunked_matches_naive_and_definition(average, chunk_tokens):
    logits, labels = masked_batch()
    ours = sequence_logps(logits, labels, average=average, chunk_tokens=chunk_tokens)
    naive = naive_sequence_logps(logits, labels, average=average)
    torch.testing.assert_close(ours.double(), naive.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.double(), by_hand(logits, labels, average), atol=1e-5, rtol=0)


def test_chunked_gradient_matches_naive():
    logits, labels = masked_batch(dtype=torch.float32)
    weights = torch.tensor([1.0, -2.0, 0.5])
    ours_input = logits.clone().requires_grad_(True)
    naive_input = logits.clone().requires_grad_(True)
    (sequence_logps(ours_input, labels, chunk_tokens=5) * weights).sum().backward()
    (naive_sequence_logps(naive_input, labels) * weights).sum().backward()
    torch.testing.assert_close(ours_input.grad, naive_input.grad, atol=1e-6, rtol=1e-5)
    # masked positions (prompt, padding, the last position) get no gradient at all
    assert ours_input.grad[0, -1].abs().max() == 0
    assert ours_input.grad[1, 6:].abs().max() == 0


def test_bfloat16_logits_are_computed_in_float32():
    logits, labels = masked_batch(dtype=torch.float32)
    ours = sequence_logps(logits.bfloat16(), labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, naive_sequence_logps(logits.bfloat16(), labels))


@pytest.mark.parametrize("chunk_tokens", [2, 1024])
def test_from_hidden_matches_naive_values_and_gradients(chunk_tokens):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 9, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator)
    _, labels = masked_batch()
    hidden_a, weight_a = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    hidden_b, weight_b = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ours = sequence_logps_from_hidden(hidden_a, weight_a, labels, chunk_tokens=chunk_tokens)
    naive = naive_sequence_logps(hidden_b @ weight_b.T, labels)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=0)
    ours.sum().backward()
    naive.sum().backward()
    torch.testing.assert_close(hidden_a.grad, hidden_b.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight_a.grad, weight_b.grad, atol=1e-5, rtol=1e-5)


def test_fully_masked_row_gives_zero_and_shape_errors():
    logits, labels = masked_batch()
    labels[0] = IGNORE_INDEX
    assert float(sequence_logps(logits, labels)[0]) == 0.0
    assert float(sequence_logps(logits, labels, average=True)[0]) == 0.0
    with pytest.raises(ValueError, match="disagree"):
        sequence_logps(logits, labels[:, :-1])


# ---------------------------------------------------------------------------------------------
# The lean path through a whole causal LM (gsil.optimization.forward_logps) against the plain one


def lm_batch(vocab: int, rows: int = 4, length: int = 14, seed: int = 0) -> dict:
    """Random token ids with prompts of different lengths and one right-padded row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 10:] = 0
    labels = input_ids.clone()
    for row, prompt in enumerate([3, 5, 2, 7][:rows]):
        labels[row, :prompt] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def untied_model(tokenizer):
    """The tiny Llama with an output layer of its own (and a different one from the embedding)."""
    from tiny import build_tiny_model

    tied = build_tiny_model(tokenizer)
    config = copy.deepcopy(tied.config)
    config.tie_word_embeddings = False
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForCausalLM(config)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    return model


def logps_and_grads(model, batch: dict, path: str, average: bool = False):
    """Log-probs by ``path`` and the gradients of a weighted sum of them (weights of both signs,
    as an objective's) on every trainable parameter."""
    from gsil.optimization import forward_logps

    model.zero_grad(set_to_none=True)
    logps = forward_logps(model, batch, average, path=path)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])[: logps.shape[0]]
    (logps * weights).sum().backward()
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return logps.detach(), grads


def assert_paths_agree(model, batch: dict, average: bool = False) -> None:
    lean_logps, lean_grads = logps_and_grads(model, batch, "lean", average)
    plain_logps, plain_grads = logps_and_grads(model, batch, "plain", average)
    torch.testing.assert_close(lean_logps, plain_logps, rtol=1e-5, atol=1e-5)
    assert lean_grads.keys() == plain_grads.keys() and plain_grads
    for name, plain in plain_grads.items():
        assert plain.abs().max() > 0, name  # every trainable parameter is exercised
        error = (lean_grads[name] - plain).norm() / plain.norm()
        assert error < 1e-5, (name, float(error))


class HeadRows:
    """Counts the rows the output layer projects in each call (a forward hook)."""

    def __init__(self, layer):
        self.rows: list[int] = []
        self.handle = layer.register_forward_hook(
            lambda module, args, out: self.rows.append(out.reshape(-1, out.shape[-1]).shape[0])
        )


def response_positions(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("average", [False, True])
def test_lean_path_equals_plain_path_with_tied_head(tiny_model, tiny_tokenizer, average):
    tiny_model.train()
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    assert_paths_agree(tiny_model, lm_batch(len(tiny_tokenizer)), average)


def test_lean_path_equals_plain_path_with_untied_head(tiny_tokenizer):
    model = untied_model(tiny_tokenizer).train()
    assert_paths_agree(model, lm_batch(len(tiny_tokenizer)))


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "lm_head"]])
def test_lean_path_equals_plain_path_with_lora(tiny_model, tiny_tokenizer, targets):
    """peft's default targets leave the head frozen; a LoRA-wrapped head must be run as the
    module (base weight plus adapters), not as its base weight."""
    from gsil.models import apply_lora

    model = apply_lora(tiny_model, rank=4, dropout=0.0, target_modules=targets).train()
    for name, parameter in model.named_parameters():  # B starts at 0: give it a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    head_has_adapters = any("lm_head.lora" in n for n, _ in model.named_parameters())
    assert head_has_adapters == ("lm_head" in targets)
    assert_paths_agree(model, lm_batch(len(tiny_tokenizer)))


def test_lean_path_never_projects_prompt_or_padding_positions(tiny_model, tiny_tokenizer):
    """The output layer sees the last position of each row (the model's own logits, asked for
    one position) and then only response positions, at most ``chunk_tokens`` at a time."""
    from gsil.logprobs import lean_model_logps

    batch = lm_batch(len(tiny_tokenizer))
    rows = len(batch["input_ids"])
    counter = HeadRows(tiny_model.lm_head)
    lean_model_logps(tiny_model, **batch, chunk_tokens=8)
    assert counter.rows[0] == rows
    assert max(counter.rows[1:]) <= 8
    assert sum(counter.rows[1:]) == response_positions(batch)
    counter.rows.clear()
    from gsil.optimization import forward_logps

    forward_logps(tiny_model, batch, False)  # the default path is the lean one
    assert sum(counter.rows) == rows + response_positions(batch)
    counter.rows.clear()
    forward_logps(tiny_model, batch, False, path="plain")
    assert counter.rows == [batch["input_ids"].numel()]
    counter.handle.remove()


def test_a_plain_head_takes_the_hand_written_backward_only_when_it_computes_the_same(
    tiny_model, tiny_tokenizer, monkeypatch
):
    """Training through a bias-free ``nn.Linear`` head projects the response positions through
    ``_ProjectedTokenLogps`` (its gradients: the equality tests above); without gradients,
    under autocast, or with hooks on the head the module itself runs."""
    import gsil.logprobs as logprobs
    from gsil.optimization import forward_logps

    projected: list[int] = []
    real = logprobs._ProjectedTokenLogps.apply

    def spy(hidden, weight, targets):
        projected.append(hidden.shape[0])
        return real(hidden, weight, targets)

    monkeypatch.setattr(logprobs._ProjectedTokenLogps, "apply", spy)
    batch = lm_batch(len(tiny_tokenizer))
    tiny_model.train()
    forward_logps(tiny_model, batch, False)
    assert sum(projected) == response_positions(batch)
    projected.clear()
    with torch.no_grad():
        forward_logps(tiny_model, batch, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        forward_logps(tiny_model, batch, False)
    counter = HeadRows(tiny_model.lm_head)
    forward_logps(tiny_model, batch, False)
    counter.handle.remove()
    assert projected == [] and sum(counter.rows) == len(batch["input_ids"]) + response_positions(
        batch
    )


def test_lean_path_goes_through_the_wrapper_forward(tiny_model, tiny_tokenizer):
    """A DDP-like wrapper (``.module``) is called itself, so its forward (DDP: the gradient
    all-reduce's preparation) runs; the output layer is found inside it."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    wrapped = Wrapper(tiny_model)
    from gsil.optimization import forward_logps

    batch = lm_batch(len(tiny_tokenizer))
    lean = forward_logps(wrapped, batch, False)
    assert wrapped.calls == 1
    torch.testing.assert_close(lean, forward_logps(tiny_model, batch, False, path="plain"))


def test_lean_path_under_bf16_autocast_runs_the_head_in_bf16(tiny_model, tiny_tokenizer):
    """Under autocast (accelerate's bf16 mixed precision) the chunks run as the model's head
    would: the same log-probs as the plain path to bf16 precision."""
    from gsil.optimization import forward_logps

    batch = lm_batch(len(tiny_tokenizer))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = forward_logps(tiny_model, batch, False)
        plain = forward_logps(tiny_model, batch, False, path="plain")
    assert lean.dtype == torch.float32
    torch.testing.assert_close(lean, plain, rtol=2e-2, atol=0.5)
    assert not torch.equal(lean, forward_logps(tiny_model, batch, False))  # bf16 did apply


def test_lean_path_falls_back_for_soft_capped_logits(tiny_model, tiny_tokenizer, caplog):
    from gsil.logprobs import LeanPathUnsupported, lean_head
    from gsil.optimization import forward_logps

    tiny_model.config.final_logit_softcapping = 30.0
    with pytest.raises(LeanPathUnsupported, match="final_logit_softcapping"):
        lean_head(tiny_model)
    batch = lm_batch(len(tiny_tokenizer))
    counter = HeadRows(tiny_model.lm_head)
    with caplog.at_level("WARNING"):
        forward_logps(tiny_model, batch, False)
    assert counter.rows == [batch["input_ids"].numel()]  # the plain path ran
    assert "plain path" in caplog.text


def test_unknown_logprob_path_is_refused(tiny_model, tiny_tokenizer):
    from gsil.optimization import forward_logps

    with pytest.raises(ValueError, match="log-prob path 'fast'"):
        forward_logps(tiny_model, lm_batch(len(tiny_tokenizer)), False, path="fast")
