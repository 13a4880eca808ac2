"""Storage formats: the torch reference against the C++ kernels (bit for bit), the stated error bound,
packing, directed FP16 rounding, the tier table against formats.h, and clear errors on bad input."""
import math

import pytest
import torch

import kvprec
from kvprec.ops.reference import quantize as quantize_ref
from kvprec import ops
from kvprec.storage.formats import BlockGeometry, Tier

from helpers import same_bits

INT_TIERS = [Tier.INT8, Tier.INT4, Tier.INT2]
ALL_TIERS = list(Tier)
native = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


def _keys(n, t, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Per-channel magnitudes spanning 3 decades plus a few outlier channels, as real keys have.
    x = torch.randn(n, t, d, generator=g) * torch.logspace(-1, 2, d)[torch.randperm(d, generator=g)]
    return x.to(dtype)


@native
def test_tier_table_matches_header():
    table = torch.ops.kvprec.tier_table()
    for tier in Tier:
        bits, qmax, per_byte, eff = table[int(tier)].tolist()
        assert (bits, qmax, per_byte) == (tier.bits, tier.qmax, tier.codes_per_byte), tier
        assert eff == int(tier.effective_bits * 1e6), tier


def test_tier_properties():
    assert [t.bits for t in Tier] == [32, 16, 16, 8, 4, 2]
    assert Tier.INT4.qmax == 15 and Tier.INT2.codes_per_byte == 4
    assert Tier.INT8.effective_bits == pytest.approx(math.log2(255))
    assert Tier.parse("int4") is Tier.INT4 and Tier.parse("FP16") is Tier.FP16 and Tier.parse(5) is Tier.INT2


@pytest.mark.parametrize("bad", ["int3", "fp8", 6, -1, None])
def test_tier_parse_rejects(bad):
    with pytest.raises(ValueError, match="tier: .* accepted fp32, fp16, bf16, int8, int4, int2"):
        Tier.parse(bad)


def test_page_bytes_by_hand():
    geo = BlockGeometry(block_size=64, head_dim=128, group_size=32)
    # INT4: K and V data 64*128/2 each, K scale+zero 2*128*2, V scale+zero 2*64*4*2
    assert geo.page_bytes(Tier.INT4) == 2 * 4096 + 512 + 1024 == 9728
    assert geo.page_bytes(Tier.FP16) == 2 * 64 * 128 * 2
    assert geo.page_bytes(Tier.INT2) == 2 * 2048 + 512 + 1024


@pytest.mark.parametrize("kw, match", [(dict(block_size=48), "block_size"), (dict(head_dim=66), "head_dim"),
                                       (dict(head_dim=64, group_size=24), "group_size")])
def test_geometry_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        BlockGeometry(**kw)


@native
@pytest.mark.parametrize("tier", ALL_TIERS, ids=str)
@pytest.mark.parametrize("t", [1, 7, 123, 1023])
@pytest.mark.parametrize("d,group", [(4, 4), (64, 32), (128, 128), (128, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cpp_matches_reference_bit_for_bit(tier, t, d, group, dtype):
    x = _keys(2, t, d, dtype, seed=t * d)
    for quant, deq, extra in ((ops.quantize_keys, ops.dequantize_keys, ()),
                              (ops.quantize_values, ops.dequantize_values, (group,))):
        ref = quant(x, tier, *extra, backend="torch")
        cpp = quant(x, tier, *extra, backend="cpp")
        assert same_bits(ref.codes, cpp.codes)
        if tier.is_integer:
            assert same_bits(ref.scale, cpp.scale) and same_bits(ref.zero, cpp.zero)
        for out_dtype in (dtype, torch.float32):
            a = deq(ref, tier, d, *extra, out_dtype, backend="torch")
            b = deq(ref, tier, d, *extra, out_dtype, backend="cpp")
            assert same_bits(a, b)


@pytest.mark.parametrize("tier", INT_TIERS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_element_error_bound(tier, dtype):
    """|x - x'| <= scale/2 per group, plus FP32 rounding of (x - zero)/scale and code*scale + zero:
    at most a few ulp of |x| + scale, bounded here by 2^-21 (|x| + scale)."""
    x = _keys(3, 123, 64, dtype, seed=7).float()
    kq = quantize_ref.quantize_keys(x, tier)
    err_k = (quantize_ref.dequantize_keys(kq, tier, 64, torch.float32) - x).abs()
    bound_k = quantize_ref.element_error_bound(kq.scale).unsqueeze(1)
    assert (err_k <= bound_k + 2**-21 * (x.abs() + 2 * bound_k)).all()
    vq = quantize_ref.quantize_values(x, tier, 16)
    err_v = (quantize_ref.dequantize_values(vq, tier, 64, 16, torch.float32) - x).abs().reshape(3, 123, 4, 16)
    bound_v = quantize_ref.element_error_bound(vq.scale).unsqueeze(-1)
    assert (err_v <= bound_v + 2**-21 * (x.reshape(3, 123, 4, 16).abs() + 2 * bound_v)).all()
    # The bound is tight: some element reaches at least 90% of it (a loose bound would hide a regression).
    assert (err_k / bound_k.clamp_min(1e-30)).max() > 0.9


def test_bound_holds_at_fp16_extremes():
    x = torch.tensor([[[-65504.0, 65504.0, 1e-7, -6e-8]]]).transpose(1, 2).repeat(1, 1, 4)  # [1, 4, 4]
    for tier in INT_TIERS:
        q = quantize_ref.quantize_keys(x, tier)
        assert torch.isfinite(q.scale.float()).all()
        err = (quantize_ref.dequantize_keys(q, tier, 4, torch.float32) - x).abs()
        assert (err <= q.scale.float().unsqueeze(1) / 2 * (1 + 2**-20)).all()


def test_constant_group_is_exact():
    x = torch.full((1, 8, 4), 3.0)
    q = quantize_ref.quantize_keys(x, Tier.INT4)
    assert torch.equal(quantize_ref.dequantize_keys(q, Tier.INT4, 4, torch.float32), x)


def test_directed_rounding():
    x = torch.randn(10000) * torch.logspace(-8, 4.8, 10000)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 65504.0, -65504.0, 1e-9, -1e-9])])
    down, up = quantize_ref.fp16_round_down(x), quantize_ref.fp16_round_up(x)
    assert (down.float() <= x).all() and (up.float() >= x).all()
    exact = x.half().float() == x
    # Tightness: where x is not an FP16 value, up is the FP16 successor of down (nothing lies between).
    successor = quantize_ref._step_fp16(down, toward_negative=False).float()
    assert torch.equal(successor[~exact], up[~exact].float())
    assert torch.equal(down[exact].float(), x[exact]) and torch.equal(up[exact].float(), x[exact])


@pytest.mark.parametrize("tier", INT_TIERS, ids=str)
def test_pack_unpack_roundtrip(tier):
    codes = torch.randint(0, tier.qmax + 1, (3, 5, 64), dtype=torch.uint8)
    packed = quantize_ref.pack_codes(codes, tier)
    assert packed.shape[-1] == 64 * tier.bits // 8
    assert torch.equal(quantize_ref.unpack_codes(packed, tier, 64), codes)
    if tier is Tier.INT4:  # element 2j in the low nibble
        assert packed[0, 0, 0].item() == codes[0, 0, 0].item() | (codes[0, 0, 1].item() << 4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=native)])
