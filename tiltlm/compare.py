"""Head-to-head: how often policy A's completion earns a higher reward than policy B's on the same prompt.

For each prompt ``x`` and sample index ``k``, A's k-th completion is compared with B's k-th completion
under a reward ``r``; the outcome is 1 if ``r_A > r_B``, 1/2 on a tie, 0 otherwise, and the win rate is
the mean outcome. Ties counting half makes the rates of A over B and of B over A sum to 1.

Uncertainty is over prompts, the unit that was sampled (see :mod:`tiltlm.stats`): the win rate's 95%
interval is a percentile bootstrap resampling whole prompts, mean rewards get a normal interval over
per-prompt means. Completions are matched by prompt and ``sample`` (as ``tiltlm generate`` writes them).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

from tiltlm.stats import grouped_bootstrap, mean_ci, per_group_means


class CompareError(ValueError):
    """Generations that cannot be compared (unmatched prompts, bad files), naming the file."""


@dataclass(frozen=True)
class WinRate:
    """Win rate of A over B with its 95% bootstrap interval; ``n`` comparisons, ``groups`` prompts."""

    rate: float
    low: float
    high: float
    n: int
    wins: int = 0
    ties: int = 0
    losses: int = 0
    groups: int = 0


def win_rate(rewards_a: Sequence[float], rewards_b: Sequence[float], n_boot: int = 2000, seed: int = 0,
             groups: Sequence[Hashable] | None = None) -> WinRate:
    """The win rate of A over B (ties count half) and its 95% percentile-bootstrap interval, resampling whole
    ``groups`` (the independent units, e.g. the prompt of each comparison; by default each comparison)."""
    if len(rewards_a) != len(rewards_b):
        raise ValueError(f"{len(rewards_a)} rewards for A but {len(rewards_b)} for B; expected one pair each")
    scores = (np.sign(np.subtract(rewards_a, rewards_b, dtype=float)) + 1) / 2  # 1 win, 0.5 tie, 0 loss
    if scores.size == 0:
        raise ValueError("no comparisons: expected at least one pair of rewards")
    labels = list(range(len(scores))) if groups is None else list(groups)
    low, high = grouped_bootstrap(scores, labels, n_boot, seed)
    return WinRate(rate=float(scores.mean()), low=low, high=high, n=int(scores.size),
                   wins=int((scores == 1.0).sum()), ties=int((scores == 0.5).sum()),
                   losses=int((scores == 0.0).sum()), groups=len(set(labels)))


@dataclass(frozen=True)
class Generation:
    """One completion of one prompt; ``key`` identifies the prompt (messages included) and sample."""

    prompt: object
    sample: int
    completion: str

    @property
    def key(self) -> tuple[str, int]:
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False), self.sample


def read_generations(path: str | Path) -> list[Generation]:
    """Rows of a ``tiltlm generate`` output. Rows without ``sample`` are numbered per prompt in order."""
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"generations file {path}: no such file")
    seen: dict[str, int] = defaultdict(int)  # rows of each prompt so far
    lines: dict[tuple[str, int], int] = {}  # the line of each (prompt, sample)
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CompareError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or "prompt" not in row or not isinstance(row.get("completion"), str):
            raise CompareError(f"{path}:{number}: expected an object with 'prompt' and a string 'completion' "
                               f"(a tiltlm generate output row)")
        prompt = json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False)
        index = row.get("sample", seen[prompt])
        if not isinstance(index, int):
            raise CompareError(f"{path}:{number}: 'sample' must be an integer, got {index!r}")
        seen[prompt] += 1
        if (prompt, index) in lines:
            raise CompareError(f"{path}:{number}: the same prompt and sample {index} as line {lines[prompt, index]}")
        lines[prompt, index] = number
        found.append(Generation(row["prompt"], index, row["completion"]))
    if not found:
        raise CompareError(f"generations file {path}: no rows")
    return found


def match(a: list[Generation], b: list[Generation], names: tuple[str, str]) -> list[tuple[Generation, Generation]]:
    """Pairs of A's and B's completions of the same prompt and sample, in A's order. Both sides must
    hold the same (prompt, sample) keys: comparing on different prompts would not be a comparison."""
    by_key = {g.key: g for g in b}
    only_a = [g for g in a if g.key not in by_key]
    only_b = len(b) - (len(a) - len(only_a))
    if only_a or only_b:
        example = f"; e.g. prompt {only_a[0].prompt!r:.60} sample {only_a[0].sample} is only in {names[0]}" if only_a else ""
        raise CompareError(f"{names[0]} and {names[1]} do not hold the same prompts and samples: {len(only_a)} "
                           f"rows only in {names[0]}, {only_b} only in {names[1]}{example}. Generate both from "
                           f"the same prompts file with the same --samples")
    return [(g, by_key[g.key]) for g in a]


def compare(pairs: list[tuple[Generation, Generation]], reward, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean rewards of both sides (normal 95% interval over per-prompt means) and the win rate of A
    over B (bootstrap over prompts)."""
    prompts = [a.prompt for a, _ in pairs]
    rewards_a = reward(prompts, [a.completion for a, _ in pairs])
    rewards_b = reward(prompts, [b.completion for _, b in pairs])
    groups = [a.key[0] for a, _ in pairs]
    result = win_rate(rewards_a, rewards_b, n_boot=n_boot, seed=seed, groups=groups)
    means = {side: dict(zip(("mean", "low", "high"), mean_ci(per_group_means(rewards, groups))))
             for side, rewards in (("a", rewards_a), ("b", rewards_b))}
    return {"win_rate": asdict(result), "rewards": means, "bootstrap_resamples": n_boot}


def format_report(report: dict, names: tuple[str, str], reward_spec: str) -> str:
    """A small plain-text table of the report."""
    w = report["win_rate"]
    width = max(len(names[0]), len(names[1]), 6)
    lines = [f"reward: {reward_spec}   prompts: {w['groups']}   comparisons: {w['n']}", "",
             f"    {'policy':<{width}}  mean reward  95% CI (normal, over prompts)"]
    for label, name, r in zip("AB", names, (report["rewards"]["a"], report["rewards"]["b"])):
        lines.append(f"{label}   {name:<{width}}  {r['mean']:>11.4f}  [{r['low']:.4f}, {r['high']:.4f}]")
    lines += ["", f"win rate of A over B: {w['rate']:.3f}  95% CI [{w['low']:.3f}, {w['high']:.3f}] "
                  f"(bootstrap over prompts, {report['bootstrap_resamples']} resamples)",
              f"wins {w['wins']}, ties {w['ties']} (count half), losses {w['losses']}"]
    return "\n".join(lines)
