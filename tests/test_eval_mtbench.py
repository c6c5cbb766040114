"""Tests for gsil.evaluation.mtbench: turn-by-turn answers, fake judges, rating parsing."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

import gsil.evaluation.mtbench as mtbench
from gsil.evaluation.mtbench import (
    OpenAICompatibleJudge,
    evaluate_mtbench,
    judge_from_env,
    load_questions,
    parse_rating,
)
from gsil.evaluation.results import Decoding

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
DECODING = Decoding(max_new_tokens=6)


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in QUESTIONS))
    return str(path)


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("Clear and correct. Rating: [[8]]", 8.0),
        ("[[ 7.5 ]]", 7.5),
        ("Decent. [[6/10]]", 6.0),
        ("It mentions [[2]] steps but overall [[9]]", 9.0),  # the last one is the verdict
        ("Rating: 4", 4.0),
        ("I would give it 3/10.", 3.0),
        ("[[11]]", None),  # out of range
        ("[[0]]", None),
        ("Great answer, well done!", None),  # malformed: no rating at all
        ("", None),
        (None, None),
    ],
)
def test_parse_rating(reply, rating):
    assert parse_rating(reply) == rating


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


def test_flow_with_fake_judge(monkeypatch, question_file, tiny_model_readonly, tiny_tokenizer):
    generation_calls = []
    real_generate = mtbench.generate

    def spy_generate(model, tokenizer, prompts, **kwargs):
        outputs = real_generate(model, tokenizer, prompts, **kwargs)
        generation_calls.append((prompts, [out.text for out in outputs]))
        return outputs

    monkeypatch.setattr(mtbench, "generate", spy_generate)
    judged = []
    replies = iter(["Good. [[7]]", "Fine. Rating: 5", "Nice [[9]]", "no idea what to say"])

    def fake_judge(messages):
        judged.append(messages)
        return next(replies)

    fake_judge.name = "fake-judge-v1"
    result, records = evaluate_mtbench(
        tiny_model_readonly, tiny_tokenizer, source=question_file, decoding=DECODING,
        judge=fake_judge, progress=False,
    )  # fmt: skip

    # Turn 2 is generated with question 1, the model's own answer 1, then question 2.
    (first_prompts, first_answers), (second_prompts, _) = generation_calls
    for question, answer, history in zip(QUESTIONS, first_answers, second_prompts, strict=True):
        assert [m["role"] for m in history] == ["user", "assistant", "user"]
        assert history[0]["content"] == question["turns"][0]
        assert history[1]["content"] == answer
        assert history[2]["content"] == question["turns"][1]
    # The judge sees the first answer when grading the second, and the reference when given.
    assert first_answers[0] in judged[1][-1]["content"]
    assert "[Reference answer]\n6" in judged[3][-1]["content"]
    assert "[Reference answer]" not in judged[0][-1]["content"]

    assert [r["score"] for r in records] == [7.0, 5.0, 9.0, None]  # malformed reply: unscored
    assert all(r["judge"] == "fake-judge-v1" for r in records)
    assert result.settings["judge"] == "fake-judge-v1" and "fake-judge-v1" in result.metric
    assert "fake-judge-v1" in result.summary()
    assert result.score == pytest.approx(7.0) and result.n == 3
    assert result.breakdown["unparsed"] == 1
    assert result.breakdown["turns"]["turn1"]["mean"] == pytest.approx(8.0)
    assert result.interval[0] < 7.0 < result.interval[1]


def test_without_judge_answers_are_kept_and_nothing_is_scored(
    question_file, tiny_model_readonly, tiny_tokenizer
):
    result, records = evaluate_mtbench(
        tiny_model_readonly, tiny_tokenizer, source=question_file, decoding=DECODING, progress=False
    )
    assert result.score is None and result.interval is None and result.n == 4
    assert "needs a judge" in result.note and "GSIL_JUDGE_BASE_URL" in result.note
    assert all(r["score"] is None and isinstance(r["completion"], str) for r in records)


def test_judge_failures_are_recorded_and_total_failure_raises(
    question_file, tiny_model_readonly, tiny_tokenizer
):
    calls = iter([RuntimeError("timeout"), "[[6]]", "[[6]]", "[[6]]"])

    def flaky(messages):
        reply = next(calls)
        if isinstance(reply, Exception):
            raise reply
        return reply

    result, records = evaluate_mtbench(
        tiny_model_readonly, tiny_tokenizer, source=question_file, decoding=DECODING,
        judge=flaky, progress=False,
    )  # fmt: skip
    assert records[0]["judge_error"] == "timeout" and result.breakdown["judge_errors"] == 1
    assert result.n == 3 and result.interval == [6.0, 6.0]

    def broken(messages):
        raise RuntimeError("connection refused")

    with pytest.raises(RuntimeError, match="every call to judge"):
        evaluate_mtbench(tiny_model_readonly, tiny_tokenizer, source=question_file,
                         decoding=DECODING, judge=broken, progress=False)  # fmt: skip


class _FakeEndpoint(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers.get("Authorization"), body))
        if body["model"] == "forbidden":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error": "bad key"}')
            return
        reply = {"choices": [{"message": {"role": "assistant", "content": "Solid. [[8]]"}}]}
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
    server = HTTPServer(("127.0.0.1", 0), _FakeEndpoint)
    _FakeEndpoint.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_openai_compatible_judge_over_http(endpoint):
    env = {
        "GSIL_JUDGE_BASE_URL": endpoint,
        "GSIL_JUDGE_MODEL": "judge-7b",
        "GSIL_JUDGE_API_KEY": "k1",
    }
    judge = judge_from_env(env)
    assert judge is not None and "judge-7b" in judge.name
    assert judge([{"role": "user", "content": "grade this"}]) == "Solid. [[8]]"
    path, auth, body = _FakeEndpoint.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer k1"
    assert body["model"] == "judge-7b" and body["temperature"] == 0.0
    with pytest.raises(RuntimeError, match="HTTP 401"):
        OpenAICompatibleJudge(endpoint, "forbidden")([{"role": "user", "content": "x"}])


def test_judge_from_env_needs_both_url_and_model():
    assert judge_from_env({}) is None
    with pytest.raises(ValueError, match="GSIL_JUDGE_MODEL"):
        judge_from_env({"GSIL_JUDGE_BASE_URL": "http://127.0.0.1:1"})


def test_endpoint_judge_end_to_end(endpoint, question_file, tiny_model_readonly, tiny_tokenizer):
    judge = OpenAICompatibleJudge(endpoint, "judge-7b")
    result, records = evaluate_mtbench(tiny_model_readonly, tiny_tokenizer, source=question_file,
                                       decoding=DECODING, judge=judge, progress=False)  # fmt: skip
    assert result.score == 8.0 and result.n == 4
    assert result.settings["judge"] == judge.name == records[0]["judge"]
