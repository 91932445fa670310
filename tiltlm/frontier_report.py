"""The outputs of ``tiltlm frontier`` (see :mod:`tiltlm.frontier`): frontier.json (every point with its
numbers and settings), and frontier.png and report.md (table, plot, exact command, wall time) drawn from
frontier.json alone, so that the report always shows the numbers that were saved."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

from matplotlib.figure import Figure

from tiltlm.experiment import markdown_table, write_markdown
from tiltlm.stats import format_interval


@dataclass
class Point:
    """One point of the frontier. ``kl`` is sampled (trained policies) or analytic (best-of-N);
    intervals are (mean, low, high)."""

    name: str
    method: str  # dpo | preferred-ft | best-of-n | iterative-dpo
    reward: tuple[float, float, float]
    kl: tuple[float, float, float]
    kl_source: str
    beta: float | None = None
    round: int | None = None
    n: int | None = None
    samples_file: str = ""
    run_dir: str | None = None
    train_seconds: float = 0.0
    measure_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def interval_dict(interval: tuple[float, float, float]) -> dict:
    return dict(zip(("mean", "low", "high"), (None if math.isnan(v) else v for v in interval)))  # NaN is not JSON


def command(config) -> str:
    """The command that repeats a run of the dataclass ``config``: every option that differs from the
    defaults."""
    defaults, parts = type(config)(), ["tiltlm", "frontier"]
    for f in fields(config):
        value, flag = getattr(config, f.name), f.name.replace("_", "-")
        if value != getattr(defaults, f.name):
            parts += ([f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool)
                      else [f"--{flag}", str(value)])
    return " ".join(parts)


STYLE = {"dpo": ("o", "tab:blue", "DPO (one point per beta)"),  # marker, colour, legend
         "iterative-dpo": ("D", "tab:purple", "iterative DPO (rounds)"),
         "preferred-ft": ("s", "tab:orange", "preferred-FT (SFT on chosen)"),
         "best-of-n": ("^", "tab:green", "best-of-N from the reference")}


def short(name: str) -> str:
    """A model or reward name short enough for a plot: a path's last part (and a reward's function)."""
    head, colon, function = name.rpartition(":") if ":" in name else (name, "", "")
    return Path(head).name + colon + function


def plot_frontier(points: list[Point], path: Path, config) -> Path:
    """Reward against KL with 95% error bars on both axes (none on best-of-N's analytic KL)."""
    figure = Figure(figsize=(9, 6.8), layout="constrained")
    # the note goes in a strip of its own below the axes, where it cannot hide a point
    ax, strip = figure.subplots(2, 1, height_ratios=[10, 1.2])
    for method in ("best-of-n", "preferred-ft", "iterative-dpo", "dpo"):  # DPO drawn over round 1
        chosen = [p for p in points if p.method == method]
        if method == "iterative-dpo" and chosen:  # the chain starts at the one-shot DPO point of its beta
            chosen = [p for p in points if p.method == "dpo" and p.beta == config.round_beta] + chosen
        if not chosen:
            continue
        marker, color, label = STYLE[method]
        xs, ys = [p.kl[0] for p in chosen], [p.reward[0] for p in chosen]
        xerr = [[max(p.kl[0] - p.kl[1], 0) for p in chosen], [max(p.kl[2] - p.kl[0], 0) for p in chosen]]
        yerr = [[p.reward[0] - p.reward[1] for p in chosen], [p.reward[2] - p.reward[0] for p in chosen]]
        linestyle = "-" if method in ("best-of-n", "iterative-dpo") else "none"
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker=marker, color=color, linestyle=linestyle,
                    capsize=3, markersize=7, label=label)
        for p in chosen:
            text = (f"N={p.n}" if p.n else f"round {p.round}" if method == "iterative-dpo"
                    else f"β={p.beta:g}" if p.beta else "")
            if text:  # round labels below the point: round 1 is also a DPO point, labelled above
                offset = (6, -12) if method == "iterative-dpo" else (6, 6)
                ax.annotate(text, (p.kl[0], p.reward[0]), textcoords="offset points", xytext=offset,
                            fontsize=8, color=color)
    note = ("best-of-N: KL = log N - (N-1)/N (analytic; no interval)\n"
            "trained policies: KL = mean of log π(y|x) - log π_ref(y|x) over their own samples\n"
            "(temperature 1); every KL is against the ORIGINAL reference, iterative rounds included\n"
            "error bars: normal 95% intervals over held-out prompts")
    strip.axis("off")
    strip.text(0.0, 1.0, note, transform=strip.transAxes, ha="left", va="top", fontsize=8)
    ax.set_xlabel("KL(π || π_ref), nats per completion")
    ax.set_ylabel(f"mean reward ({short(config.reward)}) on held-out prompts")
    ax.set_title(f"Reward vs KL from the reference {short(config.model)} (DPO paper, section 6.1, in miniature)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    figure.savefig(path, dpi=110)
    return path


def dpo_reward_at(points: list[Point], kl: float) -> tuple[float, Point, Point] | None:
    """One-shot DPO's mean reward at ``kl``, interpolated linearly between the two DPO points whose KLs
    bracket it, with those two points; None outside the DPO points' KL range. This is how the DPO paper
    reads its frontier (Figure 2 left): which method gets more reward at the same KL."""
    dpo = sorted((p for p in points if p.method == "dpo"), key=lambda p: p.kl[0])
    for low, high in zip(dpo, dpo[1:]):
        if low.kl[0] <= kl <= high.kl[0]:
            span = high.kl[0] - low.kl[0]
            share = (kl - low.kl[0]) / span if span > 0 else 0.0
            return low.reward[0] + share * (high.reward[0] - low.reward[0]), low, high
    return None


def matching_kl(points: list[Point]) -> list[str]:
    """One line per non-DPO point: its reward against DPO's at the same KL."""
    lines = []
    for p in (p for p in points if p.method != "dpo"):
        found = dpo_reward_at(points, p.kl[0])
        if found:
            reward, low, high = found
            lines.append(f"- {p.name} (KL {p.kl[0]:.3f}): reward {p.reward[0]:+.3f}; DPO at the same KL "
                         f"(between beta {low.beta:g} and {high.beta:g}): {reward:+.3f}, so DPO is "
                         f"{'above' if reward > p.reward[0] else 'below'} by {abs(reward - p.reward[0]):.3f}")
            continue
        # outside DPO's KL range a DPO point can still dominate: as much reward or more for less KL
        better = [d for d in points if d.method == "dpo" and d.kl[0] <= p.kl[0] and d.reward[0] >= p.reward[0]]
        verdict = ("dominated by DPO at " + ", ".join(f"beta {d.beta:g} (KL {d.kl[0]:.3f}, reward "
                                                      f"{d.reward[0]:+.3f})" for d in better)
                   + ": as much reward or more for less KL") if better else "no DPO point dominates it"
        lines.append(f"- {p.name} (KL {p.kl[0]:.3f}, reward {p.reward[0]:+.3f}): outside the KL range of "
                     f"the DPO points; {verdict}")
    return lines


def setup_paragraph(out: Path, document: dict, config) -> str:
    """What was trained and measured, in one paragraph."""
    pairs = sum(1 for _ in open(out / "pairs-round1.jsonl", encoding="utf-8"))
    reference = ("the original model (fixed)" if config.ref_update == "fixed"
                 else "the policy the round starts from (current)")
    iterative = (f" Iterative DPO: {config.rounds} rounds at beta {config.round_beta:g}, each round sampling "
                 f"{config.samples} continuations of the training prompts from the current policy, labelling them "
                 f"and training from it; reference of rounds 2 and later: {reference}.") if config.rounds > 1 else ""
    return (f"Reference {config.model}; reward {config.reward}; {document['train_prompts']} training prompts with "
            f"{config.samples} continuations each labelled into {pairs} preference pairs (best and worst per "
            f"prompt); DPO at betas {', '.join(f'{b:g}' for b in document['betas'])} and preferred-FT (length-averaged "
            f"NLL of the chosen completions, no reference), LoRA r={config.lora_r}, lr {config.lr:g}, "
            f"{config.epochs} epochs, batch {config.batch_size}; best-of-N for N in "
            f"{', '.join(map(str, document['best_of']))} from {max(document['best_of'])} reference draws per "
            f"held-out prompt.{iterative}")


def render(out: Path) -> Path:
    """frontier.png and report.md drawn from frontier.json alone; returns the report's path."""
    def interval(values: dict) -> tuple[float, float, float]:  # a missing bound, written as null, is NaN
        return tuple(math.nan if values[k] is None else values[k] for k in ("mean", "low", "high"))

    document = json.loads((out / "frontier.json").read_text(encoding="utf-8"))
    config, machine = SimpleNamespace(**document["config"]), document["machine"]  # the saved settings
    points = [Point(**{**row, "reward": interval(row["reward"]), "kl": interval(row["kl"])})
              for row in document["points"]]
    return write_markdown(out / "report.md", [
        "# Reward against KL: DPO, preferred-FT and best-of-N",
        "The controlled-sentiment experiment of the DPO paper (Rafailov et al. 2023, section 6.1, Figure 2 "
        "left), in miniature.",
        setup_paragraph(out, document, config),
        f"Measured on {len(document['heldout_prompts'])} held-out prompts, {config.eval_samples} continuations "
        f"each for every trained policy, at most {config.max_new_tokens} new tokens, temperature 1, seed "
        f"{document['eval_seed']} for every policy.",
        f"![reward against KL]({plot_frontier(points, out / 'frontier.png', config).name})",
        markdown_table(["point", "method", "beta", "round", "N", "mean reward (95% CI)", "KL nats (95% CI)", "KL from",
                        "train s", "measure s"],
                       [[p.name, p.method, "" if p.beta is None else f"{p.beta:g}", "" if p.round is None else p.round,
                         "" if p.n is None else p.n, format_interval(p.reward), format_interval(p.kl), p.kl_source,
                         f"{p.train_seconds:.1f}", f"{p.measure_seconds:.1f}"] for p in points]),
        "Mean reward: the mean over held-out prompts of each prompt's mean reward, with a normal 95% interval "
        "over prompts. KL(pi || pi_ref): for trained policies, the mean over the same prompts of "
        "log pi(y|x) - log pi_ref(y|x) averaged over continuations y sampled from pi, in nats per "
        "continuation, always against the original reference (iterative rounds included), so every point "
        "shares one axis. Best-of-N: its KL is log N - (N-1)/N (exact when the N draws are distinct), and "
        "its reward averages the best of each disjoint group of N draws.",
        "## At matching KL",
        "DPO's reward interpolated between the two betas whose KLs bracket each other point's KL (means "
        "only: differences well inside the intervals above are not resolved):",
        matching_kl(points),
        "## Command",
        ["```bash", document["command"], "```"],
        f"Wall time: {document['wall_seconds'] / 60:.1f} min on {machine['device']} ({machine['cpus']} cores, "
        f"torch threads: {machine['torch_threads']}; load average {machine['load_average_start']:.1f} at the "
        f"start and {machine['load_average_end']:.1f} at the end - above the core count means other "
        f"processes shared the CPU).",
        "Files: `frontier.json` (every point and setting), `samples/` (every measured continuation with its "
        "reward and log-probs under the policy and the reference), `pairs-round*.jsonl` (training pairs), "
        "`runs/` (one training run per trained policy).",
    ])
