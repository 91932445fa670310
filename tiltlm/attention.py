"""Attention from segment metadata: packed and prefix-shared rows without an L x L mask.

Every kernel here computes scaled dot-product attention, ``softmax(Q K^T * scale + M) V`` (Vaswani et
al. 2017, "Attention Is All You Need", eq. 1), with M = 0 where a query may see a key and -inf elsewhere;
they differ only in how much of M they materialise and which masked scores they skip.

A shared-layout :class:`~tiltlm.data.collate.Batch` says, per token, which example it belongs to
(``segment_ids``, -1 padding), which part of it (``part_ids``: 0 prompt, k >= 1 completion k), and its
``position_ids``. Query t may attend key s when both are in the same example, s is not after t, and s is
a prompt token or in t's own completion (plus, for sliding-window layers, ``pos[t] - pos[s] < window``).
Two attention functions read that rule directly; both are registered with transformers'
``AttentionInterface`` and receive the metadata as the ``tiltlm_segments`` keyword that models
declaring ``_supports_attention_backend`` pass down to attention:

``tiltlm_flex``    (GPU) FlexAttention with a block mask built once per batch from the rule: fully masked
                   128 x 128 tiles are skipped, grouped-query attention is native (``enable_gqa``), and a
                   ``score_mod`` applies logit softcapping (Gemma-2). Rows are padded to a multiple of
                   128 tokens so that shapes, and so compiled kernels, repeat from step to step.
``tiltlm_blocks``  (CPU) only the blocks that are needed: per example, the prompt against itself
                   (causal), and each completion against its prompt's keys and its own (causal). The
                   blocks of each kind are gathered into one padded SDPA call (one for all prompts, one
                   for all completions): nothing across examples or between completions is computed.
                   Exact: the same softmax over the same keys as the dense mask, in float32 rounding.
                   Where rows are short, SDPA over whole rows is faster (:func:`blocks_pay_off`); such
                   batches get the dense float mask instead (``logprobs.backbone_states``).

Families whose attention cannot take the metadata (no ``_supports_attention_backend``, attention sinks,
softcapping on CPU) fall back to SDPA or eager with a dense mask built on the device from the same rule
(:func:`dense_attention_mask`); :func:`tiltlm.models.choose_attention` decides from what the model class declares.

Without ``tiltlm_segments`` (generation, a caller's own masks) both functions behave as ``sdpa``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from tiltlm.data.collate import Batch, segment_mask

log = logging.getLogger(__name__)

FLEX, BLOCKS = "tiltlm_flex", "tiltlm_blocks"
KERNELS = ("auto", "flex", "blocks", "sdpa", "eager")
IMPLEMENTATION = {"flex": FLEX, "blocks": BLOCKS, "sdpa": "sdpa", "eager": "eager"}
FLEX_MULTIPLE = 128  # FlexAttention's tile size: rows padded to a multiple of it


@dataclass
class Segments:
    """Per-token metadata of a batch's rows ([rows, L] each) and what is derived from it once per batch
    and shared by every layer (block masks, block plans), keyed by sliding window and dtype."""

    segment_ids: Tensor
    part_ids: Tensor
    position_ids: Tensor
    derived: dict = field(default_factory=dict)

    def cached(self, key, build: Callable):
        if key not in self.derived:
            self.derived[key] = build()
        return self.derived[key]


# True while a model runs with segment metadata: its mask builder then builds no mask at all.
_SEGMENT_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("tiltlm_segment_forward", default=False)


@contextlib.contextmanager
def segment_forward() -> Iterator[None]:
    token = _SEGMENT_FORWARD.set(True)
    try:
        yield
    finally:
        _SEGMENT_FORWARD.reset(token)


def segments_of(batch: Batch, multiple: int = 1) -> tuple[Tensor, Tensor, Segments]:
    """(input_ids, position_ids, Segments) for a batch, right-padded to a multiple of ``multiple``
    columns. A concatenated batch (no segment ids) is one prompt-only segment per row."""
    if batch.segment_ids is None:
        segment = torch.where(batch.attention_mask > 0, 0, -1)
        part = torch.zeros_like(segment)
    else:
        segment, part = batch.segment_ids, batch.part_ids
    pad = -batch.input_ids.shape[1] % multiple
    tensors = [batch.input_ids, batch.position_ids, segment, part]
    if pad:
        tensors = [F.pad(t, (0, pad), value=-1 if t is segment else 0) for t in tensors]
    ids, positions, segment, part = tensors
    return ids, positions, Segments(segment, part, positions)


def _segment_kernel(kernel: str, attend: Callable) -> Callable:
    """A transformers attention function: ``attend(segments, query, key, value, scaling, dropout,
    sliding_window, softcap)`` under segment metadata (query/key/value [rows, heads, L, head_dim], output
    [rows, L, heads, head_dim]), else transformers' SDPA."""

    def forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                softcap: float | None = None, **kwargs) -> tuple[Tensor, None]:
        segments = kwargs.pop("tiltlm_segments", None)
        if segments is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, softcap=softcap, **kwargs)
        # refuse what the kernel cannot compute exactly, instead of silently computing something else
        problems = [name for name in ("s_aux", "sinks", "position_bias") if kwargs.get(name) is not None]
        problems += ["softcap"] if softcap is not None and kernel == BLOCKS else []
        problems += ["dropout"] if dropout and kernel == FLEX else []
        problems += [] if getattr(module, "is_causal", True) else ["non-causal attention"]
        if problems:
            from tiltlm.models import ModelError

            raise ModelError(f"attention {kernel}: cannot honour {', '.join(problems)} of "
                             f"{type(module).__name__}; load the model with attention='sdpa' or 'eager'")
        return attend(segments, query, key, value, scaling, dropout, sliding_window, softcap), None

    return forward


