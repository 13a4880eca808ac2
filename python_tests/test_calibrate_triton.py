"""Calibration through the Triton curvature reduction (KVCacheAnalyzer.add_calibration(backend="triton"),
Curvature.calibrate(backend=...)) against the C++ path (host copies, FP64 closed form, C++ accumulator).

Without CUDA the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by triton_device before any
imports triton); on a GPU the model and tensors move there, where backend="auto" picks the kernel.

Tolerance: the kernel's (kvprec/ops/triton/curvature.py; RTOL, ATOL, FLOOR as in test_curvature_triton.py, which
measures them), per calibration input, batch row and KV head, for the position sum and max::

    |x_i - ref_i| <= RTOL ref_i + ATOL max_t ref_i + FLOOR K0_i,     K0_i = (s max||q||)^3 max||v||^2

carried through the accumulator: the accumulated sum S = sum_i S_i is within RTOL S + n ATOL max_t S + n FLOOR K0
(n inputs, each max_t S_i <= max_t S); the max within RTOL X + ATOL max_t X + FLOOR K0 (a max moves by at most
the largest error); the mean S / count within S's bound / count (the count is exact: computed from the shapes);
a block max within the largest bound of its positions, a block sum within the sum of them.
"""
import copy
from triton_device import DEVICE, skip_module_without_triton  # first: sets TRITON_INTERPRET without CUDA

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

skip_module_without_triton()

import kvprec  # noqa: E402
from kvprec.ops.reference import curvature as C  # noqa: E402
from kvprec.analysis.analyzer import KVCacheAnalyzer, calibration_backend, visible_count  # noqa: E402
from kvprec.storage.formats import Tier  # noqa: E402
from kvprec.hf.policy import Curvature  # noqa: E402

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


RTOL, ATOL, FLOOR = 5e-5, 3e-5, 1e-9  # test_curvature_triton.py: 10x / 8x the errors measured there
T, D = 16, 32
EPS_TWO_TIERS = 1e-3  # the tiny Llama's calibration below maps to more than one tier at this eps (asserted)
CANDIDATES = (Tier.INT4, Tier.INT8, Tier.FP16)


class Recorder:
    """Stands in for the analyzer's torch.classes object: records which native methods ran, with what shapes."""

    def __init__(self, impl):
        self.impl, self.calls = impl, []

    def __getattr__(self, name):
        method = getattr(self.impl, name)

        def call(*args):
            self.calls.append((name, [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args],
                               [a.device.type for a in args if isinstance(a, torch.Tensor)]))
            return method(*args)
        return call


def pair(**kw):
    """Two analyzers with the same options: the C++ path and the Triton one (native calls recorded)."""
    ref = KVCacheAnalyzer(head_dim=D, block_size=T, group_size=32, candidates=CANDIDATES, **kw)
    tri = KVCacheAnalyzer(head_dim=D, block_size=T, group_size=32, candidates=CANDIDATES, **kw)
    tri._impl = Recorder(tri._impl)
    return ref, tri


def k0(q, v, scale):
    s = C.resolve_scale(scale, q.shape[-1])
    return float((s * q.double().norm(dim=-1).max()) ** 3 * v.double().norm(dim=-1).max() ** 2)


