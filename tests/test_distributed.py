"""Two processes give the one-process result: DDP over gloo on this CPU, the tiny model.

One ``accelerate launch --multi_gpu --num_processes 2`` runs every job of ``JOBS`` with
micro-batch b per process (``distributed_run.py``); each job is then run here in one process
with micro-batch 2b, the same global batch. Weights, step counts, per-step losses, generated
sets and reference log-probs must agree; an interrupted-and-resumed 2-process run must equal the
uninterrupted one bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from distributed_run import run_job
from launch import DDP, ZERO3, accelerate_launch
from safetensors.torch import load_file
from tiny import build_tiny_model, build_tiny_tokenizer

# name -> (per-process micro-batch, everything else shared by both runs)
JOBS = {
    # a small learning rate: the weights themselves agree to 1e-5
    "gsil-small-lr": dict(learning_rate=1e-5, batch_size=2),
    # AdamW at 1e-3: the weights move far; they agree to 1% of that movement
    "gsil": dict(learning_rate=1e-3, batch_size=2),
    "spin": dict(method="spin", learning_rate=1e-3, batch_size=2),
    "sft": dict(method="sft", learning_rate=1e-3, batch_size=2),
    # round 1 trains on the sets of rounds 0 and 1 together (SPIN's recipe): 20 pairs
    "spin-mixed": dict(
        method="spin", learning_rate=1e-3, batch_size=2, mix_previous_generations=True
    ),
    # 9 demos, micro-batch 1 x 2 processes, accumulation 2: the last global batch has one
    # example (process 1 runs a zero-weight filler) and the last step one micro-batch (padded)
    "gsil-accum2": dict(
        learning_rate=1e-3,
        batch_size=1,
        grad_accum=2,
        num_demos=9,
        loss="brier",
        optimizer="rmsprop",
        warmup_steps=1,
    ),
}
# 2-process runs interrupted after this many objective calls, then resumed (same as "gsil")
RESUMED = {"gsil-resumed-round0": 2, "gsil-resumed-round1": 4}
SMALL_LR_ATOL = 1e-5


def launch(out: Path, jobs: list[dict], engine: list[str] = DDP, num_processes: int = 2) -> None:
    """``accelerate launch`` the jobs on ``num_processes`` CPU processes (gloo)."""
    script = Path(__file__).with_name("distributed_run.py")
    accelerate_launch(
        [str(script), str(out), json.dumps(jobs)], engine=engine, num_processes=num_processes
    )


@pytest.fixture(scope="module")
def two_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-process")
    jobs = [{"name": name, **job} for name, job in JOBS.items()]
    jobs += [
        {"name": name, **JOBS["gsil"], "interrupt_after_calls": calls}
        for name, calls in RESUMED.items()
    ]
    launch(out, jobs)
    assert json.loads((out / "processes.json").read_text()) == 2
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The same jobs in this process, with twice the micro-batch."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("one-process")
    for name, job in JOBS.items():
        AcceleratorState._reset_state(reset_partial_state=True)
        run_job(
            out, Accelerator(cpu=True), name=name, **{**job, "batch_size": 2 * job["batch_size"]}
        )
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path, round_index: int = 1) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"round_{round_index}" / "model" / "model.safetensors"))


def initial_weights() -> dict[str, torch.Tensor]:
    return dict(build_tiny_model(build_tiny_tokenizer()).state_dict())


def distance(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


@pytest.fixture(scope="module")
def zero3(tmp_path_factory) -> Path:
    """The GSIL jobs (and a resumed one) under DeepSpeed ZeRO-3 on 2 CPU processes."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (make setup installs it with the dev extras)")
    out = tmp_path_factory.mktemp("zero3")
    jobs = [{"name": name, **JOBS[name]} for name in ZERO3_JOBS]
    jobs.append({"name": "gsil-resumed-round1", **JOBS["gsil"], "interrupt_after_calls": 4})
    # loaded partitioned (zero3_init_flag): round 0 generates and scores from placeholders
    jobs.append({"name": "gsil-zero3-init", **JOBS["gsil"], "zero3_init": True})
    launch(out, jobs, engine=ZERO3)
    return out


ZERO3_JOBS = ["gsil", "sft", "gsil-accum2"]


@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_give_the_one_process_run(name, two_process, one_process):
    assert_same_run(two_process / name, one_process / name, JOBS[name])


@pytest.mark.parametrize("name", ZERO3_JOBS)
def test_deepspeed_zero3_gives_the_one_process_run(name, zero3, one_process):
    """Parameters partitioned across processes: generation and the reference pass gather them,
    the round model is saved gathered, accumulation and clipping come from the run."""
    assert_same_run(zero3 / name, one_process / name, JOBS[name])


def test_deepspeed_zero3_from_a_partitioned_model_gives_the_one_process_run(zero3, one_process):
    assert_same_run(zero3 / "gsil-zero3-init", one_process / "gsil", JOBS["gsil"])


