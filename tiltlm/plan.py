"""Will a run fit? Peak memory per device and FLOPs per optimizer step, from the real model code run on
fake tensors.

Nothing here is a formula for memory or FLOPs. The model is built from its config on the meta device
and given fake tensors (``FakeTensorMode``: shapes and dtypes, no storage; a 32B model costs no
memory), a batch of the requested shape is made by tiltlm's own collate, and tiltlm's own training step runs on it
(:class:`~tiltlm.logprobs.CompletionLogps`, :func:`~tiltlm.evaluate.score_batch`, backward, gradient
clipping, fused AdamW). PyTorch's tools watch it:

* ``torch.distributed._tools.mem_tracker.MemTracker`` follows every tensor storage as it is created
  and freed, by kind (parameter, gradient, optimizer state, activation, temporary), and keeps the
  snapshot at the peak. It watches the second of two steps, so the peak includes AdamW's state as it
  is from then on (the first step is the FLOP counter's: the two modes nested keep checkpointed
  activations alive).
* ``torch.utils.flop_counter.FlopCounterMode`` adds up the FLOPs of every matmul and attention kernel
  that runs (the FLOPs of one micro-batch, times the accumulation steps). They exceed the "useful"
  count of ``benchmarks/flops.py`` (3 forwards) where the kernels do more: attention is counted over
  every (query, key) position of a row, masked or not, and its backward recomputes the scores (3.5
  forwards); the chunked vocabulary head recomputes its logits in the backward (4 forwards).
  tests/test_plan.py checks each term against flops.py.

Derived, not traced (each said in the output):

* Models deeper than 8 layers are traced at 4 and 8 layers (more if the two peak at different moments
  of the step) and every measured quantity is extended linearly to the full depth
  (:func:`measure_by_layers`; SmolLM2-135M, 30 layers, extended from 2 and 4: 6.13 GiB, traced in full:
  6.14 GiB, in 23 s instead of 578 s).
* Under FSDP with N devices, weights, gradients and optimizer state are split N ways (the sharding rule
  of ``fully_shard``), and each device also holds the decoder layers being gathered: two (the one
  computing and the one prefetched) at the compute dtype, plus one layer's unsharded gradients. The
  activations are the single-device trace's.
* ``runtime``: on CPU, the resident memory of a fresh process that has imported torch, transformers,
  peft and tiltlm, measured in a child process (a CUDA context is not measured: give it with
  ``runtime_bytes``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from tiltlm.models import ModelError

PRECISIONS = ("float32", "bf16-mixed", "bf16")
LAYOUTS = ("packed", "shared", "concatenated")
REF_MODES = ("precompute", "online", "adapters-off", "none")
GIB = 1024 ** 3


@dataclass(frozen=True)
class Setup:
    """One run's shape: what ``tiltlm train`` would be given, plus the hardware."""

    model: str  # a model directory, a config.json file, or an alias
    layout: str = "packed"
    batch_size: int = 8  # pairs per micro-batch per device
    seq_len: int = 1024  # tokens of a packed row; synthetic pairs fill one row each
    prompt_share: float = 0.5  # of seq_len; the rest is split evenly between chosen and rejected
    precision: str = "float32"  # float32 | bf16-mixed (float32 master weights) | bf16 (pure)
    lora_r: int = 0  # 0: full fine-tuning
    gradient_checkpointing: bool = False
    ref_mode: str = "precompute"  # how the reference is paid: see tiltlm.reference
    logprob_chunk: int = 256
    devices: int = 1
    parallel: str = "ddp"  # ddp | fsdp (devices > 1)
    device_memory: int = 80 * GIB  # bytes per device
    device: str = "gpu"  # gpu | cpu: on cpu the process's own runtime is counted (see runtime_bytes)
    runtime_bytes: int | None = None  # None: on cpu this process's measured baseline, on gpu 0
    grad_accum: int = 1  # micro-batches per optimizer step: more FLOPs per step, the same peak
    full_depth: bool = False  # trace every layer even of a deep model (slower; see measure_by_layers)
    pair_lengths: tuple[tuple[int, int, int], ...] = ()  # (prompt, chosen, rejected) of real pairs; () synthetic


