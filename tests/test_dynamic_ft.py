"""Dynamic Fine-Tuning (Wu et al. 2025, arXiv 2508.05629; ``--method sft --token-weighting
prob``): the loss and its gradient against the formula by hand, against TRL's
``loss_type="dft"`` on the same batch, the lean and plain log-prob paths, and the round loop
(its first loss by hand, a resumed run bit for bit, 2 processes as 1)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import Interrupt, interrupting, tiny_demos

from experiments.config import ConfigError, from_dict
from gsil.batching import build_examples, collate
from gsil.data import TokenLimits
from gsil.generation import GenerationSettings
from gsil.logprobs import IGNORE_INDEX, SequenceLogps, sequence_logps
from gsil.methods import SFT, LogpBatch, build_method, get_method
from gsil.optimization import forward_logps
from gsil.trainer import OptimSettings, RoundsSettings, run_rounds

PROMPT_LENGTHS = [2, 3, 1]  # label positions masked at the start of each row
PAD_FROM = [7, 5, 7]  # and from here on (right padding)


def tiny_batch(rows: int = 3, length: int = 7, vocab: int = 5, seed: int = 0):
    """Float64 logits ``(rows, length, vocab)`` and labels with prompts and padding masked."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(rows, length, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows, length), generator=generator)
    for row in range(rows):
        labels[row, : PROMPT_LENGTHS[row]] = IGNORE_INDEX
        labels[row, PAD_FROM[row] :] = IGNORE_INDEX
    return logits, labels


def softmax_by_hand(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(z - top) for z in row]
    return [e / sum(exps) for e in exps]


def by_hand(logits: torch.Tensor, labels: torch.Tensor):
    """Each row's loss ``-(1/n) sum_t p_t log p_t`` and its gradient with respect to the logits,
    ``-(p_t/n) (onehot(y_t) - softmax(z_t))`` (p_t a constant: the stop-gradient), in floats."""
    losses, grads = [], torch.zeros_like(logits)
    for row in range(labels.shape[0]):
        positions = [
            t for t in range(labels.shape[1] - 1) if int(labels[row, t + 1]) != IGNORE_INDEX
        ]
        total = 0.0
        for t in positions:
            probs = softmax_by_hand(logits[row, t].tolist())
            target = int(labels[row, t + 1])
            total += probs[target] * math.log(probs[target])
            onehot = [float(v == target) for v in range(len(probs))]
            grads[row, t] = torch.tensor(
                [
                    -probs[target] / len(positions) * (o - q)
                    for o, q in zip(onehot, probs, strict=True)
                ]
            )
        losses.append(-total / len(positions))
    return torch.tensor(losses, dtype=torch.float64), grads


def dynamic_ft_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The method's per-example losses on logits, through the plain log-prob reduction."""
    reduced = sequence_logps(logits, labels, prob_weighted=True)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1).float()
    batch = LogpBatch(
        policy_demo_logps=reduced.logps,
        demo_token_counts=counts,
        policy_demo_prob_weighted_logps=reduced.prob_weighted,
    )
    losses, stats = get_method("sft", token_weighting="prob").loss(batch)
    torch.testing.assert_close(stats["logps/chosen_per_token"], reduced.logps.detach() / counts)
    return losses


def trl_dft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's ``SFTConfig(loss_type="dft")`` loss of one batch (its ``sft_trainer.py``: the
    per-token ``-exp(log p).detach() * log p`` summed over the batch's label tokens, divided by
    their number), with TRL's own ``selective_log_softmax``."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].clone()
    loss_mask = shift_labels != IGNORE_INDEX
    shift_labels[~loss_mask] = 0
    logprobs = trl_utils.selective_log_softmax(logits, shift_labels)
    per_token_loss = -logprobs.exp().detach() * logprobs
    return (per_token_loss * loss_mask).sum() / loss_mask.sum()


