"""Triton kernels (triton_kernels/, launchers kvprec/ops/triton/) against the pure-torch references.

On a machine without CUDA they run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by triton_device before
anything imports triton); on a GPU they compile for it. Tolerances by kind (docs/design.md, "Kernels and dispatch"):

* quantize / dequantize: bit for bit against kvprec.ops.reference.quantize;
* attention: err(kernel) <= 2 * err(torch same dtype) + 1e-5 for out, lse and block mass, where err(x) is the max
  abs difference from the FP32 reference (kvprec.ops.reference.decode_attention with FP32 q on the same dequantized
  K/V) and "torch same dtype" is dense attention with products and softmax in q's dtype
  (kvprec.ops.reference.dense_decode_attention). The 1e-5 floor covers cases where the same-dtype error is ~0
  (one position: the output is exactly V); FP32 q is held to 1e-5 alone.

The interpreter does not run the compiler, so one test also compiles a few launches for sm_90 (triton's bundled
ptxas, no GPU) and checks the PTX for the rounding the formats need.
"""
from triton_device import DEVICE, skip_module_without_triton  # first: sets TRITON_INTERPRET without CUDA

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

skip_module_without_triton()

import kvprec  # noqa: E402
from kvprec.ops import native as _ops  # noqa: E402
from kvprec.ops.reference import quantize as quantize_ref
from kvprec import ops
from kvprec.storage.formats import Tier  # noqa: E402
from kvprec.ops.reference import PagedKV, decode_attention, dense_decode_attention  # noqa: E402
from kvprec.ops.triton import decode_attention as tda  # noqa: E402
from kvprec.ops.triton import quantize as tq  # noqa: E402

from helpers import awkward_blocks, evicted_view, same_bits  # noqa: E402
from triton_sm90 import run_compile_script  # noqa: E402

gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (the interpreter cannot trace fake tensors)")
native = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


# ---------------------------------------------------------------------------------------------------------
# decode attention

def make_case(b, hkv, g, nq, n, d, t, dtype, *, tiers="mixed", use_mask=False, group_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, n, d, generator=gen)
    v = torch.randn(b, hkv, n, d, generator=gen)
    if tiers == "mixed":
        tiers = torch.randint(0, len(Tier), (b, hkv, n // t), generator=gen).to(torch.int8)
    paged = PagedKV.from_dense(k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE), tiers, t, group_size, generator=gen)
    q = torch.randn(b, hkv * g, nq, d, generator=gen).to(dtype).to(DEVICE)
    mask = (torch.rand(b, nq, n, generator=gen) > 0.3).to(DEVICE) if use_mask else None
    return q, paged, mask


def check_against_fp32(q, paged, mask=None, window=0, cap=0.0, num_splits=None):
    """Run the kernel with block mass and apply the error rule of the module docstring."""
    got_out, got_lse, got_mass = tda.decode_attention(q, paged, mask=mask, sliding_window=window, softcap=cap,
                                                      block_mass=True, num_splits=num_splits)
    ref_out, ref_lse, ref_mass = decode_attention(q.float(), paged, mask=mask, sliding_window=window, softcap=cap,
                                                  block_mass=True)
    assert got_out.dtype == q.dtype and got_out.shape == q.shape
    assert got_lse.dtype == torch.float32 and got_mass.shape == ref_mass.shape
    # rows with nothing to attend: exactly out 0, lse -inf, mass 0
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(got_lse), empty)
    assert (got_out[empty] == 0).all() and (got_mass[empty] == 0).all()
    live = ~empty
    if q.dtype == torch.float32:
        bounds = (1e-5, 1e-5, 1e-5)
        same = None
    else:
        k, v = paged.dense()
        same = dense_decode_attention(q, k, v, mask=mask, sliding_window=window, softcap=cap, dtype=q.dtype)
        n, t = paged.seq_len, paged.block_size
        nbt = math.ceil(n / t)
        same_mass = torch.nn.functional.pad(same[2], (0, nbt * t - n)).reshape(*same[2].shape[:-1], nbt, t).sum(-1)
        bounds = tuple(2 * (a.float() - r)[live].abs().max().item() + 1e-5
                       for a, r in ((same[0], ref_out), (same[1], ref_lse), (same_mass, ref_mass)))
    errs = tuple((a.float() - r)[live].abs().max().item()
                 for a, r in ((got_out, ref_out), (got_lse, ref_lse), (got_mass, ref_mass)))
    for name, err, bound in zip(("out", "lse", "block_mass"), errs, bounds):
        assert err <= bound, f"{name}: kernel error {err:.3g} > bound {bound:.3g}"
    return got_out, got_lse, got_mass


