"""Rewards (tiltlm.rewards): VADER, user functions, and sequence-classifier directories."""

from __future__ import annotations

import math

import pytest
import torch
from test_generate import BOS, tiny_tokenizer, word_ids
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from tiltlm.rewards import RewardError, load_reward

TEXTS = ["I love this wonderful movie!", "This was terrible, awful and boring.", "The film is a film."]


def test_vader_is_vaders_own_compound_score():
    analyzer = SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(text)["compound"] for text in TEXTS]
    assert load_reward("vader")(["prompt"] * 3, TEXTS) == expected
    assert expected[0] > 0.5 and expected[1] < -0.5  # the examples mean what they say


USER_FILE = '''
def score(prompt, completion):
    return len(completion) - 0.5 * len(prompt)

def words(prompt, completion):
    return "many"

def nan(prompt, completion):
    return float("nan")

def broken(prompt, completion):
    return 1 / 0

LIMIT = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_FILE)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "my_rewards.py"


def test_function_from_a_file_path_and_from_a_module_name(user_module):
    prompts, completions = ["ab", "abcd"], ["xyz", ""]
    expected = [3 - 1.0, 0 - 2.0]
    assert load_reward(f"{user_module}:score")(prompts, completions) == expected
    assert load_reward("my_rewards:score")(prompts, completions) == expected  # found in the working directory


@pytest.mark.parametrize("spec, message", [
    ("sentiment", "not a known reward"),
    ("missing_file.py:score", "file missing_file.py not found"),
    ("no_such_module_xyz:score", "no module named 'no_such_module_xyz'"),
    ("my_rewards:absent", "has no function 'absent'"),
    ("my_rewards:LIMIT", "not callable"),
])
def test_bad_specs_are_named_in_the_error(user_module, spec, message):
    with pytest.raises(RewardError, match=message) as caught:
        load_reward(spec)
    assert repr(spec) in str(caught.value)


@pytest.mark.parametrize("function, message", [("words", "returned str"), ("nan", "returned nan"),
                                               ("broken", "failed on completion 0.*ZeroDivisionError")])
def test_a_function_returning_no_number_is_an_error_naming_it(user_module, function, message):
    reward = load_reward(f"my_rewards:{function}")
    with pytest.raises(RewardError, match=message) as caught:
        reward(["a"], ["b"])
    assert f"my_rewards:{function}" in str(caught.value)


def save_classifier(directory, labels: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=labels, pad_token_id=0)
    torch.manual_seed(labels)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return model


@pytest.mark.parametrize("labels", [1, 2])
def test_classifier_directory_scores_like_a_direct_forward(tmp_path, labels):
    model = save_classifier(tmp_path, labels)
    prompts = ["the movie", "i", [{"role": "user", "content": "a film"}]]
    completions = [" was great", " loved it and the plot and the actors", "great film"]
    # what the model should read, written out by hand: BOS + words, or the rendered chat
    inputs = [[BOS] + word_ids("the movie was great"), [BOS] + word_ids("i loved it and the plot and the actors"),
              word_ids("<|user|> a film </s> <|assistant|> great film </s>")]
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0] for ids in inputs]  # one at a time: no padding
    expected = [(row[0] if labels == 1 else row[1] - row[0]).item() for row in logits]
    got = load_reward(str(tmp_path), batch_size=2)(prompts, completions)  # batches of 2 get padded
    assert got == pytest.approx(expected, abs=1e-5)
    assert all(math.isfinite(value) for value in got)


def test_pickled_classifier_weights_are_refused_without_suggesting_weights_only_false(tmp_path, capsys):
    """issue 15, item 11, of its kind: a reward model's pytorch_model.bin holding a pickle payload."""
    import os

    from tiltlm.models import ModelError

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    model = save_classifier(tmp_path, 1)
    os.remove(tmp_path / "model.safetensors")
    torch.save({**model.state_dict(), "payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises((RewardError, ModelError)) as caught:
        load_reward(str(tmp_path))
    assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)
    assert "code ran" not in capsys.readouterr().out
