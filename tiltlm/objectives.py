"""What a batch is scored as. The loop knows an objective, not DPO: how examples become a Batch, whether a
reference is needed, and how policy and reference scores become per-example losses and metrics::

    objective.collate(examples) -> Batch
    objective.length(example)   -> int         tokens the example occupies (length-grouped steps)
    objective.scorer(model)     -> nn.Module   batch -> scores; the module DDP/FSDP wrap
    objective.load(name, dtype, trust_remote_code, attention, device) -> the model it trains (and its reference)
    objective.needs_reference, objective.precomputable (a refcache.py table, one row per example, can serve it)
    objective.progress_keys     -> metrics shown beside the loss on the progress bar
    objective(policy_scores, reference_scores | None, batch) -> Scored

Normalisation. Each example (a pair, a ranked list, an unpaired row) gives one loss times its row's
``weight``; the step's loss is their sum over the number of examples in the step, not over the sum of
weights: weight 2 counts a row twice, 0 removes it, and a row's pull does not depend on its batch mates.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from tiltlm.config import ConfigError, TrainConfig, loss_setup
from tiltlm.data.collate import (Batch, PromptCompletions, collate_concatenated, collate_prompt_completions,
                                 collate_shared)
from tiltlm.data.tokenize import mismatched_unpaired
from tiltlm.data.types import TokenizedList, TokenizedPair, TokenizedUnpaired
from tiltlm.logprobs import CompletionLogps
from tiltlm.losses import (LossOutput, LossParams, PairLogps, bradley_terry_reward_loss, kto, kto_reference_point,
                           list_rewards, needs_reference, plackett_luce, preference_loss, stack_lists)
from tiltlm.models import load_model

Scores = tuple[Tensor, Tensor]
Collate = Callable[[list], Batch]

# Sums of hundreds of log-probs, computed in batches of different shapes, agree to about 1e-6 of their size
# in float32 and about 4e-6 under bf16 autocast (measured: a precomputed reference against the policy at
# step 0); a reward margin below 1e-5 of that size is rounding noise, not a preference (see pair_metrics).
TIE_TOLERANCE = 1e-5

KINDS = {TokenizedPair: "pairs", TokenizedList: "ranked lists", TokenizedUnpaired: "unpaired"}


@dataclass(frozen=True)
class Scored:
    """Per-example losses (with grad) and per-example metrics (detached), all of shape [examples]."""

    losses: Tensor
    metrics: dict[str, Tensor]


@dataclass
class RowBatch(Batch):
    """A Batch with its examples' ``weights``; for ranked lists the ``ranks`` [lists, K_max] and K of each
    list (``counts``); for unpaired rows their labels (``desirable``)."""

    weights: Tensor | None = None
    ranks: Tensor | None = None
    counts: tuple[int, ...] = ()
    desirable: Tensor | None = None


def with_rows(batch: Batch, examples: Sequence, **extra) -> RowBatch:
    weights = torch.tensor([float(getattr(e, "weight", 1.0)) for e in examples], dtype=torch.float32)
    return RowBatch(**{f.name: getattr(batch, f.name) for f in fields(Batch)}, weights=weights, **extra)


def weighted(losses: Tensor, batch: Batch) -> Tensor:
    """Each example's loss times its row's weight (weights travel in a RowBatch; a plain Batch means 1)."""
    weights = getattr(batch, "weights", None)
    return losses if weights is None else losses * weights.to(losses.device, losses.dtype)


def make_collate(layout: str, pad_id: int, pack_tokens: int = 0) -> Collate:
    """The batch layout: ``packed`` (several pairs per row), ``shared`` (one pair per row, prompt once)
    or ``concatenated`` (two rows per pair); all three give the same log-probs (tests prove it)."""
    if layout == "concatenated":
        return partial(collate_concatenated, pad_id=pad_id)
    return partial(collate_shared, pad_id=pad_id, row_tokens=pack_tokens if layout == "packed" else None)


def collate_weighted(pairs: list[TokenizedPair], collate: Collate) -> RowBatch:
    return with_rows(collate(pairs), pairs)


class PolicyScored:
    """The policy objectives' model: a causal LM (:func:`tiltlm.models.load_model`) whose scores are summed
    completion log-probs, ``chunk_size`` completion positions projected to the vocabulary at a time."""

    @staticmethod
    def load(name: str, dtype: torch.dtype, trust_remote_code: bool = False, attention: str = "auto",
             device: torch.device | str | None = None) -> nn.Module:
        return load_model(name, dtype, trust_remote_code, attention=attention, device=device)

    def scorer(self, model: nn.Module) -> nn.Module:
        return CompletionLogps(model, self.chunk_size)


def split_pairs(logps: Tensor, counts: Tensor, num_pairs: int) -> PairLogps:
    """Per-sequence values (chosen of every pair, then rejected) -> PairLogps."""
    return PairLogps(logps[:num_pairs], logps[num_pairs:], counts[:num_pairs], counts[num_pairs:])


def correct_or_tie(margins: Tensor, size: Tensor) -> Tensor:
    tie = margins.abs() <= TIE_TOLERANCE * size.detach()
    return torch.where(tie, 0.5, (margins > 0).to(margins.dtype))


def detached(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach() for key, value in metrics.items()}


def pair_metrics(out: LossOutput, policy: PairLogps, reference: Optional[PairLogps], beta: float) -> dict[str, Tensor]:
    """The metrics of :mod:`tiltlm.metrics`, per pair. A pair's accuracy is 1/2 when its margin is within
    rounding noise (TIE_TOLERANCE) of the size of its log-probs: at step 0 it is exactly 0.5."""
    margins = out.chosen_rewards - out.rejected_rewards
    size = policy.chosen.abs() + policy.rejected.abs()
    if reference is not None:
        size = size + reference.chosen.abs() + reference.rejected.abs()
    metrics = {"loss": out.losses, "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
               "rewards/margins": margins, "rewards/accuracies": correct_or_tie(margins, beta * size),
               "logps/chosen": policy.chosen, "logps/rejected": policy.rejected}
    if reference is not None:
        metrics["logps/chosen_change"] = policy.chosen - reference.chosen
    return detached(metrics)


@dataclass(frozen=True)
class PairObjective(PolicyScored):
    collate: Collate
    params: LossParams
    names: tuple[str, ...] = ("sigmoid",)
    weights: tuple[float, ...] = (1.0,)
    chunk_size: int = 256
    progress_keys = ("rewards/accuracies", "rewards/margins")
    precomputable = True

    @property
    def needs_reference(self) -> bool:
        return needs_reference(self.names)

    @staticmethod
    def length(pair) -> int:
        return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)

    def __call__(self, policy: Scores, reference: Optional[Scores], batch: Batch) -> Scored:
        policy_logps = split_pairs(*policy, batch.num_pairs)
        reference_logps = split_pairs(*reference, batch.num_pairs) if reference is not None else None
        out = preference_loss(policy_logps, reference_logps, self.params, self.names, self.weights)
        out = LossOutput(weighted(out.losses, batch), out.chosen_rewards, out.rejected_rewards)
        return Scored(out.losses, pair_metrics(out, policy_logps, reference_logps, self.params.beta))


# --- ranked lists and unpaired rows: prompts with several completions ----------------------------------------


@dataclass(frozen=True)
class CompletionsObjective(PolicyScored):
    """Prompts with several completions each, scored against the prompt laid out once (each completion sees
    the prompt and itself, not its siblings), with the implicit rewards ``beta * (log pi - log pi_ref)``."""

    pad_id: int
    beta: float = 0.1
    layout: str = "packed"
    pack_tokens: int = 0
    chunk_size: int = 256
    needs_reference = True

    def rows_batch(self, examples: list[PromptCompletions], rows: Sequence, **extra) -> RowBatch:
        """``packed`` and ``shared`` with the prompt once, ``concatenated`` one row per completion
        (``[prompt | completion]``), with the same sequence ids; with the rows' weights and ``extra``."""
        if self.layout == "concatenated":
            singles = [PromptCompletions(e.prompt_ids, [c], [s], e.source)
                       for e in examples for c, s in zip(e.completions, e.sequence_ids)]
            batch = collate_prompt_completions(singles, self.pad_id)
            batch.num_pairs, batch.sources = len(examples), tuple(e.source for e in examples)
        else:
            batch = collate_prompt_completions(examples, self.pad_id,
                                               self.pack_tokens if self.layout == "packed" else None)
        return with_rows(batch, rows, **extra)


