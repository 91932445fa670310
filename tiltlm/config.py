"""The training configuration: one flat dataclass, settable from YAML and from the command line.

Every option is declared once, by :func:`option`: default, one-line meaning, choices and range. The
command line builds its ``--flags`` and help from these (tiltlm/commands/options.py), and
:func:`check_options` checks any such dataclass against them: YAML keys, flags and the Python API alike.

OmegaConf merges defaults < YAML file < ``--flag value`` < ``key=value`` and checks types against the
dataclass, so a typo in a key or a string where a number belongs is an error naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tiltlm.losses import LOSSES, LossParams
from tiltlm.models import DTYPES


T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used, naming the key or file at fault."""


BOUNDS = (("above", ">", lambda v, b: v > b), ("at_least", ">=", lambda v, b: v >= b),
          ("below", "<", lambda v, b: v < b), ("at_most", "<=", lambda v, b: v <= b))


def option(default: Any, help: str, *, choices: tuple = (), above: float | None = None,
           at_least: float | None = None, below: float | None = None, at_most: float | None = None,
           special: Any = None, finite: bool = True) -> Any:
    """A dataclass field with its meaning and allowed values in its metadata. ``special``: one value
    allowed outside the range (e.g. -1 for "as many as the epochs give"); ``finite``: whether a float
    must be finite (NaN never passes a bound)."""
    bounds = {"above": above, "at_least": at_least, "below": below, "at_most": at_most}
    return field(default=default, metadata={"help": help, "choices": tuple(choices), "special": special,
                                            "finite": finite, **{k: v for k, v in bounds.items() if v is not None}})


def same_as(cls: type, name: str) -> Any:
    """A field declared as ``cls``'s field ``name`` is (default, meaning, range): an option two configs share."""
    declared = next(f for f in fields(cls) if f.name == name)
    return field(default=declared.default, metadata=declared.metadata)


def expectation(meta: dict) -> str:
    """What an option accepts, in words: ``"> 0"``, ``">= 0 and < 1"``, ``"a, b or c"``; empty if anything."""
    if meta.get("choices"):
        *most, last = map(str, meta["choices"])
        return f"{', '.join(most)} or {last}" if most else last
    text = " and ".join(f"{sign} {meta[key]:g}" for key, sign, _ in BOUNDS if key in meta)
    if text and meta.get("special") is not None:
        text = f"{meta['special']} or {text}"
    return text


def allowed(value: Any, meta: dict) -> bool:
    if value is None or value == meta.get("special"):
        return True
    if meta.get("choices"):
        return value in meta["choices"]
    if isinstance(value, float) and meta.get("finite", True) and not math.isfinite(value):
        return False
    return all(test(value, meta[key]) for key, _, test in BOUNDS if key in meta)


def check_options(config: T) -> T:
    """``config``, a dataclass, once each field is within the choices and range its :func:`option` declares."""
    for f in fields(config):
        value = getattr(config, f.name)
        if not allowed(value, f.metadata):
            raise ConfigError(f"{f.name} = {value!r}: expected {expectation(f.metadata) or 'a finite number'}")
    return config


# Losses whose formula uses label_smoothing (tiltlm.losses: sigmoid as conservative DPO, robust, exo).
SMOOTHED_LOSSES = tuple(name for name, loss in LOSSES.items() if loss.uses_label_smoothing)


