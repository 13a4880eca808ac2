"""AdaptiveCache layer operations outside generate: crop, batch ops, reset, sizes, the slow path, the memory
report, and the clear errors for what it refuses."""
import pytest
import torch
from transformers import DynamicCache

import kvprec
from kvprec.hf.cache import AdaptiveCache, KVHandle
from kvprec.storage.formats import BlockGeometry, Tier

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


def fill(model, ids, **cache_kwargs):
    """Prefill a fresh AdaptiveCache (block_size 8) with ``ids`` through the kvprec attention; returns (cache, logits)."""
    cache = AdaptiveCache(model.config, block_size=8, **{"policy": "uniform:fp32", **cache_kwargs})
    with kvprec.enabled(model), torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    return cache, logits


def gathered(cache):
    return [layer.gather() for layer in cache.layers]


def test_crop_then_refeed_reproduces_logits(tiny_model, prompts):
    model, ids = tiny_model("llama"), prompts["single"]["input_ids"]
    cache, logits = fill(model, ids)
    cache.crop(0)
    assert cache.get_seq_length() == 21
    cache.crop(-7)  # 21 -> 14: unseals block 1 (positions 8..15) back into the tail
    assert [layer.get_seq_length() for layer in cache.layers] == [14, 14]
    with kvprec.enabled(model), torch.no_grad():
        again = model(input_ids=ids[:, 14:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(again, logits[:, 14:], rtol=0, atol=1e-5)


def test_crop_errors(tiny_model, prompts):
    cache, _ = fill(tiny_model("llama"), prompts["single"]["input_ids"])
    with pytest.raises(ValueError, match="negative number of tokens"):
        cache.crop(5)
    with pytest.raises(ValueError, match="holds only 21 tokens"):
        cache.crop(-22)


@pytest.mark.parametrize("shadow", [None, "cpu"])
def test_crop_inside_an_int4_block(tiny_model, prompts, shadow):
    """With a host shadow the positions a crop returns to the tail are exact; without one they are the INT4
    values (lossy), as the buffer contract says."""
    model, ids = tiny_model("llama"), prompts["single"]["input_ids"]
    cropped, _ = fill(model, ids, policy="uniform:int4", shadow=shadow)
    cropped.crop(-9)  # 21 -> 12: block 1 (8..15) is unsealed, positions 8..11 return to the tail
    fresh, _ = fill(model, ids[:, :12], policy="uniform:int4", shadow=shadow)  # 8..11 never left the tail
    # Layer 0 only: its K/V are projections of the embeddings, while layer 1's depend on what layer 0 attended
    # to (in the 21-token run, queries 8..11 saw block 1 already sealed at INT4).
    (k1, v1), (k2, v2) = cropped.layers[0].gather(), fresh.layers[0].gather()
    assert torch.equal(k1[:, :, :8], k2[:, :, :8]) and torch.equal(v1[:, :, :8], v2[:, :, :8])  # block 0
    tail_equal = torch.equal(k1[:, :, 8:], k2[:, :, 8:]) and torch.equal(v1[:, :, 8:], v2[:, :, 8:])
    assert tail_equal == (shadow is not None)


def test_batch_ops_follow_the_rows(tiny_model, prompts):
    model, ids = tiny_model("llama"), prompts["padded"]["input_ids"]
    cache, _ = fill(model, ids, policy="sink_window:sinks=4,window=8,rest=int8,recent=fp32")
    before = gathered(cache)
    tiers_before = [layer.tiers() for layer in cache.layers]
    cache.batch_repeat_interleave(3)
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    for layer, (k, v), t in zip(cache.layers, before, tiers_before):
        k2, v2 = layer.gather()
        assert torch.equal(k2, k[rows]) and torch.equal(v2, v[rows]) and torch.equal(layer.tiers(), t[rows])
    cache.batch_select_indices(torch.tensor([4, 1]))
    cache.reorder_cache(torch.tensor([1, 1]))  # beam search may duplicate a row
    for layer, (k, v) in zip(cache.layers, before):
        k2, _ = layer.gather()
        assert torch.equal(k2, k[[0, 0]])
    assert cache.layers[0].rows == 2


def test_reset_and_reuse_with_another_batch(tiny_model, prompts):
    model = tiny_model("llama")
    cache, _ = fill(model, prompts["padded"]["input_ids"])
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.is_initialized
    assert cache.get_mask_sizes(5, 0) == (5, 0)
    ids = prompts["single"]["input_ids"]
    with kvprec.enabled(model), torch.no_grad():
        reused = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    _, fresh = fill(model, ids)
    assert torch.equal(reused, fresh)


def test_sizes(tiny_model, prompts):
    model = tiny_model("llama")
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=8)
    assert cache.get_seq_length() == 0 and cache.get_mask_sizes(3, 1) == (3, 0)
    cache, _ = fill(model, prompts["single"]["input_ids"])
    assert cache.get_mask_sizes(1, 0) == (22, 0) and cache.get_mask_sizes(4, 1) == (25, 0)
    assert cache.get_max_length() == -1 and not cache.is_compileable and cache.is_croppable


def test_slow_path_without_kvprec_attention(tiny_model, prompts):
    """A model on SDPA gets gathered tensors (and one warning), and still generates the reference tokens."""
    model = tiny_model("llama")
    kwargs = dict(**prompts["padded"], max_new_tokens=6, do_sample=False)
    ref = model.generate(**kwargs, past_key_values=DynamicCache(config=model.config))
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=8)
    with pytest.warns(UserWarning, match="not using the 'kvprec' attention") as record:
        out = model.generate(**kwargs, past_key_values=cache)
    assert len([w for w in record if "kvprec" in str(w.message)]) == 1
    assert torch.equal(out, ref)


