"""One batch through policy, reference and objective, and the same over a whole dataset without grad:
the kernel shared by the training loop and ``tiltlm eval``, so for the same models an evaluation's
numbers equal what the trainer logs at step 0.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from tiltlm import collectives
from tiltlm.config import ConfigError, TrainConfig
from tiltlm.data import (DataError, Pair, RankedList, TokenizedList, Unpaired, expand_ranking_to_pairs,
                         load_examples, tokenize_examples)
from tiltlm.data.collate import Batch
from tiltlm.metrics import MetricSums
from tiltlm.models import eval_mode
from tiltlm.objectives import Scored
from tiltlm.reference import Reference
from tiltlm.runtime import Precision


def make_batch(objective, examples: Sequence, indices: Sequence[int], device: torch.device) -> Batch:
    """The batch of ``examples[i] for i in indices`` on ``device``, carrying ``indices`` for a precomputed reference."""
    batch = objective.collate([examples[i] for i in indices])
    return replace(batch, indices=tuple(indices)).to(device)


def score(policy: Callable[[Batch], tuple], reference: Reference, objective, batch: Batch, dataset: str,
          precision: Precision) -> Scored:
    """``batch`` through policy and reference, under the run's autocast, and the objective. The reference runs
    first: under FSDP it may be the sharded policy itself (adapters off), whose no-grad forward should not
    fall between the policy's forward and its backward."""
    reference_scores = reference(batch, dataset)
    with precision.autocast():
        policy_scores = policy(batch)
    return objective(policy_scores, reference_scores, batch)


def read_examples(source: str, tokenizer, config: TrainConfig, log) -> list:
    """Tokenized examples of ``source`` (one kind per file), the data summary logged; ranked lists become
    their pairs when ``config.pairs`` is ``all`` or a reward model trains on them."""
    examples = load_examples(source)
    check_one_kind(examples, source)
    rows, summary = tokenize_examples(examples, tokenizer, config.max_length, config.max_prompt_length,
                                      config.special_tokens_in_text)
    log(f"data {source} (prompts cut to {config.max_prompt_length} tokens, prompt + completion to "
        f"{config.max_length}):\n{summary.format()}")
    if not rows:
        raise ConfigError(f"data {source}: no usable row left after tokenisation (see the summary above)")
    if isinstance(rows[0], TokenizedList) and (config.pairs == "all" or config.objective == "reward-model"):
        pairs = [pair for ranked in rows for pair in expand_ranking_to_pairs(ranked)]
        log(f"  {len(rows)} ranked lists -> {len(pairs)} pairs (every pair a ranking implies)")
        if not pairs:
            raise ConfigError(f"data {source}: its rankings imply no pair (every completion tied)")
        return pairs
    return rows


def check_one_kind(examples: list, source: str) -> None:
    """A DataError naming the first row whose kind (pair, ranked list, unpaired) differs from the first row's."""
    names = {Pair: "a pair", RankedList: "a ranked list", Unpaired: "an unpaired row"}
    for example in examples[1:]:
        if type(example) is not type(examples[0]):
            raise DataError(f"{example.source}: {names[type(example)]}, but the file starts with "
                            f"{names[type(examples[0])]} ({examples[0].source}); one file holds one kind of row")


@torch.no_grad()
def evaluate(policy: torch.nn.Module, reference: Reference, objective, examples: Sequence, dataset: str,
             batch_size: int, precision: Precision, prefix: str = "eval/", progress: bool = True) -> dict[str, float]:
    """Mean loss and metrics over ``examples``, in eval mode; under torchrun each rank takes every
    world_size-th example and all return the sums over ranks. Every rank runs as many batches as rank 0,
    since a sharded (FSDP) forward is a collective: a rank out of examples scores the first one uncounted."""
    rank, world = collectives.world()
    mine = range(len(examples))[rank::world]
    sums = MetricSums()
    most = -(-len(examples) // world)  # rank 0's share
    with eval_mode(policy):
        for start in tqdm(range(0, most, batch_size), desc="eval", disable=not progress or rank != 0, leave=False):
            indices = mine[start:start + batch_size]
            batch = make_batch(objective, examples, indices or [0], precision.device)
            metrics = score(policy, reference, objective, batch, dataset, precision).metrics
            if indices:
                sums.add(metrics)
    if hasattr(policy, "reshard"):
        policy.reshard()  # a sharded root stays gathered after a forward that no backward follows
    return sums.means(collectives.sum_over_ranks(sums.totals()), prefix)
