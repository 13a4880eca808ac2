"""MixedPrecisionBuffer through Python: pages bit for bit against kvprec.storage.formats, round trips per tier, exact
memory accounting, re-tiering, crop, index_batch, attend against a dense torch softmax, and bad-input errors.

Tolerances: pages are compared bit for bit (the buffer quantizes with the C++ kernels that match the
reference). Integer round trips use the stated element bound of kvprec.storage.formats (scale/2 plus the FP32 rounding
of x' = code * scale + zero). attend with an FP32 model dtype reads the same FP32 values as gather(), so it
differs from a dense FP32 softmax only by summation order: 1e-5 on values of order 1. With an FP16/BF16 model
dtype it must be within 2x the error of torch's SDPA in that dtype against the FP32 reference (docs/design.md, "Tests").
"""
import math

import pytest
import torch

import kvprec
from kvprec import MemoryReport, MixedPrecisionBuffer
from kvprec.storage import formats
from kvprec.ops.reference import quantize as quantize_ref
from kvprec.storage.formats import Tier

from helpers import available_devices

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")

INT_TIERS = [Tier.INT8, Tier.INT4, Tier.INT2]
DEVICES = available_devices()


def _randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _by_block(x, n_blocks, block_size):
    """[B, H, L, D] -> [n_blocks * B * H, T, D], block-major, matching pages().permute(2, 0, 1)."""
    b, h, _, d = x.shape
    x = x[:, :, :n_blocks * block_size].reshape(b, h, n_blocks, block_size, d)
    return x.permute(2, 0, 1, 3, 4).reshape(n_blocks * b * h, block_size, d)


# ------------------------------------------------------------------------------------------------------------
# Pages against the reference quantizers

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seq_len", [1, 7, 123, 1023])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch", [1, 3])
def test_pages_match_reference_bit_for_bit(device, seq_len, head_dim, batch):
    # Small blocks so that seq_len 7 seals one; tiers drawn per (b, h, block) so each sealing quantizes subsets.
    heads, block, group, dtype = 2, 4, 32, torch.float16
    buf = MixedPrecisionBuffer(batch, heads, head_dim, block, group, dtype, device)
    k = _randn(batch, heads, seq_len, head_dim, dtype=dtype, seed=1, device=device) * 3
    v = _randn(batch, heads, seq_len, head_dim, dtype=dtype, seed=2, device=device)
    n = buf.blocks_sealed_by(seq_len)
    g = torch.Generator().manual_seed(3)
    choices = torch.tensor([int(Tier.INT8), int(Tier.INT4), int(Tier.INT2), int(Tier.FP16)], dtype=torch.int8)
    seal = choices[torch.randint(0, 4, (batch, heads, n), generator=g)]
    buf.append(k, v, seal)
    assert buf.seq_len == seq_len and buf.num_sealed_blocks == n == seq_len // block
    assert torch.equal(buf.tiers(), seal)
    assert torch.equal(buf.tail_keys(), k[:, :, n * block:]) and torch.equal(buf.tail_values(), v[:, :, n * block:])
    tiers = seal.permute(2, 0, 1).reshape(-1)
    pages = buf.pages().permute(2, 0, 1).reshape(-1).long()
    kb, vb = _by_block(k, n, block).cpu(), _by_block(v, n, block).cpu()
    for tier in [Tier.INT8, Tier.INT4, Tier.INT2, Tier.FP16]:
        rows = (tiers == int(tier)).nonzero().flatten()
        if rows.numel() == 0:
            continue
        p = buf.pool(tier)
        qk, qv = quantize_ref.quantize_keys(kb[rows], tier), quantize_ref.quantize_values(vb[rows], tier, group)
        sel = pages[rows].to(device)
        assert torch.equal(p.k[sel].cpu(), qk.codes) and torch.equal(p.v[sel].cpu(), qv.codes), tier
        if tier.is_integer:
            for got, want in [(p.k_scale, qk.scale), (p.k_zero, qk.zero), (p.v_scale, qv.scale), (p.v_zero, qv.zero)]:
                assert torch.equal(got[sel].cpu().view(torch.int16), want.view(torch.int16)), tier
        else:
            assert p.k_scale is None and p.v_zero is None


# ------------------------------------------------------------------------------------------------------------
# Round trips

