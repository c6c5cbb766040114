"""Pipeline stages repeated over seeds: the expansion of a recipe into one run per seed, the
dry-run plan's power per comparison, and a tiny two-seed pipeline that trains, evaluates and
reports per-seed rows, the interval across seeds and the pooled paired test."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from tiny import tiny_pipeline_base

import experiments.run
from experiments.config import ConfigError, load_pipeline
from experiments.planning import plan_pipeline, plan_power
from gsil.evaluation.results import BenchmarkResult, minimal_detectable_difference, write_result
from gsil.layout import RunLayout
from gsil.models import save_model

BASE = {"model": "m", "data": "rg:chain_sum", "num_demos": 4, "seed": 5}


def write_recipe(tmp_path: Path, **spec) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"pipeline": "p", "base": BASE, **spec}))
    return str(path)


def model_of(root: Path, run: str) -> str:
    return str(RunLayout(root / run).model(0))


def test_top_level_seeds_repeat_every_stage_with_seed_matched_links(tmp_path):
    recipe = write_recipe(
        tmp_path,
        seeds=[0, 1],
        stages=[
            {"name": "sft", "method": "sft"},
            {"name": "spin", "init_from": "sft", "method": "spin"},
            {
                "name": "gsil",
                "init_from": "sft",
                "method": "gsil",
                "share_round0_generations": "spin",
            },
        ],
        evaluate={"benchmarks": ["reasoning"], "baseline": "sft"},
    )
    pipeline = load_pipeline(recipe, {"output_dir": str(tmp_path / "runs")})
    root = tmp_path / "runs" / "p"
    names = [s.name for s in pipeline.stages]
    assert names == [
        "sft-seed0",
        "sft-seed1",
        "spin-seed0",
        "spin-seed1",
        "gsil-seed0",
        "gsil-seed1",
    ]
    for stage in pipeline.stages:
        seed = int(stage.name[-1])
        assert stage.repeated and stage.config.seed == seed  # the recipe's seed 5 is replaced
        assert stage.group == stage.name.rsplit("-seed", 1)[0]
        assert stage.config.name == stage.name and stage.config.run_dir() == root / stage.name
        if stage.group == "sft":
            assert stage.init_from is None and stage.config.model.name_or_path == "m"
        else:  # the same seed's SFT model
            assert stage.init_from == f"sft-seed{seed}"
            assert stage.config.model.name_or_path == model_of(root, f"sft-seed{seed}")
        expected_share = f"spin-seed{seed}" if stage.group == "gsil" else None
        assert stage.share_round0_generations == expected_share
    assert [s.name for s in pipeline.runs_of("spin")] == ["spin-seed0", "spin-seed1"]
    assert pipeline.runs_of("spin-seed1") == [pipeline.stage("spin-seed1")]
    # evaluate names the stages; every seed's run is evaluated
    assert pipeline.evaluate.runs == ["sft", "spin", "gsil"]
    # the configuration of a seed's run differs from another seed's in the seed alone
    one, two = (pipeline.stage(f"spin-seed{s}").config.to_dict() for s in (0, 1))
    differing = {k for k in one if one[k] != two[k]}
    assert differing == {"seed", "name", "model"}


def test_per_stage_seeds_share_an_unrepeated_parent(tmp_path):
    recipe = write_recipe(
        tmp_path,
        stages=[
            {"name": "sft", "method": "sft", "seed": 1},
            {"name": "spin", "init_from": "sft", "method": "spin", "seeds": [0, 1, 2]},
            {
                "name": "gsil",
                "init_from": "sft",
                "method": "gsil",
                "seeds": [1, 2],
                "share_round0_generations": "spin",
            },
            {
                "name": "dpo-like",
                "init_from": "sft",
                "method": "gsil",
                "share_round0_generations": "sft",
            },
        ],
    )
    pipeline = load_pipeline(recipe, {"output_dir": str(tmp_path)})
    root = tmp_path / "p"
    sft = pipeline.stage("sft")
    assert not sft.repeated and sft.config.seed == 1 and pipeline.runs_of("sft") == [sft]
    for s in (0, 1, 2):
        spin = pipeline.stage(f"spin-seed{s}")
        assert spin.init_from == "sft" and spin.config.model.name_or_path == model_of(root, "sft")
    assert [pipeline.stage(f"gsil-seed{s}").share_round0_generations for s in (1, 2)] == [
        "spin-seed1",
        "spin-seed2",
    ]
    # an unrepeated stage keeps the base seed (5): sft (seed 1) generated other prompts
    unrepeated = pipeline.stage("dpo-like")
    assert unrepeated.config.seed == 5 and unrepeated.share_round0_generations is None


@pytest.mark.parametrize(
    ("spec", "overrides", "message"),
    [
        (
            {
                "seeds": [0, 1],
                "stages": [{"name": "a"}, {"name": "b", "init_from": "a", "seeds": None}],
            },
            {},
            "'a' is repeated over seeds; repeat this stage too",
        ),
        (
            {
                "stages": [
                    {"name": "a", "seeds": [0, 1]},
                    {"name": "b", "init_from": "a", "seeds": [1, 2]},
                ]
            },
            {},
            "'a' has no run of seed 2",
        ),
        ({"seeds": [0, 0], "stages": [{"name": "a"}]}, {}, "distinct integers"),
        ({"seeds": [], "stages": [{"name": "a"}]}, {}, "distinct integers"),
        ({"seeds": [-1], "stages": [{"name": "a"}]}, {}, "distinct integers"),
        ({"seeds": "zero", "stages": [{"name": "a"}]}, {}, "'seeds' must be an integer"),
        ({"seeds": [0], "stages": [{"name": "a"}]}, {"seed": 3}, "--seed 3 conflicts"),
        ({"stages": [{"name": "a"}, {"name": "a"}]}, {}, "comes earlier"),
        (
            {"stages": [{"name": "a"}], "power": {"baseline_acc": 0.3}},
            {},
            "unknown key 'power.baseline_acc'",
        ),
        ({"stages": [{"name": "a"}], "power": {"discordance": 1.5}}, {}, "in \\[0, 1\\]"),
    ],
)
def test_bad_seeds_are_named_with_the_fix(tmp_path, spec, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write_recipe(tmp_path, **spec), overrides)


def write_eval(stage, scores: list[int]) -> None:
    """A reasoning result of ``scores`` where the pipeline writes a run's evaluation."""
    out = RunLayout(stage.config.run_dir()).eval_dir(stage.config.rounds - 1)
    records = [
        {"id": f"i{i}", "prompt": "p", "completion": "c", "score": float(score)}
        for i, score in enumerate(scores)
    ]
    result = BenchmarkResult(
        "reasoning", "accuracy", sum(scores) / len(scores), len(scores), [0.0, 1.0], "wilson"
    )
    write_result(result, records, out)