def test_handle_misuse_says_what_to_do(tiny_model, prompts):
    cache, _ = fill(tiny_model("llama"), prompts["single"]["input_ids"])
    handle = KVHandle(cache.layers[0])
    with pytest.raises(AttributeError, match="kvprec.enable"):
        handle.shape


def test_memory_report_is_exact(tiny_model, prompts):
    """uniform:int4 on 21 tokens, block 8, B=2, H_kv=2, D=32: 2 sealed blocks per (row, head) per layer."""
    model = tiny_model("llama")
    cache, _ = fill(model, prompts["padded"]["input_ids"], policy="uniform:int4")
    report = cache.memory_report()
    geometry = BlockGeometry(8, 32, 32)
    pages = 2 * 2 * 2  # rows * heads * sealed blocks
    assert report.tier_bytes[:, Tier.INT4].tolist() == [pages * geometry.page_bytes(Tier.INT4)] * 2
    assert report.tier_bytes.sum() == report.tier_bytes[:, Tier.INT4].sum()
    assert report.precision_map[:, :, Tier.INT4].tolist() == [[4, 4], [4, 4]]  # 2 rows x 2 blocks per head
    elements = 2 * 2 * 21 * 32 * 2
    assert report.elements.tolist() == [elements, elements]
    resident = report.tier_bytes.sum() + report.tail_bytes.sum() + report.table_bytes.sum()
    assert report.resident_bytes == resident
    assert report.bits_per_element == pytest.approx(resident * 8 / (2 * elements))
    assert report.compression_vs_fp16 == pytest.approx(2 * elements * 2 / resident)
    text = report.format()
    assert "uniform:int4" in text and "h0 int4=4 | h1 int4=4" in text and "bits/element" in text


def test_refusals_are_clear(tiny_model):
    import transformers

    llama = tiny_model("llama").config
    with pytest.raises(NotImplementedError, match="offloading"):
        AdaptiveCache(llama, offloading=True)
    with pytest.raises(ValueError, match="does not support model_type 'opt'"):
        AdaptiveCache(transformers.OPTConfig())
    with pytest.raises(ValueError, match="shadow"):
        AdaptiveCache(llama, shadow="disk")
    with pytest.raises(ValueError, match="backend 'flash' is not one of auto, cpp, torch, triton, cuda"):
        AdaptiveCache(llama, backend="flash")
    if not kvprec.cuda_kernels_available():
        with pytest.raises(ValueError, match="backend 'cuda' needs the CUDA kernels"):
            AdaptiveCache(llama, backend="cuda")
    with pytest.raises(ValueError, match="power of two"):
        AdaptiveCache(llama, block_size=12)
    with pytest.raises(ValueError, match="unknown policy"):
        AdaptiveCache(llama, policy="h2o")


