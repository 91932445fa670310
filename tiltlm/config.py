"""The training configuration: one flat dataclass, settable from YAML and from the command line.

OmegaConf does the parsing and merging (defaults < YAML file < ``--flag value`` < ``key=value``) and
checks types against the dataclass, so a typo in a YAML key or a string where a number belongs is an
error that names the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tiltlm.losses import LOSSES, LossParams


class ConfigError(ValueError):
    """A configuration that cannot be used, naming the key or file at fault."""


@dataclass
class TrainConfig:
    # what to train, on what
    model: str = "smollm2-135m"  # local directory, hub id or alias
    data: str = ""  # file (.jsonl .jsonl.gz .json .csv .parquet), save_to_disk directory or hub dataset
    eval_data: Optional[str] = None
    output: str = "runs/dpo"
    overwrite: bool = False  # replace an output directory that holds a different run
    resume: bool = False  # continue from the newest checkpoint in `output`
    resume_fallback: bool = False  # if the newest checkpoint is corrupted, resume from an older intact one

    # the reference policy
    ref: Optional[str] = None  # a different reference model; default: the policy's starting weights
    ref_mode: str = "auto"  # auto | online | precompute | adapters-off | none (see reference.py)
    ref_cache: Optional[str] = None  # precompute's table directory; default $TILTLM_CACHE/reference
                                     # or ~/.cache/tiltlm/reference

    # the objective
    loss: str = "sigmoid"  # comma-separated names from tiltlm.losses.LOSSES, e.g. "sigmoid,nll"
    loss_weights: Optional[str] = None  # comma-separated, one per loss; default all 1
    beta: float = 0.1
    label_smoothing: float = 0.0
    ipo_average: bool = True  # ipo: per-token (not summed) log-ratios, as the IPO authors advise
    simpo_gamma: float = 1.0  # simpo: target reward margin (paper: beta 2.0, gamma/beta ~ 0.5)
    orpo_lambda: float = 0.1  # orpo: weight of the odds-ratio term
    objective: str = "auto"  # auto (by the data's rows: pairs, ranked lists, unpaired) | reward-model
    pairs: str = "ranked"  # ranked lists: ranked (Plackett-Luce over each list) | all (every pair they imply)
    kto_desirable_weight: float = 1.0  # unpaired rows (KTO): lambda_D, the weight of desirable rows
    kto_undesirable_weight: float = 1.0  # lambda_U, the weight of undesirable rows
    reward_margin: float = 0.0  # reward model: Llama 2's margin m, subtracted from every pair's difference
    reward_centering: float = 0.0  # reward model: coefficient of (r_w + r_l)^2 (Eisenstein et al.), e.g. 0.01

    # data shaping
    max_length: int = 1024
    max_prompt_length: int = 512
    layout: str = "packed"  # packed | shared (prompt once per pair) | concatenated (two rows per pair)
    pack_tokens: int = 0  # packed rows hold up to this many tokens; 0: max_length
    group_by_length: bool = True  # micro-batches of pairs of similar length: less padding (data/order.py)

    # optimisation
    lr: float = 5e-7
    epochs: int = 1
    max_steps: int = -1  # optimizer steps; -1: as many as the epochs give
    batch_size: int = 8  # pairs per micro-batch per process
    grad_accum: int = 4
    warmup_ratio: float = 0.1
    scheduler: str = "linear"  # linear | cosine | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    release_memory: bool = False  # CPU: freed tensors go back to the system at once (lower RSS, slower steps)
    seed: int = 42
    max_bad_steps: int = 10  # optimizer steps with non-finite gradients skipped before the run stops

    # LoRA (through peft): r = 0 trains every weight
    lora_r: int = 0
    lora_alpha: Optional[float] = None  # default: 2 * r
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    merge_lora: bool = False  # also save final/merged, a plain transformers model

    # numerics and hardware
    dtype: str = "auto"  # compute: auto (float32 on CPU, bf16 on GPUs with native bf16) | float32 | bf16;
                         # bf16 trains float32 master weights under bf16 autocast
    bf16_weights: bool = False  # keep the weights themselves in bf16 (half the memory; small updates are lost)
    deterministic: bool = False  # PyTorch's deterministic algorithms (GPU runs repeat bit for bit, slower)
    device: str = "auto"
    logprob_chunk: int = 256  # completion positions projected to the vocabulary at a time
    attention: str = "auto"  # auto | flex (GPU) | blocks (CPU) | sdpa | eager: see tiltlm.attention
    trust_remote_code: bool = False
    parallel: str = "ddp"  # under torchrun: ddp (whole model per rank) | fsdp (weights and optimizer sharded)

    # logging and saving
    log_every: int = 1
    eval_every: int = 100
    save_every: int = 200
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def build_config(yaml_path: str | None = None, flags: dict[str, Any] | None = None,
                 dotlist: list[str] | None = None) -> TrainConfig:
    """Merge defaults, a YAML file, ``--flag`` values and ``key=value`` overrides, in that order."""
    merged = OmegaConf.structured(TrainConfig)
    if yaml_path is not None:
        if not Path(yaml_path).is_file():
            raise ConfigError(f"config file {yaml_path}: no such file")
        loaded = _parse(lambda: OmegaConf.load(yaml_path), f"config file {yaml_path}")
        if not isinstance(loaded, type(merged)):
            raise ConfigError(f"config file {yaml_path}: expected a mapping of option: value")
        merged = _parse(lambda: OmegaConf.merge(merged, loaded), f"config file {yaml_path}")
    if flags:
        merged = _parse(lambda: OmegaConf.merge(merged, OmegaConf.create(flags)), "command-line flags")
    if dotlist:
        bad = [item for item in dotlist if "=" not in item]
        if bad:
            raise ConfigError(f"override {bad[0]!r}: expected key=value")
        merged = _parse(lambda: OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist)), "key=value overrides")
    config: TrainConfig = _parse(lambda: OmegaConf.to_object(merged), "configuration")
    validate(config)
    return config


def _parse(step, where: str):
    """Run an OmegaConf step, turning its errors into a one-line ConfigError naming ``where`` and the key."""
    try:
        return step()
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        key = getattr(error, "full_key", None)
        message = " ".join(str(getattr(error, "msg", error)).split())
        raise ConfigError(f"{where}: {f'option {key!r}: ' if key else ''}{message}") from None


def validate(config: TrainConfig) -> None:
    positive = ["max_length", "max_prompt_length", "batch_size", "grad_accum", "epochs", "log_every",
                "eval_every", "save_every", "logprob_chunk"]
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} = {getattr(config, name)}: expected a positive number")
    if config.max_prompt_length >= config.max_length:
        raise ConfigError(f"max_prompt_length ({config.max_prompt_length}) must be below max_length "
                          f"({config.max_length}) to leave room for the completion")
    if config.beta <= 0:
        raise ConfigError(f"beta = {config.beta}: expected a positive number")
    if not 0.0 <= config.label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing = {config.label_smoothing}: expected 0 <= value < 0.5")
    if config.simpo_gamma < 0:
        raise ConfigError(f"simpo_gamma = {config.simpo_gamma}: expected a margin >= 0")
    if config.orpo_lambda < 0:
        raise ConfigError(f"orpo_lambda = {config.orpo_lambda}: expected a weight >= 0")
    if config.objective not in ("auto", "reward-model"):
        raise ConfigError(f"objective = {config.objective!r}: expected auto or reward-model")
    if config.pairs not in ("ranked", "all"):
        raise ConfigError(f"pairs = {config.pairs!r}: expected ranked (Plackett-Luce over each list) or all")
    for name in ("kto_desirable_weight", "kto_undesirable_weight", "reward_margin", "reward_centering"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} = {getattr(config, name)}: expected a number >= 0")
    if config.scheduler not in ("linear", "cosine", "constant"):
        raise ConfigError(f"scheduler = {config.scheduler!r}: expected linear, cosine or constant")
    if config.ref_mode not in ("auto", "online", "precompute", "adapters-off", "none"):
        raise ConfigError(f"ref_mode = {config.ref_mode!r}: expected auto, online, precompute, adapters-off or none")
    if config.layout not in ("packed", "shared", "concatenated"):
        raise ConfigError(f"layout = {config.layout!r}: expected packed, shared or concatenated")
    if config.attention not in ("auto", "flex", "blocks", "sdpa", "eager"):
        raise ConfigError(f"attention = {config.attention!r}: expected auto, flex, blocks, sdpa or eager")
    if config.lora_r < 0:
        raise ConfigError(f"lora_r = {config.lora_r}: expected 0 (no LoRA) or a positive rank")
    if config.dtype in ("float16", "fp16"):
        raise ConfigError("dtype = float16: training in fp16 needs loss scaling, which tiltlm does not do; "
                          "use dtype = bf16 (GPUs with native bf16) or float32")
    if config.bf16_weights and config.dtype not in ("bf16", "bfloat16", "auto"):
        raise ConfigError(f"bf16_weights with dtype = {config.dtype}: expected dtype = bf16")
    if config.ref_mode == "adapters-off" and config.lora_r == 0:
        raise ConfigError("ref_mode = adapters-off needs LoRA (lora_r > 0)")


def to_yaml(config: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(asdict(config)))


def loss_setup(config: TrainConfig) -> tuple[LossParams, tuple[str, ...], tuple[float, ...]]:
    """The loss names, their weights and their hyper-parameters from ``config``."""
    names = tuple(n.strip() for n in config.loss.split(",") if n.strip())
    unknown = [n for n in names if n not in LOSSES]
    if not names or unknown:
        raise ConfigError(f"loss = {config.loss!r}: expected comma-separated names from {', '.join(LOSSES)}")
    try:
        weights = tuple(float(w) for w in config.loss_weights.split(",")) if config.loss_weights else (1.0,) * len(names)
    except ValueError:
        weights = ()
    if len(weights) != len(names):
        raise ConfigError(f"loss_weights = {config.loss_weights!r}: expected {len(names)} numbers, one per loss")
    params = LossParams(**{f.name: getattr(config, f.name) for f in fields(LossParams)})
    return params, names, weights
