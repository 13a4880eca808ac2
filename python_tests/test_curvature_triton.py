"""The Triton curvature reduction (triton_kernels/curvature.py, launcher kvprec/ops/triton/curvature.py) against
the FP64 pure-torch reference kvprec.analysis.curvature.curvature_reduce_reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by triton_device before any
imports triton); on a GPU they compile for it, and the cases marked ``gpu`` run too.

Tolerance (the kernel computes in FP32, the reference in FP64 from the same rounded inputs), per batch row and
KV head, for position and block alike::

    |x - ref| <= RTOL |ref| + ATOL max|ref| + FLOOR K0,     K0 = (s max||q||)^3 max||v||^2

RTOL covers FP32 scores, exponentials and products; ATOL the rounding of ||v_t||^2 - 2 o.v_t + ||o||^2 at
positions where v_t happens to lie near o, and of |1 - 2a| near a = 1/2; FLOOR K0 (K0 bounds every kappa) the
rows where every kappa is 0 in exact arithmetic (one position: a = 1, o = v), which tf32x3 products leave at
~1e-13 K0 on a GPU. Measured under the interpreter on the grid of test_matches_reference: relative error
<= 5.3e-6 where ref > 1e-3 of the row maximum, and <= 3.6e-6 of the row maximum anywhere; RTOL / ATOL are about
10x / 8x that, so they can fail. Sharp attention (logits in the hundreds, a_t up to 1) is held to
SHARP_RTOL / SHARP_ATOL, 10x its measured 2.1e-4 / 1.1e-4: the FP32 error of a score grows with its size, and
so does that of o, on which ||v_t - o||^2 depends where a_t -> 1.
"""
from triton_device import DEVICE, skip_module_without_triton  # first: sets TRITON_INTERPRET without CUDA

import itertools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

skip_module_without_triton()

from kvprec import ops  # noqa: E402
from kvprec.analysis import curvature as C  # noqa: E402
from kvprec.ops.triton import curvature as tc  # noqa: E402

from triton_sm90 import run_compile_script  # noqa: E402

gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")

RTOL, ATOL, FLOOR = 5e-5, 3e-5, 1e-9
SHARP_RTOL, SHARP_ATOL = 2e-3, 1e-3
REDUCTIONS = C.REDUCTIONS
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make_inputs(b, hq, hkv, nq, n, d, dtype, dv=None, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    lead = () if b is None else (b,)

    def mk(*shape):
        return torch.randn(*lead, *shape, generator=gen).to(dtype).to(device)
    return mk(hq, nq, d), mk(hkv, n, d), mk(hkv, n, d if dv is None else dv)


def natural_scale(q, k, v, scale):
    s = C.resolve_scale(scale, q.shape[-1])
    return (s * q.double().norm(dim=-1).max()) ** 3 * v.double().norm(dim=-1).max() ** 2


def assert_close(got, ref, k0, rtol=RTOL, atol=ATOL):
    assert got.dtype == ref.dtype == torch.float64 and got.shape == ref.shape and got.device == ref.device
    err = (got - ref).abs()
    row_max = ref.abs().amax(-1, keepdim=True)
    bound = rtol * ref.abs() + atol * row_max + FLOOR * k0
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds the tolerance by {worst:.3g}x (row max " \
                         f"{row_max.max().item():.3g})"


def check(q, k, v, scale, causal, block_size, query_reduce, block_reduce, rtol=RTOL, atol=ATOL):
    got = C.curvature_reduce(q, k, v, scale, causal, block_size, query_reduce, block_reduce, backend="triton")
    ref = C.curvature_reduce_reference(q, k, v, scale, causal, block_size, query_reduce, block_reduce)
    k0 = natural_scale(q, k, v, scale)
    for g, r in zip(got, ref):
        assert_close(g, r, k0, rtol, atol)
    return got, ref


# (B, Hq, Hkv, Q, N, D): N in {1, 17, 100}, Q in {1, 5}, G = Hq / Hkv in {1, 4}, D in {16, 64}; batched
# (B = 2) and unbatched alternate so both appear with every other choice.
GRID = [((2 if i % 2 else None), hkv * g, hkv, nq, n, d)
        for i, (n, nq, (g, hkv), d) in enumerate(itertools.product((1, 17, 100), (1, 5), ((1, 2), (4, 1)), (16, 64)))]
# Causal puts query i at N - Q + i, so Q = 5 > N = 1 is causal-invalid (its error: test_bad_inputs_raise_...).
CASES = [(shape, causal) for shape in GRID for causal in (True, False) if not (causal and shape[3] > shape[4])]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, causal", CASES,
                         ids=lambda c: "b{}-hq{}-hkv{}-q{}-n{}-d{}".format(*c) if isinstance(c, tuple) else
                         ("causal" if c else "full"))