CASES = [  # b, hkv, g, q, n, d, t, dtype, mask, window, softcap, splits
    (1, 2, 2, 1, 1, 64, 16, torch.float16, False, 0, 0.0, None),      # one position, tail only
    (2, 2, 2, 1, 7, 64, 16, torch.float16, False, 0, 0.0, None),      # tail only
    (2, 2, 2, 1, 123, 64, 16, torch.float16, False, 0, 0.0, None),    # 7 mixed blocks + tail 11
    (1, 2, 2, 1, 128, 64, 16, torch.float16, False, 0, 0.0, 3),       # no tail
    (2, 2, 2, 1, 123, 64, 16, torch.bfloat16, True, 0, 0.0, 2),
    (1, 2, 2, 1, 123, 128, 16, torch.bfloat16, False, 0, 0.0, None),
    (2, 2, 2, 3, 123, 64, 16, torch.float16, True, 40, 3.0, 4),       # Q > 1, everything on
    (1, 2, 2, 4, 123, 64, 16, torch.bfloat16, False, 20, 0.0, 8),     # window skips early blocks
    (1, 2, 2, 1, 123, 256, 16, torch.float16, False, 0, 0.0, 1),
    (1, 2, 2, 2, 50, 64, 8, torch.float32, True, 0, 2.0, 3),          # T < 16: the tl.sum path, FP32 q
    (2, 2, 4, 5, 123, 64, 16, torch.float16, False, 0, 0.0, None),    # G*Q = 20 > 16: two row tiles
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}g{}q{}n{}d{}t{}-{}{}{}{}-s{}".format(
    *c[:7], str(c[7]).removeprefix("torch."), "-mask" if c[8] else "", f"-win{c[9]}" if c[9] else "",
    f"-cap{c[10]:g}" if c[10] else "", c[11]))
def test_decode_matches_fp32_reference(case):
    b, hkv, g, nq, n, d, t, dtype, use_mask, window, cap, splits = case
    q, paged, mask = make_case(b, hkv, g, nq, n, d, t, dtype, use_mask=use_mask)
    check_against_fp32(q, paged, mask, window, cap, splits)


@pytest.mark.parametrize("tier", list(Tier), ids=str)
def test_decode_single_tier(tier):
    """One pool only: the kernel compiles a single branch with no runtime tier test."""
    q, paged, _ = make_case(1, 2, 2, 1, 69, 64, 16, torch.float16, tiers=tier, group_size=32)
    assert list(paged.pools) == [tier]
    check_against_fp32(q, paged, num_splits=2)


def test_decode_longer_sequence_block_size_64():
    q, paged, mask = make_case(2, 2, 2, 1, 300, 128, 64, torch.float16, use_mask=True, group_size=32)
    check_against_fp32(q, paged, mask, cap=30.0)


