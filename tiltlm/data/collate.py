"""TokenizedPairs -> one Batch of tensors: chosen and rejected of the same pairs in one forward pass.

Two layouts, one Batch type, the same log-probs (tests prove it):

``concatenated``  two rows per pair, ``[prompt | chosen]`` and ``[prompt | rejected]``, right-padded to
                  the longest row. The prompt is computed twice; short rows carry padding.
``shared``        the prompt once: ``[prompt | chosen | rejected]`` in one row, under a mask where
                  rejected tokens see the prompt but not the chosen tokens, and position ids of the
                  rejected part that restart where the prompt ends. With ``row_tokens`` set, several
                  pairs are packed into each row up to that many tokens (block-diagonal mask, own
                  position ids per pair), so almost no position is padding.

Either way the Batch says where each scored token sits: the hidden state at ``(target_rows[k],
target_cols[k])`` predicts ``target_ids[k]``, a token of sequence ``target_seq[k]`` (sequence ``i`` is
pair i's chosen completion, ``P + i`` its rejected one).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from tiltlm.data.types import TokenizedPair


@dataclass
class Batch:
    input_ids: Tensor  # [rows, length]
    attention_mask: Tensor  # [rows, length] (1 = token, 0 = pad) or [rows, 1, length, length] bool
    position_ids: Tensor  # [rows, length]
    target_rows: Tensor  # [M] row of the hidden state that predicts each completion token
    target_cols: Tensor  # [M] its column
    target_ids: Tensor  # [M] the completion token predicted there
    target_seq: Tensor  # [M] which sequence the token belongs to, in [0, 2 * num_pairs)
    num_pairs: int
    real_tokens: int  # tokens a step must compute: no padding, each prompt counted once
    sources: tuple[str, ...] = ()  # where each pair came from, for diagnostics
    indices: tuple[int, ...] = ()  # each pair's position in its dataset: a precomputed reference's row

    def to(self, device: torch.device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return Batch(**moved)


class _Targets:
    """Accumulates (row, col, token, sequence) for the scored tokens while rows are laid out."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.ids: list[int] = []
        self.seq: list[int] = []

    def add(self, row: int, predictor_cols: list[int], tokens: list[int], sequence: int) -> None:
        self.rows += [row] * len(tokens)
        self.cols += predictor_cols
        self.ids += tokens
        self.seq += [sequence] * len(tokens)

    def tensors(self) -> dict[str, Tensor]:
        return {"target_rows": torch.tensor(self.rows, dtype=torch.long),
                "target_cols": torch.tensor(self.cols, dtype=torch.long),
                "target_ids": torch.tensor(self.ids, dtype=torch.long),
                "target_seq": torch.tensor(self.seq, dtype=torch.long)}


def _check_prompts(pairs: list[TokenizedPair]) -> None:
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
    targets = _Targets()
    for row, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        input_ids[row, :n] = torch.tensor(prompt + completion)
        attention_mask[row, :n] = 1
        # the hidden state at position t predicts token t + 1
        targets.add(row, list(range(len(prompt) - 1, n - 1)), completion, row)
    position_ids = torch.arange(length).expand(len(sequences), length).clone()
    real = sum(len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return Batch(input_ids, attention_mask, position_ids, **targets.tensors(), num_pairs=len(pairs),
                 real_tokens=real, sources=tuple(p.source for p in pairs))


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Group items (by index) into rows of at most ``row_tokens`` tokens, first-fit in the given order.

    An item longer than ``row_tokens`` gets a row of its own.
    """
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
    is given; see the module docstring for the mask."""
    _check_prompts(pairs)
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    groups = pack_rows(lengths, row_tokens) if row_tokens else [[i] for i in range(len(pairs))]
    length = max(sum(lengths[i] for i in group) for group in groups)
    input_ids = torch.full((len(groups), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), length), dtype=torch.long)
    # segment[r, t]: which pair owns position t (-1: padding); part: 0 prompt, 1 chosen, 2 rejected
    segment = torch.full((len(groups), length), -1, dtype=torch.long)
    part = torch.zeros((len(groups), length), dtype=torch.long)
    targets = _Targets()
    for row, group in enumerate(groups):
        start = 0
        for i in group:
            pair = pairs[i]
            p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
            end = start + p + c + r
            input_ids[row, start:end] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
            position_ids[row, start:end] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
            segment[row, start:end] = i
            part[row, start + p:start + p + c] = 1
            part[row, start + p + c:end] = 2
            last_prompt = start + p - 1
            targets.add(row, list(range(last_prompt, start + p + c - 1)), pair.chosen_ids, i)
            # the first rejected token is predicted from the last prompt token, like the first chosen one
            targets.add(row, [last_prompt] + list(range(start + p + c, end - 1)), pair.rejected_ids,
                        len(pairs) + i)
            start = end
    attention_mask = shared_prefix_mask(segment, part)
    real = sum(lengths)
    return Batch(input_ids, attention_mask, position_ids, **targets.tensors(), num_pairs=len(pairs),
                 real_tokens=real, sources=tuple(p.source for p in pairs))


def shared_prefix_mask(segment: Tensor, part: Tensor) -> Tensor:
    """Boolean [rows, 1, L, L] mask: query t may attend key s when both belong to the same pair, s <= t,
    and not (t is a rejected token and s a chosen one). Padding attends only to itself, so that no
    attention row is empty (an empty row gives NaN in softmax)."""
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_pair = segment[:, :, None] == segment[:, None, :]
    rejected_sees_chosen = (part[:, :, None] == 2) & (part[:, None, :] == 1)
    mask = causal & same_pair & ~rejected_sees_chosen & (segment[:, :, None] >= 0)
    mask |= torch.eye(length, dtype=torch.bool)
    return mask.unsqueeze(1)