def _check_within_bound(buf, tier, x_k, x_v, k, v):
    """|x - x'| <= scale/2 + 2^-22 (|x| + scale): the bound of kvprec.storage.formats plus the FP32 rounding of the
    multiply and the add of x' = code * scale + zero (2^-23 each)."""
    n, t, group = buf.num_sealed_blocks, buf.block_size, buf.group_size
    pages = buf.pages().permute(2, 0, 1).reshape(-1).long()
    p = buf.pool(tier)
    ks = quantize_ref.element_error_bound(p.k_scale[pages]).unsqueeze(1)                          # [N, 1, D]
    vs = quantize_ref.element_error_bound(p.v_scale[pages]).repeat_interleave(group, dim=-1)      # [N, T, D]
    for x, y, half in [(x_k, k, ks), (x_v, v, vs)]:
        xb, yb = _by_block(x, n, t), _by_block(y, n, t)
        assert ((xb - yb).abs() <= half + 2.0 ** -22 * (xb.abs() + 2 * half)).all()


@pytest.mark.parametrize("chunk", [1, 7, 123])
@pytest.mark.parametrize("tier", list(Tier), ids=str)
def test_append_in_chunks_round_trips(chunk, tier):
    b, h, d, t, length = 2, 3, 64, 16, 200
    dtype = tier.float_dtype if not tier.is_integer else torch.float32
    buf = MixedPrecisionBuffer(b, h, d, t, 32, dtype, default_tier=tier)
    k, v = _randn(b, h, length, d, dtype=dtype, seed=4), _randn(b, h, length, d, dtype=dtype, seed=5)
    for pos in range(0, length, chunk):
        buf.append(k[:, :, pos:pos + chunk], v[:, :, pos:pos + chunk])
        end = min(pos + chunk, length)
        assert (buf.seq_len, buf.num_sealed_blocks, buf.tail_len) == (end, end // t, end % t)
    gk, gv = buf.gather()
    assert gk.dtype == dtype and gk.shape == k.shape
    if tier.is_integer:
        _check_within_bound(buf, tier, k, v, gk, gv)
        sealed = buf.num_sealed_blocks * t
        assert torch.equal(gk[:, :, sealed:], k[:, :, sealed:])  # the tail is the model dtype: exact
    else:
        assert torch.equal(gk, k) and torch.equal(gv, v)
    for start, end in [(0, 0), (5, 37), (16, 32), (31, 199)]:
        assert torch.equal(buf.gather(start, end)[0], gk[:, :, start:end])


def test_block_in_other_dtypes():
    buf = MixedPrecisionBuffer(1, 2, 32, 16, 8, torch.float16, default_tier="int4")
    k = _randn(1, 2, 16, 32, dtype=torch.float16)
    buf.append(k, k)
    k32, _ = buf.block(0, torch.float32)
    k16, _ = buf.block(0)
    assert k32.dtype == torch.float32 and k16.dtype == torch.float16
    assert torch.equal(k32.half(), k16)  # one cast from the FP32 dequantized value


# ------------------------------------------------------------------------------------------------------------
# Memory

def test_memory_by_hand():
    b, h, d, t, g = 2, 2, 128, 64, 32
    int4_page = 2 * 64 * 64 + 4 * 128 + 4 * 64 * 4
    assert int4_page == 9728 == formats.BlockGeometry(t, d, g).page_bytes(Tier.INT4)
    buf = MixedPrecisionBuffer(b, h, d, t, g, torch.float16, default_tier=Tier.INT4)
    buf.append(_randn(b, h, 3 * 64 + 10, d, dtype=torch.float16), _randn(b, h, 3 * 64 + 10, d, dtype=torch.float16))
    m = buf.memory()
    assert isinstance(m, MemoryReport)
    assert m.tier_pages == {"fp32": 0, "fp16": 0, "bf16": 0, "int8": 0, "int4": 12, "int2": 0}
    assert m.tier_bytes["int4"] == 12 * 9728 and sum(m.tier_bytes.values()) == 12 * 9728
    assert m.tail_bytes == 2 * b * h * t * d * 2
    assert m.table_bytes == 12 * 5
    assert m.shadow_bytes == 0
    assert m.reserved_bytes == 12 * 9728  # one block (4 pages) at a time: capacity 4 -> 8 -> 12 (+25% < need)
    assert m.tokens == 202 and m.elements == b * h * 202 * d * 2
    assert m.resident_bytes == 12 * 9728 + 2 * b * h * t * d * 2 + 60
    assert m.bits_per_element == pytest.approx(m.resident_bytes * 8 / m.elements, rel=1e-15)
    assert m.compression_vs_fp16 == pytest.approx(m.elements * 2 / m.resident_bytes, rel=1e-15)
    text = m.format()
    assert "int4" in text and "116,736" in text and "resident" in text and "fp32" not in text


def test_memory_with_shadow_and_retier():
    b, h, d, t = 1, 2, 64, 16
    buf = MixedPrecisionBuffer(b, h, d, t, 32, torch.bfloat16, default_tier="int8", shadow=True)
    buf.append(_randn(b, h, 40, d, dtype=torch.bfloat16), _randn(b, h, 40, d, dtype=torch.bfloat16))
    geo = buf.geometry
    assert buf.memory().shadow_bytes == 2 * (2 * b * h * t * d * 2)
    buf.set_block_tiers(0, torch.tensor([[int(Tier.INT2), -1]], dtype=torch.int8))
    m = buf.memory()
    assert m.tier_pages["int8"] == 3 and m.tier_pages["int2"] == 1
    assert m.tier_bytes["int8"] == 3 * geo.page_bytes(Tier.INT8) and m.tier_bytes["int2"] == geo.page_bytes(Tier.INT2)
    assert m.reserved_bytes == 4 * geo.page_bytes(Tier.INT8) + geo.page_bytes(Tier.INT2)  # the freed page stays
    buf.reset()
    m = buf.memory()
    assert m.tokens == 0 and sum(m.tier_pages.values()) == 0 and m.shadow_bytes == 0 and m.bits_per_element == 0.0


# ------------------------------------------------------------------------------------------------------------
# Re-tiering, crop, index_batch

def test_demote_then_promote_needs_the_shadow():
    b, h, d, t = 2, 2, 64, 16
    k, v = _randn(b, h, 40, d, seed=6), _randn(b, h, 40, d, seed=7)
    buf = MixedPrecisionBuffer(b, h, d, t, 32, torch.float32, default_tier="int4")
    buf.append(k, v)
    k4, v4 = buf.block(0, torch.float32)
    buf.set_block_tiers(0, "int2")
    # Without the shadow, demotion re-quantizes the INT4 page dequantized to FP32.
    want = quantize_ref.dequantize_keys(quantize_ref.quantize_keys(k4.reshape(-1, t, d), Tier.INT2), Tier.INT2, d, torch.float32)
    assert torch.equal(buf.block(0)[0].reshape(-1, t, d), want)
    pages = buf.pages()
    with pytest.raises(RuntimeError, match="none is held"):
        buf.set_block_tiers(0, "int4")
    assert torch.equal(buf.pages(), pages) and (buf.tiers()[:, :, 0] == int(Tier.INT2)).all()  # nothing changed

    sh = MixedPrecisionBuffer(b, h, d, t, 32, torch.float32, default_tier="int4", shadow=True)
    sh.append(k, v)
    codes = sh.pool("int4").k[sh.pages()[:, :, 1].flatten().long()].clone()
    sh.set_block_tiers(1, Tier.INT2)
    sh.set_block_tiers(1, Tier.INT4)
    assert torch.equal(sh.pool("int4").k[sh.pages()[:, :, 1].flatten().long()], codes)
    sh.set_block_tiers(1, torch.tensor([[0, -1], [-1, 0]], dtype=torch.int8))  # two rows to FP32, exactly
    kb, _ = sh.block(1)
    assert torch.equal(kb[0, 0], k[0, 0, t:2 * t]) and torch.equal(kb[1, 1], k[1, 1, t:2 * t])
    assert not torch.equal(kb[0, 1], k[0, 1, t:2 * t])


def test_crop_across_a_block_boundary():
    b, h, d, t = 2, 2, 32, 16
    k, v = _randn(b, h, 40, d, seed=8), _randn(b, h, 40, d, seed=9)
    for shadow in (False, True):
        buf = MixedPrecisionBuffer(b, h, d, t, 8, torch.float32, default_tier="int4", shadow=shadow)
        buf.append(k, v)
        before = buf.block(1)[0]
        buf.crop(21)
        assert (buf.seq_len, buf.num_sealed_blocks, buf.tail_len) == (21, 1, 5)
        # Unsealing is exact from the shadow and lossy (the dequantized block) without it.
        assert torch.equal(buf.tail_keys(), k[:, :, t:t + 5] if shadow else before[:, :, :5])
        assert shadow or not torch.equal(buf.tail_keys(), k[:, :, t:t + 5])
        assert buf.memory().tier_pages["int4"] == b * h
        new = _randn(b, h, 30, d, seed=10)
        buf.append(new, new)
        assert buf.seq_len == 51 and torch.equal(buf.tail_keys(), new[:, :, 27:])
        buf.crop(1000)  # past the end: no-op
        assert buf.seq_len == 51
    with pytest.raises(ValueError, match="crop: new_len"):
        buf.crop(-2)


@pytest.mark.parametrize("shadow", [False, True])
def test_index_batch_copies_pages(shadow):
    b, h, d, t = 2, 2, 32, 16
    k, v = _randn(b, h, 37, d, seed=11), _randn(b, h, 37, d, seed=12)
    buf = MixedPrecisionBuffer(b, h, d, t, 8, torch.float32, default_tier="int8", shadow=shadow)
    buf.append(k, v)
    gk, gv = buf.gather()
    idx = torch.tensor([1, 1, 0])
    buf.index_batch(idx)
    assert buf.batch == 3
    assert torch.equal(buf.gather()[0], gk[idx]) and torch.equal(buf.gather()[1], gv[idx])
    assert buf.pages().flatten().unique().numel() == buf.pages().numel()  # no page shared between rows
    buf.set_block_tiers(0, torch.tensor([[5, 5], [-1, -1], [-1, -1]], dtype=torch.int8))
    after = buf.gather()[0]
    assert torch.equal(after[1], gk[1]) and torch.equal(after[2], gk[0]) and not torch.equal(after[0], gk[1])
    buf.index_batch(torch.tensor([2]))
    assert torch.equal(buf.tail_keys(), k[0:1, :, 32:])


# ------------------------------------------------------------------------------------------------------------
# Attention

def _dense(q, k, v, mask, scale, window, softcap, block):
    """Dense FP32 reference on K/V [B, Hkv, L, D]: repeat_kv, one softmax, probability mass per block."""
    b, hq, nq, d = q.shape
    length, g = k.shape[2], hq // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = q.float() @ k.transpose(-1, -2) * (scale or d ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    qpos = torch.arange(length - nq, length)[:, None]
    kpos = torch.arange(length)[None]
    allowed = kpos <= qpos
    if window:
        allowed &= kpos > qpos - window
    allowed = allowed[None, None] & (mask[:, None] if mask is not None else True)
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    nb = -(-length // block)
    mass = torch.nn.functional.pad(p, (0, nb * block - length)).reshape(b, hq, nq, nb, block).sum(-1)
    return p @ v, lse, mass


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seq_len, nq", [(1, 1), (7, 1), (7, 7), (123, 1), (123, 5), (1023, 3)])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (6, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("tier", [Tier.FP32, Tier.INT4, Tier.INT2], ids=str)
def test_attend_matches_dense_reference(device, seq_len, nq, heads, tier, scalar_cpu_path):
    hq, hkv = heads
    b, d, t = 2, 32, 16
    buf = MixedPrecisionBuffer(b, hkv, d, t, 8, torch.float32, device, default_tier=tier)
    buf.append(_randn(b, hkv, seq_len, d, seed=13, device=device) * 1.5, _randn(b, hkv, seq_len, d, seed=14,
                                                                                 device=device))
    q = _randn(b, hq, nq, d, seed=15, device=device) * 1.5
    k, v = buf.gather()
    for window, softcap, scale in [(0, None, None), (9, None, None), (0, 2.0, 0.5)]:
        out, lse, mass = buf.attend(q, scale=scale, sliding_window=window, softcap=softcap, block_mass=True)
        r_out, r_lse, r_mass = _dense(q.cpu(), k.cpu(), v.cpu(), None, scale, window, softcap, t)
        torch.testing.assert_close(out.cpu(), r_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse.cpu(), r_lse, atol=1e-5, rtol=0)
        torch.testing.assert_close(mass.cpu(), r_mass, atol=1e-5, rtol=0)
        torch.testing.assert_close(mass.sum(-1).cpu(), torch.ones(b, hq, nq), atol=1e-5, rtol=0)


def test_attend_mask_and_fully_masked_rows(scalar_cpu_path):
    b, hq, hkv, d, t, length, nq = 2, 4, 2, 32, 16, 50, 3
    buf = MixedPrecisionBuffer(b, hkv, d, t, 8, torch.float32, default_tier="int8")
    buf.append(_randn(b, hkv, length, d, seed=16), _randn(b, hkv, length, d, seed=17))
    q = _randn(b, hq, nq, d, seed=18)
    mask = torch.rand(b, nq, length, generator=torch.Generator().manual_seed(19)) > 0.3
    mask[1, 2] = False  # this query may attend to nothing
    out, lse, mass = buf.attend(q, mask, block_mass=True)
    k, v = buf.gather()
    r_out, r_lse, r_mass = _dense(q, k, v, mask, None, 0, None, t)
    assert not out.isnan().any() and not lse.isnan().any() and not mass.isnan().any()
    assert (out[1, :, 2] == 0).all() and (lse[1, :, 2] == -math.inf).all() and (mass[1, :, 2] == 0).all()
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, r_lse, atol=1e-5, rtol=0)
    torch.testing.assert_close(mass, r_mass, atol=1e-5, rtol=0)
    assert mass is not None and buf.attend(q, mask)[2] is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attend_low_precision_within_2x_of_torch(dtype, scalar_cpu_path):
    b, hq, hkv, d, t, length, nq = 2, 4, 2, 64, 16, 123, 4
    buf = MixedPrecisionBuffer(b, hkv, d, t, 32, dtype, default_tier="int4")
    buf.append(_randn(b, hkv, length, d, dtype=dtype, seed=20), _randn(b, hkv, length, d, dtype=dtype, seed=21))
    q = _randn(b, hq, nq, d, dtype=dtype, seed=22)
    # FP32 reference on exactly what attend reads: each block dequantized to FP32, then the tail.
    n = buf.num_sealed_blocks
    blocks = [buf.block(i, torch.float32) for i in range(n)]
    k32 = torch.cat([x[0] for x in blocks] + [buf.tail_keys().float()], 2)
    v32 = torch.cat([x[1] for x in blocks] + [buf.tail_values().float()], 2)
    ref, _, _ = _dense(q.float(), k32, v32, None, None, 0, None, t)
    out, _, _ = buf.attend(q)
    kg, vg = buf.gather()  # the same cache in the model dtype, attended by torch in that dtype
    causal = torch.ones(nq, length, dtype=torch.bool).tril(length - nq)
    same_dtype = torch.nn.functional.scaled_dot_product_attention(q, kg.repeat_interleave(2, 1),
                                                                  vg.repeat_interleave(2, 1), attn_mask=causal)
    err, err_torch = (out.float() - ref).abs().max(), (same_dtype.float() - ref).abs().max()
    assert out.dtype == dtype and err <= 2 * err_torch, (err, err_torch)


# ------------------------------------------------------------------------------------------------------------
# Bad input

def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="head_dim"):
        MixedPrecisionBuffer(1, 1, 30)
    with pytest.raises(ValueError, match="block_size"):
        MixedPrecisionBuffer(1, 1, 64, 48)
    with pytest.raises(ValueError, match="group_size"):
        MixedPrecisionBuffer(1, 1, 64, 64, 48)
    with pytest.raises(ValueError, match="batch"):
        MixedPrecisionBuffer(0, 1, 64)
    with pytest.raises(ValueError, match="dtype"):
        MixedPrecisionBuffer(1, 1, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="tier"):
        MixedPrecisionBuffer(1, 1, 64, default_tier="int3")


