"""``tiltlm frontier`` on a tiny model: the best-of-N KL formula against a simulation of best-of-N, every
number of the table recomputed from the saved samples, log-probs recomputed with a plain forward pass,
sampling and pair labelling repeated from the recorded seeds, and the user's mistakes."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tiltlm.cli import build_parser, main
from tiltlm.commands.options import from_args
from tiltlm.frontier import QUICK, FrontierConfig, best_of_n_kl, best_of_n_rewards
from tiltlm.frontier_report import Point, dpo_reward_at
from tiltlm.generate import sample
from tiltlm.models import load_model, load_tokenizer

PROMPTS = ["The film was", "What a lovely", "The service", "Tell me about", "I hated", "The food was",
           "A walk in", "Good day", "The acting", "Bread is", "The park", "My day"]
Z95 = 1.959963984540054


def letter_reward(prompt, completion):
    """The reward of the runs below, written again here: e's count up, a's count down."""
    return completion.count("e") - completion.count("a")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two threads on tiny tensors only wait for each other, the more so on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("frontier-inputs")
    (directory / "letters.py").write_text(
        "def score(prompt, completion):\n    return completion.count('e') - completion.count('a')\n")
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"reward": f"{directory / 'letters.py'}:score", "prompts": str(prompts)}


def frontier_argv(model, inputs, output, *extra):
    # A high learning rate, so that the tiny model's policies move visibly in three epochs.
    return ["frontier", "--model", str(model), "--reward", inputs["reward"], "--prompts", inputs["prompts"],
            "--quick", "--lr", "0.05", "--epochs", "3", "--output", str(output), *extra]


@pytest.fixture(scope="module")
def fixed_run(tiny_model_dir, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier") / "fixed"
    assert main(frontier_argv(tiny_model_dir, inputs, out, "--betas", "0.1,1", "--rounds", "2")) == 0
    return out, json.loads((out / "frontier.json").read_text())


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def interval(values) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=float)
    half = Z95 * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean(), values.mean() - half, values.mean() + half


def per_prompt(rows, value) -> list[float]:
    groups = {}
    for row in rows:
        groups.setdefault(row["index"], []).append(value(row))
    return [float(np.mean(groups[i])) for i in sorted(groups)]


# ------------------------------------------------------------------------------------ best-of-N


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_best_of_n_kl_formula_matches_a_simulation_of_best_of_n(n):
    # A reference over many outcomes, none heavy, with distinct rewards: draw N, keep the best, many
    # times; the plug-in KL of the kept outcomes' frequencies (bias about K / 2M = 0.0025) to the
    # reference approaches log N - (N - 1) / N.
    rng = np.random.default_rng(n)
    outcomes, rounds = 1000, 200_000
    p = rng.dirichlet(np.ones(outcomes))
    reward = rng.permutation(outcomes)
    draws = rng.choice(outcomes, size=(rounds, n), p=p)
    kept = draws[np.arange(rounds), reward[draws].argmax(axis=1)]
    q = np.bincount(kept, minlength=outcomes) / rounds
    seen = q > 0
    simulated = float((q[seen] * np.log(q[seen] / p[seen])).sum())
    assert best_of_n_kl(n) == pytest.approx(simulated, abs=0.012)


def test_best_of_n_rewards_take_the_best_of_each_disjoint_group():
    draws = [[0.1, 0.5, -0.2, 0.9], [0.3, 0.3, 0.0, -1.0]]
    assert best_of_n_rewards(draws, 1) == pytest.approx([0.325, -0.1])
    assert best_of_n_rewards(draws, 2) == pytest.approx([(0.5 + 0.9) / 2, (0.3 + 0.0) / 2])
    assert best_of_n_rewards(draws, 3) == pytest.approx([0.5, 0.3])  # the fourth draw is left over
    assert best_of_n_rewards(draws, 4) == pytest.approx([0.9, 0.3])
    with pytest.raises(ValueError, match="best-of-8 needs at least 8 draws"):
        best_of_n_rewards(draws, 8)


def test_dpo_reward_at_matching_kl_interpolates_between_bracketing_betas():
    def point(method, kl, reward, beta=None):
        return Point(name=f"{method} {beta}", method=method, reward=(reward, reward, reward), kl=(kl, kl, kl),
                     kl_source="samples", beta=beta)

    points = [point("dpo", 4.0, 0.40, 0.05), point("dpo", 1.0, 0.10, 1.0), point("dpo", 2.0, 0.30, 0.1),
              point("preferred-ft", 3.0, 0.20)]
    reward, low, high = dpo_reward_at(points, 3.0)
    assert reward == pytest.approx(0.35) and (low.beta, high.beta) == (0.1, 0.05)  # halfway from 0.30 to 0.40
    assert dpo_reward_at(points, 1.0)[0] == pytest.approx(0.10)
    assert dpo_reward_at(points, 0.5) is None and dpo_reward_at(points, 4.5) is None


# ------------------------------------------------------------------------------ the run's numbers


def test_run_writes_every_point_report_and_plot(fixed_run):
    out, result = fixed_run
    names = [p["name"] for p in result["points"]]
    assert names == ["best-of-1", "best-of-2", "best-of-4", "DPO beta=0.1", "DPO beta=1", "preferred-FT",
                     "DPO beta=0.1 round 2"]
    report = (out / "report.md").read_text()
    assert "](frontier.png)" in report and "Wall time:" in report
    command = re.search(r"```bash\n(.*)\n```", report).group(1)
    assert command.startswith("tiltlm frontier ") and "--betas 0.1,1" in command and "--rounds 2" in command
    assert "always against the original reference (iterative rounds included)" in report
    assert "- preferred-FT (KL " in report.split("## At matching KL")[1]
    for point in result["points"]:  # one table row per point, with the JSON's numbers as printed
        row = next(line for line in report.splitlines() if line.startswith(f"| {point['name']} |"))
        assert f"{point['reward']['mean']:+.3f}" in row
    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    for name in ("pairs-round1.jsonl", "pairs-round2.jsonl", "runs/dpo-beta0.1/final", "runs/dpo-beta1/final",
                 "runs/preferred-ft/final", "runs/dpo-beta0.1-round2/final", "runs/dpo-beta0.1/merged"):
        assert (out / name).exists(), name


def test_table_values_are_recomputed_from_the_saved_samples(fixed_run):
    out, result = fixed_run
    trained = [p for p in result["points"] if p["method"] != "best-of-n"]
    for point in trained:
        rows = rows_of(out / point["samples_file"])
        assert len(rows) == len(PROMPTS[-4:]) * 2  # held-out prompts x eval samples (--quick)
        assert {PROMPTS[-4:][row["index"]] == row["prompt"] for row in rows} == {True}
        assert [row["reward"] for row in rows] == [letter_reward(r["prompt"], r["completion"]) for r in rows]
        expected_reward = interval(per_prompt(rows, lambda r: r["reward"]))
        expected_kl = interval(per_prompt(rows, lambda r: r["logp_policy"] - r["logp_ref"]))
        got = point["reward"], point["kl"]
        assert [got[0]["mean"], got[0]["low"], got[0]["high"]] == pytest.approx(expected_reward), point["name"]
        assert [got[1]["mean"], got[1]["low"], got[1]["high"]] == pytest.approx(expected_kl), point["name"]
    # the policies moved: their samples are not the reference's
    assert any(abs(p["kl"]["mean"]) > 0.05 for p in trained)

    draws = rows_of(out / "samples" / "reference-draws.jsonl")
    rewards = np.array([[r["reward"] for r in draws if r["index"] == i] for i in range(4)])  # 4 prompts x 4 draws
    for point in (p for p in result["points"] if p["method"] == "best-of-n"):
        n = point["n"]
        best = rewards.reshape(4, 4 // n, n).max(axis=2).mean(axis=1)
        assert [point["reward"]["mean"], point["reward"]["low"], point["reward"]["high"]] == pytest.approx(interval(best))
        assert point["kl"]["mean"] == pytest.approx(math.log(n) - (n - 1) / n)


def forward_logps(model, rows) -> list[float]:
    """log p(completion | prompt) from one plain forward pass per row: no batching, no padding."""
    values = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
            logps = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            start = len(row["prompt_ids"]) - 1
            targets = ids[0, 1:][start:]
            values.append(float(logps[start:].gather(1, targets[:, None]).sum()))
    return values


def test_kl_log_probs_are_under_the_policy_and_the_original_reference(fixed_run, tiny_model_dir):
    from peft import PeftModel

    out, result = fixed_run
    original = load_model(str(tiny_model_dir)).eval()
    by_name = {p["name"]: p for p in result["points"]}
    cases = {"DPO beta=0.1": (str(tiny_model_dir), "runs/dpo-beta0.1/final"),
             "DPO beta=0.1 round 2": (str(out / "runs/dpo-beta0.1/merged"), "runs/dpo-beta0.1-round2/final")}
    for name, (start, adapter) in cases.items():
        rows = rows_of(out / by_name[name]["samples_file"])
        policy = PeftModel.from_pretrained(load_model(start), str(out / adapter)).eval()
        assert [r["logp_policy"] for r in rows] == pytest.approx(forward_logps(policy, rows), abs=1e-4)
        # round 2 started from round 1, yet its KL is against the original model
        assert [r["logp_ref"] for r in rows] == pytest.approx(forward_logps(original, rows), abs=1e-4)


def test_sampling_and_pairs_repeat_from_the_recorded_seeds(fixed_run, tiny_model_dir):
    out, result = fixed_run
    config = result["config"]
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    again = sample(model, tokenizer, PROMPTS[-4:], n=4, max_new_tokens=config["max_new_tokens"],
                   seed=result["eval_seed"], batch_size=config["gen_batch_size"])
    saved = rows_of(out / "samples" / "reference-draws.jsonl")
    assert [s.completion_ids for s in again] == [r["completion_ids"] for r in saved]

    train = sample(model, tokenizer, PROMPTS[:8], n=2, max_new_tokens=config["max_new_tokens"],
                   seed=result["pairs_seed_round1"], batch_size=config["gen_batch_size"])
    expected = []
    for i in range(8):
        mine = sorted((letter_reward(s.prompt, s.completion), s.sample, s.completion) for s in train if s.index == i)
        low, high = mine[0], mine[-1]
        if high[0] > low[0]:
            expected.append((PROMPTS[i], high[2], low[2]))
    pairs = rows_of(out / "pairs-round1.jsonl")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == expected and expected


def test_each_policy_trains_with_its_own_objective_and_reference(fixed_run, tiny_model_dir, inputs, tmp_path):
    import yaml

    out, _ = fixed_run

    def config(run):
        return yaml.safe_load((out / "runs" / run / "config.yaml").read_text())

    sft = config("preferred-ft")
    assert (sft["loss"], sft["ref_mode"], sft["lora_r"]) == ("nll", "none", 16)
    for beta in (0.1, 1):
        dpo = config(f"dpo-beta{beta:g}")
        assert (dpo["loss"], dpo["beta"], dpo["ref_mode"], dpo["model"]) == ("sigmoid", beta, "adapters-off",
                                                                          str(tiny_model_dir))
    fixed = config("dpo-beta0.1-round2")  # --ref-update fixed: the original model stays the reference
    assert (fixed["model"], fixed["ref"], fixed["ref_mode"]) == (str(out / "runs/dpo-beta0.1/merged"),
                                                                 str(tiny_model_dir), "online")

    moving = tmp_path / "current"
    assert main(frontier_argv(tiny_model_dir, inputs, moving, "--betas", "0.3", "--round-beta", "0.3",
                              "--rounds", "2", "--best-of", "1", "--ref-update", "current")) == 0
    current = yaml.safe_load((moving / "runs/dpo-beta0.3-round2/config.yaml").read_text())
    assert (current["model"], current["ref"], current["ref_mode"]) == (str(moving / "runs/dpo-beta0.3/merged"),
                                                                       None, "adapters-off")


# ----------------------------------------------------------------------------------- user mistakes


def test_an_existing_report_is_kept_without_overwrite(fixed_run, tiny_model_dir, inputs, capsys):
    out, _ = fixed_run
    before = (out / "report.md").read_text()
    assert main(frontier_argv(tiny_model_dir, inputs, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.md").read_text() == before


@pytest.mark.parametrize("extra, expected", [
    (["--betas", "0.1,strong"], "betas = '0.1,strong'"),
    (["--betas", "0.1,-1"], "positive numbers"),
    (["--best-of", "0,4"], "best_of = '0,4'"),
    (["--rounds", "0"], "rounds = 0"),
    (["--samples", "1"], "at least 2 continuations"),
    (["--heldout", "1"], "heldout = 1"),
    (["--lora-r", "0"], "lora_r = 0"),
    (["--train-prompts", "11"], "12 prompts cannot give 11 training prompts and 4 held-out"),
    (["--prompts", "absent.jsonl"], "absent.jsonl: no such file"),
    (["--reward", "nowhere.py:score"], "nowhere.py not found"),
])
def test_user_mistakes_get_one_clear_line(extra, expected, tiny_model_dir, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(frontier_argv(tiny_model_dir, inputs, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # a mistake leaves nothing behind


def test_a_training_run_stopped_early_stops_the_frontier_with_a_message(tiny_model_dir, inputs, tmp_path, capsys,
                                                                         monkeypatch):
    import tiltlm.frontier

    # train() returns without final/ when SIGTERM stops it (its checkpoint is kept for --resume)
    monkeypatch.setattr(tiltlm.frontier, "train", lambda config: Path(config.output))
    assert main(frontier_argv(tiny_model_dir, inputs, tmp_path / "out", "--best-of", "1")) == 1
    err = capsys.readouterr().err
    assert "stopped before its last step" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "report.md").exists()


def test_quick_sets_defaults_and_explicit_options_win():
    args = build_parser().parse_args(["frontier", "--quick", "--epochs", "7", "--samples", "4"])
    config = from_args(FrontierConfig, args, QUICK if args.quick else None)
    assert (config.epochs, config.samples, config.heldout) == (7, 4, 4)
    assert from_args(FrontierConfig, build_parser().parse_args(["frontier"])) == FrontierConfig()