@dataclass
class TrainConfig:
    # what to train, on what
    model: str = option("smollm2-135m", "the policy: a model or adapter directory, a hub id or the alias smollm2-135m")
    data: str = option("", "preference pairs: a file (.jsonl .json .csv .parquet), saved dataset or hub dataset")
    eval_data: Optional[str] = option(None, "held-out preference pairs, measured every eval_every steps")
    output: str = option("runs/dpo", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    overwrite: bool = option(False, "replace an output directory that holds a different run")
    resume: bool = option(False, "continue from the newest checkpoint in output")
    resume_fallback: bool = option(False, "if the newest checkpoint is corrupted, resume from an older intact one")

    # the reference policy
    ref: Optional[str] = option(None, "a different reference model (default: the policy's starting weights)")
    ref_mode: str = option("auto", "pi_ref scoring", choices=("auto", "online", "precompute", "adapters-off", "none"))
    ref_cache: Optional[str] = option(None, "precomputed reference log-probs (default: $TILTLM_CACHE/reference)")

    # the objective
    loss: str = option("sigmoid", "comma-separated loss names from tiltlm.losses, e.g. sigmoid,nll")
    loss_weights: Optional[str] = option(None, "comma-separated positive weights, one per loss (default: all 1)")
    beta: float = option(0.1, "strength of the KL regularisation (inverse temperature of the reward)", above=0)
    label_smoothing: float = option(0.0, "share of flipped labels (sigmoid, robust, exo)", at_least=0, below=0.5)
    ipo_average: bool = option(True, "ipo: per-token (not summed) log-ratios, as the IPO authors advise")
    simpo_gamma: float = option(1.0, "simpo: target reward margin (paper: beta 2.0, gamma/beta ~ 0.5)", at_least=0)
    orpo_lambda: float = option(0.1, "orpo: weight of the odds-ratio term", at_least=0)
    objective: str = option("auto", "what to train: auto (by the data's rows: pairs, ranked lists, unpaired) or "
                                    "reward-model (a Bradley-Terry reward model on pairs)",
                            choices=("auto", "reward-model"))
    pairs: str = option("ranked", "ranked lists: ranked (Plackett-Luce over each list) or all (every pair they imply)",
                        choices=("ranked", "all"))
    kto_desirable_weight: float = option(1.0, "unpaired rows (KTO): lambda_D, the weight of desirable rows", at_least=0)
    kto_undesirable_weight: float = option(1.0, "unpaired rows (KTO): lambda_U, the weight of undesirable rows",
                                           at_least=0)
    reward_margin: float = option(0.0, "reward model: Llama 2's margin m, subtracted from every pair's difference",
                                  at_least=0)
    reward_centering: float = option(0.0, "reward model: coefficient of (r_w + r_l)^2 (Eisenstein et al.), e.g. 0.01",
                                     at_least=0)

    # data shaping
    max_length: int = option(1024, "tokens of prompt plus completion kept per sequence", at_least=2)
    max_prompt_length: Optional[int] = option(None, "prompt tokens kept (default: max_length // 2)", at_least=1)
    layout: str = option("packed", "rows of a batch (data/collate.py)", choices=("packed", "shared", "concatenated"))
    pack_tokens: int = option(0, "tokens per packed row (0: max_length)", at_least=0)
    group_by_length: bool = option(True, "micro-batches of pairs of similar length: less padding")
    special_tokens_in_text: str = option("keep", "control-token strings inside the data's text (e.g. <|im_end|>): "
                                                 "keep (read as control tokens) or split (read as text)",
                                         choices=("keep", "split"))

    # optimisation
    lr: float = option(5e-7, "peak learning rate of AdamW", above=0)
    epochs: int = option(1, "passes over the training data", at_least=1)
    max_steps: int = option(-1, "optimizer steps (-1: as many as the epochs give)", at_least=1, special=-1)
    batch_size: int = option(8, "pairs per micro-batch per process", at_least=1)
    grad_accum: int = option(4, "micro-batches per optimizer step", at_least=1)
    warmup_ratio: float = option(0.1, "share of the steps over which the learning rate rises", at_least=0, at_most=1)
    scheduler: str = option("linear", "learning-rate decay after warmup", choices=("linear", "cosine", "constant"))
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay", at_least=0)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (inf: no clipping)", above=0, finite=False)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward: less memory, slower")
    release_memory: bool = option(False, "CPU: freed tensors go back to the system at once (lower RSS, slower)")
    seed: int = option(42, "seed of data order, LoRA initialisation and dropout", at_least=0)
    max_bad_steps: int = option(10, "steps with non-finite gradients skipped before the run stops", at_least=0)

    # LoRA (through peft)
    lora_r: int = option(0, "LoRA rank (0: train every weight)", at_least=0)
    lora_alpha: Optional[float] = option(None, "LoRA scale numerator (default: 2 * lora_r)", above=0)
    lora_dropout: float = option(0.0, "dropout on the LoRA input", at_least=0, below=1)
    lora_targets: str = option("all-linear", "modules that get adapters: all-linear or comma-separated names")
    merge_lora: bool = option(False, "also save final/merged, a plain transformers model")

    # numerics and hardware
    dtype: str = option("auto", "compute precision; auto: float32 on CPU, bf16 on GPUs with native bf16; bf16 trains "
                            "float32 master weights under bf16 autocast", choices=("auto", *DTYPES))
    bf16_weights: bool = option(False, "keep the weights themselves in bf16: half the memory, but updates "
                                       "below bf16's resolution are lost (a warning says how many)")
    deterministic: bool = option(False, "PyTorch's deterministic algorithms: GPU runs repeat bit for bit, slower")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    logprob_chunk: int = option(256, "completion positions projected to the vocabulary at a time", at_least=1)
    attention: str = option("auto", "attention kernel (see tiltlm/attention.py); auto: flex on GPU, blocks on CPU",
                            choices=("auto", "flex", "blocks", "sdpa", "eager"))
    trust_remote_code: bool = option(False, "run the model repository's own code (only for models you trust)")
    parallel: str = option("ddp", "under torchrun: ddp (replicated) or fsdp (sharded)", choices=("ddp", "fsdp"))
    cpu_offload: bool = option(False, "fsdp: the policy's weight shards, gradients and AdamW state live in host "
                                      "memory, layers are copied to the device to run (less device memory, slower)")

    # logging and saving
    log_every: int = option(1, "steps between metric rows", at_least=1)
    eval_every: int = option(100, "steps between evaluations on eval_data", at_least=1)
    save_every: int = option(200, "steps between checkpoints", at_least=1)
    keep_checkpoints: int = option(2, "newest checkpoints kept (0: keep every one)", at_least=0)
    tensorboard: bool = option(True, "also write TensorBoard event files")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        # Resolved here, not in validate, so that every way of making a config (YAML, flags, the Python
        # API) sees a number: the prompt gets half of max_length unless told otherwise.
        if self.max_prompt_length is None:
            self.max_prompt_length = self.max_length // 2