def list_metrics(losses: Tensor, rewards: Tensor, logps: Tensor, size: Tensor, ranks: Tensor,
                 mask: Tensor) -> dict[str, Tensor]:
    """Per list, what :func:`pair_metrics` gives for K = 2: mean rewards of the best and the worst ranked
    completions; accuracy and mean margin over its ordered pairs (``size``: beta |log-probs| of each
    completion, for ties); the mean policy log-prob."""
    real = mask.to(rewards.dtype)
    best = (ranks == ranks.masked_fill(~mask, 1 << 30).amin(dim=1, keepdim=True)) & mask
    worst = (ranks == ranks.masked_fill(~mask, -1).amax(dim=1, keepdim=True)) & mask
    # (a, b) where both completions exist and a is ranked strictly above b
    pairs = (mask[:, :, None] & mask[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])).to(rewards.dtype)
    margins = rewards[:, :, None] - rewards[:, None, :]
    sizes = size[:, :, None] + size[:, None, :]
    per_list = pairs.sum(dim=(1, 2)).clamp(min=1)
    return detached({"loss": losses,
                     "rewards/best": (rewards * best).sum(1) / best.sum(1),
                     "rewards/worst": (rewards * worst).sum(1) / worst.sum(1),
                     "rewards/accuracies": (correct_or_tie(margins, sizes) * pairs).sum(dim=(1, 2)) / per_list,
                     "rewards/margins": (margins * pairs).sum(dim=(1, 2)) / per_list,
                     "logps/mean": (logps * real).sum(1) / real.sum(1)})


