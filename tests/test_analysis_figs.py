"""paper_figs: the registry and one cheap figure end to end."""

import pytest

from paper_figs import FIGURES, figure_names, get_drawer
from paper_figs.__main__ import main


def test_registry_names_are_unique_and_importable():
    names = figure_names()
    assert len(names) == len(set(names)) == len(FIGURES)
    for name in names:
        assert callable(get_drawer(name))
    with pytest.raises(ValueError, match="loss_weights"):
        get_drawer("nope")


def test_cli_draws_one_figure(tmp_path):
    assert main(["--only", "loss_weights", "--out", str(tmp_path)]) == 0
    for suffix in ("png", "pdf", "json"):
        assert (tmp_path / f"loss_weights.{suffix}").stat().st_size > 1000
    assert "| logistic |" in (tmp_path / "loss_weights_table.md").read_text()
