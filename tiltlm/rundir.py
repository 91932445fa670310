"""The output directory: created for a new run, continued by --resume, never clobbered by accident, and
used by one run at a time.

Only what a run writes makes a directory "a run", and only that is removed by --overwrite: a user's
notes or a ``data_summary.txt`` of their own beside it stay. A symlink among a run's names is removed as
a link, never followed into what it points to.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf

from tiltlm.config import ConfigError, TrainConfig
from tiltlm.models import canonical_name

# What a run writes; --overwrite removes these and nothing else a user may keep beside them.
ARTIFACTS = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "merged", "tensorboard")
# What a save interrupted by a kill leaves (checkpoint.write_atomically's temporary directories).
LEFTOVERS = (".final.tmp-*", ".merged.tmp-*")
LOCK = "run.lock"  # holds the pid of the run that uses the directory (see locked)

# Options that may change between a run and its resumption without changing what it computes. The layout
# too (checkpoints reshard): train.resume checks that a step still takes as many pairs as before.
RESUMABLE_CHANGES = {"output", "resume", "overwrite", "progress", "tensorboard", "eval_every", "save_every",
                     "keep_checkpoints", "log_every", "max_steps", "epochs", "device", "resume_fallback",
                     "batch_size", "grad_accum", "parallel"}

# Options naming local paths, hub ids or aliases: stored absolute when local (models.canonical_name).
LOCATIONS = ("model", "ref", "data", "eval_data", "ref_cache")


def _canonical(settings: dict) -> dict:
    """``settings`` (a config as a dict) with the values of LOCATIONS made canonical: local paths absolute, so
    that ``config.yaml`` works from any directory."""
    return {**settings, **{k: canonical_name(settings[k]) for k in LOCATIONS if settings.get(k)}}


def check(config: TrainConfig) -> Path:
    """Refuse an output that is not a directory, one that holds another run (unless overwriting) or,
    for --resume, a run with different settings. Writes nothing."""
    out = Path(config.output)
    _check_is_directory(out)
    saved = out / "config.yaml"
    if config.resume:
        if not saved.is_file():
            raise ConfigError(f"resume: {out} holds no run to continue (no {saved.name})")
        before = _canonical(OmegaConf.to_container(OmegaConf.load(saved)))
        now = _canonical(asdict(config))
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k])
        if changed:
            details = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ConfigError(f"resume: {out} was run with different settings ({details}); resuming would "
                              f"not continue the same run. Use a new --output for a new run.")
        return out
    existing = [path.name for path in run_files(out)]
    if existing and not config.overwrite:
        raise ConfigError(f"output {out} already holds a run ({', '.join(existing)}). Use --resume to "
                          f"continue it, --overwrite to replace it, or another --output.")
    return out


def _check_is_directory(out: Path) -> None:
    """``out`` and its nearest existing ancestor must be directories (checked before any model loads)."""
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise ConfigError(f"output {out}: {path} is a file; expected a directory for the run")
            return


def run_files(out: Path) -> list[Path]:
    """The paths in ``out`` that a run wrote (links among them included, dangling or not)."""
    paths = [out / name for name in ARTIFACTS if (out / name).exists() or (out / name).is_symlink()]
    return paths + sorted(p for pattern in LEFTOVERS for p in out.glob(pattern))


def start(config: TrainConfig) -> Path:
    """For a new run: remove a replaced run's files (--overwrite) and write ``config.yaml``."""
    out = Path(config.output)
    if not config.resume:
        for path in run_files(out):
            # a link is removed as a link: rmtree would refuse it, and following it would delete user files
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(_canonical(asdict(config))))
    return out


@contextlib.contextmanager
def locked(output: str | Path) -> Iterator[Path]:
    """Hold ``output/run.lock`` for the length of a run; a second run into the same directory is refused
    with the holder's pid. The lock is ``flock``'s, which the kernel drops when its process ends however
    it ends, so a killed run never leaves a lock that blocks (only a file, which the next run reuses).
    A directory created just for the lock is removed again if the run wrote nothing into it."""
    out = Path(output)
    _check_is_directory(out)
    created = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    handle = _acquire(path, out)
    try:
        yield out
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a waiting opener finds the file gone (see _acquire)
        handle.close()
        for directory in created:
            try:
                directory.rmdir()  # only if empty
            except OSError:
                break


def _acquire(path: Path, out: Path):
    """An open handle on ``path`` holding its exclusive lock, with our pid written in it."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(f"output {out} is in use by another tiltlm run (pid {holder}); wait for it to "
                              f"finish, or use another --output") from None
        # The holder may have removed the file between our open and our lock: then we locked a file no
        # other run can see, so try again on the one now at ``path``.
        if path.exists() and os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return handle
        handle.close()
