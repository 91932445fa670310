"""From :class:`Pair` to :class:`TokenizedPair`: render, tokenise, truncate, and count what is dropped.

Rules, and why:

* Rendering. Text pairs are used as they are. Conversational pairs go through the tokenizer's own
  ``apply_chat_template``: the prompt with ``add_generation_prompt=True``, and the completion as the
  rendering of prompt + completion minus the rendering of the prompt. The prompt rendering must be a
  string prefix of the full one, or the completion cannot be cut out (a :class:`DataError` naming the
  pair). Templates often add a newline after the turn-ending token; when the rendered completion ends
  with EOS followed by whitespace only, it is cut right after EOS, so the scored completion ends with
  EOS and not with a token the model never has to produce before stopping.
* Tokenising. Prompt and completions are tokenised separately, with ``add_special_tokens=False``, and
  concatenated, so the prompt ids are the same for both completions and for the model, by construction
  (tokenising the joined text could merge tokens across the boundary). A text prompt starts with BOS
  exactly when the tokenizer's default encoding adds one; a chat-rendered prompt gets none (the
  template writes its own special tokens). Each completion ends with EOS: appended unless the last token
  already is EOS (chat templates usually end turns with it), so never doubled.
* Truncating. First the prompt, keeping its end (the latest turns matter most), down to
  ``max_prompt_length``, keeping a leading BOS; then each completion, keeping its start, to fit
  ``max_length`` together with the prompt. A cut completion loses its EOS.
* Bounding the work. A text far longer than the limits is cut to a character budget *before* it is
  tokenised (one 60 MB row with ``max_length`` 128 took minutes and 15 GB when tokenised whole): the
  prompt keeps its last, a completion its first ``(2 * limit + 16) * K`` characters, where ``K``, the
  longest vocabulary entry in characters, bounds the characters one token stands for. The kept
  ``limit`` tokens then end (or start) at least ``limit + 16`` tokens away from the cut, so the cut
  cannot change them (tokenisers look ahead a word or a few merges, not hundreds of tokens; a property
  test checks the ids against tokenising whole). Normal rows are shorter than the budget and untouched.
* Control tokens written as text (``<|im_end|>`` inside a completion) are counted in the summary and
  read as control tokens (``special_tokens="keep"``) or as text (``"split"``): :mod:`tiltlm.data.specials`.
* Skipping, counted by reason: an empty (or whitespace-only) completion, chosen identical to rejected,
  no room left for a completion token, an empty prompt with no BOS token to put there instead (the
  first completion token needs a token to be predicted from: an empty prompt becomes ``[BOS]`` when
  the tokenizer has a BOS token, whether or not it adds one by default), and completions that become
  identical once truncated (their log-ratios would cancel: the pair would teach nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from jinja2 import TemplateError

from tiltlm.data.specials import (MODES, control_strings, encode_protected, found_controls, protect,
                                   segments_faithful)
from tiltlm.data.types import DataError, DataSummary, Messages, Pair, Text, TokenizedPair

EMPTY = "empty completion"
IDENTICAL = "chosen identical to rejected"
NO_ROOM = "no completion token left"
EMPTY_PROMPT = "empty prompt (no BOS token to start from)"
IDENTICAL_AFTER_TRUNCATION = "identical after truncation"


@dataclass(frozen=True)
class Rendered:
    """The three texts to tokenise; ``chat`` when a chat template wrote them (and their special tokens)."""

    prompt: str
    chosen: str
    rejected: str
    chat: bool
    protected: bool = False  # control strings of the user's text stand as private-use characters (split)
    quotes_control: tuple[str, ...] = ()  # the control-token strings the user's text holds


def tokenize_pair(pair: Pair, tokenizer, max_length: int, max_prompt_length: int,
                  special_tokens: str = "keep") -> TokenizedPair | str:
    """One pair's :class:`TokenizedPair`, or the reason it is skipped. The plain, unbatched path.
    ``special_tokens``: how control-token strings in the pair's text are read
    (:mod:`tiltlm.data.specials`)."""
    _check_lengths(max_length, max_prompt_length, special_tokens)
    strings = control_strings(tokenizer)
    per_token = chars_per_token(tokenizer)
    texts = _prepare(pair, tokenizer, strings, special_tokens, per_token, max_length, max_prompt_length)
    if isinstance(texts, str):
        return texts
    three = (texts.prompt, texts.chosen, texts.rejected)
    if texts.protected:
        prompt, chosen, rejected = (encode_protected(tokenizer, t, strings) for t in three)
    else:
        prompt, chosen, rejected = (_encode(tokenizer, [t])[0] for t in three)
    return _assemble(texts.chat, prompt, chosen, rejected, tokenizer, adds_bos(tokenizer),
                     max_length, max_prompt_length, pair.source)


def tokenize_pairs(pairs: list[Pair], tokenizer, max_length: int, max_prompt_length: int,
                   special_tokens: str = "keep") -> tuple[list[TokenizedPair], DataSummary]:
    """The pairs that survive, tokenised (in batches: one tokenizer call for all prompts, one for all
    completions), and a :class:`DataSummary` of what was kept and skipped."""
    _check_lengths(max_length, max_prompt_length, special_tokens)
    strings, per_token = control_strings(tokenizer), chars_per_token(tokenizer)
    results: list[TokenizedPair | str | Rendered] = [
        _prepare(pair, tokenizer, strings, special_tokens, per_token, max_length, max_prompt_length) for pair in pairs]
    rendered = [(index, texts) for index, texts in enumerate(results) if isinstance(texts, Rendered)]
    plain = [(index, texts) for index, texts in rendered if not texts.protected]
    prompts = _encode(tokenizer, [texts.prompt for _, texts in plain])
    completions = _encode(tokenizer, [text for _, texts in plain for text in (texts.chosen, texts.rejected)])
    ids = {index: (prompts[k], completions[2 * k], completions[2 * k + 1]) for k, (index, _) in enumerate(plain)}
    for index, texts in rendered:
        if texts.protected:  # one at a time: only pairs that quote control tokens, with split
            three = (texts.prompt, texts.chosen, texts.rejected)
            ids[index] = tuple(encode_protected(tokenizer, t, strings) for t in three)
    bos = adds_bos(tokenizer)
    for index, texts in rendered:
        results[index] = _assemble(texts.chat, *ids[index], tokenizer, bos, max_length, max_prompt_length,
                                   pairs[index].source)
    summary = summarize(results)
    summary.control_text = sum(bool(texts.quotes_control) for _, texts in rendered)
    summary.control_found = sorted({s for _, texts in rendered for s in texts.quotes_control})
    summary.special_tokens = special_tokens
    return [r for r in results if isinstance(r, TokenizedPair)], summary


def _prepare(pair: Pair, tokenizer, strings: list[str], special_tokens: str, per_token: int, max_length: int,
             max_prompt_length: int) -> Rendered | str:
    """A pair's texts ready to encode (rendered, protected when split asks, cut to the budget), or why
    it is skipped."""
    reason = skip_reason(pair)
    if reason is not None:
        return reason
    quotes = tuple(found_controls(pair, strings))
    protected = bool(quotes) and special_tokens == "split"
    if protected and not isinstance(pair.prompt, str) and not segments_faithful(tokenizer, strings):
        raise DataError(f"{pair.source}: the messages hold control tokens written as text ({', '.join(quotes)}), "
                        f"and with this tokenizer special_tokens_in_text=split cannot read them as text inside "
                        f"a chat template; use special_tokens_in_text=keep, or remove them from the data")
    texts = render(protect(pair, strings) if protected else pair, tokenizer)
    return bounded(replace(texts, protected=protected, quotes_control=quotes), per_token, max_length, max_prompt_length)


def skip_reason(pair: Pair) -> str | None:
    """Why a pair is useless before tokenising it: an empty completion, or identical completions."""
    if _is_empty(pair.chosen) or _is_empty(pair.rejected):
        return EMPTY
    if pair.chosen == pair.rejected:
        return IDENTICAL
    return None


def _is_empty(completion: Text) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    return all(not message["content"].strip() for message in completion)


def render(pair: Pair, tokenizer) -> Rendered:
    """The texts to tokenise: a text pair as is, a conversational pair through the chat template."""
    kinds = {isinstance(text, str) for text in (pair.prompt, pair.chosen, pair.rejected)}
    if len(kinds) != 1:
        raise DataError(f"{pair.source}: prompt, chosen and rejected must be all strings or all message lists")
    if isinstance(pair.prompt, str):
        return Rendered(pair.prompt, pair.chosen, pair.rejected, chat=False)
    prompt = _apply_template(tokenizer, pair.prompt, True, pair.source)
    return Rendered(prompt, completion_text(tokenizer, pair.prompt, pair.chosen, prompt, pair.source),
                    completion_text(tokenizer, pair.prompt, pair.rejected, prompt, pair.source), chat=True)


def chars_per_token(tokenizer) -> int:
    """The most characters one token can stand for: its longest vocabulary entry (byte-level entries
    spell one character per byte, so they over-count multi-byte characters; safe)."""
    return max(1, max(map(len, tokenizer.get_vocab())))


def bounded(texts: Rendered, per_token: int, max_length: int, max_prompt_length: int) -> Rendered:
    """``texts`` cut to what the limits can use, with a margin that leaves the kept tokens unchanged (see
    the module docstring): the prompt keeps its end, the completions their start."""
    prompt_chars = (2 * max_prompt_length + 16) * per_token
    completion_chars = (2 * max_length + 16) * per_token
    return replace(texts, prompt=texts.prompt[-prompt_chars:], chosen=texts.chosen[:completion_chars],
                   rejected=texts.rejected[:completion_chars])


def completion_text(tokenizer, prompt: Messages, completion: Messages, prompt_text: str, source: str) -> str:
    """The rendering of ``prompt + completion`` after ``prompt_text``, ending at EOS when only whitespace
    follows the last EOS."""
    full = _apply_template(tokenizer, prompt + completion, False, source)
    if not full.startswith(prompt_text):
        raise DataError(f"{source}: the chat template renders the prompt (with add_generation_prompt=True) "
                        f"differently from the start of prompt + completion, so the completion cannot be "
                        f"separated from it; use a template whose generation prompt is a prefix of the "
                        f"rendered conversation")
    text = full[len(prompt_text):]
    eos = tokenizer.eos_token
    end = text.rfind(eos) if eos else -1
    if end >= 0 and not text[end + len(eos):].strip():
        text = text[:end + len(eos)]
    return text


def _apply_template(tokenizer, messages: Messages, generation_prompt: bool, source: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (ValueError, TemplateError) as error:
        raise DataError(f"{source}: cannot render this conversational pair with the tokenizer's chat "
                        f"template: {error}") from error


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's default encoding (``add_special_tokens=True``) starts text with BOS."""
    bos = tokenizer.bos_token_id
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos is not None and with_specials[:1] == [bos] and plain[:1] != [bos]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _assemble(chat: bool, prompt: list[int], chosen: list[int], rejected: list[int], tokenizer, bos: bool,
              max_length: int, max_prompt_length: int, source: str) -> TokenizedPair | str:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token: completions must end with one; set tokenizer.eos_token")
    head = [tokenizer.bos_token_id] if bos and not chat else []
    if not head and not prompt:
        # The first completion token is predicted from the token before it; with none, a batch would
        # score it from padding or from another pair. BOS is the one token any text may follow.
        if tokenizer.bos_token_id is None:
            return EMPTY_PROMPT
        head = [tokenizer.bos_token_id]
    return fit(head, prompt, with_eos(chosen, eos), with_eos(rejected, eos), max_length, max_prompt_length, source)