def test_group_size_must_divide_head_dim(tiny_model, prompts):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"AdaptiveCache \(head_dim 32\): group_size: 24 must divide head_dim 32"):
        AdaptiveCache(model.config, block_size=8, group_size=24)  # refused when built, from the config's head_dim
    cache = AdaptiveCache(model.config, block_size=8, group_size=16)
    with pytest.raises(ValueError, match="layer 0 .*group_size: 16 must divide head_dim 12"):
        cache.update(torch.randn(1, 2, 3, 12), torch.randn(1, 2, 3, 12), 0)  # and at the first update, from the K/V


def test_policy_returning_bad_tiers_is_named(tiny_model, prompts):
    class Broken(kvprec.policy.Policy):
        def assign(self, layer_idx, blocks, stats):
            return torch.zeros(stats.batch, len(blocks), dtype=torch.int8)

    model = tiny_model("llama")
    cache = AdaptiveCache(model.config, policy=Broken(), block_size=8)
    with kvprec.enabled(model), pytest.raises(ValueError, match=r"Broken.assign returned \(1, 2\); expected"):
        model(input_ids=prompts["single"]["input_ids"], past_key_values=cache, use_cache=True)


def test_paged_view_is_reused_and_follows_every_table_change(monkeypatch):
    """AdaptiveLayer.paged() keeps the pools and device block table between decode steps and rebuilds them after
    each seal, re-tier, crop and batch selection; after every operation it must read what a fresh view reads."""
    from transformers import LlamaConfig

    from kvprec.ops.reference import PagedKV

    builds = []
    original = PagedKV.from_buffer.__func__
    monkeypatch.setattr(PagedKV, "from_buffer", classmethod(lambda cls, buf: builds.append(1) or original(cls, buf)))
    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, hidden_size=64)
    cache = AdaptiveCache(config, policy="uniform:int4", block_size=8, shadow="cpu")
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(0)

    def append(n, rows=2):
        layer.update(torch.randn(rows, 2, n, 32, generator=g), torch.randn(rows, 2, n, 32, generator=g))

    def check():
        fresh = original(PagedKV, layer.buffer)
        for a, b in zip(layer.paged().dense(), fresh.dense()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    append(19)  # seals 2 blocks
    check()
    count = len(builds)
    append(1)  # no seal: the view is reused
    check()
    assert len(builds) == count
    append(4)  # 24 positions: seals block 2
    check()
    assert len(builds) == count + 1
    layer.set_block_tiers(1, torch.full((2, 2), int(Tier.INT8), dtype=torch.int8))  # promotion from the shadow
    check()
    layer.crop(-9)
    check()
    layer.batch_select_indices(torch.tensor([1]))
    check()
    append(11, rows=1)
    check()
    layer.reset()
    append(9)
    check()


@pytest.mark.parametrize("batch,context", [(1, 4096), (1, 16384), (2, 8192)])
def test_uniform_int4_resident_bytes_meet_the_target(batch, context):
    """The memory target, exact on any device: uniform INT4 at the default block and value group keeps
    <= 0.30x the FP16 bytes, tail and block table included, at bench_generate's Llama-3.2-1B KV shape (8 KV heads
    of head_dim 64; per layer, so one layer suffices) after its prefill and 34 more tokens."""
    from transformers import LlamaConfig

    from kvprec.hf.attention import register

    register()
    config = LlamaConfig(num_hidden_layers=1, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64)
    config._attn_implementation = "kvprec"
    cache = AdaptiveCache(config, policy="uniform:int4")
    tokens = context + 34
    k = torch.randn(batch, 8, tokens, 64, dtype=torch.float16)
    cache.update(k, k, 0)
    fp16 = 2 * batch * 8 * tokens * 64 * 2
    ratio = cache.memory_report().resident_bytes / fp16
    assert cache.layers[0].geometry.group_size == 64
    assert 0.28 < ratio <= 0.30, ratio
