"""TokenizedPairs -> one Batch of tensors: every completion of the same prompts in one forward pass.

Two layouts, one Batch type, the same log-probs (tests prove it):

``concatenated``  two rows per pair, ``[prompt | chosen]`` and ``[prompt | rejected]``, right-padded to
                  the longest row. The prompt is computed twice; short rows carry padding. Only a 2D
                  padding mask: plain causal attention is right.
``shared``        the prompt once: ``[prompt | completion 1 | ... | completion K]`` in one row (a pair is
                  K = 2: chosen, rejected). A completion sees its prompt and itself, never another
                  completion of its prompt, and its position ids restart where the prompt ends. With
                  ``row_tokens`` set, several examples are packed into each row up to that many tokens,
                  so almost no position is padding.

The shared layout does not carry an L x L mask: each token says which example it belongs to
(``segment_ids``, -1 for padding) and which part of it (``part_ids``: 0 prompt, k >= 1 completion k).
That, the order of the tokens in the row and ``position_ids`` define attention completely; the kernels
of :mod:`tiltlm.attention` read it directly, and :func:`segment_mask` expands it to the dense mask for
kernels that need one.

Either way the Batch says where each scored token sits: the hidden state at ``(target_rows[k],
target_cols[k])`` predicts ``target_ids[k]``, a token of sequence ``target_seq[k]``. For pairs, sequence
``i`` is pair i's chosen completion and ``P + i`` its rejected one; callers with K completions per
prompt give each completion's sequence id themselves (:class:`PromptCompletions`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from tiltlm.data.types import TokenizedPair


@dataclass
class Batch:
    input_ids: Tensor  # [rows, length]
    attention_mask: Tensor  # [rows, length] 1 = token, 0 = padding
    position_ids: Tensor  # [rows, length]
    target_rows: Tensor  # [M] row of the hidden state that predicts each completion token
    target_cols: Tensor  # [M] its column
    target_ids: Tensor  # [M] the completion token predicted there
    target_seq: Tensor  # [M] which sequence the token belongs to, in [0, num_sequences)
    num_pairs: int
    real_tokens: int  # tokens a step must compute: no padding, each prompt counted once
    sources: tuple[str, ...] = ()  # where each pair came from, for diagnostics
    indices: tuple[int, ...] = ()  # each pair's position in its dataset: a precomputed reference's row
    segment_ids: Tensor | None = None  # [rows, length] example of each token, -1 padding (shared layout)
    part_ids: Tensor | None = None  # [rows, length] 0 prompt, k >= 1 completion k (shared layout)
    num_sequences: int = 0  # sequences scored; 0 means 2 * num_pairs (pairs)

    @property
    def sequences(self) -> int:
        return self.num_sequences or 2 * self.num_pairs

    def to(self, device: torch.device) -> "Batch":
        """The same batch (of the same class: subclasses add fields) with every tensor on ``device``."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **{name: value.to(device, non_blocking=True) for name, value in tensors.items()})


@dataclass
class PromptCompletions:
    """One prompt and the K completions scored against it; ``sequence_ids[k]`` numbers completion k
    among the batch's sequences (its index in the log-probs a scorer returns)."""

    prompt_ids: list[int]
    completions: list[list[int]]
    sequence_ids: list[int]
    source: str = ""


Target = tuple[int, int, int, int]  # (row, col, token, sequence) of a scored token


def _target_tensors(targets: list[Target]) -> dict[str, Tensor]:
    columns = torch.tensor(targets, dtype=torch.long).reshape(-1, 4).T
    names = ("target_rows", "target_cols", "target_ids", "target_seq")
    return {name: column.contiguous() for name, column in zip(names, columns)}


def _check_prompts(pairs: list) -> None:
    """The first completion token is predicted from the last prompt token: with no prompt token it
    would be read from column -1 (padding, or another pair's token). Tokenisation never makes such
    pairs (it starts an empty prompt with BOS, or skips the pair); this guards hand-made ones."""
    for pair in pairs:
        if not pair.prompt_ids:
            raise ValueError(f"{pair.source or 'a pair'}: empty prompt_ids; a completion needs a token before "
                             f"it (start the prompt with BOS)")


