"""Every fast path gives the naive path's loss, rewards and gradients.

Naive: two padded rows per pair (``collate_concatenated``), full float32 logits at every position
(``naive_sequence_logps``), and the reference model run on the same batch. Fast paths, alone and
combined: the prompt shared by both completions in one row (``shared``), several pairs packed into a
row (``packed``), the vocabulary projection at completion positions only, in checkpointed chunks
(``CompletionLogps``), and the reference read from a table computed beforehand (``tiltlm.refcache``).

On a tiny random Llama in float32, over every data format (explicit text, conversational through a chat
template, implicit HH-RLHF dialogues) and with pairs cut by a small ``max_length``. The policy is the
reference with perturbed weights, so the loss and its gradients are not those of the trivial
policy == reference point.
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from tiltlm.data import load_pairs, tokenize_pairs
from tiltlm.data.collate import collate_concatenated, collate_shared
from tiltlm.logprobs import CompletionLogps, naive_sequence_logps
from tiltlm.losses import LossParams, PairLogps, preference_loss
from tiltlm.models import frozen, load_model, load_tokenizer
from tiltlm.refcache import lookup_reference, precompute_reference
from tiltlm.reference import OnlineReference
from tiltlm.runtime import Precision

from conftest import PAIRS  # pytest puts tests/ on sys.path

RTOL = 1e-5
# micro-batches of a step, given by pair index (shuffled, as the data order would give them)
MICRO_BATCHES = ([5, 2, 7, 0], [1, 6, 3, 4])

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def online_reference(model, chunk_size):
    """The online reference strategy of ``model`` as a plain scorer ``batch -> (logps, counts)``."""
    reference = OnlineReference(lambda: model, Precision(torch.device("cpu")), chunk_size)
    reference.prepare(model, {}, None)
    return lambda batch: reference(batch, "data")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": " " + text}


TEXT_ROWS = PAIRS  # the explicit-format pairs of conftest

CHAT_ROWS = [
    {"prompt": [user(r["prompt"])], "chosen": [bot(r["chosen"].strip())], "rejected": [bot(r["rejected"].strip())]}
    for r in TEXT_ROWS[:6]
] + [
    {"prompt": [user("Can you help me?"), bot("Of course."), user("How do I bake bread?")],
     "chosen": [bot("Mix flour, water, yeast and salt, then knead.")], "rejected": [bot("No.")]},
    {"prompt": [user("Tell me about the weather today.")],
     "chosen": [bot("It is a lovely day."), user("Nice!"), bot("Enjoy the walk in the park.")],
     "rejected": [bot("I hate the weather.")]},
]

HH_ROWS = [
    {"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['chosen']}",
     "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['rejected']}"} for r in TEXT_ROWS[:5]
] + [
    {"chosen": "\n\nHuman: Can you help me?\n\nAssistant: Of course.\n\nHuman: How do I bake bread?\n\nAssistant:"
               " Mix flour, water, yeast and salt, then knead.",
     "rejected": "\n\nHuman: Can you help me?\n\nAssistant: Of course.\n\nHuman: How do I bake bread?\n\nAssistant:"
                 " I do not know."},
    {"chosen": "\n\nHuman: What a lovely day.\n\nAssistant: It is, the park is nice.",
     "rejected": "\n\nHuman: What a lovely day.\n\nAssistant: It is cold and sad."},
    {"chosen": "\n\nHuman: The service was slow.\n\nAssistant: Sorry to hear that.",
     "rejected": "\n\nHuman: The service was slow.\n\nAssistant: Good."},
]

FORMATS = {"text": TEXT_ROWS, "chat": CHAT_ROWS, "hh": HH_ROWS}
LENGTHS = {"full": (128, 64), "truncated": (16, 8)}  # (max_length, max_prompt_length)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """(tokenizer with a chat template, reference, policy = reference with perturbed weights), loaded
    afresh from the tiny model directory (the tokenizer is a copy of its own: setting its template
    touches no other test)."""
    directory = tiny_model_dir
    tokenizer = load_tokenizer(str(directory))
    tokenizer.chat_template = CHAT_TEMPLATE
    reference = frozen(load_model(str(directory)))
    policy = load_model(str(directory))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
    policy.train()
    return tokenizer, reference, policy


def tokenized(tokenizer, rows, tmp_path, lengths):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs, summary = tokenize_pairs(load_pairs(str(path)), tokenizer, *lengths)
    assert summary.kept == len(rows) == 8, summary.format()
    return pairs


def split(logps: torch.Tensor, counts: torch.Tensor, n: int) -> PairLogps:
    return PairLogps(logps[:n], logps[n:], counts[:n], counts[n:])


BETA = 0.1


def run_step(policy, policy_logps, reference, collate, pairs):
    """One optimizer step's forward and backward over MICRO_BATCHES, as the training loop does it: the
    gradient of the mean loss. Returns, by pair index, a dict of per-pair values (losses, rewards, summed
    log-probs of policy and reference, chosen then rejected) and the gradients."""
    policy.zero_grad(set_to_none=True)
    n = len(pairs)
    values = {name: torch.zeros(n) for name in ("losses", "chosen rewards", "rejected rewards")}
    values.update({name: torch.zeros(2 * n) for name in ("policy logps", "reference logps")})
    total = sum(len(indices) for indices in MICRO_BATCHES)
    for indices in MICRO_BATCHES:
        batch = collate([pairs[i] for i in indices])
        logps, counts = policy_logps(batch)
        with torch.no_grad():
            ref_logps, ref_counts = reference(batch, indices)
        assert counts.tolist() == ref_counts.tolist()
        out = preference_loss(split(logps, counts, len(indices)), split(ref_logps, ref_counts, len(indices)),
                              LossParams(beta=BETA))
        (out.losses.sum() / total).backward()
        values["losses"][indices] = out.losses.detach()
        values["chosen rewards"][indices] = out.chosen_rewards
        values["rejected rewards"][indices] = out.rejected_rewards
        both = indices + [n + i for i in indices]  # chosen of these pairs, then rejected
        values["policy logps"][both] = logps.detach()
        values["reference logps"][both] = ref_logps
    grads = {name: p.grad.clone() for name, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)
    return values, grads


def layout_collate(layout: str, pad_id: int, row_tokens: int = 0):
    if layout == "concatenated":
        return lambda pairs: collate_concatenated(pairs, pad_id)
    if layout == "shared":
        return lambda pairs: collate_shared(pairs, pad_id)
    return lambda pairs: collate_shared(pairs, pad_id, row_tokens=row_tokens)


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, what: str, scale: float | None = None) -> None:
    """Equal to ``RTOL`` relative to ``scale``, by default the tensor's own (its largest magnitude), so
    that entries that are nearly zero are judged against the size of the tensor and not against
    themselves."""
    scale = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


COMBINATIONS = [
    (layout, projection, ref_mode)
    for layout, projection, ref_mode in itertools.product(("concatenated", "shared", "packed"),
                                                          ("full", "chunked"), ("online", "precomputed"))
    if (layout, projection, ref_mode) != ("concatenated", "full", "online")  # that one is the naive path
]


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("data_format", list(FORMATS))
def test_fast_paths_equal_naive(models, tmp_path, data_format, lengths):
    tokenizer, reference_model, policy = models
    pairs = tokenized(tokenizer, FORMATS[data_format], tmp_path, LENGTHS[lengths])
    if lengths == "truncated":
        assert sum(p.truncated for p in pairs) >= 4
    pad = tokenizer.pad_token_id
    # rows of packed batches hold two to three pairs
    row_tokens = 2 * max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)

    naive_policy = lambda batch: naive_sequence_logps(policy, batch)  # noqa: E731
    naive_reference = lambda batch, indices: naive_sequence_logps(reference_model, batch)  # noqa: E731
    expected, expected_grads = run_step(policy, naive_policy, naive_reference, layout_collate("concatenated", pad), pairs)
    assert torch.isfinite(expected["losses"]).all()
    assert not torch.allclose(expected["losses"], expected["losses"][:1])  # the pairs disagree: a real test
    # A reward is beta * (policy - reference) log-probs, a small difference of two large sums (tens of
    # nats): its float32 rounding error is relative to those sums, not to the reward itself.
    reward_scale = BETA * max(expected["policy logps"].abs().max().item(), expected["reference logps"].abs().max().item())

    online = online_reference(reference_model, chunk_size=16)
    # the table is computed in its own batches (larger, length-sorted, packed), as training will do
    table = precompute_reference(online, pairs, layout_collate("packed", pad, row_tokens), batch_size=5, progress=False)
    lookup = lookup_reference(table)
    for layout, projection, ref_mode in COMBINATIONS:
        name = f"{data_format}/{lengths}: {layout} + {projection} projection + {ref_mode} reference"
        collate = layout_collate(layout, pad, row_tokens)
        if layout == "packed":
            assert collate(pairs[:4]).input_ids.shape[0] < 4, "nothing was packed"
        policy_logps = (naive_policy if projection == "full" else CompletionLogps(policy, chunk_size=16))
        reference = (lambda batch, indices: online(batch)) if ref_mode == "online" else lookup
        got, grads = run_step(policy, policy_logps, reference, collate, pairs)
        for what, value in got.items():
            scale = reward_scale if "rewards" in what else None
            assert_relative(value, expected[what], f"{name}: {what}", scale)
        for parameter_name, grad in grads.items():
            assert_relative(grad, expected_grads[parameter_name], f"{name}: gradient of {parameter_name}")


def test_naive_path_matches_sequence_by_sequence(models, tmp_path):
    """The naive path itself against the definition: each sequence alone, unpadded, in float64."""
    tokenizer, reference_model, _ = models
    pairs = tokenized(tokenizer, HH_ROWS, tmp_path, LENGTHS["full"])
    batch = collate_concatenated(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _ = naive_sequence_logps(reference_model, batch)
        model64 = copy.deepcopy(reference_model).double()
        by_hand = []
        for completion_of in (lambda p: p.chosen_ids, lambda p: p.rejected_ids):
            for pair in pairs:
                ids = torch.tensor([pair.prompt_ids + completion_of(pair)])
                all_logps = torch.log_softmax(model64(input_ids=ids).logits[0], -1)
                start = len(pair.prompt_ids) - 1
                by_hand.append(sum(all_logps[start + k, t].item() for k, t in enumerate(completion_of(pair))))
    torch.testing.assert_close(logps.double(), torch.tensor(by_hand, dtype=torch.float64), rtol=1e-5, atol=1e-5)
