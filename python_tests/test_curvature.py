"""Attention curvature: the closed form against torch.autograd, the native kernels against the pure-torch
reference (awkward and long shapes, GQA, batch, causal or not), locality patterns on inputs built to show them,
error messages, and opcheck of every curvature op."""
import math

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

import kvprec
from kvprec.analysis import curvature as C

from helpers import available_devices

native = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")
BACKENDS = ["torch"] + (["cpp"] if kvprec.native_available() else [])


def _attention_output(q, K, V, scale, n):
    """o = softmax(scale K[:n] q) V[:n] for one query q [D]."""
    a = torch.softmax(scale * (K[:n] @ q), dim=0)
    return a @ V[:n]


@pytest.mark.parametrize("device", available_devices())
def test_closed_form_matches_autograd(device):
    torch.manual_seed(0)
    hq, hkv, nq, n, d, dv, scale = 4, 2, 3, 5, 4, 3, 0.6
    q = torch.randn(hq, nq, d, dtype=torch.float64, device=device)
    k = torch.randn(hkv, n, d, dtype=torch.float64, device=device)
    v = torch.randn(hkv, n, dv, dtype=torch.float64, device=device)
    r = C.attention_curvature_reference(q, k, v, scale, causal=True)
    checked = 0
    for h in range(hq):
        g = h // (hq // hkv)
        for i in range(nq):
            visible = n - nq + i + 1
            assert torch.all(r.attn[h, i, visible:] == 0) and torch.all(r.kappa[h, i, visible:] == 0)
            o = _attention_output(q[h, i], k[g], v[g], scale, visible)
            for t in range(visible):
                def f(kt, t=t):
                    K = torch.cat([k[g, :t], kt.unsqueeze(0), k[g, t + 1:]])
                    return _attention_output(q[h, i], K, v[g], scale, visible)
                J = jacobian(f, k[g, t])                                                  # [Dv, D]
                H = torch.stack([hessian(lambda kt, j=j: f(kt)[j], k[g, t]) for j in range(dv)])  # [Dv, D, D]
                a = r.attn[h, i, t]
                # The tensors themselves, not only their norms: J = s a (v - o) q^T, H = s^2 a (1 - 2a) (v - o) x q x q.
                torch.testing.assert_close(J, scale * a * torch.outer(v[g, t] - o, q[h, i]), rtol=1e-10, atol=1e-13)
                h_closed = scale ** 2 * a * (1 - 2 * a) * torch.einsum("a,b,c->abc", v[g, t] - o, q[h, i], q[h, i])
                torch.testing.assert_close(H, h_closed, rtol=1e-10, atol=1e-13)
                torch.testing.assert_close(r.jac_norm[h, i, t], J.norm(), rtol=1e-10, atol=1e-14)
                torch.testing.assert_close(r.hess_norm[h, i, t], H.norm(), rtol=1e-10, atol=1e-14)
                torch.testing.assert_close(r.kappa[h, i, t], a * J.norm() * H.norm(), rtol=1e-10, atol=1e-15)
                checked += 1
    assert checked == hq * sum(n - nq + i + 1 for i in range(nq))


SHAPES = [  # (B or None, Hq, Hkv, Q, N, D)
    (None, 1, 1, 1, 1, 4),
    (None, 4, 2, 7, 7, 8),
    (2, 6, 3, 5, 123, 16),
    (None, 2, 1, 1, 1023, 32),   # decode over a long cache
    (1, 8, 8, 64, 200, 12),
]


def _inputs(shape, dtype, device, seed=0):
    b, hq, hkv, nq, n, d = shape
    g = torch.Generator().manual_seed(seed)
    lead = () if b is None else (b,)
    mk = lambda *s: torch.randn(*lead, *s, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    return mk(hq, nq, d), mk(hkv, n, d), mk(hkv, n, d)


@native
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_native_matches_reference(shape, causal, dtype):
    q, k, v = _inputs(shape, dtype, "cpu")
    ref = C.attention_curvature(q, k, v, 0.0, causal, backend="torch")
    nat = C.attention_curvature(q, k, v, 0.0, causal, backend="cpp")
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, b in zip(ref._fields, ref, nat):
        assert a.dtype == b.dtype == expected and a.shape == b.shape, name
        # Both compute in FP64 from the same inputs; the native ||v - o||^2 is a matmul expansion whose
        # cancellation costs ~1e-16 ||v||^2 absolute (hence the absolute term scaled by the largest value).
        tol = 1e-9 if expected == torch.float64 else 2e-6
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * float(a.abs().max()) + 1e-300)


