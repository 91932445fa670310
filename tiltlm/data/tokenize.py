"""From a :class:`Pair`, ranked list or unpaired row to token ids: render, tokenise, truncate, and count
what is dropped.

Rules, and why:

* Rendering. Text is used as it is. Message lists go through the tokenizer's ``apply_chat_template``:
  the prompt with ``add_generation_prompt=True``, each completion as the rendering of prompt +
  completion minus that of the prompt, which must be its string prefix (else a :class:`DataError`
  naming the row). A rendered completion ending with EOS then whitespace only is cut right after EOS:
  templates often add a newline after the turn-ending token, which the model never has to produce.
* Tokenising. Prompt and completions are tokenised separately (``add_special_tokens=False``) and
  concatenated, so the prompt ids are the same for every completion and for the model, by construction
  (tokenising the joined text could merge tokens across the boundary). A text prompt starts with BOS
  exactly when the tokenizer's default encoding adds one; a chat template writes its own special
  tokens. Each completion ends with one EOS, appended unless already last (chat templates end turns
  with it).
* Truncating. First the prompt, keeping its end (the latest turns matter most) and a leading BOS, to
  ``max_prompt_length``; then each completion, keeping its start, to fit ``max_length`` with the
  prompt. A cut completion loses its EOS.
* Bounding the work. A text far longer than the limits is cut to a character budget *before* it is
  tokenised (one 60 MB row with ``max_length`` 128 took minutes and 15 GB when tokenised whole): the
  prompt keeps its last, a completion its first ``(2 * limit + 16) * K`` characters, where ``K``, the
  longest vocabulary entry in characters, bounds the characters one token stands for. The kept
  ``limit`` tokens then end (or start) at least ``limit + 16`` tokens away from the cut, so the cut
  cannot change them (tokenisers look ahead a word or a few merges, not hundreds of tokens; a property
  test checks the ids against tokenising whole). Normal rows are shorter than the budget and untouched.
* Control tokens written as text (``<|im_end|>`` inside a completion) in a file of pairs are counted in
  the summary and read as control tokens (``special_tokens="keep"``) or as text (``"split"``):
  :mod:`tiltlm.data.specials`.
* Skipping, counted by reason: an empty (or whitespace-only) completion, identical completions (a
  ranked list is skipped whole: dropping one completion would change what its ranking says), no room
  left for a completion token, an empty prompt with no BOS token to put there instead (an empty prompt
  becomes ``[BOS]`` when the tokenizer has one, whether or not it adds one by default), and
  completions that become identical once truncated (their log-ratios would cancel: the row would teach
  nothing).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from jinja2 import TemplateError

from tiltlm.data.specials import (MODES, control_strings, encode_protected, found_controls, protect,
                                   segments_faithful)
from tiltlm.data.types import (DataError, DataSummary, Example, Messages, Pair, RankedList, Text, TokenizedExample,
                               TokenizedList, TokenizedPair, TokenizedUnpaired, Unpaired)

EMPTY = "empty completion"
IDENTICAL = "chosen identical to rejected"
NO_ROOM = "no completion token left"
EMPTY_PROMPT = "empty prompt (no BOS token to start from)"
IDENTICAL_AFTER_TRUNCATION = "identical after truncation"
DUPLICATE = "duplicate completions in a list"
DUPLICATE_AFTER_TRUNCATION = "duplicate completions in a list after truncation"


@dataclass(frozen=True)
class Rendered:
    """The texts to tokenise; ``chat`` when a chat template wrote them (and their special tokens)."""

    prompt: str
    completions: list[str]
    chat: bool
    protected: bool  # control strings of the user's text stand as private-use characters (split)
    quotes_control: tuple[str, ...]  # the control-token strings the user's text holds


def tokenize_pair(pair: Pair, tokenizer, max_length: int, max_prompt_length: int,
                  special_tokens: str = "keep") -> TokenizedPair | str:
    """One pair's :class:`TokenizedPair`, or the reason it is skipped."""
    kept, summary = tokenize_examples([pair], tokenizer, max_length, max_prompt_length, special_tokens)
    return kept[0] if kept else next(iter(summary.skipped))