def _flex(segments: Segments, query: Tensor, key: Tensor, value: Tensor, scaling: float | None, dropout: float,
          sliding_window: int | None, softcap: float | None) -> Tensor:
    """FlexAttention under the batch's block mask. Softcapping is a ``score_mod``: scores -> cap * tanh(scores
    / cap), after scaling and before the mask (Gemma Team 2024, "Gemma 2" technical report, architecture
    section; as transformers' eager Gemma-2 attention does it)."""
    block_mask = segments.cached(("flex", sliding_window), lambda: flex_block_mask(segments, sliding_window))
    score_mod = None if softcap is None else lambda score, b, h, q, kv: softcap * torch.tanh(score / softcap)
    out = compiled_flex()(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                          enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


def flex_block_mask(segments: Segments, sliding_window: int | None = None):
    """The attention rule of the module docstring as a FlexAttention block mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    segment, part, position = segments.segment_ids, segments.part_ids, segments.position_ids

    def mask_mod(b, h, q, kv):
        same = (segment[b, q] == segment[b, kv]) & (segment[b, q] >= 0)
        visible = (part[b, kv] == 0) | (part[b, kv] == part[b, q])
        allowed = same & visible & (kv <= q)
        if sliding_window is not None:
            allowed = allowed & (position[b, q] - position[b, kv] < sliding_window)
        return allowed | (q == kv)  # padding attends to itself: no empty softmax row

    rows, length = segment.shape
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=segment.device)


@functools.cache
def compiled_flex() -> Callable:
    """``flex_attention`` compiled once per process (uncompiled, it materialises every score)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# A block: queries (a column range of one row) and the key ranges they see.
Block = tuple[int, range, list[range]]


def block_plan(segments: Segments) -> dict[str, list[Block]]:
    """Per kind, the blocks that cover the batch, row by row: ``prompt`` (itself, causally),
    ``completion`` (its prompt, then itself causally) and ``padding`` (itself alone)."""
    plan: dict[str, list[Block]] = {"prompt": [], "completion": [], "padding": []}
    for row, (seg, part) in enumerate(zip(segments.segment_ids.tolist(), segments.part_ids.tolist())):
        end, prompt = 0, range(0)
        for (segment, kind), run in itertools.groupby(zip(seg, part)):
            columns = range(end, end + len(list(run)))
            end = columns.stop
            if segment < 0:
                plan["padding"].append((row, columns, [columns]))
            elif kind == 0:
                prompt = columns
                plan["prompt"].append((row, columns, [columns]))
            else:
                plan["completion"].append((row, columns, [prompt, columns]))
    return plan


# Blocks pay off when SDPA over whole rows would compute this many times the score pairs the blocks
# compute: per score pair, the gathered calls cost ~2.5x the dense kernel (gathers, their backward, masked
# completion blocks). Measured, attention forward + backward, 2 CPU cores, 20M model's shape: rows of 512
# (one pair each) dense 1.4x faster, 1024 dense 1.2x faster, 2048 blocks 1.9x faster, 4096 blocks 4.3x.
DENSE_ADVANTAGE = 3.0


def blocks_pay_off(segments: Segments) -> bool:
    """Whether the block kernel beats SDPA with the dense mask on this batch (see DENSE_ADVANTAGE)."""
    rows, length = segments.segment_ids.shape
    plan = segments.cached("plan", lambda: block_plan(segments))
    work = sum(len(blocks) * max(len(queries) for _, queries, _ in blocks)
               * max(sum(map(len, keys)) for *_, keys in blocks)
               for blocks in (plan["prompt"], plan["completion"]) if blocks)
    return rows * length * length > DENSE_ADVANTAGE * work


def _blocks(segments: Segments, query: Tensor, key: Tensor, value: Tensor, scaling: float | None, dropout: float,
            sliding_window: int | None, softcap: float | None) -> Tensor:
    """Only the blocks of :func:`block_plan`, gathered into one SDPA call per kind (:func:`gather_plan`)."""
    gathered = segments.cached(("blocks", sliding_window, query.dtype), lambda: gather_plan(
        segments.cached("plan", lambda: block_plan(segments)), segments, sliding_window, query.dtype))
    options = dict(dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    if gathered.plain_rows:
        # right-padded rows of one sequence each: one causal call for the batch. Padding queries then see
        # real tokens instead of themselves; their outputs are never read (no real token attends to a
        # later column).
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, **options)
        return out.transpose(1, 2).contiguous()
    return _gathered_attention(query, key, value, gathered, options)


flex_segment_attention = _segment_kernel(FLEX, _flex)
block_segment_attention = _segment_kernel(BLOCKS, _blocks)


@dataclass
class Group:
    """Blocks of one shape gathered into one padded SDPA call: ``queries`` [n, Q] and ``keys`` [n, K] are
    flat token indices (row * L + column), short blocks padded by repeating their last index; ``mask``
    [n, 1, Q, K] (additive) hides padded keys and what the rule hides, or is None when SDPA's ``is_causal``
    says it all; ``real`` [n, Q] marks the queries that are not padding."""

    queries: Tensor
    keys: Tensor
    mask: Tensor | None
    real: Tensor


def _padded(columns: list[list[int]]) -> tuple[Tensor, Tensor]:
    """The lists as one [n, width] tensor, short ones padded by repeating their last entry; which are real."""
    width = max(map(len, columns))
    real = torch.tensor([[i < len(c) for i in range(width)] for c in columns])
    return torch.tensor([c + c[-1:] * (width - len(c)) for c in columns]), real


def _group(blocks: list[Block], length: int, positions: Tensor, sliding_window: int | None,
           dtype: torch.dtype) -> Group:
    rows = torch.tensor([row for row, _, _ in blocks])[:, None]
    qcol, qreal = _padded([list(queries) for _, queries, _ in blocks])
    kcol, kreal = _padded([[c for r in keys for c in r] for *_, keys in blocks])
    allowed = (kcol[:, None, :] <= qcol[:, :, None]) & kreal[:, None, :]
    # is_causal says it all for a block against itself, unless a window hides some of its keys
    needs_mask = any(len(keys) > 1 for *_, keys in blocks)
    if sliding_window is not None:
        distance = positions[rows, qcol][:, :, None] - positions[rows, kcol][:, None, :]
        allowed &= distance < sliding_window
        reach = (distance.masked_fill(~(kreal[:, None, :] & qreal[:, :, None]), 0)).max().item()
        needs_mask |= reach >= sliding_window
    mask = (torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))[:, None]
            if needs_mask else None)
    return Group(rows * length + qcol, rows * length + kcol, mask, qreal)


