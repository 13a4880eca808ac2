"""Key novelty (kvprec/analysis/novelty.py, op "novelty_reduce"; Triton kernel triton_kernels/novelty.py).

* The FP64 reference against an independent FP64 oracle (top-r eigenvectors of the Gram matrix X^T X, an explicit
  D x D projector, explicit loops for the mean), and against hand-built windows with known answers.
* Zero-norm conventions, rank-deficient windows, bad-input errors, backend selection.
* The Triton kernel against the reference on small awkward shapes, under TRITON_INTERPRET=1 on CPU or compiled on
  CUDA. Tolerance (FP32 kernel vs FP64 reference on the same rounded inputs):
      cosine    |got - ref| <= 1e-5
      l2        |got - ref| <= 1e-5 (||k|| + ||m||)
      residual  |got - ref| <= 1e-4
  FP32 dot products and norms over D <= 100 err by a few 1e-7 of the operands' norms (cosine, l2; the residual's
  projection is a direct difference, so no cancellation). The residual also inherits the FP32 SVD's subspace
  error, about eps_fp32 * s_1 / (s_r - s_(r+1)), at most 2.5e-5 over these seeded windows. Measured worst cases
  under the interpreter: 2.4e-7 (cosine), 1.2e-7 (l2 relative), 8.2e-6 (residual, W = 33, r = 4, where the
  gap is smallest), so the bounds leave >= 12x headroom (the GPU's approximate sqrt and division add a few ulp)
  and still fail on any formula or masking error (those are O(0.01) or larger).
* NoveltyTracker: first call, rolling order, comparison before rolling, rank while the window fills.
"""
from triton_device import DEVICE, TRITON  # first: sets TRITON_INTERPRET without CUDA

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kvprec import ops  # noqa: E402
from kvprec.analysis.novelty import (NoveltyResult, NoveltyTracker, novelty, novelty_reference,  # noqa: E402
                                     window_basis)

from helpers import available_devices  # noqa: E402
from triton_sm90 import run_compile_script  # noqa: E402

# Triton runs compiled on CUDA, or on CPU tensors in the interpreter (only where no CUDA device is present).
TRITON_DEVICES = [DEVICE] if TRITON else []
needs_triton = pytest.mark.skipif(not TRITON, reason="triton missing, or no CUDA and TRITON_INTERPRET is not 1")
gpu = pytest.mark.skipif(not torch.cuda.is_available() or not TRITON,
                         reason="needs a CUDA device (the interpreter cannot trace fake tensors)")

COS_TOL, L2_TOL, RES_TOL = 1e-5, 1e-5, 1e-4


def oracle(k_new: torch.Tensor, window: torch.Tensor, rank: int) -> NoveltyResult:
    """Independent FP64 computation for full-rank windows: explicit loops over (b, h), the mean as a running sum,
    the top-r subspace from eigh of the Gram matrix and an explicit D x D projector."""
    k = k_new.double().cpu()
    x = window.double().cpu()
    b, h, n, d = k.shape
    out = [torch.empty(b, h, n, dtype=torch.float64) for _ in range(3)]
    for bi in range(b):
        for hi in range(h):
            xs = x[bi, hi]
            m = torch.zeros(d, dtype=torch.float64)
            for row in xs:
                m += row
            m /= xs.shape[0]
            evals, evecs = torch.linalg.eigh(xs.T @ xs)             # ascending
            u = evecs[:, -rank:]                                      # [D, r]
            proj = torch.eye(d, dtype=torch.float64) - u @ u.T
            for i in range(n):
                kv = k[bi, hi, i]
                out[0][bi, hi, i] = 1.0 - float(kv @ m) / (float(kv.norm()) * float(m.norm()))
                out[1][bi, hi, i] = (kv - m).norm()
                out[2][bi, hi, i] = (proj @ kv).norm() / kv.norm()
    return NoveltyResult(*out)


def make(b, h, n, w, d, *, dtype=torch.float32, device="cpu", seed=0, inside=0, rank=1):
    """Random keys and window; the first ``inside`` new keys lie (up to rounding) in the window's top-r subspace,
    so that small residuals are exercised too."""
    g = torch.Generator().manual_seed(seed)
    window = torch.randn(b, h, w, d, generator=g, dtype=torch.float64) + 0.5  # a nonzero mean
    k = 2.0 * torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    if inside:
        basis = window_basis(window, rank)                                    # [B, H, r, D]
        coef = torch.randn(b, h, inside, rank, generator=g, dtype=torch.float64)
        k[:, :, :inside] = coef @ basis
    return k.to(dtype).to(device), window.to(dtype).to(device)


