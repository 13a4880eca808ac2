"""Reference decode attention over a paged mixed-tier cache (kvprec/reference), its PagedKV builders, and the
registered op: block-by-block FP32 online softmax against dense FP32 softmax attention on the same dequantized
K/V (1e-5 level), block mass, masks, GQA, the buffer adapter, dispatch and input errors."""
import math

import pytest
import torch

import kvprec
from kvprec import formats, ops
from kvprec.formats import Tier
from kvprec.reference import PagedKV, decode_attention, dense_decode_attention

native = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


def make_paged(b, hkv, n, d, block_size, *, tiers="mixed", group_size=16, dtype=torch.float16, seed=0):
    """Random K/V [B, Hkv, N, D] in ``dtype`` quantized per block at random tiers (or one tier)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    nb = n // block_size
    if tiers == "mixed":
        tiers = torch.randint(0, len(Tier), (b, hkv, nb), generator=g).to(torch.int8)
    return PagedKV.from_dense(k, v, tiers, block_size, group_size, generator=g)


def block_sums(weights, n, block_size):
    """Weights [..., N] -> per-block sums [..., ceil(N / T)]."""
    nbt = math.ceil(n / block_size)
    pad = torch.nn.functional.pad(weights, (0, nbt * block_size - n))
    return pad.reshape(*weights.shape[:-1], nbt, block_size).sum(-1)


CASES = [  # b, hkv, g, q, n, d, block_size, mask, window, softcap
    (1, 2, 2, 1, 1, 64, 16, False, 0, 0.0),
    (2, 2, 2, 1, 7, 64, 16, False, 0, 0.0),
    (2, 2, 2, 1, 123, 64, 16, False, 0, 0.0),
    (1, 2, 1, 1, 64, 32, 16, False, 0, 0.0),
    (2, 2, 4, 3, 123, 64, 16, True, 0, 0.0),
    (1, 2, 2, 1, 123, 64, 16, False, 40, 0.0),
    (2, 1, 2, 2, 123, 64, 16, True, 25, 2.0),
    (1, 2, 2, 1, 300, 128, 64, True, 0, 30.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}g{}q{}n{}d{}t{}{}{}{}".format(
    *c[:7], "-mask" if c[7] else "", f"-win{c[8]}" if c[8] else "", f"-cap{c[9]:g}" if c[9] else ""))
def test_reference_matches_dense_fp32(case):
    b, hkv, g, nq, n, d, t, use_mask, window, cap = case
    paged = make_paged(b, hkv, n, d, t)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(b, hkv * g, nq, d, generator=gen)
    mask = torch.rand(b, nq, n, generator=gen) > 0.3 if use_mask else None
    out, lse, mass = decode_attention(q, paged, mask=mask, sliding_window=window, softcap=cap, block_mass=True)
    k, v = paged.dense()
    ref_out, ref_lse, weights = dense_decode_attention(q, k, v, mask=mask, sliding_window=window, softcap=cap)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert mass.shape == (b, hkv * g, nq, math.ceil(n / t))
    torch.testing.assert_close(mass, block_sums(weights, n, t), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(lse), atol=1e-5, rtol=0)


def test_custom_scale_and_low_precision_q():
    paged = make_paged(1, 2, 70, 64, 16)
    q = torch.randn(1, 4, 1, 64, generator=torch.Generator().manual_seed(2)).half()
    out, lse, mass = decode_attention(q, paged, scale=0.3)
    assert out.dtype == torch.float16 and mass is None
    k, v = paged.dense()
    ref_out, ref_lse, _ = dense_decode_attention(q.float(), k, v, scale=0.3)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    # out is the FP32 result rounded once to fp16: within half an fp16 ulp of |out| <= 1 (2^-12), plus FP32 noise
    assert (out.float() - ref_out).abs().max().item() <= 2 ** -12 + 1e-5


def test_row_with_nothing_to_attend_gets_zero_and_minus_inf():
    paged = make_paged(2, 2, 40, 64, 16)
    q = torch.randn(2, 4, 2, 64)
    mask = torch.ones(2, 2, 40, dtype=torch.bool)
    mask[1, 0] = False  # batch row 1, query 0: left padding covers everything
    out, lse, mass = decode_attention(q, paged, mask=mask, block_mass=True)
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    assert torch.isinf(lse[1, :, 0]).all() and (lse[1, :, 0] < 0).all()
    assert torch.equal(mass[1, :, 0], torch.zeros_like(mass[1, :, 0]))
    assert torch.isfinite(out).all() and torch.isfinite(lse[0]).all()


def test_gqa_reads_kv_head_h_over_group():
    """Query head h must see KV head h // G: give each KV head a constant distinct V."""
    b, hkv, g, n, d = 1, 3, 2, 20, 32
    k = torch.randn(b, hkv, n, d)
    v = torch.arange(hkv, dtype=torch.float32).reshape(1, hkv, 1, 1).expand(b, hkv, n, d).contiguous()
    paged = PagedKV.from_dense(k, v, Tier.FP32, 8, 8)
    out, _, _ = decode_attention(torch.randn(b, hkv * g, 1, d), paged)
    want = (torch.arange(hkv * g) // g).float()
    torch.testing.assert_close(out[0, :, 0, 0], want, atol=1e-6, rtol=0)


def test_from_dense_layout_and_page_indirection():
    paged = make_paged(2, 2, 100, 32, 16, group_size=8, seed=3)
    assert paged.num_blocks == 6 and paged.tail_len == 4 and paged.seq_len == 100
    for tier, pool in paged.pools.items():
        assert pool[0].shape[0] == int((paged.tiers == int(tier)).sum()) + 1  # one spare page
    # pages are laid out out of order: a kernel that ignored the block table would read other blocks
    in_order = [torch.equal(paged.pages[paged.tiers == int(t)].long(), torch.arange(int((paged.tiers == int(t)).sum())))
                for t in paged.pools]
    assert not all(in_order)
    k_dense, v_dense = paged.dense()
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 100, 32, generator=g).half()
    v = torch.randn(2, 2, 100, 32, generator=g).half()
    for b in range(2):
        for h in range(2):
            for j in range(paged.num_blocks):
                tier = Tier(int(paged.tiers[b, h, j]))
                blk = slice(16 * j, 16 * j + 16)
                qk = formats.quantize_keys(k[b, h, blk][None], tier)
                qv = formats.quantize_values(v[b, h, blk][None], tier, 8)
                assert torch.equal(k_dense[b, h, blk], formats.dequantize_keys(qk, tier, 32, torch.float32)[0])
                assert torch.equal(v_dense[b, h, blk], formats.dequantize_values(qv, tier, 32, 8, torch.float32)[0])
    assert torch.equal(k_dense[:, :, 96:], k[:, :, 96:].float())