@dataclass(frozen=True)
class ListObjective(CompletionsObjective):
    """Ranked lists, one example per prompt, under :func:`tiltlm.losses.plackett_luce` (Rafailov et al.
    2023, Appendix A.3)."""

    progress_keys = ("rewards/accuracies", "rewards/margins")
    precomputable = True  # refcache.py: one table row per list, 2 K columns

    def collate(self, lists: list[TokenizedList]) -> RowBatch:
        """Completion k of list i is sequence ``offset_i + k``: list after list, as stack_lists reads them."""
        counts = tuple(len(item.completions) for item in lists)
        examples = [PromptCompletions(item.prompt_ids, item.completions, list(range(start, start + k)), item.source)
                    for item, start, k in zip(lists, itertools.accumulate(counts, initial=0), counts)]
        flat = torch.tensor([r for item in lists for r in item.ranks()], dtype=torch.long)
        ranks, _ = stack_lists(flat, list(counts))
        return self.rows_batch(examples, lists, ranks=ranks, counts=counts)

    @staticmethod
    def length(item: TokenizedList) -> int:
        return len(item.prompt_ids) + sum(len(c) for c in item.completions)

    def __call__(self, policy: Scores, reference: Optional[Scores], batch: RowBatch) -> Scored:
        if reference is None:
            raise ValueError("ranked lists need reference log-probs (their rewards are beta log pi/pi_ref)")
        counts = list(batch.counts)
        logps, mask = stack_lists(policy[0], counts)
        reference_logps, _ = stack_lists(reference[0], counts)
        rewards = list_rewards(logps, reference_logps, self.beta)
        losses = weighted(plackett_luce(rewards, mask, batch.ranks), batch)
        size = self.beta * (logps.abs() + reference_logps.abs())
        return Scored(losses, list_metrics(losses, rewards, logps, size, batch.ranks, mask))


