"""Precision on the path a GPU run takes, exercised on CPU: bf16 compute under autocast with float32 master
weights (and why pure bf16 weights are only an opt-in), the chunked head's gradient under autocast, step 0
exactly at the reference in bf16, final/ in the starting checkpoint's dtype, AdamW's parameter groups."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tiltlm import TrainConfig, train
from tiltlm.config import ConfigError, build_config
from tiltlm.logprobs import chunked_token_logps, token_logps
from tiltlm.losses import LossOutput, PairLogps
from tiltlm.metrics import read_metrics
from tiltlm.models import load_model, tiny_llama
from tiltlm.objectives import pair_metrics
from tiltlm.runtime import lost_update_fraction
from tiltlm.train import param_groups


def config(model_dir, data, output, **overrides) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(output), lr=5e-7, batch_size=2, grad_accum=2,
                max_steps=3, max_length=64, max_prompt_length=32, warmup_ratio=0.0, save_every=100,
                progress=False, tensorboard=False, seed=3, ref_mode="online")
    base.update(overrides)
    return TrainConfig(**base)


def weight_update(model_dir, run_dir) -> torch.Tensor:
    """All weights after training minus before, flattened (float32)."""
    before = load_model(str(model_dir)).state_dict()
    after = load_file(str(run_dir / "final" / "model.safetensors"))
    return torch.cat([(after[k].float() - before[k].float()).flatten() for k in sorted(after)])


def test_bf16_autocast_updates_the_weights_like_float32(tiny_model_dir, pairs_file, tmp_path):
    """At DPO's learning rates bf16 weights would drop the update; float32 masters under autocast keep it."""
    full = weight_update(tiny_model_dir, train(config(tiny_model_dir, pairs_file, tmp_path / "fp32", dtype="float32")))
    mixed = weight_update(tiny_model_dir, train(config(tiny_model_dir, pairs_file, tmp_path / "bf16", dtype="bf16")))
    cosine = torch.nn.functional.cosine_similarity(full, mixed, dim=0).item()
    assert cosine >= 0.9, cosine
    moved = lambda update: (update != 0).float().mean().item()  # noqa: E731 (unused tokens' embeddings stay)
    assert moved(mixed) >= 0.95 * moved(full) > 0.5


def test_pure_bf16_weights_lose_the_updates_the_warning_predicts(tiny_model_dir, pairs_file, tmp_path, capsys):
    model = load_model(str(tiny_model_dir), torch.bfloat16)
    predicted = lost_update_fraction(model.parameters(), 5e-7)
    assert predicted > 0.9  # init std 0.02: half a bf16 ulp there is ~6e-5, far above lr = 5e-7
    out = train(config(tiny_model_dir, pairs_file, tmp_path / "pure", dtype="bf16", bf16_weights=True, max_steps=1))
    assert "bf16 weights" in capsys.readouterr().out
    after = load_file(str(out / "final" / "model.safetensors"))
    before = model.state_dict()
    unchanged = torch.cat([(after[k] == before[k].float()).flatten() for k in sorted(after)]).float().mean().item()
    # Adam's first step moves every weight with a gradient by exactly lr: bf16 rounding keeps it or not
    assert unchanged == pytest.approx(predicted, abs=0.03)


def test_lost_update_fraction_by_hand():
    # bf16 spacing next to 1.0 is 2**-7, so updates below 2**-8 are lost there; next to 2**-10, below 2**-18
    weights = [torch.tensor([1.0, 1.5, 2.0 ** -10, 2.0 ** -10], dtype=torch.bfloat16)]
    assert lost_update_fraction(weights, 2.0 ** -9) == 0.5
    assert lost_update_fraction(weights, 2.0 ** -7) == 0.0
    assert lost_update_fraction(weights, 2.0 ** -20) == 1.0


def test_chunked_head_gradient_under_autocast_matches_the_naive_head():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_token_logps(hidden, head, targets, 8)
        logits = head(hidden)
    naive = token_logps(logits, targets)
    assert torch.equal(chunked, naive)  # the same bf16 logits, the same float32 softmax
    grads = torch.autograd.grad(chunked.sum(), [hidden, head.weight])
    expected = torch.autograd.grad(naive.sum(), [hidden, head.weight])
    # d/dh goes through a bf16 matmul in both; the weight gradient is accumulated in float32 here, in
    # bf16 by autocast's naive matmul, so it may differ by bf16 rounding only
    torch.testing.assert_close(grads[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(grads[1], expected[1], rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("ref_mode, lora_r", [("online", 0), ("adapters-off", 4), ("precompute", 0)])
def test_step_zero_is_the_reference_under_bf16(tiny_model_dir, pairs_file, tmp_path, ref_mode, lora_r):
    out = train(config(tiny_model_dir, pairs_file, tmp_path / ref_mode, dtype="bf16", ref_mode=ref_mode,
                       lora_r=lora_r, max_steps=1, ref_cache=str(tmp_path / "cache")))
    first = read_metrics(out / "metrics.jsonl")[0]
    # online and adapters-off score the policy's own batch: exact. The table was computed in other batches
    # (4x larger, packed differently), so bf16 attention sums in another order: equal to bf16 rounding.
    tolerance = 1e-4 if ref_mode == "precompute" else 1e-6
    assert first["loss"] == pytest.approx(math.log(2), abs=tolerance)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=tolerance)
    assert first["rewards/accuracies"] == 0.5  # every margin is a tie at the reference


def test_final_is_saved_in_the_starting_checkpoints_dtype(tiny_tokenizer, pairs_file, tmp_path):
    start = tmp_path / "bf16-model"
    model = tiny_llama(vocab_size=len(tiny_tokenizer)).to(torch.bfloat16)
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    model.save_pretrained(start)
    tiny_tokenizer.save_pretrained(start)
    out = train(config(start, pairs_file, tmp_path / "run", dtype="float32", lr=1e-3, max_steps=1))
    saved = load_file(str(out / "final" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"


def test_fp16_training_is_refused_with_what_to_use():
    with pytest.raises(ConfigError, match="bf16"):
        build_config(flags={"dtype": "float16", "data": "x.jsonl"})


def test_adamw_does_not_decay_biases_and_norm_weights():
    model = tiny_llama()
    decayed, plain = param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in plain["params"])  # Llama has no biases: the norms
    assert all("norm" not in names[id(p)] for p in decayed["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_accuracy_counts_ties_half():
    def pair(chosen, rejected, ref_chosen, ref_rejected, beta=0.1):
        policy = PairLogps(torch.tensor([chosen]), torch.tensor([rejected]), torch.tensor([5]), torch.tensor([5]))
        reference = PairLogps(torch.tensor([ref_chosen]), torch.tensor([ref_rejected]), policy.chosen_tokens,
                              policy.rejected_tokens)
        r_w, r_l = beta * (policy.chosen - reference.chosen), beta * (policy.rejected - reference.rejected)
        out = LossOutput(-torch.nn.functional.logsigmoid(r_w - r_l), r_w, r_l)
        return pair_metrics(out, policy, reference, beta)["rewards/accuracies"].item()

    assert pair(-50.0, -60.0, -50.0, -60.0 + 2.4e-7) == 0.5  # margin 2.4e-8: rounding noise, a tie
    assert pair(-49.0, -60.0, -50.0, -60.0) == 1.0
    assert pair(-51.0, -60.0, -50.0, -60.0) == 0.0