def test_matches_reference(shape, causal, dtype):
    """Every query reduction; the block reduction cycles through mean / max / sum with the shape, block size 16
    (so N = 17 and 100 end in a partial block)."""
    b, hq, hkv, nq, n, d = shape
    q, k, v = make_inputs(*shape, dtype, seed=GRID.index(shape))
    block_reduce = REDUCTIONS[GRID.index(shape) % 3]
    for query_reduce in REDUCTIONS:
        pos, blk = check(q, k, v, 0.0, causal, 16, query_reduce, block_reduce)[0]
        lead = () if b is None else (b,)
        assert pos.shape == (*lead, hkv, n) and blk.shape == (*lead, hkv, math.ceil(n / 16))


@pytest.mark.parametrize("query_reduce", REDUCTIONS)
@pytest.mark.parametrize("block_reduce", REDUCTIONS)
def test_every_reduce_pair_batched_and_unbatched(query_reduce, block_reduce):
    q, k, v = make_inputs(2, 8, 2, 5, 37, 32, torch.float16, seed=7)
    batched = check(q, k, v, 0.0, True, 8, query_reduce, block_reduce)[0]
    for row in range(2):
        single = check(q[row], k[row], v[row], 0.0, True, 8, query_reduce, block_reduce)[0]
        for x, y in zip(single, batched):  # the same programs up to tile sizes: rounding only
            torch.testing.assert_close(x, y[row], rtol=1e-6, atol=1e-6 * float(y[row].abs().max()))


@pytest.mark.parametrize("d, dv", [(24, 40), (80, 64), (8, 8), (256, 256), (128, 48)])
def test_head_dims_padded_in_registers(d, dv):
    """Any head_dim from 1 to 256 (and a value head_dim of its own): padded to a power of two >= 16."""
    q, k, v = make_inputs(None, 4, 2, 3, 33, d, torch.float32, dv=dv, seed=d + dv)
    check(q, k, v, 0.0, True, 16, "mean", "max")
    check(q, k, v, 0.3, False, 16, "max", "sum")


def test_float64_and_mixed_dtypes_run_in_fp32():
    q, k, v = make_inputs(2, 4, 2, 5, 50, 16, torch.float64, seed=11)
    check(q, k, v, 0.0, True, 16, "sum", "mean")
    check(q.half(), k.float(), v.bfloat16(), 0.0, False, 16, "mean", "max")


def test_strided_inputs():
    """q as Hugging Face hands it over ([B, Q, H, D] transposed), k/v slices of a longer cache, v with a strided
    last dimension (copied by the launcher)."""
    q0, k0, v0 = make_inputs(2, 4, 2, 6, 70, 32, torch.float16, seed=13)
    q = q0.transpose(1, 2).contiguous().transpose(1, 2)
    k = k0[:, :, :51]
    v = torch.cat([v0, v0], dim=-1)[..., ::2][:, :, :51]
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(-1) == 2
    check(q, k, v, 0.0, True, 16, "mean", "max")


def _sharp_inputs(seed):
    """A sink at position 0 that most queries attend to almost entirely (a_0 -> 1), logits in the hundreds."""
    q, k, v = make_inputs(1, 8, 2, 5, 100, 64, torch.float32, seed=seed)
    k[:, :, 0] = q[:, ::4].mean(dim=2) * 2.0
    return q, k, v


@pytest.mark.parametrize("scale", [0.5, 3.0])
@pytest.mark.parametrize("query_reduce", ["mean", "max"])
def test_sharp_attention(scale, query_reduce):
    q, k, v = _sharp_inputs(17)
    a = C.attention_curvature_reference(q, k, v, scale, True).attn[..., 0]
    # the case the kernel treats specially (a direct ||v_t* - o||^2): rows with a_0 -> 1, and at scale 0.5 rows
    # in between, where a_0 is near but not at 1 and the expansion's rounding would show most
    assert (1 - a).min() < (1e-4 if scale == 0.5 else 1e-12)
    assert scale != 0.5 or ((a > 0.9) & (a < 0.999)).any()
    check(q, k, v, scale, True, 16, query_reduce, "max", SHARP_RTOL, SHARP_ATOL)


