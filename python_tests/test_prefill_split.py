"""The CPU prefill path (kvprec/hf/prefill.py): a chunk of Q >= prefill.MIN_QUERIES queries reads the stored K/V back
part by part through torch's flash-attention kernel and merges the parts by log-sum-exp.

* merge: two parts merged equal one attention over their union (rows with no key in a part, or in both);
* buffer level: the split equals the block kernel (the unsplit path) at FP32 tiers to 1e-5, and reads what the
  cache stores at integer and FP16 tiers (equal to the pure-torch reference over the dequantized blocks on the
  scalar CPU path): GQA, HF masks with left padding and holes, sliding windows (with evicted blocks), rotated keys,
  awkward sizes (head_dim 24, block 8, lengths off the block grid, several segments);
* model level: with every tier FP32, generate and chunked-prefill forwards are token-exact against DynamicCache
  (logits to 1e-4) on the families with GQA, left padding, sliding windows and softcap (Gemma 2 keeps the block
  kernel), with prompts long enough to take the split at the default threshold, and a speculative-verify chunk of
  5 queries over earlier pages with the threshold lowered.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

import kvprec
from kvprec.hf import prefill
from kvprec.hf.cache import AdaptiveCache
from kvprec.ops.reference.attention import attend_blocks, attend_dense
from kvprec.storage.buffer import MixedPrecisionBuffer
from kvprec.storage.formats import Tier

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


@pytest.fixture
def split_counter(monkeypatch):
    """Counts attend_split calls (so a test can show the split ran)."""
    calls = []
    original = prefill.attend_split

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(prefill, "attend_split", counted)
    return calls


# ---- merge -----------------------------------------------------------------------------------------------------

def test_merge_of_two_parts_is_the_attention_over_their_union():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(2))
    mask = torch.rand(2, 5, 16, generator=g) > 0.4
    mask[0, 1] = False          # a row with no key at all
    mask[1, 2, :9] = False      # a row with no key in the first part
    mask[1, 3, 9:] = False      # and one with none in the second
    ref_out, ref_lse, _ = attend_dense(q, k, v, mask, causal="none")
    a_out, a_lse, _ = attend_dense(q, k[:, :, :9], v[:, :, :9], mask[..., :9], causal="none")
    b_out, b_lse, _ = attend_dense(q, k[:, :, 9:], v[:, :, 9:], mask[..., 9:], causal="none")
    out, lse = prefill.merge(a_out, a_lse, b_out, b_lse)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-6)
    assert torch.isneginf(lse[0, :, 1]).all() and (out[0, :, 1] == 0).all()


# ---- buffer level ----------------------------------------------------------------------------------------------

def _buffer(b, hkv, d, t, n, tier, dtype=torch.float32, seed=0, first=None):
    """A buffer of n positions appended as [first, n - first) (first: default n // 2), random K/V."""
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(b, hkv, n, d, generator=g) * 2).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    buf = MixedPrecisionBuffer(batch=b, kv_heads=hkv, head_dim=d, block_size=t, group_size=d // 2 if d % 2 == 0
                               else d, dtype=dtype)
    first = n // 2 if first is None else first
    if first:
        buf.append(k[:, :, :first], v[:, :, :first], tier)
    buf.append(k[:, :, first:], v[:, :, first:], tier)
    return buf


def _split(buf, q, mask=None, scale=0.0, window=0, evicted=0):
    layer = SimpleNamespace(buffer=buf, evicted_blocks=evicted)
    return prefill.attend_split(layer, q, mask, scale, window)


def _padding_mask(b, nq, n, pad, holes=False, seed=0):
    """bool [B, Q, N]: row 0 left-padded by ``pad`` positions; with holes a few random keys hidden as well."""
    mask = torch.ones(b, nq, n, dtype=torch.bool)
    mask[0, :, :pad] = False
    if holes:
        mask &= torch.rand(b, nq, n, generator=torch.Generator().manual_seed(seed)) > 0.1
    return mask


CASES = [  # (B, Hq, Hkv, D, T, N, Q, segment)
    (1, 4, 4, 32, 8, 40, 40, 4096),       # a first chunk: the chunk's own part only
    (2, 6, 2, 24, 8, 77, 19, 16),         # GQA 3, head_dim 24, off the block grid, 4 earlier segments
    (1, 9, 3, 64, 16, 300, 128, 64),      # SmolLM2's heads, a long chunk
    (3, 8, 1, 32, 4, 45, 2, 7),           # MQA, a 2-query verify chunk, segments of 7
]