@dataclass
class Breakdown:
    """Bytes per device at the peak, by what holds them. ``total`` is their sum."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0  # saved for backward and temporaries at the peak, the batch included
    logprob_chunk: int = 0  # the vocabulary head's own transient peak (part of activations when it is the peak)
    reference: int = 0  # an online reference's weights (its forward's transients are in activations)
    fsdp_gather: int = 0  # FSDP: unsharded layers in flight
    runtime: int = 0

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.reference
                + self.fsdp_gather + self.runtime)


@dataclass
class Plan:
    setup: Setup
    step: Breakdown  # one training step (the run's peak unless the precompute pass is larger)
    precompute_peak: int  # bytes: the reference pass before training (0 unless ref_mode is precompute)
    peak_bytes: int
    flops: float  # per optimizer step per device, as the kernels compute them
    flops_by_kind: dict[str, float]  # attention, matmul
    parameters: int
    trainable: int
    fits: bool
    notes: list[str] = field(default_factory=list)
    trace_seconds: float = 0.0

    def to_json(self) -> dict:
        out = {"peak_bytes": self.peak_bytes, "fits": self.fits, "flops": self.flops}
        out.update({k: v for k, v in asdict(self).items() if k not in out})
        out["step"]["total"] = self.step.total
        return out


RUNTIME_PROBE = """
import torch, peft, transformers, tiltlm.train
from transformers import AutoModelForCausalLM
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]) * 1024)
"""


@functools.lru_cache(maxsize=1)
def runtime_baseline() -> int:
    """Resident bytes of a fresh process that has imported what ``tiltlm train`` imports, before any model
    exists; 0 where there is no /proc (the count is then left out)."""
    if not Path("/proc/self/status").is_file():
        return 0
    done = subprocess.run([sys.executable, "-c", RUNTIME_PROBE], capture_output=True, text=True, timeout=300)
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


def load_config(name: str):
    """A transformers config from a model directory, an alias, or a bare config.json file; no weights
    are read."""
    from transformers import AutoConfig

    from tiltlm.models import resolve

    if name.endswith(".json") or os.path.isfile(name):
        try:
            values = json.loads(Path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ModelError(f"{name}: cannot read a JSON model config: {error}") from error
        if not isinstance(values, dict) or "model_type" not in values:
            raise ModelError(f"{name}: field 'model_type' is missing (expected a transformers config.json)")
        try:
            return AutoConfig.for_model(values.pop("model_type"), **values)
        except (KeyError, ValueError) as error:
            raise ModelError(f"{name}: field 'model_type': {error}") from error
    path, extra = resolve(name)
    try:
        return AutoConfig.from_pretrained(path, **extra)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read a model config from {name!r}: {error}") from error


def compute_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "float32" else torch.bfloat16


def weights_dtype(setup: Setup) -> torch.dtype:
    """The dtype the traced model is built in. bf16-mixed keeps float32 weights and computes under
    autocast, except under FSDP, where the traced model is the gathered bf16 copy the layers compute with
    (``MixedPrecisionPolicy(param_dtype=bf16)``) and the float32 shards are derived."""
    if setup.precision == "bf16" or (setup.precision == "bf16-mixed" and setup.parallel == "fsdp"):
        return torch.bfloat16
    return torch.float32


def build_policy(config, setup: Setup, dtype: torch.dtype, lora: bool = True):
    """The policy as ``tiltlm.train`` makes it (dropout off, gradient checkpointing, LoRA), from ``config``
    alone, with fake tensors (:func:`as_fake`). Call under FakeTensorMode."""
    from transformers import AutoModelForCausalLM

    from tiltlm.models import add_lora, disable_dropout

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        disable_dropout(model)
        if setup.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora and setup.lora_r > 0:
            model = add_lora(model, setup.lora_r, None, 0.0, "all-linear")
    return as_fake(model).train()


def as_fake(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every meta parameter and buffer of ``model`` by a fake CPU tensor of the same shape and
    dtype, keeping tied weights tied. (Building under FakeTensorMode directly trips peft, whose
    ``.to()`` of new adapters must swap fake tensors.) Values are never read."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    if id(tensor) not in made:
                        fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                        made[id(tensor)] = (torch.nn.Parameter(fake, tensor.requires_grad)
                                            if table is module._parameters else fake)
                    table[name] = made[id(tensor)]
    return model


def synthetic_pairs(setup: Setup, count: int) -> list:
    """``count`` pairs of exactly ``seq_len`` tokens: prompt ``prompt_share`` of it, the rest split
    between chosen and rejected (or of ``pair_lengths``). Token values do not matter to memory or FLOPs."""
    from tiltlm.data.types import TokenizedPair

    prompt = max(1, round(setup.seq_len * setup.prompt_share))
    chosen = max(1, (setup.seq_len - prompt) // 2)
    lengths = setup.pair_lengths or ((prompt, chosen, max(1, setup.seq_len - prompt - chosen)),)
    # the given pairs, repeated as needed (the precompute pass takes 4x)
    return [TokenizedPair([1] * p, [2] * c, [3] * r) for p, c, r in (lengths[i % len(lengths)] for i in range(count))]


def make_batch(setup: Setup, count: int):
    """A Batch made by tiltlm's collate for the setup's layout (packed rows hold ``seq_len`` tokens),
    carrying its pairs' indices as the trainer's batches do (a precomputed reference reads rows by them)."""
    from tiltlm.objectives import make_collate

    batch = make_collate(setup.layout, 0, setup.seq_len)(synthetic_pairs(setup, count))
    return replace(batch, indices=tuple(range(count)))


def batch_tensors(batch) -> list[torch.Tensor]:
    return [value for value in vars(batch).values() if isinstance(value, torch.Tensor)]


def missing_flop_formulas() -> dict:
    """torch's own FLOP formulas (``torch.utils.flop_counter``) for kernels FlopCounterMode does not
    list: the CPU flash-attention kernels (sdpa's count), and the in-place ``addmm_`` with which the
    chunked head accumulates its weight gradient (addmm's count)."""
    from torch.utils.flop_counter import addmm_flop, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda query, key, value, *args, **kwargs: sdpa_flop_count(query, key, value),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, query, key, value, *args, **kwargs: sdpa_backward_flop_count(grad, query, key, value),
        # addmm's formula itself, not its shape wrapper
        aten.addmm_: lambda bias, a, b, *args, **kwargs: addmm_flop.__wrapped__(bias, a, b)}


@dataclass
class Trace:
    """What one traced setup measured: MemTracker's peak snapshot by kind (bytes), and more."""

    peak: dict[str, int]
    reference_weights: int  # bytes of an online reference's parameters (inside peak["Parameter"])
    head_peak: int  # bytes: the chunked vocabulary head's transient peak, traced alone
    flops_by_kind: dict[str, float]  # one micro-batch
    parameters: int
    trainable: int
    layer_parameters: int  # elements of the largest decoder layer (FSDP gathers one at a time)
    traced_bytes_per_weight: int  # element size the weights were traced in
    precompute: int = 0  # peak bytes of the reference pass before training (0 without one)


def reference_for(setup: Setup, config, policy, dtype: torch.dtype):
    """(reference strategy, its separate model or None), as the trainer would build them."""
    from tiltlm.reference import AdaptersOffReference, OnlineReference, Reference
    from tiltlm.refcache import lookup_reference

    precision = step_precision(setup)
    if setup.ref_mode == "online":
        model = build_policy(config, replace(setup, lora_r=0, gradient_checkpointing=False),
                             compute_dtype(setup.precision))
        reference = OnlineReference(lambda: model, precision, setup.logprob_chunk)
        reference.prepare(model, {}, None)
        return reference, model
    if setup.ref_mode == "adapters-off":
        reference = AdaptersOffReference(precision, setup.logprob_chunk)
        reference.attach(policy)
        return reference, None
    if setup.ref_mode == "precompute":  # the step reads its pairs' rows of the table
        table = lookup_reference(torch.zeros(setup.batch_size, 4))
        return (lambda batch, dataset: table(batch)), None
    return Reference(), None


def step_precision(setup: Setup):
    """The trainer's Precision for ``setup`` on the CPU the trace runs on: bf16-mixed autocasts (outside
    FSDP, whose traced model is already the bf16 copy the layers compute with)."""
    from tiltlm.runtime import Precision

    mixed = setup.precision == "bf16-mixed" and setup.parallel != "fsdp"
    return Precision(torch.device("cpu"), torch.bfloat16 if mixed else torch.float32)


def train_step(scorer, reference, batch, optimizer, trainable: list, setup: Setup) -> None:
    """One micro-batch and optimizer step, as ``tiltlm.train`` runs it."""
    from tiltlm import step
    from tiltlm.losses import LossParams
    from tiltlm.objectives import PairObjective

    objective = PairObjective(None, LossParams(), ("simpo",) if setup.ref_mode == "none" else ("sigmoid",))
    scored = step.score(scorer, reference, objective, batch, "train", step_precision(setup))
    (scored.losses.sum() / batch.num_pairs).backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def flops_by_kind(counter) -> dict[str, float]:
    """FlopCounterMode's totals split into attention kernels and everything else (matmuls)."""
    kinds = {"attention": 0.0, "matmul": 0.0}
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        kinds["attention" if "attention" in str(op) else "matmul"] += count
    return kinds


NO_HOOK = SimpleNamespace(remove=lambda: None)  # a hook handle with nothing to remove


def new_tracker(*modules: torch.nn.Module):
    """A MemTracker that also follows frozen parameters (LoRA's base, a reference): torch 2.13's tracker
    registers a gradient hook on every parameter of a module it meets, which raises for a parameter that
    needs no gradient; marking those as already hooked skips only that registration."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    for module in modules:
        for parameter in module.parameters():
            if not parameter.requires_grad:
                tracker._param_to_grad_hook_handles[parameter] = (NO_HOOK, NO_HOOK)
    return tracker


def snapshot(tracker, kind: str = "peak") -> dict:
    """Bytes by kind of memory (and their ``Total``) on the one device traced: ``peak`` or ``current``."""
    return next(iter(tracker.get_tracker_snapshot(kind).values()))


def trace_step(config, setup: Setup) -> Trace:
    """Two training steps of ``setup`` on fake tensors: FLOPs of the first, memory of the second (with
    AdamW's state as it is from then on)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from tiltlm.distributed import decoder_layers
    from tiltlm.logprobs import CompletionLogps

    with FakeTensorMode():
        dtype = weights_dtype(setup)
        policy = build_policy(config, setup, dtype)
        reference, ref_model = reference_for(setup, config, policy, dtype)
        ref_models = [ref_model] if ref_model else []
        batch = make_batch(setup, setup.batch_size)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-6, fused=True)
        scorer = CompletionLogps(policy, setup.logprob_chunk)
        # FLOPs of a first step (which also creates AdamW's state); memory of a second one, on its own:
        # FlopCounterMode inside MemTracker keeps checkpointed activations alive
        with FlopCounterMode(display=False, custom_mapping=missing_flop_formulas()) as counter:
            train_step(scorer, reference, batch, optimizer, trainable, setup)
        gc.collect()  # reference cycles of the first step: a real run's cycle collector frees them too
        tracker = new_tracker(scorer, *ref_models)
        tracker.track_external(scorer, optimizer, *batch_tensors(batch), *ref_models)
        with tracker:
            # hook the gradients now: an adapters-off reference runs before the policy, with peft's adapters
            # (and their requires_grad) switched off, where the tracker's forward hook cannot hook them
            tracker._track_module_params_and_buffers(scorer)
            train_step(scorer, reference, batch, optimizer, trainable, setup)
        return Trace(
            peak={getattr(kind, "value", kind): int(value) for kind, value in snapshot(tracker).items()},
            reference_weights=sum(p.untyped_storage().nbytes() for m in ref_models for p in m.parameters()),
            head_peak=trace_head(policy, len(batch.target_ids), setup),
            flops_by_kind=flops_by_kind(counter),
            parameters=sum(p.numel() for p in policy.parameters()),
            trainable=sum(p.numel() for p in trainable),
            layer_parameters=max((sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(policy)),
                                 default=0),
            traced_bytes_per_weight=dtype.itemsize,
        )


def trace_head(policy, positions: int, setup: Setup) -> int:
    """Peak bytes of the chunked vocabulary head by itself (forward and backward over ``positions``
    completion positions), beyond its inputs: the log-prob chunk. Call under FakeTensorMode."""
    from tiltlm.logprobs import backbone_and_head, chunked_token_logps

    _, head = backbone_and_head(policy)
    dtype = compute_dtype(setup.precision)
    hidden = torch.zeros(positions, head.weight.shape[1], dtype=dtype, requires_grad=True)
    targets = torch.zeros(positions, dtype=torch.long)
    weight = head.weight.detach().to(dtype)  # no gradient: the weight's gradient is counted as a gradient
    tracker = new_tracker()
    tracker.track_external(hidden, targets, weight)
    with tracker:
        start = snapshot(tracker, "current")
        head_view = SimpleNamespace(weight=weight, bias=None)  # what chunked_token_logps reads of a head
        logps = chunked_token_logps(hidden, head_view, targets, setup.logprob_chunk)
        logps.sum().backward()  # logps alive to the end, as the step keeps them
    return int(snapshot(tracker)["Total"] - start["Total"])


def trace_precompute(config, setup: Setup) -> int:
    """Peak bytes of the reference pass before training: the starting weights (no LoRA yet) scoring
    ``4 x batch_size`` pairs at a time without grad, as the precomputed reference strategy runs it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tiltlm.logprobs import CompletionLogps

    with FakeTensorMode():
        model = build_policy(config, setup, weights_dtype(setup), lora=False)
        batch = make_batch(setup, 4 * setup.batch_size)
        tracker = new_tracker(model)
        tracker.track_external(model, *batch_tensors(batch))
        mixed = setup.precision == "bf16-mixed"
        with tracker, torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext():
                CompletionLogps(model.eval(), setup.logprob_chunk)(batch)
        return int(snapshot(tracker)["Total"])


def breakdown(trace: Trace, setup: Setup, runtime: int) -> tuple[Breakdown, list[str]]:
    """The traced peak by kind, per device; under FSDP the state split N ways (see the module docstring)."""
    peak, notes = trace.peak, []
    weights = peak.get("Parameter", 0) + peak.get("Buffer", 0) - trace.reference_weights
    state = Breakdown(weights=weights, gradients=peak.get("Gradient", 0), optimizer=peak.get("Optstate", 0),
                      activations=peak.get("Activation", 0) + peak.get("Temp", 0) + peak.get("Other", 0),
                      logprob_chunk=trace.head_peak, reference=trace.reference_weights, runtime=runtime)
    if setup.parallel == "fsdp" and setup.devices > 1:
        n, master = setup.devices, 4 // trace.traced_bytes_per_weight  # bf16-mixed: float32 shards
        state.weights, state.gradients = state.weights * master // n, state.gradients * master // n
        state.optimizer, state.reference = state.optimizer * master // n, state.reference // n
        compute = compute_dtype(setup.precision).itemsize
        state.fsdp_gather = trace.layer_parameters * (2 * compute + 4)
        notes.append(f"FSDP x{n}: weights, gradients, optimizer state and reference from the 1-device trace "
                     f"divided by {n}" + (" (float32 shards of the bf16 trace: x2)" if master > 1 else "")
                     + f"; gather = 2 decoder layers at {compute} B/param + 1 layer's float32 gradients")
    return state, notes


def check(setup: Setup) -> None:
    """One-line errors for settings no run could have."""
    from tiltlm.config import ConfigError

    choices = {"layout": LAYOUTS, "precision": PRECISIONS, "ref_mode": REF_MODES, "parallel": ("ddp", "fsdp"),
               "device": ("gpu", "cpu")}
    for name, allowed in choices.items():
        if getattr(setup, name) not in allowed:
            raise ConfigError(f"{name} {getattr(setup, name)!r}: expected one of {', '.join(allowed)}")
    for name in ("batch_size", "seq_len", "devices", "logprob_chunk", "device_memory", "grad_accum"):
        if getattr(setup, name) < 1:
            raise ConfigError(f"{name} {getattr(setup, name)}: expected a positive number")
    if setup.seq_len < 3:
        raise ConfigError(f"seq_len {setup.seq_len}: a pair needs at least 3 tokens")
    if setup.ref_mode == "adapters-off" and setup.lora_r == 0:
        raise ConfigError("ref_mode adapters-off needs LoRA (lora_r > 0)")


def measure(config, setup: Setup, layers: int | None = None) -> Trace:
    """The step's trace with the precompute pass's peak, of ``config`` or of its first ``layers`` layers."""
    if layers is not None:
        config = copy.deepcopy(config)
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen2, Gemma)
            config.layer_types = config.layer_types[:layers]
    precompute = trace_precompute(config, setup) if setup.ref_mode == "precompute" else 0
    return replace(trace_step(config, setup), precompute=precompute)


def same_moment(small: Trace, large: Trace) -> bool:
    """Whether two traces peak at the same moment of the step: the gradients then present are the same
    fraction of the weights (the peak can move, e.g. from the backward to the optimizer step, as layers
    are added; a line through two different moments means nothing)."""
    def share(trace: Trace) -> float:
        return trace.peak.get("Gradient", 0) / max(1, trace.peak.get("Parameter", 0))

    return abs(share(small) - share(large)) < 0.05 and all(v >= 0 for v in small.peak.values())


def measure_by_layers(config, setup: Setup) -> tuple[Trace, str | None]:
    """:func:`measure`, for deep models from two shallow traces: every measured quantity (bytes by kind,
    FLOPs, parameter counts) is traced at ``a`` and ``b`` layers and extended linearly to the model's
    depth: exact when both traces peak at the same moment of the step and the layers repeat (the
    decoder's layers are identical; one is gathered or recomputed at a time; what does not grow with
    depth stays as it is). Depths double until the two traces peak at the same moment; the full depth
    is traced when they never do."""
    layers, (a, b) = config.num_hidden_layers, (4, 8)

    def line(x, y):  # through (a, x) and (b, y), at the model's depth
        if isinstance(x, dict):
            return {k: line(v, y.get(k, 0)) for k, v in x.items()}
        return round(x + (y - x) * (layers - a) / (b - a))

    while not setup.full_depth and b < layers:
        small, large = measure(config, setup, a), measure(config, setup, b)
        if same_moment(small, large):
            trace = Trace(**{name: line(value, getattr(large, name)) for name, value in vars(small).items()})
            if all(v >= 0 for v in trace.peak.values()):
                return trace, f"traced with {a} and {b} of {layers} layers, extended linearly by layer count"
        a, b = b, 2 * b
    return measure(config, setup), None


def plan(setup: Setup, config=None) -> Plan:
    """Trace ``setup`` on fake tensors and say whether its peak fits ``device_memory``."""
    check(setup)
    config = config if config is not None else load_config(setup.model)
    started = time.perf_counter()
    runtime = setup.runtime_bytes if setup.runtime_bytes is not None else (
        runtime_baseline() if setup.device == "cpu" else 0)
    trace, how = measure_by_layers(config, setup)
    step, notes = breakdown(trace, setup, runtime)
    notes += [how] if how else []
    precompute = trace.precompute + runtime if trace.precompute else 0
    if setup.device == "cpu":
        notes.append("CPU: these are live bytes; glibc may keep freed memory resident and RSS then grows above "
                     "them from step to step (tiltlm train --release-memory returns it)")
    if setup.device == "gpu" and setup.runtime_bytes is None:
        notes.append("runtime: the CUDA context is not counted (give it with --runtime-mb)")
    peak = max(step.total, precompute)
    flops = {kind: value * setup.grad_accum for kind, value in trace.flops_by_kind.items()}
    return Plan(setup=setup, step=step, precompute_peak=precompute, peak_bytes=peak, flops=sum(flops.values()),
                flops_by_kind=flops, parameters=trace.parameters, trainable=trace.trainable,
                fits=peak <= setup.device_memory, notes=notes, trace_seconds=time.perf_counter() - started)


def alternatives(setup: Setup) -> list[tuple[str, Setup]]:
    """Changes that lower the peak per device, one at a time, then stacked (each traced like the setup)."""
    single: list[tuple[str, dict]] = []
    if not setup.gradient_checkpointing:
        single.append(("gradient checkpointing", {"gradient_checkpointing": True}))
    if setup.lora_r == 0:
        single.append(("LoRA r=16", {"lora_r": 16, "ref_mode": "precompute" if setup.ref_mode == "precompute"
                                     else "adapters-off"}))
    if setup.parallel != "fsdp" or setup.devices < 8:
        devices = max(8, setup.devices)
        single.append((f"FSDP on {devices} devices", {"devices": devices, "parallel": "fsdp"}))
    if setup.batch_size > 1:
        single.append((f"batch {setup.batch_size // 2}, grad accum x2",
                       {"batch_size": setup.batch_size // 2, "grad_accum": setup.grad_accum * 2}))
    if setup.seq_len >= 512:
        single.append((f"rows of {setup.seq_len // 2} tokens", {"seq_len": setup.seq_len // 2}))
    options = [(label, replace(setup, **change)) for label, change in single]
    if not setup.gradient_checkpointing:  # each other change on top of gradient checkpointing
        first_label, first = single[0]
        options += [(f"{first_label} + {label}", replace(setup, **first, **change)) for label, change in single[1:]]
    return options


def offloaded(result: Plan) -> int:
    """Peak per device with weights, gradients and optimizer state kept in host memory (FSDP's
    ``CPUOffloadPolicy``: ``--cpu-offload``): derived from the trace, the state lines removed."""
    step = result.step
    return max(step.total - step.weights - step.gradients - step.optimizer, result.precompute_peak)


def gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def format_plan(result: Plan) -> str:
    """The breakdown as a readable table, with the verdict."""
    s, step = result.setup, result.step
    mode = "full" if s.lora_r == 0 else f"LoRA r={s.lora_r}"
    lines = [f"{s.model}: {result.parameters / 1e6:,.1f}M parameters, {result.trainable / 1e6:,.2f}M trainable ({mode})",
             f"{s.layout}, {s.batch_size} pairs x {s.seq_len} tokens, {s.precision}, "
             f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, reference {s.ref_mode}, "
             f"{s.devices} x {gib(s.device_memory)} ({s.parallel if s.devices > 1 else 'one device'})", ""]
    rows = [("weights", step.weights), ("gradients", step.gradients), ("optimizer state", step.optimizer),
            ("activations (saved + temporaries, batch)", step.activations),
            ("  of which at most: log-prob chunk", step.logprob_chunk), ("reference weights", step.reference),
            ("FSDP gathered layers", step.fsdp_gather), ("runtime", step.runtime), ("step peak", step.total)]
    if s.ref_mode == "precompute":
        rows.append(("precompute pass peak (before training)", result.precompute_peak))
    width = max(len(label) for label, _ in rows)
    lines += [f"{label:<{width}}  {gib(value):>12}" for label, value in rows]
    lines += ["-" * (width + 14), f"{'peak per device':<{width}}  {gib(result.peak_bytes):>12}",
              f"FLOPs per optimizer step per device: {result.flops:.3e} (attention {result.flops_by_kind['attention']:.2e},"
              f" matmuls {result.flops_by_kind['matmul']:.2e})", ""]
    lines += [f"note: {note}" for note in result.notes]
    verdict = "fits" if result.fits else "does NOT fit"
    lines.append(f"{verdict}: {gib(result.peak_bytes)} of {gib(s.device_memory)} per device "
                 f"(traced in {result.trace_seconds:.1f} s)")
    return "\n".join(lines)


def longest_pairs(model: str, data: str, max_length: int, max_prompt_length: int,
                  count: int) -> tuple[tuple[int, int, int], ...]:
    """(prompt, chosen, rejected) token counts of the ``count`` longest pairs of ``data``, tokenized and
    truncated as ``tiltlm train`` does: with length-grouped steps they share the run's largest step."""
    from tiltlm.data import load_pairs, tokenize_pairs
    from tiltlm.models import load_tokenizer

    pairs, _ = tokenize_pairs(load_pairs(data), load_tokenizer(model), max_length, max_prompt_length)
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    return tuple(sorted(lengths, key=sum, reverse=True)[:count])
