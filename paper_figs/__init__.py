"""Paper figures: one module per figure, each a thin layer over :mod:`analysis` results.

A figure module defines ``draw(out_dir: Path) -> list[Path]`` (it writes PNG and PDF through
:func:`paper_figs.style.save_figure` and returns the paths). To add one, write the module and
append ``(name, "paper_figs.<module>")`` to :data:`FIGURES`; ``python -m paper_figs`` draws
them all, ``--only NAME`` one of them, ``--out DIR`` elsewhere than ``paper_figs/output``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "output"

# (figure name, module defining draw(out_dir)); modules are imported only when drawn.
FIGURES: list[tuple[str, str]] = [
    ("loss_weights", "paper_figs.fig_loss_weights"),
    ("calibration", "paper_figs.fig_calibration"),
    ("toy_convergence", "paper_figs.fig_toy_convergence"),
    ("demo_loglik", "paper_figs.fig_demo_loglik"),
    ("beta_sensitivity", "paper_figs.fig_beta_sensitivity"),
    ("normaliser_bias", "paper_figs.fig_normaliser_bias"),
    ("experiments", "paper_figs.fig_experiments"),
    ("testbed", "paper_figs.fig_testbed"),
]


def figure_names() -> list[str]:
    return [name for name, _ in FIGURES]


def get_drawer(name: str) -> Callable[[Path], list[Path]]:
    """The ``draw`` function of a registered figure; ``ValueError`` lists the valid names."""
    modules = dict(FIGURES)
    if name not in modules:
        raise ValueError(f"unknown figure {name!r}; choose from: {', '.join(modules)}")
    return importlib.import_module(modules[name]).draw
