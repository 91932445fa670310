"""What users watch: per-pair metrics averaged over an optimizer step (all micro-batches, all ranks),
written as one JSON line per logging step to ``metrics.jsonl`` and to TensorBoard where installed.

Rewards are the implicit rewards ``beta * (log pi - log pi_ref)`` (Rafailov et al. 2023, eq. 5 without
the partition term); ``rewards/accuracies`` is the fraction of pairs whose chosen reward exceeds the
rejected one; ``logps/chosen_change`` is ``log pi(y_w|x) - log pi_ref(y_w|x)`` averaged over pairs: how
far the chosen completions' log-probability has moved since the reference, on the same pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from tiltlm.losses import LossOutput, PairLogps

PAIR_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "logps/chosen_change")


class MetricSums:
    """Running sums of per-pair metrics; ``mean()`` sums across ranks first, so every rank agrees."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(PAIR_KEYS) + 1, dtype=torch.float64)  # last slot: pair count
        self.has_reference = False

    def add(self, out: LossOutput, policy: PairLogps, reference: PairLogps | None) -> None:
        margins = out.chosen_rewards - out.rejected_rewards
        change = (policy.chosen - reference.chosen) if reference is not None else torch.zeros_like(policy.chosen)
        self.has_reference = reference is not None
        values = [out.losses, out.chosen_rewards, out.rejected_rewards, margins, (margins > 0).float(),
                  policy.chosen, policy.rejected, change]
        row = torch.stack([v.detach().double().sum().cpu() for v in values])
        self.sums[:-1] += row
        self.sums[-1] += out.losses.numel()

    def mean(self, prefix: str = "") -> dict[str, float]:
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        count = max(sums[-1].item(), 1.0)
        means = {prefix + key: (sums[i] / count).item() for i, key in enumerate(PAIR_KEYS)}
        if not self.has_reference:
            means.pop(prefix + "logps/chosen_change")
        return means


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` (flushed per row, so a crash loses nothing logged) and mirrors
    the numbers to TensorBoard when it is installed and wanted."""

    def __init__(self, output: Path, tensorboard: bool = True) -> None:
        self.file = open(output / "metrics.jsonl", "a", encoding="utf-8")
        self.board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(str(output / "tensorboard"))
            except ImportError:
                pass

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
