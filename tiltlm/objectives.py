"""What a batch is scored as. The loop knows an objective, not DPO: how examples become a Batch, whether a
reference is needed, and how policy and reference scores become per-example losses and metrics.

An objective has one interface::

    objective.collate(examples) -> Batch
    objective.length(example)   -> int         tokens the example occupies (length-grouped steps)
    objective.scorer(model)     -> nn.Module   batch -> scores; the module DDP/FSDP wrap
    objective.needs_reference   -> bool
    objective.progress_keys     -> metrics shown beside the loss on the progress bar
    objective(policy_scores, reference_scores | None, batch) -> Scored

For preference pairs (:class:`PairObjective`, any loss of :mod:`tiltlm.losses` or a weighted sum of them)
scores are ``(summed completion log-probs, completion token counts)`` per sequence of the batch, as
:class:`~tiltlm.logprobs.CompletionLogps` returns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from tiltlm.config import TrainConfig, loss_setup
from tiltlm.data.collate import Batch, collate_concatenated, collate_shared
from tiltlm.logprobs import CompletionLogps
from tiltlm.losses import LossOutput, LossParams, PairLogps, needs_reference, preference_loss

Scores = tuple[Tensor, Tensor]
Collate = Callable[[list], Batch]

# Sums of hundreds of log-probs, computed in batches of different shapes, agree to about 1e-6 of their size
# in float32 and about 4e-6 under bf16 autocast (measured: a precomputed reference against the policy at
# step 0); a reward margin below 1e-5 of that size is rounding noise, not a preference (see pair_metrics).
TIE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Scored:
    """Per-example losses (with grad) and per-example metrics (detached), all of shape [examples]."""

    losses: Tensor
    metrics: dict[str, Tensor]


def make_collate(layout: str, pad_id: int, pack_tokens: int = 0) -> Collate:
    """The batch layout: ``packed`` (several pairs per row), ``shared`` (one pair per row, prompt once)
    or ``concatenated`` (two rows per pair); all three give the same log-probs (tests prove it)."""
    if layout == "concatenated":
        return partial(collate_concatenated, pad_id=pad_id)
    if layout == "shared":
        return partial(collate_shared, pad_id=pad_id)
    return partial(collate_shared, pad_id=pad_id, row_tokens=pack_tokens)


def split_pairs(logps: Tensor, counts: Tensor, num_pairs: int) -> PairLogps:
    """Per-sequence values (chosen of every pair, then rejected) -> PairLogps."""
    return PairLogps(logps[:num_pairs], logps[num_pairs:], counts[:num_pairs], counts[num_pairs:])


def pair_metrics(out: LossOutput, policy: PairLogps, reference: Optional[PairLogps], beta: float) -> dict[str, Tensor]:
    """The metrics of :mod:`tiltlm.metrics`, per pair.

    Accuracy decides ties explicitly: a pair counts 1 when its reward margin is positive, 0 when
    negative, and 1/2 when the margin is within rounding noise of zero, ``|margin| <= TIE_TOLERANCE *
    beta * (|log pi(y_w)| + |log pi(y_l)| + |log pi_ref(y_w)| + |log pi_ref(y_l)|)``. At step 0, where the
    policy is the reference, every margin is such a tie and the accuracy is exactly 0.5.
    """
    margins = out.chosen_rewards - out.rejected_rewards
    size = policy.chosen.abs() + policy.rejected.abs()
    if reference is not None:
        size = size + reference.chosen.abs() + reference.rejected.abs()
    tie = margins.abs() <= TIE_TOLERANCE * beta * size.detach()
    correct = torch.where(tie, 0.5, (margins > 0).to(margins.dtype))
    metrics = {"loss": out.losses, "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
               "rewards/margins": margins, "rewards/accuracies": correct,
               "logps/chosen": policy.chosen, "logps/rejected": policy.rejected}
    if reference is not None:
        metrics["logps/chosen_change"] = policy.chosen - reference.chosen
    return {key: value.detach() for key, value in metrics.items()}


@dataclass(frozen=True)
class PairObjective:
    """Preference pairs (prompt, chosen, rejected) under ``names`` weighted by ``weights``."""

    collate: Collate
    params: LossParams
    names: tuple[str, ...] = ("sigmoid",)
    weights: tuple[float, ...] = (1.0,)
    chunk_size: int = 256  # completion positions projected to the vocabulary at a time
    progress_keys = ("rewards/accuracies", "rewards/margins")

    @property
    def needs_reference(self) -> bool:
        return needs_reference(self.names)

    def scorer(self, model: nn.Module) -> nn.Module:
        return CompletionLogps(model, self.chunk_size)

    @staticmethod
    def length(pair) -> int:
        return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)

    def __call__(self, policy: Scores, reference: Optional[Scores], batch: Batch) -> Scored:
        policy_logps = split_pairs(*policy, batch.num_pairs)
        reference_logps = split_pairs(*reference, batch.num_pairs) if reference is not None else None
        out = preference_loss(policy_logps, reference_logps, self.params, self.names, self.weights)
        return Scored(out.losses, pair_metrics(out, policy_logps, reference_logps, self.params.beta))


def make_objective(config: TrainConfig, tokenizer) -> PairObjective:
    """The objective ``config`` asks for: its losses and batch layout."""
    params, names, weights = loss_setup(config)
    collate = make_collate(config.layout, tokenizer.pad_token_id, config.pack_tokens or config.max_length)
    return PairObjective(collate, params, names, weights, config.logprob_chunk)