def test_deepspeed_zero3_resume_is_bitwise_exact(zero3):
    assert_same_weights_bitwise(zero3 / "gsil-resumed-round1", zero3 / "gsil")


def assert_same_run(two: Path, one: Path, job: dict) -> None:
    two_rows, one_rows = metrics(two), metrics(one)
    # the same optimizer steps (each process took its share, not every example)
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows]
    # 10 demos / global batch 4 (or 9 / 2, accumulated by 2): 3 steps a round, 2 rounds; mixed,
    # round 1 trains on 20 pairs: 5 steps
    assert len(two_rows) == (8 if job.get("mix_previous_generations") else 6)
    for two_row, one_row in zip(two_rows, one_rows, strict=True):
        assert two_row["loss"] == pytest.approx(one_row["loss"], abs=1e-4)
        # the gradient itself (AdamW and clipping would hide a wrong scale in the weights)
        assert two_row["grad_norm"] == pytest.approx(one_row["grad_norm"], rel=1e-4)
        assert two_row["tokens"] == one_row["tokens"]
    for round_index in (0, 1):
        round_two, round_one = two / f"round_{round_index}", one / f"round_{round_index}"
        if (round_one / "generated.jsonl").exists():
            assert (round_two / "generated.jsonl").read_text() == (
                round_one / "generated.jsonl"
            ).read_text()
        ref_path = "reference_logps.pt"
        if (round_one / ref_path).exists():
            ref_two, ref_one = torch.load(round_two / ref_path), torch.load(round_one / ref_path)
            for part in ("demo", "gen"):
                if ref_one[part] is not None:
                    torch.testing.assert_close(ref_two[part], ref_one[part], atol=1e-4, rtol=0)
        summary = json.loads((round_two / "summary.json").read_text())
        assert summary["num_processes"] == 2
    final_two, final_one = weights(two), weights(one)
    moved = distance(final_one, initial_weights())
    assert moved > 0
    assert distance(final_two, final_one) <= 0.01 * moved
    if job["learning_rate"] <= 1e-5:
        for key in final_one:
            torch.testing.assert_close(final_two[key], final_one[key], atol=SMALL_LR_ATOL, rtol=0)


@pytest.mark.parametrize("name", list(RESUMED))
def test_two_process_resume_is_bitwise_exact(name, two_process):
    assert_same_weights_bitwise(two_process / name, two_process / "gsil")


def assert_same_weights_bitwise(resumed: Path, straight: Path) -> None:
    expected, actual = weights(straight), weights(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    assert [r["step"] for r in metrics(resumed)] == [r["step"] for r in metrics(straight)]
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]
    assert not (resumed / "checkpoint").exists()


def test_the_pipeline_command_on_two_processes(tmp_path):
    """``python -m experiments.run --preset P`` under ``accelerate launch``: the stages train
    on both processes (round-0 generations shared with every process), the main process alone
    writes the plan, report and figures, and the runs equal the one-process command's."""
    from experiments.run import main
    from gsil.models import save_model

    tokenizer = build_tiny_tokenizer()
    model_dir = save_model(build_tiny_model(tokenizer), tokenizer, tmp_path / "tiny-model")
    data = tmp_path / "demos.jsonl"
    rows = [{"prompt": f"double {i}", "response": f"{2 * i}"} for i in range(10)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = {
        "model": str(model_dir),
        "data": str(data),
        "num_demos": 10,
        "lr": 1e-3,
        "max_new_tokens": 6,
        "max_prompt_length": 64,
        "max_length": 96,
        "gen_batch_size": 3,
        "checkpoint_every": 1,
        "precision": "fp32",
        "generator": "hf",
        "beta": 0.5,
    }
    stages = [
        {"name": "spin", "method": "spin", "rounds": 2},
        {"name": "gsil", "method": "gsil", "rounds": 2, "share_round0_generations": "spin"},
    ]
    preset = tmp_path / "tiny-pipeline.json"
    preset.write_text(json.dumps({"pipeline": "tiny", "base": base, "stages": stages}))
    command = ["-m", "experiments.run", "--preset", str(preset), "--output-dir"]
    launch_module(command + [str(tmp_path / "two"), "--batch-size", "2"])
    main(["--preset", str(preset), "--output-dir", str(tmp_path / "one"), "--batch-size", "4"])
    for stage in ("spin", "gsil"):
        two, one = tmp_path / "two" / "tiny" / stage, tmp_path / "one" / "tiny" / stage
        assert json.loads((two / "config.json").read_text())["optim"]["batch_size"] == 2
        assert_same_run(two, one, {"learning_rate": 1e-3})
    root = tmp_path / "two" / "tiny"
    assert (root / "pipeline.json").exists() and (root / "report.md").exists()
    assert json.loads((root / "summary.json").read_text())["stages"]["gsil"]["status"] == "resumed"


def launch_module(args: list[str]) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` a module with arguments."""
    accelerate_launch(args)