# --- unpaired rows (KTO) ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnpairedObjective(CompletionsObjective):
    """(prompt, completion, label) rows under KTO (:func:`tiltlm.losses.kto`, Ethayarajh et al. 2024, eq. 8).

    The reference point z0 (:func:`tiltlm.losses.kto_reference_point`) is estimated per micro-batch from
    row i's prompt with row i+1's completion (:func:`tiltlm.data.tokenize.mismatched_unpaired`), riding in
    the same forward as extra completions: sequence i is row i, n + i its mismatched pair. Under DDP it is
    per rank (no collective; an unbiased mean before the clamp). A lone row (an eval set's last) has z0 = 0,
    its value at step 0.
    """

    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    max_length: int = field(kw_only=True)  # a mismatched completion is cut to fit
    progress_keys = ("rewards/accuracies", "kl")
    precomputable = False  # z0's mismatched pairs depend on the micro-batch: no table can hold them

    def collate(self, rows: list[TokenizedUnpaired]) -> RowBatch:
        n = len(rows)
        others = mismatched_unpaired(rows, self.max_length) if n >= 2 else []
        examples = [PromptCompletions(row.prompt_ids, [row.completion_ids], [i], row.source)
                    for i, row in enumerate(rows)]
        for i, other in enumerate(others):  # sequence n + i: row i's prompt, row i + 1's completion
            examples[i].completions.append(other.completion_ids)
            examples[i].sequence_ids.append(n + i)
        return self.rows_batch(examples, rows, desirable=torch.tensor([row.label for row in rows], dtype=torch.bool))

    @staticmethod
    def length(row: TokenizedUnpaired) -> int:
        return len(row.prompt_ids) + 2 * len(row.completion_ids)  # its own completion and a mismatched one

    def __call__(self, policy: Scores, reference: Optional[Scores], batch: RowBatch) -> Scored:
        if reference is None:
            raise ValueError("KTO needs reference log-probs")
        n = batch.num_pairs
        logps, reference_logps = policy[0][:n], reference[0][:n]
        z0 = (kto_reference_point(policy[0][n:], reference[0][n:]) if batch.sequences > n
              else logps.new_zeros(()))
        desirable = batch.desirable
        losses = weighted(kto(logps, reference_logps, desirable, z0, self.beta, self.desirable_weight,
                              self.undesirable_weight), batch)
        # beta (r - z0) signed by the label: positive where the policy follows it (the quantity KTO's sigmoid reads)
        signed = self.beta * torch.where(desirable, logps - reference_logps - z0, z0 - logps + reference_logps)
        size = self.beta * (logps.abs() + reference_logps.abs())
        return Scored(losses, detached({"loss": losses, "rewards/margins": signed,
                                        "rewards/accuracies": correct_or_tie(signed, size), "kl": z0.expand(n),
                                        "logps/completion": logps}))


# --- reward models ------------------------------------------------------------------------------------------


