"""The one style of every paper figure: sizes, colours per method, saving as PNG and PDF."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PALETTE = {
    "sft": "#444444",
    "spin": "#d62728",
    "logistic": "#1f77b4",
    "brier": "#2ca02c",
    "exponential": "#ff7f0e",
    "kliep": "#9467bd",
    "lsif": "#8c564b",
    "power(0.5)": "#e377c2",
    "hinge": "#7f7f7f",
}
COLUMN_WIDTH, FULL_WIDTH = 3.4, 7.0  # inches (two-column paper)


def apply_style() -> None:
    plt.rcParams.update(
        {
            "font.size": 8,
            "axes.titlesize": 8,
            "axes.labelsize": 8,
            "legend.fontsize": 7,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "lines.linewidth": 1.4,
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
        }
    )


def color(name: str) -> str:
    """Colour of a method or loss: ``gsil-logistic`` and ``logistic`` share one."""
    key = name.removeprefix("gsil-")
    return PALETTE.get(key, "#17becf")


def figure(n_rows: int = 1, n_cols: int = 1, width: float = FULL_WIDTH, height: float = 2.2):
    apply_style()
    return plt.subplots(n_rows, n_cols, figsize=(width, height * n_rows), squeeze=False)


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` under ``out_dir``; close the figure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path)
    plt.close(fig)
    return paths


def save_numbers(data: dict, out_dir: Path, name: str) -> Path:
    """The numbers behind a figure as JSON (arrays become lists), next to the images."""

    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, np.ndarray):
            return plain(value.tolist())
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, float) and not np.isfinite(value):
            return None
        return value

    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps(plain(data), indent=1))
    return path