def test_one_position_is_zero():
    """N = 1: a = 1 and o = v, so kappa is 0 exactly in the reference; the kernel's ||v_t* - o||^2 is a direct
    difference, not the cancelling expansion (which left ~1e-5 here before)."""
    q, k, v = make_inputs(None, 4, 1, 1, 1, 64, torch.float32, seed=19)
    pos, blk = C.curvature_reduce(q, k, v, 0.0, True, 16, "sum", "max", backend="triton")
    assert pos.abs().max() <= FLOOR * natural_scale(q, k, v, 0.0)
    if DEVICE == "cpu":
        assert torch.equal(pos, torch.zeros_like(pos))  # FP32 products in the interpreter: exactly o = v


def test_bad_inputs_raise_like_the_reference():
    q, k, v = make_inputs(None, 4, 2, 3, 5, 16, torch.float32, seed=23)
    cases = [
        ((q, k, v, -1.0, True), "scale"),
        ((q[:3], k, v, 0.0, True), "multiple of KV heads"),
        ((torch.randn(4, 6, 16, device=DEVICE), k, v, 0.0, True), "Q <= N"),
        ((q, torch.randn(2, 5, 8, device=DEVICE), v, 0.0, True), "head_dim"),
        ((q[0], k, v, 0.0, True), "q must be"),
        ((q, k, torch.randn(2, 4, 16, device=DEVICE), 0.0, True), "v must match k"),
        ((q.int(), k, v, 0.0, True), "floating"),
        ((q.masked_fill(q > 1, float("nan")), k, v, 0.0, True), "non-finite"),
    ]
    for args, needle in cases:
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match=needle):
                C.curvature_reduce(*args, backend=backend)
    for bad, needle in ((dict(query_reduce="median"), "accepted mean, max, sum"),
                        (dict(block_reduce="min"), "accepted mean, max, sum"),
                        (dict(block_size=0), "block_size")):
        with pytest.raises(ValueError, match=needle):
            C.curvature_reduce(q, k, v, backend="triton", **bad)
    big = torch.randn(2, 3, 320, device=DEVICE)
    with pytest.raises(ValueError, match=r"head_dim 320 is not supported; accepted head_dim 1 to 256"):
        tc.curvature_reduce(big[:1], big[:1], big[:1])
    with pytest.raises(ValueError, match=r"value head_dim 300 is not supported"):
        tc.curvature_reduce(q, k, torch.randn(2, 5, 300, device=DEVICE))


def test_dispatch():
    q, k, v = make_inputs(1, 4, 2, 2, 20, 16, torch.float16, seed=29)
    assert ops.resolve_backend("curvature_reduce", "triton", q.device) == "triton"
    expected_auto = "triton" if DEVICE == "cuda" else "torch"  # auto never picks the interpreter
    assert ops.resolve_backend("curvature_reduce", "auto", q.device) == expected_auto
    via_entry = C.curvature_reduce(q, k, v, 0.0, True, 8, "max", "sum", backend="triton")
    direct = tc.curvature_reduce(q, k, v, 0.0, True, 8, "max", "sum")
    assert all(torch.equal(a, b) for a, b in zip(via_entry, direct))
    auto = C.curvature_reduce(q, k, v, 0.0, True, 8, "max", "sum", backend="auto")
    assert all(torch.equal(a, b) for a, b in zip(auto, direct if DEVICE == "cuda" else
                                                 C.curvature_reduce_reference(q, k, v, 0.0, True, 8, "max", "sum")))


def _run(code, env_drop=()):
    env = {key: val for key, val in os.environ.items() if key not in env_drop}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env=env)


def test_lazy_registration_and_unavailable_backend():
    """import kvprec imports no triton; backend="triton" on CPU without the interpreter, and with triton hidden,
    raises a RuntimeError that says why; with the interpreter the lazy launcher loads and runs."""
    out = _run("""
        import os, sys, torch
        import kvprec
        from kvprec.analysis import curvature as C
        assert "triton" not in sys.modules, "import kvprec imported triton"
        q, k, v = torch.randn(2, 3, 16), torch.randn(1, 5, 16), torch.randn(1, 5, 16)
        try:
            C.curvature_reduce(q, k, v, backend="triton")
        except RuntimeError as e:
            assert "backend='triton' is unavailable" in str(e) and "TRITON_INTERPRET=1" in str(e), e
        else:
            raise SystemExit("no error without the interpreter")
        os.environ["TRITON_INTERPRET"] = "1"
        got = C.curvature_reduce(q, k, v, backend="triton")
        ref = C.curvature_reduce_reference(q, k, v)
        assert "triton" in sys.modules and torch.allclose(got[0], ref[0], rtol=1e-4, atol=1e-9)
        print("OK")
    """, env_drop=("TRITON_INTERPRET",))
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-4000:]
    hidden = _run("""
        import sys
        sys.modules["triton"] = None  # import triton raises ImportError, importlib.util.find_spec finds nothing
        import torch
        from kvprec.analysis import curvature as C
        q, k, v = torch.randn(2, 3, 16), torch.randn(1, 5, 16), torch.randn(1, 5, 16)
        try:
            C.curvature_reduce(q, k, v, backend="triton")
        except RuntimeError as e:
            assert "no Triton kernel is registered for this op" in str(e), e
        else:
            raise SystemExit("no error without triton")
        C.curvature_reduce(q, k, v, backend="auto")  # the reference
        print("OK")
    """)
    assert hidden.returncode == 0 and "OK" in hidden.stdout, hidden.stderr[-4000:]


