"""Reference decode attention over a paged mixed-tier cache (kvprec/reference), its PagedKV builders, and the
registered op: block-by-block FP32 online softmax against dense FP32 softmax attention on the same dequantized
K/V (1e-5 level), block mass, masks, GQA, the buffer adapter, dispatch and input errors; then the backends of
kvprec.ops.decode_attention against the FP32 reference ("torch" everywhere, "cuda" where the CUDA kernels are
built and a GPU exists), the kvprec::decode_attention op's fake, opcheck and input errors."""
import math
from dataclasses import replace

import pytest
import torch

import kvprec
from kvprec.ops import native as _ops
from kvprec.ops.reference import quantize as quantize_ref
from kvprec import ops
from kvprec.storage.formats import Tier
from kvprec.ops.reference import PagedKV, decode_attention, dense_decode_attention

from helpers import evicted_view

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
                qk = quantize_ref.quantize_keys(k[b, h, blk][None], tier)
                qv = quantize_ref.quantize_values(v[b, h, blk][None], tier, 8)
                assert torch.equal(k_dense[b, h, blk], quantize_ref.dequantize_keys(qk, tier, 32, torch.float32)[0])
                assert torch.equal(v_dense[b, h, blk], quantize_ref.dequantize_values(qv, tier, 32, 8, torch.float32)[0])
    assert torch.equal(k_dense[:, :, 96:], k[:, :, 96:].float())


@native
def test_from_buffer_matches_the_buffers_own_attend(scalar_cpu_path):
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
    # A buffer keeps its pools and table consistent, so a view of it re-checks only the tail on each call.
    assert paged.buffer_owned and not PagedKV.from_dense(*buf.gather(), tiers, t, 16).buffer_owned
    with pytest.raises(ValueError, match="tail_k and tail_v must both be"):
        decode_attention(q, replace(paged, tail_v=paged.tail_v[:, :1]))


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


# ---------------------------------------------------------------------------------------------------------
# Backends against the FP32 reference: "torch" everywhere (so that the comparison itself runs on CPU CI), "cuda"
# where the CUDA kernels are built and a GPU exists (csrc/cuda/decode_attention_kernels.cu). Error rule of the
# kernels (docs/design.md, "Kernels and dispatch"; as python_tests/test_triton_kernels.py): over the rows that may
# attend to something, max |backend - FP32 reference| <= 2 * max |torch in q's dtype - FP32 reference| + 1e-5
# for out, lse and block mass, where the FP32 reference runs on the same dequantized K/V; rows that may attend to
# nothing get out 0, lse -inf and mass 0 exactly.

cuda_kernels = pytest.mark.skipif(not kvprec.cuda_kernels_available(),
                                  reason="needs the CUDA kernels (a KVPREC_CUDA build) and a GPU")
BACKENDS = [pytest.param("torch"), pytest.param("cuda", marks=cuda_kernels)]


