"""Faults a run survives without losing anything, against real processes where it matters.

* SIGKILL at a random step, and SIGKILL inside a checkpoint save (``python -m tiltlm.cli train`` in a
  subprocess): ``--resume`` reaches the uninterrupted run's weights bit for bit (CPU, float32, one
  thread each), data order and LR schedule included; a half-written checkpoint is named and ignored.
* SIGTERM (preemption): a checkpoint at the end of the current step, exit 0 within a bounded time.
* A corrupted checkpoint stops ``--resume`` with exit 2 and the file's name, unless
  ``resume_fallback=true``; a full disk (a real, tiny tmpfs) is a one-line error with the previous
  checkpoint intact; non-finite losses skip steps (counted, then a diagnostic).
* Untrusted files: no unrestricted unpickling anywhere in the package, remote code off by default, and
  a checkpoint carrying a code-running pickle is refused.

The resumed halves run in this process (on one thread, like the subprocesses), which is enough: what
is tested is what the killed process left on disk.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import replace
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiltlm import checkpoint as ckpt
from tiltlm.cli import main
from tiltlm.metrics import read_metrics

PACKAGE = Path(__file__).resolve().parents[1] / "tiltlm"
STEPS = 48  # 8 pairs, 2 a step, 12 epochs: about 50 ms a step, so a kill lands mid-run
SAVE_EVERY = 2
TIMEOUT = 240  # seconds for any subprocess; a normal one takes 10-30 s on 2 busy cores
OPTIONS = ["--batch-size", "2", "--grad-accum", "1", "--epochs", "12", "--max-length", "64",
           "--max-prompt-length", "32", "--lr", "1e-3", "--warmup-ratio", "0.25", "--seed", "3",
           "--save-every", str(SAVE_EVERY), "--keep-checkpoints", "3", "--no-progress", "--no-tensorboard"]


@contextmanager
def one_thread():
    """torch on one thread, as the subprocesses run (OMP_NUM_THREADS=1), so results compare bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> list[str]:
    from conftest import PAIRS

    data = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return ["--model", str(tiny_model_dir), "--data", str(data)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, inputs) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    with one_thread():
        assert main(["train", *inputs, *OPTIONS, "--output", str(out)]) == 0
    return out


def weights(run: Path) -> dict:
    return load_file(run / "final" / "model.safetensors")


def assert_bitwise_equal(run: Path, reference: Path, where: str = "") -> None:
    """Same final weights, bit for bit, and the same logged steps, losses, learning rates and norms.
    ``where`` (e.g. the randomly chosen kill step) prefixes failure messages."""
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{where}: {name}"
    rows, want = read_metrics(run / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), where  # every step logged exactly once
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in rows] == \
        [(r["loss"], r["lr"], r["grad_norm"]) for r in want], where


