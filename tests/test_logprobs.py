"""Chunked completion-only log-probs equal the naive full-logits computation, in every batch layout."""

from types import SimpleNamespace

import pytest
import torch

from tiltlm.data.collate import collate_concatenated, collate_shared, pack_rows, segment_mask
from tiltlm.data.types import TokenizedPair
from tiltlm.logprobs import chunked_token_logps, naive_sequence_logps, sequence_logps
from model_builders import random_pairs  # noqa: E402 (tests/ is on sys.path)
from tiltlm.models import tiny_llama

VOCAB = 300


def by_hand(model, pairs):
    """Score each sequence alone, unpadded, from the model's full logits: the textbook definition."""
    chosen, rejected = [], []
    for pair in pairs:
        for completion, out in ((pair.chosen_ids, chosen), (pair.rejected_ids, rejected)):
            ids = torch.tensor([pair.prompt_ids + completion])
            logits = model(input_ids=ids).logits[0].double()
            logps = torch.log_softmax(logits, -1)
            p = len(pair.prompt_ids)
            out.append(sum(logps[p - 1 + k, tok].item() for k, tok in enumerate(completion)))
    return torch.tensor(chosen + rejected, dtype=torch.float64)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, seed=1)


@pytest.mark.parametrize("layout", ["concatenated", "shared", "packed"])
def test_layouts_equal_sequence_by_sequence(model, layout):
    pairs = random_pairs(6)
    if layout == "concatenated":
        batch = collate_concatenated(pairs, pad_id=0)
    else:
        batch = collate_shared(pairs, pad_id=0, row_tokens=48 if layout == "packed" else None)
    logps, counts = sequence_logps(model, batch, chunk_size=5)
    expected = by_hand(model, pairs)
    torch.testing.assert_close(logps.double(), expected, rtol=1e-5, atol=1e-5)
    lengths = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    assert counts.tolist() == lengths


def test_chunked_equals_naive_values_and_gradients(model):
    pairs = random_pairs(5, seed=3)
    batch = collate_concatenated(pairs, pad_id=0)
    naive, _ = naive_sequence_logps(model, batch)
    naive.sum().backward()
    naive_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chunked, _ = sequence_logps(model, batch, chunk_size=4)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), naive_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_chunk_size_does_not_change_result():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (37,))
    whole = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    for chunk in (1, 7, 37, 100):
        torch.testing.assert_close(chunked_token_logps(hidden, head, targets, chunk), whole)


def test_packed_rows_hold_no_more_than_budget():
    rows = pack_rows([5, 9, 3, 7, 2, 12], row_tokens=12)
    assert sorted(i for row in rows for i in row) == list(range(6))
    lengths = [5, 9, 3, 7, 2, 12]
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert rows == [[0, 2, 4], [1], [3], [5]]  # first fit, in order: 5+3+2, 9, 7, 12


def test_shared_mask_hides_chosen_from_rejected():
    pair = TokenizedPair([5, 6], [7, 8, 9], [10, 11])
    batch = collate_shared([pair], pad_id=0)
    mask = segment_mask(batch.segment_ids, batch.part_ids)[0, 0]
    # positions: prompt 0-1, chosen 2-4, rejected 5-6
    assert mask[5, :2].all() and not mask[5, 2:5].any() and mask[6, 5]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    # the first rejected token (10) is predicted from the last prompt position (1)
    first_rejected = (batch.target_seq == 1).nonzero()[0].item()
    assert batch.target_cols[first_rejected].item() == 1 and batch.target_ids[first_rejected].item() == 10


def test_closed_form_head_gradient_passes_gradcheck():
    """The head's hand-written backward against finite differences, in float64, with a bias and a
    chunk size that leaves a short last chunk; and the checkpointed generic path (a logit scale) agrees."""
    torch.manual_seed(4)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))

    def head_logps(h, w, b, **modifiers):  # the function reads only .weight and .bias of the head
        return chunked_token_logps(h, SimpleNamespace(weight=w, bias=b), targets, chunk_size=3, **modifiers)

    assert torch.autograd.gradcheck(head_logps, (hidden, weight, bias))
    grad = torch.randn(7, dtype=torch.float64)
    values = head_logps(hidden, weight, bias)
    generic = head_logps(hidden, weight, bias, scale=1.0)
    torch.testing.assert_close(values.double(), generic.double())
    grads = torch.autograd.grad(values, (hidden, weight, bias), grad)
    generic_grads = torch.autograd.grad(generic, (hidden, weight, bias), grad)
    for a, b in zip(grads, generic_grads):
        torch.testing.assert_close(a, b)


# issue 15, item 1: a pair whose prompt is empty has no token to predict its first completion token from


@pytest.mark.parametrize("layout", ["concatenated", "shared", "packed"])
def test_empty_prompt_ids_are_refused_by_every_layout(layout):
    pairs = [TokenizedPair([5, 6], [7, 8], [9]), TokenizedPair([], [7, 8], [9], source="a.jsonl:2")]
    with pytest.raises(ValueError, match="a.jsonl:2"):
        if layout == "concatenated":
            collate_concatenated(pairs, pad_id=0)
        else:
            collate_shared(pairs, pad_id=0, row_tokens=48 if layout == "packed" else None)


@pytest.mark.parametrize("layout", ["concatenated", "shared", "packed"])
def test_empty_text_prompt_tokenised_then_scored_equals_by_hand(layout):
    """The tokeniser turns an empty prompt into [BOS]; every layout then equals the textbook score."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tokenizer_builders import byte_bpe_tokenizer
    from tiltlm.data import Pair, tokenize_pairs

    tokenizer = byte_bpe_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), seed=1)
    texts = [Pair("", " Paris is", " I do not"), Pair("Human: hello", " the fox", " the cat"), Pair("", " yes", " no")]
    pairs, _ = tokenize_pairs(texts, tokenizer, 64, 32)
    assert len(pairs) == 3 and all(p.prompt_ids for p in pairs)
    if layout == "concatenated":
        batch = collate_concatenated(pairs, pad_id=0)
    else:
        batch = collate_shared(pairs, pad_id=0, row_tokens=48 if layout == "packed" else None)
    logps, _ = sequence_logps(model, batch, chunk_size=5)
    torch.testing.assert_close(logps.double(), by_hand(model, pairs), rtol=1e-5, atol=1e-5)
