"""The pieces that make several processes equal one, checked without launching any.

* ``plan_steps``: the per-process shares of each global batch cover every example once, with
  zero-weight fillers only where a share is empty, and one optimizer step per ``grad_accum``
  micro-batches on every process.
* ``resolve_deepspeed_config``: DeepSpeed's batch, accumulation and clipping come from the run;
  a config that disagrees, or would swap the optimizer, is refused.
* ``check_processes``: launches that are not what they asked for are refused.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
from accelerate import Accelerator, DistributedType

from gsil.optimization import OptimSettings, plan_steps, rank_share
from gsil.processes import check_processes, resolve_deepspeed_config


@pytest.mark.parametrize(
    "count, batch_size, grad_accum, world",
    list(itertools.product([1, 5, 9, 10, 16], [1, 2, 3], [1, 2, 3], [1, 2, 3, 4])),
)
def test_shares_cover_every_example_once_in_the_one_process_order(
    count, batch_size, grad_accum, world
):
    order = list(reversed(range(count)))  # any permutation; the plan must keep its order
    plans = [plan_steps(order, batch_size, grad_accum, world, rank) for rank in range(world)]
    single = plan_steps(order, batch_size * world, grad_accum, 1, 0)
    # the same number of optimizer steps on every process, and as in one process with world x b
    assert {len(plan) for plan in plans} == {len(single)}
    for step_index, single_step in enumerate(single):
        steps = [plan[step_index] for plan in plans]
        assert all(len(step.micro_batches) == grad_accum for step in steps)
        assert {step.num_examples for step in steps} == {single_step.num_examples}
        for micro_index, single_micro in enumerate(single_step.micro_batches):
            real = [
                index
                for step in steps
                for index, weight in zip(
                    step.micro_batches[micro_index].indices,
                    step.micro_batches[micro_index].weights,
                    strict=True,
                )
                if weight
            ]
            expected = [
                i for i, w in zip(single_micro.indices, single_micro.weights, strict=True) if w
            ]
            # process shares, concatenated in rank order, are the one-process micro-batch
            assert real == expected
    covered = sorted(
        index
        for plan in plans
        for step in plan
        for micro in step.micro_batches
        for index, weight in zip(micro.indices, micro.weights, strict=True)
        if weight
    )
    assert covered == list(range(count))


def test_an_empty_share_is_one_zero_weight_filler():
    assert rank_share([7], 2, 0).weights == (1.0,)
    filler = rank_share([7], 2, 1)
    assert filler.indices == (7,) and filler.weights == (0.0,)
    # 5 items on 3 processes: 2, 2, 1 in order
    assert [rank_share(list(range(5)), 3, r).indices for r in range(3)] == [(0, 1), (2, 3), (4,)]


def test_a_short_last_step_is_padded_to_grad_accum_micro_batches():
    # 5 examples, micro-batch 2, accumulation 2: steps of 4 and 1 examples
    steps = plan_steps(list(range(5)), 2, 2, 1, 0)
    assert [s.num_examples for s in steps] == [4, 1]
    last = steps[-1].micro_batches
    assert len(last) == 2 and last[0].weights == (1.0,) and last[1].weights == (0.0,)


def settings(**overrides) -> OptimSettings:
    return OptimSettings(**{"batch_size": 4, "grad_accum": 2, "max_grad_norm": 1.0, **overrides})


def test_deepspeed_auto_fields_take_the_run_values():
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3},
    }
    resolved = resolve_deepspeed_config(config, settings(), num_processes=4)
    assert resolved["train_micro_batch_size_per_gpu"] == 4
    assert resolved["gradient_accumulation_steps"] == 2
    assert resolved["gradient_clipping"] == 1.0  # absent: the run's value
    assert resolved["train_batch_size"] == 4 * 2 * 4
    assert resolved["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("gradient_accumulation_steps", 2 * 2, "--grad-accum"),
        ("train_micro_batch_size_per_gpu", 16, "--batch-size"),
        ("gradient_clipping", 0.5, "--max-grad-norm"),
        ("train_batch_size", 64, "processes"),
    ],
)
def test_deepspeed_values_that_disagree_are_refused(field, value, flag):
    with pytest.raises(ValueError, match=f"{field}={value}.*{flag}") as error:
        resolve_deepspeed_config({field: value}, settings(), num_processes=2)
    assert "'auto'" in str(error.value)


def test_deepspeed_values_that_agree_are_kept():
    config = {"gradient_accumulation_steps": 2, "gradient_clipping": 1.0}
    assert resolve_deepspeed_config(config, settings(), 1)["gradient_accumulation_steps"] == 2


def test_deepspeed_never_swaps_the_optimizer_silently():
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ValueError, match="DeepSpeedCPUAdam; use --optimizer adamw"):
        resolve_deepspeed_config(offload, settings(optimizer="rmsprop"), 2)
    # AdamW offloaded is the same update rule (DeepSpeedCPUAdam in AdamW mode): allowed
    resolve_deepspeed_config(offload, settings(optimizer="adamw"), 2)
    with pytest.raises(ValueError, match="defines 'optimizer'"):
        resolve_deepspeed_config({"optimizer": {"type": "Adam"}}, settings(), 2)
    with pytest.raises(ValueError, match="defines 'scheduler'"):
        resolve_deepspeed_config({"scheduler": {"type": "WarmupLR"}}, settings(), 2)


def test_accelerate_launch_cpu_with_several_processes_is_refused(monkeypatch):
    """``accelerate launch --cpu --num_processes 2`` starts one process with this environment."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="started ONE process.*--multi_gpu --num_processes"):
        check_processes(Accelerator(cpu=True))


def joined(num_processes: int, kind: DistributedType) -> SimpleNamespace:
    """What ``check_processes`` reads of an Accelerator (a real one would join the launch)."""
    return SimpleNamespace(num_processes=num_processes, distributed_type=kind)


def test_a_process_that_misses_its_launch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched as one of 2, joined alone
    with pytest.raises(RuntimeError, match="started 2 processes but accelerate joined 1"):
        check_processes(joined(1, DistributedType.NO))
    check_processes(joined(2, DistributedType.MULTI_CPU))


def test_an_engine_accelerate_did_not_turn_on_is_refused(monkeypatch):
    # accelerate launch --use_fsdp on CPUs: accelerate 1.15 runs plain DDP (measured here)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="asked for FSDP but accelerate runs MULTI_CPU"):
        check_processes(joined(2, DistributedType.MULTI_CPU))
    check_processes(joined(2, DistributedType.FSDP))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match="asked for DEEPSPEED but accelerate runs MULTI_CPU"):
        check_processes(joined(2, DistributedType.MULTI_CPU))
    check_processes(joined(2, DistributedType.DEEPSPEED))


def test_a_plain_single_process_run_passes(monkeypatch):
    for name in ("MASTER_ADDR", "WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    check_processes(Accelerator(cpu=True))


@pytest.mark.parametrize("num_batches, world", itertools.product(range(0, 9), [1, 2, 3, 4]))
def test_generation_batches_are_dealt_out_once_with_equal_call_counts(num_batches, world):
    from gsil.generation import deal_batches

    dealt = [deal_batches(num_batches, world, rank) for rank in range(world)]
    # each process generates its share (not the whole set) ...
    real = sorted(number for numbers in dealt for number in numbers if number >= 0)
    assert real == list(range(num_batches))
    # ... and makes as many generate() calls as every other (ZeRO-3 runs them in lockstep)
    assert len({len(numbers) for numbers in dealt}) == 1
    assert all(len(numbers) == -(-num_batches // world) for numbers in dealt)
