"""The reference policy pi_ref as one strategy object, used in three named phases:

``prepare(model, datasets, collate)``  once, after the policy is loaded and *before* adapters are added or a
                                       checkpoint is loaded, so ``model`` still holds the starting weights;
``attach(policy)``                     once, with the policy as it will train (LoRA-wrapped or not);
``reference(batch, dataset)``          per batch: (summed log-probs, token counts) per sequence, never with
                                       grad, under the same autocast as the policy, or None.

Strategies (``--ref-mode``):

``precompute``    one no-grad pass over each dataset in ``prepare`` (or a cache hit: see refcache.py); each
                  batch then reads its examples' rows of the table (``Batch.indices``). The reference forward
                  is paid once per dataset instead of once per step and epoch, and no second model stays in
                  memory; with no ``--ref`` the pass runs on the policy's own starting weights.
``online``        a frozen model (no grad, eval mode) run on every batch: the starting weights loaded a second
                  time, or the model named by ``--ref``; sharded like the policy under FSDP.
``adapters-off``  with LoRA, the policy itself with its adapters disabled: the same base weights, no second
                  copy in memory.
``none``          reference-free losses (SimPO, ORPO): nothing is loaded or run.

``auto`` (:func:`choose_mode`) picks none for reference-free objectives, precompute when the run scores every
example at least once, else adapters-off under LoRA, else online.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from tiltlm.data.collate import Batch
from tiltlm.loading import load_sharded
from tiltlm.logprobs import CompletionLogps
from tiltlm.models import eval_mode, frozen
from tiltlm.refcache import cached_reference_table, lookup_reference
from tiltlm.runtime import Precision

Scores = tuple[Tensor, Tensor]
Collate = Callable[[list], Batch]
Log = Callable[[str], None]


def choose_mode(ref_mode: str, lora: bool, ref_model: str | None, reference_free: bool,
                covers_data: bool = False) -> str:
    """Resolve ``auto``: none for reference-free losses; precompute when the run scores every pair at
    least once (``covers_data``: a full epoch or more), since it then never does more reference work than
    an online reference; else adapters-off under LoRA, else online."""
    if ref_mode != "auto":
        return ref_mode
    if reference_free:
        return "none"
    if covers_data:
        return "precompute"
    if lora and ref_model is None:
        return "adapters-off"
    return "online"


class Reference:
    """No reference (``none``), and the base of the strategies: every phase does nothing."""

    mode = "none"

    def prepare(self, model: nn.Module, datasets: dict[str, list], collate: Collate) -> None:
        pass

    def attach(self, policy: nn.Module) -> None:
        pass

    def __call__(self, batch: Batch, dataset: str) -> Optional[Scores]:
        return None


class OnlineReference(Reference):
    """A frozen model run on every batch. ``load()`` gives it (unsharded); ``wrap`` shards it under FSDP,
    where only rank 0 calls ``load`` and the other ranks receive their shards (loading.py)."""

    mode = "online"

    def __init__(self, load: Callable[[], nn.Module], precision: Precision, chunk_size: int,
                 wrap: Callable[[CompletionLogps], nn.Module] | None = None):
        self.load, self.precision, self.chunk_size, self.wrap = load, precision, chunk_size, wrap
        self.scorer: nn.Module | None = None

    def prepare(self, model: nn.Module, datasets: dict[str, list], collate: Collate) -> None:
        def scorer(reference: nn.Module) -> CompletionLogps:
            return CompletionLogps(frozen(reference), self.chunk_size)

        if self.wrap:
            self.scorer = load_sharded(self.load, lambda reference: self.wrap(scorer(reference)), self.precision.device)
        else:
            self.scorer = scorer(self.load()).to(self.precision.device)

    @torch.no_grad()
    def __call__(self, batch: Batch, dataset: str) -> Scores:
        with self.precision.autocast():
            out = self.scorer(batch)
        if hasattr(self.scorer, "reshard"):
            self.scorer.reshard()  # FSDP's root otherwise stays gathered, expecting a backward that never comes
        return out


class AdaptersOffReference(Reference):
    """The LoRA policy with its adapters switched off (and in eval mode, so no LoRA dropout)."""

    mode = "adapters-off"

    def __init__(self, precision: Precision, chunk_size: int):
        self.precision, self.chunk_size = precision, chunk_size
        self.policy: nn.Module | None = None

    def attach(self, policy: nn.Module) -> None:
        self.policy = policy

    @torch.no_grad()
    def __call__(self, batch: Batch, dataset: str) -> Scores:
        with self.policy.disable_adapter(), eval_mode(self.policy), self.precision.autocast():
            return CompletionLogps(self.policy, self.chunk_size)(batch)


class PrecomputedReference(Reference):
    """Tables of every example's reference log-probs, filled in ``prepare`` and read per batch."""

    mode = "precompute"

    def __init__(self, tokenizer, precision: Precision, chunk_size: int, batch_size: int, cache_dir: str | None,
                 load: Callable[[], nn.Module] | None = None, log: Log = print):
        self.tokenizer, self.precision, self.chunk_size, self.batch_size = tokenizer, precision, chunk_size, batch_size
        self.cache_dir, self.load, self.log = cache_dir, load, log
        self.tables: dict[str, Callable] = {}

    def prepare(self, model: nn.Module, datasets: dict[str, list], collate: Collate) -> None:
        """Score every dataset with ``model`` itself (the starting weights), or with the model ``load``
        gives, which is freed afterwards."""
        model = self.load().to(self.precision.device) if self.load else model.to(self.precision.device)
        for name, examples in datasets.items():
            self.tables[name] = self.table(model, name, examples, collate)

    def table(self, model: nn.Module, name: str, examples: list, collate: Collate) -> Callable:
        peft = hasattr(model, "disable_adapter")  # an adapter evaluated against its own base
        started = time.perf_counter()

        def scorer(batch: Batch) -> Scores:
            with self.precision.autocast():
                if peft:
                    with model.disable_adapter():
                        return CompletionLogps(model, self.chunk_size)(batch)
                return CompletionLogps(model, self.chunk_size)(batch)

        table, path, hit = cached_reference_table(
            model, self.tokenizer, examples, collate, self.batch_size, self.precision.device, self.chunk_size,
            self.cache_dir, name=name, extra={"dtype": str(self.precision.compute)}, scorer=scorer)
        how = "read" if hit else f"computed in {time.perf_counter() - started:.1f} s and saved"
        self.log(f"reference log-probs of {len(examples)} pairs ({name}): {how}: {path}")
        return lookup_reference(table)

    def __call__(self, batch: Batch, dataset: str) -> Scores:
        return self.tables[dataset](batch)
