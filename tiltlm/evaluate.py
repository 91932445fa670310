"""One batch through policy, reference and loss; and the same over a whole preference set, without grad.

``tiltlm eval`` and the trainer's eval rows use :func:`evaluate`, so for the same model pair the numbers
equal what a trainer logs at step 0.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
import torch.distributed as dist
from tqdm.auto import tqdm

from tiltlm.data.collate import Batch, collate_concatenated, collate_shared
from tiltlm.data.types import TokenizedPair
from tiltlm.losses import LossOutput, LossParams, PairLogps, preference_loss
from tiltlm.metrics import MetricSums
from tiltlm.config import ConfigError, TrainConfig, loss_setup, validate
from tiltlm.data import load_pairs, tokenize_pairs
from tiltlm.logprobs import CompletionLogps
from tiltlm.losses import REFERENCE_FREE
from tiltlm.models import is_adapter, load_model, load_tokenizer, parse_dtype
from tiltlm.reference import Reference, frozen, no_reference, precomputed_reference
from tiltlm.runtime import pick_device

Collate = Callable[[list[TokenizedPair]], Batch]


def make_collate(layout: str, pad_id: int, pack_tokens: int = 0) -> Collate:
    if layout == "concatenated":
        return partial(collate_concatenated, pad_id=pad_id)
    if layout == "shared":
        return partial(collate_shared, pad_id=pad_id)
    return partial(collate_shared, pad_id=pad_id, row_tokens=pack_tokens)


def split_pairs(logps: torch.Tensor, counts: torch.Tensor, num_pairs: int) -> PairLogps:
    """Per-sequence values (chosen of every pair, then rejected) -> PairLogps."""
    return PairLogps(logps[:num_pairs], logps[num_pairs:], counts[:num_pairs], counts[num_pairs:])


def score_batch(policy, reference: Reference, batch: Batch, params: LossParams, losses: tuple[str, ...],
                weights: tuple[float, ...]) -> tuple[LossOutput, PairLogps, PairLogps | None]:
    """Policy log-probs (with grad when enabled), reference log-probs (never grad), per-pair losses."""
    policy_logps = split_pairs(*policy(batch), batch.num_pairs)
    ref = reference(batch)
    reference_logps = split_pairs(*ref, batch.num_pairs) if ref is not None else None
    return preference_loss(policy_logps, reference_logps, params, losses, weights), policy_logps, reference_logps


@torch.no_grad()
def evaluate_pairs(policy, reference: Reference, pairs: list[TokenizedPair], collate: Collate, params: LossParams,
             losses: tuple[str, ...], weights: tuple[float, ...], batch_size: int, device: torch.device,
             prefix: str = "eval/", progress: bool = True) -> dict[str, float]:
    """Mean loss and metrics over ``pairs``; under torchrun each rank takes every world_size-th pair and
    the sums are combined, so all ranks return the same numbers."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine, positions = pairs[rank::world], range(len(pairs))[rank::world]
    sums = MetricSums()
    was_training = getattr(policy, "training", False)
    if hasattr(policy, "eval"):
        policy.eval()
    starts = range(0, len(mine), batch_size)
    for start in tqdm(starts, desc="eval", disable=not progress or rank != 0, leave=False):
        batch = replace(collate(mine[start:start + batch_size]), indices=tuple(positions[start:start + batch_size]))
        batch = batch.to(device)
        out, policy_logps, reference_logps = score_batch(policy, reference, batch, params, losses, weights)
        sums.add(out, policy_logps, reference_logps)
    if hasattr(policy, "train"):
        policy.train(was_training)
    return sums.mean(prefix)


def default_reference(model: str) -> str | None:
    """The reference a trained model is measured against when none is named: an adapter's base, or
    the starting model recorded in the run's config.yaml beside ``final/``."""
    if is_adapter(model):
        return None  # the adapter's own base, with adapters disabled
    saved = Path(model).parent / "config.yaml"
    if saved.is_file():
        return str(OmegaConf.load(saved).model)
    raise ConfigError(f"eval: {model} is neither an adapter nor inside a tiltlm run directory; name the "
                      f"reference with --ref")


def evaluate(model: str, data: str, ref: str | None = None, beta: float = 0.1, loss: str = "sigmoid",
             max_length: int = 1024, max_prompt_length: int = 512, batch_size: int = 8, dtype: str = "auto",
             device: str = "auto", trust_remote_code: bool = False, progress: bool = True,
             ref_cache: str | None = None) -> dict[str, float]:
    """Loss and reward metrics of ``model`` against ``ref`` over the preference file ``data``: the
    numbers the trainer logs at step 0 when ``model`` is the policy and ``ref`` its reference.

    The reference's log-probs come from the precomputed-reference cache (``ref_cache``, see
    refcache.py) when a training run or an earlier evaluation already scored this file with the same
    reference, tokenizer and settings; otherwise they are computed once and saved there."""
    config = TrainConfig(model=model, data=data, ref=ref, beta=beta, loss=loss, max_length=max_length,
                         max_prompt_length=max_prompt_length, dtype=dtype, device=device)
    validate(config)
    params, names, weights = loss_setup(config)
    target = pick_device(device)
    torch_dtype = parse_dtype(dtype, target)
    tokenizer = load_tokenizer(model, trust_remote_code)
    pairs, summary = tokenize_pairs(load_pairs(data), tokenizer, max_length, max_prompt_length)
    if progress:
        print(f"data {data}:\n{summary.format()}", file=sys.stderr)
    policy = frozen(load_model(model, torch_dtype, trust_remote_code)).to(target)
    collate = make_collate("packed", tokenizer.pad_token_id, max_length)
    reference = no_reference
    if not set(names) <= REFERENCE_FREE:
        if ref is None and is_adapter(model):
            ref_model = policy  # scored with its adapters switched off
        else:
            ref_name = ref if ref is not None else default_reference(model)
            ref_model = frozen(load_model(ref_name, torch_dtype, trust_remote_code)).to(target)
        log = (lambda message: print(message, file=sys.stderr)) if progress else (lambda message: None)
        reference = precomputed_reference(ref_model, tokenizer, pairs, collate, 4 * batch_size, target, 256,
                                          ref_cache, {"dtype": str(torch_dtype)}, data, log)
        del ref_model
    metrics = evaluate_pairs(CompletionLogps(policy), reference, pairs, collate, params, names, weights,
                             batch_size, target, prefix="", progress=progress)
    return {"pairs": len(pairs), **metrics}
