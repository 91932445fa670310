"""The output directory: created for a new run, continued by --resume, never clobbered by accident."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from tiltlm.config import ConfigError, TrainConfig, to_yaml

# What a run writes; --overwrite removes these and nothing else a user may keep beside them.
ARTIFACTS = ("config.yaml", "metrics.jsonl", "data_summary.txt", "checkpoints", "final", "merged", "tensorboard")

# Options that may change between a run and its resumption without changing what it computes.
RESUMABLE_CHANGES = {"output", "resume", "overwrite", "progress", "tensorboard", "eval_every", "save_every",
                     "keep_checkpoints", "log_every", "max_steps", "epochs", "device", "resume_fallback"}


def check(config: TrainConfig) -> Path:
    """Refuse an output directory that holds another run (unless overwriting) or, for --resume, a run
    with different settings. Writes nothing."""
    out = Path(config.output)
    saved = out / "config.yaml"
    if config.resume:
        if not saved.is_file():
            raise ConfigError(f"resume: {out} holds no run to continue (no {saved.name})")
        before = OmegaConf.to_container(OmegaConf.load(saved))
        now = asdict(config)
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k])
        if changed:
            details = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ConfigError(f"resume: {out} was run with different settings ({details}); resuming would "
                              f"not continue the same run. Use a new --output for a new run.")
        return out
    existing = [name for name in ARTIFACTS if (out / name).exists()]
    if existing and not config.overwrite:
        raise ConfigError(f"output {out} already holds a run ({', '.join(existing)}). Use --resume to "
                          f"continue it, --overwrite to replace it, or another --output.")
    return out


def start(config: TrainConfig) -> Path:
    """For a new run: remove a replaced run's files (--overwrite) and write ``config.yaml``."""
    out = Path(config.output)
    if not config.resume:
        for name in [name for name in ARTIFACTS if (out / name).exists()]:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(config))
    return out