def test_bad_calls_are_refused_and_change_nothing():
    b, h, d, t = 2, 2, 32, 16
    buf = MixedPrecisionBuffer(b, h, d, t, 8, torch.float32)
    x = _randn(b, h, 20, d)
    with pytest.raises(ValueError, match=r"append: k has shape \[2, 3, 20, 32\]"):
        buf.append(_randn(b, 3, 20, d), x)
    with pytest.raises(ValueError, match="append: v has dtype"):
        buf.append(x, x.to(torch.int32))
    with pytest.raises(ValueError, match="seal_tiers: dtype"):
        buf.append(x, x, torch.zeros(b, h, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"seal_tiers: shape \[2, 2, 2\] .* expected \[2, 2, 1\]"):
        buf.append(x, x, torch.zeros(b, h, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="seal_tiers: value 9"):
        buf.append(x, x, torch.full((b, h, 1), 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="65504"):
        buf.append(x * 1e5, x)
    assert buf.seq_len == 0
    buf.append(x, x)
    with pytest.raises(ValueError, match="block: index 1"):
        buf.block(1)
    with pytest.raises(ValueError, match="gather: range"):
        buf.gather(0, 21)
    with pytest.raises(ValueError, match="set_block_tiers: index"):
        buf.set_block_tiers(3, "int2")
    with pytest.raises(ValueError, match="set_block_tiers: tiers: value -2"):
        buf.set_block_tiers(0, torch.full((b, h), -2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"index_batch: idx\[1\] = 5"):
        buf.index_batch(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="index_batch: idx must be"):
        buf.index_batch(torch.tensor([0.0]))
    q = _randn(b, 4, 1, d)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        buf.attend(_randn(b, 3, 1, d))
    with pytest.raises(ValueError, match="attend: q has dtype"):
        buf.attend(q.half())
    with pytest.raises(ValueError, match="attend: mask has shape"):
        buf.attend(q, torch.ones(b, 2, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"Q <= seq_len"):
        buf.attend(_randn(b, 4, 21, d))
    assert buf.seq_len == 20 and buf.batch == b


def test_fp16_tier_refuses_values_it_would_turn_into_inf():
    """An FP32 model's K/V beyond the FP16 range cannot be stored at the fp16 tier (it would become inf):
    append refuses before writing anything, and so does a re-tier."""
    buf = kvprec.MixedPrecisionBuffer(batch=1, kv_heads=1, head_dim=8, block_size=4, group_size=8, dtype=torch.float32,
                                      default_tier="fp16")
    k = torch.randn(1, 1, 4, 8)
    k[0, 0, 1, 2] = 1e6
    with pytest.raises(ValueError, match="65504"):
        buf.append(k, torch.randn(1, 1, 4, 8))
    assert buf.seq_len == 0
    fp32 = kvprec.MixedPrecisionBuffer(batch=1, kv_heads=1, head_dim=8, block_size=4, group_size=8, dtype=torch.float32,
                                       default_tier="fp32")
    fp32.append(k, torch.randn(1, 1, 4, 8))
    with pytest.raises(ValueError, match="65504"):
        fp32.set_block_tiers(0, "fp16")
    assert fp32.tiers()[0, 0, 0].item() == int(kvprec.Tier.FP32)


def test_bool_tiers_are_refused():
    buf = kvprec.MixedPrecisionBuffer(batch=1, kv_heads=1, head_dim=8, block_size=4, group_size=8, dtype=torch.float32,
                                      default_tier="fp32")
    buf.append(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))
    with pytest.raises(ValueError, match="bool"):
        buf.set_block_tiers(0, True)
    with pytest.raises(ValueError, match="bool"):
        buf.set_block_tiers(0, torch.ones(1, 1, dtype=torch.bool))


def test_host_mirrors_follow_the_native_buffer():
    """The wrapper answers seq_len, num_sealed_blocks, tail_len, evicted_blocks, batch and blocks_sealed_by from
    host mirrors (a native call costs microseconds per decode step); after every kind of mutation, refused ones
    included, they must equal the native buffer's own answers."""
    g = torch.Generator().manual_seed(3)
    buf = MixedPrecisionBuffer(batch=2, kv_heads=2, head_dim=32, block_size=8, group_size=8, dtype=torch.float32)

    def check():
        impl = buf._impl
        assert (buf.seq_len, buf.num_sealed_blocks, buf.tail_len, buf.evicted_blocks, buf.batch) == (
            impl.seq_len(), impl.num_sealed_blocks(), impl.tail_len(), impl.evicted_blocks(), impl.batch())
        for n in (0, 1, 7, 8, 30):
            assert buf.blocks_sealed_by(n) == impl.blocks_sealed_by(n)

    def append(n):
        b = buf.batch
        buf.append(torch.randn(b, 2, n, 32, generator=g), torch.randn(b, 2, n, 32, generator=g))

    check()
    for step in range(40):
        op = int(torch.randint(0, 6, (1,), generator=g))
        if op <= 1:
            append(int(torch.randint(1, 20, (1,), generator=g)))
        elif op == 2 and buf.seq_len:
            try:
                buf.crop(int(torch.randint(0, buf.seq_len + 5, (1,), generator=g)))
            except ValueError:  # back into an evicted block: refused, nothing changes
                pass
        elif op == 3:
            buf.evict_blocks(int(torch.randint(0, buf.num_sealed_blocks + 1, (1,), generator=g)))
        elif op == 4:
            buf.index_batch(torch.randint(0, buf.batch, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g))
        elif op == 5 and step % 10 == 9:
            buf.reset()
        check()
    with pytest.raises(ValueError):
        buf.append(torch.full((buf.batch, 2, 9, 32), float("inf")), torch.zeros(buf.batch, 2, 9, 32))
    with pytest.raises(ValueError):
        buf.crop(-1)
    with pytest.raises(ValueError):
        buf.evict_blocks(buf.num_sealed_blocks + 1)
    with pytest.raises(ValueError):
        buf.blocks_sealed_by(-1)
    check()