def backend_case(backend, b, hkv, g, nq, n, d, t, dtype, *, tiers="mixed", use_mask=False, group_size=16, seed=0,
                 kv_dtype=None):
    """q, PagedKV and mask on the backend's device. K/V are drawn in FP32 and stored from ``kv_dtype`` (q's
    dtype by default; the tail keeps that dtype), at random tiers per block (or one tier)."""
    device = "cuda" if backend == "cuda" else "cpu"
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, n, d, generator=gen)
    v = torch.randn(b, hkv, n, d, generator=gen)
    if tiers == "mixed":
        tiers = torch.randint(0, len(Tier), (b, hkv, n // t), generator=gen).to(torch.int8)
    kv_dtype = kv_dtype or dtype
    paged = PagedKV.from_dense(k.to(kv_dtype).to(device), v.to(kv_dtype).to(device), tiers, t, group_size,
                               generator=gen)
    q = torch.randn(b, hkv * g, nq, d, generator=gen).to(dtype).to(device)
    mask = (torch.rand(b, nq, n, generator=gen) > 0.3).to(device) if use_mask else None
    return q, paged, mask


def check_backend_against_fp32(backend, q, paged, mask=None, window=0, cap=0.0, got=None):
    """Run ``backend`` with block mass (or take its result ``got``) and apply the error rule above."""
    if got is None:
        got = ops.decode_attention(q, paged, mask=mask, sliding_window=window, softcap=cap, block_mass=True,
                                   backend=backend)
    got_out, got_lse, got_mass = got
    ref_out, ref_lse, ref_mass = decode_attention(q.float(), paged, mask=mask, sliding_window=window, softcap=cap,
                                                  block_mass=True)
    assert got_out.dtype == q.dtype and got_out.shape == q.shape and got_out.device == q.device
    assert got_lse.dtype == torch.float32 and got_mass.shape == ref_mass.shape
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(got_lse), empty)
    assert (got_out[empty] == 0).all() and (got_mass[empty] == 0).all()
    live = ~empty
    k, v = paged.dense()
    same_out, same_lse, weights = dense_decode_attention(q, k, v, mask=mask, sliding_window=window, softcap=cap,
                                                         dtype=q.dtype)
    same_mass = block_sums(weights, paged.seq_len, paged.block_size)
    for name, got_x, same_x, ref_x in (("out", got_out, same_out, ref_out), ("lse", got_lse, same_lse, ref_lse),
                                       ("block_mass", got_mass, same_mass, ref_mass)):
        bound = 2 * (same_x.float() - ref_x)[live].abs().max().item() + 1e-5
        err = (got_x.float() - ref_x)[live].abs().max().item()
        assert err <= bound, f"{backend} {name}: error {err:.3g} > bound {bound:.3g}"
    return got


BACKEND_CASES = [  # b, hkv, g, q, n, d, block_size, dtype, mask, window, softcap, group_size, K/V dtype
    (1, 2, 2, 1, 1, 64, 16, torch.float16, False, 0, 0.0, 16, None),       # one position: the tail only
    (2, 2, 2, 1, 7, 64, 16, torch.float16, False, 0, 0.0, 16, None),       # tail only
    (2, 2, 2, 1, 123, 64, 16, torch.float16, False, 0, 0.0, 16, None),     # 7 mixed blocks + tail 11
    (1, 2, 2, 1, 128, 64, 16, torch.float16, False, 0, 0.0, 16, None),     # no tail
    (2, 2, 2, 1, 123, 64, 16, torch.bfloat16, True, 0, 0.0, 16, None),
    (1, 2, 2, 1, 123, 128, 32, torch.bfloat16, False, 0, 0.0, 8, None),    # several value groups per thread
    (2, 2, 2, 3, 123, 64, 16, torch.float16, True, 40, 3.0, 16, None),     # Q > 1, everything on
    (1, 2, 2, 4, 123, 64, 16, torch.bfloat16, False, 20, 0.0, 16, None),   # the window skips early blocks
    (1, 2, 2, 2, 123, 256, 16, torch.float16, False, 0, 5.0, 16, None),
    (2, 2, 4, 5, 123, 64, 16, torch.float16, False, 0, 0.0, 16, None),     # G*Q = 20 > 16: two row tiles
    (1, 2, 2, 1, 300, 128, 64, torch.float16, True, 0, 30.0, 32, torch.float32),  # FP32 tail under fp16 q
    (1, 1, 2, 1, 1023, 64, 16, torch.float16, False, 0, 0.0, 16, None),
    (1, 2, 4, 1, 4099, 128, 64, torch.bfloat16, False, 0, 0.0, 32, None),  # a longer sequence
    (1, 1, 1, 1, 300, 64, 128, torch.float16, True, 0, 0.0, 64, None),     # block 128, one value group per row
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BACKEND_CASES, ids=lambda c: "b{}h{}g{}q{}n{}d{}t{}-{}{}{}{}-g{}{}".format(
    *c[:7], str(c[7]).removeprefix("torch."), "-mask" if c[8] else "", f"-win{c[9]}" if c[9] else "",
    f"-cap{c[10]:g}" if c[10] else "", c[11], "-kv32" if c[12] else ""))
def test_backend_matches_fp32_reference(backend, case):
    b, hkv, g, nq, n, d, t, dtype, use_mask, window, cap, group_size, kv_dtype = case
    q, paged, mask = backend_case(backend, b, hkv, g, nq, n, d, t, dtype, use_mask=use_mask, group_size=group_size,
                                  kv_dtype=kv_dtype)
    check_backend_against_fp32(backend, q, paged, mask, window, cap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tier", list(Tier), ids=str)
def test_backend_single_tier(backend, tier, dtype):
    """One pool only. K/V come from FP32, so fp16 / bf16 / fp32 tiers under the other q dtype are rounded to q's
    dtype on the way to the dot, as the same-dtype oracle rounds them: the errors then share their origin, and the
    2x rule needs enough rows (16 here) for its maxima to be stable: in a CPU emulation of the CUDA kernel's
    arithmetic, fp16 K under bf16 q exceeded the bound for 2 of 6 seeds with 4 rows, and for none of 20 with 16."""
    q, paged, _ = backend_case(backend, 2, 2, 2, 2, 69, 64, 16, dtype, tiers=tier, group_size=32, seed=1,
                               kv_dtype=torch.float32)
    assert list(paged.pools) == [tier]
    check_backend_against_fp32(backend, q, paged)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_fully_masked_row_and_window_before_every_block(backend):
    q, paged, mask = backend_case(backend, 2, 2, 2, 2, 70, 64, 16, torch.float16, use_mask=True, seed=2)
    mask[1, 0] = False  # batch row 1, query 0 sees nothing
    out, lse, mass = check_backend_against_fp32(backend, q, paged, mask, window=5)
    assert torch.isinf(lse[1, :, 0]).all()
    assert (mass[..., :3] == 0).all()  # blocks 0..2 end before position 64 - 5: never read, mass 0


@cuda_kernels
def test_cuda_split_count_changes_nothing_beyond_rounding():
    q, paged, _ = backend_case("cuda", 1, 2, 2, 1, 1000, 128, 16, torch.float16, seed=3)
    args = (q, _ops.flatten_decode_pools(paged), paged.tiers, paged.pages, paged.tail_k, paged.tail_v, 16, 16,
            1 / math.sqrt(128), None, 0, 0.0, True)
    runs = [torch.ops.kvprec.decode_attention(*args, num_splits=s) for s in (1, 3, 100)]
    for got in runs:
        check_backend_against_fp32("cuda", q, paged, got=got)
    for out, lse, mass in runs[1:]:
        assert (out.float() - runs[0][0].float()).abs().max().item() <= 2 ** -10
        torch.testing.assert_close(lse, runs[0][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass, runs[0][2], atol=1e-6, rtol=1e-4)


@cuda_kernels
def test_cuda_over_a_live_buffer():
    b, hkv, d, t, n = 2, 2, 128, 64, 300
    gen = torch.Generator().manual_seed(4)
    buf = kvprec.MixedPrecisionBuffer(b, hkv, d, t, 32, dtype=torch.bfloat16, device="cuda")
    tiers = torch.randint(0, len(Tier), (b, hkv, n // t), generator=gen).to(torch.int8)
    buf.append(torch.randn(b, hkv, n, d, generator=gen).cuda(), torch.randn(b, hkv, n, d, generator=gen).cuda(), tiers)
    q = torch.randn(b, 8, 1, d, generator=gen).to(torch.bfloat16).cuda()
    check_backend_against_fp32("cuda", q, PagedKV.from_buffer(buf), window=100)


@cuda_kernels
def test_cuda_auto_dispatch_and_capability_checks():
    q, paged, _ = backend_case("cuda", 1, 2, 2, 1, 40, 64, 16, torch.float16)
    assert ops.resolve_backend("decode_attention", "auto", q.device) == "cuda"
    got = ops.decode_attention(q, paged, block_mass=True)
    want = ops.decode_attention(q, paged, block_mass=True, backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert ops.decode_attention(q, paged, backend="cuda")[2] is None
    # float32 q is outside the CUDA kernel: auto passes it on (Triton or the reference), an explicit "cuda" says so
    q32 = q.float()
    out, lse, _ = ops.decode_attention(q32, paged)
    ref_out, ref_lse, _ = decode_attention(q32, paged)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="q dtype Float is not accepted"):
        ops.decode_attention(q32, paged, backend="cuda")


@cuda_kernels
def test_cuda_bad_inputs_are_named():
    q, paged, _ = backend_case("cuda", 1, 2, 2, 1, 40, 32, 16, torch.float16)
    with pytest.raises(RuntimeError, match=r"head_dim 32 is not supported; accepted head_dim 64, 128, 256"):
        ops.decode_attention(q, paged, backend="cuda")
    q, paged, _ = backend_case("cuda", 1, 2, 2, 1, 40, 64, 8, torch.float16, group_size=8)
    with pytest.raises(RuntimeError, match="block_size 8 is not supported"):
        ops.decode_attention(q, paged, backend="cuda")
    q, paged, mask = backend_case("cuda", 1, 2, 2, 1, 40, 64, 16, torch.float16, use_mask=True)
    flat = _ops.flatten_decode_pools(paged)
    rest = (paged.tiers, paged.pages, paged.tail_k, paged.tail_v, 16, 16, 0.125)
    with pytest.raises(RuntimeError, match="pools must hold 24 slots"):
        torch.ops.kvprec.decode_attention(q, flat[:-1], *rest, None, 0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"mask must be \[B=1, Q=1, N=40\]"):
        torch.ops.kvprec.decode_attention(q, flat, *rest, mask[..., :-1], 0, 0.0, False)
    with pytest.raises(RuntimeError, match="tiers must be int8"):
        torch.ops.kvprec.decode_attention(q, flat, paged.tiers.int(), *rest[1:], None, 0, 0.0, False)
    i = next(i for i, x in enumerate(flat) if x is not None)
    strided = flat.copy()
    strided[i] = torch.empty(*flat[i].shape[:-1], 2 * flat[i].shape[-1], dtype=flat[i].dtype,
                             device="cuda")[..., ::2]
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.kvprec.decode_attention(q, strided, *rest, None, 0, 0.0, False)


@cuda_kernels
def test_cuda_unreadable_table_entry_poisons_only_its_rows():
    """A tier without a pool or a page past its pool cannot be reported without a synchronisation: the kernel
    reads nothing for it and makes the rows of that (batch row, KV head) NaN instead of faulting."""
    q, paged, _ = backend_case("cuda", 1, 2, 2, 1, 64, 64, 16, torch.float16, tiers=Tier.INT4)
    flat = _ops.flatten_decode_pools(paged)
    no_pool, past_pool = paged.tiers.clone(), paged.pages.clone()
    no_pool[0, 1, 2] = int(Tier.INT8)  # there is no int8 pool; KV head 1 serves query heads 2 and 3
    past_pool[0, 1, 2] = 10 ** 6
    for tiers, pages in ((no_pool, paged.pages), (paged.tiers, past_pool)):
        out, lse, _ = torch.ops.kvprec.decode_attention(q, flat, tiers, pages, paged.tail_k, paged.tail_v, 16, 16,
                                                        0.125, None, 0, 0.0, False)
        assert torch.isnan(out[0, 2:]).all() and torch.isnan(lse[0, 2:]).all()
        assert torch.isfinite(out[0, :2]).all() and torch.isfinite(lse[0, :2]).all()


@cuda_kernels
@pytest.mark.parametrize("block_mass", [True, False])
def test_cuda_opcheck(block_mass):
    q, paged, mask = backend_case("cuda", 1, 2, 2, 1, 40, 64, 16, torch.float16, use_mask=True)
    args = (q, _ops.flatten_decode_pools(paged), paged.tiers, paged.pages, paged.tail_k, paged.tail_v, 16, 16,
            0.125, mask, 0, 0.0, block_mass, 2)
    torch.library.opcheck(torch.ops.kvprec.decode_attention.default, args)


@native
def test_decode_attention_fake_kernel_shapes():
    """The fake of kvprec::decode_attention (kvprec/ops/native.py), traced without any kernel: shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    paged = make_paged(1, 2, 50, 64, 16)  # NB = 3 sealed blocks + a tail of 2
    q = torch.randn(1, 4, 3, 64).half()
    with FakeTensorMode() as mode:
        fake = mode.from_tensor
        args = ([None if x is None else fake(x) for x in _ops.flatten_decode_pools(paged)], fake(paged.tiers),
                fake(paged.pages), fake(paged.tail_k), fake(paged.tail_v), 16, 16, 0.125, None, 0, 0.0)
        out, lse, mass = torch.ops.kvprec.decode_attention(fake(q), *args, True)
        assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((1, 4, 3, 64), torch.float16, (1, 4, 3), torch.float32)
        assert mass.shape == (1, 4, 3, 4) and mass.dtype == torch.float32
        assert torch.ops.kvprec.decode_attention(fake(q), *args, False)[2].shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq", [1, 3])
def test_evicted_blocks_are_never_read(backend, nq):
    """A sliding-window layer's evicted blocks (tier -1, page -1) lie below every query's window: the result is
    the one over the full table, bit for bit; a window that would reach them is refused by every backend."""
    dtype = torch.float16
    q, paged, mask = backend_case(backend, 2, 2, 2, nq, 150, 64, 16, dtype, use_mask=True, seed=7)
    window = 150 - nq - 4 * 16 + 1  # the earliest query sees positions > 4*16 - 1: blocks 0..3 are skipped
    full = ops.decode_attention(q, paged, mask=mask, sliding_window=window, block_mass=True, backend=backend)
    gone = evicted_view(paged, 4)
    got = ops.decode_attention(q, gone, mask=mask, sliding_window=window, block_mass=True, backend=backend)
    for a, b in zip(full, got):
        assert torch.equal(a, b)
    assert (got[2][..., :4] == 0).all()
    check_backend_against_fp32(backend, q, gone, mask, window, got=got)
    for bad in (window + 1, 0):
        with pytest.raises(ValueError, match="were evicted"):
            ops.decode_attention(q, gone, mask=mask, sliding_window=bad, backend=backend)


def test_evicted_table_is_validated():
    paged = make_paged(1, 2, 80, 64, 16)
    with pytest.raises(ValueError, match="must fill exactly blocks"):
        replace(evicted_view(paged, 2), evicted_blocks=1).validate()
    with pytest.raises(ValueError, match="evicted_blocks 9 must lie"):
        replace(paged, evicted_blocks=9).validate()
    with pytest.raises(ValueError, match="was evicted"):
        evicted_view(paged, 2).block(1)