class RewardScores(nn.Module):
    """Batch -> one reward per sequence (:func:`tiltlm.reward_model.score_sequences`); the module DDP wraps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tensor:
        from tiltlm.reward_model import score_sequences

        return score_sequences(self.model, batch, batch.sequences)


@dataclass(frozen=True)
class RewardModelObjective:
    """A Bradley-Terry reward model trained on pairs (:func:`tiltlm.losses.bradley_terry_reward_loss`:
    Ouyang et al. 2022 eq. 1, optional Llama 2 margin, optional centring), no reference. The model is an
    ``AutoModelForSequenceClassification`` with one output (:meth:`load`); ``margin`` is Llama 2's m, the
    same for every pair (the data formats carry no per-pair margin)."""

    collate: Collate
    tokenizer: object
    margin: float = 0.0
    centering: float = 0.0
    max_length: int = 1024
    max_prompt_length: int = 512
    progress_keys = ("rewards/accuracies", "rewards/margins")
    needs_reference = False
    precomputable = False
    length = staticmethod(PairObjective.length)

    def load(self, name: str, dtype: torch.dtype, trust_remote_code: bool = False, attention: str = "auto",
             device: torch.device | str | None = None) -> nn.Module:
        """The reward model with the attention kernel chosen as for a policy, marked as tiltlm's (its
        config records how texts were tokenised, so :func:`tiltlm.rewards.load_reward` scores them the same)."""
        from tiltlm.models import choose_attention, set_attention
        from tiltlm.reward_model import load_reward_model

        model = load_reward_model(name, self.tokenizer, dtype, trust_remote_code)
        set_attention(model, choose_attention(model, attention, device))
        model.config.tiltlm_reward = {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length}
        return model

    def scorer(self, model: nn.Module) -> nn.Module:
        return RewardScores(model)

    def __call__(self, policy: Tensor, reference: None, batch: Batch) -> Scored:
        p = batch.num_pairs
        chosen, rejected = policy[:p], policy[p:]
        margin = chosen.new_full((p,), self.margin) if self.margin else None
        losses = weighted(bradley_terry_reward_loss(chosen, rejected, margin, self.centering), batch)
        margins = chosen - rejected
        return Scored(losses, detached({"loss": losses, "rewards/chosen": chosen, "rewards/rejected": rejected,
                                        "rewards/margins": margins, "rewards/mean": (chosen + rejected) / 2,
                                        "rewards/accuracies": correct_or_tie(margins, chosen.abs() + rejected.abs())}))


# --- choosing ------------------------------------------------------------------------------------------------


def data_kind(examples: Sequence) -> str:
    """``pairs``, ``ranked lists`` or ``unpaired``: the kind of a dataset's rows (one kind per dataset)."""
    return KINDS[type(examples[0])] if examples else "pairs"


def make_objective(config: TrainConfig, tokenizer, kind: str = "pairs"):
    """The objective for ``config`` and rows of ``kind`` (:func:`data_kind`). Ranked lists reach here as
    pairs already when ``config.pairs`` is ``all`` (step.read_examples expands them)."""
    pad, pack = tokenizer.pad_token_id, config.pack_tokens or config.max_length
    collate = partial(collate_weighted, collate=make_collate(config.layout, pad, pack))
    if config.objective == "reward-model":
        if kind != "pairs":
            raise ConfigError(f"objective = reward-model trains on pairs (or ranked lists), not {kind} rows")
        return RewardModelObjective(collate, tokenizer, config.reward_margin, config.reward_centering,
                                    config.max_length, config.max_prompt_length)
    if kind != "pairs" and config.loss != "sigmoid":
        instead = "Plackett-Luce (or --pairs all: their pairs with that loss)" if kind == "ranked lists" else "KTO"
        raise ConfigError(f"loss = {config.loss!r} is a pair loss; {kind} rows train with {instead}")
    if kind == "ranked lists":
        return ListObjective(pad, config.beta, config.layout, pack, config.logprob_chunk)
    if kind == "unpaired":
        if config.batch_size < 2:
            raise ConfigError("batch_size = 1: KTO estimates its reference point from mismatched rows of a "
                              "micro-batch; expected batch_size >= 2")
        return UnpairedObjective(pad, config.beta, config.layout, pack, config.logprob_chunk,
                                 config.kto_desirable_weight, config.kto_undesirable_weight, max_length=config.max_length)
    params, names, weights = loss_setup(config)
    return PairObjective(collate, params, names, weights, config.logprob_chunk)