@dataclass
class Gathered:
    """A batch's blocks as SDPA calls: ``groups`` (the prompts, then the completions), ``padding`` (flat
    indices of padding tokens), and ``inverse``: for every token of the batch, where its output is in the
    concatenated outputs of the groups and the padding. ``plain_rows``: every row is one causal sequence
    from column 0, then padding (concatenated batches)."""

    groups: list[Group]
    padding: Tensor
    inverse: Tensor
    plain_rows: bool


def gather_plan(plan: dict[str, list[Block]], segments: Segments, sliding_window: int | None,
                dtype: torch.dtype) -> Gathered:
    rows, length = segments.segment_ids.shape
    padding = torch.tensor([row * length + c for row, columns, _ in plan["padding"] for c in columns], dtype=torch.long)
    groups = [_group(plan[kind], length, segments.position_ids.cpu(), sliding_window, dtype)
              for kind in ("prompt", "completion") if plan[kind]]
    order = torch.cat([group.queries.flatten() for group in groups] + [padding])
    real = torch.cat([group.real.flatten() for group in groups] + [torch.ones(len(padding), dtype=torch.bool)])
    inverse = torch.empty(rows * length, dtype=torch.long)
    inverse[order[real]] = torch.arange(len(order))[real]
    plain = (not plan["completion"] and groups[0].mask is None and len(plan["prompt"]) == rows
             and all(columns.start == 0 for _, columns, _ in plan["prompt"]))  # one prompt per row, from column 0
    return Gathered(groups, padding, inverse, plain)


