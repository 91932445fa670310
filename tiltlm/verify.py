"""An exact check that the DPO implementation reaches what the theory says it should (``tiltlm verify``).

A language model is too big to know its optimum; a table is not. Here ``K`` prompts each have ``N``
possible responses, a reward table ``r(x, y)``, a reference ``pi_ref = softmax(random logits)`` and a
policy given directly by its logits ``theta[x, y]``, all in float64. In this setting every claim of
the DPO paper (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly
a Reward Model") can be computed exactly and compared with what minimising the library's own loss
(:data:`tiltlm.losses.LOSSES`) produces:

* the KL-regularised optimum ``pi* = pi_ref exp(r / beta) / Z`` (eq. 4) attains ``beta log Z``;
* minimising the expected DPO loss (eq. 7) recovers ``pi*``, and the implicit reward
  ``beta log pi/pi_ref`` recovers ``r`` up to a per-prompt constant (eq. 5);
* that constant, ``beta log Z(x)``, cancels from everything;
* autograd's gradient is the paper's (Section 4);
* ``beta`` trades reward for closeness to the reference;
* on a deterministic preference DPO's margin grows without bound while IPO's settles at
  ``1/(2 tau)``, the weakness of DPO's regularisation that motivates IPO (Azar et al. 2023);
* beyond pairs: minimising the expected Plackett-Luce loss over rankings of K = 3 responses (DPO paper,
  Appendix A.3) recovers ``pi*`` too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from tiltlm.losses import LOSSES, LossParams, PairLogps, list_rewards, plackett_luce

DTYPE = torch.float64


@dataclass
class Check:
    """One verified claim: what was measured, what was required of it, and whether it held."""

    name: str
    measured: float
    required: str
    passed: bool
    detail: str = ""


@dataclass
class Table:
    """The tabular world: ``rewards`` and ``ref_logps`` (log pi_ref) of shape [prompts, responses]."""

    rewards: Tensor
    ref_logps: Tensor
    beta: float


# --- the exact quantities ------------------------------------------------------------------------------


def make_table(seed: int, prompts: int = 4, responses: int = 6, beta: float = 0.5) -> Table:
    """Standard-normal rewards and a reference that is the softmax of standard-normal logits."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(prompts, responses, generator=gen, dtype=DTYPE)
    ref_logps = torch.log_softmax(torch.randn(prompts, responses, generator=gen, dtype=DTYPE), dim=-1)
    return Table(rewards, ref_logps, beta)


