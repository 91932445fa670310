"""What users watch: per-example metrics averaged over an optimizer step (all micro-batches, all ranks),
written as one JSON line per logging step to ``metrics.jsonl`` and to TensorBoard where installed.

For pairs, rewards are the implicit ``beta * (log pi - log pi_ref)`` (Rafailov et al. 2023, eq. 5 without
the partition term); ``rewards/accuracies`` the fraction of pairs whose chosen reward is higher (ties count
half); ``logps/chosen_change`` the mean ``log pi(y_w|x) - log pi_ref(y_w|x)``: the change since step 0 when
the reference is the policy's starting weights (the default), else the distance to ``--ref``'s model.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor

DISPLACEMENT_NATS = 1.0  # the fall of the mean chosen log-prob that triggers the warning below


class MetricSums:
    """Running sums of per-example metrics, kept on the device they are computed on: adding one
    micro-batch's values never waits for the device. ``totals()`` is the step's one read-back."""

    def __init__(self) -> None:
        self.keys: tuple[str, ...] = ()
        self.sums: Tensor | None = None

    def add(self, metrics: dict[str, Tensor]) -> None:
        """``metrics``: key -> per-example values [n] (detached), the same keys at every call."""
        values = torch.stack([v.detach().double().sum() for v in metrics.values()])
        count = next(iter(metrics.values())).numel()
        row = torch.cat([values, values.new_tensor([count])])
        if self.sums is None:
            self.keys, self.sums = tuple(metrics), torch.zeros_like(row)
        self.sums += row

    def totals(self) -> Tensor:
        """The sums and, last, the example count: the tensor to all-reduce across ranks."""
        return self.sums if self.sums is not None else torch.zeros(1, dtype=torch.float64)

    def means(self, totals: Tensor | list[float], prefix: str = "") -> dict[str, float]:
        """Means from ``totals`` (``totals()`` or its sum over ranks, as a tensor or already read back)."""
        values = totals.tolist() if isinstance(totals, Tensor) else totals
        count = max(values[-1], 1.0)
        return {prefix + key: value / count for key, value in zip(self.keys, values)}


def displacement_warning(chosen_logps_change: float, margin: float,
                         threshold: float = DISPLACEMENT_NATS) -> str | None:
    """A one-line warning when training shows likelihood displacement, else ``None``: DPO-style losses only
    constrain the margin, so they can widen it while lowering the chosen likelihood too (Razin et al. 2024,
    "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization"; Pal et al.
    2024, "Smaug"): the mean chosen log-prob more than ``threshold`` nats below the reference's while the
    margin is positive. The usual remedy is RPO's NLL anchor, ``--loss sigmoid,nll``."""
    if chosen_logps_change < -threshold and margin > 0:
        return (f"likelihood displacement: the mean chosen log-prob is {-chosen_logps_change:.2f} nats "
                f"below the reference's while the margin is {margin:.2f}; the policy is widening the "
                f"margin by lowering the chosen completions too - consider --loss sigmoid,nll (RPO)")
    return None


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` (flushed per row, so a crash loses nothing logged) and mirrors
    the numbers to TensorBoard when it is installed and wanted."""

    def __init__(self, output: Path, tensorboard: bool = True) -> None:
        self.file = open(output / "metrics.jsonl", "a", encoding="utf-8")
        self.board = None
        if tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(str(output / "tensorboard"))

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a last line cut short by a running writer is ignored."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step``: a resumed run logs those steps again."""
    if path.is_file():
        kept = [row for row in read_metrics(path) if row["step"] <= step]
        path.write_text("".join(json.dumps(row) + "\n" for row in kept))
