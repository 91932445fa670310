"""Loading models and tokenizers as a demanding user meets it (tiltlm issue 15): mistyped paths fail at
once, relative paths are stored absolute, a reference with another vocabulary is refused, and errors
from upstream libraries become one line that says what to do (never "weights_only=False")."""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import build_tokenizer
from tiltlm.models import (MODEL_FILE_TYPES, ModelError, add_lora, canonical_name, check_same_tokenizer, load_model,
                           load_tokenizer, parse_device)
from tiltlm.paths import looks_like_path
from tokenizer_builders import byte_bpe_tokenizer


# item 3: a reference with another vocabulary would score the wrong token ids


def test_same_tokenizer_passes_and_a_copy_passes():
    tokenizer = build_tokenizer()
    check_same_tokenizer(tokenizer, copy.deepcopy(tokenizer), ("policy", "ref"))


def test_different_vocabularies_are_refused_naming_both():
    with pytest.raises(ModelError, match="'pol'.*'other'.*vocabular"):
        check_same_tokenizer(build_tokenizer(), byte_bpe_tokenizer(), ("pol", "other"))


def test_one_added_token_is_a_different_vocabulary():
    tokenizer = build_tokenizer()
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["<|new|>"])
    with pytest.raises(ModelError):
        check_same_tokenizer(tokenizer, grown, ("a", "b"))


# item 10: a relative local path is stored absolute; hub ids and aliases as they are


