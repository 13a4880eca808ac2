"""The "kvprec" attention function and the pure-torch references: native attend vs the block-by-block reference
vs a dense pass; what the function accepts and refuses; the tensor fallback; the instrumentation showing that
decode never materialises the cache (at most one dequantized block alive, no gather); block mass to policies."""
import math
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import kvprec
from helpers import kernel_backend_model
from kvprec.hf.attention import kvprec_attention_forward
from kvprec.ops.reference.attention import ReadCounter, attend_blocks, attend_dense
from kvprec.hf.cache import AdaptiveCache, KVHandle

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")

CAUSAL = SimpleNamespace(is_causal=True, layer_idx=0)


def make_buffer(n, batch=2, kv_heads=2, head_dim=32, block_size=8, seed=0):
    """A buffer of n random positions whose sealed blocks have random tiers among fp32/fp16/bf16/int8/int4."""
    from kvprec.storage.buffer import MixedPrecisionBuffer

    g = torch.Generator().manual_seed(seed)
    buf = MixedPrecisionBuffer(batch=batch, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                               group_size=16, dtype=torch.float32)
    k = torch.randn(batch, kv_heads, n, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, n, head_dim, generator=g)
    tiers = torch.randint(0, 5, (batch, kv_heads, buf.blocks_sealed_by(n)), generator=g).to(torch.int8)
    buf.append(k, v, tiers)
    return buf