def assert_close(got: NoveltyResult, ref: NoveltyResult, k, window):
    assert isinstance(got, NoveltyResult)
    for g_, r_ in zip(got, ref):
        assert g_.dtype == torch.float32 and g_.shape == r_.shape
        assert torch.isfinite(g_).all()
    knorm = k.double().norm(dim=-1).cpu()
    mnorm = window.double().mean(dim=2).norm(dim=-1, keepdim=True).cpu()
    cos_err = (got.cosine.cpu().double() - ref.cosine.cpu().double()).abs().max()
    l2_err = ((got.l2.cpu().double() - ref.l2.cpu().double()).abs() / (knorm + mnorm)).max()
    res_err = (got.residual.cpu().double() - ref.residual.cpu().double()).abs().max()
    assert cos_err <= COS_TOL, cos_err
    assert l2_err <= L2_TOL, l2_err
    assert res_err <= RES_TOL, res_err


# ---------------------------------------------------------------------------------------------------------
# reference

@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("b,h,n,w,d,rank", [(1, 1, 1, 5, 8, 1), (2, 3, 7, 33, 64, 4), (1, 2, 4, 20, 24, 20),
                                              (2, 1, 3, 70, 16, 16)])
def test_reference_matches_fp64_oracle(device, b, h, n, w, d, rank):
    k, window = make(b, h, n, w, d, dtype=torch.float64, device=device, seed=n + w, inside=1, rank=rank)
    got = novelty_reference(k, window, rank)
    want = oracle(k, window, rank)
    for g_, w_ in zip(got, want):
        assert g_.dtype == torch.float32 and g_.device.type == device and g_.shape == (b, h, n)
        # the reference is FP64 rounded once to FP32: within an FP32 rounding of the oracle
        assert torch.allclose(g_.cpu().double(), w_, rtol=2e-7, atol=1e-7), (g_, w_)
    assert float(got.residual[..., 0].max()) < 1e-6  # key 0 lies in the subspace


def _known_window(dtype=torch.float32, device="cpu"):
    """Rows 3e1, 3e1, e2, -e2 in D = 5: mean 1.5 e1; singular values sqrt(18) (e1), sqrt(2) (e2), then 0 (rank 2)."""
    e = torch.eye(5, dtype=torch.float64)
    window = torch.stack([3 * e[0], 3 * e[0], e[1], -e[1]])
    keys = torch.stack([3 * e[0] + 4 * e[2], e[1] + e[2], torch.zeros(5, dtype=torch.float64), -2 * e[0],
                        e[0] + e[1]])
    return keys[None, None].to(dtype).to(device), window[None, None].to(dtype).to(device)


# cosine and l2 of the five keys of _known_window (any rank), and the residual per rank
_KNOWN_COSINE = [0.4, 1.0, 1.0, 2.0, 1 - 1 / math.sqrt(2)]
_KNOWN_L2 = [math.sqrt(18.25), math.sqrt(4.25), 1.5, 3.5, math.sqrt(1.25)]
_KNOWN_RESIDUAL = {1: [0.8, 1.0, 0.0, 0.0, 1 / math.sqrt(2)], 2: [0.8, 1 / math.sqrt(2), 0.0, 0.0, 0.0],
                   # rank 3 > the window's rank 2: the null direction is dropped, so rank 3 equals rank 2
                   3: [0.8, 1 / math.sqrt(2), 0.0, 0.0, 0.0]}


def _backends():
    return ["torch"] + (["triton"] if TRITON else [])


