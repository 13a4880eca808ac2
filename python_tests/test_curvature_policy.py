"""KVCacheAnalyzer from Python (torch.classes.kvprec.KVCacheAnalyzer) and the Curvature policy in generate.

Oracles: the analysis ops (kvprec.analysis.curvature / kvprec.analysis.precision, backend "cpp" and the pure-torch
reference) on the same q, k, v; for the model capture, q recomputed from the attention module's inputs by a
forward pre-hook and K/V from a stock DynamicCache.

Measured (not asserted: the tiny models here are random, and on the trained model it is a small, mixed effect):
equal page bytes (5.5 bits/element, uniform INT4's at T=16, D=32, G=32), teacher-forced through the cache
(kvprec.hf.eval.compare, T=16; trained tiny Llama of kvprec/models: calibration on 512 bytes of argparse.py, eval
prefill 384 + 128 steps of difflib.py):
    uniform INT4                       mean |dNLL| 0.0248, top-1 agreement 99.2%, ppl -0.24%
    Curvature int2/int4/int8/fp16      mean |dNLL| 0.0221, top-1 agreement 98.4%, ppl +0.11%
    (uniform INT8: 0.0012 / 100%; uniform INT2: 0.138 / 91.4%)
and on the random tiny Llama (256 random tokens each for calibration and eval, prefill 192) the map was worse
than uniform INT4: |dNLL| 0.0130 vs 0.0082, top-1 85.9% vs 90.6%. So no claim that the map beats uniform INT4
is tested here; the curvature on random weights carries little information about where errors matter.
"""
import math

import pytest
import torch

import kvprec
from kvprec.hf import policy as P
from kvprec.analysis.curvature import block_reduce, curvature_reduce
from kvprec.analysis.analyzer import KVCacheAnalyzer, PrecisionMap, visible_count
from kvprec.storage.formats import BlockGeometry, Tier
from kvprec.hf.policy import Curvature
from kvprec.analysis.precision import knapsack_tiers, map_tiers, page_costs, required_bits, tier_errors

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")

CANDIDATES = (Tier.INT4, Tier.INT8, Tier.FP16)
T, D = 16, 32


def random_qkv(seed, b=2, hq=4, hkv=2, n=37):
    g = torch.Generator().manual_seed(seed)
    # A spread of query norms makes attention peaked on some positions and flat on others: kappa varies by decades.
    q = torch.randn(b, hq, n, D, generator=g) * torch.linspace(0.5, 3.0, n)[:, None]
    return q, torch.randn(b, hkv, n, D, generator=g), torch.randn(b, hkv, n, D, generator=g)


def mid_eps(kappa_max: torch.Tensor, c: float = 1.0) -> float:
    """eps putting the median block's required bits halfway between INT4 and INT8: a map with both tiers."""
    target = (Tier.INT4.effective_bits + Tier.INT8.effective_bits) / 2
    return c * float(kappa_max.median()) * D * D / 2.0 ** target


def analyzer_with(layers, seed=0, **kw) -> KVCacheAnalyzer:
    a = KVCacheAnalyzer(head_dim=D, block_size=T, group_size=32, candidates=kw.pop("candidates", CANDIDATES), **kw)
    for layer in range(layers):
        a.add_calibration(layer, *random_qkv(seed + layer))
    return a


def uniform_error(pmap: PrecisionMap, tier: Tier, c: float = 1.0) -> float:
    return sum(float(k.sum()) for k in pmap.kappa_sum) * c * D * D * 2.0 ** -tier.effective_bits


# ---- the analyzer wrapper against the ops ------------------------------------------------------------------

