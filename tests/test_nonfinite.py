"""The non-finite guard (``--on-nonfinite stop|skip``) on the tiny model (seconds per run).

A wrapped objective poisons one micro-batch: either its first example's loss becomes NaN (the
gradient stays finite, so only the loss check can see it) or its gradient becomes infinite (the
loss stays finite, so only the gradient check can see it). The poisoned example is found from
its stored reference log-prob, independently of the trainer's batch plan.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import Spy, build_tiny_model, build_tiny_tokenizer, tiny_demos

from gsil.estimators import get_estimator
from gsil.generation import GenerationSettings
from gsil.methods import get_method
from gsil.nonfinite import NonFiniteError, nonfinite_rows
from gsil.trainer import OptimSettings, RoundsSettings, run_rounds

GENERATION = GenerationSettings(max_new_tokens=6, do_sample=False, batch_size=4)
# 8 demonstrations, micro-batch 2, accumulation 2: 2 optimizer steps per epoch, 2 objective
# calls per step (call c is in step (c + 1) // 2), 4 steps in all
STEPS = 4


def optim(**overrides) -> OptimSettings:
    base = dict(learning_rate=1e-2, epochs=2, batch_size=2, grad_accum=2, checkpoint_every=1)
    return OptimSettings(**{**base, **overrides})


class _InfGrad(torch.autograd.Function):
    """Identity forward; the first row's gradient becomes +inf."""

    @staticmethod
    def forward(ctx, values):
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[0] = float("inf")
        return grad


class Poisoned:
    """``objective`` with a non-finite value injected at the given 1-based calls.

    ``kind`` "nan": the first example's loss is NaN, its gradient unchanged; "inf": the loss is
    unchanged, the first example's gradient infinite; "zero": every loss times 0 (the reference
    for a dropped update). Records the reference log-prob of each poisoned example and the
    checkpoint's file hashes at the moment of poisoning.
    """

    def __init__(self, objective, calls, kind: str, run_dir: Path):
        self.calls, self.kind, self.run_dir = set(calls), kind, run_dir
        self.count = 0
        self.ref_values: list[float] = []
        self.checkpoint_then: dict[str, str] = {}
        self.objective = Spy(objective, self._around)

    def _around(self, loss, batch):
        self.count += 1
        losses, stats = loss(batch)
        if self.count not in self.calls:
            return losses, stats
        self.ref_values.append(float(batch.ref_demo_logps[0]))  # of the first example
        self.checkpoint_then = file_hashes(self.run_dir / "checkpoint")
        if self.kind == "nan":
            poison = torch.zeros_like(losses)
            poison[0] = float("nan")
            return losses + poison.detach(), stats
        if self.kind == "inf":
            return _InfGrad.apply(losses), stats
        return losses * 0.0, stats


def file_hashes(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        return {}
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def poisoned_ids(run_dir: Path, ref_values: list[float]) -> list[str]:
    """The demonstrations whose stored reference log-prob is one of ``ref_values``."""
    stored = torch.load(run_dir / "round_0" / "reference_logps.pt")["demo"].tolist()
    demos = tiny_demos(len(stored))
    return [demos[stored.index(value)].id for value in ref_values]


def run(model, tokenizer, objective, run_dir: Path, **overrides):
    return run_rounds(
        model,
        tokenizer,
        tiny_demos(8),
        objective,
        RoundsSettings(
            run_dir=run_dir,
            rounds=1,
            optim=optim(**overrides),
            generation=GENERATION,
            max_prompt_length=64,
            max_length=96,
            seed=1,
        ),
    )


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def gsil():
    return get_method("gsil", get_estimator("logistic"), beta=0.5)


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


def model_weights(model, like: dict) -> dict:
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in like}


