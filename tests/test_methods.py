"""Methods are classes registered by name: a new one trains through the same round loop and
the same configuration, with no change to the trainer."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_demos

from experiments.config import ConfigError, from_dict
from gsil.generation import GenerationSettings
from gsil.methods import GSIL, METHODS, SFT, LogpBatch, Method, build_method, register
from gsil.optimization import OptimSettings
from gsil.trainer import RoundsSettings, run_rounds


@pytest.fixture
def probe_method():
    """A registered method that pushes the demonstrations up and the own samples down, and
    records every batch it sees; unregistered afterwards."""
    seen: list[LogpBatch] = []

    @register("probe")
    class Probe(Method):
        needs_generations = True

        @classmethod
        def from_settings(cls, settings):
            return cls()

        def loss(self, batch: LogpBatch):
            seen.append(batch)
            return -batch.policy_demo_logps + batch.policy_gen_logps.mean(-1), {}

    try:
        yield Probe, seen
    finally:
        METHODS.pop("probe")


def test_a_registered_method_trains_through_the_round_loop(
    probe_method, tiny_model, tiny_tokenizer, tmp_path
):
    probe, seen = probe_method
    config = from_dict({"method": "probe"})
    method = build_method(config.objective)
    assert isinstance(method, probe) and method.name == "probe"
    settings = RoundsSettings(
        run_dir=tmp_path,
        max_prompt_length=64,
        max_length=96,
        optim=OptimSettings(learning_rate=1e-2, batch_size=2, checkpoint_every=0),
        generation=GenerationSettings(max_new_tokens=4, batch_size=4),
    )
    summary = run_rounds(tiny_model, tiny_tokenizer, tiny_demos(4), method, settings)
    assert summary["objective"] == "probe" and len(seen) == 2  # 4 demos, 2 steps of 2
    batch = seen[0]
    # the capabilities decide what the trainer prepared: own samples, no reference pass
    assert batch.policy_gen_logps.shape == (2, 1) and batch.ref_demo_logps is None
    assert not (tmp_path / "round_0" / "reference_logps.pt").exists()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["loss"] < rows[0]["loss"]


def test_methods_are_bound_from_their_settings_and_unknown_ones_are_refused():
    assert isinstance(build_method(from_dict({"method": "sft"}).objective), SFT)
    gsil = build_method(from_dict({"loss": "brier", "beta": 0.5, "shift": 1.0}).objective)
    assert isinstance(gsil, GSIL) and (gsil.name, gsil.beta, gsil.shift) == ("gsil-brier", 0.5, 1.0)
    with pytest.raises(ConfigError, match=r"objective.method must be one of \['gsil'"):
        from_dict({"method": "ppo"})
    with pytest.raises(ValueError, match="registered twice"):
        register("gsil")(GSIL)
    assert torch.equal(
        build_method(from_dict({"method": "dft", "do_sample": True}).objective).initial_state(2),
        torch.zeros(2),
    )
