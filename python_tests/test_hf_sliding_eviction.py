"""Sliding-window layers of an AdaptiveCache evict the blocks no later query can see.

The tiny models of conftest.py have a window of 12 on their sliding layers (Qwen2 layer 1, Mistral both, Gemma 2
layer 0, Gemma 3 layer 0); with block_size 8 and sequences of 60-80 positions most of a sliding layer's blocks are
evicted. With every tier FP32 the tokens and logits must still be DynamicCache's (which keeps window - 1 positions
in its sliding layers), and a sliding layer must hold at most window + 2 blocks of positions.
"""
import pytest
import torch
from transformers import DynamicCache

import kvprec
from kvprec.hf.cache import AdaptiveCache, sliding_windows

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")

SLIDING = ("qwen2", "mistral", "gemma2", "gemma3")
T = 8


def ids_of(n, batch=1, seed=0):
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, cache, **kwargs):
    kwargs.setdefault("do_sample", False)
    context = kvprec.enabled(model) if isinstance(cache, AdaptiveCache) else torch.no_grad()
    with context:
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                              max_new_tokens=40, return_dict_in_generate=True, output_logits=True, **kwargs)


def assert_same(ref, new):
    assert torch.equal(ref.sequences, new.sequences)
    for a, b in zip(ref.logits, new.logits):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def check_held(cache):
    """Sliding layers evicted and hold <= window + 2 blocks; full layers evicted nothing; pages = held blocks."""
    windows = sliding_windows(cache.config)
    assert any(windows)
    for layer, window in zip(cache.layers, windows):
        buf = layer.buffer
        held = buf.seq_len - layer.evicted_blocks * T
        if window:
            assert layer.evicted_blocks > 0 and held <= window + 2 * T, (layer.layer_idx, held)
        else:
            assert layer.evicted_blocks == 0
        b, h = buf.batch, buf.kv_heads
        assert sum(buf.memory().tier_pages.values()) == b * h * (buf.num_sealed_blocks - layer.evicted_blocks)
        assert (layer.tiers()[..., :layer.evicted_blocks] == kvprec.storage.formats.EVICTED).all()


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_layers_evict_and_match_dynamic_cache(tiny_model, family):
    model = tiny_model(family)
    ids = ids_of(40, batch=2)
    ref = generate(model, ids, DynamicCache(config=model.config))
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=T)
    assert_same(ref, generate(model, ids, cache))
    check_held(cache)
    report = cache.memory_report()
    assert int(report.evicted_tokens.max()) > 0 and "evicted" in report.format()


def test_evict_sliding_false_keeps_every_position(tiny_model):
    model = tiny_model("gemma3")
    ids = ids_of(40)
    ref = generate(model, ids, DynamicCache(config=model.config))
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=T, evict_sliding=False)
    assert_same(ref, generate(model, ids, cache))
    assert all(layer.evicted_blocks == 0 and layer.sliding_window == 0 for layer in cache.layers)
    assert cache.layers[0].gather()[0].shape[2] == cache.get_seq_length()


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_assisted_decoding_past_the_window(tiny_model, family):
    """Assisted decoding records the past (activate_past_recording) and crops the rejected candidates; each crop
    then evicts what the window has passed."""
    model, assistant = tiny_model(family), tiny_model("llama", seed=5, layers=1)
    ids = ids_of(30)
    ref = generate(model, ids, DynamicCache(config=model.config), assistant_model=assistant)
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=T)
    assert_same(ref, generate(model, ids, cache, assistant_model=assistant))
    assert cache.layers[0].record_past
    check_held(cache)


def forward(model, cache, ids):
    with kvprec.enabled(model), torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits


def test_crop_back_past_evicted_positions(tiny_model):
    """Without past recording a crop that needs evicted positions raises (DynamicCache's sliding layers raise
    too); with it, the crop is exact and then trims."""
    model = tiny_model("gemma3")
    ids = ids_of(42)
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=T)
    forward(model, cache, ids[:, :40])
    forward(model, cache, ids[:, 40:41])  # evicts blocks 0..2 (positions < 24) before appending position 40
    sliding = cache.layers[0]
    assert sliding.evicted_blocks == 3
    with pytest.raises(ValueError, match="activate_past_recording"):
        cache.crop(-20)  # a query at position 21 would see positions 10..21
    assert cache.get_seq_length() == 41  # nothing changed
    model = tiny_model("qwen2")  # its sliding layer is the last: the full layer before it must not be cropped either
    qcache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=T)
    forward(model, qcache, ids[:, :40])
    forward(model, qcache, ids[:, 40:41])
    with pytest.raises(ValueError, match="layer 1 has evicted"):
        qcache.crop(-20)
    assert [layer.get_seq_length() for layer in qcache.layers] == [41, 41]
    model = tiny_model("gemma3")
    cache.crop(-5)  # a query at 36 sees > 24: fine
    assert cache.get_seq_length() == 36

    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=T)
    cache.activate_past_recording()
    forward(model, cache, ids[:, :40])
    forward(model, cache, ids[:, 40:41])
    assert cache.layers[0].evicted_blocks == 0
    cache.crop(-20)
    assert cache.layers[0].evicted_blocks == (21 - 12 + 1) // T
    got = forward(model, cache, ids[:, 21:22])[:, -1]
    with torch.no_grad():
        want = model(input_ids=ids[:, :22]).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


POLICIES = {
    "sink_window": lambda: "sink_window:sinks=4,window=16,rest=int4",
    "attention_mass": lambda: "attention_mass:keep=0.5,low=int4",
    "budget_bits": lambda: kvprec.policy.budget("sink_window", bits_per_element=6),
    "budget_bytes": lambda: kvprec.policy.budget("attention_mass:keep=0.5", bytes=60000),
}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_policies_skip_evicted_blocks(tiny_model, policy):
    """Policies re-tier held blocks only; a bits-per-element budget counts held blocks only."""
    model = tiny_model("gemma3")
    cache = AdaptiveCache(model.config, policy=POLICIES[policy](), block_size=T)
    generate(model, ids_of(40), cache)
    check_held(cache)
    report = cache.memory_report()
    for i, layer in enumerate(cache.layers):
        held = layer.buffer.num_sealed_blocks - layer.evicted_blocks
        assert int(report.precision_map[i].sum()) == held * layer.buffer.kv_heads
    if policy == "budget_bits":
        for layer in cache.layers:
            held = layer.buffer.num_sealed_blocks - layer.evicted_blocks
            elements = layer.buffer.kv_heads * held * T * 32 * 2
            pages = sum(layer.memory().tier_bytes.values())
            assert pages * 8 <= 6 * elements