def test_the_plan_gives_the_mde_per_comparison_before_and_after_results(tmp_path):
    recipe = write_recipe(
        tmp_path,
        seeds=[0, 1, 2],
        stages=[
            {"name": "sft", "method": "sft"},
            {"name": "spin", "init_from": "sft", "method": "spin"},
        ],
        evaluate={"benchmarks": ["reasoning", "mtbench"], "limit": 50, "baseline": "sft"},
        power={"baseline_accuracy": {"reasoning": 0.2}},
    )
    pipeline = load_pipeline(recipe, {"output_dir": str(tmp_path)})
    plan = plan_pipeline(pipeline)
    assert [(s["stage"], s["seed"]) for s in plan["stages"][:3]] == [
        ("sft", 0),
        ("sft", 1),
        ("sft", 2),
    ]
    evaluation = plan["evaluation"]
    assert evaluation["seeds"] == {"sft": [0, 1, 2], "spin": [0, 1, 2]}
    (power,) = evaluation["power"]  # spin vs sft on reasoning (mtbench is not counted here)
    assert power["comparison"] == "spin vs sft" and power["seeds"] == 3
    assert (power["n_one_seed"], power["n_pooled"]) == (50, 150)
    assert power["baseline_accuracy"] == 0.2 and power["baseline_accuracy_source"] == "stated"
    assert power["discordance"] == pytest.approx(2 * 0.2 * 0.8)  # independent errors
    assert "independent errors" in power["premise"]
    assert power["mde_points_pooled"] == pytest.approx(
        100 * minimal_detectable_difference(150, 0.32), abs=0.01
    )
    assert power["mde_points_one_seed"] > power["mde_points_pooled"]

    # results exist: the baseline's accuracy and the discordance are the observed ones
    for s in range(3):
        write_eval(pipeline.stage(f"sft-seed{s}"), [1] * 10 + [0] * 40)
        # spin misses items 0-4 of the baseline's and gets 5 + s others: 10 + s disagree
        write_eval(pipeline.stage(f"spin-seed{s}"), [0] * 5 + [1] * (10 + s) + [0] * (35 - s))
    (power,) = plan_power(pipeline, {"reasoning": 50})
    assert power["baseline_accuracy"] == 0.2 and power["baseline_accuracy_source"] == "observed"
    assert power["discordance"] == pytest.approx(33 / 150) and power["premise"] == "observed"
    assert power["mde_points_pooled"] == pytest.approx(
        100 * minimal_detectable_difference(150, 33 / 150), abs=0.01
    )
    # too few items for any difference: said so, not a number
    (small,) = plan_power(pipeline, {"reasoning": 3})
    assert small["mde_points_one_seed"] == "none: too few items"


