"""The loss family against values computed by hand, with plain ``math``, from each paper's formula."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiltlm.config import TrainConfig
from tiltlm.losses import (
    LOSSES,
    REFERENCE_FREE,
    LossParams,
    PairLogps,
    dpo_loss,
    log1mexp,
    needs_reference,
    preference_loss,
)
from tiltlm.metrics import displacement_warning

# (policy chosen, policy rejected, reference chosen, reference rejected, chosen tokens, rejected tokens):
# summed completion log-probs, as tiltlm.logprobs produces them.
PAIRS = [
    (-12.0, -15.0, -13.0, -14.0, 4, 6),
    (-30.5, -22.25, -29.0, -25.0, 10, 5),
    (-3.0, -8.0, -3.5, -7.0, 2, 3),
]


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def logsig(z: float) -> float:
    return math.log(sig(z))


def batch(pairs=PAIRS, dtype=torch.float64, requires_grad=False) -> tuple[PairLogps, PairLogps]:
    cols = list(zip(*pairs))

    def t(values):
        return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)

    tokens_c, tokens_r = torch.tensor(cols[4]), torch.tensor(cols[5])
    policy = PairLogps(t(cols[0]), t(cols[1]), tokens_c, tokens_r)
    reference = PairLogps(torch.tensor(cols[2], dtype=dtype), torch.tensor(cols[3], dtype=dtype), tokens_c, tokens_r)
    return policy, reference


def run(name: str, params: LossParams, pairs=PAIRS):
    policy, reference = batch(pairs)
    return LOSSES[name](policy, reference, params)


def assert_values(actual: torch.Tensor, expected: list[float], tol: float = 1e-12) -> None:
    assert actual.shape == (len(expected),)
    for a, e in zip(actual.tolist(), expected):
        assert a == pytest.approx(e, rel=tol, abs=tol)


def log_ratios(pc, pr, rc, rr):
    return pc - rc, pr - rr


# --- each loss against its paper's formula --------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_sigmoid_is_dpo_eq7_with_conservative_smoothing(eps):
    beta = 0.1
    expected = []
    for pc, pr, rc, rr, _, _ in PAIRS:
        h = beta * ((pc - rc) - (pr - rr))
        expected.append(-(1 - eps) * logsig(h) - eps * logsig(-h))
    out = run("sigmoid", LossParams(beta=beta, label_smoothing=eps))
    assert_values(out.losses, expected)
    assert_values(out.chosen_rewards, [beta * (pc - rc) for pc, _, rc, _, _, _ in PAIRS])
    assert_values(out.rejected_rewards, [beta * (pr - rr) for _, pr, _, rr, _, _ in PAIRS])


def test_robust_is_rdpo():
    beta, eps = 0.2, 0.15
    expected = []
    for pc, pr, rc, rr, _, _ in PAIRS:
        h = beta * ((pc - rc) - (pr - rr))
        expected.append(((1 - eps) * -logsig(h) - eps * -logsig(-h)) / (1 - 2 * eps))
    assert_values(run("robust", LossParams(beta=beta, label_smoothing=eps)).losses, expected)


def test_robust_is_unbiased_over_label_flips():
    # Averaged over a flip with probability eps, the rDPO loss is the clean DPO loss -log sigma(h).
    beta, eps = 0.3, 0.2
    params = LossParams(beta=beta, label_smoothing=eps)
    forward = run("robust", params).losses
    flipped = run("robust", params, [(pr, pc, rr, rc, tr, tc) for pc, pr, rc, rr, tc, tr in PAIRS]).losses
    clean = [-logsig(beta * ((pc - rc) - (pr - rr))) for pc, pr, rc, rr, _, _ in PAIRS]
    assert_values((1 - eps) * forward + eps * flipped, clean)


def test_robust_and_sigmoid_agree_without_noise():
    params = LossParams(beta=0.25, label_smoothing=0.0)
    assert_values(run("robust", params).losses, run("sigmoid", params).losses.tolist())


def test_robust_rejects_eps_of_one_half():
    with pytest.raises(ValueError, match="label_smoothing"):
        run("robust", LossParams(label_smoothing=0.5))


@pytest.mark.parametrize("average", [True, False])
def test_ipo_is_azar_eq17(average):
    tau = 0.1
    expected = []
    for pc, pr, rc, rr, tc, tr in PAIRS:
        if average:
            h = (pc - rc) / tc - (pr - rr) / tr
        else:
            h = (pc - rc) - (pr - rr)
        expected.append((h - 1 / (2 * tau)) ** 2)
    out = run("ipo", LossParams(beta=tau, ipo_average=average))
    assert_values(out.losses, expected)
    pc, _, rc, _, tc, _ = PAIRS[0]
    assert out.chosen_rewards[0].item() == pytest.approx(tau * ((pc - rc) / tc if average else pc - rc))


def test_ipo_is_minimal_at_its_target_margin():
    tau = 0.25
    # log-ratio margin exactly 1/(2 tau) = 2 with summed log-probs: loss 0 and no gradient.
    policy, reference = batch([(-5.0, -7.0, -5.0, -5.0, 3, 3)], requires_grad=True)
    out = LOSSES["ipo"](policy, reference, LossParams(beta=tau, ipo_average=False))
    out.losses.sum().backward()
    assert out.losses.item() == 0.0
    assert policy.chosen.grad.item() == 0.0 and policy.rejected.grad.item() == 0.0


def test_ipo_gradient_matches_hand_derivative():
    # d/d(pc) (h - t)^2 = 2 (h - t) / tc with per-token averaging.
    tau = 0.1
    policy, reference = batch(requires_grad=True)
    LOSSES["ipo"](policy, reference, LossParams(beta=tau)).losses.sum().backward()
    for i, (pc, pr, rc, rr, tc, tr) in enumerate(PAIRS):
        h = (pc - rc) / tc - (pr - rr) / tr
        assert policy.chosen.grad[i].item() == pytest.approx(2 * (h - 1 / (2 * tau)) / tc, rel=1e-12)
        assert policy.rejected.grad[i].item() == pytest.approx(-2 * (h - 1 / (2 * tau)) / tr, rel=1e-12)


def test_hinge_is_slic_hf_calibration():
    beta = 0.5
    expected = [max(0.0, 1 - beta * ((pc - rc) - (pr - rr))) for pc, pr, rc, rr, _, _ in PAIRS]
    assert_values(run("hinge", LossParams(beta=beta)).losses, expected)
    # the pairs cover both sides of the hinge
    assert 0.0 in expected and any(e > 0 for e in expected)


def test_simpo_is_meng_eq6():
    beta, gamma = 2.0, 1.0
    expected = [-logsig(beta * (pc / tc - pr / tr) - gamma) for pc, pr, _, _, tc, tr in PAIRS]
    out = run("simpo", LossParams(beta=beta, simpo_gamma=gamma))
    assert_values(out.losses, expected)
    assert_values(out.chosen_rewards, [beta * pc / tc for pc, _, _, _, tc, _ in PAIRS])
    assert_values(out.rejected_rewards, [beta * pr / tr for _, pr, _, _, _, tr in PAIRS])


def test_orpo_is_hong_eq6():
    lam, beta = 0.1, 0.1
    expected = []
    for pc, pr, _, _, tc, tr in PAIRS:
        p_w, p_l = math.exp(pc / tc), math.exp(pr / tr)  # the paper's per-token mean likelihood
        log_odds_ratio = math.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
        expected.append(-math.log(p_w) - lam * logsig(log_odds_ratio))
    out = run("orpo", LossParams(beta=beta, orpo_lambda=lam))
    assert_values(out.losses, expected, tol=1e-11)
    assert_values(out.chosen_rewards, [beta * pc / tc for pc, _, _, _, tc, _ in PAIRS])


def test_nll_is_length_averaged_chosen_nll():
    beta = 0.1
    expected = [-pc / tc for pc, _, _, _, tc, _ in PAIRS]
    with_ref = run("nll", LossParams(beta=beta))
    assert_values(with_ref.losses, expected)
    assert_values(with_ref.chosen_rewards, [beta * (pc - rc) for pc, _, rc, _, _, _ in PAIRS])
    policy, _ = batch()
    without_ref = LOSSES["nll"](policy, None, LossParams(beta=beta))
    assert_values(without_ref.losses, expected)
    assert_values(without_ref.rejected_rewards, [beta * pr / tr for _, pr, _, _, _, tr in PAIRS])


def test_apo_zero_is_eq7():
    beta = 0.4
    expected = []
    for pc, pr, rc, rr, _, _ in PAIRS:
        r_w, r_l = log_ratios(pc, pr, rc, rr)
        expected.append((1 - sig(beta * r_w)) + sig(beta * r_l))
    assert_values(run("apo_zero", LossParams(beta=beta)).losses, expected)


def test_apo_down_is_eq8():
    beta = 0.4
    expected = []
    for pc, pr, rc, rr, _, _ in PAIRS:
        r_w, r_l = log_ratios(pc, pr, rc, rr)
        expected.append(sig(beta * r_w) + (1 - sig(beta * (r_w - r_l))))
    assert_values(run("apo_down", LossParams(beta=beta)).losses, expected)


@pytest.mark.parametrize("smoothing, eps", [(0.0, 1e-3), (0.2, 0.2)])
def test_exo_is_ji_eq16(smoothing, eps):
    beta = 0.3
    expected = []
    for pc, pr, rc, rr, _, _ in PAIRS:
        p = sig(beta * ((pc - rc) - (pr - rr)))
        # reverse KL between Bernoulli(p) and the label distribution Bernoulli(1 - eps)
        expected.append(p * math.log(p / (1 - eps)) + (1 - p) * math.log((1 - p) / eps))
    assert_values(run("exo", LossParams(beta=beta, label_smoothing=smoothing)).losses, expected, tol=1e-11)


def test_exo_is_minimal_at_log_odds_of_the_labels():
    # KL(Bern(sigma(h)) || Bern(1 - eps)) is 0, with zero gradient, at h = log((1 - eps) / eps).
    beta, eps = 0.5, 0.1
    margin = math.log((1 - eps) / eps) / beta
    policy, reference = batch([(-4.0, -4.0 - margin, -4.0, -4.0, 2, 2)], requires_grad=True)
    out = LOSSES["exo"](policy, reference, LossParams(beta=beta, label_smoothing=eps))
    out.losses.sum().backward()
    assert out.losses.item() == pytest.approx(0.0, abs=1e-15)
    assert policy.chosen.grad.item() == pytest.approx(0.0, abs=1e-15)


# --- DPO identities -----------------------------------------------------------------------------------


def test_dpo_is_log2_with_zero_rewards_when_policy_is_reference():
    logps = torch.tensor([-3.0, -40.0, -0.5])
    losses, chosen, rejected = dpo_loss(logps, logps.flip(0), logps, logps.flip(0), beta=0.1)
    assert torch.equal(losses, torch.full((3,), math.log(2.0), dtype=torch.float32))
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def test_dpo_without_smoothing_is_the_plain_loss():
    beta = 0.1
    policy, reference = batch()
    plain, _, _ = dpo_loss(policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta=beta)
    smoothed_zero, _, _ = dpo_loss(policy.chosen, policy.rejected, reference.chosen, reference.rejected,
                                   beta=beta, label_smoothing=0.0)
    expected = [-logsig(beta * ((pc - rc) - (pr - rr))) for pc, pr, rc, rr, _, _ in PAIRS]
    assert_values(plain, expected)
    assert torch.equal(plain, smoothed_zero)


# --- numerics -----------------------------------------------------------------------------------------

HUGE = [  # margins of +1e4 and -1e4 nats, in the log-ratios and in the per-token means alike
    (-1.0, -1.0 - 1e4, -1.0, -1.0, 1, 1),
    (-1.0 - 1e4, -1.0, -1.0, -1.0, 1, 1),
]


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("pairs", [PAIRS, HUGE], ids=["ordinary", "margin-1e4"])
def test_every_loss_has_finite_value_and_gradient_in_float32(name, pairs):
    policy, reference = batch(pairs, dtype=torch.float32, requires_grad=True)
    params = LossParams(beta=0.1, label_smoothing=0.1)
    out = LOSSES[name](policy, reference, params)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(policy.chosen.grad).all()
    # nll never looks at the rejected completion, so it leaves no gradient there
    assert policy.rejected.grad is None if name == "nll" else torch.isfinite(policy.rejected.grad).all()
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_dpo_loss_at_huge_margins_is_the_asymptote():
    # -log sigma(h) -> 0 as h -> +inf and -> -h as h -> -inf
    out = run("sigmoid", LossParams(beta=0.1), HUGE)
    assert out.losses[0].item() == pytest.approx(0.0, abs=1e-300)
    assert out.losses[1].item() == pytest.approx(1e3, rel=1e-12)


def test_log1mexp_matches_naive_where_naive_is_accurate_and_stays_finite_where_not():
    xs = [-5.0, -1.0, -0.7, -0.6, -0.1, -0.01]
    assert_values(log1mexp(torch.tensor(xs, dtype=torch.float64)), [math.log(1 - math.exp(x)) for x in xs], 1e-12)
    # log(1 - e^x) = log(-x) + O(x) near 0, where the naive form rounds to log(0)
    assert log1mexp(torch.tensor(-1e-20, dtype=torch.float64)).item() == pytest.approx(math.log(1e-20), rel=1e-15)
    # at x = 0 (likelihood one) the value is finite and large negative, the gradient finite
    x = torch.tensor([0.0, -1e-30], requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and (y < -60).all() and torch.isfinite(x.grad).all()


# --- combination and validation -----------------------------------------------------------------------


def test_combination_is_the_weighted_sum_with_first_loss_rewards():
    beta = 0.1
    policy, reference = batch()
    out = preference_loss(policy, reference, LossParams(beta=beta), ("sigmoid", "nll"), (1.0, 0.5))
    expected = [-logsig(beta * ((pc - rc) - (pr - rr))) + 0.5 * (-pc / tc) for pc, pr, rc, rr, tc, _ in PAIRS]
    assert_values(out.losses, expected)
    assert_values(out.chosen_rewards, [beta * (pc - rc) for pc, _, rc, _, _, _ in PAIRS])


def test_combination_of_reference_free_losses_needs_no_reference():
    policy, _ = batch()
    out = preference_loss(policy, None, LossParams(beta=2.0), ("simpo", "nll"), (1.0, 1.0))
    expected = [-logsig(2.0 * (pc / tc - pr / tr) - 1.0) - pc / tc for pc, pr, _, _, tc, tr in PAIRS]
    assert_values(out.losses, expected)


def test_unknown_loss_name_lists_the_valid_ones():
    policy, reference = batch()
    with pytest.raises(ValueError, match="unknown loss 'dpo'.*sigmoid.*exo"):
        preference_loss(policy, reference, LossParams(), ("dpo",), (1.0,))


def test_weight_count_must_match():
    policy, reference = batch()
    with pytest.raises(ValueError, match="2 losses .* 1 weights"):
        preference_loss(policy, reference, LossParams(), ("sigmoid", "nll"), (1.0,))


@pytest.mark.parametrize("name", sorted(set(LOSSES) - REFERENCE_FREE))
def test_reference_needing_loss_without_reference_is_a_clear_error(name):
    policy, _ = batch()
    with pytest.raises(ValueError, match=f"{name}.*reference"):
        preference_loss(policy, None, LossParams(), (name,), (1.0,))
    with pytest.raises(ValueError, match="reference"):
        LOSSES[name](policy, None, LossParams())


def test_reference_free_set():
    assert REFERENCE_FREE == {"simpo", "orpo", "nll"}
    assert not needs_reference(("simpo", "nll")) and needs_reference(("orpo", "sigmoid"))


def test_every_loss_param_is_a_train_config_field():
    cfg = TrainConfig()
    params = LossParams(**{f.name: getattr(cfg, f.name) for f in fields(LossParams)})
    assert params == LossParams()


@settings(max_examples=60, deadline=None)
@given(h=st.floats(-30, 30), eps=st.floats(0.0, 0.45))
def test_robust_unbiasedness_holds_for_any_margin_and_flip_rate(h, eps):
    # one pair with log-ratio margin h (beta = 1), and the same pair with the label flipped
    params = LossParams(beta=1.0, label_smoothing=eps)
    loss = run("robust", params, [(h, 0.0, 0.0, 0.0, 1, 1)]).losses.item()
    loss_flipped = run("robust", params, [(0.0, h, 0.0, 0.0, 1, 1)]).losses.item()
    assert (1 - eps) * loss + eps * loss_flipped == pytest.approx(math.log1p(math.exp(-h)), rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(h=st.floats(-50, 50), eps=st.floats(1e-4, 0.5))
def test_exo_is_a_kl_so_never_negative(h, eps):
    loss = run("exo", LossParams(beta=1.0, label_smoothing=eps), [(h, 0.0, 0.0, 0.0, 1, 1)]).losses.item()
    assert loss >= -1e-12


# --- likelihood displacement ------------------------------------------------------------------------------


def test_displacement_warning_fires_only_when_chosen_falls_and_margin_rises():
    message = displacement_warning(chosen_logps_change=-12.5, margin=3.0, threshold=5.0)
    assert message is not None and "\n" not in message
    assert "--loss sigmoid,nll" in message and "12.50" in message
    assert displacement_warning(-4.0, 3.0, 5.0) is None  # fell, but less than the threshold
    assert displacement_warning(-12.5, -1.0, 5.0) is None  # margin fell too: not displacement
    assert displacement_warning(2.0, 3.0, 5.0) is None  # chosen rose
