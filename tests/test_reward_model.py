"""Reward-model scoring: one body pass over a collated Batch gives, per sequence, what the model's own
Hugging Face forward gives for that prompt + completion alone; saved models load back as reward models."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from tiltlm.data.collate import collate_concatenated, collate_shared
from tiltlm.data.types import TokenizedPair
from tiltlm.losses import bradley_terry_reward_loss
from tiltlm.models import ModelError
from tiltlm.reward_model import last_token_positions, load_reward_model, prepare_reward_model, score_sequences
from model_builders import tiny_reward_model  # tests/ is on sys.path

VOCAB, PAD = 64, 63


def random_pairs(count: int, seed: int) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(low: int, high: int) -> list[int]:  # never the pad id, so HF's forward reads the last token
        return [rng.randrange(PAD) for _ in range(rng.randint(low, high))]

    # one-token completions included: they are the tricky case of the shared layout
    return [TokenizedPair(ids(1, 7), ids(1, 4), ids(1, 4), source=str(i)) for i in range(count)]


def naive_scores(model, pairs: list[TokenizedPair]) -> torch.Tensor:
    """The model's own forward on each prompt + completion alone: chosen of every pair, then rejected."""
    sequences = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in sequences])


@pytest.mark.parametrize("layout", ["concatenated", "shared", "packed"])
def test_batch_scores_equal_each_sequence_scored_alone(layout):
    model = tiny_reward_model()
    pairs = random_pairs(8, seed=1)
    assert any(len(p.rejected_ids) == 1 for p in pairs)
    batch = {"concatenated": lambda: collate_concatenated(pairs, PAD),
             "shared": lambda: collate_shared(pairs, PAD),
             "packed": lambda: collate_shared(pairs, PAD, row_tokens=40)}[layout]()
    with torch.no_grad():
        got = score_sequences(model, batch)
    torch.testing.assert_close(got, naive_scores(model, pairs), rtol=1e-5, atol=1e-5)


def test_last_token_positions_point_at_each_sequences_last_completion_token():
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6]), TokenizedPair([7], [8], [9, 10])]
    batch = collate_shared(pairs, PAD)
    rows, cols = last_token_positions(batch)
    # row 0: 1 2 3 4 5 6 -> chosen ends at column 4, rejected (one token, predicted from column 1 like
    # the first chosen token) at 5; row 1: 7 8 9 10 -> columns 1 and 3
    assert rows.tolist() == [0, 1, 0, 1] and cols.tolist() == [4, 1, 5, 3]
    assert batch.input_ids[rows, cols].tolist() == [5, 8, 6, 10]
    rows, cols = last_token_positions(collate_concatenated(pairs, PAD))
    assert rows.tolist() == [0, 1, 2, 3] and cols.tolist() == [4, 1, 2, 2]


def test_one_token_completions_at_a_shared_prompt_are_found_in_packed_rows():
    pairs = [TokenizedPair([1], [2], [3]), TokenizedPair([4, 5], [6], [7, 8]), TokenizedPair([9], [10, 11], [12])]
    batch = collate_shared(pairs, PAD, row_tokens=100)  # one row: 1 2 3 | 4 5 6 7 8 | 9 10 11 12
    rows, cols = last_token_positions(batch)
    assert batch.input_ids[rows, cols].tolist() == [2, 6, 11, 3, 8, 12]


def test_gradients_reach_the_body_and_the_head():
    model = tiny_reward_model()
    pairs = random_pairs(3, seed=2)
    scores = score_sequences(model, collate_shared(pairs, PAD))
    bradley_terry_reward_loss(scores[:3], scores[3:]).mean().backward()
    assert model.score.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_saved_reward_model_loads_as_sequence_classification_with_its_pad_token(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_reward_model(seed=3)
    model.config.pad_token_id = None
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=2)
    assert prepare_reward_model(model, tokenizer) is None
    model.save_pretrained(tmp_path / "final")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    assert loaded.config.pad_token_id == PAD and loaded.config.num_labels == 1
    pairs = random_pairs(3, seed=4)
    torch.testing.assert_close(naive_scores(loaded, pairs), naive_scores(model, pairs))
    # and through our loader, which keeps the head it finds
    again = load_reward_model(str(tmp_path / "final"), tokenizer).eval()
    torch.testing.assert_close(naive_scores(again, pairs), naive_scores(model, pairs))


def test_a_causal_lm_loads_with_a_new_score_head(tmp_path):
    from tiltlm.models import tiny_llama

    tiny_llama(vocab_size=VOCAB).save_pretrained(tmp_path / "lm")
    model = load_reward_model(str(tmp_path / "lm"), SimpleNamespace(pad_token_id=PAD, eos_token_id=2))
    assert model.score.weight.shape == (1, 32) and model.config.pad_token_id == PAD


def test_loading_with_pad_equal_to_eos_warns_the_user(tmp_path):
    """The warning reaches the user who loads (and so trains) a reward model, not only the caller of
    prepare_reward_model: it used to be returned and dropped."""
    from tiltlm.models import tiny_llama

    tiny_llama(vocab_size=VOCAB).save_pretrained(tmp_path / "lm")
    with pytest.warns(UserWarning, match="pad token is its EOS token"):
        load_reward_model(str(tmp_path / "lm"), SimpleNamespace(pad_token_id=2, eos_token_id=2))


def test_pad_equal_to_eos_warns_and_no_pad_is_an_error():
    model = tiny_reward_model()
    warning = prepare_reward_model(model, SimpleNamespace(pad_token_id=2, eos_token_id=2))
    assert warning and "EOS" in warning and model.config.pad_token_id == 2
    with pytest.raises(ModelError, match="no pad token"):
        prepare_reward_model(model, SimpleNamespace(pad_token_id=None, eos_token_id=2))
    with pytest.raises(ModelError, match="no such file or directory"):
        load_reward_model("/nonexistent/dir/x", SimpleNamespace(pad_token_id=0, eos_token_id=2))


def test_scores_through_a_peft_wrapped_reward_model():
    from peft import LoraConfig, get_peft_model

    model = tiny_reward_model(seed=5)
    wrapped = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False)).eval()
    pairs = random_pairs(4, seed=6)
    with torch.no_grad():
        got = score_sequences(wrapped, collate_shared(pairs, PAD))
    torch.testing.assert_close(got, naive_scores(wrapped, pairs), rtol=1e-5, atol=1e-5)
    # the adapters (random, not zero-initialised) change the scores: the wrapped path really ran them
    assert not torch.allclose(got, naive_scores(tiny_reward_model(seed=5), pairs), atol=1e-4)