def with_eos(ids: list[int], eos: int) -> list[int]:
    """``ids`` ending with exactly one added EOS: appended unless already last."""
    return ids if ids[-1:] == [eos] else [*ids, eos]


def fit(head: list[int], prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
        max_prompt_length: int, source: str = "") -> TokenizedPair | str:
    """Truncate to the limits: ``head + prompt`` (``head``, e.g. BOS, is kept) down to
    ``max_prompt_length`` keeping the end of ``prompt``, then each completion keeping its start so that
    prompt + completion fits ``max_length``. A skip reason when nothing useful is left."""
    full_prompt = head + prompt
    prompt_cut = len(full_prompt) > max_prompt_length
    if prompt_cut:
        keep = max(max_prompt_length - len(head), 0)
        full_prompt = head[:max_prompt_length] + prompt[len(prompt) - keep:]
    room = max_length - len(full_prompt)
    if room <= 0:
        return NO_ROOM
    completion_cut = len(chosen) > room or len(rejected) > room
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        return IDENTICAL_AFTER_TRUNCATION if completion_cut else IDENTICAL
    return TokenizedPair(full_prompt, chosen, rejected, truncated=prompt_cut or completion_cut, source=source)


def summarize(results: list[TokenizedPair | str]) -> DataSummary:
    """Counts and lengths of a list of tokenisation results (kept pairs and skip reasons)."""
    summary = DataSummary(rows=len(results))
    for result in results:
        if isinstance(result, str):
            summary.skipped[result] = summary.skipped.get(result, 0) + 1
            continue
        summary.kept += 1
        summary.truncated += result.truncated
        summary.prompt_lengths.append(len(result.prompt_ids))
        summary.completion_lengths += [len(result.chosen_ids), len(result.rejected_ids)]
    return summary


def _check_lengths(max_length: int, max_prompt_length: int, special_tokens: str = "keep") -> None:
    if special_tokens not in MODES:
        raise ValueError(f"special_tokens_in_text = {special_tokens!r}: expected {' or '.join(MODES)}")
    if max_prompt_length < 1 or max_length < 2:
        raise ValueError(f"max_length = {max_length}, max_prompt_length = {max_prompt_length}: expected "
                         f"max_prompt_length >= 1 and max_length >= 2")
