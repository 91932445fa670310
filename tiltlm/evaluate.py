"""Evaluate a trained policy against its reference on a preference file: ``tiltlm eval``'s library half.

The numbers come from :func:`tiltlm.step.evaluate`, the kernel the trainer's eval rows use, so for the same
model pair they equal what a trainer logs at step 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from tiltlm import step
from tiltlm.config import ConfigError, TrainConfig, validate
from tiltlm.models import check_same_tokenizer, frozen, is_adapter, load_tokenizer
from tiltlm.objectives import data_kind, make_objective
from tiltlm.reference import AdaptersOffReference, OnlineReference, PrecomputedReference, Reference
from tiltlm.runtime import pick_device, training_precision


def default_reference(model: str) -> str:
    """The reference a trained model (not an adapter: that is scored against its own base) is measured
    against when none is named: the starting model recorded in the run's config.yaml beside ``final/``."""
    saved = Path(model).parent / "config.yaml"
    if saved.is_file():
        return str(OmegaConf.load(saved).model)
    raise ConfigError(f"eval: {model} is neither an adapter nor inside a tiltlm run directory; name the "
                      f"reference with --ref")


def evaluate(model: str, data: str, ref: str | None = None, progress: bool = True, **options) -> dict[str, float]:
    """Loss and reward metrics of ``model`` against ``ref`` over the preference file ``data``: the
    numbers the trainer logs at step 0 when ``model`` is the policy and ``ref`` its reference.
    ``options``: any TrainConfig field (beta, loss, max_length, batch_size, dtype, ...), with its defaults.

    The reference's log-probs come from the precomputed-reference cache (``ref_cache``, see refcache.py)
    when a training run or an earlier evaluation already scored this file with the same reference,
    tokenizer and settings; otherwise they are computed once and saved there."""
    config = TrainConfig(model=model, data=data, ref=ref, **options)
    validate(config)  # every range checked, nothing loaded yet
    precision = training_precision(config.dtype, False, pick_device(config.device))
    log = (lambda message: print(message, file=sys.stderr)) if progress else (lambda message: None)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    if config.ref:
        check_same_tokenizer(tokenizer, load_tokenizer(config.ref, config.trust_remote_code), (config.model, config.ref))
    pairs = step.read_examples(config.data, tokenizer, config, log)
    objective = make_objective(config, tokenizer, data_kind(pairs))

    def load(name: str):
        return frozen(objective.load(name, precision.weights, config.trust_remote_code, config.attention,
                                     precision.device))

    policy = load(config.model).to(precision.device)
    reference = Reference()
    own = config.ref is None and is_adapter(config.model)  # scored with its adapters switched off
    reference_model = None if own else lambda: load(config.ref or default_reference(config.model))
    if objective.needs_reference and objective.precomputable:
        reference = PrecomputedReference(tokenizer, precision, config.logprob_chunk, 4 * config.batch_size,
                                         config.ref_cache, load=reference_model, log=log)
    elif objective.needs_reference:  # a table cannot hold what this objective scores: run the reference
        reference = (AdaptersOffReference(precision, config.logprob_chunk) if own
                     else OnlineReference(reference_model, precision, config.logprob_chunk))
    reference.prepare(policy, {"eval": pairs}, objective.collate)
    reference.attach(policy)
    metrics = step.evaluate(objective.scorer(policy), reference, objective, pairs, "eval", config.batch_size,
                            precision, prefix="", progress=progress)
    return {"pairs": len(pairs), **metrics}
