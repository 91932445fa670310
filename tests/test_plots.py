"""Training curves (tiltlm.plots): files written, partial lines tolerated, plotted points equal the rows."""

from __future__ import annotations

import json
import struct

import pytest

from tiltlm.cli import main
from tiltlm.plots import PANELS, PlotError, panel_figure, plot_metrics, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_row(step: int) -> dict:
    return {"step": step, "epoch": step / 10, "loss": 0.69 - 0.01 * step, "rewards/chosen": 0.01 * step,
            "rewards/rejected": -0.02 * step, "rewards/margins": 0.03 * step, "rewards/accuracies": 0.5 + 0.02 * step,
            "logps/chosen": -120.0 + step, "logps/rejected": -130.0 - step, "grad_norm": 1.0 + 0.1 * step,
            "lr": 1e-6, "tokens_per_second": 900.0}


def eval_row(step: int) -> dict:
    return {"step": step, "eval/loss": 0.7 - 0.02 * step, "eval/rewards/accuracies": 0.55,
            "eval/rewards/chosen": 0.05, "eval/rewards/rejected": -0.05}


ROWS = [train_row(s) for s in range(1, 9)] + [eval_row(4), eval_row(8)]


def write_metrics(directory, rows, tail: str = ""):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return directory


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG header: the IHDR chunk's first two big-endian integers."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def test_one_png_per_panel(tmp_path):
    run_dir = write_metrics(tmp_path / "run", ROWS)
    written = plot_run(run_dir)
    assert [p.name for p in written] == [f"{panel.name}.png" for panel in PANELS]
    for path in written:
        assert path.parent == run_dir / "plots"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 5000  # curves, labels and a legend, not a blank canvas


def test_points_plotted_are_the_rows():
    figure = panel_figure(ROWS, tuple(p for p in PANELS if p.name == "rewards"))
    (ax,) = [ax for ax in figure.axes if ax.get_visible()]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"rewards/chosen", "rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected"}
    steps = list(range(1, 9))
    assert list(lines["rewards/chosen"].get_xdata()) == steps
    assert list(lines["rewards/chosen"].get_ydata()) == [0.01 * s for s in steps]
    assert list(lines["rewards/rejected"].get_ydata()) == [-0.02 * s for s in steps]
    # eval rows: markers only, at the eval steps, in the colour of the training curve
    evaluation = lines["eval/rewards/chosen"]
    assert (list(evaluation.get_xdata()), list(evaluation.get_ydata())) == ([4, 8], [0.05, 0.05])
    assert evaluation.get_linestyle() == "None" and evaluation.get_marker() == "o"
    assert evaluation.get_color() == lines["rewards/chosen"].get_color()


def test_a_resumed_run_keeps_the_latest_row_of_each_step():
    rows = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.8}, {"step": 3, "loss": 0.7},
            {"step": 2, "loss": 0.75}, {"step": 3, "loss": 0.65}, {"step": 4, "loss": 0.6}]  # resumed from step 1
    figure = panel_figure(rows, PANELS[:1])
    (line,) = figure.axes[0].get_lines()
    assert (list(line.get_xdata()), list(line.get_ydata())) == ([1, 2, 3, 4], [0.9, 0.75, 0.65, 0.6])


def test_a_partial_last_line_is_ignored(tmp_path):
    run_dir = write_metrics(tmp_path / "run", [train_row(1), train_row(2)], tail='{"step": 3, "loss": 0.6')
    assert len(plot_run(run_dir, tmp_path / "out")) == len(PANELS)
    figure = panel_figure([train_row(1), train_row(2)], PANELS[:1])
    assert list(figure.axes[0].get_lines()[0].get_xdata()) == [1, 2]


def test_report_figure_has_three_panels_side_by_side(tmp_path):
    path = plot_metrics(ROWS, tmp_path / "report" / "curves.png")
    width, height = png_size(path)
    assert (width, height) == (1500, 360)  # 3 panels of 5 x 3.6 inches at 100 dpi


def test_missing_or_empty_metrics_are_clear_errors(tmp_path, capsys):
    with pytest.raises(PlotError, match=r"nothing: no such run directory"):
        plot_run(tmp_path / "nothing")
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(PlotError, match=r"not_a_run/metrics.jsonl: no such file"):
        plot_run(tmp_path / "not_a_run")
    write_metrics(tmp_path / "empty", [], tail='{"ste')
    with pytest.raises(PlotError, match="no metric rows"):
        plot_run(tmp_path / "empty")

    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