def _device_for(backend):
    return TRITON_DEVICES[0] if backend == "triton" else available_devices()[-1]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_known_values_and_rank_deficient_window(backend, rank):
    k, window = _known_window(device=_device_for(backend))
    got = novelty(k, window, rank, backend=backend)
    torch.testing.assert_close(got.cosine.cpu()[0, 0], torch.tensor(_KNOWN_COSINE), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.l2.cpu()[0, 0], torch.tensor(_KNOWN_L2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.residual.cpu()[0, 0], torch.tensor(_KNOWN_RESIDUAL[rank]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", _backends())
def test_zero_norm_conventions(backend):
    dev = _device_for(backend)
    d = 6
    k = torch.zeros(1, 2, 3, d)
    k[:, :, 1, 0] = 2.0           # key 1: 2 e1; key 0 and key 2 are zero
    window = torch.zeros(1, 2, 4, d)
    window[0, 1, :2, 1] = 1.0     # head 1: rows e2, e2, 0, 0 (mean e2 / 2, subspace e2); head 0: all zero
    got = novelty(k.to(dev), window.to(dev), 2, backend=backend)
    for t in got:
        assert torch.isfinite(t).all()
    # zero key: cosine 1, l2 = ||m||, residual 0
    assert got.cosine[0, :, 0].tolist() == [1.0, 1.0]
    assert got.residual[0, :, 0].tolist() == [0.0, 0.0]
    torch.testing.assert_close(got.l2[0, :, 0].cpu(), torch.tensor([0.0, 0.5]))
    # zero window (head 0): cosine 1, l2 = ||k||, residual 1 (empty subspace)
    assert got.cosine[0, 0, 1].item() == 1.0 and got.residual[0, 0, 1].item() == 1.0
    torch.testing.assert_close(got.l2[0, 0, 1].cpu(), torch.tensor(2.0))
    # head 1: 2 e1 is orthogonal to the mean e2/2 and to the subspace
    torch.testing.assert_close(got.cosine[0, 1, 1].cpu(), torch.tensor(1.0))
    torch.testing.assert_close(got.residual[0, 1, 1].cpu(), torch.tensor(1.0))
    torch.testing.assert_close(got.l2[0, 1, 1].cpu(), torch.tensor(math.sqrt(4.25)))


@pytest.mark.parametrize("backend", _backends())
def test_zero_mean_window_and_empty_new_keys(backend):
    dev = _device_for(backend)
    window = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]])[None, None].to(dev)   # mean exactly 0, subspace e1
    k = torch.tensor([[1.0, 1.0, 0.0]])[None, None].to(dev)
    got = novelty(k, window, 1, backend=backend)
    assert got.cosine.item() == 1.0
    torch.testing.assert_close(got.l2.cpu(), torch.tensor([[[math.sqrt(2)]]]))
    torch.testing.assert_close(got.residual.cpu(), torch.tensor([[[1 / math.sqrt(2)]]]))
    empty = novelty(k[:, :, :0], window, 1, backend=backend)
    assert all(t.shape == (1, 1, 0) and t.dtype == torch.float32 for t in empty)


# ---------------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case,match", [
    ("int_keys", "k_new must be a floating tensor"),
    ("int_window", "window must be a floating tensor"),
    ("not_tensor", "k_new must be a torch.Tensor"),
    ("keys_3d", r"k_new must be \[B, H, n, D\]"),
    ("window_3d", r"window must be \[B, H, W, D\]"),
    ("batch", "window must match k_new in batch and heads"),
    ("heads", "window must match k_new in batch and heads"),
    ("head_dim", "window has head_dim 8 but k_new has head_dim 6"),
    ("empty_window", "window must hold W >= 1 keys"),
    ("rank_0", r"rank 0 is out of range; accepted 1 <= rank <= min\(W, D\) = min\(5, 6\)"),
    ("rank_big", r"rank 6 is out of range; accepted 1 <= rank <= min\(W, D\) = min\(5, 6\)"),
    ("rank_float", "rank must be an integer"),
    ("rank_bool", "rank must be an integer"),
    ("nan_window", "window contains non-finite values"),
    ("inf_keys", "k_new contains non-finite values"),
])
def test_bad_input(backend, case, match):
    dev = _device_for(backend)
    k = torch.randn(2, 3, 4, 6, device=dev)
    w = torch.randn(2, 3, 5, 6, device=dev)
    rank = 2
    if case == "int_keys":
        k = k.to(torch.int32)
    elif case == "int_window":
        w = w.to(torch.int64)
    elif case == "not_tensor":
        k = k.tolist()
    elif case == "keys_3d":
        k = k[0]
    elif case == "window_3d":
        w = w[0]
    elif case == "batch":
        w = w[:1]
    elif case == "heads":
        w = w[:, :2]
    elif case == "head_dim":
        w = torch.randn(2, 3, 5, 8, device=dev)
    elif case == "empty_window":
        w = w[:, :, :0]
    elif case == "rank_0":
        rank = 0
    elif case == "rank_big":
        rank = 6
    elif case == "rank_float":
        rank = 2.0
    elif case == "rank_bool":
        rank = True
    elif case == "nan_window":
        w[1, 2, 3, 4] = float("nan")
    elif case == "inf_keys":
        k[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=match):
        novelty(k, w, rank, backend=backend)
    if case not in ("not_tensor",):  # the registry's implementation checks on its own, with the same message
        impl = ops.REGISTRY["novelty_reduce"].reference if backend == "torch" else ops.REGISTRY["novelty_reduce"].triton
        with pytest.raises(ValueError, match=match):
            impl(k, w, rank)