def resume(run: Path, capsys, *extra: str) -> tuple[int, str, str]:
    """``tiltlm train --config RUN/config.yaml --resume RUN`` here, on one thread; (code, stdout, stderr)."""
    capsys.readouterr()
    with one_thread():
        code = main(["train", "--config", str(run / "config.yaml"), "--resume", str(run), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(stderr: str) -> str:
    """The CLI's error: one line (stderr also holds progress bars), and no traceback."""
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("tiltlm train: error:")]
    return line


def spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_rows(process: subprocess.Popen, metrics: Path, rows: int) -> None:
    """Block until ``metrics`` has ``rows`` rows (the run is at step rows + 1), bounded in time."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if metrics.is_file() and len(read_metrics(metrics)) >= rows:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before step {rows}:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.005)
    process.kill()
    pytest.fail(f"no step {rows} within {TIMEOUT} s")


def finish(process: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"no exit within {timeout} s:\n{process.communicate()[0][-3000:]}")
    return process.returncode, output


# --- killed ------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, inputs, uninterrupted, capsys):
    kill_after = random.randrange(3, STEPS // 2)
    run = tmp_path / "run"
    process = spawn(["-m", "tiltlm.cli", "train", *inputs, *OPTIONS, "--output", str(run)], tmp_path)
    wait_for_rows(process, run / "metrics.jsonl", kill_after)
    process.send_signal(signal.SIGKILL)
    code, _ = finish(process)
    assert code == -signal.SIGKILL and not (run / "final").exists(), f"killed after step {kill_after}"
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    code, out, err = resume(run, capsys)
    assert code == 0, err
    assert f"resumed from {newest}" in out
    assert_bitwise_equal(run, uninterrupted, f"killed after step {kill_after}")


@pytest.mark.multiprocess
def test_sigkill_inside_a_checkpoint_save_leaves_the_previous_one(tmp_path, inputs, uninterrupted, capsys):
    """The process kills itself at the worst moment of saving step ``victim``: every file and the
    manifest written, the directory not yet renamed (it looks complete, and must still be ignored)."""
    victim = random.randrange(2, STEPS // 2, SAVE_EVERY) + SAVE_EVERY
    run = tmp_path / "run"
    die_before_rename = (
        "import os, signal, sys\n"
        "import tiltlm.checkpoint as c\n"
        "sync = c._fsync_directory\n"
        "def fsync_then_die(path):\n"
        "    sync(path)\n"
        f"    if path.name.startswith('.step-{victim}.tmp-'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "c._fsync_directory = fsync_then_die\n"
        "from tiltlm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    process = spawn(["-c", die_before_rename, "train", *inputs, *OPTIONS, "--output", str(run)], tmp_path)
    code, output = finish(process)
    assert code == -signal.SIGKILL, output[-3000:]
    checkpoints = run / "checkpoints"
    (half,) = checkpoints.glob(f".step-{victim}.tmp-*")
    assert (half / ckpt.MANIFEST).is_file()  # complete-looking, yet never a checkpoint
    previous = checkpoints / f"step-{victim - SAVE_EVERY}"
    assert ckpt.list_checkpoints(checkpoints)[-1] == previous
    ckpt.verify(previous)  # the previous checkpoint is intact
    code, out, err = resume(run, capsys)
    assert code == 0, err
    assert f"ignoring {half}" in out and f"resumed from {previous}" in out
    assert_bitwise_equal(run, uninterrupted, f"killed while saving step {victim}")


@pytest.mark.multiprocess
def test_sigterm_checkpoints_the_current_step_and_exits_0(tmp_path, inputs, uninterrupted, capsys):
    run = tmp_path / "run"
    process = spawn(["-m", "tiltlm.cli", "train", *inputs, *OPTIONS, "--output", str(run)], tmp_path)
    after = random.randrange(3, STEPS // 2)
    wait_for_rows(process, run / "metrics.jsonl", after)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, output = finish(process, timeout=60)
    elapsed = time.monotonic() - sent
    assert code == 0, output[-3000:]
    assert elapsed < 30  # one tiny step and a save; generous for a busy machine
    stopped = read_metrics(run / "metrics.jsonl")[-1]["step"]  # the step it was in, finished
    assert f"SIGTERM: checkpoint saved at step {stopped}" in output
    assert ckpt.list_checkpoints(run / "checkpoints")[-1].name == f"step-{stopped}"
    assert not (run / "final").exists() and stopped < STEPS
    code, out, err = resume(run, capsys)
    assert code == 0, err
    assert f"(step {stopped} of {STEPS})" in out
    assert_bitwise_equal(run, uninterrupted, f"SIGTERM after step {after}, stopped at {stopped}")


# --- damaged checkpoints, full disk -----------------------------------------------------------------


def damaged_copy(uninterrupted: Path, tmp_path: Path, damage: str) -> tuple[Path, Path]:
    """A copy of the finished run without final/, its newest checkpoint damaged; (run, damaged file)."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    shutil.rmtree(run / "final")
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    if damage == "flip":
        victim = newest / "optimizer.pt"
        data = bytearray(victim.read_bytes())
        data[len(data) // 3] ^= 0x01
        victim.write_bytes(bytes(data))
    else:
        victim = newest / "trainable.safetensors"
        victim.unlink()
    return run, victim


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_corrupted_checkpoint_stops_resume_unless_fallback_is_allowed(tmp_path, uninterrupted, capsys, damage):
    run, victim = damaged_copy(uninterrupted, tmp_path, damage)
    code, out, err = resume(run, capsys)
    assert code == 2
    assert str(victim) in err and "resume_fallback=true" in err and "Traceback" not in err
    assert str(victim) in error_line(err)
    assert not (run / "final").exists()
    code, out, err = resume(run, capsys, "resume_fallback=true")
    assert code == 0, err
    older = f"step-{STEPS - SAVE_EVERY}"
    assert f"skipping step-{STEPS}" in out and f"resumed from {run / 'checkpoints' / older}" in out
    assert_bitwise_equal(run, uninterrupted)  # the older checkpoint's continuation is the same run


@pytest.fixture
def tiny_disk(tmp_path, uninterrupted):
    """A tmpfs with room for about 1.5 checkpoints of the test model (mounting needs root)."""
    checkpoint = ckpt.list_checkpoints(uninterrupted / "checkpoints")[-1]
    size = sum(p.stat().st_size for p in checkpoint.iterdir()) * 3 // 2
    size += (uninterrupted / "config.yaml").stat().st_size + 64 * 1024  # config, metrics rows
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); test_checkpoint.py patches the writer")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_full_disk_is_one_clear_line_and_keeps_the_previous_checkpoint(tiny_disk, inputs, capsys):
    run = tiny_disk / "run"
    with one_thread():
        code = main(["train", *inputs, *OPTIONS, "--output", str(run)])
    error = error_line(capsys.readouterr().err)
    assert code == 1
    (first,) = ckpt.list_checkpoints(run / "checkpoints")
    assert f"could not write {run / 'checkpoints' / f'step-{2 * SAVE_EVERY}'}" in error and "bytes free" in error
    assert first.name == f"step-{SAVE_EVERY}"
    ckpt.verify(first)
    assert not list((run / "checkpoints").glob(".*"))  # the failed save left no debris


# --- non-finite steps --------------------------------------------------------------------------------


POISONED = ":3"  # the third pair of the file: its loss becomes NaN


@pytest.fixture
def poisoned(monkeypatch):
    """The trainer's loss made NaN for every batch holding the poisoned pair (and its gradients NaN)."""
    step = importlib.import_module("tiltlm.step")
    real = step.score

    def score(policy, reference, objective, batch, *args):
        scored = real(policy, reference, objective, batch, *args)
        if any(source.endswith(POISONED) for source in batch.sources):
            metrics = {**scored.metrics, "loss": scored.metrics["loss"] * torch.nan}
            return replace(scored, losses=scored.losses * torch.nan, metrics=metrics)
        return scored

    monkeypatch.setattr(step, "score", score)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, inputs, poisoned, capsys):
    run = tmp_path / "run"
    options = [*inputs, "--output", str(run), *OPTIONS, "--epochs", "2", "--save-every", "1",
               "--keep-checkpoints", "8", "max_bad_steps=2"]
    assert main(["train", *options]) == 0
    out = capsys.readouterr().out
    rows = read_metrics(run / "metrics.jsonl")
    bad = [r["step"] for r in rows if r["loss"] != r["loss"]]
    # the poisoned pair is in exactly one step of each epoch (8 pairs, 4 steps an epoch)
    assert len(bad) == 2 and bad[0] <= 4 < bad[1]
    for count, step in enumerate(bad, start=1):
        assert f"step {step}: non-finite loss or gradients, step skipped ({count} so far)" in out
        # a skipped step leaves the weights exactly as the step before left them
        before = load_file(run / "checkpoints" / f"step-{step - 1}" / "trainable.safetensors") if step > 1 else None
        after = load_file(run / "checkpoints" / f"step-{step}" / "trainable.safetensors")
        if before is not None:
            assert all(torch.equal(before[k], after[k]) for k in after)
    assert all(torch.isfinite(t).all() for t in weights(run).values())


