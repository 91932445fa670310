"""The training loop end to end on a tiny model: learning, metrics, outputs, resume, LoRA reference."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tiltlm import TrainConfig, evaluate, train
from tiltlm.config import ConfigError
from tiltlm.data import load_pairs, tokenize_pairs
from tiltlm.data.collate import collate_concatenated
from tiltlm.logprobs import naive_sequence_logps
from tiltlm.metrics import read_metrics
from tiltlm.models import load_model, load_tokenizer


def config(model_dir, data, output, **overrides) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(output), lr=1e-3, batch_size=2, grad_accum=2,
                epochs=1, max_length=64, max_prompt_length=32, warmup_ratio=0.0, save_every=1,
                keep_checkpoints=10, progress=False, tensorboard=False, seed=3)
    base.update(overrides)
    return TrainConfig(**base)


def margins_by_hand(policy_dir, reference_dir, data, beta=0.1):
    """Implicit-reward margins of every pair from full logits, without the trainer's code path."""
    tokenizer = load_tokenizer(str(reference_dir))
    pairs, _ = tokenize_pairs(load_pairs(str(data)), tokenizer, 64, 32)
    batch = collate_concatenated(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        policy, _ = naive_sequence_logps(load_model(str(policy_dir)), batch)
        ref, _ = naive_sequence_logps(load_model(str(reference_dir)), batch)
    n = len(pairs)
    return beta * ((policy[:n] - ref[:n]) - (policy[n:] - ref[n:]))


def test_training_raises_margins_and_writes_outputs(tiny_model_dir, pairs_file, tmp_path):
    out = train(config(tiny_model_dir, pairs_file, tmp_path / "run", epochs=3))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))  # 8 pairs / (2 x 2) = 2 steps x 3 epochs
    for key in ("epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_second"):
        assert all(math.isfinite(r[key]) for r in rows), key
    # the first step's policy is the reference: zero rewards, loss log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for r in rows:
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
    # final/ is a plain transformers model, and training raised every margin above zero
    AutoModelForCausalLM.from_pretrained(out / "final")
    margins = margins_by_hand(out / "final", tiny_model_dir, pairs_file)
    assert (margins > 0).all(), margins
    saved = (out / "config.yaml").read_text()
    assert "beta: 0.1" in saved and f"data: {pairs_file}" in saved


def test_resume_reaches_the_same_weights(tiny_model_dir, pairs_file, tmp_path):
    straight = train(config(tiny_model_dir, pairs_file, tmp_path / "a", epochs=3))
    # a copy of the run as it stood when killed after step 2's checkpoint (step 3 half-logged)
    stopped = tmp_path / "b"
    shutil.copytree(straight, stopped)
    shutil.rmtree(stopped / "final")
    for step in range(3, 7):
        shutil.rmtree(stopped / "checkpoints" / f"step-{step}")
    lines = (stopped / "metrics.jsonl").read_text().splitlines()
    (stopped / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    resumed = train(config(tiny_model_dir, pairs_file, stopped, epochs=3, resume=True))
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_a = read_metrics(straight / "metrics.jsonl")
    rows_b = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == list(range(1, 7))  # the half-logged step 3 is logged once
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


def test_output_of_another_run_is_never_overwritten(tiny_model_dir, pairs_file, tmp_path):
    out = train(config(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=1))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config(tiny_model_dir, pairs_file, out, max_steps=1, beta=0.5))
    assert (out / "metrics.jsonl").read_text() == before
    with pytest.raises(ConfigError, match="different settings"):
        train(config(tiny_model_dir, pairs_file, out, max_steps=2, beta=0.5, resume=True))
    (out / "notes.txt").write_text("mine")
    train(config(tiny_model_dir, pairs_file, out, max_steps=1, beta=0.5, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only what a run writes
    assert "beta: 0.5" in (out / "config.yaml").read_text()


def test_eval_equals_step_zero_metrics(tiny_model_dir, pairs_file, tmp_path):
    # one step over all 8 pairs: the logged metrics are those of the untrained policy
    out = train(config(tiny_model_dir, pairs_file, tmp_path / "run", batch_size=8, grad_accum=1, max_steps=1,
                       layout="concatenated"))
    first = read_metrics(out / "metrics.jsonl")[0]
    result = evaluate(str(tiny_model_dir), str(pairs_file), ref=str(tiny_model_dir), max_length=64,
                      max_prompt_length=32, progress=False)
    assert result["pairs"] == 8
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert result[key] == pytest.approx(first[key], rel=1e-5, abs=1e-6), key
    # and the trained model, evaluated against its run's starting model, shows the margins by hand
    trained = evaluate(str(out / "final"), str(pairs_file), max_length=64, max_prompt_length=32, progress=False)
    by_hand = margins_by_hand(out / "final", tiny_model_dir, pairs_file)
    assert trained["rewards/margins"] == pytest.approx(by_hand.mean().item(), rel=1e-4)


def test_lora_reference_is_the_base_model(tiny_model_dir, pairs_file, tmp_path):
    out = train(config(tiny_model_dir, pairs_file, tmp_path / "run", lora_r=4, epochs=2, merge_lora=True))
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(tiny_model_dir)
    # the policy with adapters disabled scores exactly like the base model loaded on its own
    from tiltlm.reference import AdaptersOffReference, OnlineReference
    from tiltlm.runtime import Precision

    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs, _ = tokenize_pairs(load_pairs(str(pairs_file)), tokenizer, 64, 32)
    batch = collate_concatenated(pairs, tokenizer.pad_token_id)
    policy = load_model(str(out / "final"))
    cpu = Precision(torch.device("cpu"))
    adapters_off, online = AdaptersOffReference(cpu, 16), OnlineReference(lambda: load_model(str(tiny_model_dir)), cpu, 16)
    adapters_off.attach(policy)
    online.prepare(policy, {}, None)
    off, _ = adapters_off(batch, "data")
    base, _ = online(batch, "data")
    assert torch.equal(off, base)
    # the adapters did change the policy, and merged/ equals base + adapters
    with torch.no_grad():
        on, _ = naive_sequence_logps(policy, batch)
        merged, _ = naive_sequence_logps(load_model(str(out / "merged")), batch)
    assert not torch.allclose(on, base)
    torch.testing.assert_close(merged, on, rtol=1e-5, atol=1e-5)


def test_release_memory_option_trains(tiny_model_dir, pairs_file, tmp_path):
    from tiltlm.runtime import return_freed_memory

    out = train(config(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=1, release_memory=True))
    assert read_metrics(out / "metrics.jsonl")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert return_freed_memory()  # glibc accepted the setting


def test_eval_refuses_a_file_where_no_pair_survives(tiny_model_dir, tmp_path, capsys):
    """Every chosen equals its rejected: nothing to measure. (It used to return loss 0.0 and exit 0.)"""
    from tiltlm.cli import main

    data = tmp_path / "ties.jsonl"
    data.write_text(json.dumps({"prompt": "The food was", "chosen": " good.", "rejected": " good."}) + "\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--ref", str(tiny_model_dir), "--data", str(data)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and str(data) in errors[0] and "no usable row" in errors[0]
