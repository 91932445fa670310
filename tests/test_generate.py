"""Sampling and scoring (tiltlm.generate) on a tiny random Llama with a word-level tokenizer built offline."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tiltlm.data.types import DataError
from tiltlm.cli import main
from tiltlm.generate import Sample, cut_at_stop, encode_prompt, load_policy, read_prompts, sample, score_logps
from tiltlm.models import load_model, tiny_llama

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = "the movie was great bad fine and i loved hated it a film plot actors".split()
VOCAB = 64  # above 50, so a forgotten top-k 50 default would change what is sampled
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PAD, BOS, EOS = 0, 1, 2


def tiny_tokenizer(pad_is_eos: bool = False, chat_template: bool = True):
    """A word-level tokenizer: ids 0-5 special, then WORDS, then filler words w0.. up to VOCAB; it
    prepends <s> to plain text, like Llama tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIALS + WORDS + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(WORDS))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>" if pad_is_eos else "<pad>", additional_special_tokens=["<|user|>", "<|assistant|>"],
        model_input_names=["input_ids", "attention_mask"],
    )
    if chat_template:
        tokenizer.chat_template = TEMPLATE
    return tokenizer


def word_ids(text: str) -> list[int]:
    """Ids by hand from the vocabulary layout, independent of the tokenizer."""
    tokens = SPECIALS + WORDS
    return [tokens.index(word) for word in text.split()]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, seed=0).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


PROMPTS = ["the movie was", "i loved it and the plot was great and", [{"role": "user", "content": "a film"}]]