@native
def test_from_buffer_matches_the_buffers_own_attend():
    b, hkv, d, t, n = 2, 2, 64, 16, 75
    g = torch.Generator().manual_seed(4)
    buf = kvprec.MixedPrecisionBuffer(b, hkv, d, t, 16, dtype=torch.float16)
    tiers = torch.randint(0, len(Tier), (b, hkv, n // t), generator=g).to(torch.int8)
    buf.append(torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g), tiers)
    paged = PagedKV.from_buffer(buf)
    assert paged.seq_len == n and torch.equal(paged.tiers, tiers)
    q = torch.randn(b, 4, 2, d, generator=g).half()
    mask = torch.rand(b, 2, n, generator=g) > 0.2
    want = buf.attend(q, mask, sliding_window=30, softcap=5.0, block_mass=True)
    got = decode_attention(q, paged, mask=mask, sliding_window=30, softcap=5.0, block_mass=True)
    torch.testing.assert_close(got[0], want[0], atol=2e-3, rtol=0)  # both round the same FP32 result to fp16
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-5)


def test_registered_op_and_dispatch():
    paged = make_paged(1, 2, 50, 64, 16)
    q = torch.randn(1, 4, 1, 64)
    assert ops.resolve_backend("decode_attention", "auto", torch.device("cpu")) == "torch"
    got = ops.decode_attention(q, paged, block_mass=True, backend="torch")
    want = decode_attention(q, paged, block_mass=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="no kernel for this op|unavailable"):
        ops.decode_attention(q, paged, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        ops.decode_attention(q, paged, backend="fast")


def test_bad_inputs_are_named():
    paged = make_paged(1, 2, 50, 64, 16)
    q = torch.randn(1, 4, 1, 64)
    with pytest.raises(ValueError, match=r"\[B, Hq, Q, D\]"):
        decode_attention(q[0], paged)
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        decode_attention(torch.randn(1, 3, 1, 64), paged)
    with pytest.raises(ValueError, match="D=64"):
        decode_attention(torch.randn(1, 4, 1, 32), paged)
    with pytest.raises(ValueError, match="1 <= Q <= N"):
        decode_attention(torch.randn(1, 4, 51, 64), paged)
    with pytest.raises(ValueError, match="mask must be bool"):
        decode_attention(q, paged, mask=torch.ones(1, 1, 49, dtype=torch.bool))
    with pytest.raises(ValueError, match="sliding_window"):
        decode_attention(q, paged, sliding_window=-1)
    with pytest.raises(ValueError, match="softcap"):
        decode_attention(q, paged, softcap=-1.0)
    with pytest.raises(ValueError, match="float64 is not accepted"):
        decode_attention(q.double(), paged)
    with pytest.raises(ValueError, match="tiers must be int8"):
        PagedKV(paged.pools, paged.tiers.int(), paged.pages, paged.tail_k, paged.tail_v, 16, 16).validate()
    missing = dict(paged.pools)
    missing.pop(Tier(int(paged.tiers[0, 0, 0])))
    with pytest.raises(ValueError, match="no .* pool"):
        decode_attention(q, PagedKV(missing, paged.tiers, paged.pages, paged.tail_k, paged.tail_v, 16, 16))
    with pytest.raises(ValueError, match="tail_len"):
        k = torch.randn(1, 2, 16, 64)
        PagedKV({}, torch.zeros(1, 2, 0, dtype=torch.int8), torch.zeros(1, 2, 0, dtype=torch.int32), k, k, 16,
                16).validate()