def test_backend_selection_and_unavailable_backends(monkeypatch):
    k, w = make(1, 1, 2, 4, 8)
    assert ops.resolve_backend("novelty_reduce", "auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend: 'nope' is not accepted"):
        novelty(k, w, 1, backend="nope")
    for native in ("cpp", "cuda"):
        with pytest.raises(RuntimeError, match=f"novelty_reduce: backend='{native}' is unavailable: the native "
                                               "library has no kernel for this op"):
            novelty(k, w, 1, backend=native)
    # Triton cannot run on CPU tensors without the interpreter: a clear error, no fallback
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable: Triton needs a CUDA device or "
                                           "TRITON_INTERPRET=1"):
        novelty(k, w, 1, backend="triton")
    # no launcher registered (triton not installed)
    monkeypatch.setattr(ops.REGISTRY["novelty_reduce"], "triton", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="no Triton kernel is registered for this op"):
        novelty(k, w, 1, backend="triton")


@needs_triton
def test_triton_launcher_refuses_what_it_cannot_run(monkeypatch):
    from kvprec.ops.triton import novelty as tnov

    dev = TRITON_DEVICES[0]
    with pytest.raises(ValueError, match="head_dim 520 is not supported; accepted head_dim 1 to 512"):
        tnov.novelty_reduce(torch.randn(1, 1, 1, 520, device=dev), torch.randn(1, 1, 3, 520, device=dev), 2)
    # a CPU tensor where the kernels were compiled for a GPU (not interpreted)
    monkeypatch.setattr(tnov, "_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="novelty_reduce \\(triton\\): k_new is on cpu; the Triton kernel needs "
                                           "a CUDA device"):
        tnov.novelty_reduce(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 3, 8), 2)


# ---------------------------------------------------------------------------------------------------------
# Triton against the reference

@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("w", [5, 33])
@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("rank", [1, 4])
def test_triton_matches_reference(device, dtype, d, w, n, rank):
    k, window = make(2, 3, n, w, d, dtype=dtype, device=device, seed=7 * n + w + d, inside=min(n, 2), rank=rank)
    got = novelty(k, window, rank, backend="triton")
    assert all(t.device.type == device for t in got)
    assert_close(got, novelty_reference(k, window, rank), k, window)


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_strided_mixed_and_fp64_inputs(device):
    k, window = make(2, 2, 3, 40, 32, dtype=torch.float64, device=device, seed=3, inside=1, rank=3)
    # a window that is a strided view of a longer buffer (positions 5..44 of 60), keys in another dtype
    buf = torch.randn(2, 2, 60, 32, dtype=torch.float64, device=device)
    buf[:, :, 5:45] = window
    view = buf[:, :, 5:45]
    assert not view.is_contiguous()
    for kk, ww in ((k, view), (k.half(), view.float()), (k.float(), view.bfloat16()),
                   (k.transpose(-1, -2).contiguous().transpose(-1, -2).float(), view.float())):  # last dim strided
        assert_close(novelty(kk, ww, 3, backend="triton"), novelty_reference(kk, ww, 3), kk, ww)


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_many_key_tiles(device):
    # n above BLOCK_N (4096 // 128 = 32 keys per tile at D = 100): several programs per (b, h), last one partial
    k, window = make(1, 2, 70, 9, 100, device=device, seed=11, inside=5, rank=2)
    assert_close(novelty(k, window, 2, backend="triton"), novelty_reference(k, window, 2), k, window)


@gpu
def test_triton_op_opcheck():
    from kvprec.ops.triton import novelty as tnov

    k, window = make(2, 2, 3, 9, 64, dtype=torch.float16, device="cuda", rank=2)
    basis = window_basis(window.float(), 2).contiguous()
    torch.library.opcheck(tnov.novelty_reduce_op, (k, window, basis))


# ---------------------------------------------------------------------------------------------------------
# NoveltyTracker

@pytest.mark.parametrize("device", available_devices())
def test_tracker_first_call_is_defined(device):
    tracker = NoveltyTracker(window=4, rank=2)
    k = torch.randn(1, 2, 3, 8, device=device)
    k[0, 1, 2] = 0.0
    got = tracker.observe(0, k)
    for t in got:
        assert t.dtype == torch.float32 and t.shape == (1, 2, 3) and torch.isfinite(t).all()
    # as against a window of zeros
    want = novelty(k, torch.zeros(1, 2, 1, 8, device=device), 1, backend="torch")
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_)
    assert (got.cosine == 1).all() and got.residual[0, 1, 2] == 0 and (got.residual[0, 0] == 1).all()
    torch.testing.assert_close(got.l2, k.norm(dim=-1))