@native
@pytest.mark.parametrize("shape", SHAPES[1:4])
@pytest.mark.parametrize("query_reduce", ["mean", "max", "sum"])
@pytest.mark.parametrize("block_reduce", ["mean", "max", "sum"])
def test_curvature_reduce_native_matches_reference(shape, query_reduce, block_reduce):
    q, k, v = _inputs(shape, torch.float32, "cpu", seed=1)
    ref = C.curvature_reduce(q, k, v, 0.0, True, 16, query_reduce, block_reduce, backend="torch")
    nat = C.curvature_reduce(q, k, v, 0.0, True, 16, query_reduce, block_reduce, backend="cpp")
    hkv, n = shape[2], shape[4]
    lead = () if shape[0] is None else (shape[0],)
    assert nat[0].shape == (*lead, hkv, n) and nat[1].shape == (*lead, hkv, math.ceil(n / 16))
    for a, b in zip(ref, nat):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9 * float(a.abs().max()) + 1e-300)


@pytest.mark.parametrize("backend", BACKENDS)
def test_curvature_reduce_definition(backend):
    """Mean over (head of the GQA group, query that sees t), then the block statistic, from the per-query kappa."""
    q, k, v = _inputs((None, 4, 2, 5, 11, 8), torch.float64, "cpu", seed=2)
    kappa = C.attention_curvature_reference(q, k, v, 0.0, True).kappa.reshape(2, 2, 5, 11)
    seen = (torch.arange(11).unsqueeze(0) <= torch.arange(6, 11).unsqueeze(1)).sum(0) * 2
    mean = kappa.sum(dim=(1, 2)) / seen
    pos, blk = C.curvature_reduce(q, k, v, 0.0, True, 4, "mean", "max", backend=backend)
    torch.testing.assert_close(pos, mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(blk[:, 2], mean[:, 8:].amax(-1), rtol=1e-12, atol=1e-15)  # a partial last block
    _, blk_mean = C.curvature_reduce(q, k, v, 0.0, True, 4, "mean", "mean", backend=backend)
    torch.testing.assert_close(blk_mean[:, 2], mean[:, 8:].mean(-1), rtol=1e-12, atol=1e-15)


def _structured():
    """KV head 0: a long 'sink' key at position 0 plus keys in three directions (t % 3); its queries all point
    at the sink. KV head 1: random keys; each query points at its own position (pure recency)."""
    torch.manual_seed(3)
    n, d, nq = 32, 16, 8
    dirs = torch.nn.functional.normalize(torch.randn(3, d, dtype=torch.float64), dim=-1)
    k = torch.empty(2, n, d, dtype=torch.float64)
    for t in range(n):
        k[0, t] = dirs[t % 3] * (1 + 0.01 * t) + 0.01 * torch.randn(d, dtype=torch.float64)
    k[0, 0] = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64), dim=0) * 5
    k[1] = torch.randn(n, d, dtype=torch.float64)
    q = torch.stack([k[0, 0].expand(nq, d) * 10, k[1, n - nq:] * 10])
    return q, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_locality_patterns_on_built_inputs(backend):
    q, k = _structured()
    n, nq = k.shape[1], q.shape[1]
    p = C.attention_locality(q, k, 1.0, True, window=1, backend=backend)
    assert p.recency_share[1] > 0.99 and p.recency_share[0] < 0.05
    uniform = sum(1.0 / (n - nq + i + 1) for i in range(nq)) / nq
    torch.testing.assert_close(p.recency_uniform, torch.full((2,), uniform, dtype=torch.float64))
    assert p.anchor_mask[0, 0] and p.anchor_share[0] > 0.5
    assert not p.anchor_mask[1].any()  # each position is attended by one query of 8 (< 0.9 of them)
    assert int(p.cluster_count[0]) == 4
    expected = (torch.arange(n) - 1).remainder(3) + 1
    expected[0] = 0
    assert torch.equal(p.cluster_id[0], expected)
    torch.testing.assert_close(p.cluster_top_share[0], torch.tensor(1.0, dtype=torch.float64))
    one = C.attention_locality(q, k, 1.0, True, window=1, top_clusters=1, backend=backend)
    assert one.cluster_top_share[0] > 0.5  # the sink's own cluster