def collate_concatenated(pairs: list[TokenizedPair], pad_id: int) -> Batch:
    """Rows ``[prompt | chosen]`` for every pair, then ``[prompt | rejected]``, right-padded."""
    _check_prompts(pairs)
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    length = max(len(prompt) + len(completion) for prompt, completion in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    targets: list[Target] = []
    for row, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        input_ids[row, :n] = torch.tensor(prompt + completion)
        attention_mask[row, :n] = 1
        # the hidden state at position t predicts token t + 1
        targets += [(row, col, token, row) for col, token in zip(range(len(prompt) - 1, n - 1), completion)]
    position_ids = torch.arange(length).expand(len(sequences), length).clone()
    real = sum(len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return Batch(input_ids, attention_mask, position_ids, **_target_tensors(targets), num_pairs=len(pairs),
                 real_tokens=real, sources=tuple(p.source for p in pairs))


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Group items (by index) into rows of at most ``row_tokens`` tokens, first-fit in the given order;
    an item longer than ``row_tokens`` gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index, n in enumerate(lengths):
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(index)
                room[r] -= n
                break
        else:
            rows.append([index])
            room.append(row_tokens - n)
    return rows


def collate_shared(pairs: list[TokenizedPair], pad_id: int, row_tokens: int | None = None) -> Batch:
    """Prefix-shared rows ``[prompt | chosen | rejected]``, packed several to a row when ``row_tokens``
    is given; see the module docstring. Pair i's chosen is sequence i, its rejected P + i."""
    examples = [PromptCompletions(p.prompt_ids, [p.chosen_ids, p.rejected_ids], [i, len(pairs) + i], p.source)
                for i, p in enumerate(pairs)]
    return replace(collate_prompt_completions(examples, pad_id, row_tokens), num_sequences=0)


def collate_prompt_completions(examples: list[PromptCompletions], pad_id: int,
                               row_tokens: int | None = None) -> Batch:
    """Rows ``[prompt | completion 1 | ... | completion K]`` per example, packed several to a row when
    ``row_tokens`` is given, with segment and part ids (module docstring). ``num_pairs`` is the number of
    examples; ``num_sequences`` one more than the largest sequence id."""
    _check_prompts(examples)
    lengths = [len(e.prompt_ids) + sum(len(c) for c in e.completions) for e in examples]
    groups = pack_rows(lengths, row_tokens) if row_tokens else [[i] for i in range(len(examples))]
    length = max(sum(lengths[i] for i in group) for group in groups)
    rows = (len(groups), length)
    input_ids = torch.full(rows, pad_id, dtype=torch.long)
    position_ids = torch.zeros(rows, dtype=torch.long)
    segment_ids = torch.full(rows, -1, dtype=torch.long)
    part_ids = torch.zeros(rows, dtype=torch.long)
    targets: list[Target] = []
    for row, group in enumerate(groups):
        start = 0
        for i in group:
            start = _lay_out(examples[i], i, row, start, (input_ids, position_ids, segment_ids, part_ids), targets)
    sequences = 1 + max((s for e in examples for s in e.sequence_ids), default=-1)
    return Batch(input_ids, (segment_ids >= 0).long(), position_ids, **_target_tensors(targets),
                 num_pairs=len(examples), real_tokens=sum(lengths), sources=tuple(e.source for e in examples),
                 segment_ids=segment_ids, part_ids=part_ids, num_sequences=sequences)


def _lay_out(example: PromptCompletions, index: int, row: int, start: int, tensors: tuple[Tensor, ...],
             targets: list[Target]) -> int:
    """Write one example into ``row`` from column ``start``; returns the column after it."""
    input_ids, position_ids, segment_ids, part_ids = tensors
    p = len(example.prompt_ids)
    end = start + p
    input_ids[row, start:end] = torch.tensor(example.prompt_ids, dtype=torch.long)
    position_ids[row, start:end] = torch.arange(p)
    segment_ids[row, start:end] = index
    last_prompt = end - 1
    for k, (completion, sequence) in enumerate(zip(example.completions, example.sequence_ids), start=1):
        c0, c1 = end, end + len(completion)
        input_ids[row, c0:c1] = torch.tensor(completion, dtype=torch.long)
        position_ids[row, c0:c1] = torch.arange(p, p + len(completion))  # as if right after the prompt
        segment_ids[row, c0:c1] = index
        part_ids[row, c0:c1] = k
        # each completion's first token is predicted from the last prompt token, the others from the
        # completion's own previous token
        targets += [(row, col, token, sequence) for col, token in zip([last_prompt, *range(c0, c1 - 1)], completion)]
        end = c1
    return end


def segment_mask(segment_ids: Tensor, part_ids: Tensor, position_ids: Tensor | None = None,
                 sliding_window: int | None = None) -> Tensor:
    """Boolean [rows, 1, L, L] mask from segment metadata: query t may attend key s when both belong to
    the same example, s <= t, and s is a prompt token or in t's own completion (and, with a sliding
    window, ``position[t] - position[s] < window``). Padding attends only to itself, so that no attention
    row is empty (an empty row gives NaN in softmax). Built on the device of its inputs."""
    length = segment_ids.shape[1]
    index = torch.arange(length, device=segment_ids.device)
    causal = index[:, None] >= index[None, :]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] >= 0)
    visible = (part_ids[:, None, :] == 0) | (part_ids[:, :, None] == part_ids[:, None, :])
    mask = causal & same & visible
    if sliding_window is not None:
        mask &= (position_ids[:, :, None] - position_ids[:, None, :]) < sliding_window
    mask |= index[:, None] == index[None, :]
    return mask.unsqueeze(1)
