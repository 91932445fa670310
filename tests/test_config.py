"""Options declared once (tiltlm.config.option) and turned into flags (tiltlm.commands.options): ranges
checked before anything is written, help from the declarations, presets that explicit flags beat."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from typing import Literal, Optional

import pytest

from tiltlm.cli import build_parser, main
from tiltlm.commands.options import add_options, from_args
from tiltlm.config import ConfigError, TrainConfig, build_config, option


@pytest.mark.parametrize("flags, expected", [
    ({"max_grad_norm": -1.0}, "max_grad_norm = -1.0"),  # issue 15 item 2: would reverse the gradient
    ({"max_grad_norm": 0.0}, "max_grad_norm = 0.0"),  # clip_grad_norm_(0) zeroes every gradient
    ({"lr": -1.0}, "lr = -1.0"),
    ({"lr": 0.0}, "lr = 0.0"),
    ({"lr": math.nan}, "lr = nan"),
    ({"warmup_ratio": 1.5}, "warmup_ratio = 1.5"),
    ({"warmup_ratio": -0.1}, "warmup_ratio = -0.1"),
    ({"pack_tokens": -1}, "pack_tokens = -1"),
    ({"keep_checkpoints": -1}, "keep_checkpoints = -1"),
    ({"weight_decay": -0.1}, "weight_decay = -0.1"),
    ({"lora_alpha": 0.0}, "lora_alpha = 0.0"),
    ({"lora_dropout": 1.0}, "lora_dropout = 1.0"),
    ({"max_bad_steps": -1}, "max_bad_steps = -1"),
    ({"max_steps": 0}, "max_steps = 0: expected -1 or >= 1"),
    ({"seed": -3}, "seed = -3"),
    ({"beta": -1.0}, "beta = -1.0"),
    ({"logprob_chunk": 0}, "logprob_chunk = 0"),
    ({"scheduler": "exp"}, "scheduler = 'exp': expected linear, cosine or constant"),
    ({"loss": "ipo", "label_smoothing": 0.1}, "label_smoothing = 0.1: no loss of 'ipo' uses it"),
    ({"loss": "sigmoid,nll", "loss_weights": "1,-1"}, "loss_weights = '1,-1'"),
    ({"parallel": "fdsp"}, "parallel = 'fdsp': expected ddp or fsdp"),
    ({"dtype": "float8"}, "dtype = 'float8': expected auto, float32"),
])
def test_every_setting_out_of_range_is_refused(flags, expected):
    with pytest.raises(ConfigError) as error:
        build_config(None, flags)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("flags", [
    {"max_grad_norm": math.inf},  # documented: no clipping
    {"keep_checkpoints": 0},  # documented: keep every checkpoint
    {"max_steps": -1}, {"max_steps": 1}, {"warmup_ratio": 0.0}, {"warmup_ratio": 1.0},
    {"loss": "robust", "label_smoothing": 0.2}, {"loss": "exo,nll", "label_smoothing": 0.1},
])
def test_documented_edge_values_are_accepted(flags):
    config = build_config(None, flags)
    assert all(getattr(config, k) == v for k, v in flags.items())


def test_every_numeric_option_declares_its_range():
    hints = typing.get_type_hints(TrainConfig)
    numeric = [f for f in fields(TrainConfig) if hints[f.name] in (int, float, Optional[int], Optional[float])]
    unchecked = [f.name for f in numeric if not {"above", "at_least", "below", "at_most"} & set(f.metadata)]
    assert numeric and not unchecked


def test_max_prompt_length_follows_max_length_unless_given():
    # issue 15 item 17: --max-length 512 alone failed against a max_prompt_length default of 512
    assert build_config(None, {"max_length": 512}).max_prompt_length == 256
    assert build_config(None, {"max_length": 512, "max_prompt_length": 100}).max_prompt_length == 100
    assert TrainConfig(max_length=64).max_prompt_length == 32
    assert TrainConfig().max_prompt_length == 1024 // 2


def test_train_with_only_max_length_builds_its_config():
    from tiltlm.commands.train import config_from

    args = build_parser().parse_args(["train", "--data", "pairs.jsonl", "--max-length", "512"])
    assert (config_from(args).max_length, config_from(args).max_prompt_length) == (512, 256)


@pytest.mark.parametrize("argv, expected", [
    (["train", "--data", "DATA", "--lr", "-1"], "lr = -1.0"),  # issue 15 item 8
    (["train", "--data", "DATA", "--max-grad-norm", "-1"], "max_grad_norm = -1.0"),  # item 2
    (["train", "--data", "DATA", "lora_dropout=1.5"], "lora_dropout = 1.5"),
    (["eval", "--model", "MODEL", "--data", "DATA", "--batch-size", "0"], "batch_size = 0"),  # item 11
    (["quickstart", "--samples", "1"], "samples = 1"),
    (["generate", "--model", "MODEL", "--prompts", "DATA", "--output", "OUT/g.jsonl", "--top-p", "0"], "top_p = 0.0"),
])
def test_a_refused_setting_is_one_line_and_writes_nothing(argv, expected, tiny_model_dir, pairs_file, tmp_path,
                                                         capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    names = {"DATA": str(pairs_file), "MODEL": str(tiny_model_dir), "OUT/g.jsonl": str(out / "g.jsonl")}
    argv = [names.get(a, a) for a in argv]
    if argv[0] in ("train", "quickstart"):
        argv += ["--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_help_shows_each_options_meaning_default_and_range(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    assert "--data DATA preference pairs:" in text
    assert "--beta BETA strength of the KL regularisation" in text and "(default 0.1; > 0)" in text
    assert "{linear,cosine,constant}" in text and "--no-progress" in text


def test_verify_help_is_not_an_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["verify", "--help"])
    assert done.value.code == 0 and "--seed" in capsys.readouterr().out


def test_eval_takes_its_defaults_from_train_config():
    args = build_parser().parse_args(["eval", "--model", "m", "--data", "d"])
    defaults = TrainConfig()
    for name in ("beta", "loss", "max_length", "batch_size", "dtype", "device", "ref", "ref_cache"):
        assert getattr(args, name) == getattr(defaults, name), name


@pytest.mark.parametrize("command", ["quickstart", "frontier"])
def test_explicit_flags_beat_the_quick_preset(command, monkeypatch):
    module = __import__(f"tiltlm.commands.{command}", fromlist=["run"])
    seen = []
    monkeypatch.setattr(module, f"run_{command}", seen.append)
    assert main([command, "--quick", "--epochs", "5", "--max-new-tokens", "24"]) == 0
    assert (seen[0].epochs, seen[0].max_new_tokens) == (5, 24)  # given, although --quick sets 1 and 8 or 12
    assert seen[0].batch_size == module.QUICK["batch_size"]  # not given: the preset's


@dataclass
class Toy:
    names: list[str] = option(None, "some names")
    mode: Literal["a", "b"] = option("a", "a mode")
    limit: Optional[int] = option(None, "a limit", at_least=1)
    on: bool = option(True, "a switch")
    rate: float = option(0.5, "a rate", above=0, below=1)


def test_flags_follow_the_annotations():
    import argparse

    parser = argparse.ArgumentParser()
    add_options(parser, Toy)
    args = parser.parse_args(["--names", "x", "y", "--mode", "b", "--limit", "3", "--no-on", "--rate", "0.25"])
    assert from_args(Toy, args) == Toy(names=["x", "y"], mode="b", limit=3, on=False, rate=0.25)
    assert from_args(Toy, parser.parse_args([])) == Toy()
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    assert "(default 0.5; > 0 and < 1)" in " ".join(parser.format_help().split())
