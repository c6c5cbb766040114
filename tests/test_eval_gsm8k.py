"""Tests for gsil.evaluation.gsm8k.

``gsm8k`` (lm-evaluation-harness): our wrapper gives exactly what a direct
``lm_eval.simple_evaluate`` gives on the same model and data (a tiny random Llama, and a
scripted lm-eval ``LM`` whose answers make strict-match and flexible-extract differ).
``gsm8k-chat`` (our chat format): answer extraction, exact match, k-shot prompts, errors.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
from pathlib import Path

import pytest

from experiments.evaluate import main as evaluate_main
from gsil.evaluation.gsm8k import (
    build_messages,
    evaluate_gsm8k,
    evaluate_gsm8k_chat,
    exemplar_solution,
    extract_numeric_answer,
    lm_eval_task_config,
    load_gsm8k,
    numbers_match,
    score_completions,
    select_exemplars,
    summarize,
)
from gsil.evaluation.options import EvalOptions, EvalRequest
from gsil.evaluation.results import compare_results
from gsil.evaluation.runner import evaluate_model

# evaluate_gsm8k's option of each argument these tests give
GSM8K_OPTION = {
    "source": "gsm8k_source",
    "train_source": "gsm8k_train_source",
    "num_fewshot": "gsm8k_shots",
    "seed": "lm_eval_seed",
    "batch_size": "gsm8k_batch_size",
    "max_gen_toks": "max_new_tokens",
}


def run_gsm8k(model, tokenizer=None, *, limit=None, **arguments):
    """``evaluate_gsm8k`` with the options named by ``arguments`` (see GSM8K_OPTION)."""
    options = EvalOptions(**{GSM8K_OPTION[name]: value for name, value in arguments.items()})
    return evaluate_gsm8k(model, tokenizer, EvalRequest(options, limit=limit))


TEST_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
        "many clips in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
        "<<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes "
        "of babysitting. How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she "
        "earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {
        "question": "A shop sold 1,200 pens on Monday and 850 on Tuesday. How many in total?",
        "answer": "1200 + 850 = <<1200+850=2050>>2050\n#### 2,050",
    },
]
TRAIN_ROWS = [
    {
        "question": f"Tom has {n} apples and eats 1. How many are left?",
        "answer": f"{n} - 1 = <<{n}-1={n - 1}>>{n - 1}\n#### {n - 1}",
    }
    for n in range(2, 12)
]


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def test_file(tmp_path):
    return _write(tmp_path / "test.jsonl", TEST_ROWS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the total is 72 clips.\n#### 72", "72"),
        ("He pays $1,234.50 in total.", "1234.5"),
        ("Step: 3 + 4 = 7\nAnswer: 18 apples.", "18"),
        ("**Answer:** $2,050", "2050"),
        ("First 5, then 6, finally 10.", "10"),
        ("#### 72\nThen some rambling about 5 cats.", "72"),
        ("The answer is -3.", "-3"),
        ("No digits here.", None),
    ],
)
def test_extract_numeric_answer(text, expected):
    assert extract_numeric_answer(text) == expected


def test_numbers_match_is_numeric_and_exact():
    assert numbers_match("72.0", "72") and numbers_match("2,050", "2050")
    assert not numbers_match("72.5", "72") and not numbers_match(None, "72")


def test_gold_solutions_score_100_and_wrong_ones_0(test_file):
    items = load_gsm8k(test_file)
    assert [item.answer for item in items] == ["72", "10", "2050"]
    gold = summarize(score_completions(items, [i.solution for i in items], progress=False), {})
    assert gold.score == 1.0 and gold.n == 3
    ours = [exemplar_solution(i.solution) for i in items]  # "Answer: N" format
    assert summarize(score_completions(items, ours, progress=False), {}).score == 1.0
    wrong = ["#### 71", "Answer: 10.5", "The total is 2049 pens."]
    result = summarize(score_completions(items, wrong, progress=False), {})
    assert result.score == 0.0 and result.interval[0] == 0.0


def test_exemplar_solution_uses_our_answer_format():
    text = exemplar_solution(TEST_ROWS[0]["answer"])
    assert "<<" not in text and "####" not in text
    assert text.endswith("\nAnswer: 72")


def test_k_shot_exemplars_are_deterministic_prior_turns(tmp_path):
    train = load_gsm8k(_write(tmp_path / "train.jsonl", TRAIN_ROWS))
    first = select_exemplars(train, 3, seed=0)
    assert first == select_exemplars(train, 3, seed=0)
    assert first != select_exemplars(train, 3, seed=1)
    excluded = select_exemplars(train, 9, seed=0, exclude_questions={train[0].question})
    assert train[0] not in excluded
    messages = build_messages("Q?", first)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
    assert messages[1]["content"].endswith(f"Answer: {first[0].answer}")
    assert messages[-1]["content"].startswith("Q?")


def test_missing_file_and_bad_rows_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl.*'question' and 'answer'"):
        load_gsm8k(str(tmp_path / "missing.jsonl"))
    bad = _write(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1.*####"):
        load_gsm8k(bad)


def test_local_k_shot_needs_a_train_file(test_file, tiny_model_readonly, tiny_tokenizer):
    with pytest.raises(ValueError, match="--gsm8k-train"):
        options = EvalOptions(gsm8k_source=test_file, gsm8k_shots=2)
        evaluate_gsm8k_chat(tiny_model_readonly, tiny_tokenizer, EvalRequest(options))


def test_evaluate_gsm8k_k_shot_on_tiny_model(
    tmp_path, test_file, tiny_model_readonly, tiny_tokenizer
):
    train = _write(tmp_path / "train.jsonl", TRAIN_ROWS)
    options = EvalOptions(
        gsm8k_source=test_file, gsm8k_train_source=train, gsm8k_shots=2, max_new_tokens=4
    )
    request = EvalRequest(options, limit=2, progress=False)
    result, records = evaluate_gsm8k_chat(tiny_model_readonly, tiny_tokenizer, request)
    assert result.benchmark == "gsm8k-chat" and result.n == 2 and len(records) == 2
    assert len(records[0]["prompt"]) == 5  # two exemplar pairs, then the question
    assert records[0]["prompt"][:4] == records[1]["prompt"][:4]  # the same shots for every item
    assert result.settings["shots"] == 2 and len(result.settings["exemplar_ids"]) == 2


# --------------------------------------------------------------------------- gsm8k (lm-eval)

# Six short problems (the tiny model's context is 512 byte tokens, five shots included) and
# six train problems for lm-eval's default 5-shot prompt.
LM_TEST_ROWS = [
    {"question": "Sam has 5 apples and eats 2. How many are left?", "answer": "5-2=3\n#### 3"},
    {"question": "Ann has 6 pens and loses 2. How many are left?", "answer": "6-2=4\n#### 4"},
    {"question": "Bo sees 3 cats and 2 dogs. How many pets?", "answer": "3+2=5\n#### 5"},
    {"question": "Cy reads 2 books a day for 3 days. How many?", "answer": "2*3=6\n#### 6"},
    {"question": "A bike costs $600. What do 2 cost?", "answer": "2*600=1200\n#### 1,200"},
    {"question": "Di has 10 eggs and uses 2. How many are left?", "answer": "10-2=8\n#### 8"},
]
LM_TRAIN_ROWS = [
    {
        "question": f"Eve has {n} figs and eats 1. How many are left?",
        "answer": f"{n}-1={n - 1}\n#### {n - 1}",
    }
    for n in range(2, 8)
]
# Scripted answers: strict-match needs "#### N", flexible-extract takes the last number.
SCRIPTED = {
    LM_TEST_ROWS[0]["question"]: "5 - 2 = 3\n#### 3",  # both right
    LM_TEST_ROWS[1]["question"]: "The answer is 4.",  # flexible only
    LM_TEST_ROWS[2]["question"]: "#### 5, not 7",  # strict only
    LM_TEST_ROWS[3]["question"]: "I do not know.",  # neither
    LM_TEST_ROWS[4]["question"]: "Two cost $1,200.\n#### 1,200",  # both (commas ignored)
    LM_TEST_ROWS[5]["question"]: "Result: 8",  # flexible only
}
STRICT, FLEXIBLE = "exact_match,strict-match", "exact_match,flexible-extract"


@pytest.fixture
def lm_files(tmp_path):
    return _write(tmp_path / "test.jsonl", LM_TEST_ROWS), _write(
        tmp_path / "train.jsonl", LM_TRAIN_ROWS
    )


def _direct_task_manager(tmp_path, test, train):
    """lm-eval's own way to a custom task: a YAML that includes the installed gsm8k.yaml and
    replaces only its dataset (written here, independently of the wrapper's config)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    installed = Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml"
    folder = tmp_path / "direct_task"
    folder.mkdir()
    (folder / "gsm8k_local.yaml").write_text(
        f"include: {installed}\ntask: gsm8k\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {train}\n    test: {test}\n"
    )
    return TaskManager(include_path=folder, include_defaults=False)


def _direct(model, tmp_path, test, train, **kwargs):
    """A plain lm_eval.simple_evaluate call, as a user of lm-eval would write it."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model,
        tasks=["gsm8k"],
        task_manager=_direct_task_manager(tmp_path, test, train),
        log_samples=True,
        **kwargs,
    )


def _by_doc(samples, filter_name):
    return {s["doc_id"]: s for s in samples if s["filter"] == filter_name}


class ScriptedLM:
    """Built lazily (lm_eval's import is slow): an lm-eval ``LM`` answering from a script."""

    @staticmethod
    def make(answers):
        from lm_eval.api.model import LM

        class _Scripted(LM):
            def generate_until(self, requests, disable_tqdm=False):
                replies = []
                for request in requests:
                    context = request.args[0]
                    question = context.rsplit("Question: ", 1)[1].split("\nAnswer:")[0]
                    replies.append(answers.get(question, "no idea"))
                return replies

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Scripted()


def test_task_config_is_lm_evals_own_with_local_data(lm_files):
    import lm_eval.tasks
    import yaml

    test, train = lm_files
    installed = Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml"
    theirs = yaml.safe_load(installed.read_text())
    theirs.pop("tag")
    assert lm_eval_task_config("openai/gsm8k") == theirs  # online: lm-eval's dataset as is
    ours = lm_eval_task_config(test, train)
    dataset_keys = {"dataset_path", "dataset_name", "dataset_kwargs"}
    assert {k: v for k, v in ours.items() if k not in dataset_keys} == {
        k: v for k, v in theirs.items() if k not in dataset_keys
    }
    assert ours["doc_to_text"] == "Question: {{question}}\nAnswer:" and ours["num_fewshot"] == 5
    assert [f["name"] for f in ours["filter_list"]] == ["strict-match", "flexible-extract"]
    assert ours["dataset_path"] == "json" and ours["dataset_name"] is None
    assert ours["dataset_kwargs"] == {
        "data_files": {"test": str(Path(test).resolve()), "train": str(Path(train).resolve())}
    }
    zero_shot = lm_eval_task_config(test)
    assert zero_shot["fewshot_split"] is None and "train" not in str(zero_shot["dataset_kwargs"])


def test_wrapper_equals_direct_lm_eval_on_tiny_model(
    tmp_path, lm_files, tiny_model_readonly, tiny_tokenizer
):
    from lm_eval.models.huggingface import HFLM

    test, train = lm_files
    result, records = run_gsm8k(
        tiny_model_readonly,
        tiny_tokenizer,
        source=test,
        train_source=train,
        limit=4,
        max_gen_toks=6,
        batch_size=2,
    )
    direct = _direct(
        HFLM(pretrained=tiny_model_readonly, tokenizer=tiny_tokenizer, batch_size=2),
        tmp_path,
        test,
        train,
        limit=4,
        gen_kwargs={"max_gen_toks": 6},
    )
    scores = direct["results"]["gsm8k"]
    assert result.benchmark == "gsm8k" and result.metric == STRICT
    assert result.n == 4 == len(records)
    assert result.score == scores[STRICT]
    assert result.breakdown["filters"]["flexible-extract"]["score"] == scores[FLEXIBLE]
    assert result.breakdown["lm_eval_results"][STRICT] == scores[STRICT]
    strict = _by_doc(direct["samples"]["gsm8k"], "strict-match")
    flexible = _by_doc(direct["samples"]["gsm8k"], "flexible-extract")
    assert [r["completion"] for r in records] == [strict[i]["resps"][0][0] for i in range(4)]
    assert [r["prompt"] for r in records] == [strict[i]["arguments"][0][0] for i in range(4)]
    assert [r["flexible-extract"]["extracted"] for r in records] == [
        flexible[i]["filtered_resps"][0] for i in range(4)
    ]
    # lm-eval's own 5-shot prompt, exemplars from the train file, answers of at most 6 tokens
    assert records[0]["prompt"].count("Question: ") == 6
    assert records[0]["prompt"].endswith(f"Question: {LM_TEST_ROWS[0]['question']}\nAnswer:")
    assert "Eve has" in records[0]["prompt"] and "#### " in records[0]["prompt"]
    assert all(len(r["completion"]) <= 6 for r in records)  # byte tokens: <= 1 character each
    assert [r["id"] for r in records] == [f"test.jsonl:{i}" for i in range(1, 5)]
    settings = result.settings
    assert settings["task"] == "gsm8k" and settings["num_fewshot"] == 5
    assert settings["lm_eval_version"] == importlib.metadata.version("lm-eval")
    assert settings["versions"]["lm-eval"] == settings["lm_eval_version"]
    assert settings["filters"] == ["strict-match", "flexible-extract"]
    assert settings["data_files"]["train"].endswith("train.jsonl")
    assert settings["decoding"]["max_new_tokens"] == 6 and settings["batch_size"] == 2
    assert settings["seeds"] == {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}


def test_wrapper_reports_lm_evals_numbers_when_the_filters_disagree(tmp_path, lm_files):
    test, train = lm_files
    result, records = run_gsm8k(ScriptedLM.make(SCRIPTED), source=test, train_source=train, seed=3)
    direct = _direct(
        ScriptedLM.make(SCRIPTED),
        tmp_path,
        test,
        train,
        random_seed=3,
        numpy_random_seed=3,
        torch_random_seed=3,
        fewshot_random_seed=3,
    )
    scores = direct["results"]["gsm8k"]
    assert (scores[STRICT], scores[FLEXIBLE]) == (pytest.approx(3 / 6), pytest.approx(4 / 6))
    filters = result.breakdown["filters"]
    assert result.score == scores[STRICT] == filters["strict-match"]["score"]
    assert filters["flexible-extract"]["score"] == scores[FLEXIBLE]
    assert filters["strict-match"]["correct"] == 3 and filters["flexible-extract"]["correct"] == 4
    for name, key in (("strict-match", STRICT), ("flexible-extract", FLEXIBLE)):
        stderr = scores[key.replace("exact_match", "exact_match_stderr")]
        assert filters[name]["stderr"] == pytest.approx(stderr)
        low, high = filters[name]["interval"]
        assert low < filters[name]["score"] < high
    assert result.interval == filters["strict-match"]["interval"]
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert [r["strict-match"]["extracted"] for r in records] == [
        "3",
        "[invalid]",
        "5,",
        "[invalid]",
        "1,200",
        "[invalid]",
    ]
    assert [r["flexible-extract"]["exact_match"] for r in records] == [1, 1, 0, 0, 1, 1]
    assert [r["gold"] for r in records] == ["3", "4", "5", "6", "1200", "8"]
    assert result.breakdown["no_strict_match"] == 3
    # the same few-shot prompts as lm-eval with the same seeds, others with lm-eval's defaults
    strict = _by_doc(direct["samples"]["gsm8k"], "strict-match")
    assert [r["prompt"] for r in records] == [strict[i]["arguments"][0][0] for i in range(6)]
    assert result.settings["seeds"] == dict.fromkeys(("random", "numpy", "torch", "fewshot"), 3)
    _, default_records = run_gsm8k(ScriptedLM.make(SCRIPTED), source=test, train_source=train)
    assert [r["prompt"] for r in default_records] != [r["prompt"] for r in records]


def test_zero_shot_and_limit_pass_through(lm_files):
    test, _ = lm_files
    result, records = run_gsm8k(ScriptedLM.make(SCRIPTED), source=test, num_fewshot=0, limit=2)
    assert result.n == 2 and result.settings["num_fewshot"] == 0
    assert records[1]["prompt"] == f"Question: {LM_TEST_ROWS[1]['question']}\nAnswer:"
    assert result.score == 0.5 and result.breakdown["filters"]["flexible-extract"]["score"] == 1.0


def test_lm_eval_data_errors_are_named(tmp_path, lm_files):
    test, train = lm_files
    lm = ScriptedLM.make(SCRIPTED)
    with pytest.raises(FileNotFoundError, match=r"gone\.jsonl: no such GSM8K file"):
        run_gsm8k(lm, source=str(tmp_path / "gone.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(LM_TEST_ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: invalid JSON"):
        run_gsm8k(lm, source=test, train_source=str(bad))
    with pytest.raises(ValueError, match=r"5-shot.*--gsm8k-train"):
        run_gsm8k(lm, source=test)  # lm-eval's default 5 shots need a train file
    with pytest.raises(ValueError, match="local train file"):
        run_gsm8k(lm, source=test, train_source="openai/gsm8k")
    with pytest.raises(ValueError, match="local test file only"):
        run_gsm8k(lm, source="openai/gsm8k", train_source=train)
    with pytest.raises(ValueError, match="tokenizer"):
        run_gsm8k(object(), source=test, num_fewshot=0)


def test_model_tokenizer_and_global_rng_are_left_as_they_were(lm_files, tiny_model, tiny_tokenizer):
    import random

    import numpy as np
    import torch

    test, train = lm_files
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None  # HFLM gives it one: on a copy, not on ours
    tiny_model.train()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    result, _ = run_gsm8k(
        tiny_model, tokenizer, source=test, train_source=train, limit=2, max_gen_toks=2
    )
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert tokenizer.pad_token is None and tiny_model.training
    assert result.n == 2


def test_evaluate_model_runs_gsm8k_and_gsm8k_chat(
    lm_files, tiny_model_readonly, tiny_tokenizer, tmp_path
):
    test, train = lm_files
    options = EvalOptions(gsm8k_source=test, gsm8k_train_source=train, max_new_tokens=3)
    results = evaluate_model(
        (tiny_model_readonly, tiny_tokenizer),
        "gsm8k,gsm8k-chat",
        tmp_path / "eval",
        EvalRequest(options, limit=2, progress=False),
    )
    assert results["gsm8k"].settings["num_fewshot"] == 5  # lm-eval's default
    # lm-eval's own seeds, not the data seed (0): its few-shot draw is a plain lm-eval run's
    import inspect

    import lm_eval

    defaults = inspect.signature(lm_eval.simple_evaluate).parameters
    assert results["gsm8k"].settings["seeds"]["fewshot"] == (
        defaults["fewshot_random_seed"].default
    )
    assert results["gsm8k"].settings["lm_eval_version"] == importlib.metadata.version("lm-eval")
    assert results["gsm8k-chat"].settings["shots"] == 0  # ours, as before
    assert results["gsm8k"].settings["decoding"]["max_new_tokens"] == 3
    saved = json.loads((tmp_path / "eval" / "gsm8k.json").read_text())
    assert saved["metric"] == STRICT and saved["records_path"] == "gsm8k.records.jsonl"
    assert set(saved["breakdown"]["filters"]) == {"strict-match", "flexible-extract"}
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {"gsm8k", "gsm8k-chat"} <= set(summary)
    # the two benchmarks' records name the same problems, so they pair item by item
    comparison = compare_results(
        tmp_path / "eval" / "gsm8k.json", tmp_path / "eval" / "gsm8k-chat.json"
    )
    assert comparison["n"] == 2


def test_cli_runs_gsm8k_through_lm_eval(
    lm_files, tiny_model_readonly, tiny_tokenizer, tmp_path, capsys
):
    test, train = lm_files
    model_dir = tmp_path / "model"
    tiny_model_readonly.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    argv = [
        "--model",
        str(model_dir),
        "--benchmarks",
        "gsm8k",
        "--gsm8k",
        test,
        "--gsm8k-train",
        train,
        "--shots",
        "2",
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
        "--gsm8k-batch-size",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert evaluate_main(argv) == 0
    saved = json.loads((out / "gsm8k.json").read_text())
    assert saved["n"] == 2 and saved["settings"]["num_fewshot"] == 2
    assert saved["settings"]["batch_size"] == 2
    assert "gsm8k: exact_match,strict-match" in capsys.readouterr().out
    assert evaluate_main([*argv, "--lm-eval-seed", "7"]) == 0
    assert json.loads((out / "gsm8k.json").read_text())["settings"]["seeds"]["fewshot"] == 7
    argv = ["--model", str(model_dir), "--benchmarks", "gsm8k", "--gsm8k", test, "--out", str(out)]
    assert evaluate_main(argv) == 2
    assert "--gsm8k-train" in capsys.readouterr().err


def test_gsm8k_needs_the_model_in_memory_not_a_vllm_engine():
    from gsil.evaluation.runner import _RUNNERS

    engine = type("VLLMEngine", (), {})()  # what evaluate_model passes with a vLLM backend
    with pytest.raises(ValueError, match="--backend hf"):
        _RUNNERS["gsm8k"](engine, None, EvalRequest(), None)
