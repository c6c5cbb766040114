"""Every module of benchmarks/ runs end to end on the tiny model, one step or one prompt each,
so that a change of an internal type (an ``Example`` field, a function's signature) cannot
break a benchmark unnoticed. Timings and memory are not checked, only that each runs and
reports what it measures."""

from __future__ import annotations

import importlib.util
import json
import pkgutil
from pathlib import Path

import pytest
from tiny import build_tiny_model, build_tiny_tokenizer

import benchmarks

ROOT = Path(__file__).resolve().parent.parent
SMOKED = {  # module -> the test that runs it
    "compare_trl": "test_compare_trl",
    "generation": "test_generation",
    "hf_generation": "test_hf_generation",
    "logprobs_memory": "test_logprobs_memory",
    "multiprocess_round": "test_multiprocess_round",
    "train_step": "test_train_step",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from gsil.models import save_model

    tokenizer = build_tiny_tokenizer()
    return save_model(
        build_tiny_model(tokenizer), tokenizer, tmp_path_factory.mktemp("bench") / "model"
    )


def test_every_benchmark_module_has_a_smoke_test():
    modules = {
        m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_")
    }
    assert modules == set(SMOKED), "add a smoke test here for each new benchmark module"
    assert all(name in globals() for name in SMOKED.values())


def test_logprobs_memory():
    from benchmarks.logprobs_memory import measure

    for backward in (False, True):
        rows = [
            measure(method, batch=2, length=8, backward=backward, vocab=64, hidden=16)
            for method in ("naive", "chunked", "naive-projected", "from-hidden")
        ]
        assert all(row["peak_extra_mib"] >= 0 and row["seconds"] >= 0 for row in rows)
        # the same inputs: each lean method agrees with its naive counterpart
        for ours, naive in ((rows[1], rows[0]), (rows[3], rows[2])):
            assert ours["logps"] == pytest.approx(naive["logps"], abs=1e-3)


def test_train_step(tiny_dir):
    from benchmarks.train_step import Workload, main

    work = json.dumps({**Workload().__dict__, "model": str(tiny_dir), "length": 24, "prompt": 8})
    child = ["--workload", work, "--child"]
    (timing,) = main([*child, "time", "1", "fp32"])
    assert timing["tokens_per_step"] == 8 * 24 and timing["gsil_step_s"] > 0
    for kind in ("naive-sft", "sft", "gsil"):
        (memory,) = main([*child, "memory", kind, "fp32", "1" if kind == "gsil" else "0"])
        assert memory["kind"] == kind and memory["process_peak_gib"] > 0
    (generation,) = main([*child, "generate", "2", "4"])
    assert generation["batched"]["new_tokens"] > 0


def test_compare_trl(tiny_dir, tmp_path):
    """One GSIL, one SFT and one TRL row through their subprocesses, the other variants in this
    process; TRL's rows only where TRL is installed."""
    from accelerate.state import AcceleratorState

    from benchmarks.compare_trl import ROWS, Bench, child, main, make_token_ids

    has_trl = importlib.util.find_spec("trl") is not None
    out = tmp_path / "compare.json"
    args = ["--model", str(tiny_dir), "--rows", "4", "--length", "16", "--prompt", "4"]
    args += ["--warmup", "1", "--steps", "1", "--out", str(out), "--only", "sft,gsil,trl"]
    report = main(args)
    assert [row["row"] for row in report["rows"]] == ["sft", "gsil", "trl"][: 3 if has_trl else 2]
    assert json.loads(out.read_text())["table"] == report["table"]
    assert len(report["table"]) == 2 + len(report["rows"])
    bench = Bench(str(tiny_dir), rows=4, length=16, prompt=4, warmup=1, steps=1)
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(make_token_ids(bench, vocab=259)))
    rows = {row["row"]: row for row in report["rows"]}
    for name in ROWS:
        if name in rows or (name.startswith("trl") and not has_trl):
            continue
        AcceleratorState._reset_state(reset_partial_state=True)
        rows[name] = child(name, bench, ids_file)
    assert all(row["step_s"] > 0 and row["step_peak_mib"] > 0 for row in rows.values())
    # the same batch, the same steps: every GSIL variant ends at the same loss
    for name in ("gsil-plain", "gsil-ckpt", "gsil-ckpt2"):
        assert rows[name]["loss"] == pytest.approx(rows["gsil"]["loss"], rel=1e-4)


def test_generation(tiny_dir):
    from benchmarks.generation import main

    rows = main(["--model", str(tiny_dir), "--limit", "1", "--precisions", "fp32"])
    assert {row["workload"] for row in rows if row["backend"] == "HF generate"} >= {"round"}


def test_hf_generation(tiny_dir, capsys):
    from benchmarks.hf_generation import main

    main(
        [
            *("--model", str(tiny_dir), "--prompts", "2", "--batch-size", "2"),
            *("--max-new-tokens", "3", "--no-compile"),
        ]
    )
    assert "static cache" in capsys.readouterr().out


def test_multiprocess_round(tiny_dir, tmp_path):
    from benchmarks.multiprocess_round import main

    rows = main(
        [
            *("--model", str(tiny_dir), "--num-demos", "2", "--max-new-tokens", "2"),
            *("--gen-batch-size", "2", "--global-batch", "2", "--out", str(tmp_path / "runs")),
        ]
    )
    assert rows["training_seconds"]["one"] > 0 and rows["training_seconds"]["two"] > 0