def random_mask(batch, q, n, seed):
    """bool [B, Q, N] with a few holes, and one query row that may attend to nothing (a pad query)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, q, n, generator=g) > 0.2
    mask[0, 0] = False
    return mask


CASES = [  # n, q, masked, window, softcap
    (1, 1, False, 0, 0.0), (7, 1, True, 0, 0.0), (8, 3, False, 0, 0.0), (23, 1, False, 6, 0.0),
    (23, 5, True, 0, 2.0), (23, 5, True, 6, 2.0), (40, 17, False, 0, 0.0), (40, 1, True, 9, 0.5),
]


@pytest.mark.parametrize("n,q,masked,window,softcap", CASES)
def test_reference_matches_native_attend(n, q, masked, window, softcap, scalar_cpu_path):
    buf = make_buffer(n, seed=n + q)
    query = torch.randn(2, 4, q, 32, generator=torch.Generator().manual_seed(q))  # GQA: 4 query heads on 2 KV heads
    mask = random_mask(2, q, n, seed=n) if masked else None
    kw = dict(scale=0.2, sliding_window=window, softcap=softcap, block_mass=True)
    out, lse, mass = buf.attend(query, mask, **kw)
    ref_out, ref_lse, ref_mass = attend_blocks(buf, query, mask, **kw)
    # Both are FP32 online softmax over the same dequantized blocks: only the summation order differs.
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5)
    assert mass.shape == (2, 4, q, math.ceil(n / 8))
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(mass.sum(-1)[seen], torch.ones(int(seen.sum())), rtol=0, atol=1e-5)
    if masked:
        assert torch.all(out[0, :, 0] == 0) and torch.all(torch.isneginf(lse[0, :, 0]))


@pytest.mark.parametrize("n,q,masked,window,softcap", CASES[1::2])
def test_block_reference_matches_dense(n, q, masked, window, softcap):
    buf = make_buffer(n, seed=7)
    query = torch.randn(2, 4, q, 32, generator=torch.Generator().manual_seed(3))
    mask = random_mask(2, q, n, seed=1) if masked else None
    out, lse, _ = attend_blocks(buf, query, mask, 0.0, window, softcap)
    k, v = buf.gather(0, n)
    dense_out, dense_lse, weights = attend_dense(query, k, v, mask, 0.0, window, softcap, "bottom_right")
    torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, dense_lse, rtol=1e-5, atol=1e-5)


@pytest.fixture
def handle_layer(tiny_model):
    """A kvprec-mode cache layer of the tiny Llama (uniform fp32, block 8) holding 19 random positions."""
    model = tiny_model("llama")
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=8)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 19, 32, generator=g), torch.randn(2, 2, 19, 32, generator=g)
    with kvprec.enabled(model):
        handle, _ = cache.layers[0].update(k, v)
        yield handle, k, v


def test_function_uses_mask_scaling_window_softcap(handle_layer):
    handle, k, v = handle_layer
    assert isinstance(handle, KVHandle)
    query = torch.randn(2, 4, 3, 32)
    hf_mask = torch.ones(2, 1, 3, 19, dtype=torch.bool).tril(diagonal=16)
    hf_mask[1, :, :, :4] = False  # left padding of row 1
    out, weights = kvprec_attention_forward(CAUSAL, query, handle, handle, hf_mask, scaling=0.3, sliding_window=7,
                                            softcap=1.5)
    assert out.shape == (2, 3, 4, 32) and weights is None
    ref, _, ref_weights = attend_dense(query, k, v, hf_mask[:, 0], 0.3, 7, 1.5, "bottom_right")
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    out2, weights = kvprec_attention_forward(CAUSAL, query, handle, handle, hf_mask, scaling=0.3, sliding_window=7,
                                             softcap=1.5, output_attentions=True)
    assert torch.equal(out2, out)  # asking for weights does not change the output
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    # a None mask means causal bottom-right; an additive float mask is read as "0 = attend"
    out_none, _ = kvprec_attention_forward(CAUSAL, query, handle, handle, None)
    torch.testing.assert_close(out_none, attend_dense(query, k, v)[0].transpose(1, 2), rtol=1e-5, atol=1e-5)
    additive = torch.zeros(2, 1, 3, 19).masked_fill(~hf_mask, torch.finfo(torch.float32).min)
    out_add, _ = kvprec_attention_forward(CAUSAL, query, handle, handle, additive, scaling=0.3, sliding_window=7,
                                          softcap=1.5)
    assert torch.equal(out_add, out)


def test_function_refuses_what_it_does_not_implement(handle_layer):
    handle, _, _ = handle_layer
    query = torch.randn(2, 4, 1, 32)
    with pytest.raises(NotImplementedError, match="sinks"):
        kvprec_attention_forward(CAUSAL, query, handle, handle, None, s_aux=torch.zeros(4))
    with pytest.raises(NotImplementedError, match="sinks"):
        kvprec_attention_forward(CAUSAL, query, handle, handle, None, sinks=torch.zeros(4))
    with pytest.raises(NotImplementedError, match="position_bias"):
        kvprec_attention_forward(CAUSAL, query, handle, handle, None, position_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="dropout=0.1.*model.eval"):
        kvprec_attention_forward(CAUSAL, query, handle, handle, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="non-causal"):
        kvprec_attention_forward(SimpleNamespace(is_causal=False), query, handle, handle, None)
    with pytest.raises(ValueError, match=r"expected a \[B, 1, Q, 19\] mask"):
        kvprec_attention_forward(CAUSAL, query, handle, handle, torch.ones(2, 1, 1, 18, dtype=torch.bool))


def test_tensor_fallback():
    """Plain tensors go to SDPA unchanged; softcap (which SDPA refuses) and weights take the dense pass."""
    g = torch.Generator().manual_seed(2)
    query, k, v = (torch.randn(1, 4, 6, 32, generator=g), torch.randn(1, 2, 6, 32, generator=g),
                   torch.randn(1, 2, 6, 32, generator=g))
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2)
    out, weights = kvprec_attention_forward(module, query, k, v, None, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, query, k, v, None, scaling=0.25)
    assert weights is None and torch.equal(out, ref)
    out, weights = kvprec_attention_forward(module, query, k, v, None, scaling=0.25, softcap=1.0)
    assert weights is None
    dense, _, _ = attend_dense(query, k, v, None, 0.25, 0, 1.0, "top_left")
    torch.testing.assert_close(out, dense.transpose(1, 2), rtol=0, atol=0)


def count_calls(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.mark.parametrize("family,window", [("llama", 0), ("mistral", 12)])
def test_decode_reads_one_block_at_a_time(tiny_model, prompts, monkeypatch, family, window):
    """The reference backend, instrumented: every forward reads each block once (sealed + tail) except blocks no
    query's sliding window reaches, never holds two dequantized blocks at once, and nothing gathers the cache."""
    from kvprec.storage.buffer import MixedPrecisionBuffer

    gathers = count_calls(monkeypatch, MixedPrecisionBuffer, "gather")
    model = tiny_model(family)
    cache = AdaptiveCache(model.config, policy="sink_window:sinks=4,window=8,rest=int4,recent=fp16", block_size=8,
                          backend="torch")
    cache.read_counter = ReadCounter()
    with kvprec.enabled(model):
        model.generate(**prompts["single"], past_key_values=cache, max_new_tokens=12, do_sample=False)
    # the prefill (21 queries), then one decode forward per new token but the last
    forwards = [(21, 21)] + [(21 + step, 1) for step in range(1, 12)]

    def reads(n, q):
        return sum(1 for j in range(math.ceil(n / 8)) if not (window and j * 8 + 7 <= n - q - window))

    assert cache.read_counter.calls == 2 * len(forwards)
    assert cache.read_counter.blocks_read == 2 * sum(reads(n, q) for n, q in forwards)
    if window:
        assert reads(32, 1) == 2  # at 32 tokens only blocks 2 and 3 are within reach of the window
    assert cache.read_counter.max_live_blocks == 1
    assert gathers == []


