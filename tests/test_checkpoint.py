"""Checkpoints: atomic, verified by checksums, pruned, and never half-loaded."""

import pytest
import torch

from tiltlm import checkpoint as ckpt


def make(tmp_path, steps, keep=10):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    directory = tmp_path / "checkpoints"
    for step in steps:
        model.weight.data.fill_(float(step))
        ckpt.save_checkpoint(directory, model, optimizer, scheduler, ckpt.TrainingState(step), keep)
    return directory, model, optimizer, scheduler


def test_round_trip_restores_weights_and_step(tmp_path):
    directory, model, optimizer, scheduler = make(tmp_path, [1, 2])
    model.weight.data.zero_()
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(directory), model, optimizer, scheduler)
    assert state.step == 2 and torch.equal(model.weight, torch.full((2, 3), 2.0))


def test_only_the_newest_are_kept(tmp_path):
    directory, *_ = make(tmp_path, [1, 2, 3, 4], keep=2)
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step-3", "step-4"]


def test_half_written_checkpoint_is_ignored(tmp_path):
    directory, *_ = make(tmp_path, [1])
    (directory / ".step-2.tmp-123").mkdir()  # a save killed before its rename
    messages = []
    assert ckpt.latest_checkpoint(directory, log=messages.append).name == "step-1"
    assert any(".step-2.tmp-123" in m for m in messages)


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_corruption_is_detected_and_named(tmp_path, damage):
    directory, model, optimizer, scheduler = make(tmp_path, [1, 2])
    victim = directory / "step-2" / "optimizer.pt"
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt"):
        ckpt.latest_checkpoint(directory)
    # only when allowed does resume fall back to the newest intact checkpoint
    assert ckpt.latest_checkpoint(directory, allow_fallback=True, log=lambda m: None).name == "step-1"


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    directory, model, optimizer, scheduler = make(tmp_path, [1])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(directory, model, optimizer, scheduler, ckpt.TrainingState(2), 10)
    assert [p.name for p in directory.iterdir()] == ["step-1"]  # no debris, step-1 intact
    ckpt.verify(directory / "step-1")


def test_a_streamed_model_directory_is_what_save_pretrained_writes(tmp_path, monkeypatch, tiny_tokenizer):
    """save_streamed, fed one tensor at a time, writes a directory plain transformers loads, in the
    asked dtype, with save_pretrained's config; past SHARD_BYTES in Hugging Face's sharded layout."""
    import json

    from transformers import AutoModelForCausalLM

    from tiltlm.models import tiny_llama

    model = tiny_llama(vocab_size=len(tiny_tokenizer))
    state = model.state_dict()
    specs = {name: (tuple(t.shape), torch.bfloat16) for name, t in state.items()}
    monkeypatch.setattr(ckpt, "SHARD_BYTES", 20_000)
    ckpt.save_streamed(tmp_path / "streamed", model, tiny_tokenizer, torch.bfloat16, specs,
                       ((name, t.to(torch.bfloat16)) for name, t in state.items()))
    ckpt.save_pretrained_atomically(tmp_path / "reference", model, tiny_tokenizer,
                                    ckpt.cast(state, torch.bfloat16), torch.bfloat16)
    streamed = tmp_path / "streamed"
    files = sorted(set(json.loads((streamed / ckpt.INDEX).read_text())["weight_map"].values()))
    assert len(files) > 1
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert (json.loads((streamed / "config.json").read_text())
            == json.loads((tmp_path / "reference" / "config.json").read_text()))
    loaded = AutoModelForCausalLM.from_pretrained(streamed)
    assert loaded.dtype == torch.bfloat16
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name