def test_too_many_non_finite_steps_stop_with_a_diagnostic(tmp_path, inputs, poisoned, capsys):
    run = tmp_path / "run"
    code = main(["train", *inputs, "--output", str(run), *OPTIONS, "--epochs", "2", "max_bad_steps=1"])
    err = error_line(capsys.readouterr().err)
    assert code == 1
    rows = read_metrics(run / "metrics.jsonl")
    second_bad = len(rows) + 1  # the failing step is not logged
    last_good = next(r for r in reversed(rows) if r["loss"] == r["loss"])
    assert "2 steps with non-finite loss or gradients (limit max_bad_steps = 1)" in err
    assert f"step {second_bad}'s pairs:" in err and f"pairs.jsonl{POISONED}" in err
    reported = json.loads(err.split("last finite metrics: ")[1])
    assert reported["step"] == last_good["step"] and reported["loss"] == last_good["loss"]
    assert not (run / "final").exists()


# --- untrusted files ---------------------------------------------------------------------------------


def calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    """Calls spelled ``dotted`` (e.g. ``torch.load``) in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
            if ".".join(reversed(parts)) == dotted:
                found.append(node)
    return found


def package_sources() -> dict[Path, ast.AST]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_unrestricted_unpickling_in_the_package():
    offenders = []
    for path, tree in package_sources().items():
        for call in calls(tree, "torch.load"):
            restricted = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                             for k in call.keywords)
            if not restricted:
                offenders.append(f"{path.name}:{call.lineno} torch.load without weights_only=True")
        for name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
            offenders += [f"{path.name}:{call.lineno} {name}" for call in calls(tree, name)]
        for node in ast.walk(tree):  # `from torch import load` would hide a call from the check above
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle") and \
                    any(alias.name in ("load", "loads") for alias in node.names):
                offenders.append(f"{path.name}:{node.lineno} imports {node.module}.load by name")
    assert not offenders, offenders
    assert calls(ast.parse((PACKAGE / "checkpoint.py").read_text()), "torch.load")  # the check sees real calls


def test_remote_code_is_off_unless_asked():
    from tiltlm.cli import build_parser
    from tiltlm.config import TrainConfig

    offenders = []
    for path, tree in package_sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and \
                    isinstance(node.value, ast.Constant) and node.value.value is not False:
                offenders.append(f"{path.name}:{node.value.lineno} trust_remote_code={node.value.value!r}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + \
                    node.args.kw_defaults
                for argument, default in zip(arguments, defaults):
                    if argument.arg == "trust_remote_code" and not (
                            isinstance(default, ast.Constant) and default.value is False):
                        offenders.append(f"{path.name}:{node.lineno} {node.name}(trust_remote_code) default "
                                         f"is not False")
    assert not offenders, offenders
    assert TrainConfig().trust_remote_code is False
    parser = build_parser()
    assert parser.parse_args(["train"]).__dict__.get("trust_remote_code", False) is False
    assert parser.parse_args(["eval", "--model", "m", "--data", "d"]).trust_remote_code is False


class RunsCode:
    """Unpickling this runs Python code (here it creates ``marker``): a malicious checkpoint's payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_checkpoint_with_a_code_running_pickle_is_refused(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint = ckpt.save_checkpoint(tmp_path / "checkpoints", model, optimizer, scheduler,
                                      ckpt.TrainingState(1), keep=2)
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "payload": RunsCode(marker)}, checkpoint / "optimizer.pt")
    # an attacker who can write the files can rewrite the manifest too: the checksums will pass
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    manifest["optimizer.pt"] = ckpt.sha256(checkpoint / "optimizer.pt")
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))
    ckpt.verify(checkpoint)
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt: refused"):
        ckpt.load_checkpoint(checkpoint, model, optimizer, scheduler)
    assert not marker.exists()
    torch.load(checkpoint / "optimizer.pt", weights_only=False)  # the payload is real: unrestricted loading runs it
    assert marker.exists()