@pytest.mark.parametrize("b,hq,hkv,d,t,n,nq,segment", CASES)
@pytest.mark.parametrize("variant", ["plain", "padding", "holes", "window", "scale"])
def test_split_equals_block_kernel_at_fp32(monkeypatch, b, hq, hkv, d, t, n, nq, segment, variant):
    monkeypatch.setattr(prefill, "SEGMENT", segment)
    buf = _buffer(b, hkv, d, t, n, Tier.FP32, first=n - nq)
    q = torch.randn(b, hq, nq, d, generator=torch.Generator().manual_seed(1))
    mask = _padding_mask(b, nq, n, pad=min(5, n - 1), holes=variant == "holes") if variant in ("padding", "holes") \
        else None
    window = 11 if variant == "window" else 0
    scale = 0.37 if variant == "scale" else 0.0
    out, lse, mass = _split(buf, q, mask, scale, window)
    ref_out, ref_lse, _ = buf.attend(q, mask, scale=scale or None, sliding_window=window)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=0, atol=1e-5)
    assert mass.numel() == 0


def test_a_row_that_sees_nothing_gets_zero_and_minus_inf():
    buf = _buffer(2, 2, 32, 8, 50, Tier.FP32, first=30)
    q = torch.randn(2, 4, 20, 32)
    mask = torch.ones(2, 20, 50, dtype=torch.bool)
    mask[1, 3] = False
    out, lse, _ = _split(buf, q, mask)
    assert (out[1, :, 3] == 0).all() and torch.isneginf(lse[1, :, 3]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("tier", [Tier.FP16, Tier.BF16, Tier.INT8, Tier.INT4, Tier.INT2])
def test_split_reads_what_the_cache_stores(scalar_cpu_path, monkeypatch, tier):
    """At lossy tiers the chunk attends to its own sealed blocks at their tier, as the block kernel does: the split
    equals the pure-torch reference over the dequantized blocks (and the scalar block kernel) to FP32 rounding."""
    monkeypatch.setattr(prefill, "SEGMENT", 24)
    buf = _buffer(2, 2, 32, 8, 93, tier, first=60)
    q = torch.randn(2, 6, 33, 32, generator=torch.Generator().manual_seed(2)) * 2
    mask = _padding_mask(2, 33, 93, pad=7)
    out, lse, _ = _split(buf, q, mask, window=40)
    ref_out, ref_lse, _ = attend_blocks(buf, q, mask, 0.0, 40)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-5)
    # and not the full-precision chunk: integer tiers move the result measurably
    if tier.is_integer:
        exact = _buffer(2, 2, 32, 8, 93, Tier.FP32, first=60)
        full_out, _, _ = exact.attend(q, mask, sliding_window=40)
        assert (out - full_out).abs().max() > 1e-3


def test_split_in_bf16_is_within_bf16_rounding_of_the_block_kernel():
    buf = _buffer(1, 2, 64, 16, 200, Tier.BF16, dtype=torch.bfloat16, first=120)
    q = torch.randn(1, 8, 80, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    out, _, _ = _split(buf, q)
    ref, _, _ = buf.attend(q)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2)


def test_evicted_blocks_are_not_read():
    """A sliding layer's evicted blocks raise when read: the split starts at the first position a window reaches."""
    buf = _buffer(1, 2, 32, 8, 96, Tier.FP32, first=64)
    buf.evict_blocks(5)  # positions [0, 40): the window 20 of queries >= 64 starts at 45
    q = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    out, _, _ = _split(buf, q, window=20, evicted=5)
    ref = attend_dense(q, *_dense(buf, start=40), sliding_window=20)[0]  # positions kept, window from 40 on
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def _dense(buf, start):
    """K, V of the buffer with positions before ``start`` zero (they are outside every query's window)."""
    k, v = buf.gather(start, buf.seq_len)
    pad = (0, 0, start, 0)
    return torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)