def naive_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """One unpadded sequence, full logits, log-softmax, gather, sum over completion positions."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    start = len(prompt_ids)
    return sum(logps[start + k - 1, token].item() for k, token in enumerate(completion_ids))


# ------------------------------------------------------------------------------------------ prompts


def test_plain_prompt_gets_bos_and_chat_prompt_gets_the_template(tokenizer):
    assert encode_prompt(tokenizer, "the movie was") == [BOS] + word_ids("the movie was")
    rendered = word_ids("<|user|> a film </s> <|assistant|>")
    assert encode_prompt(tokenizer, [{"role": "user", "content": "a film"}]) == rendered
    assert encode_prompt(tokenizer, "a film", chat=True) == rendered


def test_chat_prompt_without_template_is_a_clear_error():
    with pytest.raises(DataError, match="chat template"):
        encode_prompt(tiny_tokenizer(chat_template=False), [{"role": "user", "content": "a film"}])


def test_read_prompts_accepts_strings_messages_and_pairs(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "the movie"}, {"prompt": [{"role": "user", "content": "hi"}]},
            {"prompt": "a film", "chosen": "great", "rejected": "bad"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_prompts(path) == ["the movie", [{"role": "user", "content": "hi"}], "a film"]


def test_read_prompts_names_the_line_of_a_bad_row(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2.*'prompt'"):
        read_prompts(path)


# ----------------------------------------------------------------------------------------- sampling


def test_same_seed_same_samples_other_seed_other_samples(model, tokenizer):
    first = sample(model, tokenizer, PROMPTS, n=2, max_new_tokens=8, seed=3, batch_size=4)
    again = sample(model, tokenizer, PROMPTS, n=2, max_new_tokens=8, seed=3, batch_size=4)
    other = sample(model, tokenizer, PROMPTS, n=2, max_new_tokens=8, seed=4, batch_size=4)
    assert [s.completion_ids for s in first] == [s.completion_ids for s in again]
    assert [s.completion_ids for s in first] != [s.completion_ids for s in other]
    assert [(s.index, s.sample) for s in first] == [(i, k) for i in range(3) for k in range(2)]


def test_sampling_draws_from_the_model_itself(model, tokenizer):
    """Ancestral sampling by hand (full forward each step, softmax, torch.multinomial) with the same
    RNG state draws the same tokens: nothing (top-k, penalties) reshapes the distribution."""
    got = sample(model, tokenizer, ["the movie was"], n=1, max_new_tokens=10, seed=11, batch_size=1)[0]
    torch.manual_seed(11)
    ids = [BOS] + word_ids("the movie was")
    drawn = []
    with torch.no_grad():
        for _ in range(10):
            probs = torch.softmax(model(torch.tensor([ids + drawn])).logits[0, -1], dim=-1)
            drawn.append(torch.multinomial(probs[None], 1).item())
            if drawn[-1] == EOS:
                break
    assert got.completion_ids == drawn


def test_eos_ends_completions_and_nothing_follows(model):
    for tokenizer in (tiny_tokenizer(), tiny_tokenizer(pad_is_eos=True)):
        samples = sample(model, tokenizer, ["the movie was", "i loved it"], n=16, max_new_tokens=24,
                         seed=0, batch_size=8)
        finished = [s for s in samples if s.finished]
        assert finished and len(finished) < len(samples)  # both kinds occur at this EOS rate
        for s in samples:
            body = s.completion_ids[:-1] if s.finished else s.completion_ids
            assert EOS not in body
            assert s.finished == (s.completion_ids[-1] == EOS)
            if not s.finished:
                assert len(s.completion_ids) == 24


def test_cut_at_stop_keeps_the_stop_token_and_drops_padding():
    assert cut_at_stop([5, 9, 2, 0, 0], [2]) == ([5, 9, 2], True)
    assert cut_at_stop([5, 2, 2, 2], [2]) == ([5, 2], True)
    assert cut_at_stop([5, 9, 7], [2, 3]) == ([5, 9, 7], False)
    assert cut_at_stop([3, 5], [2, 3]) == ([3], True)


def test_left_padded_batches_decode_like_single_prompts(model, tokenizer):
    """Greedy decoding is deterministic, so a wrong mask or wrong positions for the padded rows of a
    batch would show up as different completions."""
    prompts = ["the", "i loved it and the plot was great and the actors", "a film was"]
    alone = sample(model, tokenizer, prompts, max_new_tokens=12, temperature=0, batch_size=1)
    batched = sample(model, tokenizer, prompts, max_new_tokens=12, temperature=0, batch_size=3)
    assert [s.completion_ids for s in batched] == [s.completion_ids for s in alone]


# ------------------------------------------------------------------------------------------ scoring


def test_score_logps_equals_a_naive_forward(model, tokenizer):
    samples = sample(model, tokenizer, PROMPTS, n=2, max_new_tokens=12, seed=1, batch_size=6)
    scored = score_logps(model, tokenizer, samples, batch_size=4)
    expected = [naive_logp(model, s.prompt_ids, s.completion_ids) for s in samples]
    assert scored == pytest.approx(expected, abs=1e-4)


def test_score_logps_equals_the_sum_of_generate_step_log_probs(model, tokenizer):
    prompt_ids = [BOS] + word_ids("the movie was")
    torch.manual_seed(5)
    out = model.generate(torch.tensor([prompt_ids]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=20, eos_token_id=EOS, pad_token_id=PAD, output_scores=True,
                         return_dict_in_generate=True)
    new = out.sequences[0, len(prompt_ids):].tolist()
    kept = new[:new.index(EOS) + 1] if EOS in new else new
    step_logps = [torch.log_softmax(out.scores[t][0].double(), -1)[token].item() for t, token in enumerate(kept)]
    scored = score_logps(model, tokenizer, [Sample("the movie was", "", prompt_ids, kept)])
    assert scored[0] == pytest.approx(sum(step_logps), abs=1e-4)


def test_score_logps_does_not_depend_on_batching(model, tokenizer):
    samples = sample(model, tokenizer, PROMPTS, n=3, max_new_tokens=10, seed=2, batch_size=9)
    one = score_logps(model, tokenizer, samples, batch_size=1)
    many = score_logps(model, tokenizer, samples, batch_size=9)
    assert many == pytest.approx(one, abs=1e-4)


def test_an_empty_completion_scores_zero_and_a_missing_prompt_is_an_error(model, tokenizer):
    prompt_ids = [BOS] + word_ids("the movie was")
    full = Sample("the movie was", "", prompt_ids, word_ids("great"))
    scored = score_logps(model, tokenizer, [Sample("the movie was", "", prompt_ids, []), full])
    assert scored[0] == 0.0  # the empty sum
    assert scored[1] == pytest.approx(naive_logp(model, prompt_ids, word_ids("great")), abs=1e-4)
    with pytest.raises(ValueError, match="no prompt tokens"):
        score_logps(model, tokenizer, [Sample("", "", [], word_ids("great"))])


# ------------------------------------------------------------------------------- models and the CLI


def save_tiny(directory, seed: int = 0):
    tiny_llama(vocab_size=VOCAB, seed=seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def test_lora_adapter_directory_loads_base_plus_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = save_tiny(tmp_path / "base")
    base = load_model(str(base_dir))  # loaded from disk, so peft records where the base lives
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero (a no-op adapter): give it weights
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded, tokenizer = load_policy(str(tmp_path / "adapter"))  # finds the base in adapter_config.json
    ids = torch.tensor([[BOS] + word_ids("the movie was great")])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        base_logits = tiny_llama(vocab_size=VOCAB, seed=0).eval()(ids).logits
        got = loaded(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter did something
    assert tokenizer.eos_token == "</s>"


def test_cli_writes_rows_with_log_probs_and_refuses_to_overwrite(tmp_path, capsys):
    policy = save_tiny(tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the movie was"}\n{"prompt": "i loved it"}\n')
    output = tmp_path / "out.jsonl"
    argv = ["--model", str(policy), "--prompts", str(prompts), "--output", str(output), "--ref", str(policy),
            "--samples", "2", "--max-new-tokens", "6", "--no-progress"]
    assert main(["generate", *argv]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("the movie was", 0), ("the movie was", 1),
                                                           ("i loved it", 0), ("i loved it", 1)]
    # the same draws through the API (same seed and batch size), scored by hand
    model, tokenizer = tiny_llama(vocab_size=VOCAB, seed=0).eval(), tiny_tokenizer()
    samples = sample(model, tokenizer, ["the movie was", "i loved it"], n=2, max_new_tokens=6, seed=0, batch_size=8)
    for row, s in zip(rows, samples):
        assert (row["completion"], row["completion_tokens"], row["finished"]) == (
            s.completion, len(s.completion_ids), s.finished)
        assert row["logp_policy"] == pytest.approx(naive_logp(model, s.prompt_ids, s.completion_ids), abs=1e-4)
        assert row["logp_ref"] == pytest.approx(row["logp_policy"], abs=1e-5)  # the same model
    kl = re.search(r"KL\(policy \|\| ref\) estimate: (\S+) nats", capsys.readouterr().out)
    assert kl and abs(float(kl.group(1))) < 1e-4

    before = output.read_text()
    assert main(["generate", *argv]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert output.read_text() == before


@pytest.mark.slow
def test_smollm2_chat_sampling_stops_at_end_of_turn_and_scores_like_a_naive_forward():
    model, tokenizer = load_policy("smollm2-135m")
    prompt = [{"role": "user", "content": "Say hello."}]
    samples = sample(model, tokenizer, [prompt, "The weather today is"], n=1, max_new_tokens=12, seed=0, batch_size=2)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for s in samples:
        assert end_of_turn not in s.completion_ids[:-1]
        assert s.finished == (s.completion_ids[-1] == end_of_turn)
    scored = score_logps(model, tokenizer, samples, batch_size=2)
    assert scored == pytest.approx([naive_logp(model, s.prompt_ids, s.completion_ids) for s in samples], abs=2e-3)
