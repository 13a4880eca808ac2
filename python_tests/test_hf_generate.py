"""AdaptiveCache + the "kvprec" attention, with every tier FP32 on FP32 models, generate the same tokens as
DynamicCache + the stock attention (SDPA; eager for Gemma 2) for every generate feature that touches the cache:
greedy, sampling, beam search, assisted decoding, prompt lookup, left-padded batches, chunked prefill,
output_attentions. block_size 8 so that prompts seal several blocks and crops cross block boundaries."""
from contextlib import nullcontext

import pytest
import torch
from transformers import DynamicCache

import kvprec

from conftest import FAMILIES

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")

NEW_TOKENS = 16


def run(model, inputs, kvprec_cache: bool, **kwargs):
    """generate with a fresh cache: AdaptiveCache(uniform fp32) under kvprec.enabled, or DynamicCache."""
    if kvprec_cache:
        cache, context = kvprec.AdaptiveCache(model.config, policy="uniform:fp32", block_size=8), kvprec.enabled(model)
    else:
        cache, context = DynamicCache(config=model.config), nullcontext()
    kwargs.setdefault("do_sample", False)
    with context:
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True,
                             output_logits=True, **kwargs)
    return out, cache


def assert_same_generation(ref, new):
    assert torch.equal(ref.sequences, new.sequences)
    # Same tokens could hide drifting logits; FP32 online softmax vs SDPA differ by rounding only (~1e-6 seen).
    for a, b in zip(ref.logits, new.logits):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", ["single", "padded"])
def test_greedy_matches_dynamic_cache(tiny_model, prompts, family, prompt):
    model = tiny_model(family)
    ref, _ = run(model, prompts[prompt], kvprec_cache=False)
    new, cache = run(model, prompts[prompt], kvprec_cache=True)
    assert_same_generation(ref, new)
    assert cache.get_seq_length() == prompts[prompt]["input_ids"].shape[1] + NEW_TOKENS - 1
    assert model.config._attn_implementation != "kvprec"  # enabled() restored it


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sampling_matches(tiny_model, prompts, family):
    model = tiny_model(family)
    outs = []
    for kvprec_cache in (False, True):
        torch.manual_seed(1234)
        outs.append(run(model, prompts["padded"], kvprec_cache, do_sample=True, top_k=20, temperature=0.9)[0])
    assert_same_generation(*outs)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_beam_search_matches(tiny_model, prompts, family):
    """num_beams=3: reorder_cache every step, batch_repeat_interleave at the start."""
    model = tiny_model(family)
    ref, _ = run(model, prompts["single"], False, num_beams=3, num_return_sequences=2)
    new, _ = run(model, prompts["single"], True, num_beams=3, num_return_sequences=2)
    assert torch.equal(ref.sequences, new.sequences)


def test_assisted_decoding_matches(tiny_model, prompts):
    """A tiny 1-layer assistant proposes tokens; the main model verifies them with q > 1 on a non-empty cache and
    crops the rejected ones (crop(-n) and crop(0))."""
    model, assistant = tiny_model("llama"), tiny_model("llama", seed=5, layers=1)
    ref, _ = run(model, prompts["single"], False, assistant_model=assistant)
    new, _ = run(model, prompts["single"], True, assistant_model=assistant)
    assert_same_generation(ref, new)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_prompt_lookup_matches(tiny_model, prompts, family):
    """A repetitive prompt makes prompt lookup propose multi-token candidates: q > 1 verify plus crop."""
    model = tiny_model(family)
    ids = prompts["single"]["input_ids"][:, :9].repeat(1, 3)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ref, _ = run(model, inputs, False, prompt_lookup_num_tokens=3)
    new, _ = run(model, inputs, True, prompt_lookup_num_tokens=3)
    assert_same_generation(ref, new)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_chunked_prefill_matches(tiny_model, prompts, family):
    """prefill_chunk_size=6: q > 1 forwards on a non-empty cache, chunks not aligned with the 8-token blocks."""
    model = tiny_model(family)
    ref, _ = run(model, prompts["padded"], False)
    new, _ = run(model, prompts["padded"], True, prefill_chunk_size=6)
    assert_same_generation(ref, new)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_output_attentions_match_eager(tiny_model, prompts, family):
    """Weights come from a dense pass over the gathered cache, only when asked; GPT-2 pops the flag before the
    attention call, so the function reads transformers' output collector."""
    model = tiny_model(family)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ref, _ = run(model, prompts["padded"], False, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    new, _ = run(model, prompts["padded"], True, output_attentions=True)
    assert_same_generation(ref, new)
    assert len(new.attentions) == len(ref.attentions) == NEW_TOKENS
    pad = prompts["padded"]["attention_mask"] == 0
    for step, (step_ref, step_new) in enumerate(zip(ref.attentions, new.attentions)):
        for a, b in zip(step_ref, step_new):
            assert b is not None and a.shape[:-1] == b.shape[:-1]
            if b.shape[-1] > a.shape[-1]:
                # DynamicCache keeps only the window of a sliding layer; kvprec's weights span every position (the
                # evicted ones read as zeros), and the ones outside the window get exactly zero weight.
                assert torch.all(b[..., :-a.shape[-1]] == 0)
                b = b[..., -a.shape[-1]:]
            if step == 0:
                # Pad queries may attend to nothing: kvprec gives them zero weights (as SDPA gives zero output),
                # eager spreads them uniformly over its additive -inf-like mask. Neither is used downstream.
                query_is_pad = pad[:, None, :, None].expand_as(a)
                assert torch.all(b[query_is_pad] == 0)
                a, b = a[~query_is_pad], b[~query_is_pad]
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_kvprec_attention_with_a_dynamic_cache(tiny_model, prompts, family):
    """Under kvprec.enabled, a DynamicCache (tensors) takes the fallback: SDPA, or the dense pass for Gemma 2's
    softcap, which SDPA refuses; same tokens as the stock implementation."""
    model = tiny_model(family)
    ref, _ = run(model, prompts["padded"], kvprec_cache=False)
    with kvprec.enabled(model):
        new, _ = run(model, prompts["padded"], kvprec_cache=False)
    assert_same_generation(ref, new)
