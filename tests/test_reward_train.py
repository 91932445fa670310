"""``tiltlm reward train`` / ``eval``: a tiny reward model learns, saves a sequence-classification model, and
scores the same through the trainer's path, Hugging Face's forward, load_reward and compare."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from tiltlm.commands import reward as reward_command
from tiltlm.compare import Generation, compare
from tiltlm.data import load_pairs, tokenize_pairs
from tiltlm.data.collate import collate_concatenated
from tiltlm.metrics import read_metrics
from tiltlm.models import load_tokenizer
from tiltlm.reward_model import load_reward_model, score_sequences
from tiltlm.rewards import load_reward


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tiltlm reward")
    reward_command.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A reward model trained from the tiny causal LM on the shared pairs: (run directory, pairs file)."""
    from conftest import PAIRS

    root = tmp_path_factory.mktemp("reward")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(root / "run"),
            "--lr", "2e-3", "--batch-size", "2", "--grad-accum", "2", "--epochs", "4", "--max-length", "64",
            "--max-prompt-length", "32", "--warmup-ratio", "0", "--save-every", "100", "--no-progress",
            "--no-tensorboard", "--reward-centering", "0.01"]
    assert reward_command.run(parse(argv)) == 0
    return root / "run", data


def scores_by_hand(final, data) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's (chosen, rejected) rewards through Hugging Face's own forward, one sequence at a time:
    prompt + completion ids as the trainer tokenises them (completion ending with EOS; the tiny tokenizer's
    pad is not EOS, so HF reads the score at that EOS)."""
    tokenizer = load_tokenizer(str(final))
    pairs, _ = tokenize_pairs(load_pairs(str(data)), tokenizer, 64, 32)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert model.config.num_labels == 1
    with torch.no_grad():
        score = lambda ids: model(input_ids=torch.tensor([ids])).logits[0, 0]
        return (torch.stack([score(p.prompt_ids + p.chosen_ids) for p in pairs]),
                torch.stack([score(p.prompt_ids + p.rejected_ids) for p in pairs]))


def test_reward_training_lowers_the_loss_and_final_loads_as_sequence_classification(trained):
    run, data = trained
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 8  # 8 pairs / (2 x 2) x 4 epochs
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/accuracies"] == 1.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/mean"):
        assert key in rows[-1]
    chosen, rejected = scores_by_hand(run / "final", data)
    assert bool((chosen > rejected).all())  # the model it saved orders every training pair


def test_trained_reward_model_scores_the_same_through_every_path(trained):
    run, data = trained
    final = str(run / "final")
    chosen, rejected = scores_by_hand(run / "final", data)
    # the trainer's path: a collated batch through score_sequences
    tokenizer = load_tokenizer(final)
    pairs, _ = tokenize_pairs(load_pairs(str(data)), tokenizer, 64, 32)
    with torch.no_grad():
        batched = score_sequences(load_reward_model(final, tokenizer), collate_concatenated(pairs, tokenizer.pad_token_id))
    torch.testing.assert_close(batched, torch.cat([chosen, rejected]), rtol=1e-5, atol=1e-5)
    # --reward DIR: texts in, floats out
    reward = load_reward(final)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    got = reward(prompts, [r["chosen"] for r in rows])
    assert got == pytest.approx(chosen.tolist(), abs=1e-5)
    # compare's scoring: policy A wrote the chosen completions, B the rejected ones
    a = [Generation(r["prompt"], 0, r["chosen"]) for r in rows]
    b = [Generation(r["prompt"], 0, r["rejected"]) for r in rows]
    report = compare(list(zip(a, b)), reward, n_boot=50)
    assert report["win_rate"]["rate"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert report["rewards"]["a"]["mean"] == pytest.approx(float(chosen.mean()), abs=1e-5)
    assert report["rewards"]["b"]["mean"] == pytest.approx(float(rejected.mean()), abs=1e-5)


def test_reward_eval_reports_the_loss_and_accuracy_of_a_direct_computation(trained, capsys):
    run, data = trained
    assert reward_command.run(parse(["eval", "--model", str(run / "final"), "--data", str(data)])) == 0
    result = json.loads(capsys.readouterr().out)
    chosen, rejected = scores_by_hand(run / "final", data)
    expected_loss = (-torch.nn.functional.logsigmoid(chosen - rejected)).mean()  # eval: no margin, no centring
    assert result["pairs"] == 8
    assert result["rewards/accuracies"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert result["rewards/margins"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-5)
    assert result["loss"] == pytest.approx(float(expected_loss), abs=1e-5)


def test_reward_train_refuses_unpaired_rows_before_writing(tiny_model_dir, tmp_path):
    from tiltlm.config import ConfigError

    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a", "completion": f" b{i}", "label": True}) + "\n" for i in range(4)))
    args = parse(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                  "--no-progress", "--no-tensorboard", "--batch-size", "2", "--grad-accum", "1"])
    with pytest.raises(ConfigError, match="reward-model trains on pairs"):
        reward_command.run(args)
    assert not (tmp_path / "run").exists()


def test_reward_model_trains_with_lora_its_score_head_included(tiny_model_dir, tmp_path):
    from conftest import PAIRS
    from peft import PeftModel

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--lora-r", "4",
            "--lr", "5e-3", "--batch-size", "2", "--grad-accum", "2", "--epochs", "3", "--max-length", "64",
            "--max-prompt-length", "32", "--warmup-ratio", "0", "--no-progress", "--no-tensorboard",
            "--merge-lora"]
    assert reward_command.run(parse(argv)) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    adapter = PeftModel.from_pretrained(base, out / "final")
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        # the trained head travels with the adapter: base + adapter scores as the merged model does
        torch.testing.assert_close(adapter.eval()(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