def test_tiny_pipeline_over_two_seeds_trains_evaluates_and_reports(
    tmp_path, tiny_model, tiny_tokenizer
):
    model_dir = save_model(tiny_model, tiny_tokenizer, tmp_path / "tiny")
    preset = tmp_path / "tiny.json"
    preset.write_text(
        json.dumps(
            {
                "pipeline": "tiny",
                "seeds": [0, 1],
                "base": tiny_pipeline_base(model_dir),
                "stages": [
                    {"name": "sft", "method": "sft"},
                    {"name": "sft-continued", "init_from": "sft", "method": "sft"},
                    {"name": "spin", "init_from": "sft", "method": "spin"},
                    {
                        "name": "gsil",
                        "init_from": "sft",
                        "method": "gsil",
                        "share_round0_generations": "spin",
                    },
                ],
                "evaluate": {
                    "runs": ["sft-continued", "spin"],
                    "benchmarks": ["reasoning"],
                    "limit": 2,
                    "max_new_tokens": 4,
                    "batch_size": 4,
                    "baseline": "sft-continued",
                },
            }
        )
    )
    outcome = experiments.run.main(["--preset", str(preset), "--output-dir", str(tmp_path / "r")])
    root = tmp_path / "r" / "tiny"
    runs = [
        f"{stage}-seed{s}" for stage in ("sft", "sft-continued", "spin", "gsil") for s in (0, 1)
    ]
    assert sorted(outcome["stages"]) == sorted(runs)
    for s in (0, 1):  # each seed's GSIL run starts from the same seed's SPIN round-0 set
        assert outcome["stages"][f"gsil-seed{s}"]["status"] == "resumed"
        shared = RunLayout(root / f"gsil-seed{s}").generated(0).read_text()
        assert shared == RunLayout(root / f"spin-seed{s}").generated(0).read_text()
    for name in runs:  # each run saved its own seed, and started from its seed's SFT model
        saved = json.loads((root / name / "config.json").read_text())
        assert saved["seed"] == int(name[-1]) and saved["name"] == name
        if not name.startswith("sft-seed"):
            assert saved["model"]["name_or_path"] == model_of(root, f"sft-seed{name[-1]}")
    # the seed draws another demonstration sample: the two seeds' SPIN sets differ in prompts
    prompts = [
        {
            json.loads(line)["prompt"]
            if isinstance(json.loads(line)["prompt"], str)
            else json.dumps(json.loads(line)["prompt"])
            for line in RunLayout(root / f"spin-seed{s}").generated(0).read_text().splitlines()
        }
        for s in (0, 1)
    ]
    assert prompts[0] and prompts[0] != prompts[1]
    for name in runs[2:6]:  # every seed of every evaluated stage was evaluated
        assert (RunLayout(root / name).eval_dir(0) / "reasoning.json").exists()
    assert not RunLayout(root / "sft-seed0").eval_dir(0).exists()

    text = (root / "report.md").read_text()
    for s in (0, 1):
        assert f"| spin-seed{s} (round 0) | spin |" in text
        assert f"| sft-continued-seed{s} (round 0) | sft |" in text
    assert "## Methods against sft-continued" in text
    table = next(line for line in text.splitlines() if line.startswith("| spin | reasoning |"))
    assert "| 0, 1 (2) |" in table and "n/a (one seed)" not in table and "(n=4)" in table
    assert "- spin vs sft-continued on reasoning (2 seeds, pooled n=4)" in text
    (method,) = csv.DictReader((root / "report_methods.csv").open())
    assert method["seeds"] == "0 1" and int(method["pooled_n"]) == 4
    assert method["across_low"] != "" and method["across_high"] != ""
    assert method["mcnemar_p"] != ""
    assert (root / "figures" / "experiments_scores.png").exists()


def test_the_plan_counts_the_items_the_evaluator_runs_without_a_limit(tmp_path):
    from gsil.evaluation.reasoning import DEFAULT_ITEMS_PER_TASK

    recipe = write_recipe(
        tmp_path,
        seeds=[0],
        stages=[{"name": "sft", "method": "sft"}],
        evaluate={"benchmarks": ["reasoning"]},
    )
    evaluation = plan_pipeline(load_pipeline(recipe, {"output_dir": str(tmp_path)}))["evaluation"]
    tasks = evaluation["reasoning_tasks"]
    assert evaluation["items_per_run"]["reasoning"] == DEFAULT_ITEMS_PER_TASK * len(tasks)