_COMPILE_SCRIPT = r"""
import torch
from triton_sm90 import compile_sm90, record_launches
import kvprec.ops.triton.curvature as tc

launches = record_launches(tc)

for dtype, d, dv, causal, reduce in ((torch.float16, 64, 64, True, 0), (torch.bfloat16, 128, 128, False, 1),
                                     (torch.float32, 128, 128, True, 2), (torch.float32, 256, 256, True, 0)):
    q = torch.empty(1, 32, 64, d, dtype=dtype)
    k = torch.empty(1, 8, 8192, d, dtype=dtype)
    v = torch.empty(1, 8, 8192, dv, dtype=dtype)
    tc.curvature_position_op(q, k, v, 0.125, causal, reduce)
for kernel, args, kw in launches:
    c = compile_sm90(kernel, args, kw)
    assert c.metadata.shared <= 227 * 1024, (kernel.fn.__name__, kw, c.metadata.shared)
print("OK", len(launches))
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not check what the compiler does (constexpr-only globals, dot shapes and dtypes,
    tf32x3, shared memory): compile the launches of four configurations (FP32 at head_dim 128 and 256 are the
    largest in shared memory) for sm_90 with the installed triton, no GPU needed, and check each fits in an
    H100's 227 KiB of shared memory."""
    pytest.importorskip("triton.backends.nvidia")
    out = run_compile_script(_COMPILE_SCRIPT)
    assert out.returncode == 0 and "OK 8" in out.stdout, out.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------------
# GPU only

@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_calibration_shape(dtype, d):
    """A calibration-sized case: 64 queries of 4 heads per KV head over 1023 positions."""
    q, k, v = make_inputs(1, 16, 4, 64, 1023, d, dtype, seed=31)
    for query_reduce in REDUCTIONS:
        check(q, k, v, 0.0, True, 64, query_reduce, "max")


@gpu
def test_gpu_opcheck():
    q, k, v = make_inputs(2, 8, 2, 5, 100, 64, torch.float16, seed=37)
    torch.library.opcheck(torch.ops.kvprec_triton.curvature_position.default, (q, k, v, 0.125, True, 0))
    torch.library.opcheck(torch.ops.kvprec_triton.curvature_position.default, (q, k, v, 0.125, False, 1))


@pytest.mark.parametrize("batched,dtype", [(False, torch.float32), (True, torch.float16)])
def test_sum_max_shares_the_first_pass(monkeypatch, batched, dtype):
    """curvature_sum_max: bit for bit the positions of two curvature_reduce calls (query_reduce sum and max), with
    the row-statistics pass launched once instead of twice; the reference agrees with the reference reductions."""
    q, k, v = make_inputs(2 if batched else None, 4, 2, 6, 40, 32, dtype, seed=31)
    want_sum = C.curvature_reduce(q, k, v, 0.0, True, 16, "sum", "max", backend="triton")[0]
    want_max = C.curvature_reduce(q, k, v, 0.0, True, 16, "max", "max", backend="triton")[0]
    launches = []
    wrap = tc.wrap_triton
    monkeypatch.setattr(tc, "wrap_triton", lambda kernel: launches.append(kernel) or wrap(kernel))
    got_sum, got_max = C.curvature_sum_max(q, k, v, 0.0, True, backend="triton")
    assert launches == [tc.curvature_rows_kernel, tc.curvature_positions_kernel, tc.curvature_positions_kernel]
    assert torch.equal(got_sum, want_sum) and torch.equal(got_max, want_max)
    ref = C.curvature_sum_max(q, k, v, 0.0, True, backend="torch")
    for want, how in zip(ref, ("sum", "max")):
        torch.testing.assert_close(want, C.curvature_reduce_reference(q, k, v, 0.0, True, 16, how, "max")[0],
                                   rtol=0, atol=0)
    assert ops.resolve_backend("curvature_sum_max", "auto", torch.device(DEVICE)) == (
        "triton" if DEVICE == "cuda" else "torch")
