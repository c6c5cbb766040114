"""Damaged artefacts are refused, naming the file; intact and pre-manifest ones load (seconds).

One interrupted 2-round run (round 0 finished, round 1 stopped after a checkpoint) is made once;
each test resumes a copy of it with one artefact truncated or changed in one byte.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
from tiny import Interrupt, interrupting, tiny_demos

from gsil.estimators import get_estimator
from gsil.generation import GenerationSettings
from gsil.integrity import CorruptFileError, verify_manifest, write_manifest
from gsil.layout import RunLayout, manifest_path
from gsil.methods import get_method
from gsil.models import ModelLoadError, load_model
from gsil.trainer import OptimSettings, RoundsSettings, run_rounds

GENERATION = GenerationSettings(max_new_tokens=6, do_sample=False, batch_size=4)
OPTIM = OptimSettings(learning_rate=1e-2, epochs=2, batch_size=2, grad_accum=2, checkpoint_every=1)
OBJECTIVE = get_method("gsil", get_estimator("logistic"), beta=0.5)


def run(model, tokenizer, objective, run_dir: Path, resume: bool = False) -> dict:
    return run_rounds(
        model,
        tokenizer,
        tiny_demos(8),
        objective,
        RoundsSettings(
            run_dir=run_dir,
            rounds=2,
            optim=OPTIM,
            generation=GENERATION,
            max_prompt_length=64,
            max_length=96,
            seed=2,
            resume=resume,
        ),
    )


@pytest.fixture(scope="module")
def interrupted(tiny_model_readonly, tiny_tokenizer, tmp_path_factory) -> Path:
    """A run interrupted in round 1's second step (round 0 done, a round-1 checkpoint)."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(Interrupt):
        # round 0: 8 objective calls; round 1's step 1: calls 9 and 10, then its checkpoint
        run(
            copy.deepcopy(tiny_model_readonly), tiny_tokenizer, interrupting(OBJECTIVE, 10), run_dir
        )
    layout = RunLayout(run_dir)
    assert json.loads((layout.checkpoint / "trainer_state.json").read_text())["round"] == 1
    assert not layout.round_summary(1).exists()
    return run_dir


@pytest.fixture
def damaged(interrupted, tmp_path) -> Path:
    """A fresh copy of the interrupted run, to damage."""
    return Path(shutil.copytree(interrupted, tmp_path / "run"))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# what a resume reads, in the order it reads it: the checkpoint, round 0's model (round 1
# starts from it), round 1's generated set, round 1's reference log-probs
ARTEFACTS = {
    "checkpoint model": lambda layout: layout.checkpoint / "model.safetensors",
    "checkpoint optimizer": lambda layout: layout.checkpoint / "optimizer.bin",
    "checkpoint state": lambda layout: layout.checkpoint / "trainer_state.json",
    "round model": lambda layout: layout.model(0) / "model.safetensors",
    "round tokenizer": lambda layout: layout.model(0) / "tokenizer.json",
    "generated set": lambda layout: layout.generated(1),
    "reference log-probs": lambda layout: layout.reference_logps(1),
}


@pytest.mark.parametrize("damage", [truncate, flip], ids=["truncated", "one-byte"])
@pytest.mark.parametrize("artefact", list(ARTEFACTS))
def test_a_damaged_artefact_stops_the_resume_naming_it(
    damaged, tiny_model_readonly, tiny_tokenizer, artefact, damage
):
    layout = RunLayout(damaged)
    target = ARTEFACTS[artefact](layout)
    damage(target)
    metrics_before = layout.metrics.read_text()
    with pytest.raises(CorruptFileError) as caught:
        run(copy.deepcopy(tiny_model_readonly), tiny_tokenizer, OBJECTIVE, damaged, resume=True)
    error = caught.value
    assert error.path == target
    assert str(target) in str(error) and "Delete" in str(error)
    assert ("bytes" if damage is truncate else "sha256") in error.problem
    # refused before any step: nothing trained, nothing rewritten
    assert layout.metrics.read_text() == metrics_before
    assert not layout.round_summary(1).exists()


def test_the_intact_run_resumes_and_new_artefacts_carry_records(
    damaged, tiny_model_readonly, tiny_tokenizer, caplog
):
    layout = RunLayout(damaged)
    with caplog.at_level(logging.WARNING):
        summary = run(
            copy.deepcopy(tiny_model_readonly), tiny_tokenizer, OBJECTIVE, damaged, resume=True
        )
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert "no manifest" not in caplog.text and "no checksum" not in caplog.text
    for artefact in (layout.model(1), layout.reference_logps(1)):
        assert verify_manifest(artefact, what="test", fix="")
    sidecar = json.loads(layout.generated_settings(1).read_text())
    assert sidecar["files"]["generated.jsonl"]["size"] == layout.generated(1).stat().st_size