@native
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("causal", [True, False])
def test_locality_native_matches_reference(shape, causal):
    q, k, _ = _inputs(shape, torch.float32, "cpu", seed=4)
    args = (q, k, 0.0, causal, 5, 2.0, 0.5, 0.3, 3)
    ref = C.attention_locality(*args, backend="torch")
    nat = C.attention_locality(*args, backend="cpp")
    for name, a, b in zip(ref._fields, ref, nat):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype.is_floating_point:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        else:
            assert torch.equal(a, b), name
    assert nat.anchor_mask.any() or shape[4] > 100  # short sequences do have anchors at f = 0.5, k = 2


def test_leader_clusters_thresholds():
    torch.manual_seed(5)
    keys = torch.randn(20, 8)
    assert C.leader_clusters(keys, -1.0)[1] == 1
    ids, count = C.leader_clusters(torch.cat([keys, 3 * keys]), 1 - 1e-12)
    assert count == 20 and torch.equal(ids[20:], ids[:20])
    zero_ids, zero_count = C.leader_clusters(torch.zeros(3, 8), 0.5)
    assert zero_count == 3  # a zero key has cosine 0 with everything


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_argument(backend):
    q, k, v = torch.randn(4, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    cases = [
        ((q, k, v, -1.0, True), "scale"),
        ((q[:3], k, v, 0.0, True), "multiple of KV heads"),
        ((torch.randn(4, 6, 8), k, v, 0.0, True), "Q <= N"),
        ((q, torch.randn(2, 5, 4), v, 0.0, True), "head_dim"),
        ((q[0], k, v, 0.0, True), "q must be"),
        ((q, k, torch.randn(2, 4, 8), 0.0, True), "v must match k"),
        ((q.int(), k, v, 0.0, True), "floating"),
        ((q.masked_fill(q > 1, float("nan")), k, v, 0.0, True), "non-finite"),
    ]
    for args, needle in cases:
        with pytest.raises(ValueError, match=needle):
            C.attention_curvature(*args, backend=backend)
    with pytest.raises(ValueError, match="accepted mean, max, sum"):
        C.curvature_reduce(q, k, v, 0.0, True, 4, "median", "max", backend=backend)
    with pytest.raises(ValueError, match="anchor_fraction"):
        C.attention_locality(q, k, 0.0, True, anchor_fraction=0.0, backend=backend)
    with pytest.raises(ValueError, match="window"):
        C.attention_locality(q, k, 0.0, True, window=0, backend=backend)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_opcheck_curvature_ops(dtype):
    q, k, v = _inputs((2, 4, 2, 3, 9, 8), dtype, "cpu", seed=6)
    torch.library.opcheck(torch.ops.kvprec.attention_curvature.default, (q, k, v, 0.0, True))
    torch.library.opcheck(torch.ops.kvprec.attention_curvature.default, (q[0], k[0], v[0], 0.5, False))
    torch.library.opcheck(torch.ops.kvprec.curvature_reduce.default, (q, k, v, 0.0, True, 4, "mean", "max"))
    torch.library.opcheck(torch.ops.kvprec.curvature_reduce.default, (q[1], k[1], v[1], 0.0, False, 2, "max", "sum"))
    torch.library.opcheck(torch.ops.kvprec.attention_locality.default, (q, k, 0.0, True, 4, 2.0, 0.5, 0.5, 2))
    torch.library.opcheck(torch.ops.kvprec.attention_locality.default, (q[0], k[0], 0.0, False))