def test_the_loss_and_its_gradient_match_the_formula_by_hand():
    logits, labels = tiny_batch()
    expected_losses, expected_grads = by_hand(logits, labels)
    logits = logits.clone().requires_grad_(True)
    losses = dynamic_ft_losses(logits, labels)
    torch.testing.assert_close(losses.double(), expected_losses, rtol=1e-6, atol=1e-6)
    losses.sum().backward()
    # the weight p_t is detached: without the stop-gradient the gradient is p_t (1 + log p_t)
    torch.testing.assert_close(logits.grad, expected_grads, rtol=1e-5, atol=1e-6)


def test_the_loss_is_trl_dft_on_one_sequence_and_on_equal_lengths():
    """TRL divides the batch's weighted sum by the batch's token count, gsil each sequence's by
    its own length (as its SFT): equal on one sequence, on equal lengths, and in general
    TRL's loss is the token-count-weighted mean of gsil's per-sequence losses."""
    logits, labels = tiny_batch()
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1).double()
    assert len(set(counts.tolist())) > 1  # lengths differ
    ours = dynamic_ft_losses(logits, labels).double()
    for row in range(labels.shape[0]):
        trl = trl_dft_loss(logits[row : row + 1], labels[row : row + 1])
        torch.testing.assert_close(ours[row], trl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        (ours * counts).sum() / counts.sum(), trl_dft_loss(logits, labels), rtol=1e-6, atol=1e-7
    )
    same_length = labels.clone()
    same_length[:, 1:4] = 1
    same_length[:, 4:] = IGNORE_INDEX
    ours_logits = logits.clone().requires_grad_(True)
    trl_logits = logits.clone().requires_grad_(True)
    ours = dynamic_ft_losses(ours_logits, same_length).mean()
    trl = trl_dft_loss(trl_logits, same_length)
    torch.testing.assert_close(ours.double(), trl, rtol=1e-6, atol=1e-7)
    ours.backward()
    trl.backward()
    torch.testing.assert_close(ours_logits.grad, trl_logits.grad, rtol=1e-5, atol=1e-7)


def trl_nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's ``SFTTrainer`` default loss of one batch: ``-log p`` summed over the batch's label
    tokens, divided by their number."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = logits[:, :-1].log_softmax(-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return -(token_logps * mask).sum() / mask.sum()


@pytest.mark.parametrize("token_weighting", ["prob", "none"])
def test_the_step_token_mean_is_trl_on_unequal_lengths(token_weighting):
    """``--sft-token-mean step``: the mean over the examples of each one's loss is TRL's loss
    (the batch's token sum over its token count), in value and gradient, on unequal lengths."""
    logits, labels = tiny_batch()
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1).float()
    assert len(set(counts.tolist())) > 1  # lengths differ
    trl_logits = logits.clone().requires_grad_(True)
    ours_logits = logits.clone().requires_grad_(True)
    trl_loss = trl_dft_loss if token_weighting == "prob" else trl_nll_loss
    trl = trl_loss(trl_logits, labels)
    reduced = sequence_logps(ours_logits, labels, prob_weighted=True)
    method = get_method("sft", token_weighting=token_weighting, sft_token_mean="step")
    batch = LogpBatch(
        policy_demo_logps=reduced.logps,
        demo_token_counts=counts,
        policy_demo_prob_weighted_logps=reduced.prob_weighted,
        step_mean_demo_tokens=float(counts.mean()),
    )
    ours = method.loss(batch)[0].mean()
    torch.testing.assert_close(ours.double(), trl, rtol=1e-6, atol=1e-7)
    ours.backward()
    trl.backward()
    torch.testing.assert_close(ours_logits.grad, trl_logits.grad, rtol=1e-5, atol=1e-7)
    sequence = get_method("sft", token_weighting=token_weighting).loss(batch)[0].mean()
    assert abs(float(sequence.detach()) - float(trl)) > 1e-3  # the default differs here
    with pytest.raises(ValueError, match="step_mean_demo_tokens"):
        method.loss(dataclasses.replace(batch, step_mean_demo_tokens=None))


def model_batch(tokenizer, count: int = 4) -> dict:
    """The tiny model's demonstrations as the trainer collates them (no generations)."""
    demos = tiny_demos(count)
    examples = build_examples(
        tokenizer,
        [d.prompt for d in demos],
        [d.response + " and more words" * (d.id == "d1") for d in demos],
        TokenLimits(64, 96),
    )
    return collate(examples, tokenizer.pad_token_id, with_generations=False)