def test_artefacts_from_before_manifests_load_with_a_warning(
    damaged, tiny_model_readonly, tiny_tokenizer, caplog
):
    layout = RunLayout(damaged)
    for artefact in (layout.checkpoint, layout.model(0), layout.reference_logps(1)):
        manifest_path(artefact).unlink()
    sidecar = layout.generated_settings(1)
    record = json.loads(sidecar.read_text())
    del record["files"]
    sidecar.write_text(json.dumps(record))
    generated_before = layout.generated(1).read_bytes()
    with caplog.at_level(logging.WARNING):
        summary = run(
            copy.deepcopy(tiny_model_readonly), tiny_tokenizer, OBJECTIVE, damaged, resume=True
        )
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for what in ("checkpoint", "round model", "reference log-probs"):
        assert f"{what} " in caplog.text and "has no manifest" in caplog.text
    assert "records no checksum" in caplog.text
    assert layout.generated(1).read_bytes() == generated_before  # reused, not regenerated


def test_reference_logps_of_another_size_are_refused(damaged, tiny_model_readonly, tiny_tokenizer):
    import torch

    layout = RunLayout(damaged)
    path = layout.reference_logps(1)
    stored = torch.load(path)
    torch.save({"demo": stored["demo"][:5], "gen": stored["gen"][:5]}, path)
    write_manifest(path)  # a consistent manifest: only the count can tell
    with pytest.raises(CorruptFileError, match="holds 5 demonstration"):
        run(copy.deepcopy(tiny_model_readonly), tiny_tokenizer, OBJECTIVE, damaged, resume=True)


def test_a_crash_before_the_new_manifest_leaves_none_rather_than_a_stale_one(
    damaged, tiny_model_readonly, tiny_tokenizer, monkeypatch, caplog
):
    import gsil.integrity

    layout = RunLayout(damaged)
    path = layout.reference_logps(1)
    path.write_bytes(b"an older file")
    write_manifest(path)
    path.unlink()  # as the refusal says: delete the file, to compute it again

    def crash(artefact):
        raise Interrupt

    # write_recorded dies after the file, before its manifest
    monkeypatch.setattr(gsil.integrity, "write_manifest", crash)
    with pytest.raises(Interrupt):
        run(copy.deepcopy(tiny_model_readonly), tiny_tokenizer, OBJECTIVE, damaged, resume=True)
    assert path.exists() and not manifest_path(path).exists()
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING):
        run(copy.deepcopy(tiny_model_readonly), tiny_tokenizer, OBJECTIVE, damaged, resume=True)
    assert "reference log-probs" in caplog.text and "has no manifest" in caplog.text


def test_load_model_refuses_a_damaged_round_model(damaged):
    model_dir = RunLayout(damaged).model(0)
    load_model(model_dir, dtype="float32", device="cpu")  # intact: loads
    flip(model_dir / "model.safetensors")  # a weight's byte: transformers would load it
    with pytest.raises(ModelLoadError, match="damaged model directory.*model.safetensors"):
        load_model(model_dir, dtype="float32", device="cpu")


def test_manifest_checks(tmp_path, caplog):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"\x00\x01" * 100)
    (folder / "sub" / "b.txt").write_text("hello")
    single = tmp_path / "single.pt"
    single.write_bytes(b"abc" * 10)
    assert write_manifest(folder) == folder / "manifest.json"
    assert write_manifest(single) == tmp_path / "single.manifest.json"
    assert verify_manifest(folder, what="folder", fix="redo") is True
    assert verify_manifest(single, what="file", fix="redo") is True
    # a file the manifest lists is missing
    (folder / "sub" / "b.txt").unlink()
    with pytest.raises(CorruptFileError, match="missing") as caught:
        verify_manifest(folder, what="folder", fix="redo")
    assert caught.value.path == folder / "sub" / "b.txt" and caught.value.fix == "redo"
    # an unreadable manifest is itself refused, named
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptFileError) as caught:
        verify_manifest(folder, what="folder", fix="redo")
    assert caught.value.path == folder / "manifest.json"
    # no manifest: accepted, with a warning unless asked not to
    manifest_path(single).unlink()
    with caplog.at_level(logging.WARNING):
        assert verify_manifest(single, what="file", fix="redo") is False
    assert "has no manifest" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert verify_manifest(single, what="file", fix="redo", warn_missing=False) is False
    assert caplog.text == ""
