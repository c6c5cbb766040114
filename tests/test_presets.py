"""Presets: the paper-zephyr dry-run plan, the default pipeline's design, and a tiny pipeline
that trains, evaluates, reports, and skips everything when re-run."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_pipeline_base

import experiments.run
import experiments.training
from experiments.config import from_dict, load_pipeline, load_preset, read_recipe
from experiments.planning import plan_run
from gsil.models import save_model


def _dry_run(capsys, *argv) -> dict:
    experiments.run.main(["--dry-run", *argv])
    out = capsys.readouterr().out
    assert out.startswith("dry run: nothing is loaded or trained")
    return json.loads(out.split("\n", 1)[1])


@pytest.fixture
def nothing_loads(monkeypatch):
    """A dry run must load neither weights nor data."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a dry run loaded something")

    monkeypatch.setattr("gsil.models.load_model", forbidden)
    monkeypatch.setattr("gsil.data.load_demonstrations", forbidden)
    monkeypatch.setattr("datasets.load_dataset", forbidden)


def test_paper_zephyr_preset_is_the_papers_setting():
    config = from_dict(load_preset("paper-zephyr"))
    assert config.model.name_or_path == "alignment-handbook/zephyr-7b-sft-full"
    assert config.model.precision == "bf16"
    assert (config.data.source, config.data.split, config.data.response_field) == (
        "HuggingFaceH4/ultrafeedback_binarized",
        "train_prefs",
        "chosen",
    )
    assert (config.data.max_length, config.data.max_prompt_length, config.data.num_demos) == (
        1024,
        512,
        None,
    )
    goal = config.objective
    assert (goal.method, goal.loss, goal.beta, goal.shift) == ("gsil", "logistic", 0.01, 2.0)
    optim = config.optim
    assert (optim.optimizer, optim.learning_rate, optim.warmup_steps, optim.epochs) == (
        "rmsprop",
        5e-7,
        30,
        1,
    )
    assert (optim.batch_size, optim.grad_accum, optim.gradient_checkpointing) == (16, 2, True)
    gen = config.generation
    assert (gen.max_new_tokens, gen.do_sample, gen.backend) == (256, False, "vllm")
    assert config.seed == 42


def test_paper_zephyr_dry_run_plan(capsys, nothing_loads):
    """The paper's run, counted by hand. Theory page, section 6: per-device batch 16,
    accumulation 2, 4 GPUs, an effective batch of 128 prompts; 61,135 prompts in
    ultrafeedback_binarized's train_prefs = 477 x 128 + 79, so 477 full steps and one partial
    step in its one epoch and one round; one greedy response per prompt."""
    plan = _dry_run(capsys, "--preset", "paper-zephyr")
    assert plan["demonstrations"] == 61_135
    assert plan["prompts_per_optimizer_step"] == 128
    assert plan["optimizer_steps"] == 478
    assert plan["generated_responses"] == 61_135
    estimate = plan["estimate"]
    assert estimate["gpus"] == 4
    assert estimate["assumptions"]["model_billion_params"] == 7.0
    assert estimate["assumptions"]["train_tokens_per_s_per_gpu"] > 0
    assert 1 < estimate["gpu_hours"] < 100
    assert estimate["wall_hours"] == pytest.approx(estimate["gpu_hours"] / 4, abs=0.06)


SMALL_RUN = [
    "--model",
    "smollm2-135m",
    "--data",
    "rg:chain_sum",
    "--num-demos",
    "10",
    "--batch-size",
    "2",
    "--grad-accum",
    "2",
    "--epochs",
    "2",
    "--rounds",
    "2",
    "--max-prompt-length",
    "20",
    "--max-length",
    "30",
    "--max-new-tokens",
    "4",
]