@pytest.mark.parametrize(
    ("kind", "call"),
    [("nan", 1), ("nan", 5), ("inf", 6)],  # step 1; step 3's first and last micro-batch
)
def test_stop_names_the_examples_and_leaves_weights_and_checkpoint(
    tiny_model, tiny_tokenizer, tmp_path, kind, call
):
    initial = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    poisoned = Poisoned(gsil(), [call], kind, tmp_path)
    with pytest.raises(NonFiniteError) as caught:
        run(tiny_model, tiny_tokenizer, poisoned.objective, tmp_path)
    error, step = caught.value, (call + 1) // 2
    assert error.quantity == ("loss" if kind == "nan" else "gradient norm")
    assert f"round 0, step {step}" in str(error)
    named = poisoned_ids(tmp_path, poisoned.ref_values)
    if kind == "nan":
        assert error.example_ids == named  # exactly the example whose loss was NaN
    else:
        assert set(named) <= set(error.example_ids) and len(error.example_ids) == 4  # the step's
    for example_id in error.example_ids:
        assert repr(example_id) in str(error)
    # no row for the failed step, and the checkpoint is the one before it, byte for byte
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, step))
    checkpoint = tmp_path / "checkpoint"
    assert file_hashes(checkpoint) == poisoned.checkpoint_then
    if step == 1:
        assert not checkpoint.exists()
        assert_same(model_weights(tiny_model, initial), initial)
    else:
        assert json.loads((checkpoint / "trainer_state.json").read_text())["step_in_round"] == (
            step - 1
        )
        saved = load_file(str(checkpoint / "model.safetensors"))
        assert_same(model_weights(tiny_model, saved), saved)
        assert not all(torch.equal(saved[k], initial[k]) for k in saved)  # it did train


def test_skip_of_the_first_step_equals_a_run_without_its_update(
    tiny_model_readonly, tiny_tokenizer, tmp_path
):
    # RMSprop from zero state with a zero gradient leaves weights and state as they were, so a
    # run whose step 1 has zero loss is a run that never saw step 1's update
    skipped = Poisoned(gsil(), [1], "nan", tmp_path / "skip")
    run(
        copy.deepcopy(tiny_model_readonly),
        tiny_tokenizer,
        skipped.objective,
        tmp_path / "skip",
        on_nonfinite="skip",
        optimizer="rmsprop",
        warmup_steps=1,
    )
    zeroed = Poisoned(gsil(), [1, 2], "zero", tmp_path / "zero")
    run(
        copy.deepcopy(tiny_model_readonly),
        tiny_tokenizer,
        zeroed.objective,
        tmp_path / "zero",
        optimizer="rmsprop",
        warmup_steps=1,
    )
    rows, reference = metrics(tmp_path / "skip"), metrics(tmp_path / "zero")
    assert [m["skipped"] for m in rows] == [1, 0, 0, 0]
    assert [m["skipped"] for m in reference] == [0] * STEPS
    assert rows[0]["loss"] != rows[0]["loss"]  # the NaN is recorded, not hidden
    # the schedule went on: every step's learning rate is the reference run's
    assert [m["learning_rate"] for m in rows] == [m["learning_rate"] for m in reference]
    expected = load_file(str(tmp_path / "zero" / "round_0" / "model" / "model.safetensors"))
    actual = load_file(str(tmp_path / "skip" / "round_0" / "model" / "model.safetensors"))
    assert_same(actual, expected)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_skip_of_the_last_step_keeps_the_weights_before_it(
    tiny_model_readonly, tiny_tokenizer, tmp_path, kind
):
    last_call = 2 * STEPS
    stopped = Poisoned(gsil(), [last_call], kind, tmp_path / "stop")
    with pytest.raises(NonFiniteError):
        run(
            copy.deepcopy(tiny_model_readonly), tiny_tokenizer, stopped.objective, tmp_path / "stop"
        )
    before = load_file(str(tmp_path / "stop" / "checkpoint" / "model.safetensors"))
    skipped = Poisoned(gsil(), [last_call], kind, tmp_path / "skip")
    run(
        copy.deepcopy(tiny_model_readonly),
        tiny_tokenizer,
        skipped.objective,
        tmp_path / "skip",
        on_nonfinite="skip",
    )
    assert [m["skipped"] for m in metrics(tmp_path / "skip")] == [0, 0, 0, 1]
    final = load_file(str(tmp_path / "skip" / "round_0" / "model" / "model.safetensors"))
    assert_same({k: final[k] for k in before}, before)


