"""The command line: an end-to-end run, YAML with overrides, and one clear line for each user mistake."""

import json
import shutil

import pytest

from tiltlm.cli import main
from tiltlm.config import ConfigError, build_config
from tiltlm.metrics import read_metrics


def test_train_then_eval_from_the_command_line(tiny_model_dir, pairs_file, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {pairs_file}\nbatch_size: 4\ngrad_accum: 1\n"
                      f"lr: 0.001\nmax_length: 64\nmax_prompt_length: 32\nbeta: 0.3\n")
    out = tmp_path / "run"
    code = main(["train", "--config", str(config), "--output", str(out), "--epochs", "2", "--no-progress",
                 "--no-tensorboard", "lr=0.002"])
    assert code == 0
    saved = build_config(str(out / "config.yaml"))
    assert (saved.beta, saved.lr, saved.epochs, saved.batch_size) == (0.3, 0.002, 2, 4)  # YAML < flag < key=value
    rows = read_metrics(out / "metrics.jsonl")
    # 8 pairs / 4 per step = 2 steps x 2 epochs; warmup round(0.1 x 4) = 0 steps, so step 1 runs at the full lr
    assert len(rows) == 4 and rows[0]["lr"] == pytest.approx(0.002)
    result_file = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "final"), "--data", str(pairs_file), "--beta", "0.3",
                 "--max-length", "64", "--max-prompt-length", "32", "--json", str(result_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(result_file.read_text())
    assert printed["pairs"] == 8 and printed["rewards/margins"] > 0


@pytest.mark.parametrize("argv, expected", [
    (["train", "--data", "missing.jsonl", "--model", "MODEL"], "missing.jsonl"),
    (["train", "--data", "DATA", "--model", "MODEL", "bogus=1"], "option 'bogus'"),
    (["train", "--data", "DATA", "--model", "MODEL", "lr=fast"], "option 'lr'"),
    (["train", "--data", "DATA", "--model", "MODEL", "--beta", "-1"], "beta = -1.0"),
    (["train", "--data", "DATA", "--model", "MODEL", "--loss", "sigmoid,nope"], "loss = 'sigmoid,nope'"),
    (["train", "--data", "DATA", "--model", "MODEL", "--max-length", "8", "--max-prompt-length", "8"],
     "max_prompt_length (8) must be below max_length (8)"),
    (["train", "--config", "absent.yaml"], "absent.yaml: no such file"),
    (["train", "--data", "DATA", "--model", "does/not/exist"], "does/not/exist"),
    (["eval", "--model", "MODEL", "--data", "DATA"], "name the reference with --ref"),
])
def test_user_mistakes_get_one_clear_line(argv, expected, tiny_model_dir, pairs_file, tmp_path, capsys,
                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(tiny_model_dir) if a == "MODEL" else str(pairs_file) if a == "DATA" else a for a in argv]
    if argv[0] == "train":
        argv += ["--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # a mistake leaves nothing behind


def test_bad_yaml_names_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("beta: 0.1\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml.*line"):
        build_config(str(broken))
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="wrong.yaml: option 'epochs'"):
        build_config(str(wrong_type))


def test_resume_needs_only_the_run_directory(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output", str(out),
                 "--batch-size", "4", "--grad-accum", "1", "--max-length", "64", "--max-prompt-length", "32",
                 "--save-every", "1", "--no-progress", "--no-tensorboard"]) == 0
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-2")  # as if stopped after step 1
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0  # settings come from run/config.yaml
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert (out / "final" / "model.safetensors").is_file()
