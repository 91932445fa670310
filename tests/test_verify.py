"""`tiltlm verify`: every check passes, and its building blocks agree with hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiltlm import verify
from tiltlm.cli import main
from tiltlm.losses import LOSSES, LossParams, PairLogps

EXPECTED_CHECKS = {
    "J(pi*) = beta log Z", "pi* beats perturbations", "DPO reaches pi*", "implicit reward = r + c(x)",
    "KL falls with data", "Z(x) cancels", "gradient = DPO paper's", "KL(pi*||ref) falls with beta",
    "small beta -> argmax r", "DPO margin unbounded (p=1)", "IPO margin -> 1/(2 tau)", "Plackett-Luce reaches pi*",
}


@pytest.fixture(scope="module")
def checks() -> list[verify.Check]:
    return verify.run_checks(seed=0)


def test_every_check_runs_and_passes(checks):
    assert {c.name for c in checks} == EXPECTED_CHECKS
    failed = [f"{c.name}: measured {c.measured!r}, required {c.required} ({c.detail})" for c in checks if not c.passed]
    assert not failed, "\n".join(failed)


def test_measured_figures_are_consistent_with_their_verdicts(checks):
    # The verdict must follow from the figure: a check that passes whatever it measured proves nothing.
    by_name = {c.name: c for c in checks}
    assert by_name["DPO reaches pi*"].measured < 1e-12
    assert by_name["Plackett-Luce reaches pi*"].measured < 1e-12
    assert by_name["implicit reward = r + c(x)"].measured < 1e-9
    assert by_name["pi* beats perturbations"].measured > 0
    assert by_name["small beta -> argmax r"].measured > 0.99
    assert by_name["IPO margin -> 1/(2 tau)"].measured < 1e-8
    assert by_name["DPO margin unbounded (p=1)"].measured > 0.5 * math.log(2) / 0.5


# --- building blocks against plain math ---------------------------------------------------------------


def naive_optimum(ref_logps: list[float], rewards: list[float], beta: float) -> list[float]:
    """pi* = pi_ref exp(r / beta) / Z, term by term."""
    weights = [math.exp(lr + r / beta) for lr, r in zip(ref_logps, rewards)]
    return [w / sum(weights) for w in weights]


def test_optimum_attains_beta_log_z():
    table = verify.make_table(seed=3)
    for x in range(table.rewards.shape[0]):
        ref, r = table.ref_logps[x].tolist(), table.rewards[x].tolist()
        pi = naive_optimum(ref, r, table.beta)
        j = sum(p * (ri - table.beta * (math.log(p) - lr)) for p, ri, lr in zip(pi, r, ref))
        log_z = math.log(sum(math.exp(lr + ri / table.beta) for lr, ri in zip(ref, r)))
        assert j == pytest.approx(table.beta * log_z, rel=1e-12)
        optimum = verify.optimal_logps(table.ref_logps, table.rewards, table.beta)[x].exp().tolist()
        assert optimum == pytest.approx(pi, rel=1e-12)


def expected_loss_at_optimum(table: verify.Table) -> float:
    """At pi*, beta log(pi*/pi_ref) = r - beta log Z, so each pair's DPO margin is exactly r_a - r_b and
    the expected loss is sum_pairs P(a, b) sigma(r_a - r_b) log(1 + exp(-(r_a - r_b)))."""
    total = 0.0
    prompts, responses = table.rewards.shape
    for x in range(prompts):
        ref = [math.exp(v) for v in table.ref_logps[x].tolist()]
        r = table.rewards[x].tolist()
        norm = sum(ref[a] * ref[b] for a in range(responses) for b in range(responses) if a != b)
        for a in range(responses):
            for b in range(responses):
                if a != b:
                    d = r[a] - r[b]
                    total += ref[a] * ref[b] / norm / prompts * (1 / (1 + math.exp(-d))) * math.log1p(math.exp(-d))
    return total


LOSS_AT_OPTIMUM_SEED0 = expected_loss_at_optimum(verify.make_table(seed=0))


@settings(max_examples=40, deadline=None)
@given(shifts=st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4))
def test_partition_function_cancels(shifts):
    table = verify.make_table(seed=0)
    shifted = verify.Table(table.rewards + torch.tensor(shifts, dtype=torch.float64)[:, None],
                           table.ref_logps, table.beta)
    for x in range(4):
        # pi* from the shifted rewards is pi* of the original ones ...
        pi_shifted = verify.optimal_logps(shifted.ref_logps, shifted.rewards, shifted.beta)[x].exp().tolist()
        assert pi_shifted == pytest.approx(naive_optimum(table.ref_logps[x].tolist(), table.rewards[x].tolist(),
                                                         table.beta), rel=1e-9, abs=1e-15)
        # ... and the Bradley-Terry probabilities do not move
        r, rs = table.rewards[x].tolist(), shifted.rewards[x].tolist()
        moved = max(abs(1 / (1 + math.exp(rs[b] - rs[a])) - 1 / (1 + math.exp(r[b] - r[a])))
                    for a in range(6) for b in range(6))
        assert moved < 1e-9
    # the expected DPO loss at the optimum is the same closed-form number for both
    optimum = verify.optimal_logps(shifted.ref_logps, shifted.rewards, shifted.beta)
    assert verify.expected_dpo_loss(optimum, shifted).item() == pytest.approx(LOSS_AT_OPTIMUM_SEED0, rel=1e-9)


def test_dpo_gradient_is_the_papers_for_one_pair():
    # By hand: grad_theta L = -beta sigma(r_hat_l - r_hat_w) ((onehot_w - pi) - (onehot_l - pi)).
    beta = 0.7
    theta_values = [0.3, -1.2, 2.0, 0.5]
    ref_values = [math.log(p) for p in (0.1, 0.2, 0.3, 0.4)]
    w, l = 2, 0
    z = sum(math.exp(t) for t in theta_values)
    pi = [math.exp(t) / z for t in theta_values]
    r_hat = [beta * (math.log(p) - lr) for p, lr in zip(pi, ref_values)]
    coef = -beta / (1 + math.exp(-(r_hat[l] - r_hat[w])))
    expected = [coef * ((i == w) - pi[i] - ((i == l) - pi[i])) for i in range(4)]

    theta = torch.tensor(theta_values, dtype=torch.float64, requires_grad=True)
    logps = torch.log_softmax(theta, dim=-1)
    ref = torch.tensor(ref_values, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.long)
    policy = PairLogps(logps[w].view(1), logps[l].view(1), one, one)
    reference = PairLogps(ref[w].view(1), ref[l].view(1), one, one)
    LOSSES["sigmoid"](policy, reference, LossParams(beta=beta)).losses.sum().backward()
    assert theta.grad.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_analytic_and_autograd_pair_gradients_agree_at_random_logits():
    table = verify.make_table(seed=5)
    theta = torch.randn(table.rewards.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    auto, hand = verify.autograd_pair_gradients(theta, table), verify.analytic_pair_gradients(theta, table)
    assert auto.shape == (4 * 6 * 5, 4, 6)
    assert (auto - hand).abs().max().item() < 1e-12
    assert auto.abs().max().item() > 1e-3  # not trivially zero


def test_kl_falls_with_beta_naively():
    table = verify.make_table(seed=1)
    ref, r = table.ref_logps[0].tolist(), table.rewards[0].tolist()
    kls = []
    for beta in (0.05, 0.1, 0.5, 1.0, 5.0, 50.0):
        pi = naive_optimum(ref, r, beta)
        kls.append(sum(p * (math.log(p) - lr) for p, lr in zip(pi, ref)))
    assert all(later < earlier for earlier, later in zip(kls, kls[1:]))


def test_unidentified_prompts_follows_strong_connectivity():
    shape = torch.Size([2, 3])
    # prompt 0: a cycle 0 > 1 > 2 > 0 (strongly connected); prompt 1: a chain 0 > 1 > 2 (2 never wins)
    x = torch.tensor([0, 0, 0, 1, 1])
    chosen = torch.tensor([0, 1, 2, 0, 1])
    rejected = torch.tensor([1, 2, 0, 1, 2])
    assert verify.unidentified_prompts(x, chosen, rejected, shape) == 1
    # a response never compared leaves its prompt unidentified as well
    assert verify.unidentified_prompts(x[:3], chosen[:3], rejected[:3], shape) == 1


def test_minimise_finds_a_known_minimum():
    # a convex function with a flat direction, like the DPO loss: (t0 - t1 - 1)^2 + exp(t0 - t1) ...
    # minimised over d = t0 - t1 where 2 (d - 1) + e^d = 0
    def loss(t: torch.Tensor) -> torch.Tensor:
        d = t[0] - t[1]
        return (d - 1) ** 2 + torch.exp(d)

    theta = verify.minimise(loss, torch.zeros(2, dtype=torch.float64))
    d = (theta[0] - theta[1]).item()
    assert 2 * (d - 1) + math.exp(d) == pytest.approx(0.0, abs=1e-12)


def test_main_prints_the_table_and_returns_the_verdict(monkeypatch, capsys):
    passing = [verify.Check("a", 1e-12, "< 1e-10", True, "detail a")]
    monkeypatch.setattr(verify, "run_checks", lambda seed=0: passing)
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "check" in out and "measured" in out and "required" in out and "| yes" in out
    monkeypatch.setattr(verify, "run_checks", lambda seed=0: passing + [verify.Check("b", 1.0, "< 0.5", False)])
    assert main(["verify", "--seed", "3"]) == 1
    assert "FAILED: b" in capsys.readouterr().out


# --- Plackett-Luce over rankings of three -----------------------------------------------------------------


def test_expected_plackett_luce_loss_equals_a_plain_loop():
    table = verify.make_table(seed=5, prompts=2, responses=4)
    theta = torch.randn(2, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    logp = torch.log_softmax(theta, dim=-1).tolist()
    ref, r, beta = table.ref_logps.tolist(), table.rewards.tolist(), table.beta
    total = 0.0
    for x in range(2):
        triples = [(a, b, c) for a in range(4) for b in range(4) for c in range(4) if len({a, b, c}) == 3]
        norm = sum(math.exp(ref[x][a] + ref[x][b] + ref[x][c]) for a, b, c in triples)
        for a, b, c in triples:
            # P(set) = 6 ordered draws of it; P(a > b > c) from Plackett-Luce on the true reward
            p_set = 6 * math.exp(ref[x][a] + ref[x][b] + ref[x][c]) / norm / 2
            e = [math.exp(r[x][k]) for k in (a, b, c)]
            p_rank = e[0] / sum(e) * e[1] / (e[1] + e[2])
            h = [beta * (logp[x][k] - ref[x][k]) for k in (a, b, c)]
            nll = -(h[0] - math.log(sum(math.exp(v) for v in h))) - (h[1] - math.log(math.exp(h[1]) + math.exp(h[2])))
            total += p_set * p_rank * nll
    assert verify.expected_plackett_luce_loss(theta, table).item() == pytest.approx(total, rel=1e-12)
    assert verify.ranking_probabilities(table).sum().item() == pytest.approx(1.0, rel=1e-14)


def test_plackett_luce_check_fails_when_rankings_follow_another_reward():
    # rankings drawn from a different reward must not recover pi* of the true one: the check can fail
    table = verify.make_table(seed=0)
    other = verify.Table(table.rewards + 0.5 * torch.randn(table.rewards.shape, dtype=torch.float64,
                                                           generator=torch.Generator().manual_seed(1)),
                         table.ref_logps, table.beta)
    theta = verify.minimise(lambda t: verify.expected_plackett_luce_loss(t, other), table.ref_logps)
    best = verify.optimal_logps(table.ref_logps, table.rewards, table.beta)
    assert verify.kl(best, torch.log_softmax(theta, dim=-1)).max().item() > 1e-3