@pytest.mark.parametrize("device", available_devices())
def test_tracker_rolls_in_order_and_compares_before_rolling(device):
    w_size, rank, d = 4, 3, 6
    tracker = NoveltyTracker(window=w_size, rank=rank, backend="torch")
    g = torch.Generator().manual_seed(5)
    stream = torch.randn(2, 1, 11, d, generator=g).to(device)
    held = None
    for t0, t1 in ((0, 1), (1, 3), (3, 4), (4, 10), (10, 11)):   # one key, two, one, six (> window), one
        chunk = stream[:, :, t0:t1]
        got = tracker.observe(3, chunk)
        if held is not None:
            # compared with the window before this call, rank min(rank, keys held)
            want = novelty(chunk, held, min(rank, held.shape[2]), backend="torch")
            for g_, w_ in zip(got, want):
                assert torch.equal(g_, w_)
        held = stream[:, :, max(0, t1 - w_size):t1].float()
        assert torch.equal(tracker.keys(3), held)                # oldest first, the last `window` keys
    assert tracker.keys(0) is None                                # layers are independent
    tracker.observe(0, stream[:, :, :2])
    assert tracker.keys(0).shape[2] == 2 and tracker.keys(3).shape[2] == w_size
    tracker.reset()
    assert tracker.keys(3) is None and tracker.keys(0) is None


def test_tracker_keeps_fp32_and_refuses_mismatches():
    tracker = NoveltyTracker(window=3, rank=1)
    k = torch.randn(1, 2, 2, 8, dtype=torch.bfloat16)
    tracker.observe(0, k)
    assert tracker.keys(0).dtype == torch.float32 and torch.equal(tracker.keys(0), k.float())
    tracker.observe(0, torch.randn(1, 2, 1, 8, dtype=torch.float16))   # another float dtype is fine
    with pytest.raises(ValueError, match=r"k_new \[1, 3, 1, 8\] does not match layer 0's window \[1, 2, 3, 8\]"):
        tracker.observe(0, torch.randn(1, 3, 1, 8))
    with pytest.raises(ValueError, match="k_new must be a floating tensor"):
        tracker.observe(1, torch.ones(1, 2, 1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="rank 4 exceeds head_dim 2"):
        NoveltyTracker(window=5, rank=4).observe(0, torch.randn(1, 1, 1, 2))
    for kwargs, match in ((dict(window=0, rank=1), "window must be a positive integer"),
                          (dict(window=3, rank=0), "rank must be a positive integer"),
                          (dict(window=2, rank=3), "rank 3 exceeds window 2"),
                          (dict(window=2, rank=1, backend="gpu"), "backend 'gpu' is not accepted")):
        with pytest.raises(ValueError, match=match):
            NoveltyTracker(**kwargs)


@needs_triton
def test_tracker_with_triton_backend():
    dev = TRITON_DEVICES[0]
    stream = torch.randn(1, 2, 6, 16, device=dev, dtype=torch.float16)
    fast = NoveltyTracker(window=4, rank=2, backend="triton")
    slow = NoveltyTracker(window=4, rank=2, backend="torch")
    for t in range(6):
        chunk = stream[:, :, t:t + 1]
        held = slow.keys(0) if t else torch.zeros(1, 2, 1, 16, device=dev)  # the window compared with
        assert_close(fast.observe(0, chunk), slow.observe(0, chunk), chunk, held)
        assert torch.equal(fast.keys(0), slow.keys(0))


_COMPILE_SCRIPT = r"""
import torch
from triton_sm90 import compile_sm90, record_launches
import kvprec.ops.triton.novelty as tnov
from kvprec.analysis.novelty import window_basis

launches = record_launches(tnov)

for kdt, wdt, n, w, d in ((torch.float16, torch.float16, 1, 256, 128), (torch.bfloat16, torch.float32, 7, 33, 80),
                          (torch.float32, torch.bfloat16, 64, 5, 512)):
    window = torch.randn(2, 2, w, d)
    tnov.novelty_reduce_op(torch.randn(2, 2, n, d).to(kdt), window.to(wdt), window_basis(window, 4).contiguous())
for kernel, args, kw in launches:
    compile_sm90(kernel, args, kw)
print("OK", len(launches))
"""


def test_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter does not run the compiler: compile the kernel for sm_90 (triton's bundled ptxas, no GPU)
    for each input dtype, a non-power-of-two head_dim and the largest accepted one."""
    pytest.importorskip("triton.backends.nvidia")
    out = run_compile_script(_COMPILE_SCRIPT)
    assert out.returncode == 0 and "OK 3" in out.stdout, out.stderr[-4000:]
