"""Control tokens written in the data as text (``<|im_end|>`` inside a completion, say).

A tokenizer turns the string of a control token into that token wherever it appears, so a completion
that quotes ``<|im_end|>`` would teach the model to end its turn there. Two ways to read such text,
chosen by ``special_tokens_in_text``:

``keep``   as control tokens (the tokenizer's default; right for data written pre-rendered, with the
           chat markup already in the text). The data summary counts the pairs and warns.
``split``  as plain text: the string is tokenised like any other characters.

In a conversational pair only the message contents are the user's: the chat template writes real
control tokens around them, which must stay control tokens. So with ``split`` each control string in
a content is first replaced by one private-use character (:func:`protect`), the template renders, and
:func:`encode_protected` cuts the rendering at the template's control tokens, as the tokenizer itself
does before anything else, and tokenises each piece with the user's strings put back and read as text.
That equals the tokenizer's own result only where a piece after a control token is tokenised as if it
stood alone; tokenizers that treat the start of the text specially (a sentencepiece "▁" added to the
first piece only, as Llama-2's does) fail :func:`segments_faithful`, and for them ``split`` is refused
for conversational pairs that quote control tokens (text pairs need no cutting and always work).
"""

from __future__ import annotations

import re
from dataclasses import replace

from tiltlm.data.types import DataError, Pair, Text

MODES = ("keep", "split")
PRIVATE = 0xF0000  # Unicode plane 15, private use: characters no tokenizer vocabulary or data set uses


def control_strings(tokenizer) -> list[str]:
    """The strings of the tokenizer's special (control) tokens, longest first (so a longer one that
    contains a shorter one is matched whole)."""
    strings = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    strings.update(tokenizer.all_special_tokens)
    return sorted((s for s in strings if s), key=lambda s: (-len(s), s))


def found_controls(pair: Pair, strings: list[str]) -> list[str]:
    """The control-token strings the pair's own text (for a message list: its contents) holds."""
    texts = [text for value in (pair.prompt, pair.chosen, pair.rejected)
             for text in ([value] if isinstance(value, str) else [m["content"] for m in value])]
    return [s for s in strings if any(s in text for text in texts)]


def protect(pair: Pair, strings: list[str]) -> Pair:
    """``pair`` with each control string in its text replaced by its private-use character."""
    markers = [chr(PRIVATE + k) for k in range(len(strings))]
    if found_controls(pair, markers):
        raise DataError(f"{pair.source}: holds private-use characters (U+F0000...) that special_tokens_in_text="
                        f"split uses as markers; use special_tokens_in_text=keep for this data")
    table = dict(zip(strings, markers))
    pattern = re.compile("|".join(map(re.escape, strings)))

    def sub(value: Text) -> Text:
        if isinstance(value, str):
            return pattern.sub(lambda m: table[m.group()], value)
        return [{**message, "content": sub(message["content"])} for message in value]

    return replace(pair, prompt=sub(pair.prompt), chosen=sub(pair.chosen), rejected=sub(pair.rejected))


def segments_faithful(tokenizer, strings: list[str]) -> bool:
    """Whether cutting at control tokens and tokenising the pieces alone gives the tokenizer's own ids
    (probed on short texts with a piece that starts right after a control token, with and without a space)."""
    probes = [f"x{s}y {s} z\n{s}w" for s in strings[:3]]
    return all(encode_protected(tokenizer, probe, strings) == tokenizer(probe, add_special_tokens=False)["input_ids"]
               for probe in probes)


def encode_protected(tokenizer, text: str, strings: list[str]) -> list[int]:
    """Ids of a protected rendering: control strings in ``text`` (the template's) become their tokens,
    private-use characters (the user's) become their strings read as text."""
    restore = {PRIVATE + k: s for k, s in enumerate(strings)}
    ids: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, strings)) + ")", text):
        if piece in strings:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            ids += tokenizer(piece.translate(restore), add_special_tokens=False,
                             split_special_tokens=True)["input_ids"]
    return ids