def test_nonfinite_rows_names_only_the_bad_examples():
    losses = torch.tensor([1.0, float("nan"), 2.0, float("-inf")])
    assert nonfinite_rows(losses, [7, 3, 5, 9]) == [3, 9]
    assert nonfinite_rows(torch.ones(2, 3), [0, 1]) == []
    per_sample = torch.tensor([[1.0, 2.0], [1.0, float("inf")]])  # (n, k)
    assert nonfinite_rows(per_sample, [4, 6]) == [6]
    assert nonfinite_rows(torch.tensor(float("nan")), [1, 2]) == [1, 2]  # unpaired: all


def test_on_nonfinite_is_a_run_flag():
    import experiments.run
    from experiments.config import resolve_config

    parser = experiments.run.build_parser()
    args = parser.parse_args(["--on-nonfinite", "skip"])
    assert resolve_config(args, args.preset).optim.on_nonfinite == "skip"
    default = parser.parse_args([])
    assert resolve_config(default, default.preset).optim.on_nonfinite == "stop"
    with pytest.raises(SystemExit):
        parser.parse_args(["--on-nonfinite", "ignore"])


def test_two_processes_take_the_same_decision(tmp_path):
    """DDP on 2 CPU processes, a NaN loss in process 1's share only (step 2): with stop both
    processes raise, naming that example; with skip both drop the update and stay equal."""
    from launch import accelerate_launch

    # a process that decided alone would leave the other waiting in a collective: the timeout
    accelerate_launch([__file__, str(tmp_path)], timeout=240)
    stop = [json.loads((tmp_path / f"stop-rank{r}.json").read_text()) for r in (0, 1)]
    assert stop[0]["poisoned_refs"] == [] and len(stop[1]["poisoned_refs"]) == 1
    expected = poisoned_ids(tmp_path / "stop", stop[1]["poisoned_refs"])
    for rank in (0, 1):
        assert stop[rank]["ids"] == expected
        assert "round 0, step 2" in stop[rank]["message"]
    assert stop[0]["weights"] == stop[1]["weights"]
    assert [m["step"] for m in metrics(tmp_path / "stop")] == [1]
    skip = [json.loads((tmp_path / f"skip-rank{r}.json").read_text()) for r in (0, 1)]
    assert skip[0]["ids"] is None and skip[1]["ids"] is None  # no error: the run went on
    assert skip[0]["weights"] == skip[1]["weights"]  # no process stepped alone
    assert [m["skipped"] for m in metrics(tmp_path / "skip")] == [0, 1]


def _weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _two_process_main(out: str) -> None:
    """Run under ``accelerate launch`` by :func:`test_two_processes_take_the_same_decision`."""
    from gsil.processes import make_accelerator

    torch.set_num_threads(1)
    accelerator = make_accelerator()
    rank = accelerator.process_index
    tokenizer = build_tiny_tokenizer()
    for mode in ("stop", "skip"):
        run_dir = Path(out) / mode
        # 4 demonstrations, micro-batch 1 per process, accumulation 2: 1 step per epoch, 2
        # objective calls per step on each process, so call 3 is in step 2 (of 2)
        poisoned = Poisoned(gsil(), [3] if rank == 1 else [], "nan", run_dir)
        model = build_tiny_model(tokenizer)
        result = {"ids": None}
        try:
            run_rounds(
                model,
                tokenizer,
                tiny_demos(4),
                poisoned.objective,
                RoundsSettings(
                    run_dir=run_dir,
                    rounds=1,
                    optim=optim(batch_size=1, on_nonfinite=mode),
                    generation=GENERATION,
                    max_prompt_length=64,
                    max_length=96,
                    seed=1,
                ),
                accelerator=accelerator,
            )
        except NonFiniteError as error:
            result.update(ids=error.example_ids, message=str(error))
        result.update(poisoned_refs=poisoned.ref_values, weights=_weights_sha256(model))
        (Path(out) / f"{mode}-rank{rank}.json").write_text(json.dumps(result))
        accelerator.wait_for_everyone()


if __name__ == "__main__":
    _two_process_main(sys.argv[1])
