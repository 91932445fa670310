"""Attention from segment metadata (tiltlm.attention) equals scoring each sequence alone, in every family.

The expectation is always the textbook one: each completion scored alone after its prompt, unpadded,
through transformers' own eager attention (``naive_sequence_logps`` on one sequence at a time). The
tiny models are built from configs (no download) and cover learned absolute positions and tied
embeddings (GPT-2, OPT), rotary with grouped-query attention (Llama), sliding windows smaller than the
sequences (Mistral; Qwen2 with full and sliding layers), logit softcapping with alternating windows
(Gemma-2), parallel attention/MLP blocks with partial rotary (GPT-NeoX, Phi), and a family that does not pass
attention keywords down (Falcon), which must fall back to a dense mask.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import transformers
from torch.nn.attention.flex_attention import flex_attention

from tiltlm import attention
from tiltlm.data.collate import (PromptCompletions, collate_concatenated, collate_prompt_completions,
                                 collate_shared, segment_mask)
from tiltlm.data.types import TokenizedPair
from tiltlm.logprobs import naive_sequence_logps, sequence_logps
from model_builders import random_pairs  # noqa: E402 (tests/ is on sys.path)
from tiltlm.models import ModelError, choose_attention, disable_dropout, set_attention

VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "llama-gqa": lambda: transformers.LlamaConfig(**SMALL),
    "mistral-window": lambda: transformers.MistralConfig(**SMALL, sliding_window=5),
    "qwen2-mixed-window": lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=True,
                                                           sliding_window=5, max_window_layers=1),
    "gemma2-softcap": lambda: transformers.Gemma2Config(**SMALL, head_dim=8, sliding_window=5, query_pre_attn_scalar=8,
                                                        attn_logit_softcapping=2.0, final_logit_softcapping=5.0),
    "neox-parallel": lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
                                                        use_parallel_residual=True, max_position_embeddings=128),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32),
    "phi-parallel": lambda: transformers.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   max_position_embeddings=128),
    "falcon-no-backend": lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=4, alibi=False),
}
# what each family runs on CPU and on GPU when nothing is asked (kernel fallback from declarations)
EXPECTED_KERNELS = {
    "gpt2": ("blocks", "flex"), "llama-gqa": ("blocks", "flex"), "mistral-window": ("blocks", "flex"),
    "qwen2-mixed-window": ("blocks", "flex"), "gemma2-softcap": ("eager", "flex"),
    "neox-parallel": ("blocks", "flex"), "opt": ("blocks", "flex"), "phi-parallel": ("blocks", "flex"),
    "falcon-no-backend": ("sdpa", "sdpa"),
}


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())
    disable_dropout(model)
    with torch.no_grad():  # visible attention: random tiny weights otherwise give near-uniform softmax
        for name, p in model.named_parameters():
            if any(part in name for part in ("q_proj", "k_proj", "c_attn", "query_key_value")) and p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def one_at_a_time(model, pairs: list[TokenizedPair]) -> torch.Tensor:
    """Each sequence alone (a batch of one pair whose two completions are the same sequence), eager
    attention: summed log-probs, chosen of every pair then rejected, with autograd."""
    set_attention(model, "eager")
    values = []
    for completion_of in (lambda p: p.chosen_ids, lambda p: p.rejected_ids):
        for pair in pairs:
            alone = TokenizedPair(pair.prompt_ids, completion_of(pair), completion_of(pair))
            values.append(naive_sequence_logps(model, collate_concatenated([alone], pad_id=0))[0][0])
    return torch.stack(values)


def values_and_grads(model, compute) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logps = compute()
    weights = torch.linspace(-1.0, 2.0, logps.numel())  # a loss that weighs every sequence differently
    (logps * weights).sum().backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return logps.detach(), grads


def assert_close_to_scale(actual, expected, what, scale: float | None = None):
    """Close relative to ``scale`` (default: the expectation's largest magnitude), so that entries that
    are nearly zero are judged against the size of what they are part of."""
    scale = max(expected.abs().max().item() if scale is None else scale, 1e-12)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def layouts(pairs):
    return {"concatenated": collate_concatenated(pairs, pad_id=0),
            "shared": collate_shared(pairs, pad_id=0),
            "packed": collate_shared(pairs, pad_id=0, row_tokens=60)}


@pytest.mark.parametrize("dense_advantage", [0.0, attention.DENSE_ADVANTAGE])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_layout_equals_each_sequence_alone(family, dense_advantage, monkeypatch):
    """With the block kernel on every batch (dense advantage 0), and as it runs by default (these short
    rows then go to SDPA with the dense mask)."""
    monkeypatch.setattr(attention, "DENSE_ADVANTAGE", dense_advantage)
    model, pairs = tiny(family), random_pairs(6, seed=1)
    expected, expected_grads = values_and_grads(model, lambda: one_at_a_time(model, pairs))
    kernel = choose_attention(model, "auto", "cpu")
    assert kernel == EXPECTED_KERNELS[family][0]
    set_attention(model, kernel)
    for layout, batch in layouts(pairs).items():
        got, grads = values_and_grads(model, lambda: sequence_logps(model, batch, chunk_size=7)[0])
        assert_close_to_scale(got, expected, f"{family} {layout} ({kernel}) log-probs")
        # a gradient that is zero in exact arithmetic (a key bias: softmax ignores a constant) is
        # rounding noise, judged against the gradient's overall size
        overall = max(e.abs().max().item() for e in expected_grads)
        for (name, _), g, e in zip(model.named_parameters(), grads, expected_grads):
            assert_close_to_scale(g, e, f"{family} {layout} ({kernel}) gradient of {name}",
                                  max(e.abs().max().item(), 1e-3 * overall))


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-mixed-window", "gemma2-softcap"])
@pytest.mark.parametrize("kernel", ["flex", "sdpa", "eager"])
def test_forced_kernels_equal_each_sequence_alone(family, kernel, monkeypatch):
    """The fallbacks, and the GPU kernel run on CPU without compiling it (FlexAttention's reference
    implementation), through the whole model: padding to whole tiles, windows per layer, softcapping."""
    monkeypatch.setattr(attention, "compiled_flex", lambda: flex_attention)
    model, pairs = tiny(family, seed=2), random_pairs(5, seed=2)
    if attention.unsupported(model, kernel):
        with pytest.raises(ModelError):
            choose_attention(model, kernel)
        return
    with torch.no_grad():
        expected = one_at_a_time(model, pairs)
        set_attention(model, choose_attention(model, kernel))
        for layout, batch in layouts(pairs).items():
            got, _ = sequence_logps(model, batch)
            assert_close_to_scale(got, expected, f"{family} {layout} ({kernel})")


def test_kernel_choice_per_family():
    for family, (cpu, gpu) in EXPECTED_KERNELS.items():
        model = tiny(family)
        assert (choose_attention(model, "auto", "cpu"), choose_attention(model, "auto", "cuda")) == (cpu, gpu), family
    with pytest.raises(ModelError, match="softcaps"):
        choose_attention(tiny("gemma2-softcap"), "blocks")
    with pytest.raises(ModelError, match="expected one of"):
        choose_attention(tiny("gpt2"), "flash")


def test_attention_sinks_fall_back():
    config = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                       num_experts_per_tok=1, sliding_window=4)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert "sinks" in attention.unsupported(model, "blocks") and "sinks" in attention.unsupported(model, "flex")
    assert choose_attention(model, "auto", "cpu") == choose_attention(model, "auto", "cuda") == "eager"


def test_blocks_pay_off_on_long_packed_rows_only(monkeypatch):
    """Rows of one short pair each: SDPA over the row is cheaper (few masked scores); 4096-token rows of
    many pairs: the blocks are (the dense product is ~20x what is needed)."""
    long_rows = _packed_segments(rows_tokens=4096)
    assert attention.blocks_pay_off(long_rows)
    short_rows = attention.segments_of(collate_shared(random_pairs(6), pad_id=0))[2]
    assert not attention.blocks_pay_off(short_rows)
    seen = []
    monkeypatch.setattr(attention, "log_layout", lambda kernel, batch: seen.append(kernel))
    model = tiny("llama-gqa")
    set_attention(model, "blocks")
    with torch.no_grad():
        sequence_logps(model, collate_shared(random_pairs(6), pad_id=0))
    assert seen == ["blocks-dense"]


def test_k_completions_see_their_prompt_and_themselves_only(monkeypatch):
    """A prompt with three completions: each scores as if alone after its prompt, with the sequence ids
    the caller gave, and the metadata says which part each token is."""
    model, rng = tiny("llama-gqa", seed=3), random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (4, 7)]
    completions = [[[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths] for lengths in ((3, 5, 2), (6, 1, 4))]
    examples = [PromptCompletions(prompts[0], completions[0], [4, 0, 2]),
                PromptCompletions(prompts[1], completions[1], [1, 5, 3])]
    batch = collate_prompt_completions(examples, pad_id=0, row_tokens=64)
    assert batch.input_ids.shape[0] == 1 and batch.sequences == 6
    monkeypatch.setattr(attention, "DENSE_ADVANTAGE", 0.0)  # the block kernel even on this short row
    assert batch.part_ids[0, :14].tolist() == [0] * 4 + [1] * 3 + [2] * 5 + [3] * 2
    with torch.no_grad():
        expected = torch.zeros(6)
        for example, comps in zip(examples, completions):
            for sequence, completion in zip(example.sequence_ids, comps):
                alone = TokenizedPair(example.prompt_ids, completion, completion)
                expected[sequence] = naive_sequence_logps(model, collate_concatenated([alone], 0))[0][0]
        set_attention(model, "blocks")
        got, counts = sequence_logps(model, batch)
    assert counts.tolist() == [5, 6, 2, 4, 3, 1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_boolean_mask_reaches_a_kernel_that_adds_it(monkeypatch):
    """What SDPA and eager attention receive: no mask (blocks without one) or 0/-inf floats on CPU."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy_sdpa(*args, attn_mask=None, **kwargs):
        seen.append(("sdpa", None if attn_mask is None else attn_mask.dtype))
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    import transformers.models.gemma2.modeling_gemma2 as gemma2
    eager = gemma2.eager_attention_forward

    def spy_eager(module, query, key, value, attention_mask, **kwargs):
        seen.append(("eager", None if attention_mask is None else attention_mask.dtype))
        return eager(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(attention, "DENSE_ADVANTAGE", 0.0)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(gemma2, "eager_attention_forward", spy_eager)
    batch = collate_shared(random_pairs(4), pad_id=0, row_tokens=60)
    with torch.no_grad():
        for family, kernel in (("llama-gqa", "blocks"), ("llama-gqa", "sdpa"), ("gemma2-softcap", "eager")):
            model = tiny(family)
            set_attention(model, kernel)
            sequence_logps(model, batch)
    assert seen and all(dtype in (None, torch.float32) for _, dtype in seen), seen
    assert {kind for kind, _ in seen} == {"sdpa", "eager"}
    # on a GPU SDPA takes the boolean mask as "may attend" (no conversion per layer); eager never does
    on_device, config = batch.to(torch.device("meta")), tiny("llama-gqa").config
    assert attention.dense_attention_mask(on_device, config, "sdpa", torch.float32).dtype == torch.bool
    assert attention.dense_attention_mask(on_device, config, "eager", torch.float32).dtype == torch.float32


class _Causal(torch.nn.Module):
    is_causal = True


def _random_qkv(segments: attention.Segments, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    rows, length = segments.segment_ids.shape
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(rows, h, length, dim, generator=generator) for h in (heads, kv_heads, kv_heads)]


def _packed_segments(rows_tokens: int = 300) -> attention.Segments:
    batch = collate_prompt_completions(
        [PromptCompletions(p.prompt_ids * 3, [p.chosen_ids * 3, p.rejected_ids * 3], [i, 20 + i])
         for i, p in enumerate(random_pairs(20, seed=7))], pad_id=0, row_tokens=rows_tokens)
    return attention.segments_of(batch, attention.FLEX_MULTIPLE)[2]


def test_flex_block_mask_equals_dense_mask_and_skips_masked_tiles(monkeypatch):
    """FlexAttention under the block mask (its uncompiled reference implementation) gives SDPA's output
    under the dense mask, with a sliding window too; and the tiles it computes are exactly those where
    the dense mask has a visible entry."""
    monkeypatch.setattr(attention, "compiled_flex", lambda: flex_attention)
    segments = _packed_segments()
    q, k, v = _random_qkv(segments)
    for window in (None, 7):
        got, _ = attention.flex_segment_attention(_Causal(), q, k, v, None, scaling=0.3, sliding_window=window,
                                                  tiltlm_segments=segments)
        dense = segment_mask(segments.segment_ids, segments.part_ids, segments.position_ids, window)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.3,
                                                                    enable_gqa=True)
        torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)
        block_mask = segments.derived[("flex", window)]
        tile = attention.FLEX_MULTIPLE
        rows, _, length, _ = dense.shape
        needed = dense.view(rows, length // tile, tile, length // tile, tile).any(dim=(2, 4)).sum()
        computed = block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()
        assert computed == needed < rows * (length // tile) ** 2


def test_flex_softcap_equals_softcapped_scores(monkeypatch):
    """Gemma-2's softcapping as a score_mod: scores * scale -> cap * tanh(. / cap), masked, softmaxed."""
    monkeypatch.setattr(attention, "compiled_flex", lambda: flex_attention)
    segments = _packed_segments()
    q, k, v = _random_qkv(segments)
    got, _ = attention.flex_segment_attention(_Causal(), q, k, v, None, scaling=0.5, softcap=1.5,
                                              tiltlm_segments=segments)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.5
    scores = 1.5 * torch.tanh(scores / 1.5)
    scores = scores.masked_fill(~segment_mask(segments.segment_ids, segments.part_ids), float("-inf"))
    expected = torch.softmax(scores, -1) @ v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_compiled_flex_equals_dense_mask():
    """The compiled kernel (what runs on GPU) on CPU, where a C++ compiler is available."""
    segments = _packed_segments(rows_tokens=200)
    q, k, v = _random_qkv(segments)
    try:
        got, _ = attention.flex_segment_attention(_Causal(), q, k, v, None, scaling=0.3, tiltlm_segments=segments)
    except Exception as error:  # inductor needs a working C++ toolchain on CPU
        pytest.skip(f"torch.compile of FlexAttention does not work here: {type(error).__name__}: {error}"[:300])
    dense = segment_mask(segments.segment_ids, segments.part_ids)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_config_names_the_attention_option():
    from tiltlm.config import ConfigError, TrainConfig, validate

    validate(TrainConfig(data="x.jsonl", attention="blocks"))
    with pytest.raises(ConfigError, match="attention = 'flash'"):
        validate(TrainConfig(data="x.jsonl", attention="flash"))


def test_gpu_smoke_script_passes_on_cpu(capsys):
    """benchmarks/gpu_smoke.py --cpu: the block kernel without fallback, step-0 loss log 2, layouts equal."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert smoke.main(["--cpu", "--steps", "2", "--pairs", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("kernel blocks") == 3 and out.strip().endswith("ok")
    # and the check itself catches a layout that disagrees
    results = [{"layout": "a", "kernel": "blocks", "losses": [math.log(2), 0.5]},
               {"layout": "b", "kernel": "sdpa", "losses": [math.log(2), 0.6]}]
    assert len(smoke.check(results, "blocks", 1e-4)) == 2


def test_gradient_checkpointing_keeps_the_metadata(monkeypatch):
    """Recomputed blocks get the metadata again (it travels as a keyword the checkpoint keeps)."""
    monkeypatch.setattr(attention, "DENSE_ADVANTAGE", 0.0)
    model, pairs = tiny("llama-gqa", seed=4), random_pairs(5, seed=4)
    batch = collate_shared(pairs, pad_id=0, row_tokens=60)
    set_attention(model, "blocks")
    model.train()
    expected, expected_grads = values_and_grads(model, lambda: sequence_logps(model, batch)[0])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got, grads = values_and_grads(model, lambda: sequence_logps(model, batch)[0])
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_load_model_loads_families_without_sdpa_and_picks_their_kernel(tmp_path):
    """Gemma-2 declares no SDPA support: it used to fail to load (attn_implementation="sdpa" was forced)."""
    from tiltlm.attention import kernel_of
    from tiltlm.models import load_model

    for family, kernel in (("gemma2-softcap", "eager"), ("falcon-no-backend", "sdpa"), ("llama-gqa", "blocks")):
        tiny(family).save_pretrained(tmp_path / family)
        assert kernel_of(load_model(str(tmp_path / family)).config) == kernel, family
    assert kernel_of(load_model(str(tmp_path / "gemma2-softcap"), device="cuda").config) == "flex"
    with pytest.raises(ModelError, match="softcaps"):
        load_model(str(tmp_path / "gemma2-softcap"), attention="blocks")