def check_layer(ref: KVCacheAnalyzer, tri: KVCacheAnalyzer, layer: int, floor: float, query_reduce: str = "mean"):
    """The accumulated statistics and the map's block statistics of ``layer`` within the carried tolerance
    (module docstring); ``floor`` = the sum over inputs of FLOOR K0_i."""
    r, t = ref.curvature(layer), tri.curvature(layer)
    n = r.inputs
    assert t.inputs == n and torch.equal(t.count, r.count)  # the host count equals the native one exactly
    assert (r.sum.amax(-1) > 0).all()  # no all-zero row: the comparison is not between zeros
    sum_bound = RTOL * r.sum + n * ATOL * r.sum.amax(-1, keepdim=True) + floor
    max_bound = RTOL * r.max + ATOL * r.max.amax(-1, keepdim=True) + floor
    worst = {"sum": ((t.sum - r.sum).abs() / sum_bound).max().item(),
             "max": ((t.max - r.max).abs() / max_bound).max().item()}
    if query_reduce == "mean":
        mean_ref, mean_tri = r.sum / r.count, t.sum / t.count
        pos_bound = sum_bound / r.count
        worst["mean"] = ((mean_tri - mean_ref).abs() / pos_bound).max().item()
    else:
        pos_bound = max_bound
    # The maps' block statistics (threshold mode: kappa_max / kappa_sum of the query_reduce statistic).
    pr, pt = ref.analyze("threshold"), tri.analyze("threshold")
    kmax_bound = C.block_reduce(pos_bound, T, "max")
    ksum_bound = C.block_reduce(pos_bound, T, "sum")
    worst["kappa_max"] = ((pt.kappa_max[layer] - pr.kappa_max[layer]).abs() / kmax_bound).max().item()
    worst["kappa_sum"] = ((pt.kappa_sum[layer] - pr.kappa_sum[layer]).abs() / ksum_bound).max().item()
    assert max(worst.values()) <= 1.0, worst
    # Tiers agree wherever the block's required bits are farther from a tier boundary than its tolerance moves them.
    bits = torch.log2(pr.kappa_max[layer] * ref.c * D * D / ref.eps)
    slack = torch.log2(1 + kmax_bound / pr.kappa_max[layer])
    near = torch.zeros_like(bits, dtype=torch.bool)
    for tier in CANDIDATES:
        near |= (bits - tier.effective_bits).abs() <= slack
    assert torch.equal(pt.tiers[layer][~near], pr.tiers[layer][~near])
    return worst


