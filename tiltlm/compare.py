"""Head-to-head: how often policy A's completion earns a higher reward than policy B's on the same prompt.

For each prompt ``x`` and sample index ``k``, A's k-th completion is compared with B's k-th completion
under a reward ``r``; the outcome is 1 if ``r_A > r_B``, 1/2 on a tie, 0 otherwise, and the win rate is
the mean outcome. Ties counting half makes the rates of A over B and of B over A sum to 1.

Uncertainty is over prompts, the unit that was sampled: samples of the same prompt share it and are
not independent. The 95% interval of the win rate is a percentile bootstrap (Efron & Tibshirani 1993,
"An Introduction to the Bootstrap", ch. 13): resample prompts with replacement, recompute the rate,
take the 2.5% and 97.5% quantiles. :func:`wald_interval` gives the normal approximation
``rate +- 1.96 sd / sqrt(n)``, which agrees with the bootstrap for large n and serves as a check.
Mean rewards get a normal interval, ``mean +- 1.96 s / sqrt(n)`` over per-prompt means: with fewer than
about 30 prompts it is too narrow (a t interval would be wider).

Inputs: two generation files written by ``tiltlm generate`` (rows matched by prompt and ``sample``), or
two models sampled here on the same prompts, or one of each.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist, fmean, stdev
from typing import Hashable, Sequence

import numpy as np

from tiltlm.data.types import DataError
from tiltlm.generate import add_sampling_arguments, check_sampling_options, load_policy, read_prompts, sample
from tiltlm.models import ModelError, parse_dtype
from tiltlm.rewards import RewardError, load_reward
from tiltlm.runtime import pick_device

Z95 = NormalDist().inv_cdf(0.975)  # 1.95996...


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


# ------------------------------------------------------------------------------------- statistics


def outcomes(rewards_a: Sequence[float], rewards_b: Sequence[float]) -> list[float]:
    """1 where A's reward is higher, 0.5 on a tie, 0 where B's is higher."""
    if len(rewards_a) != len(rewards_b):
        raise ValueError(f"{len(rewards_a)} rewards for A but {len(rewards_b)} for B; expected one pair each")
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards_a, rewards_b)]


def win_rate(rewards_a: Sequence[float], rewards_b: Sequence[float], n_boot: int = 2000, seed: int = 0,
             groups: Sequence[Hashable] | None = None) -> WinRate:
    """The win rate of A over B (ties count half) and its 95% percentile-bootstrap interval.

    ``groups`` (e.g. the prompt of each comparison) makes the bootstrap resample whole groups, the
    independent units; without it every comparison is its own unit. A resample's rate is its total
    outcome over its total count, which is the plain rate when every group has the same size.
    """
    scores = np.asarray(outcomes(rewards_a, rewards_b))
    if scores.size == 0:
        raise ValueError("no comparisons: expected at least one pair of rewards")
    if n_boot < 1:
        raise ValueError(f"n_boot = {n_boot}: expected at least 1 resample")
    labels = list(range(len(scores))) if groups is None else list(groups)
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} group labels for {len(scores)} comparisons")
    index = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    owner = np.array([index[label] for label in labels])
    sums = np.bincount(owner, weights=scores, minlength=len(index))
    counts = np.bincount(owner, minlength=len(index)).astype(float)
    rates = bootstrap_rates(sums, counts, n_boot, seed)
    low, high = np.quantile(rates, [0.025, 0.975])
    return WinRate(rate=float(scores.mean()), low=float(low), high=float(high), n=int(scores.size),
                   wins=int((scores == 1.0).sum()), ties=int((scores == 0.5).sum()),
                   losses=int((scores == 0.0).sum()), groups=len(index))


def bootstrap_rates(sums: np.ndarray, counts: np.ndarray, n_boot: int, seed: int, block: int = 256) -> np.ndarray:
    """``n_boot`` resampled rates: draw len(sums) groups with replacement, total outcome / total count.

    Drawn in blocks of resamples, so memory stays at ``block x groups`` indices for any n_boot.
    """
    rng = np.random.default_rng(seed)
    groups = len(sums)
    rates = []
    for start in range(0, n_boot, block):
        picks = rng.integers(0, groups, size=(min(block, n_boot - start), groups))
        rates.append(sums[picks].sum(axis=1) / counts[picks].sum(axis=1))
    return np.concatenate(rates)


def wald_interval(scores: Sequence[float]) -> tuple[float, float]:
    """Normal-approximation 95% interval of a mean of outcomes: ``mean +- z sqrt(var / n)`` with the
    plug-in variance (divisor n), which is ``p (1 - p)`` when there are no ties (the Wald interval)."""
    n = len(scores)
    mean = fmean(scores)
    variance = sum((s - mean) ** 2 for s in scores) / n
    half = Z95 * math.sqrt(variance / n)
    return mean - half, mean + half


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its normal 95% interval ``mean +- z s / sqrt(n)``, with ``s``
    the sample standard deviation (divisor n - 1). One value has no spread: the bounds are NaN."""
    if not values:
        raise ValueError("no values: expected at least one")
    mean = fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = Z95 * stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