def build_config(yaml_path: str | None = None, flags: dict[str, Any] | None = None,
                 dotlist: list[str] | None = None) -> TrainConfig:
    """Merge defaults, a YAML file, ``--flag`` values and ``key=value`` overrides, in that order, and
    check every setting (nothing is written before this returns)."""
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
    """Each option within its declared range, then the rules that tie options together."""
    check_options(config)
    if config.max_prompt_length >= config.max_length:
        raise ConfigError(f"max_prompt_length ({config.max_prompt_length}) must be below max_length "
                          f"({config.max_length}) to leave room for the completion")
    if config.dtype in ("float16", "fp16"):
        raise ConfigError("dtype = float16: training in fp16 needs loss scaling, which tiltlm does not do; "
                          "use dtype = bf16 (GPUs with native bf16) or float32")
    if config.bf16_weights and config.dtype not in ("bf16", "bfloat16", "auto"):
        raise ConfigError(f"bf16_weights with dtype = {config.dtype}: expected dtype = bf16")
    if config.cpu_offload and config.parallel != "fsdp":
        raise ConfigError("cpu_offload needs parallel = fsdp (FSDP's CPUOffloadPolicy): expected parallel = fsdp")
    if config.ref_mode == "adapters-off" and config.lora_r == 0:
        raise ConfigError("ref_mode = adapters-off needs LoRA (lora_r > 0)")
    _, names, _ = loss_setup(config)
    if config.label_smoothing > 0 and not set(names) & set(SMOOTHED_LOSSES):
        raise ConfigError(f"label_smoothing = {config.label_smoothing}: no loss of {config.loss!r} uses it "
                          f"(only {', '.join(SMOOTHED_LOSSES)} do)")


def loss_setup(config: TrainConfig) -> tuple[LossParams, tuple[str, ...], tuple[float, ...]]:
    """The loss names, their weights and their hyper-parameters from ``config``."""
    names = tuple(n.strip() for n in config.loss.split(",") if n.strip())
    if not names or not set(names) <= LOSSES.keys():
        raise ConfigError(f"loss = {config.loss!r}: expected comma-separated names from {', '.join(LOSSES)}")
    try:
        weights = tuple(float(w) for w in config.loss_weights.split(",")) if config.loss_weights else (1.0,) * len(names)
    except ValueError:
        weights = ()
    if len(weights) != len(names) or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ConfigError(f"loss_weights = {config.loss_weights!r}: expected {len(names)} positive numbers, "
                          f"one per loss")
    params = LossParams(**{f.name: getattr(config, f.name) for f in fields(LossParams)})
    return params, names, weights
