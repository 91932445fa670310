"""Objectives beyond pairs: ranked lists (Plackett-Luce), unpaired rows (KTO), reward models (Bradley-Terry),
row weights. Expectations come from hand-derived values, each sequence scored alone through the model's
own forward, and identities (K = 2 Plackett-Luce is DPO; weight 2 is the row twice)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tiltlm import TrainConfig, train
from tiltlm.config import ConfigError
from tiltlm.data import DataError
from tiltlm.data.types import TokenizedList, TokenizedPair, TokenizedUnpaired
from tiltlm.logprobs import CompletionLogps
from tiltlm.losses import LossParams
from tiltlm.metrics import read_metrics
from tiltlm.models import set_attention, tiny_llama
from tiltlm.objectives import (ListObjective, PairObjective, RewardModelObjective, UnpairedObjective,
                               collate_weighted, make_collate)
from model_builders import tiny_reward_model  # tests/ is on sys.path

VOCAB, PAD = 64, 63
LAYOUTS = ("packed", "shared", "concatenated")


def ids(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(PAD) for _ in range(rng.randint(low, high))]


def model(seed: int, kernel: str = "blocks"):
    policy = tiny_llama(vocab_size=VOCAB, seed=seed)
    set_attention(policy, kernel)
    return policy.eval()


def alone(policy, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Summed log pi(completion | prompt): the sequence alone, full logits, log-softmax, gather."""
    logits = policy(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logps[positions, torch.tensor(completion)].sum()


def pair_objective(layout: str, beta: float = 0.1) -> PairObjective:
    collate = make_collate(layout, PAD, 40)
    return PairObjective(lambda pairs: collate_weighted(pairs, collate), LossParams(beta=beta))


def grads(module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return out


# --- ranked lists ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_completion_lists_are_dpo_pairs_loss_metrics_and_gradients(layout):
    rng = random.Random(0)
    pairs = [TokenizedPair(ids(rng, 1, 6), ids(rng, 1, 5), ids(rng, 1, 5), weight=w) for w in (1.0, 0.5, 2.0, 1.0)]
    lists = [TokenizedList(p.prompt_ids, [p.rejected_ids, p.chosen_ids], ranking=[1, 0], weight=p.weight) for p in pairs]
    policy, reference = model(0), model(1)
    pair_obj, list_obj = pair_objective(layout), ListObjective(PAD, 0.1, layout, 40)
    scored = []
    for objective, data in ((pair_obj, pairs), (list_obj, lists)):
        batch = objective.collate(data)
        with torch.no_grad():
            ref = CompletionLogps(reference)(batch)
        out = objective(CompletionLogps(policy)(batch), ref, batch)
        out.losses.sum().backward()
        scored.append((out, grads(policy)))
    (pair, pair_grads), (ranked, list_grads) = scored
    assert pair.losses.abs().min() > 0.1
    torch.testing.assert_close(ranked.losses, pair.losses, rtol=1e-6, atol=1e-7)
    for a, b in zip(list_grads, pair_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for list_key, pair_key in (("rewards/best", "rewards/chosen"), ("rewards/worst", "rewards/rejected"),
                               ("rewards/accuracies", "rewards/accuracies"), ("rewards/margins", "rewards/margins")):
        torch.testing.assert_close(ranked.metrics[list_key], pair.metrics[pair_key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", ["blocks", "eager"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_ranked_layout_scores_each_completion_as_if_alone(layout, kernel):
    rng = random.Random(1)
    lists = [TokenizedList(ids(rng, 1, 6), [ids(rng, 1, 4) for _ in range(k)], scores=[float(rng.randrange(3)) for _ in range(k)])
             for k in (2, 4, 3, 2, 5)]
    lists[1].completions[2] = [7]  # one-token completions branch at the shared prompt's last token
    lists[3].completions[0] = [9]
    policy = model(0, kernel)
    batch = ListObjective(PAD, layout=layout, pack_tokens=30).collate(lists)
    with torch.no_grad():
        logps, counts = CompletionLogps(policy)(batch)
        expected = torch.stack([alone(policy, item.prompt_ids, c) for item in lists for c in item.completions])
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [len(c) for item in lists for c in item.completions]


def test_plackett_luce_objective_matches_hand_computed_values():
    """beta = 1 and reference 0, so rewards are the policy log-probs given here.
    List 1, ranking [1, 0, 2] (completion 1 best), rewards (1, 2, 0):
        loss = -(2 - log(e^2 + e + 1)) - (1 - log(e + 1)); all 3 ordered pairs right; margins (1 + 2 + 1) / 3.
    List 2, scores (5, 5, 1): a tie on top (Breslow: both share the denominator over all three), rewards
    (0.5, -0.5, 0), weight 2: loss = 2 * [2 log(e^.5 + e^-.5 + 1)]; pairs (0, 2) right, (1, 2) wrong."""
    lists = [TokenizedList([1, 2], [[3], [4], [5]], ranking=[1, 0, 2]),
             TokenizedList([6], [[7], [8], [9]], scores=[5.0, 5.0, 1.0], weight=2.0)]
    objective = ListObjective(PAD, beta=1.0)
    batch = objective.collate(lists)
    policy = torch.tensor([1.0, 2.0, 0.0, 0.5, -0.5, 0.0], dtype=torch.float64)
    counts = torch.ones(6, dtype=torch.long)
    out = objective((policy, counts), (torch.zeros_like(policy), counts), batch)
    e = math.e
    first = -(2 - math.log(e ** 2 + e + 1)) - (1 - math.log(e + 1))
    second = 2 * 2 * math.log(math.exp(0.5) + math.exp(-0.5) + 1)
    assert out.losses.tolist() == pytest.approx([first, second], rel=1e-12)
    assert out.metrics["rewards/accuracies"].tolist() == pytest.approx([1.0, 0.5])
    assert out.metrics["rewards/margins"].tolist() == pytest.approx([4 / 3, 0.0])
    assert out.metrics["rewards/best"].tolist() == pytest.approx([2.0, 0.0])
    assert out.metrics["rewards/worst"].tolist() == pytest.approx([0.0, 0.0])


# --- unpaired rows (KTO) --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["packed", "concatenated"])
def test_kto_objective_equals_the_formula_on_each_sequence_alone(layout):
    rng = random.Random(2)
    rows = [TokenizedUnpaired(ids(rng, 2, 6), ids(rng, 1, 5), label) for label in (True, False, True, False)]
    policy, reference = model(0), model(3)
    beta, lam_d, lam_u = 0.5, 1.5, 0.5
    objective = UnpairedObjective(PAD, max_length=64, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u,
                                  layout=layout, pack_tokens=30)
    batch = objective.collate(rows)
    with torch.no_grad():
        out = objective(CompletionLogps(policy)(batch), CompletionLogps(reference)(batch), batch)
        ratio = [alone(policy, r.prompt_ids, r.completion_ids) - alone(reference, r.prompt_ids, r.completion_ids)
                 for r in rows]
        # z0: row i's prompt with row i + 1's completion, KL estimate clamped at 0 (KTO, Section 4)
        mismatched = [(r.prompt_ids, rows[(i + 1) % 4].completion_ids) for i, r in enumerate(rows)]
        z0 = max(0.0, sum(float(alone(policy, p, c) - alone(reference, p, c)) for p, c in mismatched) / 4)
    expected = [lam_d * (1 - torch.sigmoid(beta * (r - z0))) if row.label else lam_u * (1 - torch.sigmoid(beta * (z0 - r)))
                for r, row in zip(ratio, rows)]
    torch.testing.assert_close(out.losses, torch.stack(expected).float(), rtol=1e-5, atol=1e-6)
    assert out.metrics["kl"].tolist() == pytest.approx([z0] * 4, abs=1e-5)


def test_kto_reference_point_carries_no_gradient_and_a_lone_row_has_z0_zero():
    rows = [TokenizedUnpaired([1, 2], [3, 4], True), TokenizedUnpaired([5], [6], False, weight=2.0)]
    objective = UnpairedObjective(PAD, max_length=16, beta=1.0)
    batch = objective.collate(rows)
    assert batch.sequences == 4  # two rows, two mismatched pairs
    policy = torch.tensor([-1.0, -2.0, 3.0, 5.0], dtype=torch.float64, requires_grad=True)
    counts = torch.ones(4, dtype=torch.long)
    out = objective((policy, counts), (torch.zeros(4, dtype=torch.float64), counts), batch)
    out.losses.sum().backward()
    assert policy.grad[2:].tolist() == [0.0, 0.0] and policy.grad[:2].abs().min() > 0
    z0 = 4.0  # mean of 3 and 5
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert out.losses.tolist() == pytest.approx([1 - sig(-1 - z0), 2 * (1 - sig(z0 + 2))])
    alone_batch = objective.collate(rows[:1])
    assert alone_batch.sequences == 1
    one = objective((torch.tensor([-1.0], dtype=torch.float64), counts[:1]),
                    (torch.zeros(1, dtype=torch.float64), counts[:1]), alone_batch)
    assert one.losses.tolist() == pytest.approx([1 - sig(-1.0)]) and one.metrics["kl"].tolist() == [0.0]


# --- reward model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reward_model_loss_and_accuracy_against_each_sequence_scored_alone(layout):
    rng = random.Random(4)
    pairs = [TokenizedPair(ids(rng, 1, 6), ids(rng, 1, 4), ids(rng, 1, 4)) for _ in range(6)]
    rm = tiny_reward_model()
    margin, centering = 0.3, 0.01
    objective = RewardModelObjective(pair_objective(layout).collate, None, margin, centering)
    batch = objective.collate(pairs)
    with torch.no_grad():
        out = objective(objective.scorer(rm)(batch), None, batch)
        chosen = torch.stack([rm(input_ids=torch.tensor([p.prompt_ids + p.chosen_ids])).logits[0, 0] for p in pairs])
        rejected = torch.stack([rm(input_ids=torch.tensor([p.prompt_ids + p.rejected_ids])).logits[0, 0] for p in pairs])
    expected = -F.logsigmoid(chosen - rejected - margin) + centering * (chosen + rejected) ** 2
    torch.testing.assert_close(out.losses, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["rewards/accuracies"], (chosen > rejected).float())
    torch.testing.assert_close(out.metrics["rewards/mean"], (chosen + rejected) / 2, rtol=1e-5, atol=1e-6)
    assert 0 < out.metrics["rewards/accuracies"].mean() < 1  # both outcomes occur: the test can fail


# --- weights --------------------------------------------------------------------------------------------


def step_loss_and_grads(objective, examples, policy, reference):
    batch = objective.collate(examples)
    scorer = objective.scorer(policy)
    with torch.no_grad():
        ref = CompletionLogps(reference)(batch) if reference is not None else None
    loss = objective(scorer(batch), ref, batch).losses.sum()
    loss.backward()
    return loss.detach(), grads(policy)


@pytest.mark.parametrize("kind", ["pairs", "lists", "reward"])
def test_weight_two_counts_as_the_row_twice(kind):
    rng = random.Random(5)
    a, b = (TokenizedPair(ids(rng, 2, 5), ids(rng, 1, 4), ids(rng, 1, 4)) for _ in range(2))
    reference = model(1)
    if kind == "pairs":
        objective, policy, make = pair_objective("packed"), model(0), lambda p, w: TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, weight=w)
    elif kind == "lists":
        objective, policy = ListObjective(PAD, 0.1, "packed", 40), model(0)
        make = lambda p, w: TokenizedList(p.prompt_ids, [p.chosen_ids, p.rejected_ids, [5]], ranking=[0, 2, 1], weight=w)
    else:
        objective, policy, reference = RewardModelObjective(pair_objective("packed").collate, None), tiny_reward_model(), None
        make = lambda p, w: TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, weight=w)
    weighted = step_loss_and_grads(objective, [make(a, 2.0), make(b, 1.0)], policy, reference)
    duplicated = step_loss_and_grads(objective, [make(a, 1.0), make(a, 1.0), make(b, 1.0)], policy, reference)
    torch.testing.assert_close(weighted[0], duplicated[0], rtol=1e-6, atol=1e-7)
    for x, y in zip(weighted[1], duplicated[1]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    zero = step_loss_and_grads(objective, [make(a, 0.0), make(b, 1.0)], policy, reference)
    alone_b = step_loss_and_grads(objective, [make(b, 1.0)], policy, reference)
    torch.testing.assert_close(zero[0], alone_b[0], rtol=1e-6, atol=1e-7)


# --- through the trainer --------------------------------------------------------------------------------


def write_rows(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def settings(model_dir, data, output, **overrides) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(output), lr=1e-3, batch_size=2, grad_accum=2,
                epochs=3, max_length=64, max_prompt_length=32, warmup_ratio=0.0, save_every=100,
                progress=False, tensorboard=False, seed=3)
    base.update(overrides)
    return TrainConfig(**base)


RANKED = {"prompt": "The food was", "completions": [" good.", " bad.", " fine."], "ranking": [0, 2, 1]}
UNPAIRED = {"prompt": "The food was", "completion": " good.", "label": True}


@pytest.mark.parametrize("rows, expected", [
    ([RANKED, {**RANKED, "ranking": [0, 0, 1]}], "lists.jsonl:2: field 'ranking'"),
    ([RANKED, {**RANKED, "scores": [1, 2], "ranking": None}], "lists.jsonl:2: field 'scores'"),
    ([RANKED, RANKED, {**RANKED, "weight": -1}], "lists.jsonl:3: field 'weight'"),
    ([UNPAIRED, {**UNPAIRED, "label": "yes"}], "lists.jsonl:2: field 'label'"),
    ([UNPAIRED, {"prompt": "x", "completion": " y"}], "lists.jsonl:2: missing field 'label'"),
    ([RANKED, RANKED, UNPAIRED], "lists.jsonl:3: an unpaired row, but the file starts with a ranked list"),
    ([{"prompt": "a", "chosen": " b", "rejected": " c"}, RANKED], "lists.jsonl:2: a ranked list, but the file starts with a pair"),
])
def test_bad_rows_stop_the_trainer_with_one_line_naming_file_line_and_field(tiny_model_dir, tmp_path, rows, expected):
    data = write_rows(tmp_path / "lists.jsonl", rows)
    with pytest.raises(DataError) as error:
        train(settings(tiny_model_dir, data, tmp_path / "run"))
    message = str(error.value)
    assert expected in message and "\n" not in message, message
    assert not (tmp_path / "run").exists()  # nothing written


def test_unpaired_rows_refuse_a_precomputed_reference_and_batches_of_one(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "u.jsonl", [UNPAIRED] * 4)
    with pytest.raises(ConfigError, match="ref_mode = precompute: KTO"):
        train(settings(tiny_model_dir, data, tmp_path / "run", ref_mode="precompute"))
    with pytest.raises(ConfigError, match="batch_size = 1"):
        train(settings(tiny_model_dir, data, tmp_path / "run", batch_size=1))
    assert not (tmp_path / "run").exists()


def test_precomputed_list_table_equals_the_online_reference_on_any_batch(tiny_model_dir):
    from tiltlm.refcache import lookup_reference, precompute_reference

    rng = random.Random(6)
    lists = [TokenizedList(ids(rng, 1, 5), [ids(rng, 1, 4) for _ in range(k)], ranking=list(range(k)))
             for k in (2, 4, 3, 2, 5, 3)]
    reference = model(1)
    online = CompletionLogps(reference)
    table = precompute_reference(online, lists, ListObjective(PAD, layout="packed", pack_tokens=25).collate, 4,
                                 progress=False)
    assert table.shape == (6, 10)
    assert table[:, 5:].tolist() == [[len(c) for c in item.completions] + [0] * (5 - len(item.completions))
                                     for item in lists]
    lookup = lookup_reference(table)
    for layout in LAYOUTS:
        for indices in ([0, 1], [5, 2, 4], [3]):
            batch = ListObjective(PAD, layout=layout, pack_tokens=25).collate([lists[i] for i in indices])
            with torch.no_grad():
                expected = online(batch)
            logps, counts = lookup(batch, indices)
            torch.testing.assert_close(logps, expected[0], rtol=1e-5, atol=1e-5)
            assert counts.tolist() == expected[1].tolist()


def test_ranked_lists_train_the_same_with_a_precomputed_and_an_online_reference(tiny_model_dir, tmp_path):
    from conftest import PAIRS

    data = write_rows(tmp_path / "lists.jsonl", lists_and_rows(PAIRS)[0])
    runs = {mode: read_metrics(train(settings(tiny_model_dir, data, tmp_path / mode, ref_mode=mode, epochs=1,
                                              ref_cache=str(tmp_path / "cache"))) / "metrics.jsonl")
            for mode in ("precompute", "online")}
    assert len(runs["online"]) == 2
    for a, b in zip(runs["precompute"], runs["online"]):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def lists_and_rows(pairs):
    lists = [{"prompt": p["prompt"], "completions": [p["rejected"], p["chosen"], " ok."], "ranking": [1, 2, 0]}
             for p in pairs]
    unpaired = [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
                for p in pairs for key in ("chosen", "rejected")]
    return lists, unpaired


@pytest.mark.parametrize("kind", ["ranked", "unpaired", "all"])
def test_tiny_training_runs_lower_the_loss_and_save_a_causal_lm(tiny_model_dir, tmp_path, kind, capsys):
    from conftest import PAIRS

    lists, unpaired = lists_and_rows(PAIRS)
    data = write_rows(tmp_path / "data.jsonl", unpaired if kind == "unpaired" else lists)
    out = train(settings(tiny_model_dir, data, tmp_path / "run", **({"pairs": "all"} if kind == "all" else {})))
    log = capsys.readouterr().out
    rows = read_metrics(out / "metrics.jsonl")
    start = {"ranked": math.log(6), "unpaired": 0.5, "all": math.log(2)}[kind]  # PL of 3 at ties; KTO; DPO
    assert rows[0]["loss"] == pytest.approx(start, abs=1e-5)
    assert rows[0]["rewards/accuracies"] == pytest.approx(0.5)
    assert sum(r["loss"] for r in rows[-2:]) < sum(r["loss"] for r in rows[:2])
    assert rows[-1]["rewards/accuracies"] > 0.5
    expected = {"ranked": ("ranked lists 8", "ListObjective"), "unpaired": ("unpaired 16", "UnpairedObjective"),
                "all": ("8 ranked lists -> 24 pairs", "objective: sigmoid")}[kind]
    assert all(text in log for text in expected), log
    AutoModelForCausalLM.from_pretrained(out / "final")