@pytest.mark.parametrize(
    ("method", "trained", "reference", "generated", "responses"),
    [("gsil", 2160, 1080, 80, 20), ("sft", 1200, 0, 0, 0)],
)
def test_dry_run_counts_steps_and_tokens_by_hand(
    capsys, nothing_loads, method, trained, reference, generated, responses
):
    """A stated small run on one process, counted by hand (not by the planner's formula).

    10 reasoning-gym demonstrations, micro-batch 2, accumulation 2, 2 epochs, 2 rounds; prompts
    cut at 20 tokens, sequences at 30, generations at 4 new tokens. Steps: 10 / 2 = 5
    micro-batches an epoch, grouped 2 + 2 + 1 = 3 steps, x 2 epochs x 2 rounds = 12, of 2 x 2 = 4
    prompts each. Tokens (the caps bind: the plan's assumed means exceed them): a demonstration
    sequence is 20 + 10 = 30 tokens, a generated one 20 + 4 = 24. GSIL trains on both, 10 x 54 x 2
    epochs x 2 rounds = 2160, scores both once a round, 10 x 54 x 2 = 1080, and generates
    10 x 4 x 2 = 80 new tokens in 20 responses; SFT trains on demonstrations only,
    10 x 30 x 2 x 2 = 1200, with no reference pass and no generation.
    """
    plan = _dry_run(capsys, *SMALL_RUN, "--method", method)
    assumed = plan["token_assumptions"]
    assert assumed["prompt"] > 20 and assumed["response"] > 10 and assumed["generated"] > 4
    assert plan["demonstrations"] == 10
    assert plan["prompts_per_optimizer_step"] == 4
    assert plan["optimizer_steps"] == 12
    assert plan["generated_responses"] == responses
    assert plan["tokens"] == {
        "trained": trained,
        "reference_pass": reference,
        "generated": generated,
    }


@pytest.mark.parametrize("demos", [1, 7, 10, 13, 24])
@pytest.mark.parametrize("processes", [1, 2, 3])
def test_planned_steps_are_the_trainers_steps(demos, processes):
    """The plan's step count against the trainer's own step planner
    (``gsil.optimization.plan_steps``, a separate implementation), one epoch, one round. By
    hand for 10 demonstrations on 3 processes of micro-batch 2: a global micro-batch of 6, so
    6 + 4, one step with accumulation 2."""
    from gsil.optimization import plan_steps

    config = from_dict(
        {
            "model": "smollm2-135m",
            "data": "rg:chain_sum",
            "num_demos": demos,
            "batch_size": 2,
            "grad_accum": 2,
            "method": "sft",
        }
    )
    plan = plan_run(config, processes=processes)
    trainer_steps = plan_steps(range(demos), 2, 2, processes, 0)
    assert plan["optimizer_steps"] == len(trainer_steps)
    assert sum(step.num_examples for step in trainer_steps) == demos
    assert plan["prompts_per_optimizer_step"] == 4 * processes
    if (demos, processes) == (10, 3):
        assert plan["optimizer_steps"] == 1


def test_dry_run_follows_flags(capsys, nothing_loads):
    plan = _dry_run(capsys, "--preset", "paper-zephyr", "--num-demos", "1280", "--rounds", "2")
    assert plan["demonstrations"] == 1280
    assert plan["optimizer_steps"] == 2 * 10
    assert plan["tokens"]["generated"] == 2 * 1280 * plan["token_assumptions"]["generated"]


def test_default_pipeline_compares_at_equal_demos_and_steps(tmp_path):
    pipeline = load_pipeline("default", {"output_dir": str(tmp_path)})
    stages = {stage.name: stage for stage in pipeline.stages}
    compared_groups = ["sft-continued", "dynamic-ft", "spin", "gsil-logistic", "dft", "sdft"]
    assert list(stages) == ["sft"] + [f"{g}-seed{s}" for g in compared_groups for s in (0, 1, 2)]
    sft = stages["sft"].config
    assert not stages["sft"].repeated  # one SFT model, the parent of every compared run
    assert (sft.objective.method, sft.model.name_or_path, sft.data.source) == (
        "sft",
        "smollm2-135m",
        "rg:chain_sum,basic_arithmetic",
    )
    for seed in (0, 1, 2):
        compared = [stages[f"{g}-seed{seed}"].config for g in compared_groups]
        methods = [c.objective.method for c in compared]
        assert methods == ["sft", "sft", "spin", "gsil", "dft", "sdft"]
        weighting = [c.objective.token_weighting for c in compared]
        assert weighting == ["none", "prob", "none", "none", "none", "none"]
        for config in compared:
            assert config.model.name_or_path == str(
                tmp_path / "default" / "sft" / "round_0" / "model"
            )
            assert config.rounds == 2 and config.model.precision == "auto"
            assert config.objective.drop_ties is False and config.seed == seed
        # equal demonstrations (the same draw for a seed), optimizer and steps for every method
        assert len({(repr(c.data), repr(c.optim), c.seed) for c in compared}) == 1
        assert len({plan_run(c)["optimizer_steps"] for c in compared}) == 1
        assert compared[4].generation.num_samples == 2 and compared[4].generation.do_sample
        assert compared[5].generation.do_sample  # SDFT samples on policy, as its authors
    assert "drop_ties" in read_recipe("default")[1]["_comment"]
    spec = pipeline.evaluate
    assert spec.limit >= 50 and spec.baseline == "sft-continued"
    assert spec.runs == compared_groups and spec.benchmarks == ["reasoning"]