def tokenize_examples(examples: list[Example], tokenizer, max_length: int, max_prompt_length: int,
                      special_tokens: str = "keep") -> tuple[list[TokenizedExample], DataSummary]:
    """Pairs, ranked lists and unpaired rows, tokenised in two tokenizer calls (all prompts, all
    completions); the survivors in order and a :class:`DataSummary` that counts each kind.
    ``special_tokens``: how control-token strings in the text of a file of pairs are read (only there:
    :mod:`tiltlm.data.specials`)."""
    if special_tokens not in MODES:
        raise ValueError(f"special_tokens_in_text = {special_tokens!r}: expected {' or '.join(MODES)}")
    if max_prompt_length < 1 or max_length < 2:
        raise ValueError(f"max_length = {max_length}, max_prompt_length = {max_prompt_length}: expected "
                         f"max_prompt_length >= 1 and max_length >= 2")
    pairs_only = all(isinstance(example, Pair) for example in examples)
    strings = control_strings(tokenizer) if pairs_only else []
    # the most characters one token can stand for: its longest vocabulary entry (byte-level entries spell
    # one character per byte, so they over-count multi-byte characters; safe)
    per_token = max(1, max(map(len, tokenizer.get_vocab())))
    results: list = [_prepare(e, tokenizer, strings, special_tokens, per_token, max_length, max_prompt_length)
                     for e in examples]
    rendered = [(index, texts) for index, texts in enumerate(results) if isinstance(texts, Rendered)]
    plain = [texts for _, texts in rendered if not texts.protected]
    prompts = iter(_encode(tokenizer, [texts.prompt for texts in plain]))
    completions = iter(_encode(tokenizer, [text for texts in plain for text in texts.completions]))
    bos = adds_bos(tokenizer)
    for index, texts in rendered:
        if texts.protected:  # one at a time: only pairs that quote control tokens, with split
            prompt, *ids = (encode_protected(tokenizer, t, strings) for t in (texts.prompt, *texts.completions))
        else:
            prompt, ids = next(prompts), [next(completions) for _ in texts.completions]
        eos, head = _eos(tokenizer), _head(tokenizer, bos, texts.chat, prompt)
        results[index] = EMPTY_PROMPT if head is None else fit(
            examples[index], head, prompt, [with_eos(c, eos) for c in ids], max_length, max_prompt_length)
    summary = summarize(results)
    if pairs_only:
        summary.control_text = sum(bool(texts.quotes_control) for _, texts in rendered)
        summary.control_found = sorted({s for _, texts in rendered for s in texts.quotes_control})
        summary.special_tokens = special_tokens
    return [r for r in results if not isinstance(r, str)], summary


tokenize_pairs = tokenize_examples  # a file of pairs: the same path, the same summary


def _prepare(example: Example, tokenizer, strings: list[str], special_tokens: str, per_token: int,
             max_length: int, max_prompt_length: int) -> Rendered | str:
    """An example's texts ready to encode (rendered, protected when split asks, cut to the budget: the
    prompt keeps its end, the completions their start), or why it is skipped."""
    reason = skip_reason(example)
    if reason is not None:
        return reason
    quotes = tuple(found_controls(example, strings)) if strings else ()
    protected = bool(quotes) and special_tokens == "split"
    if protected and not isinstance(example.prompt, str) and not segments_faithful(tokenizer, strings):
        raise DataError(f"{example.source}: the messages hold control tokens written as text ({', '.join(quotes)}), "
                        f"and with this tokenizer special_tokens_in_text=split cannot read them as text inside "
                        f"a chat template; use special_tokens_in_text=keep, or remove them from the data")
    kinds = {isinstance(text, str) for text in (example.prompt, *completion_texts(example))}
    if isinstance(example, Pair) and len(kinds) > 1:
        raise DataError(f"{example.source}: prompt, chosen and rejected must be all strings or all message lists")
    if protected:
        example = protect(example, strings)
    prompt, completions, chat = render_texts(example.prompt, completion_texts(example), tokenizer, example.source)
    prompt_chars, completion_chars = ((2 * limit + 16) * per_token for limit in (max_prompt_length, max_length))
    return Rendered(prompt[-prompt_chars:], [text[:completion_chars] for text in completions], chat, protected, quotes)