def test_bad_input_errors(backend):
    with pytest.raises((ValueError, RuntimeError), match=r"\|x\| <= 65504"):
        ops.quantize_keys(torch.full((1, 4, 4), 1e6), "int4", backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="finite"):
        ops.quantize_keys(torch.full((1, 4, 4), float("nan")), "int8", backend=backend)
    with pytest.raises((ValueError, RuntimeError), match=r"\[N, T, D\]"):
        ops.quantize_keys(torch.zeros(4, 4), "int4", backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="group_size"):
        ops.quantize_values(torch.zeros(1, 4, 8), "int4", 3, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="floating dtype"):
        ops.quantize_keys(torch.zeros(1, 4, 4, dtype=torch.int32), "int4", backend=backend)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend: 'fast' is not accepted"):
        ops.quantize_keys(torch.zeros(1, 4, 4), "int4", backend="fast")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        ops.quantize_keys(torch.zeros(1, 4, 4), "int4", backend="cuda")


def test_auto_backend_on_cpu_is_the_reference():
    assert ops.resolve_backend("quantize_keys", "auto", torch.device("cpu")) == "torch"


@native
def test_signed_zeros_store_the_same_bits():
    """A group whose min or max is a zero of either sign stores +0 bits in every implementation."""
    x = torch.tensor([0.0, -0.0, 1.0, 2.0, -0.0, 0.0, 0.0, -0.0]).reshape(1, 8, 1).repeat(1, 1, 4)
    x[..., 1] = -x[..., 1].abs()  # channel 1: values <= 0 with max a zero
    for tier in INT_TIERS:
        ref, cpp = ops.quantize_keys(x, tier, backend="torch"), ops.quantize_keys(x, tier, backend="cpp")
        assert same_bits(ref.zero, cpp.zero) and same_bits(ref.scale, cpp.scale) and torch.equal(ref.codes, cpp.codes)
        assert not torch.signbit(ref.zero[0, 0]) and not torch.signbit(ref.scale[0, 1])


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=native)])
@pytest.mark.parametrize("tier", INT_TIERS, ids=str)
def test_dequantize_to_fp16_stays_finite_at_the_range_ends(backend, tier):
    """A group spanning +-65504: code * scale + zero can round past 65504 by up to scale / 2; the clamp to the
    input contract keeps an FP16 result finite without moving any x' away from its x."""
    x = torch.tensor([-65504.0, -1000.0, 3.0, 65504.0]).reshape(1, 4, 1).repeat(1, 1, 4).half()
    q = ops.quantize_keys(x, tier, backend=backend)
    y = ops.dequantize_keys(q, tier, 4, torch.float16, backend=backend)
    assert torch.isfinite(y).all()
    assert ((y.float() - x.float()).abs() <= q.scale.float().unsqueeze(1) / 2 * (1 + 2**-20)).all()
    qv = ops.quantize_values(x, tier, 4, backend=backend)
    assert torch.isfinite(ops.dequantize_values(qv, tier, 4, 4, torch.float16, backend=backend)).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=native)])
def test_fp16_tier_refuses_out_of_range_wider_inputs(backend):
    x = torch.randn(1, 4, 8)
    x[0, 1, 3] = -1e5
    for quant, extra in ((ops.quantize_keys, ()), (ops.quantize_values, (8,))):
        with pytest.raises(ValueError, match="fp16 tier holds"):
            quant(x, "fp16", *extra, backend=backend)
        assert quant(x, "bf16", *extra, backend=backend).codes.dtype == torch.bfloat16  # bf16 covers it


def test_default_group_size_is_the_largest_divisor_up_to_64():
    from kvprec.storage.formats import default_group_size

    assert [default_group_size(d) for d in (4, 12, 32, 64, 80, 96, 128, 256)] == [4, 12, 32, 64, 40, 48, 64, 64]
    assert BlockGeometry().group_size == 64 and BlockGeometry(head_dim=80).group_size == 40
    assert BlockGeometry(head_dim=128, group_size=32).group_size == 32
    with pytest.raises(ValueError, match="head_dim: 0"):
        default_group_size(0)