def optimal_logps(ref_logps: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """``log pi*(y|x)`` with ``pi* = pi_ref exp(r / beta) / Z(x)`` (DPO paper, eq. 4)."""
    return torch.log_softmax(ref_logps + rewards / beta, dim=-1)


def objective(logps: Tensor, ref_logps: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """``J(pi) = E_pi[r] - beta KL(pi || pi_ref)`` per prompt (DPO paper, eq. 3). ``logps`` may carry
    leading batch dimensions."""
    return (logps.exp() * (rewards - beta * (logps - ref_logps))).sum(-1)


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p || q)`` per row, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def ordered_pairs(prompts: int, responses: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every ``(x, a, b)`` with ``a != b``, as three index vectors."""
    return (~torch.eye(responses, dtype=torch.bool)).expand(prompts, -1, -1).nonzero().unbind(1)


def pair_losses(theta: Tensor, table: Table, x: Tensor, chosen: Tensor, rejected: Tensor, name: str = "sigmoid",
                params: LossParams | None = None) -> Tensor:
    """Per-pair losses of the library's loss ``name`` (with ``beta = table.beta`` unless ``params`` say
    otherwise) for the policy ``softmax(theta)``; a response is one token."""
    ones = torch.ones_like(x)
    policy, reference = (PairLogps(logps[x, chosen], logps[x, rejected], ones, ones)
                         for logps in (torch.log_softmax(theta, dim=-1), table.ref_logps))
    return LOSSES[name](policy, reference, params or LossParams(beta=table.beta)).losses


def expected_dpo_loss(theta: Tensor, table: Table) -> Tensor:
    """The DPO loss (eq. 7) in expectation over the data: a prompt uniformly, two distinct responses
    from ``pi_ref``, and the label from Bradley-Terry, ``P(a > b) = sigma(r_a - r_b)``.

    Summing over *ordered* pairs ``(a, b)`` with ``a`` as the chosen response, weighted by
    ``P(pair) * P(a > b)``, covers both outcomes of each unordered pair.
    """
    x, a, b = ordered_pairs(*table.rewards.shape)
    preferred = torch.sigmoid(table.rewards[x, a] - table.rewards[x, b])
    weights = pair_probabilities(table)[x, a, b] * preferred
    return (weights * pair_losses(theta, table, x, a, b)).sum()


def pair_probabilities(table: Table) -> Tensor:
    """``P(x, a, b)``: prompt uniform, ``a`` and ``b`` drawn from ``pi_ref(.|x)`` conditioned on
    ``a != b``; shape [prompts, responses, responses]."""
    ref = table.ref_logps.exp()
    joint = ref[:, :, None] * ref[:, None, :] * (1.0 - torch.eye(ref.shape[1], dtype=DTYPE))
    return joint / joint.sum(dim=(1, 2), keepdim=True) / ref.shape[0]


def sample_preferences(table: Table, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` preference pairs ``(x, chosen, rejected)`` drawn as in :func:`expected_dpo_loss`."""
    probs = pair_probabilities(table)
    flat = torch.multinomial(probs.flatten(), n, replacement=True, generator=gen)
    x, a, b = torch.unravel_index(flat, probs.shape)
    a_wins = torch.rand(n, generator=gen, dtype=DTYPE) < torch.sigmoid(table.rewards[x, a] - table.rewards[x, b])
    return x, torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def unidentified_prompts(x: Tensor, chosen: Tensor, rejected: Tensor, shape: torch.Size) -> int:
    """Prompts whose empirical DPO loss has no unique finite minimiser.

    The loss is a Bradley-Terry likelihood in the implicit rewards, and such a likelihood has a unique
    finite maximiser (up to the per-prompt constant) exactly when the "beat" graph of the responses is
    strongly connected (Ford 1957, "Solution of a ranking problem from binary comparisons"): otherwise
    some group of responses only ever won against the rest (its rewards run off to infinity) or never
    appeared (its rewards are free).
    """
    prompts, responses = shape
    beats = torch.zeros(prompts, responses, responses, dtype=torch.bool)
    beats[x, chosen, rejected] = True
    reach = beats | torch.eye(responses, dtype=torch.bool)
    for _ in range(responses):  # after k squarings, reach holds every path of up to 2^k edges
        reach = reach | (reach.to(DTYPE) @ reach.to(DTYPE) > 0)
    return int((~reach.flatten(1).all(dim=1)).sum())


def minimise(loss_of: Callable[[Tensor], Tensor], start: Tensor, iterations: int = 60) -> Tensor:
    """Damped Newton's method with a backtracking (Armijo) line search.

    The DPO loss of a tabular policy is convex in ``theta``: the margin is linear in it, because the
    log-normaliser cancels between the two responses. Newton's method therefore converges quadratically,
    to the limit of float64; L-BFGS, stopping on changes of the loss value, stalled at about the square
    root of machine precision in ``theta``. The Hessian is singular (adding a constant to a prompt's
    logits changes nothing, and an uncompared response is free), so the step uses its pseudo-inverse.
    ``torch.optim`` is avoided on purpose: creating an optimizer imports ``torch._dynamo``, seconds of
    start-up for a 24-parameter problem.
    """
    theta = start.clone()
    for _ in range(iterations):
        point = theta.clone().requires_grad_(True)
        loss = loss_of(point)
        grad = torch.autograd.grad(loss, point)[0].flatten()
        if grad.norm() < 1e-15:
            break
        hessian = torch.autograd.functional.hessian(loss_of, theta).reshape(grad.numel(), grad.numel())
        step = -(torch.linalg.pinv(hessian, hermitian=True) @ grad)
        slope = grad @ step
        if slope >= 0:  # at float64's limit the Newton direction stops being a descent direction
            break
        size = 1.0
        while size > 1e-12 and loss_of(theta + size * step.view_as(theta)) > loss.detach() + 1e-4 * size * slope:
            size /= 2
        theta = theta + size * step.view_as(theta)
    return theta


# --- the checks --------------------------------------------------------------------------------------


def check_closed_form(table: Table, gen: torch.Generator, perturbations: int = 1000) -> list[Check]:
    """``J(pi*) = beta log Z(x)`` exactly (it follows from the derivation of eq. 4 in the DPO paper's
    Appendix A.1), and no perturbation of ``pi*`` does better: ``J(pi*) - J(pi) = beta KL(pi || pi*)``."""
    r, ref, beta = table.rewards, table.ref_logps, table.beta
    best = optimal_logps(ref, r, beta)
    value = objective(best, ref, r, beta)
    gap = (value - beta * torch.logsumexp(ref + r / beta, dim=-1)).abs().max().item()  # log Z(x)
    # Perturbation sizes from 1e-3 to 3 in the logits: small ones probe the stationary point, large
    # ones the global claim.
    scales = 10 ** (torch.rand(perturbations, 1, 1, generator=gen, dtype=DTYPE) * 3.5 - 3.0)
    noise = torch.randn(perturbations, *r.shape, generator=gen, dtype=DTYPE) * scales
    others = objective(torch.log_softmax(best + noise, dim=-1), ref, r, beta)
    margin = (value - others).min().item()
    return [
        Check("J(pi*) = beta log Z", gap, "< 1e-10", gap < 1e-10, "max over prompts of |J(pi*) - beta log Z(x)|"),
        Check("pi* beats perturbations", margin, "> 0", margin > 0,
              f"min over {perturbations} perturbations x {r.shape[0]} prompts of J(pi*) - J(pi)"),
    ]


def check_dpo_optimum(table: Table, gen: torch.Generator,
                      sizes: tuple[int, ...] = (100, 1000, 10000)) -> list[Check]:
    """Minimising the expected DPO loss from the reference reaches ``pi*``; its implicit reward
    ``beta log pi/pi_ref`` equals ``r`` up to a per-prompt constant (eq. 5); with finite samples the
    fitted policy approaches ``pi*`` as the data grows. At the smallest size some prompts usually
    have no finite minimiser (see :func:`unidentified_prompts`): the minimiser then stops at its
    iteration budget with some rewards running off, DPO's overfitting on scarce data, and the KL is large."""
    best = optimal_logps(table.ref_logps, table.rewards, table.beta)
    theta = minimise(lambda t: expected_dpo_loss(t, table), table.ref_logps)
    fitted = torch.log_softmax(theta, dim=-1)
    worst_kl = kl(best, fitted).max().item()

    offsets = table.beta * (fitted - table.ref_logps) - table.rewards
    spread = (offsets.max(-1).values - offsets.min(-1).values).max().item()
    relative = spread / (table.rewards.max() - table.rewards.min()).item()

    sampled, unidentified = [], []
    for n in sizes:
        x, chosen, rejected = sample_preferences(table, n, gen)
        fit = minimise(lambda t: pair_losses(t, table, x, chosen, rejected).mean(), table.ref_logps)
        sampled.append(kl(best, torch.log_softmax(fit, dim=-1)).mean().item())
        unidentified.append(unidentified_prompts(x, chosen, rejected, table.rewards.shape))
    falling = all(big < small for small, big in zip(sampled, sampled[1:]))
    listing = ", ".join(f"n={n}: {v:.3g} ({u} prompts without a finite minimiser)"
                        for n, v, u in zip(sizes, sampled, unidentified))
    return [
        Check("DPO reaches pi*", worst_kl, "< 1e-12", worst_kl < 1e-12,
              "max over prompts of KL(pi* || pi_theta) after minimising the exact expected DPO loss"),
        Check("implicit reward = r + c(x)", relative, "< 1e-9", relative < 1e-9,
              "max over prompts of the range of beta log(pi_theta/pi_ref) - r, over the reward range"),
        Check("KL falls with data", sampled[-1], f"< {sampled[0]:.3g} (n={sizes[0]})", falling,
              f"mean KL(pi* || pi_fit) from sampled pairs, {listing}; required strictly falling"),
    ]


def ordered_triples(prompts: int, responses: int) -> tuple[Tensor, Tensor]:
    """Every ``(x, (a, b, c))`` with distinct ``a, b, c``: prompt indices [T] and responses [T, 3]."""
    a, b, c = torch.meshgrid(*[torch.arange(responses)] * 3, indexing="ij")
    found = ((a != b) & (a != c) & (b != c)).expand(prompts, -1, -1, -1).nonzero()
    return found[:, 0], found[:, 1:]


def ranking_probabilities(table: Table) -> Tensor:
    """``P(x, ranking a > b > c)`` for every ordered triple of :func:`ordered_triples`: prompt uniform,
    the set ``{a, b, c}`` drawn from ``pi_ref(.|x)`` without repeats, its ranking from Plackett-Luce
    on the true reward (DPO paper, eq. 18). The set's probability is the sum over its 6 orders of the
    ordered draw ``pi_ref(a) pi_ref(b) pi_ref(c)``, normalised over distinct triples per prompt."""
    x, idx = ordered_triples(*table.rewards.shape)
    draw = table.ref_logps.exp()[x[:, None], idx].prod(dim=1)
    per_prompt = torch.zeros(table.rewards.shape[0], dtype=DTYPE).index_add(0, x, draw)
    set_probability = 6.0 * draw / per_prompt[x] / table.rewards.shape[0]
    r = table.rewards[x[:, None], idx]
    ranked = (r[:, 0] - torch.logsumexp(r, dim=1)) + (r[:, 1] - torch.logsumexp(r[:, 1:], dim=1))
    return set_probability * ranked.exp()


def expected_plackett_luce_loss(theta: Tensor, table: Table) -> Tensor:
    """The library's Plackett-Luce loss in expectation over rankings of three responses drawn as in
    :func:`ranking_probabilities`, for the policy ``softmax(theta)``."""
    x, idx = ordered_triples(*table.rewards.shape)
    logps = torch.log_softmax(theta, dim=-1)
    rewards = list_rewards(logps[x[:, None], idx], table.ref_logps[x[:, None], idx], table.beta)
    ranks = torch.arange(3).expand(len(x), 3)  # the triple is listed best first
    losses = plackett_luce(rewards, torch.ones(len(x), 3, dtype=torch.bool), ranks)
    return (ranking_probabilities(table) * losses).sum()


def check_plackett_luce_optimum(table: Table) -> Check:
    """Minimising the exact expected Plackett-Luce loss over rankings of K = 3 responses (DPO paper,
    Appendix A.3: eq. 18 and the objective derived from it) reaches ``pi*``: the ranking likelihood,
    like Bradley-Terry's, is maximised by the true reward up to a per-prompt constant, and is convex in
    ``theta`` (log-sum-exps of linear functions), so Newton's method solves it to float64's limit."""
    best = optimal_logps(table.ref_logps, table.rewards, table.beta)
    theta = minimise(lambda t: expected_plackett_luce_loss(t, table), table.ref_logps)
    worst_kl = kl(best, torch.log_softmax(theta, dim=-1)).max().item()
    return Check("Plackett-Luce reaches pi*", worst_kl, "< 1e-12", worst_kl < 1e-12,
                 "max over prompts of KL(pi* || pi_theta) after minimising the exact expected Plackett-Luce "
                 "loss over rankings of 3 responses")


def check_partition_cancels(table: Table, gen: torch.Generator, draws: int = 200) -> Check:
    """Adding any ``c(x)`` to the rewards changes neither the Bradley-Terry probabilities, nor ``pi*``,
    nor the expected DPO loss at the optimum: ``beta log Z(x)`` cancels (eq. 5-7)."""
    x, a, b = ordered_pairs(*table.rewards.shape)

    def measured(t: Table) -> tuple[Tensor, Tensor, Tensor]:
        optimum = optimal_logps(t.ref_logps, t.rewards, t.beta)
        return torch.sigmoid(t.rewards[x, a] - t.rewards[x, b]), optimum, expected_dpo_loss(optimum, t)

    before, worst = measured(table), 0.0
    for _ in range(draws):
        shift = torch.randn(table.rewards.shape[0], 1, generator=gen, dtype=DTYPE)
        shift = shift * 10 ** (torch.rand(1, generator=gen, dtype=DTYPE) * 5 - 2)  # 1e-2 .. 1e3
        after = measured(Table(table.rewards + shift, table.ref_logps, table.beta))
        worst = max(worst, *((new - old).abs().max().item() for new, old in zip(after, before)))
    return Check("Z(x) cancels", worst, "< 1e-9", worst < 1e-9,
                 f"max change of BT probabilities, log pi*, and optimal DPO loss over {draws} shifts c(x)")


def check_gradient(table: Table, gen: torch.Generator) -> Check:
    """Autograd's per-pair gradient of the DPO loss equals the paper's (Section 4)::

        grad = -beta sigma(r_hat(y_l) - r_hat(y_w)) (grad log pi(y_w) - grad log pi(y_l))

    with ``grad_theta[x] log pi(y|x) = onehot(y) - pi(.|x)`` for a softmax policy."""
    theta = torch.randn(table.rewards.shape, generator=gen, dtype=DTYPE)
    error = (autograd_pair_gradients(theta, table) - analytic_pair_gradients(theta, table)).abs().max().item()
    return Check("gradient = DPO paper's", error, "< 1e-10", error < 1e-10,
                 "max |autograd - analytic| over every ordered pair and logit")


def autograd_pair_gradients(theta: Tensor, table: Table) -> Tensor:
    """Jacobian of the per-pair DPO losses (every ordered pair, first response chosen) wrt ``theta``:
    shape [pairs, prompts, responses]."""
    x, a, b = ordered_pairs(*table.rewards.shape)
    return torch.autograd.functional.jacobian(lambda t: pair_losses(t, table, x, a, b), theta)


def analytic_pair_gradients(theta: Tensor, table: Table) -> Tensor:
    """The DPO paper's gradient (Section 4) for the same pairs as :func:`autograd_pair_gradients`."""
    x, a, b = ordered_pairs(*table.rewards.shape)
    logps = torch.log_softmax(theta, dim=-1)
    implicit = table.beta * (logps - table.ref_logps)
    weight = -table.beta * torch.sigmoid(implicit[x, b] - implicit[x, a])
    probs, eye = logps.exp(), torch.eye(theta.shape[1], dtype=DTYPE)
    grad_log_pi_w, grad_log_pi_l = eye[a] - probs[x], eye[b] - probs[x]
    grads = torch.zeros(len(x), *theta.shape, dtype=DTYPE)
    grads[torch.arange(len(x)), x] = weight[:, None] * (grad_log_pi_w - grad_log_pi_l)
    return grads


def check_beta(table: Table) -> list[Check]:
    """``KL(pi*_beta || pi_ref)`` falls as ``beta`` grows (its derivative is ``-Var_pi*(r) / beta^3``),
    and as ``beta -> 0``, ``pi*`` concentrates on the best response."""
    r, ref = table.rewards, table.ref_logps
    top2 = r.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    ref_spread = (ref.max(-1).values - ref.min(-1).values).max().item()
    # Small enough that every other response has at most e^-10 times the best one's probability.
    smallest = gap / (ref_spread + 10.0)
    betas = torch.logspace(math.log10(smallest), 2.0, 40, dtype=DTYPE)
    kls = torch.stack([kl(optimal_logps(ref, r, b.item()), ref) for b in betas])  # [betas, prompts]
    rise = (kls[1:] - kls[:-1]).max().item()
    mass = optimal_logps(ref, r, smallest).exp().gather(-1, r.argmax(-1, keepdim=True)).min().item()
    return [
        Check("KL(pi*||ref) falls with beta", rise, "<= 1e-12", rise <= 1e-12,
              f"largest rise of KL between consecutive betas on a grid {smallest:.3g} .. 100; "
              f"KL from {kls[0].max().item():.3g} to {kls[-1].max().item():.3g}"),
        Check("small beta -> argmax r", mass, "> 0.99", mass > 0.99,
              f"min over prompts of pi*(argmax r) at beta = {smallest:.3g}"),
    ]


def train_margin(name: str, table: Table, steps: tuple[int, ...], lr: float, params: LossParams) -> list[float]:
    """Gradient descent on one always-preferred pair of prompt 0 (best over worst response), from the
    reference; the log-ratio margin ``h`` at each of ``steps``."""
    x = torch.zeros(1, dtype=torch.long)
    chosen, rejected = table.rewards[0].argmax().view(1), table.rewards[0].argmin().view(1)
    theta = table.ref_logps.clone().requires_grad_(True)
    margins = []
    for step in range(1, steps[-1] + 1):
        (grad,) = torch.autograd.grad(pair_losses(theta, table, x, chosen, rejected, name, params).sum(), theta)
        with torch.no_grad():
            theta -= lr * grad
        if step in steps:
            ratios = torch.log_softmax(theta.detach(), dim=-1)[0] - table.ref_logps[0]
            margins.append((ratios[chosen] - ratios[rejected]).item())
    return margins


def check_deterministic_preference(table: Table, lr: float = 0.2,
                                   steps: tuple[int, ...] = (128, 256, 512, 1024)) -> list[Check]:
    """With ``P(y_w > y_l) = 1`` the DPO loss has no minimiser: its margin grows like ``log(t) / beta``
    (for large margins ``d exp(beta h) / dt`` is constant under gradient descent, so each doubling of
    the steps adds ``log(2) / beta``). IPO's squared loss (Azar et al. 2023, eq. 17, with summed
    log-probs) settles at ``1/(2 tau)``."""
    tau = table.beta
    params = LossParams(beta=tau, ipo_average=False)
    dpo = train_margin("sigmoid", table, steps, lr, params)
    ipo = train_margin("ipo", table, steps, lr, params)
    doubling_gain = dpo[-1] - dpo[-2]
    target_gain = math.log(2.0) / tau
    growing = all(later > earlier for earlier, later in zip(dpo, dpo[1:])) and doubling_gain > 0.5 * target_gain
    ipo_error = abs(ipo[-1] - 1.0 / (2.0 * tau))
    trace = ", ".join(f"{t}: {m:.3f}" for t, m in zip(steps, dpo))
    return [
        Check("DPO margin unbounded (p=1)", doubling_gain, f"> {0.5 * target_gain:.3g}", growing,
              f"margin gain over the last doubling of steps (theory -> log2/beta = {target_gain:.3g}); "
              f"margins {trace}"),
        Check("IPO margin -> 1/(2 tau)", ipo_error, "< 1e-8", ipo_error < 1e-8,
              f"|h - 1/(2 tau)| after {steps[-1]} steps; h = {ipo[-1]:.12g}, target {1 / (2 * tau):.12g}"),
    ]


def run_checks(seed: int = 0) -> list[Check]:
    """Every check, on the table drawn from ``seed``."""
    table = make_table(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    # The tensors are tiny: extra intra-op threads only add synchronisation, and on a busy machine
    # their spin-waiting made the checks several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [
            *check_closed_form(table, gen),
            *check_dpo_optimum(table, gen),
            check_partition_cancels(table, gen),
            check_gradient(table, gen),
            *check_beta(table),
            *check_deterministic_preference(table),
            check_plackett_luce_optimum(table),
        ]
    finally:
        torch.set_num_threads(threads)


def format_table(checks: list[Check]) -> str:
    """The checks as an aligned text table, then one line of detail per check."""
    rows = [("check", "measured", "required", "ok")]
    rows += [(c.name, f"{c.measured:.3g}", c.required, "yes" if c.passed else "NO") for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join([*lines, "", *(f"{c.name}: {c.detail}" for c in checks)])