def test_pipeline_flags_override_every_stage(tmp_path):
    pipeline = load_pipeline(
        "default", {"output_dir": str(tmp_path), "name": "small", "num_demos": 16}, {"limit": 8}
    )
    assert {stage.config.data.num_demos for stage in pipeline.stages} == {16}
    assert {stage.config.output_dir for stage in pipeline.stages} == {str(tmp_path / "small")}
    assert pipeline.evaluate.limit == 8


def test_tiny_pipeline_trains_evaluates_reports_and_skips(
    tmp_path, tiny_model, tiny_tokenizer, monkeypatch
):
    model_dir = save_model(tiny_model, tiny_tokenizer, tmp_path / "tiny")
    preset = tmp_path / "tiny.json"
    preset.write_text(
        json.dumps(
            {
                "pipeline": "tiny",
                "base": tiny_pipeline_base(model_dir),
                "stages": [
                    {"name": "sft", "method": "sft"},
                    {"name": "sft-continued", "init_from": "sft", "method": "sft", "rounds": 2},
                    {"name": "spin", "init_from": "sft", "method": "spin", "rounds": 2},
                    {
                        "name": "gsil-logistic",
                        "init_from": "sft",
                        "method": "gsil",
                        "rounds": 2,
                        "share_round0_generations": "spin",
                    },
                ],
                "evaluate": {
                    "runs": ["sft-continued", "spin", "gsil-logistic"],
                    "benchmarks": ["reasoning"],
                    "limit": 2,
                    "max_new_tokens": 4,
                    "batch_size": 4,
                    "baseline": "sft-continued",
                },
            }
        )
    )
    argv = ["--preset", str(preset), "--output-dir", str(tmp_path / "runs")]
    outcome = experiments.run.main(argv)
    root = tmp_path / "runs" / "tiny"
    assert {s["status"] for s in outcome["stages"].values()} == {"ran", "resumed"}
    assert outcome["stages"]["gsil-logistic"]["status"] == "resumed"  # seeded round 0
    gsil_round0 = (root / "gsil-logistic" / "round_0" / "generated.jsonl").read_text()
    assert gsil_round0 == (root / "spin" / "round_0" / "generated.jsonl").read_text()
    for name in ("spin", "gsil-logistic"):
        summary = json.loads((root / name / "summary.json").read_text())
        assert len(summary["rounds"]) == 2
        assert all("ties" in r for r in summary["rounds"])
    text = (root / "report.md").read_text()
    for name in ("sft-continued", "spin", "gsil-logistic"):
        assert f"| {name} (round 1) |" in text
    assert (root / "figures" / "experiments_scores.png").exists()
    assert (root / "figures" / "experiments_training.png").exists()

    # re-run: nothing is trained or evaluated again
    def fail(*args, **kwargs):
        raise AssertionError("redone")

    monkeypatch.setattr(experiments.training, "execute", fail)
    monkeypatch.setattr("gsil.evaluation.runner.evaluate_model", fail)
    again = experiments.run.main(argv)
    assert {s["status"] for s in again["stages"].values()} == {"skipped"}


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_dry_run_prices_the_evaluation_with_the_backend_it_will_use(
    capsys, nothing_loads, monkeypatch, tmp_path, backend
):
    from experiments.planning import CPU_COSTS

    monkeypatch.setattr("experiments.planning.resolve_backend", lambda name: backend)
    plan = _dry_run(capsys, "--preset", "default", "--output-dir", str(tmp_path))
    evaluation = plan["evaluation"]
    assert evaluation["backend"] == backend
    models = sum(len(seeds) for seeds in evaluation["seeds"].values())
    assert models == 18  # six methods x three seeds
    items = evaluation["items_per_run"]["reasoning"]
    if backend == "vllm":
        expected = models * items * CPU_COSTS["eval_reasoning_s_per_item_vllm"]
        expected += CPU_COSTS["vllm_engine_start_s"]
    else:
        expected = models * items * CPU_COSTS["eval_reasoning_s_per_item"]
    assert evaluation["minutes_on_this_cpu"] == round(expected / 60, 1)
