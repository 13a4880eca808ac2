"""The CPU instruction-set paths of the native attention kernels (csrc/include/kvprec/cpu_isa.h), each against the
reference on this CPU; the paths this CPU lacks are skipped and say what it lacks.

What each path must compute (csrc/include/kvprec/cpu_kernels.h): float tiers in FP32 on the stored values (only the
summation order differs between paths: 1e-5 on outputs of order one); integer tiers on the SIMD paths score keys
from their codes with the query quantized per page and row, within a bound of the dequantized keys' scores,
  e <= scale * (0.52 qs sum_c code_tc + (D + 8) 2^-23 sum_c |q_c| (|code_tc ks_c| + |kz_c|)),  qs = max_c |q_c ks_c| / QMAX
(QMAX 127 for INT4 / INT2, 32767 for INT8 at these head dims), so the output is within (e^2e - 1) max_t |v_t| and the
log-sum-exp within e of attention over the dequantized cache (the scalar path: within 1e-5 of it).
Also: the path is reported, KVPREC_CPU_ISA forces one at load, names that are not paths or that this CPU cannot run
are clear errors, and the flash-decoding split (more threads than (batch row, KV head) items) is deterministic for a
given thread count and agrees with one thread.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import kvprec
from kvprec import MixedPrecisionBuffer, Tier
from kvprec import _native

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")

PATHS = ["scalar", "avx2", "avx512", "avx512_vnni"]
TIERS = ["fp32", "fp16", "bf16", "int8", "int4", "int2"]


def _why_not(path: str) -> str:
    return torch.ops.kvprec.cpu_isa_unsupported(path)


@pytest.fixture
def cpu_path(request):
    """Run the test on the CPU path named by the parameter (skipped, with the reason, where it cannot run)."""
    path = request.param
    why = _why_not(path)
    if why:
        pytest.skip(f"CPU path {path}: {why}")
    before = torch.ops.kvprec.cpu_isa()
    torch.ops.kvprec.set_cpu_isa(path)
    yield path
    torch.ops.kvprec.set_cpu_isa(before)


def _filled(b, hkv, d, n, tier, seed=0, group_size=32):
    gen = torch.Generator().manual_seed(seed)
    buf = MixedPrecisionBuffer(b, hkv, d, 16, group_size, torch.float32, default_tier=tier)
    buf.append(torch.randn(b, hkv, n, d, generator=gen) * 1.5, torch.randn(b, hkv, n, d, generator=gen))
    return buf


def _dense(q, k, v, scale):
    """FP64 softmax attention (GQA by repeating K/V), out and lse; causal is moot for Q = 1 at the last position."""
    g = q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(g, 1) for x in (k, v))
    s = q.double() @ kk.transpose(-1, -2) * scale
    return torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1)


def _score_bound(buf, q, tier, scale):
    """The contract's bound e per query row [B, Hq, 1] over the sealed pages (the tail is exact up to FP32)."""
    t = Tier.parse(tier)
    b, hkv, d = buf.batch, buf.kv_heads, buf.head_dim
    g = q.shape[1] // hkv
    qmax = 127.0 if t != Tier.INT8 else float(min(32767, 2147483647 // (255 * d)))
    pool, tiers, pages = buf.pool(t), buf.tiers(), buf.pages()
    per = 8 // t.bits
    e = torch.zeros(b, q.shape[1], 1, dtype=torch.float64)
    for bi in range(b):
        for h in range(hkv):
            for j in range(tiers.shape[-1]):
                page = int(pages[bi, h, j])
                packed = pool.k[page].to(torch.int64)  # [T, D / per]
                shifts = torch.arange(per) * t.bits
                codes = ((packed.unsqueeze(-1) >> shifts) & t.qmax).reshape(packed.shape[0], d).double()
                ks, kz = pool.k_scale[page].double(), pool.k_zero[page].double()
                rows = q[bi, h * g:(h + 1) * g, 0].double()  # [G, D]
                qs = (rows * ks).abs().amax(1, keepdim=True) / qmax
                fp = rows.abs() @ ((codes * ks).abs() + kz.abs()).T
                bound = scale * (0.52 * qs * codes.sum(1) + (d + 8) * 2.0 ** -23 * fp)  # [G, T]
                e[bi, h * g:(h + 1) * g, 0] = torch.maximum(e[bi, h * g:(h + 1) * g, 0], bound.amax(1))
    return e


def test_path_is_reported_and_named():
    path = _native.cpu_isa()
    assert path in PATHS and path == torch.ops.kvprec.cpu_isa()
    assert _why_not("scalar") == ""
    assert torch.ops.kvprec.cpu_features()  # the features the dispatcher saw, or a sentence saying none
    with pytest.raises(ValueError, match="'sse9' is not a CPU path; accepted auto, scalar, avx2, avx512"):
        torch.ops.kvprec.set_cpu_isa("sse9")
    missing = [p for p in PATHS if _why_not(p)]
    for p in missing:
        with pytest.raises(ValueError, match=f"lacks .* for the {p} path|no {p} kernels"):
            torch.ops.kvprec.set_cpu_isa(p)
    assert torch.ops.kvprec.cpu_isa() == path  # a refused switch changes nothing


def _in_subprocess(env_value: str) -> subprocess.CompletedProcess:
    code = ("import kvprec, torch\nfrom kvprec import _native\nprint(_native.cpu_isa())\n"
            "b = kvprec.MixedPrecisionBuffer(1, 1, 8, 4, dtype=torch.float32)\n"
            "b.append(torch.randn(1, 1, 9, 8), torch.randn(1, 1, 9, 8))\nb.attend(torch.randn(1, 2, 1, 8))\n")
    env = {**os.environ, "KVPREC_CPU_ISA": env_value, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_forces_the_path_at_load():
    got = _in_subprocess("scalar")
    assert got.returncode == 0 and got.stdout.split() == ["scalar"], got.stderr
    bad = _in_subprocess("sse9")
    assert bad.returncode != 0 and "KVPREC_CPU_ISA: 'sse9' is not a CPU path" in bad.stderr
    missing = [p for p in PATHS if _why_not(p)]
    if not missing:
        pytest.skip("this CPU runs every path: no unsupported one to ask for")
    refused = _in_subprocess(missing[-1])
    assert refused.returncode != 0
    assert f"KVPREC_CPU_ISA={missing[-1]} asks for a CPU path that cannot run here" in refused.stderr


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("cpu_path", PATHS, indirect=True)
# a tail and no tail; D % 8 == 4; 4 query heads per KV head at head_dim 128 (the register blocks of decode)
@pytest.mark.parametrize("d, n, group", [(64, 16 * 7 + 5, 3), (36, 16 * 4, 3), (128, 16 * 5 + 9, 4)])
def test_path_against_reference(cpu_path, tier, d, n, group):
    b, hkv = 2, 2
    hq = hkv * group
    buf = _filled(b, hkv, d, n, tier, group_size=d // 2 if d == 36 else 32)
    q = torch.randn(b, hq, 1, d, generator=torch.Generator().manual_seed(1)) * 1.5
    _assert_matches_reference(buf, q, tier, cpu_path)


def _assert_matches_reference(buf, q, tier, cpu_path, practical=True):
    """attend(q) against FP64 attention over the dequantized cache, within the path's contract for the tier (and, with
    `practical`, within the error the integer query adds in practice at the shapes of test_path_against_reference)."""
    d, hkv, hq = buf.head_dim, buf.kv_heads, q.shape[1]
    scale = 1 / math.sqrt(d)
    out, lse, _ = buf.attend(q)
    k, v = buf.gather()
    want, want_lse = _dense(q, k, v, scale)
    if cpu_path == "scalar" or Tier.parse(tier).bits >= 16:
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=0)
        return
    e = _score_bound(buf, q, tier, scale)
    vmax = v.double().abs().amax(2).repeat_interleave(hq // hkv, 1).unsqueeze(2)
    assert ((out.double() - want).abs() - (torch.exp(2 * e) - 1).unsqueeze(-1) * vmax).max() <= 1e-5
    assert ((lse.double() - want_lse).abs() - e).max() <= 1e-5
    if not practical:
        return
    # and not far from it in practice: the integer query adds little to the tier's own error (its rounding error
    # sums over the D channels of a score: INT2 keys at D = 128 measure 0.057)
    assert (out.double() - want).abs().max() <= 0.05 * max(1.0, d / 64) ** 0.5


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("cpu_path", PATHS, indirect=True)
# (head_dim, value group): one group per head (64); a group per 16 channels, and a head_dim that is 5 such spans
# (80: integer score rows that do not fill whole 32-byte chunks); groups of 8 (the narrowest value chunks); groups
# that are not a multiple of 8 (36 / 12: values through the dequantized fallback, D % 8 == 4); 128 / 32
def test_row_blocks_against_reference(cpu_path, tier):
    """Every register block of query rows: 1 to 7 query heads per KV head (4 + 3, 4 + 2, 4 + 1, 3, 2, 1 rows), at
    head dims and value groups that take each channel split of the value loops and each chunking of the scores.
    Each against the reference within the contract, and against the same query heads attended one per KV head (one
    row per block): a row's result does not depend on the rows beside it beyond FP32 rounding (2e-6; measured up to
    1e-6, at 4 rows or more)."""
    for d, group_size in [(64, 64), (80, 16), (40, 8), (36, 12), (128, 32)]:
        buf = _filled(1, 2, d, 16 * 9 + 5, tier, seed=d, group_size=group_size)
        for group in range(1, 8):
            q = torch.randn(1, 2 * group, 1, d, generator=torch.Generator().manual_seed(group)) * 1.5
            _assert_matches_reference(buf, q, tier, cpu_path, practical=False)
            out, lse, _ = buf.attend(q)
            for g in range(group):
                one_out, one_lse, _ = buf.attend(q[:, g::group].contiguous())  # head g of each KV head's group
                torch.testing.assert_close(out[:, g::group], one_out, atol=2e-6, rtol=0)
                torch.testing.assert_close(lse[:, g::group], one_lse, atol=2e-6, rtol=0)


@pytest.mark.parametrize("cpu_path", PATHS, indirect=True)
def test_split_over_threads_is_deterministic(cpu_path):
    buf = _filled(1, 1, 32, 16 * 20 + 3, "int4")  # one (batch row, KV head): 4 threads split its 21 blocks
    q = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(2))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = buf.attend(q, block_mass=True)
        torch.set_num_threads(4)
        four, again = buf.attend(q, block_mass=True), buf.attend(q, block_mass=True)
    finally:
        torch.set_num_threads(old)
    for x, y in zip(four, again):
        assert torch.equal(x, y)
    for x, y in zip(one, four):
        torch.testing.assert_close(x, y, atol=2e-6, rtol=0)
