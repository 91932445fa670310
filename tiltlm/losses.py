"""Preference losses: pure functions from summed completion log-probs and token counts per pair
(:mod:`tiltlm.logprobs`) to one loss per pair (the caller averages) and the implicit rewards it logs.

Notation: sigma is the logistic function, ``pi`` the policy, ``pi_ref`` the reference, ``y_w`` the
chosen (preferred) and ``y_l`` the rejected completion of prompt ``x``.
"""

from __future__ import annotations

import math
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
    ipo_average: bool = True  # ipo: length-averaged log-ratios (see :func:`ipo`)
    simpo_gamma: float = 1.0  # simpo: the target reward margin gamma (see :func:`simpo`)
    orpo_lambda: float = 0.1  # orpo: weight of the odds-ratio term (see :func:`orpo`)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7).

    The KL-regularised objective ``max_pi E[r] - beta KL(pi || pi_ref)`` has the optimum
    ``pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x)`` (eq. 4), so ``r(x,y) = beta log pi*(y|x)/pi_ref(y|x)
    + beta log Z(x)`` (eq. 5). Under Bradley-Terry, ``P(y_w > y_l | x) = sigma(r(x,y_w) - r(x,y_l))``, the
    ``beta log Z(x)`` cancels, and the negative log-likelihood with implicit rewards
    ``r_hat(y) = beta (log pi(y|x) - log pi_ref(y|x))`` is ``-log sigma(r_hat(y_w) - r_hat(y_l))`` (eq. 7).
    With ``label_smoothing = eps > 0``, conservative DPO (Mitchell 2023, "A note on DPO with noisy
    preferences": each label flipped with probability eps)::

        loss = -(1 - eps) log sigma(h) - eps log sigma(-h),   h = r_hat(y_w) - r_hat(y_l)

    ``logsigmoid`` keeps both terms finite (``log(sigmoid(h))`` is -inf below h = -88 in float32).
    Returns ``(losses, chosen_rewards, rejected_rewards)``, the rewards detached.
    """
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    margin = chosen_rewards - rejected_rewards
    losses = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# --- shared pieces -----------------------------------------------------------------------------------


def _average(logps: Tensor, tokens: Tensor) -> Tensor:
    """Per-token mean log-prob; an empty completion (sum 0) gets mean 0, not NaN."""
    return logps / tokens.clamp(min=1).to(logps.dtype)


def _log_ratios(policy: PairLogps, reference: PairLogps, average: bool = False) -> tuple[Tensor, Tensor]:
    chosen = policy.chosen - reference.chosen
    rejected = policy.rejected - reference.rejected
    if average:
        return _average(chosen, policy.chosen_tokens), _average(rejected, policy.rejected_tokens)
    return chosen, rejected


def _averages(policy: PairLogps) -> tuple[Tensor, Tensor]:
    return _average(policy.chosen, policy.chosen_tokens), _average(policy.rejected, policy.rejected_tokens)


def _scaled(beta: float, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    return (beta * chosen).detach(), (beta * rejected).detach()


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate over the whole range (Maechler 2012, "Accurately
    computing log(1 - exp(-|a|))"): ``log(-expm1(x))`` for ``x > -log 2``, ``log1p(-exp(x))`` below.
    Each branch sees only inputs where it is finite (``torch.where`` back-propagates ``0 * inf = NaN``
    through the other), and ``x`` is clamped a hair below 0, where the gradient is infinite."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = torch.log(-torch.expm1(x.clamp(min=-math.log(2.0))))
    far = torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0))))
    return torch.where(x > -math.log(2.0), near_zero, far)


# --- the losses (a reference-needing one is called with reference log-probs: :class:`Loss` checks) -------


def sigmoid(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """DPO (eq. 7 of Rafailov et al. 2023), with conservative label smoothing; see :func:`dpo_loss`."""
    return LossOutput(*dpo_loss(policy.chosen, policy.rejected, reference.chosen, reference.rejected,
                                beta=params.beta, label_smoothing=params.label_smoothing))


def robust(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """Robust DPO (Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models with
    Noisy Feedback"): the rDPO loss, unbiased when each label is flipped with known probability
    ``eps = label_smoothing``::

        loss = ((1 - eps) * -log sigma(h) - eps * -log sigma(-h)) / (1 - 2 eps),
        h = beta * (log-ratio(y_w) - log-ratio(y_l))

    Unbiased: ``(1 - eps) L(h) + eps L(-h) = -log sigma(h)``. Unlike cDPO it is not bounded below.
    """
    eps = params.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"the robust loss needs 0 <= label_smoothing < 0.5, got {eps}")
    chosen, rejected = _log_ratios(policy, reference)
    h = params.beta * (chosen - rejected)
    losses = ((1.0 - eps) * -F.logsigmoid(h) - eps * -F.logsigmoid(-h)) / (1.0 - 2.0 * eps)
    return LossOutput(losses, *_scaled(params.beta, chosen, rejected))


def ipo(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17), with ``tau = beta``::

        loss = (h - 1 / (2 tau))^2,   h = log-ratio(y_w) - log-ratio(y_l)

    A finite target where DPO pushes ``h`` to infinity, so the KL keeps its grip. ``ipo_average`` (default)
    uses per-token log-ratios, else tau's strength depends on length (the target is 0.017 nats a token over
    300 tokens at tau = 0.1), as the IPO authors advised when TRL's summed IPO was found wrong (TRL pull
    request 1265, the "pref-tuning" blog post); summed is the paper read literally (:mod:`tiltlm.verify`).
    Reported rewards: ``beta`` times those log-ratios, so the target margin logs as 0.5.
    """
    chosen, rejected = _log_ratios(policy, reference, average=params.ipo_average)
    losses = (chosen - rejected - 1.0 / (2.0 * params.beta)) ** 2
    return LossOutput(losses, *_scaled(params.beta, chosen, rejected))


def hinge(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """The SLiC-HF rank calibration loss (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration
    with Human Feedback"), in the reference-normalised form TRL uses::

        loss = max(0, 1 - beta * h),   h = log-ratio(y_w) - log-ratio(y_l)

    SLiC's ``max(0, delta - log pi(y_w|x) + log pi(y_l|x))`` times ``beta``, with ``delta = 1/beta`` and
    log-probs against the reference; its NLL term is left to a combination such as ``hinge,nll``.
    """
    chosen, rejected = _log_ratios(policy, reference)
    losses = torch.relu(1.0 - params.beta * (chosen - rejected))
    return LossOutput(losses, *_scaled(params.beta, chosen, rejected))


def simpo(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """SimPO (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward"), reference-free, with ``avg`` the per-token mean and ``gamma = simpo_gamma``::

        loss = -log sigma(beta * (avg log pi(y_w|x) - avg log pi(y_l|x)) - gamma)

    Reported reward: ``beta * avg log pi(y|x)``. The paper's beta is around 2-2.5 (``--beta 2.0``), not
    DPO's 0.1, with ``gamma / beta`` around 0.5.
    """
    chosen, rejected = _averages(policy)
    losses = -F.logsigmoid(params.beta * (chosen - rejected) - params.simpo_gamma)
    return LossOutput(losses, *_scaled(params.beta, chosen, rejected))


def orpo(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """ORPO (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", eq. 6-7), reference-free: supervised NLL on the chosen completion plus an odds-ratio
    penalty, with ``P(y|x)`` the per-token mean likelihood ``exp(avg log pi(y|x))`` of the paper::

        log odds(y) = avg log pi(y|x) - log(1 - exp(avg log pi(y|x)))
        loss        = -avg log pi(y_w|x) - lambda * log sigma(log odds(y_w) - log odds(y_l))

    ``lambda = orpo_lambda`` (TRL's ``beta``, default 0.1); ``beta`` only scales the reported rewards,
    ``beta * avg log pi(y|x)``. :func:`log1mexp` keeps precision as a likelihood nears one.
    """
    chosen, rejected = _averages(policy)
    log_odds_ratio = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    losses = -chosen - params.orpo_lambda * F.logsigmoid(log_odds_ratio)
    return LossOutput(losses, *_scaled(params.beta, chosen, rejected))


def nll(policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
    """``-log pi(y_w|x) / |y_w|``, the NLL term of RPO (Pang et al. 2024, "Iterative Reasoning Preference
    Optimization"): in ``--loss sigmoid,nll`` it keeps DPO from lowering the chosen likelihood while it
    widens the margin (likelihood displacement). Reported rewards: DPO's with a reference, else SimPO's.
    """
    reported = _averages(policy) if reference is None else _log_ratios(policy, reference)
    return LossOutput(-_average(policy.chosen, policy.chosen_tokens), *_scaled(params.beta, *reported))


def apo_zero(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", eq. 7), for chosen completions better than the model's own outputs::

        loss = (1 - sigma(beta * r_w)) + sigma(beta * r_l),   r = log-ratio
    """
    chosen, rejected = _log_ratios(policy, reference)
    b = params.beta
    losses = (1.0 - torch.sigmoid(b * chosen)) + torch.sigmoid(b * rejected)
    return LossOutput(losses, *_scaled(b, chosen, rejected))


def apo_down(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8), for chosen completions worse than the model's own
    outputs: lower both likelihoods, the rejected one more::

        loss = sigma(beta * r_w) + (1 - sigma(beta * (r_w - r_l))),   r = log-ratio
    """
    chosen, rejected = _log_ratios(policy, reference)
    b = params.beta
    losses = torch.sigmoid(b * chosen) + (1.0 - torch.sigmoid(b * (chosen - rejected)))
    return LossOutput(losses, *_scaled(b, chosen, rejected))


EXO_DEFAULT_EPS = 1e-3


def exo(policy: PairLogps, reference: PairLogps, params: LossParams) -> LossOutput:
    """Pairwise EXO (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    eq. 16): the reverse KL from ``(sigma(h), sigma(-h))`` to the label distribution ``(1 - eps, eps)``::

        loss = sigma(h) (log sigma(h) - log(1 - eps)) + sigma(-h) (log sigma(-h) - log eps),
        h = beta * (log-ratio(y_w) - log-ratio(y_l))

    minimal at the finite margin ``h = log((1 - eps) / eps)``. ``eps = label_smoothing``, 0 meaning the
    paper's ``1e-3`` (``log eps`` is infinite at 0).
    """
    eps = params.label_smoothing if params.label_smoothing > 0 else EXO_DEFAULT_EPS
    chosen, rejected = _log_ratios(policy, reference)
    h = params.beta * (chosen - rejected)
    # sigma(h) * logsigmoid(h), not sigma(h) * log(sigma(h)): at h = -1e4 the latter is 0 * -inf.
    losses = (torch.sigmoid(h) * (F.logsigmoid(h) - math.log(1.0 - eps))
              + torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(eps)))
    return LossOutput(losses, *_scaled(params.beta, chosen, rejected))


# --- registry and combination ------------------------------------------------------------------------


@dataclass(frozen=True)
class Loss:
    """A loss and what a trainer needs to know of it: whether it needs reference log-probs (if no loss of a
    run does, no reference is loaded), acts on per-token means rather than sums, reads ``label_smoothing``."""

    fn: Callable[..., LossOutput]
    needs_reference: bool = True
    per_token: bool = False
    uses_label_smoothing: bool = False

    def __call__(self, policy: PairLogps, reference: PairLogps | None, params: LossParams) -> LossOutput:
        if reference is None and self.needs_reference:
            raise ValueError(f"the {self.fn.__name__!r} loss needs reference log-probs, but none were given "
                             f"(reference-free losses: {', '.join(sorted(REFERENCE_FREE))})")
        return self.fn(policy, reference, params)


# name -> loss; the CLI's --loss chooses from these. "sigmoid" is DPO, under the name TRL gave it.
LOSSES: dict[str, Loss] = {
    "sigmoid": Loss(sigmoid, uses_label_smoothing=True),
    "robust": Loss(robust, uses_label_smoothing=True),
    "ipo": Loss(ipo, per_token=True),
    "hinge": Loss(hinge),
    "simpo": Loss(simpo, needs_reference=False, per_token=True),
    "orpo": Loss(orpo, needs_reference=False, per_token=True),
    # nll uses a reference only, when given, for the rewards it reports
    "nll": Loss(nll, needs_reference=False, per_token=True),
    "apo_zero": Loss(apo_zero),
    "apo_down": Loss(apo_down),
    "exo": Loss(exo, uses_label_smoothing=True),
}

REFERENCE_FREE: frozenset[str] = frozenset(name for name, loss in LOSSES.items() if not loss.needs_reference)


def needs_reference(names: tuple[str, ...]) -> bool:
    return any(LOSSES[name].needs_reference for name in names)


def preference_loss(policy: PairLogps, reference: PairLogps | None, params: LossParams,
                    names: tuple[str, ...] = ("sigmoid",), weights: tuple[float, ...] = (1.0,)) -> LossOutput:
    """A weighted sum of named losses from :data:`LOSSES`, e.g. DPO + NLL (RPO), reporting the rewards
    of the first loss in ``names``."""
    unknown = [name for name in names if name not in LOSSES]
    if unknown or not names:
        raise ValueError(f"unknown loss {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"valid names: {', '.join(LOSSES)}")
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} losses ({','.join(names)}) but {len(weights)} weights")
    outputs = [LOSSES[name](policy, reference, params) for name in names]
    total = sum(w * out.losses for w, out in zip(weights, outputs))
    return LossOutput(total, outputs[0].chosen_rewards, outputs[0].rejected_rewards)


# --- beyond pairs (plain tensors: K completions, one, or reward-model scores), one loss per row ----------


def list_rewards(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> Tensor:
    """The implicit rewards ``beta * (log pi(y|x) - log pi_ref(y|x))`` (DPO paper, eq. 5 without its
    ``beta log Z(x)``, which cancels from every ranking likelihood) of any shape, e.g. [rows, K]."""
    return beta * (policy_logps - reference_logps)


def stack_lists(values: Tensor, counts: list[int]) -> tuple[Tensor, Tensor]:
    """Values laid list after list (``counts[i]`` for list ``i``) as a padded [lists, K_max] tensor
    (padding 0) and its bool mask: the input form of :func:`plackett_luce` (rewards, ranks)."""
    k_max = max(counts)
    counts_t = torch.tensor(counts, device=values.device)
    mask = torch.arange(k_max, device=values.device)[None, :] < counts_t[:, None]
    padded = values.new_zeros(len(counts), k_max).masked_scatter(mask, values)
    return padded, mask


def plackett_luce(rewards: Tensor, mask: Tensor, ranks: Tensor) -> Tensor:
    """Negative log-likelihood of each row's ranking of its completions under Plackett-Luce (DPO paper,
    Rafailov et al. 2023, Appendix A.3: the model is eq. 18; substituting the implicit reward of eq. 5
    into it gives the DPO objective over rankings that closes that appendix).

    ``rewards``, ``mask`` (which completions exist) and ``ranks`` (0 the best) are [rows, K_max]. For a
    strict ranking ``tau``, per completion ``i``: ``-(r_i - logsumexp{r_j : rank_j >= rank_i})``::

        P(tau) = prod_{k=1..K} exp(r_tau(k)) / sum_{j=k..K} exp(r_tau(j))                     (eq. 18)
        loss   = -sum_{k=1..K} [ r_tau(k) - log sum_{j>=k} exp(r_tau(j)) ]         (A.3's objective)

    For K = 2 this is DPO's eq. 7. Ties follow Breslow's approximation for tied events in Cox's partial
    likelihood (Breslow 1974, "Covariance analysis of censored survival data"): a tied group shares one
    denominator, over the group and everything below, so a tie says "these beat everything below" and
    nothing about each other.
    """
    valid_j = mask[:, None, :]
    # eligible[n, i, j]: completion j is still "in the urn" when completion i is drawn. The diagonal is
    # always eligible so that padded i have a finite log-sum-exp (their term is masked out afterwards;
    # an all -inf log-sum-exp would back-propagate NaN even through a masked term).
    eligible = (valid_j & (ranks[:, None, :] >= ranks[:, :, None])) | torch.eye(
        rewards.shape[1], dtype=torch.bool, device=rewards.device)
    pool = rewards[:, None, :].expand(-1, rewards.shape[1], -1).masked_fill(~eligible, float("-inf"))
    terms = rewards - torch.logsumexp(pool, dim=-1)
    return -(terms * mask.to(rewards.dtype)).sum(dim=-1)


def kto_reference_point(kl_policy_logps: Tensor, kl_reference_logps: Tensor) -> Tensor:
    """KTO's reference point ``z_0`` (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization", Section 4): ``z_0 = KL(pi(y'|x) || pi_ref(y'|x))``, estimated as::

        z_0_hat = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])

    over *mismatched* prompt/completion pairs (:func:`tiltlm.data.tokenize.mismatched_unpaired`), clamped
    at 0 (a KL is not negative; the estimate can be), detached as in the paper.
    """
    return (kl_policy_logps - kl_reference_logps).detach().mean().clamp(min=0.0)


def kto(policy_logps: Tensor, reference_logps: Tensor, desirable: Tensor, z0: Tensor | float, beta: float = 0.1,
        lambda_d: float = 1.0, lambda_u: float = 1.0) -> Tensor:
    """The KTO loss (Ethayarajh et al. 2024, eq. 8), one value per unpaired row::

        r(x, y) = log pi(y|x) - log pi_ref(y|x)
        v(x, y) = lambda_D sigma(beta (r(x, y) - z_0))    if y is desirable
                  lambda_U sigma(beta (z_0 - r(x, y)))    if y is undesirable
        loss    = lambda_y - v(x, y)

    The paper recommends ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3] for imbalanced classes.
    """
    ratio = policy_logps - reference_logps
    lam_d = torch.full_like(ratio, lambda_d)
    lam_u = torch.full_like(ratio, lambda_u)
    value = torch.where(desirable, lam_d * torch.sigmoid(beta * (ratio - z0)),
                        lam_u * torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable, lam_d, lam_u) - value


def bradley_terry_reward_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None,
                              centering: float = 0.0) -> Tensor:
    """Reward-model loss, one value per pair: Bradley-Terry's negative log-likelihood (Ouyang et al.
    2022, "Training language models to follow instructions with human feedback", eq. 1), with the
    optional per-pair margin of Llama 2 (Touvron et al. 2023, Section 3.2.2, eq. 2) and the optional
    reward-centring term of Eisenstein et al. 2023 ("Helping or Herding? Reward Model Ensembles
    Mitigate but do not Eliminate Reward Hacking", Section 3)::

        loss = -log sigma(r_w - r_l - m(r)) + centering * (r_w + r_l)^2

    Centring makes rewards comparable across prompts (Bradley-Terry fixes them only up to a per-prompt constant).
    """
    difference = r_chosen - r_rejected
    if margin is not None:
        difference = difference - margin.to(difference.dtype)
    losses = -F.logsigmoid(difference)
    if centering:
        losses = losses + centering * (r_chosen + r_rejected) ** 2
    return losses