def test_split_count_does_not_change_the_result_beyond_rounding():
    q, paged, _ = make_case(1, 2, 2, 1, 123, 64, 16, torch.float16)
    outs = [tda.decode_attention(q, paged, block_mass=True, num_splits=s) for s in (1, 3, 100)]
    for out, lse, mass in outs[1:]:
        assert (out.float() - outs[0][0].float()).abs().max().item() <= 2 ** -10
        torch.testing.assert_close(lse, outs[0][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass, outs[0][2], atol=1e-6, rtol=1e-4)


def test_fully_masked_row_and_window_before_every_block():
    q, paged, mask = make_case(2, 2, 2, 2, 70, 64, 16, torch.float16, use_mask=True)
    mask[1, 0] = False  # batch row 1, query 0 sees nothing
    out, lse, mass = check_against_fp32(q, paged, mask, window=5, num_splits=2)
    assert torch.isinf(lse[1, :, 0]).all()
    assert (mass[..., :3] == 0).all()  # blocks 0..2 end before position 64 - 5: never read, mass 0


@pytest.mark.parametrize("nq,splits", [(1, 3), (3, None)])
def test_evicted_blocks_are_never_read(nq, splits):
    """Blocks a sliding window evicted (tier -1, page -1: reading one would index out of bounds) lie before the
    kernel's first block: same result as over the full table, bit for bit; a wider window is refused."""
    q, paged, mask = make_case(2, 2, 2, nq, 123, 64, 16, torch.float16, use_mask=True, seed=3)
    window = 123 - nq - 3 * 16 + 1  # the earliest query sees positions > 47: blocks 0..2 are skipped
    full = tda.decode_attention(q, paged, mask=mask, sliding_window=window, block_mass=True, num_splits=splits)
    gone = evicted_view(paged, 3)
    got = check_against_fp32(q, gone, mask, window, num_splits=splits)
    for a, b in zip(full, got):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="were evicted"):
        tda.decode_attention(q, gone, mask=mask, sliding_window=window + 1)