def test_routing(monkeypatch):
    q_long, q_short = torch.zeros(1, 4, prefill.MIN_QUERIES, 32), torch.zeros(1, 4, prefill.MIN_QUERIES - 1, 32)
    assert prefill.applies(q_long, 0.0, False)
    assert not prefill.applies(q_short, 0.0, False)        # decode, short verify chunks: the block kernel
    assert not prefill.applies(q_long, 50.0, False)        # softcap: SDPA has none
    assert not prefill.applies(q_long, 0.0, True)          # the policy reads block mass from the kernel
    assert not prefill.applies(q_long.to("meta"), 0.0, False)


# ---- model level -----------------------------------------------------------------------------------------------

def _ids(n, batch=1, seed=0):
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, mask, cache, new=8):
    context = kvprec.enabled(model) if isinstance(cache, AdaptiveCache) else torch.no_grad()
    with context:
        return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new,
                              do_sample=False, return_dict_in_generate=True, output_logits=True)


def _assert_same(ref, new):
    assert torch.equal(ref.sequences, new.sequences)
    for a, b in zip(ref.logits, new.logits):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gemma3", "gpt2"])
def test_generate_with_a_long_prompt_is_token_exact(tiny_model, split_counter, family):
    """Left-padded batch of 2 x 260 (the default threshold takes the split on the prompt): every tier FP32 gives
    DynamicCache's tokens. Gemma 2 (softcap) stays on the block kernel, every other family takes the split."""
    model = tiny_model(family)
    ids = _ids(260, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :13] = 0
    ref = _generate(model, ids, mask, DynamicCache(config=model.config))
    new = _generate(model, ids, mask, AdaptiveCache(model.config, policy="uniform:fp32", block_size=8))
    _assert_same(ref, new)
    assert (len(split_counter) == 0) if family == "gemma2" else (len(split_counter) == 2)  # prompt, 2 layers


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
def test_chunked_prefill_then_verify_chunk_is_token_exact(tiny_model, split_counter, monkeypatch, family):
    """With the threshold at 64: a 150-token prompt prefilled in chunks of 70 / 70 / 10 (earlier pages under the
    later chunks; 10 < the threshold, so the block kernel), then a 5-query verify chunk with the threshold lowered
    to 2 (earlier pages through the split), each forward's logits against DynamicCache's to 1e-4 and the same
    argmax."""
    monkeypatch.setattr(prefill, "MIN_QUERIES", 64)
    model = tiny_model(family)
    ids = _ids(155, seed=1)
    caches = [DynamicCache(config=model.config), AdaptiveCache(model.config, policy="uniform:fp32", block_size=8)]
    logits = [[], []]
    for which, cache in enumerate(caches):
        context = kvprec.enabled(model) if which else torch.no_grad()
        with context, torch.no_grad():
            for a, b in ((0, 70), (70, 140), (140, 150), (150, 155)):
                if which and a == 150:
                    monkeypatch.setattr(prefill, "MIN_QUERIES", 2)
                logits[which].append(model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits)
    assert len(split_counter) == 2 * 3  # chunks 1, 2 and the verify chunk, 2 layers each
    for ref, new in zip(*logits):
        torch.testing.assert_close(new, ref, rtol=0, atol=1e-4)
        assert torch.equal(new.argmax(-1), ref.argmax(-1))


def test_rotated_keys_through_the_split_match_the_block_kernel(tiny_model, monkeypatch):
    """key_rotation stores k R and the layer rotates q before either path: INT4 logits of the split (threshold 64)
    and of the block kernel (threshold raised past the prompt) agree to the integer tiers' score bound."""
    monkeypatch.setattr(prefill, "MIN_QUERIES", 64)
    model = tiny_model("llama")
    ids = _ids(140, seed=2)

    def logits():
        cache = AdaptiveCache(model.config, policy="uniform:int4", block_size=8, key_rotation="hadamard")
        with kvprec.enabled(model), torch.no_grad():
            model(input_ids=ids[:, :64], past_key_values=cache, use_cache=True)
            return model(input_ids=ids[:, 64:], past_key_values=cache, use_cache=True).logits

    split = logits()
    monkeypatch.setattr(prefill, "MIN_QUERIES", math.inf)
    kernel = logits()
    torch.testing.assert_close(split, kernel, rtol=0, atol=5e-3)