def _gathered_attention(query: Tensor, key: Tensor, value: Tensor, gathered: Gathered, options: dict) -> Tensor:
    """All blocks in one SDPA call per group, by gathering their tokens; returns [rows, L, heads, dim].
    Gathering by index (not slicing block by block) keeps the backward to one scatter per input."""
    rows, heads, length, dim = query.shape

    def flat(t: Tensor) -> Tensor:  # [rows * L, heads, dim]: a view of what transformers' q/k/v came from
        return t.transpose(1, 2).reshape(rows * length, t.shape[1], dim)

    q, k, v = flat(query), flat(key), flat(value)
    outputs = []
    for group in gathered.groups:
        queries, keys = group.queries.to(query.device), group.keys.to(query.device)
        mask = None if group.mask is None else group.mask.to(query.device)
        out = F.scaled_dot_product_attention(q[queries].transpose(1, 2), k[keys].transpose(1, 2),
                                             v[keys].transpose(1, 2), attn_mask=mask, is_causal=mask is None,
                                             **options)
        outputs.append(out.transpose(1, 2).reshape(-1, heads, dim))
    if gathered.padding.numel():  # padding attends only to itself: its value
        outputs.append(v[gathered.padding.to(query.device)].repeat_interleave(heads // v.shape[1], dim=1))
    return torch.cat(outputs)[gathered.inverse.to(query.device)].view(rows, length, heads, dim)


def _segment_or_sdpa_mask(*args, **kwargs):
    """Mask builder registered for both names: none under segment metadata, else what sdpa builds."""
    if _SEGMENT_FORWARD.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Make ``tiltlm_flex`` and ``tiltlm_blocks`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, attend in ((FLEX, flex_segment_attention), (BLOCKS, block_segment_attention)):
        AttentionInterface.register(name, attend)
        AttentionMaskInterface.register(name, _segment_or_sdpa_mask)


def unsupported(model, kernel: str) -> str | None:
    """Why ``kernel`` cannot compute ``model``'s attention exactly, from what its class declares and what
    its config and parameters hold; None when it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls, config = type(base), base.config
    softcap = getattr(config, "attn_logit_softcapping", None)
    if kernel in ("flex", "blocks"):
        if not getattr(cls, "_supports_attention_backend", False):
            return f"{cls.__name__} does not pass attention keywords down (no _supports_attention_backend)"
        if any(name.endswith("sinks") for name, _ in base.named_parameters()):
            return f"{cls.__name__} has attention sinks"
        if kernel == "blocks" and softcap is not None:
            return f"{cls.__name__} softcaps attention logits (SDPA blocks cannot)"
    if kernel == "sdpa" and (not getattr(cls, "_supports_sdpa", False) or softcap is not None):
        return f"{cls.__name__} does not declare SDPA support"
    return None


_LOGGED: set = set()


def log_layout(kernel: str, batch: Batch) -> None:
    """Say once per process which kernel computes which kind of row."""
    rows = "plain rows" if batch.segment_ids is None else "prompt-shared/packed rows"
    how = {"flex": "FlexAttention, block mask from segment metadata",
           "blocks": "SDPA on the needed blocks only" if batch.segment_ids is not None else "one causal SDPA call",
           "blocks-dense": "short rows: SDPA with a dense float mask, faster there than blocks",
           "sdpa": "SDPA with a dense mask", "eager": "eager attention with a dense float mask"}.get(kernel, kernel)
    if (kernel, rows) not in _LOGGED:
        _LOGGED.add((kernel, rows))
        log.info("attention for %s: %s (%s)", rows, kernel, how)


def kernel_of(config) -> str:
    """The kernel a model runs: flex, blocks, sdpa, eager (or another transformers implementation)."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    return {FLEX: "flex", BLOCKS: "blocks"}.get(implementation, implementation)


def dense_attention_mask(batch: Batch, config, kernel: str, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
    """The mask a dense kernel needs, built on the batch's device: the 2D padding mask of plain rows, or
    the [rows, 1, L, L] mask of the segment rule, boolean only for SDPA on GPU (there True means "may
    attend"; CPU SDPA would convert it to float in every layer, and eager adds any mask as a bias, so
    both get 0 / -inf floats). Models with sliding-window layers get one mask per layer type."""
    if batch.segment_ids is None:
        return batch.attention_mask

    def build(window: int | None) -> Tensor:
        allowed = segment_mask(batch.segment_ids, batch.part_ids, batch.position_ids, window)
        if kernel == "sdpa" and allowed.device.type != "cpu":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    window, layer_types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" in layer_types:
        return {t: build(window if t == "sliding_attention" else None) for t in set(layer_types)}
    return build(window if layer_types is None else None)  # Mistral: one window for every layer