def make_qkv(b, hq, hkv, nq, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lead = () if b is None else (b,)
    # a spread of query norms: attention peaked on some positions and flat on others (kappa over decades)
    q = torch.randn(*lead, hq, nq, D, generator=gen) * torch.linspace(0.5, 3.0, nq)[:, None]
    k, v = torch.randn(*lead, hkv, n, D, generator=gen), torch.randn(*lead, hkv, n, D, generator=gen)
    return tuple(x.to(dtype).to(DEVICE) for x in (q, k, v))


# (B, Q, N, dtype) per input: a prefill (Q = N), the last queries of a longer input (Q < N) in a batch, Q = 1;
# N not a multiple of T; FP32 and FP16 (the kernel runs FP16 as it is, the C++ path in FP64 from the same values).
INPUTS = [(None, 37, 37, torch.float32), (2, 5, 50, torch.float16), (None, 1, 23, torch.float32)]


@pytest.mark.parametrize("query_reduce", ["mean", "max"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_analyzer_triton_path_matches_the_cpp_path(causal, query_reduce):
    # eps puts the blocks' required bits around INT8's 8 (measured 6-10 bits): the maps mix INT8 and FP16
    ref, tri = pair(causal=causal, query_reduce=query_reduce, scale=0.25,
                    eps=4.0 if query_reduce == "mean" else 128.0)
    floors = [0.0, 0.0]
    for layer, hkv in ((0, 2), (1, 1)):  # GQA groups of 2 and 4
        for i, (b, nq, n, dtype) in enumerate(INPUTS):
            q, k, v = make_qkv(b, 4, hkv, nq, n, dtype, seed=10 * layer + i)
            assert ref.add_calibration(layer, q, k, v, backend="cpp") == "cpp"
            assert tri.add_calibration(layer, q, k, v, backend="triton") == "triton"
            floors[layer] += FLOOR * k0(q, v, 0.25) * (1 if b is None else b)
        calls = [c for c in tri._impl.calls if c[0] == "add_reduced" and c[1][0] == layer]
        # only the reduced statistics crossed to the host: [B?, Hkv, N] twice and the count [N]
        assert [c[1][1:] for c in calls] == [[(hkv, 37), (hkv, 37), (37,)], [(2, hkv, 50), (2, hkv, 50), (50,)],
                                             [(hkv, 23), (hkv, 23), (23,)]]
        assert all(devices == ["cpu"] * 3 for _, _, devices in calls)
    assert not any(name == "add_calibration" for name, _, _ in tri._impl.calls)
    assert tri.backends == {"triton": 6} and ref.backends == {"cpp": 6}
    for layer in (0, 1):
        assert ref.curvature(layer).inputs == 4
        check_layer(ref, tri, layer, floors[layer], query_reduce)
    assert len(torch.cat([t.flatten() for t in ref.analyze("threshold").tiers]).unique()) >= 2


def test_calibrate_on_the_tiny_llama_matches_the_cpp_path(tiny_model, monkeypatch):
    """Curvature.calibrate with the kernel (backend="triton"; on a GPU "auto" too) and with the C++ path, on the
    same model and inputs: two inputs of different lengths and a batch of two (four calibration rows)."""
    from kvprec.hf.policy import curvature as policy_module

    model = tiny_model("llama")
    if DEVICE == "cuda":
        model = copy.deepcopy(model).to(DEVICE)  # the session's model stays on CPU
    gen = torch.Generator().manual_seed(7)
    inputs = [torch.randint(3, 256, (1, 48), generator=gen), torch.randint(3, 256, (1, 40), generator=gen),
              torch.randint(3, 256, (2, 33), generator=gen)]
    analyzers = []  # the analyzer behind each calibrate call (the policy keeps only the map)
    calibrate = policy_module._calibrate
    monkeypatch.setattr(policy_module, "_calibrate", lambda *a: analyzers.append(calibrate(*a)) or analyzers[-1])
    eps = EPS_TWO_TIERS
    cpp = Curvature.calibrate(model, inputs, mode="threshold", eps=eps, block_size=T, backend="cpp")
    tri = Curvature.calibrate(model, inputs, mode="threshold", eps=eps, block_size=T, backend="triton")
    assert cpp.calibration_backends == {"cpp": 6} and tri.calibration_backends == {"triton": 6}  # 3 forwards x 2
    ref, got = analyzers
    for layer in range(2):
        assert ref.curvature(layer).inputs == got.curvature(layer).inputs == 4
        # FLOOR 0: every row has curvature (check_layer asserts it) far above the tf32x3 residue FLOOR covers.
        check_layer(ref, got, layer, 0.0)
    assert len(torch.cat([t.flatten() for t in cpp.map.tiers]).unique()) >= 2  # the tier check means something
    if DEVICE == "cuda":
        auto = Curvature.calibrate(model, inputs, mode="threshold", eps=eps, block_size=T)
        assert auto.calibration_backends == {"triton": 6}
        assert all(torch.equal(a, b) for a, b in zip(auto.map.kappa_sum, tri.map.kappa_sum))


def test_backend_choice_and_errors(monkeypatch):
    dev = torch.device(DEVICE)
    assert calibration_backend("auto", dev) == ("triton" if DEVICE == "cuda" else "cpp")  # never the interpreter
    assert calibration_backend("triton", dev) == "triton" and calibration_backend("cpp", dev) == "cpp"
    assert calibration_backend("torch", dev) == "torch"
    with pytest.raises(ValueError, match="backend: 'cuda' is not accepted; use auto, cpp, triton or torch"):
        calibration_backend("cuda", dev)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="backend='triton' is unavailable: Triton needs a CUDA device"):
            calibration_backend("triton", dev)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    a = KVCacheAnalyzer(head_dim=D, block_size=T)
    q, k, v = make_qkv(None, 4, 2, 5, 20, torch.float32, seed=3)
    with pytest.raises(ValueError, match="k has head_dim 16 but the geometry's head_dim is 32"):
        a.add_calibration(0, q[..., :16], k[..., :16], v[..., :16], backend="triton")
    with pytest.raises(ValueError, match="Q <= N"):  # the kernel's own checks, before anything is added
        a.add_calibration(0, q, k[:, :3], v[:, :3], backend="triton")
    with pytest.raises(ValueError, match="layer: -1 is not accepted"):
        a.add_calibration(-1, q, k, v, backend="triton")
    assert a.num_layers == 0
    a.add_calibration(0, q, k, v, backend="triton")
    with pytest.raises(ValueError, match="pos_sum has 1 KV heads, the accumulator 2"):
        a.add_calibration(0, q, k[:1], v[:1], backend="triton")
    with pytest.raises(ValueError, match="k has 1 KV heads, the accumulator 2"):  # mixing paths: one accumulator
        a.add_calibration(0, q, k[:1], v[:1], backend="cpp")


def test_visible_count_is_the_reference_visibility():
    for nq, n, causal in ((5, 11, True), (11, 11, True), (1, 4, True), (7, 3, False)):
        seen = C._visible(nq, n, causal, "cpu").sum(0).double()
        assert torch.equal(visible_count(3, 2, nq, n, causal), seen * 6)
    with pytest.raises(ValueError, match="queries <= positions"):
        visible_count(1, 1, 5, 4, True)
    assert math.isclose(float(visible_count(1, 4, 3, 3, True)[0]), 12.0)