def test_threshold_map_equals_the_ops_on_the_same_inputs():
    q, k, v = random_qkv(0)
    pos, _ = curvature_reduce(q, k, v, 0.0, True, T, "mean", "max", backend="cpp")  # [B, Hkv, N]
    ref_pos, _ = curvature_reduce(q, k, v, 0.0, True, T, "mean", "max", backend="torch")
    torch.testing.assert_close(pos, ref_pos, rtol=1e-9, atol=0.0)
    # Both rows see the same queries, so the accumulated mean over (input, head, query) is the mean of the rows.
    kmax, ksum = block_reduce(pos.mean(0), T, "max"), block_reduce(pos.mean(0), T, "sum")
    eps = mid_eps(kmax)
    a = KVCacheAnalyzer(head_dim=D, block_size=T, group_size=32, candidates=CANDIDATES, eps=eps)
    a.add_calibration(0, q, k, v)
    pmap = a.analyze("threshold")
    assert pmap.num_layers == 1 and pmap.mapped_blocks(0) == math.ceil(37 / T) == 3
    torch.testing.assert_close(pmap.kappa_max[0], kmax, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(pmap.kappa_sum[0], ksum, rtol=1e-12, atol=0.0)
    geometry = BlockGeometry(T, D, 32)
    expected = map_tiers(required_bits(kmax, 1.0, D, eps, backend="cpp"), CANDIDATES, geometry, backend="cpp")
    assert torch.equal(pmap.tiers[0], expected)
    assert len(pmap.tiers[0].unique()) >= 2  # the eps above makes the comparison mean something
    # The report agrees with the tiers it describes.
    assert pmap.page_bytes == sum(geometry.page_bytes(Tier(int(t))) for t in pmap.tiers[0].flatten())
    for row in pmap.heads:
        counts = torch.bincount(pmap.tiers[0][row.head].long(), minlength=len(Tier))
        assert [row.tier_blocks[str(t)] for t in Tier] == counts.tolist()
    assert pmap.to_markdown().startswith("Precision map (threshold mode)") and "| 0 | 1 | 3 |" in pmap.to_markdown()


def test_default_tier_past_the_map_is_the_heads_lower_median():
    a = analyzer_with(2)
    pmap = a.analyze("budget", bits_per_element=9.0)  # between INT4 (5.5) and INT8 (9.5) pages: mixed tiers
    nb = pmap.mapped_blocks(0)
    for layer in range(2):
        for head in range(pmap.kv_heads(layer)):
            tiers = sorted((Tier(int(t)) for t in pmap.tiers[layer][head]), key=lambda t: (t.effective_bits, int(t)))
            assert pmap.tier(layer, head, nb + 5) is tiers[(len(tiers) - 1) // 2]
            assert [pmap.tier(layer, head, j) for j in range(nb)] == [Tier(int(t)) for t in pmap.tiers[layer][head]]
        sealed = pmap.seal_tiers(layer, 3, range(nb - 2, nb + 2))
        assert sealed.shape == (3, 2, 4) and sealed.dtype == torch.int8
        assert sealed.tolist() == [[[int(pmap.tier(layer, h, j)) for j in range(nb - 2, nb + 2)] for h in range(2)]] * 3
    assert any(len(t.unique()) > 1 for t in pmap.tiers)
    with pytest.raises(ValueError, match="head: 2 is out of range"):
        pmap.tier(0, 2, 0)


@pytest.mark.parametrize("bits", [5.5, 6.1, 7.3, 9.5, 12.0, 16.0])
def test_budget_mode_is_the_optimal_knapsack_within_the_bytes(bits):
    a = analyzer_with(3, seed=10)
    pmap = a.analyze("budget", bits_per_element=bits)
    g = pmap.geometry
    items = 3 * 2 * 3
    budget = math.floor(bits * items * T * D * 2 / 8)
    assert a.items() == items and a.budget_bytes(bits) == budget
    used = sum(g.page_bytes(Tier(int(t))) for tiers in pmap.tiers for t in tiers.flatten())
    assert used == pmap.page_bytes <= budget and pmap.bits_per_element <= bits
    assert pmap.exact
    # The same MCKP solved by the op: same optimal error.
    kappa = torch.cat([k.flatten() for k in pmap.kappa_sum])
    ref = knapsack_tiers(tier_errors(kappa, CANDIDATES, 1.0, D), page_costs(CANDIDATES, g), budget, "dp",
                         backend="torch")
    assert pmap.predicted_error == pytest.approx(ref.error, rel=1e-12)
    # Any uniform tier that fits the budget is a feasible choice, so the optimum is at least as good.
    for tier in CANDIDATES:
        if items * g.page_bytes(tier) <= budget:
            assert pmap.predicted_error <= uniform_error(pmap, tier) * (1 + 1e-12)


def test_budget_below_the_minimum_is_refused_with_the_minimum():
    a = analyzer_with(1)
    least = a.min_bytes()
    assert least == 6 * BlockGeometry(T, D, 32).page_bytes(Tier.INT4)
    assert a.analyze("budget", budget_bytes=least).tiers[0].eq(int(Tier.INT4)).all()
    with pytest.raises(ValueError, match=f"budget_bytes={least - 1} is below the minimum achievable {least} bytes"):
        a.analyze("budget", budget_bytes=least - 1)
    message = r"bits_per_element=5.0 \(3840 bytes\) is below the minimum achievable 4224 bytes \(5.5 bits/element"
    with pytest.raises(ValueError, match=message):
        a.analyze("budget", bits_per_element=5.0)


def test_quality_mode_reaches_the_budget_maps_error_with_no_more_bytes():
    a = analyzer_with(2, seed=3)
    by_bytes = a.analyze("budget", bits_per_element=8.0)
    by_error = a.analyze("quality", max_error=by_bytes.predicted_error)
    assert by_error.predicted_error <= by_bytes.predicted_error * (1 + 1e-12)
    assert by_error.page_bytes <= by_bytes.page_bytes
    floor = uniform_error(by_bytes, Tier.FP16)
    with pytest.raises(ValueError, match="max_error: .* is below the minimum achievable predicted error"):
        a.analyze("quality", max_error=floor * 0.5)


@pytest.mark.parametrize("call,error", [
    (lambda a: a.analyze("bisect"), "mode: 'bisect' is not accepted"),
    (lambda a: a.analyze("budget"), "needs exactly one of budget_bytes= or bits_per_element="),
    (lambda a: a.analyze("budget", budget_bytes=10 ** 6, bits_per_element=4.0), "exactly one of"),
    (lambda a: a.analyze("threshold", max_error=1.0), "max_error: not used by mode='threshold'"),
    (lambda a: a.analyze("quality"), "needs max_error="),
    (lambda a: a.analyze("budget", budget_bytes=10 ** 6, method="simplex"), "method: 'simplex' is not accepted"),
    (lambda a: a.add_calibration(0, *(x[..., :16] for x in random_qkv(0))), "head_dim 16 but the geometry's"),
    (lambda a: a.add_calibration(0, *random_qkv(0, hkv=1, hq=4)), "k has 1 KV heads, the accumulator 2"),
    (lambda a: a.curvature(3), "layer 3 has no calibration input"),
])
def test_analyzer_errors_name_the_argument(call, error):
    with pytest.raises(ValueError, match=error):
        call(analyzer_with(1))


@pytest.mark.parametrize("kwargs,error", [
    (dict(candidates=(9,)), "tier: 9 is not a tier"),
    (dict(candidates=()), "candidates: empty"),
    (dict(candidates=("int4", "int4")), "candidates: int4 is listed twice"),
    (dict(query_reduce="sum"), "query_reduce: 'sum' is not accepted"),
    (dict(eps=0.0), "eps: 0 is not accepted"),
    (dict(group_size=12), "group_size: 12 must divide head_dim 32"),
    (dict(scale=-1.0), "scale: -1 is not accepted"),
])
def test_constructor_errors_name_the_argument(kwargs, error):
    with pytest.raises(ValueError, match=error):
        KVCacheAnalyzer(**dict(dict(head_dim=D, block_size=T), **kwargs))


def test_native_class_checks_what_the_wrapper_passes_on():
    with pytest.raises(ValueError, match="candidates: id 9 is not a tier"):
        torch.classes.kvprec.KVCacheAnalyzer(1.0, 2.0 ** -11, T, D, 32, [9], 0.0, True, "mean")
    impl = analyzer_with(1)._impl
    with pytest.raises(ValueError, match="mode: 'x' is not accepted"):
        impl.analyze("x", 0, 0.0, "auto")
    with pytest.raises(ValueError, match="method: 'x' is not accepted"):
        impl.analyze("budget", 10 ** 6, 0.0, "x")
    with pytest.raises(ValueError, match="budget: 10 bytes is below the minimum achievable"):
        impl.analyze("budget", 10, 0.0, "auto")


# ---- reduced statistics (the GPU path's hand-over) ---------------------------------------------------------

def reduced(q, k, v, causal=True, scale=0.0):
    """(pos_sum, pos_max, count) of one input as the device path hands them over, from the C++ kernel."""
    s = curvature_reduce(q, k, v, scale, causal, T, "sum", "sum", backend="cpp")[0]
    m = curvature_reduce(q, k, v, scale, causal, T, "max", "max", backend="cpp")[0]
    batch = q.shape[0] if q.dim() == 4 else 1
    return s, m, visible_count(batch, q.shape[-3] // k.shape[-3], q.shape[-2], k.shape[-2], causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_add_reduced_equals_add_calibration(causal):
    """add_reduced fed with curvature_reduce's sum and max of the same q, k, v accumulates exactly what
    add_calibration does; backend="torch" (the reduced path with the FP64 reference) agrees to rounding."""
    direct, via_reduced, via_torch = (KVCacheAnalyzer(head_dim=D, block_size=T, causal=causal) for _ in range(3))
    for layer in range(2):
        q, k, v = random_qkv(layer)
        inputs = [(q, k, v), (q[0, :, 30:], k[0], v[0]), (q[1, :, :1], k[1, :, :20], v[1, :, :20])]  # Q < N, Q = 1
        for x in inputs:
            assert direct.add_calibration(layer, *x, backend="cpp") == "cpp"
            via_reduced.add_reduced(layer, *reduced(*x, causal=causal))
            assert via_torch.add_calibration(layer, *x, backend="torch") == "torch"
    assert direct.backends == {"cpp": 6} and via_torch.backends == {"torch": 6}
    for layer in range(2):
        a, b, t = direct.curvature(layer), via_reduced.curvature(layer), via_torch.curvature(layer)
        assert a.inputs == b.inputs == t.inputs == 4
        assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
        assert torch.equal(a.count, t.count)
        torch.testing.assert_close(t.sum, a.sum, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(t.max, a.max, rtol=1e-12, atol=0.0)
    pa, pb = direct.analyze("threshold"), via_reduced.analyze("threshold")
    assert all(torch.equal(x, y) for x, y in zip(pa.kappa_sum + pa.tiers, pb.kappa_sum + pb.tiers))


@pytest.mark.parametrize("args,error", [
    (lambda s, m, c: (0, s[0, 0], m[0, 0], c), r"pos_sum must be \[Hkv, N\] or \[B, Hkv, N\]"),
    (lambda s, m, c: (0, s, m[..., :-1], c), "pos_max must have pos_sum's shape"),
    (lambda s, m, c: (0, s, m, c[:-1]), r"count must be \[N\] or \[Hkv, N\]"),
    (lambda s, m, c: (0, s.int(), m, c), "pos_sum must be a floating tensor"),
    (lambda s, m, c: (0, s, m, c > 0), "count must be a floating or integer tensor"),
    (lambda s, m, c: (0, -s, m, c), "pos_sum must be finite and >= 0"),
    (lambda s, m, c: (0, s, m * float("nan"), c), "pos_max must be finite and >= 0"),
    (lambda s, m, c: (0, s, m, c * 0), "count is 0 at a position where pos_sum or pos_max is not"),
    (lambda s, m, c: (0, s[:, :1], m[:, :1], c), "pos_sum has 1 KV heads, the accumulator 2"),
    (lambda s, m, c: (-1, s, m, c), "layer: -1 is not accepted"),
    (lambda s, m, c: (0, s, m, [1.0] * 37), "count must be a tensor"),
])
def test_add_reduced_errors_name_the_argument(args, error):
    a = analyzer_with(1)
    s, m, c = reduced(*random_qkv(0))
    with pytest.raises(ValueError, match=error):
        a.add_reduced(*args(s, m, c))
    assert a.curvature(0).inputs == 2  # a refused call adds nothing


def test_calibrate_backend_argument(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="backend: 'fast' is not accepted"):
        Curvature.calibrate(model, calibration_ids(), mode="threshold", block_size=T, backend="fast")
    pol = Curvature.calibrate(model, [calibration_ids(), calibration_ids(20)], mode="threshold", block_size=T)
    assert pol.calibration_backends == {"cpp": 4}  # auto on CPU: the C++ path (2 forwards x 2 layers)
    ref = Curvature.calibrate(model, [calibration_ids(), calibration_ids(20)], mode="threshold", block_size=T,
                              backend="torch")
    assert ref.calibration_backends == {"torch": 4}
    for x, y in zip(pol.map.kappa_max, ref.map.kappa_max):
        torch.testing.assert_close(y, x, rtol=1e-9, atol=0.0)


# ---- the policy on a model -----------------------------------------------------------------------------------

def captured_qkv(model, ids):
    """Per layer (q, k, v, scale) of a stock forward: q from the attention module's inputs (Llama's projection and
    RoPE), k/v from a DynamicCache."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    queries, hooks = {}, []

    def hook(module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        q = module.q_proj(h).view(*h.shape[:-1], -1, module.head_dim).transpose(1, 2)
        queries[module.layer_idx] = (apply_rotary_pos_emb(q, q, cos, sin)[0], module.scaling)

    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    cache = DynamicCache()
    try:
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return [(queries[i][0], cache.layers[i].keys, cache.layers[i].values, queries[i][1])
            for i in range(len(model.model.layers))]


def calibration_ids(n=48, seed=7):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))  # the tiny vocabulary


def test_calibrate_captures_each_layers_true_qkv(tiny_model):
    model = tiny_model("llama")
    ids = calibration_ids()
    oracle = []
    for q, k, v, scale in captured_qkv(model, ids):
        _, block = curvature_reduce(q, k, v, scale, True, T, "mean", "max", backend="cpp")
        oracle.append(block[0])
    eps = mid_eps(torch.cat([b.flatten() for b in oracle]))
    before = model.config._attn_implementation
    pol = Curvature.calibrate(model, ids, mode="threshold", eps=eps, block_size=T)
    assert model.config._attn_implementation == before  # kvprec.enabled restored it
    geometry = BlockGeometry(T, D, 32)
    # Layer 0 sees bit-identical inputs. Deeper layers' inputs differ by the rounding of the layers below: the
    # calibration run attends with kvprec's block-wise FP32 softmax, the oracle with SDPA (measured: q, k, v of
    # layer 1 within 4e-7 absolute, block kappa within 1.3e-7 relative).
    for layer, kmax in enumerate(oracle):
        torch.testing.assert_close(pol.map.kappa_max[layer], kmax, rtol=1e-12 if layer == 0 else 1e-5, atol=0.0)
        bits = required_bits(pol.map.kappa_max[layer], 1.0, D, eps, backend="cpp")
        assert torch.equal(pol.map.tiers[layer], map_tiers(bits, CANDIDATES, geometry, backend="cpp"))
    assert len(torch.cat([t.flatten() for t in pol.map.tiers]).unique()) >= 2


def test_curvature_policy_puts_the_map_in_the_cache_during_generate(tiny_model, prompts):
    model = tiny_model("llama")
    pol = Curvature.calibrate(model, calibration_ids(), bits_per_element=8.0, block_size=T)
    assert pol.map.mode == "budget" and pol.map.bits_per_element <= 8.0
    assert pol.map.mapped_blocks(0) == 3 and any(len(t.unique()) > 1 for t in pol.map.tiers)
    cache = kvprec.AdaptiveCache(model.config, policy=pol, block_size=T)
    with kvprec.enabled(model):
        out = model.generate(**prompts["padded"], past_key_values=cache, max_new_tokens=40, do_sample=False)
    assert out.shape == (2, 21 + 40)
    for layer_idx, layer in enumerate(cache.layers):
        tiers = layer.tiers()
        assert tiers.shape == (2, 2, (21 + 40 - 1) // T) == (2, 2, 3)
        assert torch.equal(tiers, pol.map.seal_tiers(layer_idx, 2, range(3)))
    # Past the calibrated length every block takes its head's default tier.
    short = Curvature.calibrate(model, calibration_ids(n=20), bits_per_element=8.0, block_size=T)
    assert short.map.mapped_blocks(0) == 2
    cache = kvprec.AdaptiveCache(model.config, policy=short, block_size=T)
    with kvprec.enabled(model):
        model.generate(**prompts["single"], past_key_values=cache, max_new_tokens=50, do_sample=False)
    for layer_idx, layer in enumerate(cache.layers):
        tiers = layer.tiers()[0]
        assert tiers.shape == (2, 4)
        for h in range(2):
            assert tiers[h].tolist() == [int(short.map.tier(layer_idx, h, j)) for j in range(4)]
            assert tiers[h, 2:].eq(short.map.default_tiers[layer_idx][h]).all()


@pytest.mark.filterwarnings("ignore:Curvature.calibrate")  # the windowed / softcapped families
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "gpt2"])
def test_every_supported_family_calibrates_and_generates_with_the_map(tiny_model, family):
    model = tiny_model(family)
    pol = Curvature.calibrate(model, calibration_ids(40), bits_per_element=8.0, block_size=T)
    cache = kvprec.AdaptiveCache(model.config, policy=pol, block_size=T)
    with kvprec.enabled(model), torch.no_grad():  # a prefill seals the blocks (generate is tested on llama)
        model(input_ids=calibration_ids(50, seed=1), past_key_values=cache, use_cache=True)
    for layer_idx, layer in enumerate(cache.layers):
        assert layer.tiers().shape[-1] == 3
        assert torch.equal(layer.tiers(), pol.map.seal_tiers(layer_idx, 1, range(3)))


def test_budget_wrapper_demotes_by_curvature_and_meets_its_budget(tiny_model, prompts):
    model = tiny_model("llama")
    pol = Curvature.calibrate(model, [calibration_ids(64), calibration_ids(40, seed=8)], mode="budget",
                              bits_per_element=12.0, block_size=T)
    assert pol.map.mapped_blocks(0) == 4 and pol.map.bits_per_element > 9.5  # some FP16 blocks to give up
    wrapped = P.budget(pol, bits_per_element=9.5, floor="int4")
    cache = kvprec.AdaptiveCache(model.config, policy=wrapped, block_size=T)
    with kvprec.enabled(model):
        model.generate(input_ids=calibration_ids(64, seed=2), past_key_values=cache, max_new_tokens=2,
                       do_sample=False)
    for layer_idx, layer in enumerate(cache.layers):
        b, h, n = layer.tiers().shape
        assert n == 4
        assert sum(layer.memory().tier_bytes.values()) * 8 <= 9.5 * b * h * n * T * D * 2
        assert torch.equal(pol.importance(layer), pol.map.kappa_sum[layer_idx].float().expand(b, h, n))
        assert bool((layer.tiers() >= pol.map.seal_tiers(layer_idx, b, range(n))).all())  # only demotions


def test_calibrate_warns_where_the_closed_form_does_not_model_the_attention(tiny_model):
    model = tiny_model("gemma2")  # sliding window and logit softcap
    with pytest.warns(UserWarning, match="plain causal softmax"):
        pol = Curvature.calibrate(model, calibration_ids(), mode="threshold", block_size=T)
    assert pol.map.num_layers == 2


def test_curvature_policy_errors(tiny_model):
    with pytest.raises(ValueError, match="needs a calibration run.*Curvature.calibrate"):
        P.get("curvature")
    with pytest.raises(ValueError, match="already taken"):
        P.register("curvature", lambda: None)
    with pytest.raises(ValueError, match="must be a kvprec.analysis.analyzer.PrecisionMap"):
        Curvature("uniform:int4")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs exactly one of budget_bytes= or bits_per_element="):
        Curvature.calibrate(model, calibration_ids())
    with pytest.raises(ValueError, match=r"input_ids: expected integer token ids \[N\] or \[B, N\]"):
        Curvature.calibrate(model, torch.zeros(1, 4), mode="threshold")
    pol = Curvature.calibrate(model, calibration_ids(), mode="threshold", block_size=T)
    assert "curvature(threshold" in pol.describe()
    cache = kvprec.AdaptiveCache(model.config, policy=pol, block_size=2 * T)
    with kvprec.enabled(model), pytest.raises(ValueError, match="block_size 32 differs from the calibrated 16"):
        model(input_ids=calibration_ids(40), past_key_values=cache, use_cache=True)
    cache = kvprec.AdaptiveCache(model.config, policy=pol, block_size=T, group_size=16)
    with kvprec.enabled(model), pytest.raises(ValueError, match="group_size=32"):
        model(input_ids=calibration_ids(40), past_key_values=cache, use_cache=True)