def test_canonical_name(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    expected = str(tmp_path / "models" / "tiny")
    assert canonical_name("models/tiny") == expected
    assert canonical_name("./models/tiny/") == expected
    assert canonical_name(expected) == expected
    monkeypatch.setenv("HOME", str(tmp_path))
    assert canonical_name("~/models/tiny") == expected
    assert canonical_name("smollm2-135m") == "smollm2-135m"
    assert canonical_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert canonical_name("gpt2") == "gpt2"


def test_canonical_name_leaves_an_alias_even_when_a_directory_has_its_name(tmp_path, monkeypatch):
    (tmp_path / "smollm2-135m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert canonical_name("smollm2-135m") == "smollm2-135m"


# item 12: a path-like name that does not exist fails at once, without trying the hub


@pytest.mark.parametrize("name", ["./model", "../model", "/no/such/model", "~/model", "a/b/c", "model.safetensors",
                                  "model/", "run\\final", ".hidden"])
def test_path_like_names(name):
    assert looks_like_path(name, MODEL_FILE_TYPES)


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B", "smollm2-135m"])
def test_hub_like_names(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path(name, MODEL_FILE_TYPES)


def test_owner_name_whose_owner_is_a_local_directory_is_a_path(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert looks_like_path("model/llama")
    assert not looks_like_path("meta-llama/llama")


@pytest.mark.parametrize("name", ["./model/llama", "model/llama", "runs/dpo/final", "~/nothing-here-1234"])
def test_missing_local_model_fails_at_once(name, tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # where the hub would be tried, it is not
    for load in (load_model, load_tokenizer):
        started = time.perf_counter()
        with pytest.raises(ModelError, match="no such file or directory"):
            load(name)
        assert time.perf_counter() - started < 2


# item 11: devices and LoRA targets that do not exist, pickled weights


def test_unknown_device_is_one_line():
    with pytest.raises(ModelError, match=r"^device 'tpu': expected auto, cpu, cuda") as caught:
        parse_device("tpu")
    assert "\n" not in str(caught.value)
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type in ("cpu", "cuda")


def test_unknown_lora_target_names_the_existing_modules(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    with pytest.raises(ModelError) as caught:
        add_lora(model, 4, None, 0.0, "nonexistent_proj")
    message = str(caught.value)
    assert "\n" not in message and "nonexistent_proj" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_weights_are_refused_without_suggesting_weights_only_false(tiny_model_dir, tmp_path, capsys):
    directory = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, directory)
    weights = load_model(str(tiny_model_dir)).state_dict()
    os.remove(directory / "model.safetensors")
    torch.save({**weights, "payload": _Payload()}, directory / "pytorch_model.bin")
    with pytest.raises(ModelError) as caught:
        load_model(str(directory))
    message = str(caught.value)
    assert "weights_only" not in message and "\n" not in message
    assert message.startswith(f"{str(directory)!r}: a weights file") and "pickle" in message
    assert "code ran" not in capsys.readouterr().out


# item 15: an architecture without SDPA attention: the error says what to do


def test_architecture_without_sdpa_loads_with_a_kernel_it_has(tiny_model_dir, monkeypatch):
    """Item 15: a family that declares no SDPA used not to load at all; tiltlm now picks another kernel
    (tiltlm.attention.choose: its own block kernel, else eager) instead of failing."""
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_supports_sdpa", False)
    model = load_model(str(tiny_model_dir))
    assert model.config._attn_implementation in ("tiltlm_blocks", "eager")


# item 18: a user sees tiltlm's lines, not upstream warnings about upstream code


def test_peft_deprecation_warning_is_hidden_and_only_it(tiny_model_dir):
    import warnings

    from tiltlm.models import hide_known_warnings

    def lora_warnings(hidden: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if hidden:
                hide_known_warnings()
            add_lora(load_model(str(tiny_model_dir)), 4, None, 0.0, "all-linear")
            warnings.warn("is_gradient_checkpointing, but a UserWarning", UserWarning)  # other kinds still show
        return [f"{w.category.__name__}: {w.message}" for w in caught]

    assert any("FutureWarning: `is_gradient_checkpointing` is deprecated" in w for w in lora_warnings(False))
    assert lora_warnings(True) == ["UserWarning: is_gradient_checkpointing, but a UserWarning"]


def test_saving_an_adapter_whose_base_is_an_alias_looks_nothing_up(tiny_model_dir, tmp_path, monkeypatch):
    """peft's save looks the base name up on the hub to see whether the vocabulary grew; for an alias
    that is "Unable to fetch remote file ... smollm2-135m". tiltlm never resizes the vocabulary."""
    import warnings

    from safetensors.torch import load_file

    from tiltlm.models import save_options

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = add_lora(load_model(str(tiny_model_dir)), 4, None, 0.0, "all-linear")
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = "smollm2-135m"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "plain")
    assert any("smollm2-135m" in str(w.message) for w in caught)  # what the quickstart printed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "quiet", **save_options(model))
    assert [str(w.message) for w in caught] == []
    plain, quiet = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "quiet"))
    assert plain.keys() == quiet.keys() and all((plain[k] == quiet[k]).all() for k in plain)
    assert save_options(load_model(str(tiny_model_dir))) == {}


def test_a_lora_run_prints_no_upstream_warning(tiny_model_dir, tmp_path):
    """In a fresh process (pytest resets warning filters around collection, so only a subprocess sees
    what a user sees), with Python's default warning display."""
    import subprocess
    import sys

    code = ("from tiltlm.models import add_lora, load_model, save_options\n"
            f"model = add_lora(load_model({str(tiny_model_dir)!r}), 4, None, 0.0, 'all-linear')\n"
            "model.peft_config['default'].base_model_name_or_path = 'smollm2-135m'\n"
            f"model.save_pretrained({str(tmp_path / 'adapter')!r}, **save_options(model))\n")
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_pickled_adapter_weights_are_refused_too(tiny_model_dir, tmp_path, capsys):
    model = add_lora(load_model(str(tiny_model_dir)), 4, None, 0.0, "all-linear")
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    os.remove(adapter / "adapter_model.safetensors")
    torch.save({**weights, "payload": _Payload()}, adapter / "adapter_model.bin")
    with pytest.raises(ModelError) as caught:
        load_model(str(adapter))
    assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)
    assert "code ran" not in capsys.readouterr().out


def test_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"^device 'cuda:0': no CUDA device is available here"):
        parse_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ModelError, match="there are 2 CUDA devices"):
        parse_device("cuda:2")


def test_one_unknown_lora_target_among_known_ones_is_refused(tiny_model_dir):
    """peft refuses only when no target matches; a typo beside a real name would be dropped silently."""
    model = load_model(str(tiny_model_dir))
    with pytest.raises(ModelError, match=r"lora_targets = 'q_proj,v_prj': no module named v_prj"):
        add_lora(model, 4, None, 0.0, "q_proj,v_prj")
    wrapped = add_lora(load_model(str(tiny_model_dir)), 4, None, 0.0, "q_proj, model.layers.0.self_attn.v_proj")
    lora = {name.split(".lora_A")[0] for name, _ in wrapped.named_parameters() if "lora_A" in name}
    prefix = "base_model.model.model.layers."
    assert sorted(lora) == [prefix + "0.self_attn.q_proj", prefix + "0.self_attn.v_proj", prefix + "1.self_attn.q_proj"]
