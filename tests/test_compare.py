"""Win rates and intervals (tiltlm.compare), checked against hand computations and the normal approximation."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
from test_generate import save_tiny

from tiltlm.cli import main
from tiltlm.compare import CompareError, Generation, match, read_generations, win_rate
from tiltlm.stats import mean_ci

Z = 1.959963984540054  # the 97.5% standard normal quantile


def test_hand_computed_win_rate_with_a_tie():
    result = win_rate([1, 2, 3, 4], [0, 2, 5, 1])  # win, tie, loss, win
    assert (result.wins, result.ties, result.losses, result.n) == (2, 1, 1, 4)
    assert result.rate == (2 + 0.5) / 4
    assert result.low <= result.rate <= result.high


def test_a_over_b_and_b_over_a_sum_to_one():
    rng = random.Random(0)
    a = [rng.choice([0, 1, 2]) for _ in range(50)]  # many ties
    b = [rng.choice([0, 1, 2]) for _ in range(50)]
    assert win_rate(a, b).rate + win_rate(b, a).rate == pytest.approx(1.0)


def test_all_ties_give_one_half_with_no_spread():
    result = win_rate([0.3] * 10, [0.3] * 10)
    assert (result.rate, result.low, result.high) == (0.5, 0.5, 0.5)


def simulated_rewards(n: int, p_win: float, p_tie: float, seed: int) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    a, b = [], []
    for _ in range(n):
        u = rng.random()
        a.append(1.0 if u < p_win else 0.0 if u < p_win + p_tie else -1.0)
        b.append(0.0)
    return a, b


def test_interval_contains_the_rate_and_narrows_like_one_over_root_n():
    small = win_rate(*simulated_rewards(50, 0.5, 0.2, seed=1))
    large = win_rate(*simulated_rewards(800, 0.5, 0.2, seed=1))
    for result in (small, large):
        assert result.low <= result.rate <= result.high
    ratio = (small.high - small.low) / (large.high - large.low)
    assert 2.5 < ratio < 6.0  # sqrt(800 / 50) = 4


def test_bootstrap_agrees_with_the_normal_approximation_for_large_n():
    a, b = simulated_rewards(400, 0.45, 0.2, seed=2)
    result = win_rate(a, b, n_boot=2000, seed=0)
    scores = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    p = sum(scores) / len(scores)
    half = Z * math.sqrt(sum((s - p) ** 2 for s in scores) / len(scores) / len(scores))
    assert result.low == pytest.approx(p - half, abs=0.01)
    assert result.high == pytest.approx(p + half, abs=0.01)


def test_same_seed_same_interval():
    a, b = simulated_rewards(60, 0.4, 0.1, seed=3)
    assert win_rate(a, b, seed=7) == win_rate(a, b, seed=7)


def wald_interval(scores: list[float]) -> tuple[float, float]:
    """Normal-approximation 95% interval of a mean of outcomes: ``mean +- z sqrt(var / n)`` with the
    plug-in variance (divisor n), which is ``p (1 - p)`` when there are no ties (the Wald interval)."""
    n, mean = len(scores), statistics.fmean(scores)
    half = Z * math.sqrt(sum((s - mean) ** 2 for s in scores) / n / n)
    return mean - half, mean + half


def test_wald_interval_by_hand():
    low, high = wald_interval([1, 1, 1, 0])  # p = 3/4, no ties: p (1 - p) / n
    half = Z * math.sqrt(0.75 * 0.25 / 4)
    assert (low, high) == pytest.approx((0.75 - half, 0.75 + half))


def test_groups_are_resampled_whole():
    # one prompt with a win and a loss: every resample draws that prompt, so the rate never moves
    grouped = win_rate([1, 0], [0, 1], groups=["p", "p"])
    assert (grouped.rate, grouped.low, grouped.high, grouped.groups) == (0.5, 0.5, 0.5, 1)
    ungrouped = win_rate([1, 0], [0, 1])
    assert (ungrouped.low, ungrouped.high) == (0.0, 1.0)


def test_mean_ci_by_hand():
    values = [2, 4, 4, 4, 5, 5, 7, 9]
    sd = math.sqrt(sum((v - 5) ** 2 for v in values) / 7)  # sample standard deviation, divisor n - 1
    assert sd == pytest.approx(statistics.stdev(values))
    mean, low, high = mean_ci(values)
    assert (mean, low, high) == pytest.approx((5, 5 - Z * sd / math.sqrt(8), 5 + Z * sd / math.sqrt(8)))
    single = mean_ci([3.0])
    assert single[0] == 3.0 and math.isnan(single[1]) and math.isnan(single[2])


# ---------------------------------------------------------------------------- files, matching, CLI


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_rows_are_matched_by_prompt_and_sample_not_by_order(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [{"prompt": "p", "sample": 0, "completion": "a0"},
                                          {"prompt": "p", "sample": 1, "completion": "a1"},
                                          {"prompt": [{"role": "user", "content": "q"}], "sample": 0, "completion": "aq"}])
    b = write_rows(tmp_path / "b.jsonl", [{"prompt": [{"role": "user", "content": "q"}], "sample": 0, "completion": "bq"},
                                          {"prompt": "p", "sample": 1, "completion": "b1"},
                                          {"prompt": "p", "sample": 0, "completion": "b0"}])
    pairs = match(read_generations(a), read_generations(b), ("a", "b"))
    assert [(x.completion, y.completion) for x, y in pairs] == [("a0", "b0"), ("a1", "b1"), ("aq", "bq")]


def test_unmatched_rows_are_an_error_naming_both_sides():
    a = [Generation("p", 0, "x"), Generation("q", 0, "y")]
    b = [Generation("p", 0, "z")]
    with pytest.raises(CompareError, match=r"1 rows only in A.jsonl, 0 only in B.jsonl.*'q'"):
        match(a, b, ("A.jsonl", "B.jsonl"))


def test_duplicate_rows_name_the_line(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [{"prompt": "p", "sample": 0, "completion": "x"},
                                             {"prompt": "p", "sample": 0, "completion": "y"}])
    with pytest.raises(CompareError, match=r"a.jsonl:2: the same prompt and sample 0 as line 1"):
        read_generations(path)


def test_cli_on_two_generation_files(tmp_path, monkeypatch, capsys):
    (tmp_path / "length_reward.py").write_text("def score(prompt, completion):\n    return len(completion)\n")
    monkeypatch.chdir(tmp_path)
    a = write_rows(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "completion": c} for i, c in enumerate(["aaa", "a", "aa", "aaaa"])])
    b = write_rows(tmp_path / "b.jsonl", [{"prompt": f"p{i}", "completion": c} for i, c in enumerate(["aa", "aa", "aa", "a"])])
    code = main(["compare", "--a", str(a), "--b", str(b), "--reward", "length_reward:score", "--json", "out.json"])
    assert code == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["win_rate"]["rate"] == (2 + 0.5) / 4  # win, loss, tie, win
    assert report["rewards"]["a"]["mean"] == (3 + 1 + 2 + 4) / 4
    assert report["rewards"]["b"]["mean"] == (2 + 2 + 2 + 1) / 4
    assert "win rate of A over B: 0.625" in capsys.readouterr().out


def test_cli_samples_models_and_a_model_against_itself_ties(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "the movie was"}, {"prompt": "i loved it"}])
    code = main(["compare", "--a", str(model), "--b", str(model), "--prompts", str(prompts), "--samples", "2",
                        "--max-new-tokens", "5", "--reward", "vader", "--no-progress", "--json", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["win_rate"]["ties"] == 4 and report["win_rate"]["rate"] == 0.5  # same model, same seed


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    code = main(["compare", "--a", "not_a_model_dir/", "--b", str(tmp_path / "x.jsonl")])
    assert code == 2
    assert "needs --prompts" in capsys.readouterr().err