@pytest.mark.parametrize("average", [False, True])
def test_lean_and_plain_paths_give_the_same_values_and_gradients(
    tiny_model, tiny_tokenizer, average
):
    tiny_model.train()
    batch = model_batch(tiny_tokenizer)
    results = {}
    for path in ("lean", "plain"):
        tiny_model.zero_grad(set_to_none=True)
        reduced = forward_logps(tiny_model, batch, average, path=path, prob_weighted=True)
        assert isinstance(reduced, SequenceLogps)
        # the plain log-probs are the default call's, bit for bit (other methods unchanged)
        with torch.no_grad():
            plain_call = forward_logps(tiny_model, batch, average, path=path)
        assert torch.equal(reduced.logps.detach(), plain_call)
        weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
        (reduced.prob_weighted * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
        results[path] = (reduced.prob_weighted.detach(), grads)
    (lean, lean_grads), (plain, plain_grads) = results["lean"], results["plain"]
    torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        error = (lean_grads[name] - grad).norm() / grad.norm()
        assert error < 1e-5, (name, float(error))


def test_bound_from_the_settings_and_refused_with_another_method():
    method = build_method(from_dict({"method": "sft", "token_weighting": "prob"}).objective)
    assert isinstance(method, SFT) and method.needs_prob_weighted_logps
    assert method.name == "dynamic-ft" and not method.needs_generations
    assert not build_method(from_dict({"method": "sft"}).objective).needs_prob_weighted_logps
    assert from_dict({"method": "sft", "token_weighting": "prob"}).run_name() == (
        "dynamic-ft-seed0"
    )
    with pytest.raises(ConfigError, match="token_weighting='prob'.*--method sft"):
        from_dict({"method": "gsil", "token_weighting": "prob"})
    with pytest.raises(ConfigError, match="token_weighting must be one of"):
        from_dict({"method": "sft", "token_weighting": "entropy"})
    step = build_method(from_dict({"method": "sft", "sft_token_mean": "step"}).objective)
    assert isinstance(step, SFT) and step.token_mean == "step"
    with pytest.raises(ConfigError, match="sft_token_mean='step'.*--method sft"):
        from_dict({"method": "spin", "sft_token_mean": "step"})
    with pytest.raises(ConfigError, match="sft_token_mean=step.*average_logps"):
        from_dict({"method": "sft", "sft_token_mean": "step", "average_logps": True})


# --------------------------------------------------------------------------- in the round loop


def dynamic_ft_run(
    model, tokenizer, run_dir: Path, objective, resume: bool = False, grad_accum: int = 1
) -> dict:
    """6 demonstrations in one step (micro-batches of 6 / grad_accum), 3 epochs: 3 steps, a
    checkpoint after each."""
    optim = OptimSettings(
        learning_rate=1e-2,
        epochs=3,
        batch_size=6 // grad_accum,
        grad_accum=grad_accum,
        checkpoint_every=1,
    )
    return run_rounds(
        model,
        tokenizer,
        tiny_demos(6),
        objective,
        RoundsSettings(
            run_dir=run_dir,
            rounds=1,
            optim=optim,
            generation=GenerationSettings(max_new_tokens=4, batch_size=6),
            max_prompt_length=64,
            max_length=96,
            seed=0,
            resume=resume,
        ),
    )


def first_loss_by_hand(model, tokenizer, token_mean: str = "sequence") -> float:
    """The mean over the 6 demonstrations of ``-(1/n) sum_t p_t log p_t`` under ``model``,
    from its full logits and a log_softmax (``step``: the 6 sums over their token count)."""
    demos = tiny_demos(6)
    examples = build_examples(
        tokenizer, [d.prompt for d in demos], [d.response for d in demos], TokenLimits(64, 96)
    )
    batch = collate(examples, tokenizer.pad_token_id, with_generations=False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = (
        logits[:, :-1].double().log_softmax(-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    )
    sums = -(token_logps.exp() * token_logps * mask).sum(-1)
    if token_mean == "step":
        return float(sums.sum() / mask.sum())
    return float((sums / mask.sum(-1)).mean())


def test_the_round_loop_trains_it_and_resumes_bit_for_bit(
    tiny_model_readonly, tiny_tokenizer, tmp_path
):
    objective = get_method("sft", token_weighting="prob")
    whole = tmp_path / "whole"
    summary = dynamic_ft_run(copy.deepcopy(tiny_model_readonly), tiny_tokenizer, whole, objective)
    assert summary["objective"] == "dynamic-ft"
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert rows[0]["loss"] == pytest.approx(
        first_loss_by_hand(tiny_model_readonly, tiny_tokenizer), rel=1e-5
    )
    # the demonstrations become likelier; the loss -p log p itself rises while p < 1/e
    assert rows[-1]["logps/chosen"] > rows[0]["logps/chosen"]

    broken = tmp_path / "broken"
    with pytest.raises(Interrupt):
        dynamic_ft_run(
            copy.deepcopy(tiny_model_readonly),
            tiny_tokenizer,
            broken,
            interrupting(objective, after_calls=2),
        )
    dynamic_ft_run(
        copy.deepcopy(tiny_model_readonly), tiny_tokenizer, broken, objective, resume=True
    )
    resumed = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    expected = load_file(str(whole / "round_0" / "model" / "model.safetensors"))
    got = load_file(str(broken / "round_0" / "model" / "model.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)


def test_the_step_token_mean_counts_every_micro_batch(
    tiny_model_readonly, tiny_tokenizer, tmp_path
):
    """With 2 micro-batches of 3 a step, the first step's loss is the 6 demonstrations' token
    sum over their token count (not each micro-batch's own count)."""
    objective = get_method("sft", token_weighting="prob", sft_token_mean="step")
    model = copy.deepcopy(tiny_model_readonly)
    dynamic_ft_run(model, tiny_tokenizer, tmp_path / "step", objective, grad_accum=2)
    rows = [
        json.loads(line) for line in (tmp_path / "step" / "metrics.jsonl").read_text().splitlines()
    ]
    expected = first_loss_by_hand(tiny_model_readonly, tiny_tokenizer, "step")
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5)
    sequence = first_loss_by_hand(tiny_model_readonly, tiny_tokenizer)
    assert abs(expected - sequence) > 1e-3 * abs(sequence)  # the lengths differ enough


# the job of tests/distributed_run.py: 10 demos, 2 rounds, micro-batch 2 per process
JOB = dict(
    method="sft", objective_settings={"token_weighting": "prob"}, learning_rate=1e-3, batch_size=2
)
# the step's token count over both processes (each holds demonstrations of other lengths)
STEP_JOB = {**JOB, "objective_settings": {"token_weighting": "prob", "sft_token_mean": "step"}}


def test_two_processes_give_the_one_process_run_and_resume_bit_for_bit(tmp_path):
    """One ``accelerate launch`` (2 CPU processes, gloo) runs the job straight and interrupted
    in round 1 then resumed; the same job in one process with micro-batch 4 is the reference."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from distributed_run import run_job
    from test_distributed import assert_same_run, assert_same_weights_bitwise, launch

    jobs = [
        {"name": "dynamic-ft", **JOB},
        {"name": "dynamic-ft-resumed", **JOB, "interrupt_after_calls": 4},
        {"name": "dynamic-ft-step", **STEP_JOB},
    ]
    launch(tmp_path / "two", jobs)
    for name, job in (("dynamic-ft", JOB), ("dynamic-ft-step", STEP_JOB)):
        AcceleratorState._reset_state(reset_partial_state=True)
        run_job(tmp_path / "one", Accelerator(cpu=True), name=name, **{**job, "batch_size": 4})
        AcceleratorState._reset_state(reset_partial_state=True)
        assert_same_run(tmp_path / "two" / name, tmp_path / "one" / name, job)
    two = tmp_path / "two" / "dynamic-ft"
    assert_same_weights_bitwise(tmp_path / "two" / "dynamic-ft-resumed", two)
