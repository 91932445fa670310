"""Training curves from a run's ``metrics.jsonl``, drawn to PNG files: one per panel (``loss.png``,
``accuracies.png``, ...), so each can be opened, compared across runs or put in a report on its own.
Training rows are lines; eval rows (keys ``eval/...``) are markers in the colour of the training curve of
the same quantity. The x axis is the optimizer step.

Works on runs still being written: :func:`tiltlm.metrics.read_metrics` skips a last line cut short by the
writer. A resumed run logs again the steps after its checkpoint; for each step the latest row counts,
which is what the resumed run went on from. Figures are built with :class:`matplotlib.figure.Figure` and
saved through the Agg canvas, never through pyplot: no display and no global figure state is involved.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from matplotlib.figure import Figure

from tiltlm.metrics import read_metrics

EVAL_PREFIX = "eval/"


class PlotError(ValueError):
    """No curves to draw: a missing or empty metrics file, naming it."""


class Panel(NamedTuple):
    """One set of axes: the quantities it shows (training keys; ``eval/`` + key is looked up too)."""

    name: str  # also the PNG's file name
    title: str
    keys: tuple[str, ...]


PANELS = (
    Panel("loss", "loss", ("loss",)),
    Panel("accuracies", "reward accuracy (chosen reward > rejected)", ("rewards/accuracies",)),
    Panel("margins", "reward margin (chosen - rejected)", ("rewards/margins",)),
    Panel("rewards", r"implicit rewards $\beta \log \pi(y|x) / \pi_{ref}(y|x)$", ("rewards/chosen", "rewards/rejected")),
    Panel("logps", "log-probability of the completions", ("logps/chosen", "logps/rejected")),
    Panel("grad_norm", "gradient norm (before clipping)", ("grad_norm",)),
    Panel("lr", "learning rate", ("lr",)),
)
REPORT_PANELS = tuple(p for p in PANELS if p.name in ("loss", "accuracies", "margins"))


def load_rows(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (or of that file, if given directly)."""
    path = Path(run_dir)
    if not path.exists():
        raise PlotError(f"{path}: no such run directory")
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file; {run_dir} is not a run directory, or its run has not "
                        f"logged a step yet")
    rows = [row for row in read_metrics(path) if isinstance(row, dict) and isinstance(row.get("step"), (int, float))]
    if not rows:
        raise PlotError(f"{path}: no metric rows yet (each row is a JSON object with a 'step')")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key``, by step; rows without a finite number for it are left out, and
    of rows with the same step the last one wins."""
    by_step: dict[float, float] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[row["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def panel_figure(rows: list[dict], panels: tuple[Panel, ...]) -> Figure | None:
    """One figure with the panels that have data side by side (wrapping after three), or None."""
    present = [p for p in panels if any(series(rows, k)[0] or series(rows, EVAL_PREFIX + k)[0] for k in p.keys)]
    if not present:
        return None
    columns = min(3, len(present))
    lines = math.ceil(len(present) / columns)
    figure = Figure(figsize=(5 * columns, 3.6 * lines), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, present):
        for key in panel.keys:
            steps, values = series(rows, key)
            color = ax.plot(steps, values, label=key, linewidth=1.2)[0].get_color() if steps else None
            eval_steps, eval_values = series(rows, EVAL_PREFIX + key)
            if eval_steps:
                ax.plot(eval_steps, eval_values, linestyle="none", marker="o", markersize=5, color=color,
                        label=EVAL_PREFIX + key)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(present):]:
        ax.set_visible(False)
    return figure


def plot_metrics(rows: list[dict], out_path: str | Path) -> Path:
    """The quickstart report's figure: loss, reward accuracy and reward margin, side by side."""
    figure = panel_figure(rows, REPORT_PANELS)
    if figure is None:
        raise PlotError("the metric rows hold no loss, rewards/accuracies or rewards/margins")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    return out_path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """One PNG per panel that has data, in ``out_dir`` (default ``run_dir/plots``); their paths."""
    rows = load_rows(run_dir)
    base = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    out = Path(out_dir) if out_dir is not None else base / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in PANELS:
        figure = panel_figure(rows, (panel,))
        if figure is not None:
            written.append(out / f"{panel.name}.png")
            figure.savefig(written[-1], dpi=100)
    return written
