"""The trainer's reference strategies: precomputed (the default when a run covers its data) against
online and adapters-off, the choice ``auto`` makes, and the cache reused by later runs and by eval."""

import math

import pytest
import torch
from safetensors.torch import load_file

from tiltlm import evaluate, train
from tiltlm.metrics import read_metrics
from tiltlm.models import add_lora, load_model
from tiltlm.reference import choose_mode
from tiltlm.refcache import weights_fingerprint

from test_train import config

COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "grad_norm")


@pytest.mark.parametrize("lora_r, other_mode", [(0, "online"), (4, "adapters-off")])
def test_precomputed_reference_trains_like_the_model_run_at_every_step(tiny_model_dir, pairs_file, tmp_path,
                                                                       lora_r, other_mode):
    runs = {}
    for mode in ("precompute", other_mode):
        runs[mode] = train(config(tiny_model_dir, pairs_file, tmp_path / mode, epochs=2, lora_r=lora_r,
                                  ref_mode=mode, ref_cache=str(tmp_path / "cache"), eval_data=str(pairs_file),
                                  eval_every=2))
    fast, slow = (read_metrics(runs[m] / "metrics.jsonl") for m in ("precompute", other_mode))
    assert [r["step"] for r in fast] == [r["step"] for r in slow] and len(fast) == 6  # 4 train + 2 eval rows
    for a, b in zip(fast, slow):
        for key in (k for k in COMPARED + tuple("eval/" + k for k in COMPARED) if k in b):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    weights = "adapter_model.safetensors" if lora_r else "model.safetensors"
    a, b = (load_file(runs[m] / "final" / weights) for m in ("precompute", other_mode))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    # one table for the training data; the eval file is the same file, tokenised the same: the same table
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_auto_precomputes_when_the_run_scores_every_pair():
    # (ref_mode, lora, ref, reference-free loss, covers the data) -> mode
    assert choose_mode("auto", False, None, False, covers_data=True) == "precompute"
    assert choose_mode("auto", True, None, False, covers_data=True) == "precompute"
    assert choose_mode("auto", False, None, False, covers_data=False) == "online"
    assert choose_mode("auto", True, None, False, covers_data=False) == "adapters-off"
    assert choose_mode("auto", True, "other-model", False, covers_data=False) == "online"
    assert choose_mode("auto", True, None, True, covers_data=True) == "none"
    assert choose_mode("online", True, None, False, covers_data=True) == "online"


def test_auto_mode_in_the_trainer(tiny_model_dir, pairs_file, tmp_path, capsys):
    # 8 pairs, 4 a step: one step covers half the data (online), two steps all of it (precompute)
    train(config(tiny_model_dir, pairs_file, tmp_path / "short", max_steps=1, ref_cache=str(tmp_path / "c")))
    assert "reference: online" in capsys.readouterr().out
    assert not (tmp_path / "c").exists()
    train(config(tiny_model_dir, pairs_file, tmp_path / "epoch", ref_cache=str(tmp_path / "c")))
    log = capsys.readouterr().out
    assert "reference: precompute" in log and "computed in" in log
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1


def test_later_runs_and_eval_read_the_cache(tiny_model_dir, pairs_file, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = train(config(tiny_model_dir, pairs_file, tmp_path / "a", ref_cache=str(cache)))
    assert "computed in" in capsys.readouterr().out
    files = sorted(cache.glob("*.safetensors"))
    train(config(tiny_model_dir, pairs_file, tmp_path / "b", ref_cache=str(cache), beta=0.3))
    assert f"read: {files[0]}" in capsys.readouterr().out
    # eval of the trained model against its starting weights finds the training run's table ...
    cached = evaluate(str(first / "final"), str(pairs_file), max_length=64, max_prompt_length=32,
                      ref_cache=str(cache))
    assert f"read: {files[0]}" in capsys.readouterr().err
    assert sorted(cache.glob("*.safetensors")) == files
    # ... and gives what a computed reference gives (an empty cache directory: computed)
    computed = evaluate(str(first / "final"), str(pairs_file), max_length=64, max_prompt_length=32,
                        ref_cache=str(tmp_path / "empty"))
    assert "computed in" in capsys.readouterr().err
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert cached[key] == pytest.approx(computed[key], rel=1e-5, abs=1e-6), key
    assert math.isfinite(cached["loss"]) and cached["rewards/margins"] > 0


def test_lora_keeps_the_base_fingerprint(tiny_model_dir):
    """A table computed on the plain model before LoRA is added is found again for the same base under
    adapters (an adapter's evaluation), and a changed base weight is a different reference."""
    plain = load_model(str(tiny_model_dir))
    before = weights_fingerprint(plain)
    wrapped = add_lora(plain, 4, None, 0.0, "all-linear")
    with torch.no_grad():  # adapters that change the policy do not change the reference (adapters off)
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.5)
    assert weights_fingerprint(wrapped) == before
    with torch.no_grad():
        wrapped.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight[0, 0] += 1e-3
    assert weights_fingerprint(wrapped) != before
