"""Losses beyond pairs (Plackett-Luce, KTO, reward-model Bradley-Terry) and per-row weights, against
values computed by hand from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from tiltlm.losses import (bradley_terry_reward_loss, dpo_loss, kto, kto_reference_point, list_rewards,
                           plackett_luce, stack_lists)

D = torch.float64


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The step loss the objectives implement: ``sum_i w_i * loss_i / n`` (moved here from tiltlm.losses)."""
    if weights is None:
        return losses.mean()
    return (losses * weights.to(losses.dtype)).sum() / losses.numel()


def t(values, dtype=D) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def lse(*values: float) -> float:
    return math.log(sum(math.exp(v) for v in values))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- Plackett-Luce -------------------------------------------------------------------------------------


def test_plackett_luce_with_two_completions_is_dpo():
    gen = torch.Generator().manual_seed(0)
    policy = torch.randn(50, 2, generator=gen, dtype=D) * 5
    reference = torch.randn(50, 2, generator=gen, dtype=D) * 5
    beta = 0.3
    # the chosen completion is column 1 in half of the rows: the ranking, not the column, says who won
    winner = torch.arange(50) % 2
    ranks = torch.stack([winner, 1 - winner], dim=1)  # rank 0 (best) in the winner's column
    mask = torch.ones(50, 2, dtype=torch.bool)
    pl = plackett_luce(list_rewards(policy, reference, beta), mask, ranks)
    w, lo = winner, 1 - winner
    rows = torch.arange(50)
    dpo, _, _ = dpo_loss(policy[rows, w], policy[rows, lo], reference[rows, w], reference[rows, lo], beta=beta)
    torch.testing.assert_close(pl, dpo, rtol=1e-13, atol=1e-13)


def test_plackett_luce_three_completions_by_hand():
    rewards = t([[0.5, -1.0, 2.0]])
    ranks = torch.tensor([[1, 2, 0]])  # best: completion 2, then 0, then 1
    mask = torch.ones(1, 3, dtype=torch.bool)
    # P = e^2/(e^2+e^.5+e^-1) * e^.5/(e^.5+e^-1) * 1
    expected = -((2.0 - lse(2.0, 0.5, -1.0)) + (0.5 - lse(0.5, -1.0)))
    assert plackett_luce(rewards, mask, ranks).item() == pytest.approx(expected, rel=1e-14)


