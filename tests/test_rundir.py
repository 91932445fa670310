"""The output directory (tiltlm.rundir), issue 15 items 4, 9, 10, 13: one run at a time (a lock that a
killed run never leaves behind), only a run's own files count as a run and are replaced, a file or a
symlink where a directory belongs, and local paths stored absolute."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tiltlm import rundir
from tiltlm.config import ConfigError, TrainConfig

HOLDER = textwrap.dedent("""
    import sys, time
    from tiltlm import rundir
    with rundir.locked(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # hold until the test closes stdin (or kills us)
""")


def hold(out: Path) -> subprocess.Popen:
    """A second process holding ``out``'s lock, once it has said so."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert process.stdout.readline().strip() == "locked"
    return process


# item 4: two runs into one output directory


def test_a_second_run_is_refused_with_the_holders_pid(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "run"
    holder = hold(out)
    try:
        with pytest.raises(ConfigError, match=rf"{out}.*in use by another tiltlm run \(pid {holder.pid}\)"):
            with rundir.locked(out):
                pass
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    with rundir.locked(out):  # released when the holder ended
        assert (out / rundir.LOCK).read_text().strip() == str(os.getpid())
    assert not (out / rundir.LOCK).exists()


def test_a_killed_run_leaves_no_lock_that_blocks(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "run"
    holder = hold(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / rundir.LOCK).is_file()  # the file stays, the lock does not
    with rundir.locked(out):
        assert (out / rundir.LOCK).read_text().strip() == str(os.getpid())


def test_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with rundir.locked(out):
            raise RuntimeError("boom")
    with rundir.locked(out):
        pass


def test_a_lock_that_created_the_directory_leaves_nothing_when_nothing_was_written(tmp_path):
    out = tmp_path / "a" / "run"
    with rundir.locked(out):
        assert out.is_dir()
    assert not (tmp_path / "a").exists()
    with rundir.locked(out):
        (out / "config.yaml").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


# item 9: only what a run writes is a run


def test_a_users_file_is_not_a_run_and_survives_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "data_summary.txt").write_text("mine")
    rundir.check(TrainConfig(output=str(out)))  # not refused: no run there
    (out / "metrics.jsonl").write_text("{}\n")
    (out / ".final.tmp-123").mkdir()  # what a killed save leaves
    with pytest.raises(ConfigError, match="already holds a run"):
        rundir.check(TrainConfig(output=str(out)))
    config = TrainConfig(output=str(out), overwrite=True)
    rundir.check(config)
    rundir.start(config)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "data_summary.txt"]
    assert (out / "data_summary.txt").read_text() == "mine"


# item 13: a file where the directory belongs, a symlink in the run


def test_output_that_is_a_file_fails_in_the_checks(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    for output in (path, path / "run"):
        with pytest.raises(ConfigError, match=f"output {output}: .*notes.txt is a file"):
            rundir.check(TrainConfig(output=str(output)))
    assert path.read_text() == "mine"


def test_overwrite_removes_a_symlinked_final_without_following_it(tmp_path):
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "weights.bin").write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / "final").symlink_to(mine, target_is_directory=True)
    (out / "metrics.jsonl").symlink_to(mine / "weights.bin")
    config = TrainConfig(output=str(out), overwrite=True)
    rundir.check(config)
    rundir.start(config)
    assert not (out / "final").exists() and not (out / "final").is_symlink()
    assert (mine / "weights.bin").read_text() == "precious"


# item 10: local paths stored absolute


def test_config_yaml_stores_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    config = TrainConfig(model="models/tiny", data="pairs.jsonl", ref="smollm2-135m", eval_data="someone/dataset",
                         output="run")
    rundir.start(config)
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.model == str(tmp_path / "models" / "tiny")
    assert saved.data == str(tmp_path / "pairs.jsonl")
    assert (saved.ref, saved.eval_data) == ("smollm2-135m", "someone/dataset")
    # resuming, from here with the relative names or from elsewhere with what config.yaml holds, is the same run
    rundir.check(TrainConfig(**{**OmegaConf.to_container(saved), "output": "run", "resume": True}))
    rundir.check(TrainConfig(model="models/tiny", data="./pairs.jsonl", ref="smollm2-135m",
                             eval_data="someone/dataset", output="run", resume=True))
