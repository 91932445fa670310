"""``tiltlm experiment hh`` on a tiny model and a slice of the real HH-RLHF file: the split holds no prompt in
both sets, every stage's result is saved and reused, and the report carries figures, never prompt text."""

import gzip
import json
from pathlib import Path

import pytest

from tiltlm.cli import main
from tiltlm.hh import HHConfig, split_by_prompt

HH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
pytestmark = pytest.mark.skipif(not HH.is_file(), reason=f"{HH} not present")


def rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_split_keeps_every_prompt_on_one_side_and_repeats_from_its_seed(tmp_path):
    config = HHConfig(data=str(HH), train_pairs=400, heldout_pairs=120)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    counts = split_by_prompt(config, tmp_path / "a")
    train, heldout = rows(tmp_path / "a/train.jsonl"), rows(tmp_path / "a/heldout.jsonl")
    assert (counts["train_pairs"], len(train)) == (400, 400) and len(heldout) == counts["heldout_pairs"] >= 120
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout} and counts["prompts_in_both"] == 0
    with gzip.open(HH, "rt", encoding="utf-8") as handle:  # each row is a pair of the file, prompt + reply rebuilt
        whole = {(r["chosen"], r["rejected"]) for r in map(json.loads, handle)}
    assert all((r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]) in whole for r in train + heldout)
    split_by_prompt(config, tmp_path / "b")
    assert rows(tmp_path / "b/train.jsonl") == train  # the seed fixes the split


def test_experiment_end_to_end_resumes_and_reports_figures_only(tiny_model_dir, tmp_path, capsys):
    out, report = tmp_path / "hh", tmp_path / "report"
    argv = ["experiment", "hh", "--data", str(HH), "--model", str(tiny_model_dir), "--output", str(out),
            "--report", str(report), "--train-pairs", "16", "--heldout-pairs", "8", "--batch-size", "4",
            "--grad-accum", "1", "--max-length", "96", "--max-prompt-length", "64", "--generate-prompts", "3",
            "--max-new-tokens", "4", "--lr", "1e-3"]
    assert main(argv) == 0
    results = json.loads((report / "results.json").read_text())
    for key in ("reward_model", "dpo_implicit", "preferred_ft_implicit"):
        entry = results[key]
        assert entry["pairs"] == len(rows(out / "heldout.jsonl")) and entry["ci"][0] <= entry["accuracy"] <= entry["ci"][1]
    for name in ("dpo", "preferred_ft"):
        rate = results["win_rates"][name]
        assert rate["ci"][0] <= rate["win_rate"] <= rate["ci"][1]
        # the win rate recomputed from the saved samples' rewards (ties half)
        mine, theirs = rows(out / f"samples_{name}.jsonl"), rows(out / "samples_reference.jsonl")
        wins = [(a["reward"] > b["reward"]) + 0.5 * (a["reward"] == b["reward"]) for a, b in zip(mine, theirs)]
        assert rate["win_rate"] == pytest.approx(sum(wins) / len(wins))
    # red-team prompts: no prompt or reply text in what the report directory holds
    written = (report / "report.md").read_text() + (report / "results.json").read_text()
    for row in rows(out / "heldout.jsonl") + rows(out / "train.jsonl"):
        assert row["prompt"].strip()[:40] not in written and row["chosen"].strip()[:40] not in written
    saved = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert main(argv) == 0  # every stage done: nothing is recomputed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name != "experiment.json"} == \
        {k: v for k, v in saved.items() if k != "experiment.json"}
    capsys.readouterr()
    assert main(argv[:-2] + ["--lr", "1e-2"]) == 2  # other settings in the same output: refused
    assert "other settings" in capsys.readouterr().err