def test_read_counter_sees_held_blocks():
    """The instrument can fail: blocks kept alive across reads are counted."""
    buf = make_buffer(30)
    counter, earlier, held = ReadCounter(), [], []
    for index in range(buf.num_sealed_blocks):
        held.append(buf.block(index, torch.float32))
        counter.on_read(earlier, *held[-1])
    assert counter.max_live_blocks == buf.num_sealed_blocks == 3


def test_native_decode_never_gathers(tiny_model, prompts, monkeypatch):
    """The native backend: one attend call per layer per forward, no gather (the cache is never materialised in
    Python). What attend does inside is checked against the reference above."""
    from kvprec.storage.buffer import MixedPrecisionBuffer

    gathers = count_calls(monkeypatch, MixedPrecisionBuffer, "gather")
    attends = count_calls(monkeypatch, MixedPrecisionBuffer, "attend")
    model = tiny_model("llama")
    cache = AdaptiveCache(model.config, policy="uniform:int4", block_size=8)
    with kvprec.enabled(model):
        model.generate(**prompts["padded"], past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert len(attends) == 2 * 6 and gathers == []


class RecordingPolicy(kvprec.policy.Uniform):
    wants_attention_mass = True

    def __init__(self):
        super().__init__("fp32")
        self.seen = []

    def on_attention(self, layer_idx, block_mass):
        self.seen.append((layer_idx, block_mass))


def test_block_mass_reaches_the_policy(tiny_model, prompts):
    model, policy = tiny_model("llama"), RecordingPolicy()
    cache = AdaptiveCache(model.config, policy=policy, block_size=8)
    with kvprec.enabled(model):
        model.generate(**prompts["padded"], past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert [layer for layer, _ in policy.seen] == [0, 1] * 5
    assert policy.seen[0][1].shape == (2, 4, 21, 3) and policy.seen[-1][1].shape == (2, 4, 1, 4)
    # Every query that sees a key spreads probability 1 over the blocks: row 0's 5 pad queries see nothing.
    valid_queries = torch.tensor([16 + 4, 21 + 4])  # (prefill + 4 decode steps) per batch row
    for layer in cache.layers:
        per_row = layer.stats.mass.sum(dim=(1, 2))  # over KV heads and blocks
        torch.testing.assert_close(per_row, valid_queries.float() * 4, rtol=1e-5, atol=1e-4)  # x 4 query heads
        assert layer.stats.seen.tolist() == [2 * (21 + 4), 2 * (13 + 4), 2 * (5 + 4), 2 * 1]


@pytest.mark.parametrize("key_rotation", [None, "hadamard"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_backend_matches_the_native_one_in_generate(backend, key_rotation):
    """AdaptiveCache(backend="triton") runs the Triton flash-decoding kernel (on CPU under TRITON_INTERPRET=1)
    over the cache's pools, backend="cuda" the CUDA one (fp16 on a GPU); each must produce the tokens and, within
    rounding, the logits of the native backend, with keys stored as given or rotated (the kernels then read k R
    and get q R)."""
    model, ids, block_size, tol = kernel_backend_model(backend)
    out = {}
    for name in ("cpp", backend):
        cache = kvprec.AdaptiveCache(model.config, policy="sink_window:sinks=4,window=8,rest=int4",
                                     block_size=block_size, backend=name, key_rotation=key_rotation)
        with kvprec.enabled(model):
            out[name] = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                       max_new_tokens=3, do_sample=False, pad_token_id=0,
                                       return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out["cpp"].sequences, out[backend].sequences)
    for a, b in zip(out["cpp"].logits, out[backend].logits):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