def skip_reason(example: Example) -> str | None:
    """Why an example is useless before tokenising it: an empty completion, or identical completions."""
    completions = completion_texts(example)
    if any(_is_empty(c) for c in completions):
        return EMPTY
    if _has_duplicates(completions):
        return IDENTICAL if isinstance(example, Pair) else DUPLICATE
    return None


def _is_empty(completion: Text) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    return all(not message["content"].strip() for message in completion)


def _has_duplicates(items: list) -> bool:
    return any(a == b for i, a in enumerate(items) for b in items[i + 1:])


def render_texts(prompt: Text, completions: list[Text], tokenizer, source: str) -> tuple[str, list[str], bool]:
    """``(prompt text, completion texts, chat)`` for a prompt and any number of completions: strings as
    they are, message lists through the chat template (see the module docstring)."""
    if isinstance(prompt, str):
        return prompt, list(completions), False
    prompt_text = _apply_template(tokenizer, prompt, True, source)
    return prompt_text, [completion_text(tokenizer, prompt, c, prompt_text, source) for c in completions], True


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
    before, eos, after = text.rpartition(tokenizer.eos_token) if tokenizer.eos_token else ("", "", text)
    return before + eos if eos and not after.strip() else text


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
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _eos(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token: completions must end with one; set tokenizer.eos_token")
    return eos


def _head(tokenizer, bos: bool, chat: bool, prompt: list[int]) -> list[int] | None:
    """BOS before a text prompt when the tokenizer's default encoding adds one (none after a chat template),
    and before an empty prompt: the first completion token is predicted from the token before it; with
    none, a batch would score it from padding or from another pair. BOS is the one token any text may
    follow. None when that BOS is needed and the tokenizer has none."""
    if (bos and not chat) or not prompt:
        return None if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return []


def with_eos(ids: list[int], eos: int) -> list[int]:
    """``ids`` ending with exactly one added EOS: appended unless already last."""
    return ids if ids[-1:] == [eos] else [*ids, eos]


def fit(example: Example, head: list[int], prompt: list[int], completions: list[list[int]], max_length: int,
        max_prompt_length: int) -> TokenizedExample | str:
    """The example's tokenised row, truncated to the limits (completions already end with EOS): ``head +
    prompt`` (``head``, e.g. BOS, is kept) down to ``max_prompt_length`` keeping the end of ``prompt``,
    then each completion keeping its start so that prompt + completion fits ``max_length``. A skip
    reason when nothing useful is left."""
    full_prompt, prompt_cut = fit_prompt(head, prompt, max_prompt_length)
    fitted = fit_completions(len(full_prompt), completions, max_length)
    if isinstance(fitted, str):
        return fitted
    cut, completion_cut = fitted
    truncated = prompt_cut or completion_cut
    if isinstance(example, Unpaired):
        return TokenizedUnpaired(full_prompt, cut[0], example.label, truncated, example.source, example.weight)
    if _has_duplicates(cut):
        if isinstance(example, RankedList):
            return DUPLICATE_AFTER_TRUNCATION
        return IDENTICAL_AFTER_TRUNCATION if completion_cut else IDENTICAL
    if isinstance(example, Pair):
        return TokenizedPair(full_prompt, *cut, truncated, example.source, example.weight)
    return TokenizedList(full_prompt, cut, example.ranking, example.scores, truncated, example.source,
                         example.weight)


def fit_completions(prompt_length: int, completions: list[list[int]],
                    max_length: int) -> tuple[list[list[int]], bool] | str:
    """Each completion cut, keeping its start, so that prompt + completion fits ``max_length``, and
    whether any was cut; :data:`NO_ROOM` when the prompt leaves no room."""
    room = max_length - prompt_length
    if room <= 0:
        return NO_ROOM
    return [c[:room] for c in completions], any(len(c) > room for c in completions)


def fit_prompt(head: list[int], prompt: list[int], max_prompt_length: int) -> tuple[list[int], bool]:
    """``head + prompt`` cut to ``max_prompt_length`` keeping ``head`` and the end of ``prompt``, and
    whether it was cut."""
    full_prompt = head + prompt
    if len(full_prompt) <= max_prompt_length:
        return full_prompt, False
    keep = max(max_prompt_length - len(head), 0)
    return head[:max_prompt_length] + prompt[len(prompt) - keep:], True


KIND_NAMES = {TokenizedPair: "pairs", TokenizedList: "ranked lists", TokenizedUnpaired: "unpaired"}


def summarize(results: list[TokenizedExample | str]) -> DataSummary:
    """Counts and lengths of a list of tokenisation results (kept rows and skip reasons). Kept rows are
    also counted by kind, unless all are pairs (then ``kinds`` stays empty and the summary reads as
    it always has)."""
    kept = [result for result in results if not isinstance(result, str)]
    kinds = dict(Counter(KIND_NAMES[type(result)] for result in kept))
    return DataSummary(rows=len(results), kept=len(kept),
                       skipped=dict(Counter(result for result in results if isinstance(result, str))),
                       truncated=sum(result.truncated for result in kept),
                       prompt_lengths=[len(result.prompt_ids) for result in kept],
                       completion_lengths=[len(ids) for result in kept for ids in completion_ids(result)],
                       kinds={} if set(kinds) <= {"pairs"} else kinds)


def completion_ids(result: TokenizedExample) -> list[list[int]]:
    """The completions of a tokenised row, in order (chosen then rejected for a pair)."""
    if isinstance(result, TokenizedPair):
        return [result.chosen_ids, result.rejected_ids]
    if isinstance(result, TokenizedList):
        return result.completions
    return [result.completion_ids]


def completion_texts(example: Example) -> list[Text]:
    """The completions of an example, in order (chosen then rejected for a pair)."""
    if isinstance(example, Pair):
        return [example.chosen, example.rejected]
    if isinstance(example, RankedList):
        return list(example.completions)
    return [example.completion]


def expand_ranking_to_pairs(ranked: TokenizedList) -> list[TokenizedPair]:
    """Every pair a ranked list implies (``--pairs all``): ``(a, b)`` for each two completions with
    ``a`` ranked strictly better than ``b``; tied completions make no pair. A strict ranking of K gives
    K (K - 1) / 2 pairs, best first. Each pair keeps the list's prompt, source and weight (a weight
    per pair, so a list of K counts as its K (K - 1) / 2 pairs in the step's mean)."""
    ranks = ranked.ranks()
    order = sorted(range(len(ranks)), key=lambda k: (ranks[k], k))
    return [TokenizedPair(ranked.prompt_ids, ranked.completions[a], ranked.completions[b], ranked.truncated,
                          ranked.source, ranked.weight)
            for i, a in enumerate(order) for b in order[i + 1:] if ranks[a] < ranks[b]]


def mismatched_unpaired(rows: list[TokenizedUnpaired], max_length: int) -> list[TokenizedUnpaired]:
    """The mismatched prompt/completion pairs KTO estimates its reference point from (Ethayarajh et al.
    2024, Section 4; see :func:`tiltlm.losses.kto_reference_point`): row ``i``'s prompt with row
    ``i + 1``'s completion (cyclically), the completion cut to fit ``max_length``. Their weights are 0:
    they are scored, never trained on."""
    if len(rows) < 2:
        raise ValueError(f"KTO's reference point needs at least 2 rows in a batch to mismatch, got {len(rows)}")
    mismatched = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]
        fitted = fit_completions(len(row.prompt_ids), [other.completion_ids], max_length)
        assert not isinstance(fitted, str), "a kept row's prompt always leaves room for a completion"
        (completion,), cut = fitted
        mismatched.append(TokenizedUnpaired(row.prompt_ids, completion, other.label, row.truncated or cut,
                                            f"{row.source} x {other.source}", weight=0.0))
    return mismatched
