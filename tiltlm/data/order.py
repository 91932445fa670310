"""Which pairs each rank sees at each optimizer step: a pure function of (seed, epoch, step).

Each epoch is a seeded permutation of the pairs cut into optimizer steps of exactly
``micro_batch * grad_accum * world_size`` pairs; the remainder of an epoch (fewer than one step) is
left out of that epoch, and since every epoch is reshuffled a different few are left out each time.
Equal-sized steps keep the loss normalisation identical across ranks, accumulation and resume. A run
resumed at step k recomputes the same order from the same seed, so the data position is just k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataOrder:
    num_pairs: int
    micro_batch: int
    grad_accum: int
    world_size: int
    seed: int
    shuffle: bool = True

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
        return torch.randperm(self.num_pairs, generator=generator).tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The pair indices of each of ``grad_accum`` micro-batches that ``rank`` runs at ``step``.

        Within a step, rank r takes the r-th contiguous slice, so ranks x accumulation partition the
        step's pairs exactly as one process with a ``world_size`` times larger batch would.
        """
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self.permutation(epoch)
        start = index * self.pairs_per_step
        per_rank = self.micro_batch * self.grad_accum
        mine = order[start + rank * per_rank:start + (rank + 1) * per_rank]
        return [mine[i:i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]