def test_plackett_luce_probabilities_of_all_rankings_sum_to_one():
    rewards = t([[0.3, -0.7, 1.1]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    total = 0.0
    for order in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        ranks = torch.tensor([[order.index(i) for i in range(3)]])
        total += math.exp(-plackett_luce(rewards, mask, ranks).item())
    assert total == pytest.approx(1.0, rel=1e-14)


def test_plackett_luce_ties_share_one_denominator():
    # ranks 0, 0, 1: the tied best two each divided by everything; the last term is 0 (Breslow)
    rewards = t([[1.0, 0.2, -0.5]])
    ranks = torch.tensor([[0, 0, 1]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    z = lse(1.0, 0.2, -0.5)
    expected = -((1.0 - z) + (0.2 - z))
    assert plackett_luce(rewards, mask, ranks).item() == pytest.approx(expected, rel=1e-14)
    # tied at the bottom: 0 > {1, 2}
    ranks = torch.tensor([[0, 1, 1]])
    expected = -((1.0 - z) + (0.2 - lse(0.2, -0.5)) + (-0.5 - lse(0.2, -0.5)))
    assert plackett_luce(rewards, mask, ranks).item() == pytest.approx(expected, rel=1e-14)


def test_plackett_luce_padding_changes_nothing_and_has_finite_gradients():
    short = t([[0.4, -0.3]])
    padded = t([[0.4, -0.3, 0.0, 0.0], [0.1, 0.9, -2.0, 0.5]]).requires_grad_(True)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    ranks = torch.tensor([[1, 0, 0, 0], [3, 0, 2, 1]])
    losses = plackett_luce(padded, mask, ranks)
    alone = plackett_luce(short, torch.ones(1, 2, dtype=torch.bool), torch.tensor([[1, 0]]))
    assert losses[0].item() == pytest.approx(alone.item(), rel=1e-14)
    expected_second = -((0.9 - lse(0.9, 0.5, -2.0, 0.1)) + (0.5 - lse(0.5, -2.0, 0.1)) + (-2.0 - lse(-2.0, 0.1)))
    assert losses[1].item() == pytest.approx(expected_second, rel=1e-14)
    losses.sum().backward()
    assert torch.isfinite(padded.grad).all()
    assert (padded.grad[0, 2:] == 0).all()


def test_stack_lists_pads_lists_of_different_lengths():
    values = t([1.0, 2.0, 3.0, 4.0, 5.0]).requires_grad_(True)
    padded, mask = stack_lists(values, [2, 3])
    assert padded.tolist() == [[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    ranks, _ = stack_lists(torch.tensor([1, 0, 2, 0, 1]), [2, 3])
    assert ranks.tolist() == [[1, 0, 0], [2, 0, 1]]
    plackett_luce(padded, mask, ranks).sum().backward()  # gradients reach the flat values
    assert values.grad.abs().min() > 0


def test_list_rewards_scale_log_ratios():
    assert list_rewards(t([1.0, -2.0]), t([0.5, 0.5]), 0.2).tolist() == pytest.approx([0.1, -0.5])


# --- KTO -----------------------------------------------------------------------------------------------


def test_kto_by_hand():
    policy, reference = t([-3.0, -5.0, -2.0]), t([-4.0, -4.5, -2.5])
    desirable = torch.tensor([True, False, False])
    beta, lam_d, lam_u, z0 = 0.5, 1.0, 1.5, 0.2
    losses = kto(policy, reference, desirable, z0, beta=beta, lambda_d=lam_d, lambda_u=lam_u)
    ratios = [1.0, -0.5, 0.5]
    expected = [lam_d - lam_d * sig(beta * (ratios[0] - z0)),
                lam_u - lam_u * sig(beta * (z0 - ratios[1])),
                lam_u - lam_u * sig(beta * (z0 - ratios[2]))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-14)


def test_kto_reference_point_is_a_clamped_detached_mean():
    kl_policy = t([-1.0, -2.0, -3.0]).requires_grad_(True)
    kl_reference = t([-1.5, -1.0, -3.2])
    z0 = kto_reference_point(kl_policy, kl_reference)
    # mean of 0.5, -1.0, 0.2 is -0.1: clamped to 0
    assert z0.item() == 0.0 and not z0.requires_grad
    z0 = kto_reference_point(t([-1.0, -2.0, -3.0]), t([-1.5, -2.9, -3.2]))
    assert z0.item() == pytest.approx((0.5 + 0.9 + 0.2) / 3, rel=1e-14)


def test_kto_gradient_does_not_flow_into_the_reference_point():
    policy = t([-3.0, -5.0]).requires_grad_(True)
    reference = t([-4.0, -4.5])
    z0 = kto_reference_point(policy.flip(0), reference.flip(0))  # the mismatched pairs share the policy
    kto(policy, reference, torch.tensor([True, False]), z0, beta=1.0).sum().backward()
    # d/dr [1 - sigma(r - z0)] = -sigma'(r - z0) for the desirable row; sigma'(z0 - r) for the other
    s = lambda x: sig(x) * (1 - sig(x))  # noqa: E731
    z = max(0.0, ((-5.0 + 4.5) + (-3.0 + 4.0)) / 2)
    assert policy.grad.tolist() == pytest.approx([-s(1.0 - z), s(z + 0.5)], rel=1e-12)


# --- Bradley-Terry reward model ------------------------------------------------------------------------


def test_bradley_terry_reward_loss_by_hand():
    r_w, r_l = t([1.5, -0.2]), t([0.5, 0.3])
    assert bradley_terry_reward_loss(r_w, r_l).tolist() == pytest.approx(
        [-math.log(sig(1.0)), -math.log(sig(-0.5))], rel=1e-14)
    with_margin = bradley_terry_reward_loss(r_w, r_l, margin=t([0.25, 1.0]), centering=0.01)
    assert with_margin.tolist() == pytest.approx(
        [-math.log(sig(0.75)) + 0.01 * 2.0 ** 2, -math.log(sig(-1.5)) + 0.01 * 0.1 ** 2], rel=1e-14)


def test_bradley_terry_reward_loss_stays_finite_for_huge_margins():
    losses = bradley_terry_reward_loss(torch.tensor([-1e4]), torch.tensor([1e4]))
    assert losses.item() == pytest.approx(2e4)


# --- weights -------------------------------------------------------------------------------------------


def test_weighted_mean_divides_by_rows():
    losses = t([1.0, 2.0, 4.0])
    assert weighted_mean(losses).item() == pytest.approx(7 / 3)
    assert weighted_mean(losses, t([1.0, 1.0, 1.0])).item() == pytest.approx(7 / 3)
    assert weighted_mean(losses, t([2.0, 0.0, 0.5])).item() == pytest.approx((2 + 0 + 2) / 3)


def test_weight_two_equals_the_row_twice():
    # per-row weights act on the gradient like duplicated rows (up to the row count)
    x = t([0.3, -1.2]).requires_grad_(True)
    weighted_mean(x ** 2, t([2.0, 1.0])).backward()
    twice = t([0.3, 0.3, -1.2]).requires_grad_(True)
    (twice ** 2).sum().backward()
    assert (x.grad * 2).tolist() == pytest.approx([(twice.grad[0] + twice.grad[1]).item(), twice.grad[2].item()])
