"""Preference losses: pure functions from sequence log-probs to per-pair losses and rewards.

Every loss here has one signature::

    loss(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput

``policy`` and ``reference`` hold, for each pair, the summed log-probability of the chosen and the
rejected completion and their token counts (see :mod:`tiltlm.logprobs`). The loss returns one value
per pair (the caller averages) and the implicit rewards it logs. Nothing here knows about models,
tokenizers or batches.

Notation: sigma is the logistic function, ``pi`` the policy, ``pi_ref`` the reference, ``y_w`` the
chosen (preferred) and ``y_l`` the rejected completion of prompt ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PairLogps:
    """Summed completion log-probs (float32, shape [pairs]) and completion token counts."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


@dataclass
class LossOutput:
    """Per-pair losses (with grad) and the rewards the loss implies (detached), all shape [pairs]."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


@dataclass
class LossParams:
    """Hyper-parameters shared by the loss family; each loss reads the ones it names."""

    beta: float = 0.1
    label_smoothing: float = 0.0


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7).

    Derivation in brief. The KL-regularised objective ``max_pi E[r] - beta KL(pi || pi_ref)`` has the
    optimum ``pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x)`` (eq. 4). Solving for the reward gives
    ``r(x,y) = beta log pi*(y|x)/pi_ref(y|x) + beta log Z(x)`` (eq. 5). Under Bradley-Terry,
    ``P(y_w > y_l | x) = sigma(r(x,y_w) - r(x,y_l))``, so ``beta log Z(x)`` cancels and the negative
    log-likelihood of the preference becomes, with implicit rewards
    ``r_hat(y) = beta (log pi(y|x) - log pi_ref(y|x))``::

        loss = -log sigma(r_hat(y_w) - r_hat(y_l))                                   (eq. 7)

    With ``label_smoothing = eps`` > 0 (conservative DPO, Mitchell 2023, "A note on DPO with noisy
    preferences"), each label is taken to be flipped with probability eps::

        loss = -(1 - eps) log sigma(h) - eps log sigma(-h),   h = r_hat(y_w) - r_hat(y_l)

    ``logsigmoid`` keeps both terms finite for any margin (``log(sigmoid(h))`` underflows to -inf
    for h below about -88 in float32).

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape [pairs]; the rewards are
    detached, for logging.
    """
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    margin = chosen_rewards - rejected_rewards
    losses = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def sigmoid(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """DPO (eq. 7 of Rafailov et al. 2023), with conservative label smoothing; see :func:`dpo_loss`."""
    assert reference is not None, "the sigmoid (DPO) loss needs reference log-probs"
    losses, chosen, rejected = dpo_loss(
        policy.chosen, policy.rejected, reference.chosen, reference.rejected,
        beta=params.beta, label_smoothing=params.label_smoothing,
    )
    return LossOutput(losses, chosen, rejected)


LossFn = Callable[[PairLogps, "PairLogps | None", LossParams], LossOutput]

# name -> loss function; the CLI's --loss chooses from these.
LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid,
}

# Losses that never look at a reference model: with only these, no reference is loaded.
REFERENCE_FREE: set[str] = set()


def preference_loss(
    policy: PairLogps,
    reference: PairLogps | None,
    params: LossParams,
    names: tuple[str, ...] = ("sigmoid",),
    weights: tuple[float, ...] = (1.0,),
) -> LossOutput:
    """A weighted sum of named losses from :data:`LOSSES`, e.g. DPO + 0.5 NLL (RPO).

    The rewards reported are those of the first loss in ``names``.
    """
    outputs = [LOSSES[name](policy, reference, params) for name in names]
    total = sum(w * out.losses for w, out in zip(weights, outputs))
    return LossOutput(total, outputs[0].chosen_rewards, outputs[0].rejected_rewards)
