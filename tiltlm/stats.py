"""Means with 95% intervals, over the units that were sampled independently (prompts).

Samples of one prompt share it and are not independent, so a prompt's values are averaged first
(:func:`per_group_means`) and intervals are taken over prompts. :func:`mean_ci` is the normal interval
``mean +- z s / sqrt(n)``: with fewer than about 30 prompts it is too narrow (a t interval would be
wider). :func:`grouped_bootstrap` is the percentile bootstrap (Efron & Tibshirani 1993, "An
Introduction to the Bootstrap", ch. 13) of a ratio of totals, resampling whole groups.
"""

from __future__ import annotations

import math
from collections import defaultdict
from statistics import NormalDist, fmean, stdev
from typing import Hashable, Sequence

import numpy as np

Z95 = NormalDist().inv_cdf(0.975)  # 1.95996...


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the normal 95% interval, ``s`` with divisor n - 1; NaN bounds for one value."""
    if not values:
        raise ValueError("no values: expected at least one")
    mean = fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = Z95 * stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def format_interval(interval: tuple[float, float, float], label: str = "") -> str:
    """``"+0.123 (LABEL+0.100 to +0.150)"``; only the mean when the interval has no width (exact values)."""
    mean, low, high = interval
    return f"{mean:+.3f}" if low == high else f"{mean:+.3f} ({label}{low:+.3f} to {high:+.3f})"


def per_group_means(values: Sequence[float], groups: Sequence[Hashable]) -> list[float]:
    """The mean of ``values`` within each group, in order of first appearance."""
    members: dict[Hashable, list[float]] = defaultdict(list)
    for value, group in zip(values, groups):
        members[group].append(value)
    return [fmean(v) for v in members.values()]


def grouped_bootstrap(values: Sequence[float], groups: Sequence[Hashable], n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``sum(values) / len(values)`` when whole groups are the
    independent units: each resample draws as many groups as there are, with replacement, and its
    statistic is its total value over its total count (the plain mean when groups are equally large)."""
    if n_boot < 1:
        raise ValueError(f"n_boot = {n_boot}: expected at least 1 resample")
    if len(groups) != len(values):
        raise ValueError(f"{len(groups)} group labels for {len(values)} values")
    index = {label: i for i, label in enumerate(dict.fromkeys(groups))}
    owner = np.array([index[label] for label in groups])
    sums = np.bincount(owner, weights=np.asarray(values, dtype=float), minlength=len(index))
    counts = np.bincount(owner, minlength=len(index)).astype(float)
    # each resample draws len(index) groups with replacement, in blocks (memory: block x groups indices)
    rng, block, ratios = np.random.default_rng(seed), 256, []
    for start in range(0, n_boot, block):
        picks = rng.integers(0, len(index), size=(min(block, n_boot - start), len(index)))
        ratios.append(sums[picks].sum(axis=1) / counts[picks].sum(axis=1))
    low, high = np.quantile(np.concatenate(ratios), [0.025, 0.975])
    return float(low), float(high)
