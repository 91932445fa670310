"""The reference policy pi_ref (``--ref-mode``) as one strategy object, used in three named phases:

``prepare(model, datasets, collate)``  once, after the policy is loaded and *before* adapters are added or a
                                       checkpoint is loaded, so ``model`` still holds the starting weights;
``attach(policy, scorer)``             once, with the policy as it will train (LoRA-wrapped or not) and, under
                                       FSDP, its sharded scorer: the only way to run a sharded policy;
``reference(batch, dataset)``          per batch: (summed log-probs, token counts) per sequence, never with
                                       grad, under the same autocast as the policy, or None.
"""

from __future__ import annotations

import contextlib
import gc
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
    """Resolve ``auto``: none for reference-free losses; precompute when the run scores every example at
    least once (``covers_data``), since it then never does more reference work than an online reference;
    else adapters-off under LoRA (no second copy), else online."""
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
    """No reference (``none``: reference-free losses), and the base of the strategies: every phase does nothing."""

    mode = "none"

    def prepare(self, model: nn.Module, datasets: dict[str, list], collate: Collate) -> None:
        pass

    def attach(self, policy: nn.Module, scorer: nn.Module | None = None) -> None:
        pass

    def __call__(self, batch: Batch, dataset: str) -> Optional[Scores]:
        return None


class OnlineReference(Reference):
    """A frozen model run on every batch: the starting weights loaded a second time, or ``--ref``'s model.
    ``load()`` gives it (unsharded); ``wrap`` shards it under FSDP (load_reference)."""

    mode = "online"

    def __init__(self, load: Callable[[], nn.Module], precision: Precision, chunk_size: int,
                 wrap: Callable[[CompletionLogps], nn.Module] | None = None):
        self.load, self.precision, self.chunk_size, self.wrap = load, precision, chunk_size, wrap
        self.scorer: nn.Module | None = None

    def prepare(self, model: nn.Module, datasets: dict[str, list], collate: Collate) -> None:
        self.scorer = load_reference(self.load, self.chunk_size, self.wrap, self.precision.device)

    def __call__(self, batch: Batch, dataset: str) -> Scores:
        return frozen_forward(self.scorer, batch, self.precision)


class AdaptersOffReference(Reference):
    """The LoRA policy with its adapters switched off (and in eval mode, so no LoRA dropout)."""

    mode = "adapters-off"

    def __init__(self, precision: Precision, chunk_size: int):
        self.precision, self.chunk_size = precision, chunk_size
        self.policy: nn.Module | None = None

    def attach(self, policy: nn.Module, scorer: nn.Module | None = None) -> None:
        self.policy = policy
        self.scorer = scorer if scorer is not None else CompletionLogps(policy, self.chunk_size)

    def __call__(self, batch: Batch, dataset: str) -> Scores:
        with self.policy.disable_adapter(), eval_mode(self.scorer):
            return frozen_forward(self.scorer, batch, self.precision)


class PrecomputedReference(Reference):
    """Tables of every example's reference log-probs (refcache.py), filled once and read per batch: no second
    model in memory, the reference forward paid once per dataset instead of once per step and epoch.

    With ``load`` (``--ref``) its model scores in ``prepare`` (sharded by ``wrap`` under FSDP) and is freed
    afterwards. Else the policy's starting weights score: in ``prepare`` in one process; under FSDP
    (``wrap`` given) in ``attach``, through the sharded policy, since every sharded forward is a
    collective and the policy is sharded only after ``prepare`` (its adapters off: with B = 0 at
    initialisation the same numbers, exactly)."""

    mode = "precompute"

    def __init__(self, tokenizer, precision: Precision, chunk_size: int, batch_size: int, cache_dir: str | None,
                 load: Callable[[], nn.Module] | None = None,
                 wrap: Callable[[CompletionLogps], nn.Module] | None = None, log: Log = print):
        self.tokenizer, self.precision, self.chunk_size, self.batch_size = tokenizer, precision, chunk_size, batch_size
        self.cache_dir, self.load, self.wrap, self.log = cache_dir, load, wrap, log
        self.tables: dict[str, Callable] = {}
        self.datasets: dict[str, list] = {}

    def prepare(self, model: nn.Module, datasets: dict[str, list], collate: Collate) -> None:
        self.datasets, self.collate = datasets, collate
        if self.load is not None:
            scorer = load_reference(self.load, self.chunk_size, self.wrap, self.precision.device)
            self.fill(scorer.model, scorer)
            del scorer
            gc.collect()  # FSDP's hooks keep a sharded model in reference cycles: free it before training
        elif self.wrap is None:
            self.fill(model, CompletionLogps(model.to(self.precision.device), self.chunk_size))

    def attach(self, policy: nn.Module, scorer: nn.Module | None = None) -> None:
        if self.wrap is not None and self.load is None:
            self.fill(policy, scorer)

    def fill(self, model: nn.Module, scorer: nn.Module) -> None:
        """A table per dataset, scored by ``scorer`` (a peft model's with its adapters off) or read from the
        cache by ``model``'s fingerprint."""
        adapters_off = model.disable_adapter if hasattr(model, "disable_adapter") else contextlib.nullcontext

        def score(batch: Batch) -> Scores:
            with adapters_off():
                return frozen_forward(scorer, batch, self.precision)

        for name, examples in self.datasets.items():
            started = time.perf_counter()
            table, path, hit = cached_reference_table(
                model, self.tokenizer, examples, self.collate, self.batch_size, self.precision.device,
                self.chunk_size, self.cache_dir, name=name, extra={"dtype": str(self.precision.compute)}, scorer=score)
            how = "read" if hit else f"computed in {time.perf_counter() - started:.1f} s and saved"
            self.log(f"reference log-probs of {len(examples)} pairs ({name}): {how}: {path}")
            self.tables[name] = lookup_reference(table)

    def __call__(self, batch: Batch, dataset: str) -> Scores:
        return self.tables[dataset](batch)


def load_reference(load: Callable[[], nn.Module], chunk_size: int, wrap: Callable[[CompletionLogps], nn.Module] | None,
                   device: torch.device) -> nn.Module:
    """A frozen reference model's log-prob scorer: on ``device``, or sharded by ``wrap`` under FSDP, where only
    rank 0 calls ``load`` and the other ranks receive their shards (loading.py)."""
    if wrap is None:
        return CompletionLogps(frozen(load()), chunk_size).to(device)
    return load_sharded(lambda: frozen(load()), lambda model: wrap(CompletionLogps(model, chunk_size)), device)


def frozen_forward(scorer: nn.Module, batch: Batch, precision: Precision) -> Scores:
    """``scorer(batch)`` without grad, under the run's autocast. A sharded (FSDP) root is resharded after:
    FSDP keeps the root's weights gathered after a forward, expecting a backward that never comes."""
    with torch.no_grad(), precision.autocast():
        scores = scorer(batch)
    if hasattr(scorer, "reshard"):
        scorer.reshard()
    return scores
