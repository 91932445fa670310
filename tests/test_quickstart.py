"""The quickstart end to end: on a tiny model (fast), and on the real SmolLM2 (slow)."""

import json
from statistics import fmean

import pytest

from tiltlm.cli import main

REWARD = '''
def score(prompt, completion):
    """A deterministic stand-in for sentiment: the share of vowels in the completion."""
    letters = [c for c in completion.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / max(len(letters), 1)
'''


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def vowel_share(text):
    letters = [c for c in text.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / max(len(letters), 1)


def check_outputs(out, reward):
    pairs = read(out / "pairs.jsonl")
    assert pairs and set(pairs[0]) >= {"prompt", "chosen", "rejected"}
    for pair in pairs:  # chosen is the higher-reward continuation, by the reward recomputed here
        assert reward(pair["chosen"]) > reward(pair["rejected"])
    report = (out / "report.md").read_text()
    for name in ("before", "after"):
        rows = read(out / f"heldout_{name}.jsonl")
        for row in rows:
            assert row["reward"] == pytest.approx(reward(row["completion"]))
        by_prompt = {}
        for row in rows:
            by_prompt.setdefault(row["prompt"], []).append(row["reward"])
        mean = fmean(fmean(v) for v in by_prompt.values())
        assert f"mean reward {name} (" in report and f"{mean:+.3f} (95% CI" in report
    assert all(row["log_ratio"] == 0.0 for row in read(out / "heldout_before.jsonl"))  # the reference itself
    assert (out / "training.png").stat().st_size > 1000


def test_quickstart_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "vowels.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "qs"
    assert main(["quickstart", "--quick", "--model", str(tiny_model_dir), "--reward", "vowels:score",
                 "--output", str(out), "--lr", "0.01"]) == 0
    check_outputs(out, vowel_share)
    assert main(["quickstart", "--quick", "--model", str(tiny_model_dir), "--output", str(out)]) == 2  # no clobber


@pytest.mark.slow
def test_quickstart_on_smollm2(tmp_path):
    import torch

    from tiltlm.rewards import vader

    torch.set_num_threads(2)  # a real model: the machine's two cores help here

    out = tmp_path / "qs"
    assert main(["quickstart", "--quick", "--output", str(out)]) == 0
    check_outputs(out, lambda text: vader([""], [text])[0])


def test_quickstart_trains_on_ranked_lists_of_every_sample(tiny_model_dir, tmp_path, monkeypatch):
    import yaml

    (tmp_path / "vowels.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "qs"
    assert main(["quickstart", "--quick", "--model", str(tiny_model_dir), "--reward", "vowels:score",
                 "--output", str(out), "--lr", "0.01", "--samples", "4", "--preferences", "ranked"]) == 0
    lists, pairs = read(out / "pairs-ranked.jsonl"), read(out / "pairs.jsonl")
    assert [row["prompt"] for row in lists] == [row["prompt"] for row in pairs]  # the same prompts give both
    for row, pair in zip(lists, pairs):
        assert row["scores"] == pytest.approx([vowel_share(c) for c in row["completions"]])
        assert len(set(row["completions"])) == len(row["completions"]) >= 2
        best = row["completions"][row["scores"].index(max(row["scores"]))]
        assert vowel_share(best) == pytest.approx(vowel_share(pair["chosen"]))
    run = yaml.safe_load((out / "run" / "config.yaml").read_text())
    # the compute of one pair per prompt: 2 x 4 completions per step make 2 lists of 4; one epoch of pairs' steps
    assert (run["data"], run["batch_size"], run["max_steps"]) == (str(out / "pairs-ranked.jsonl"), 2, len(pairs) // 4)
    assert len(read(out / "run" / "metrics.jsonl")) == len(pairs) // 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preferences"] == "ranked" and summary["train_steps"] == len(pairs) // 4
