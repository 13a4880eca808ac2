"""Conformance with transformers' own cache: every generate mode that touches the cache, on five families (Llama,
Qwen2, Mistral, Gemma 2, GPT-2), gives the same result with AdaptiveCache (every tier FP32, blocks of 4 positions, so
a short test sequence seals pages and crops cross blocks) under kvprec.enabled as with DynamicCache and the stock
attention (SDPA; eager for Gemma 2, whose softcap SDPA refuses): the same tokens, the same scores (within FP32
rounding: online softmax over blocks against one SDPA call, ~1e-6 seen), and the same ``.keys`` / ``.values``
shapes in every layer of the cache generate returns (sliding layers hold the last window - 1 positions in both).

Modes: greedy, sampling with a fixed seed, beam search, beam sampling, assisted decoding with an assistant model,
prompt lookup, continue from a cache, left-padded batch, inputs_embeds; each asks for return_dict_in_generate with
output_scores and past_key_values. The tiny models (conftest.py: 2 layers, hidden 128, head_dim 32, windows of 12)
are random and seeded; 21-token prompts and 7 new tokens keep the whole module near a minute on a busy 2-core CPU.
"""
from contextlib import nullcontext

import pytest
import torch
from transformers import DynamicCache

import kvprec

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")

FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "gpt2")
NEW_TOKENS = 7
MODES = ("greedy", "sample", "beam", "beam_sample", "assisted", "prompt_lookup", "continue", "left_padding",
         "inputs_embeds")


def make_cache(model, adaptive: bool):
    if adaptive:
        return kvprec.AdaptiveCache(model.config, policy="uniform:fp32", block_size=4)
    return DynamicCache(config=model.config)


def generate(model, cache, seed: int = 0, **kwargs):
    """generate with ``cache`` (under kvprec.enabled for an AdaptiveCache), scores and the cache returned."""
    torch.manual_seed(seed)
    adaptive = isinstance(cache, kvprec.AdaptiveCache)
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    with kvprec.enabled(model) if adaptive else nullcontext():
        return model.generate(past_key_values=cache, return_dict_in_generate=True, output_scores=True, **kwargs)


def run_mode(mode: str, model, assistant, prompts, adaptive: bool):
    """(output of the last generate call, the cache) for ``mode``."""
    single, padded = prompts["single"], prompts["padded"]
    cache = make_cache(model, adaptive)
    if mode == "greedy":
        return generate(model, cache, **single), cache
    if mode == "sample":
        return generate(model, cache, seed=1234, do_sample=True, top_k=20, temperature=0.9, **padded), cache
    if mode == "beam":
        return generate(model, cache, num_beams=3, num_return_sequences=2, **single), cache
    if mode == "beam_sample":
        return generate(model, cache, seed=7, num_beams=2, do_sample=True, top_k=20, **single), cache
    if mode == "assisted":  # the assistant keeps its own DynamicCache; the main model verifies q > 1, then crops
        return generate(model, cache, assistant_model=assistant, **single), cache
    if mode == "prompt_lookup":  # a repetitive prompt makes multi-token candidates: q > 1 verify, crop(-n)
        ids = single["input_ids"][:, :9].repeat(1, 3)
        return generate(model, cache, prompt_lookup_num_tokens=3, input_ids=ids, attention_mask=torch.ones_like(ids)), \
            cache
    if mode == "continue":  # a second generate resumes from the cache the first one filled
        first = generate(model, cache, **single)
        ids = first.sequences
        return generate(model, cache, input_ids=ids, attention_mask=torch.ones_like(ids)), cache
    if mode == "left_padding":
        return generate(model, cache, **padded), cache
    if mode == "inputs_embeds":
        embeds = model.get_input_embeddings()(padded["input_ids"]).detach()
        return generate(model, cache, inputs_embeds=embeds, attention_mask=padded["attention_mask"]), cache
    raise AssertionError(mode)


def shapes(cache):
    return [(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_dynamic_cache(tiny_model, prompts, family, mode):
    model = tiny_model(family)
    assistant = tiny_model(family, seed=5, layers=1) if mode == "assisted" else None
    ref, ref_cache = run_mode(mode, model, assistant, prompts, adaptive=False)
    new, cache = run_mode(mode, model, assistant, prompts, adaptive=True)

    assert torch.equal(new.sequences, ref.sequences)
    assert len(new.scores) == len(ref.scores) > 0
    for a, b in zip(ref.scores, new.scores):
        finite = torch.isfinite(a)  # top-k and beam processors put -inf where they rule tokens out
        assert torch.equal(finite, torch.isfinite(b))
        torch.testing.assert_close(b[finite], a[finite], rtol=0, atol=1e-4)
    if mode in ("beam", "beam_sample"):
        torch.testing.assert_close(new.sequences_scores, ref.sequences_scores, rtol=0, atol=1e-4)
    assert new.past_key_values is cache and ref.past_key_values is ref_cache
    assert cache.get_seq_length() == ref_cache.get_seq_length()
    assert shapes(cache) == shapes(ref_cache)
    # FP32 tiers: the stored K/V are the model's, except at pad positions past the first layer: a query that may
    # attend to nothing gets zeros from kvprec (and SDPA) but a uniform average from eager (Gemma 2's reference),
    # so the hidden states there differ; the mask hides them from every later query.
    held = torch.ones(cache.layers[0].keys.shape[0], cache.get_seq_length(), dtype=torch.bool)
    if mode in ("sample", "left_padding", "inputs_embeds"):
        held[:, :prompts["padded"]["attention_mask"].shape[1]] = prompts["padded"]["attention_mask"].bool()
    for mine, theirs in zip(cache.layers, ref_cache.layers):
        rows = held[:, -mine.keys.shape[2]:]
        torch.testing.assert_close(mine.keys[rows[:, None].expand(mine.keys.shape[:3])],
                                   theirs.keys[rows[:, None].expand(theirs.keys.shape[:3])], rtol=0, atol=1e-5)
        torch.testing.assert_close(mine.values[rows[:, None].expand(mine.values.shape[:3])],
                                   theirs.values[rows[:, None].expand(theirs.values.shape[:3])], rtol=0, atol=1e-5)
    assert model.config._attn_implementation != "kvprec"  # enabled() restored the stock attention


def test_cache_without_a_config_matches_too(tiny_model, prompts):
    """AdaptiveCache() (how DynamicCache() is built in user code): kvprec.enabled binds it to the model at the first
    forward, after which it is AdaptiveCache(model.config): same tokens, scores and shapes."""
    model = tiny_model("mistral")
    ref, ref_cache = run_mode("left_padding", model, None, prompts, adaptive=False)
    cache = kvprec.AdaptiveCache(policy="uniform:fp32", block_size=4)
    assert len(cache.layers) == 0 and cache.config is None
    new = generate(model, cache, **prompts["padded"])
    assert cache.config is model.config and len(cache.layers) == model.config.num_hidden_layers
    assert torch.equal(new.sequences, ref.sequences)
    for a, b in zip(ref.scores, new.scores):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    assert shapes(cache) == shapes(ref_cache)
