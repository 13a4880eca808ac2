"""Precision mapping: required bits, threshold tiers at their boundaries, the knapsack (DP against brute force,
greedy against its LP bound, native against the Python reference choice for choice), quality mode, error
messages, and opcheck of every mapper op."""
import math

import numpy as np
import pytest
import torch

import kvprec
from kvprec.analysis import precision as P
from kvprec.storage.formats import BlockGeometry, Tier

native = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")
BACKENDS = ["torch"] + (["cpp"] if kvprec.native_available() else [])
ALL = list(Tier)


def test_defaults_and_formula():
    assert P.DEFAULT_C == 1.0 and P.DEFAULT_EPS == 2.0 ** -11
    assert P.DEFAULT_CANDIDATES == (Tier.INT2, Tier.INT4, Tier.INT8, Tier.FP16)
    kappa = torch.tensor([0.37, 1e-9, 12.0], dtype=torch.float64)
    bits = P.required_bits(kappa, 2.5, 64, 1e-3)
    torch.testing.assert_close(bits, torch.log2(2.5 * kappa * 64 ** 2 / 1e-3), rtol=0, atol=1e-12)
    # The bound inverted: the predicted error at exactly the required bits is eps.
    torch.testing.assert_close(2.5 * kappa * 64 ** 2 * torch.exp2(-bits), torch.full_like(kappa, 1e-3))
    assert P.required_bits(torch.zeros(1)).item() == -math.inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_required_bits_and_errors_backends_agree(backend):
    torch.manual_seed(0)
    kappa = torch.rand(7, 5, dtype=torch.float64) ** 4 * 10
    kappa[0, 0] = 0.0
    ref = P.required_bits_reference(kappa, 1.5, 96, 1e-4)
    got = P.required_bits(kappa.float(), 1.5, 96, 1e-4, backend=backend)
    assert got.dtype == torch.float64 and got.shape == kappa.shape
    torch.testing.assert_close(got, P.required_bits_reference(kappa.float(), 1.5, 96, 1e-4), rtol=0, atol=0)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)  # float32 input vs float64
    err = P.tier_errors(kappa, [Tier.INT4, Tier.FP16, Tier.FP32], 1.5, 96, backend=backend)
    assert err.shape == (7, 5, 3)
    torch.testing.assert_close(err[..., 0], 1.5 * kappa * 96 ** 2 / 15, rtol=1e-14, atol=0)
    torch.testing.assert_close(err[..., 2], 1.5 * kappa * 96 ** 2 * 2.0 ** -24, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_tiers_at_boundaries(backend):
    b2, b4, b8 = (Tier.INT2.effective_bits, Tier.INT4.effective_bits, Tier.INT8.effective_bits)
    bits = torch.tensor([-math.inf, -3.0, b2, math.nextafter(b2, 99), b4, b4 + 1e-9, b8, 8.0, 11.0, 11.5, 40.0],
                        dtype=torch.float64)
    got = P.map_tiers(bits, backend=backend)
    want = [Tier.INT2, Tier.INT2, Tier.INT2, Tier.INT4, Tier.INT4, Tier.INT8, Tier.INT8, Tier.FP16, Tier.FP16,
            Tier.FP16, Tier.FP16]  # the last two saturate at the most precise candidate
    assert got.dtype == torch.int8 and got.tolist() == [int(t) for t in want]
    # FP16 and BF16 cost the same page bytes: FP16 (more bits) is preferred.
    got = P.map_tiers(torch.tensor([7.0, 9.0, 30.0]), [Tier.BF16, Tier.FP16, Tier.FP32], backend=backend)
    assert got.tolist() == [int(Tier.FP16), int(Tier.FP16), int(Tier.FP32)]
    # 7 bits: INT8 (7.99) covers it and is cheaper; 9 bits: nothing covers it, BF16 is the most precise.
    got = P.map_tiers(torch.tensor([7.0, 9.0]), [Tier.BF16, Tier.INT8], backend=backend)
    assert got.tolist() == [int(Tier.INT8), int(Tier.BF16)]


@native
@pytest.mark.parametrize("candidates", [P.DEFAULT_CANDIDATES, ALL, [Tier.INT4, Tier.BF16], [Tier.FP32]])
def test_map_tiers_native_matches_reference(candidates):
    torch.manual_seed(1)
    bits = torch.rand(123) * 40 - 8
    for geometry in (BlockGeometry(), BlockGeometry(16, 32, 8)):
        ref = P.map_tiers(bits, candidates, geometry, backend="torch")
        nat = P.map_tiers(bits, candidates, geometry, backend="cpp")
        assert torch.equal(ref, nat)


def test_ladder_and_page_costs():
    g = BlockGeometry()
    assert P.ladder(P.DEFAULT_CANDIDATES, g) == [Tier.INT2, Tier.INT4, Tier.INT8, Tier.FP16]
    assert P.ladder(ALL, g) == [Tier.INT2, Tier.INT4, Tier.INT8, Tier.FP16, Tier.BF16, Tier.FP32]
    assert P.page_costs(P.DEFAULT_CANDIDATES, g).tolist() == [g.page_bytes(t) for t in P.DEFAULT_CANDIDATES]
    # the default geometry: T 64, D 128, G 64 (formats.default_group_size); G 32 adds 512 bytes to each integer page
    assert P.page_costs([Tier.INT2, Tier.INT4, Tier.INT8, Tier.FP16]).tolist() == [5120, 9216, 17408, 32768]
    g32 = BlockGeometry(group_size=32)
    assert P.page_costs([Tier.INT2, Tier.INT4, Tier.INT8, Tier.FP16], g32).tolist() == [5632, 9728, 17920, 32768]


def _random_problem(rng, items, choices, page_like):
    if page_like:  # the mapper's problems: tier costs shared by all items, errors from a curvature
        costs = torch.tensor([5632, 9728, 17920, 32768][:choices], dtype=torch.int64)
        kappa = torch.from_numpy(rng.random(items) ** 3)
        return P.tier_errors(kappa, list(P.DEFAULT_CANDIDATES)[:choices], backend="torch"), costs
    errors = torch.from_numpy(rng.random((items, choices)) * 10)
    costs = torch.from_numpy(rng.integers(1, 40, size=(items, choices)) * 3)
    return errors, costs


def _budgets(rng, costs, items):
    c = costs.expand(items, -1)
    lo, hi = int(c.min(1).values.sum()), int(c.max(1).values.sum())
    return [lo, int(rng.integers(lo, hi + 1)), hi + 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dp_matches_brute_force_and_greedy_is_bounded(backend):
    rng = np.random.default_rng(7)
    n = 0
    for trial in range(60):
        items, choices = 1 + trial % 5, 1 + (trial // 5) % 4
        errors, costs = _random_problem(rng, items, choices, page_like=trial % 2 == 0)
        for budget in _budgets(rng, costs, items):
            _, best, _ = P.knapsack_brute_force(errors, costs, budget=budget)
            dp = P.knapsack_tiers(errors, costs, budget, "dp", backend=backend)
            assert dp.exact and dp.cost <= budget
            assert dp.error == pytest.approx(best, rel=1e-12, abs=1e-15)
            assert dp.lower_bound == dp.error
            gr = P.knapsack_tiers(errors, costs, budget, "greedy", backend=backend)
            assert not gr.exact and gr.cost <= budget
            assert gr.error >= best * (1 - 1e-12) and gr.lower_bound <= best * (1 + 1e-12)
            assert P.knapsack_tiers(errors, costs, budget, backend=backend).exact  # auto: small -> DP
            n += 1
    assert n == 180


@pytest.mark.parametrize("backend", BACKENDS)
def test_quality_mode_matches_brute_force(backend):
    rng = np.random.default_rng(8)
    for trial in range(40):
        items, choices = 1 + trial % 5, 1 + (trial // 5) % 4
        errors, costs = _random_problem(rng, items, choices, page_like=trial % 2 == 1)
        least = float(errors.min(1).values.sum())
        max_error = least + float(rng.random()) * float(errors.sum(1).mean())
        _, _, best_cost = P.knapsack_brute_force(errors, costs, max_error=max_error)
        dp = P.knapsack_min_bytes(errors, costs, max_error, "dp", backend=backend)
        assert dp.exact and dp.cost == best_cost and dp.error <= max_error * (1 + 1e-12)
        gr = P.knapsack_min_bytes(errors, costs, max_error, "greedy", backend=backend)
        assert gr.error <= max_error * (1 + 1e-12) and gr.cost >= best_cost
        assert gr.lower_bound <= best_cost + 1e-9


@native
def test_native_matches_reference_choice_for_choice():
    rng = np.random.default_rng(9)
    for trial in range(30):
        errors, costs = _random_problem(rng, 3 + trial % 40, 4, page_like=trial % 3 != 0)
        for budget in _budgets(rng, costs, errors.shape[0]):
            for method in ("dp", "greedy"):
                a = P.knapsack_tiers(errors, costs, budget, method, backend="torch")
                b = P.knapsack_tiers(errors, costs, budget, method, backend="cpp")
                assert torch.equal(a.choice, b.choice) and (a.error, a.cost, a.lower_bound) == (b.error, b.cost, b.lower_bound)
        max_error = float(errors.min(1).values.sum()) * 1.5 + 1e-3
        for method in ("dp", "greedy"):
            a = P.knapsack_min_bytes(errors, costs, max_error, method, backend="torch")
            b = P.knapsack_min_bytes(errors, costs, max_error, method, backend="cpp")
            assert torch.equal(a.choice, b.choice) and (a.error, a.cost, a.lower_bound) == (b.error, b.cost, b.lower_bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_problem_switches_to_greedy_with_a_small_gap(backend):
    rng = np.random.default_rng(10)
    errors, costs = _random_problem(rng, 20000, 4, page_like=True)
    lo, hi = 20000 * 5632, 20000 * 32768
    budget = (lo + hi) // 2
    assert P.dp_cells(errors, costs, budget) > P.DP_MAX_CELLS
    r = P.knapsack_tiers(errors, costs, budget, backend=backend)
    assert not r.exact and r.cost <= budget
    # One item is fractional in the LP relaxation: the gap is at most one item's largest error reduction.
    assert 0 <= r.error - r.lower_bound <= float((errors[:, 0] - errors[:, 3]).max())
    assert (r.error - r.lower_bound) / r.error < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_impossible_requests_and_bad_arguments(backend):
    errors = P.tier_errors(torch.tensor([0.1, 0.2, 0.0]), backend="torch")
    costs = P.page_costs(P.DEFAULT_CANDIDATES)
    least = 3 * int(costs.min())  # three items at INT2
    with pytest.raises(ValueError, match=f"budget: {least - 1} bytes is below the minimum achievable {least} bytes"):
        P.knapsack_tiers(errors, costs, least - 1, backend=backend)
    with pytest.raises(ValueError, match="minimum achievable predicted error"):
        P.knapsack_min_bytes(errors, costs, float(errors.min(1).values.sum()) * 0.5, backend=backend)
    with pytest.raises(ValueError, match="auto, dp or greedy"):
        P.knapsack_tiers(errors, costs, 10 ** 6, "exact", backend=backend)
    with pytest.raises(ValueError, match="costs must be"):
        P.knapsack_tiers(errors, costs[:3], 10 ** 6, backend=backend)
    with pytest.raises(ValueError, match="integer tensor of bytes"):
        P.knapsack_tiers(errors, costs.double(), 10 ** 6, backend=backend)
    bad = errors.clone()
    bad[1, 2] = -1.0
    with pytest.raises(ValueError, match="errors: entry 6"):
        P.knapsack_tiers(bad, costs, 10 ** 6, backend=backend)
    with pytest.raises(ValueError, match="kappa"):
        P.required_bits(torch.tensor([1.0, -2.0]), backend=backend)
    with pytest.raises(ValueError, match="eps"):
        P.required_bits(torch.tensor([1.0]), eps=0.0, backend=backend)
    with pytest.raises(ValueError, match="listed twice"):
        P.map_tiers(torch.tensor([1.0]), [Tier.INT4, Tier.INT4], backend=backend)
    bad_geometry = (torch.tensor([1.0]), [int(Tier.INT4)], 64, 6, 2)  # head_dim 6: not a multiple of 4
    with pytest.raises(ValueError, match="head_dim"):
        if backend == "cpp":
            torch.ops.kvprec.map_tiers(*bad_geometry)
        else:
            P.map_tiers_reference(*bad_geometry)


@native
def test_opcheck_mapper_ops():
    kappa = torch.rand(3, 5, dtype=torch.float64)
    ops = torch.ops.kvprec
    torch.library.opcheck(ops.required_bits.default, (kappa, 1.0, 128, 2.0 ** -11))
    torch.library.opcheck(ops.required_bits.default, (kappa.float(), 2.0, 64, 1e-3))
    torch.library.opcheck(ops.map_tiers.default, (torch.randn(4, 6) * 10, [5, 4, 3, 1], 64, 128, 32))
    torch.library.opcheck(ops.tier_errors.default, (kappa, [5, 4, 3, 1], 1.0, 128))
    errors = P.tier_errors(kappa.reshape(-1), backend="torch")
    costs = P.page_costs(P.DEFAULT_CANDIDATES)
    torch.library.opcheck(ops.knapsack_tiers.default, (errors, costs, 15 * 12000, "auto"))
    torch.library.opcheck(ops.knapsack_tiers.default, (errors, costs.expand(15, 4).contiguous(), 15 * 12000, "greedy"))
    torch.library.opcheck(ops.knapsack_min_bytes.default, (errors, costs, float(errors.sum(1).mean()), "dp"))