# ------------------------------------------------------------------------------- matching generations


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
    seen: dict[str, int] = defaultdict(int)
    keys: dict[tuple[str, int], int] = {}
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
        prompt_key = json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False)
        index = row.get("sample", seen[prompt_key])
        if not isinstance(index, int):
            raise CompareError(f"{path}:{number}: 'sample' must be an integer, got {index!r}")
        seen[prompt_key] += 1
        generation = Generation(row["prompt"], index, row["completion"])
        if generation.key in keys:
            raise CompareError(f"{path}:{number}: the same prompt and sample {index} as line {keys[generation.key]}")
        keys[generation.key] = number
        found.append(generation)
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


# ------------------------------------------------------------------------------------- the report


def compare(pairs: list[tuple[Generation, Generation]], reward, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean rewards of both sides (normal 95% interval over per-prompt means) and the win rate of A
    over B (bootstrap over prompts)."""
    prompts = [a.prompt for a, _ in pairs]
    rewards_a = reward(prompts, [a.completion for a, _ in pairs])
    rewards_b = reward(prompts, [b.completion for _, b in pairs])
    groups = [a.key[0] for a, _ in pairs]
    result = win_rate(rewards_a, rewards_b, n_boot=n_boot, seed=seed, groups=groups)
    means = {}
    for side, rewards in (("a", rewards_a), ("b", rewards_b)):
        mean, low, high = mean_ci(per_group_means(rewards, groups))
        means[side] = {"mean": mean, "low": low, "high": high}
    return {"win_rate": asdict(result), "rewards": means, "bootstrap_resamples": n_boot}


def per_group_means(values: Sequence[float], groups: Sequence[Hashable]) -> list[float]:
    """The mean of ``values`` within each group, in order of first appearance."""
    members: dict[Hashable, list[float]] = defaultdict(list)
    for value, group in zip(values, groups):
        members[group].append(value)
    return [fmean(v) for v in members.values()]


def format_report(report: dict, names: tuple[str, str], reward_spec: str) -> str:
    """A small plain-text table of the report."""
    w = report["win_rate"]
    width = max(len(names[0]), len(names[1]), 6)
    lines = [f"reward: {reward_spec}   prompts: {w['groups']}   comparisons: {w['n']}", "",
             f"    {'policy':<{width}}  mean reward  95% CI (normal, over prompts)"]
    for label, name, side in (("A", names[0], "a"), ("B", names[1], "b")):
        r = report["rewards"][side]
        lines.append(f"{label}   {name:<{width}}  {r['mean']:>11.4f}  [{r['low']:.4f}, {r['high']:.4f}]")
    lines += ["", f"win rate of A over B: {w['rate']:.3f}  95% CI [{w['low']:.3f}, {w['high']:.3f}] "
                  f"(bootstrap over prompts, {report['bootstrap_resamples']} resamples)",
              f"wins {w['wins']}, ties {w['ties']} (count half), losses {w['losses']}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tiltlm compare``: win rate of A over B under a reward."""
    parser.add_argument("--a", required=True, help="a tiltlm generate output (.jsonl) or a model to sample")
    parser.add_argument("--b", required=True, help="the same, for the other side")
    parser.add_argument("--prompts", default=None, help="prompts file, needed when --a or --b is a model")
    parser.add_argument("--reward", default="vader",
                        help="vader, module:function, file.py:function, or a sequence-classifier directory")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    add_sampling_arguments(parser)


def is_generations_file(name: str) -> bool:
    return Path(name).is_file() and name.lower().endswith(".jsonl")


def side_generations(name: str, args: argparse.Namespace, prompts_cache: dict) -> list[Generation]:
    """A side's completions: read from a generations file, or sampled from a model on ``--prompts``."""
    if is_generations_file(name):
        return read_generations(name)
    if not args.prompts:
        raise CompareError(f"{name!r} is not a .jsonl generations file, so it is taken as a model to sample "
                           f"from, which needs --prompts")
    if "prompts" not in prompts_cache:
        prompts_cache["prompts"] = read_prompts(args.prompts)
    device = pick_device(args.device)
    model, tokenizer = load_policy(name, parse_dtype(args.dtype, device), device,
                                   trust_remote_code=args.trust_remote_code)
    samples = sample(model, tokenizer, prompts_cache["prompts"], n=args.samples, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                     chat=args.chat, progress=not args.no_progress)
    return [Generation(s.prompt, s.sample, s.completion) for s in samples]


def run(args: argparse.Namespace) -> int:
    """Entry point of ``tiltlm compare``; returns the exit code."""
    names = (args.a, args.b)
    try:
        check_sampling_options(args.samples, args.max_new_tokens, args.temperature, args.top_p, args.batch_size)
        reward = load_reward(args.reward, pick_device(args.device))
        cache: dict = {}
        pairs = match(side_generations(args.a, args, cache), side_generations(args.b, args, cache), names)
        report = compare(pairs, reward, n_boot=args.n_boot, seed=args.seed)
    except (CompareError, DataError, ModelError, RewardError, ValueError) as error:
        print(f"tiltlm compare: error: {error}", file=sys.stderr)
        return 2
    report.update({"a": args.a, "b": args.b, "reward": args.reward})
    print(format_report(report, names, args.reward))
    if args.json:
        # NaN (the interval of a single prompt) is not JSON: write null
        clean = json.loads(json.dumps(report), parse_constant=lambda _: None)
        Path(args.json).write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    return 0