def test_auto_and_explicit_dispatch():
    q, paged, _ = make_case(1, 2, 2, 1, 40, 64, 16, torch.float16)
    got = ops.decode_attention(q, paged, block_mass=True, backend="triton")
    want = tda.decode_attention(q, paged, block_mass=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # auto never picks the interpreter; on CUDA the CUDA kernel comes first where it is built
    expected_auto = ("cuda" if kvprec.cuda_kernels_available() else "triton") if DEVICE == "cuda" else "torch"
    assert ops.resolve_backend("decode_attention", "auto", q.device) == expected_auto
    assert ops.decode_attention(q, paged, backend="triton")[2] is None


def test_importing_kvprec_does_not_import_triton_and_the_launchers_load_lazily():
    code = textwrap.dedent(f"""
        import os, sys
        if {DEVICE!r} == "cpu":
            os.environ["TRITON_INTERPRET"] = "1"
        import torch, kvprec
        assert "triton" not in sys.modules, "import kvprec imported triton"
        x = torch.randn(2, 7, 16, device={DEVICE!r})
        got = kvprec.ops.quantize_keys(x, "int4", backend="triton")
        want = kvprec.ops.reference.quantize.quantize_keys(x, "int4")
        assert "triton" in sys.modules and torch.equal(got.codes, want.codes)
        # the kernel bodies load as kvprec.triton_kernels, never as a top-level triton_kernels (OpenAI's name)
        assert "kvprec.triton_kernels.quantize" in sys.modules and "triton_kernels" not in sys.modules
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


_COMPILE_SCRIPT = r"""
import torch
from triton_sm90 import compile_sm90, record_launches
import kvprec.ops.triton.decode_attention as tda, kvprec.ops.triton.quantize as tq
from kvprec.ops import native as _ops
from kvprec.storage.formats import Tier
from kvprec.ops.reference import PagedKV

launches = record_launches(tda, tq)

g = torch.Generator().manual_seed(0)
for dtype, d, tiers, extras in ((torch.float16, 128, "mixed", False), (torch.bfloat16, 64, Tier.INT4, True)):
    k = torch.randn(1, 2, 200, d).to(dtype)
    tiers = torch.randint(0, 6, (1, 2, 3), generator=g).to(torch.int8) if tiers == "mixed" else tiers
    p = PagedKV.from_dense(k, k, tiers, 64, 32, generator=g)
    mask = torch.ones(1, 2, 200, dtype=torch.uint8) if extras else None
    tda.decode_attention_op(torch.randn(1, 4, 2, d).to(dtype), _ops.flatten_decode_pools(p), p.tiers, p.pages, p.tail_k,
                            p.tail_v, mask, 0.1, 32 if extras else 0, 30.0 if extras else 0.0, extras, 2, 64, 32)
x = torch.randn(2, 64, 128, dtype=torch.float16)
codes, scale, zero = tq.quantize_keys_op(x, 4)
tq.quantize_values_op(x, 2, 32)
for out in (torch.float16, torch.bfloat16):
    tq.dequantize_op(codes, scale, zero, 4, 128, 32, False, out)
for kernel, args, kw in launches:
    ptx = compile_sm90(kernel, args, kw).asm["ptx"]
    if kernel.fn.__name__ == "dequantize_kernel":
        assert "fma.rn.f32" not in ptx, "dequantize must multiply, then add"
    if kernel.fn.__name__.startswith("quantize"):
        assert "div.rn.f32" in ptx and "div.full.f32" not in ptx, "quantize must divide with IEEE rounding"
print("OK", len(launches))
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not check what the compiler does (constexpr-only globals, layouts, dot shapes):
    compile a few launches for sm_90 with the installed triton and its bundled ptxas, no GPU needed, and check
    the PTX for the rounding the formats need (no FMA in dequantize, IEEE division in quantize)."""
    pytest.importorskip("triton.backends.nvidia")
    out = run_compile_script(_COMPILE_SCRIPT)
    assert out.returncode == 0 and "OK 8" in out.stdout, out.stderr[-4000:]


@native
def test_decode_over_a_live_buffer():
    b, hkv, d, t, n = 1, 2, 64, 16, 90
    gen = torch.Generator().manual_seed(5)
    buf = kvprec.MixedPrecisionBuffer(b, hkv, d, t, 16, dtype=torch.float16, device=DEVICE)
    tiers = torch.randint(0, len(Tier), (b, hkv, n // t), generator=gen).to(torch.int8)
    buf.append(torch.randn(b, hkv, n, d, generator=gen).to(DEVICE), torch.randn(b, hkv, n, d, generator=gen).to(DEVICE),
               tiers)
    q = torch.randn(b, 4, 1, d, generator=gen).half().to(DEVICE)
    check_against_fp32(q, PagedKV.from_buffer(buf), num_splits=2)


def test_decode_bad_inputs():
    q, paged, _ = make_case(1, 2, 2, 1, 40, 32, 16, torch.float16)
    with pytest.raises(ValueError, match=r"head_dim 32 is not supported; accepted head_dim 64, 128, 256"):
        tda.decode_attention(q, paged)
    q, paged, _ = make_case(1, 2, 2, 1, 40, 64, 16, torch.float16)
    with pytest.raises(ValueError, match="num_splits"):
        tda.decode_attention(q, paged, num_splits=0)
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        tda.decode_attention(q[:, :3], paged)
    with pytest.raises(ValueError, match="mask must be bool"):
        tda.decode_attention(q, paged, mask=torch.ones(1, 1, 40, dtype=torch.uint8, device=DEVICE))


@gpu
def test_decode_opcheck():
    q, paged, mask = make_case(1, 2, 2, 1, 40, 64, 16, torch.float16, use_mask=True)
    args = (q, _ops.flatten_decode_pools(paged), paged.tiers, paged.pages, paged.tail_k, paged.tail_v, mask.view(torch.uint8),
            0.125, 0, 0.0, True, 2, 16, 16)
    torch.library.opcheck(torch.ops.kvprec_triton.decode_attention.default, args)


# ---------------------------------------------------------------------------------------------------------
# quantize / dequantize: bit for bit

def awkward_input(n, t, d, dtype, seed):
    return awkward_blocks(n, t, d, dtype, seed).to(DEVICE)


SHAPES = [(2, 1, 8, 4), (3, 7, 16, 8), (1, 123, 64, 32), (2, 16, 96, 24), (1, 5, 4, 2)]  # n, t, d, group


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tier", [Tier.INT8, Tier.INT4, Tier.INT2], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}t{}d{}g{}".format(*s))
def test_quantize_dequantize_bit_exact(shape, tier, dtype):
    n, t, d, gs = shape
    x = awkward_input(n, t, d, dtype, seed=hash((shape, int(tier))) % 1000)
    for keys in (True, False):
        if keys:
            want, got = quantize_ref.quantize_keys(x, tier), tq.quantize_keys(x, tier)
        else:
            want, got = quantize_ref.quantize_values(x, tier, gs), tq.quantize_values(x, tier, gs)
        for part in ("codes", "scale", "zero"):
            assert same_bits(getattr(got, part), getattr(want, part)), f"{'keys' if keys else 'values'} {part}"
        for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
            if keys:
                ref = quantize_ref.dequantize_keys(want, tier, d, out_dtype)
                res = tq.dequantize_keys(want, tier, d, out_dtype)
            else:
                ref = quantize_ref.dequantize_values(want, tier, d, gs, out_dtype)
                res = tq.dequantize_values(want, tier, d, gs, out_dtype)
            assert same_bits(res, ref), f"dequantize {'keys' if keys else 'values'} -> {out_dtype}"


@pytest.mark.parametrize("tier", [Tier.INT4, Tier.INT2], ids=str)
def test_quantize_long_block_bit_exact(tier):
    x = awkward_input(1, 1023, 128, torch.float16, seed=7)
    for want, got in ((quantize_ref.quantize_keys(x, tier), tq.quantize_keys(x, tier)),
                      (quantize_ref.quantize_values(x, tier, 32), tq.quantize_values(x, tier, 32))):
        assert same_bits(got.codes, want.codes) and same_bits(got.scale, want.scale) and same_bits(got.zero, want.zero)


def test_float_tiers_and_registry_dispatch():
    x = awkward_input(2, 7, 16, torch.float16, seed=8)
    for tier in (Tier.FP32, Tier.BF16):
        assert same_bits(ops.quantize_keys(x, tier, backend="triton").codes, quantize_ref.quantize_keys(x, tier).codes)
    q = ops.quantize_values(x, Tier.INT4, 8, backend="triton")
    assert same_bits(q.codes, quantize_ref.quantize_values(x, Tier.INT4, 8).codes)
    y = ops.dequantize_values(q, Tier.INT4, 16, 8, torch.bfloat16, backend="triton")
    assert same_bits(y, quantize_ref.dequantize_values(q, Tier.INT4, 16, 8, torch.bfloat16))
    k = ops.quantize_keys(x, "int2", backend="triton")
    assert same_bits(ops.dequantize_keys(k, "int2", 16, torch.float32, backend="triton"),
                     quantize_ref.dequantize_keys(k, "int2", 16, torch.float32))


def test_quantize_bad_inputs():
    x = torch.randn(1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="65504"):
        tq.quantize_keys(x * 1e5, Tier.INT4)
    with pytest.raises(ValueError, match="finite"):
        tq.quantize_values(torch.full((1, 4, 8), float("nan"), device=DEVICE), Tier.INT8, 4)
    with pytest.raises(ValueError, match="group_size 3 must divide head_dim 8"):
        tq.quantize_values(x, Tier.INT4, 3)
    with pytest.raises(ValueError, match=r"\[N, T, D\]"):
        tq.quantize_keys(x[0], Tier.INT8)
    q = tq.quantize_keys(x, Tier.INT4)
    with pytest.raises(ValueError, match="codes must be uint8"):
        tq.dequantize_keys(q, Tier.INT2, 8, torch.float32)
    with pytest.raises(ValueError, match="dtype torch.int32"):
        tq.dequantize_keys(q, Tier.INT4, 8, torch.int32)


@gpu
def test_quantize_opcheck():
    x = torch.randn(2, 7, 16, device=DEVICE, dtype=torch.float16)
    torch.library.opcheck(torch.ops.kvprec_triton.quantize_keys.default, (x, 4))
    torch.library.opcheck(torch.ops.kvprec_triton.quantize_values.default, (x, 2, 8))
    codes, scale, zero = torch.ops.kvprec_triton.quantize_values(x, 4, 8)
    torch.library.opcheck(torch.ops.kvprec_triton.dequantize.default,
                          (codes, scale, zero, 4, 16, 8, False, torch.float16))
