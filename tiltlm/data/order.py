"""Which pairs each rank sees at each optimizer step: a pure function of (seed, epoch, step).

Each epoch is a seeded permutation of the pairs cut into optimizer steps of exactly
``micro_batch * grad_accum * world_size`` pairs; the remainder of an epoch (fewer than one step) is
left out of that epoch, and since every epoch is reshuffled a different few are left out each time.
Equal-sized steps keep the loss normalisation identical across ranks, accumulation and resume. A run
resumed at step k recomputes the same order from the same seed, so the data position is just k.

Length grouping (``lengths`` given): the epoch's pairs are taken in windows of ``GROUP_WINDOW`` steps;
inside a window they are sorted by length and cut into steps, and the window's steps are shuffled.
Each micro-batch then holds pairs of similar length, so its packed rows end close together (little
padding), while each window is still a random sample of the data and the step order stays random.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_WINDOW = 50  # steps per length-sorted window


@dataclass(frozen=True)
class DataOrder:
    num_pairs: int
    micro_batch: int
    grad_accum: int
    world_size: int
    seed: int
    shuffle: bool = True
    lengths: tuple[int, ...] = ()  # tokens of each pair; empty: no length grouping

    @property
    def pairs_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_pairs // self.pairs_per_step

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_pairs))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_pairs, generator=generator).tolist()
        if not self.lengths:
            return order
        step, used = self.pairs_per_step, self.steps_per_epoch * self.pairs_per_step
        grouped = []
        for start in range(0, used, GROUP_WINDOW * step):
            window = sorted(order[start:min(start + GROUP_WINDOW * step, used)], key=lambda i: self.lengths[i])
            steps = [window[k:k + step] for k in range(0, len(window), step)]
            grouped += [i for k in torch.randperm(len(steps), generator=generator).tolist() for i in steps[k]]
        return grouped + order[used:]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The pair indices of each of ``grad_accum`` micro-batches that ``rank`` runs at ``step``. Within a
        step, rank r takes the r-th contiguous slice, so ranks x accumulation partition the step's pairs
        exactly as one process with a ``world_size`` times larger batch would."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self.permutation(epoch)
        start = index * self.pairs_per_step
        per_rank = self.micro_batch * self.grad_accum
        mine = order[start + rank * per_rank:start + (rank + 1) * per_rank]
        return [mine[i:i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]
