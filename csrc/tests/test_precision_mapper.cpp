// PrecisionMapper and the multiple-choice knapsack: formulas, tier choice at the boundaries, DP against brute
// force on random small problems, greedy against its LP bound, the auto switch, and the error messages.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "kvprec/precision_mapper.h"

using kvprec::KnapsackMethod;
using kvprec::KnapsackProblem;
using kvprec::Tier;

namespace {

struct Brute {
  double best_error = std::numeric_limits<double>::infinity();  // budget mode
  int64_t best_cost = std::numeric_limits<int64_t>::max();      // quality mode
};

// Enumerates all J^I assignments.
Brute brute_force(const KnapsackProblem& p, int64_t budget, double max_error) {
  Brute b;
  std::vector<int64_t> j(p.items, 0);
  while (true) {
    double e = 0.0;
    int64_t c = 0;
    for (int64_t i = 0; i < p.items; ++i) {
      e += p.error(i, j[i]);
      c += p.cost(i, j[i]);
    }
    if (c <= budget) b.best_error = std::min(b.best_error, e);
    if (e <= max_error * (1 + 1e-12)) b.best_cost = std::min(b.best_cost, c);
    int64_t i = 0;
    while (i < p.items && ++j[i] == p.choices) j[i++] = 0;
    if (i == p.items) break;
  }
  return b;
}

KnapsackProblem random_problem(std::mt19937_64& rng, int64_t items, int64_t choices, bool page_like) {
  KnapsackProblem p;
  p.items = items;
  p.choices = choices;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::uniform_int_distribution<int64_t> cost(1, 40);
  for (int64_t i = 0; i < items; ++i)
    for (int64_t j = 0; j < choices; ++j) {
      // page_like: cost and error both ordered like tiers; otherwise arbitrary (dominated choices included).
      p.costs.push_back(page_like ? 512 * (11 + 8 * j + (j == 3 ? 29 : 0)) : 3 * cost(rng));
      p.errors.push_back(page_like ? u(rng) * std::exp2(-4.0 * j) : u(rng) * 10.0);
    }
  return p;
}

void test_formulas() {
  const double kappa = 0.37, c = 2.5, eps = 1e-3;
  const int64_t D = 64;
  CHECK_NEAR(kvprec::required_bits(kappa, c, D, eps), std::log2(c * kappa * D * D / eps), 1e-12);
  CHECK(std::isinf(kvprec::required_bits(0.0, c, D, eps)) && kvprec::required_bits(0.0, c, D, eps) < 0);
  // The predicted error at a tier with exactly the required bits is eps: the bound inverted.
  const double p = kvprec::required_bits(kappa, c, D, eps);
  CHECK_NEAR(c * kappa * D * D * std::exp2(-p), eps, 1e-15);
  CHECK_NEAR(kvprec::predicted_error(kappa, Tier::INT4, c, D), c * kappa * D * D / 15.0, 1e-12);
  CHECK_NEAR(kvprec::predicted_error(kappa, Tier::FP16, c, D), c * kappa * D * D / 2048.0, 1e-12);
  CHECK_THROWS(kvprec::required_bits(-1.0, c, D, eps), "kappa");
  CHECK_THROWS(kvprec::required_bits(NAN, c, D, eps), "kappa");
  CHECK_THROWS(kvprec::required_bits(kappa, 0.0, D, eps), "c:");
  CHECK_THROWS(kvprec::required_bits(kappa, c, 0, eps), "head_dim");
  CHECK_THROWS(kvprec::required_bits(kappa, c, D, -1.0), "eps");
}

void test_mapper_tiers() {
  kvprec::PrecisionMapper m;  // defaults: INT2, INT4, INT8, FP16; T=64, D=128, G=64; c=1, eps=2^-11
  CHECK(m.options().eps == 1.0 / 2048.0 && m.options().c == 1.0);
  const auto& ladder = m.ladder();
  CHECK(ladder.size() == 4 && ladder[0] == Tier::INT2 && ladder[1] == Tier::INT4 && ladder[2] == Tier::INT8 &&
        ladder[3] == Tier::FP16);
  CHECK(m.page_bytes(Tier::INT2) == 5120 && m.page_bytes(Tier::INT4) == 9216 && m.page_bytes(Tier::INT8) == 17408 &&
        m.page_bytes(Tier::FP16) == 32768);
  const double b2 = kvprec::tier_effective_bits(Tier::INT2), b4 = kvprec::tier_effective_bits(Tier::INT4);
  CHECK(m.tier_for_bits(-INFINITY) == Tier::INT2);
  CHECK(m.tier_for_bits(b2) == Tier::INT2);  // covers means >=
  CHECK(m.tier_for_bits(std::nextafter(b2, 10.0)) == Tier::INT4);
  CHECK(m.tier_for_bits(b4 + 1e-9) == Tier::INT8);
  CHECK(m.tier_for_bits(11.0) == Tier::FP16);
  CHECK(m.tier_for_bits(30.0) == Tier::FP16);  // saturated: the most precise candidate
  CHECK_THROWS(m.tier_for_bits(NAN), "bits");
  // Kappa whose required bits are exactly 8 (above INT8 7.99, below FP16 11) -> FP16; 1/32 of it (3 bits) -> INT4.
  const double k8 = std::exp2(8.0) * m.options().eps / (128.0 * 128.0);
  int64_t sat = -1;
  auto tiers = m.map_threshold({k8, k8 / 32.0, 0.0, 1e6}, &sat);
  CHECK(tiers[0] == Tier::FP16 && tiers[1] == Tier::INT4 && tiers[2] == Tier::INT2 && tiers[3] == Tier::FP16);
  CHECK(sat == 1);
  // FP16 and BF16 cost the same; FP16 has more bits and is preferred; BF16 alone covers 8 bits.
  kvprec::MapperOptions o;
  o.candidates = {Tier::BF16, Tier::FP16, Tier::INT4};
  kvprec::PrecisionMapper m2(o);
  CHECK(m2.ladder()[1] == Tier::FP16 && m2.ladder()[2] == Tier::BF16);
  CHECK(m2.tier_for_bits(7.0) == Tier::FP16);
  o.candidates = {Tier::INT4, Tier::INT4};
  CHECK_THROWS(kvprec::PrecisionMapper{o}, "listed twice");
  o.candidates = {};
  CHECK_THROWS(kvprec::PrecisionMapper{o}, "candidates");
  o = {};
  o.geometry.head_dim = 6;
  CHECK_THROWS(kvprec::PrecisionMapper{o}, "head_dim");
  o = {};
  o.eps = 0.0;
  CHECK_THROWS(kvprec::PrecisionMapper{o}, "eps");
}

void test_dp_against_brute_force() {
  std::mt19937_64 rng(7);
  int64_t cases = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t items = 1 + trial % 6, choices = 1 + (trial / 6) % 4;
    const bool page_like = choices == 4 && trial % 2 == 0;
    KnapsackProblem p = random_problem(rng, items, choices, page_like);
    const int64_t lo = p.min_cost(), hi = p.max_cost();
    std::uniform_int_distribution<int64_t> bd(lo, hi + 5);
    const int64_t budget = bd(rng);
    const double max_error = p.min_error() + (p.max_cost() > 0 ? std::uniform_real_distribution<double>(0, 3)(rng) : 0.0);
    const Brute b = brute_force(p, budget, max_error);
    auto dp = kvprec::solve_budget(p, budget, KnapsackMethod::DP);
    CHECK(dp.exact);
    CHECK(dp.cost <= budget);
    CHECK_NEAR(dp.error, b.best_error, 1e-12 * (1 + b.best_error));
    auto gr = kvprec::solve_budget(p, budget, KnapsackMethod::Greedy);
    CHECK(!gr.exact && gr.cost <= budget);
    CHECK(gr.error >= b.best_error - 1e-12 * (1 + b.best_error));
    CHECK(gr.lower_bound <= b.best_error + 1e-12 * (1 + b.best_error));
    auto dq = kvprec::solve_quality(p, max_error, KnapsackMethod::DP);
    CHECK(dq.cost == b.best_cost);
    CHECK(dq.error <= max_error * (1 + 1e-12));
    auto gq = kvprec::solve_quality(p, max_error, KnapsackMethod::Greedy);
    CHECK(gq.error <= max_error * (1 + 1e-12) && gq.cost >= b.best_cost);
    CHECK(gq.lower_bound <= static_cast<double>(b.best_cost) + 1e-9);
    // Auto picks the DP on problems this small.
    CHECK(kvprec::solve_budget(p, budget, KnapsackMethod::Auto).exact);
    ++cases;
  }
  std::printf("  DP vs brute force: %lld random problems\n", static_cast<long long>(cases));
}

void test_greedy_gap_and_switch() {
  // A problem too large for the DP table: the greedy runs and its gap to the LP bound is small (one
  // fractional item: the gap is at most one item's largest error reduction).
  std::mt19937_64 rng(11);
  KnapsackProblem p = random_problem(rng, 20000, 4, /*page_like=*/true);
  const int64_t budget = (p.min_cost() + p.max_cost()) / 2;
  CHECK(p.dp_cells(budget) > kvprec::kDpMaxCells);
  auto s = kvprec::solve_budget(p, budget, KnapsackMethod::Auto);
  CHECK(!s.exact);
  CHECK(s.cost <= budget);
  double max_drop = 0.0;
  for (int64_t i = 0; i < p.items; ++i) max_drop = std::max(max_drop, p.error(i, 0) - p.error(i, 3));
  CHECK(s.lower_bound <= s.error);
  CHECK(s.error - s.lower_bound <= max_drop + 1e-9);
  std::printf("  greedy on 20000 items: error %.6g, LP bound %.6g (gap %.3g%%)\n", s.error, s.lower_bound,
              100.0 * (s.error - s.lower_bound) / s.error);
  // Gcd units: page sizes of the default geometry share 1024 bytes (INT2 5, FP16 32 units), so 8 blocks at any
  // budget fit the DP.
  kvprec::PrecisionMapper m;
  KnapsackProblem small = m.problem(std::vector<double>(8, 1e-3));
  CHECK(small.dp_cells(small.max_cost()) == 8 * (8 * (32 - 5) + 1));
}

void test_mapper_budget_and_quality() {
  kvprec::PrecisionMapper m;
  std::vector<double> kappa = {1e-6, 1e-3, 1.0, 5e-2, 0.0, 2e-4};
  const int64_t n = static_cast<int64_t>(kappa.size());
  const int64_t lo = n * m.page_bytes(Tier::INT2), hi = n * m.page_bytes(Tier::FP16);
  for (Tier t : m.map_budget(kappa, lo)) CHECK(t == Tier::INT2);
  kvprec::KnapsackSolution s;
  auto all = m.map_budget(kappa, hi, KnapsackMethod::Auto, &s);
  for (size_t i = 0; i < all.size(); ++i) CHECK(all[i] == (kappa[i] > 0 ? Tier::FP16 : Tier::INT2));
  // Room for one INT2 -> FP16 upgrade (27136 bytes): spent better as INT8 for the two largest curvatures
  // (1.0 and 0.05: errors 16384/3 -> 16384/255 and 273 -> 3.2 save 5667, against 5453 for FP16 on one).
  auto one = m.map_budget(kappa, lo + m.page_bytes(Tier::FP16) - m.page_bytes(Tier::INT2));
  CHECK(one[2] == Tier::INT8 && one[3] == Tier::INT8);
  CHECK(one[0] == Tier::INT2 && one[4] == Tier::INT2);
  CHECK_THROWS(m.map_budget(kappa, lo - 1), "minimum achievable " + std::to_string(lo));
  CHECK_THROWS(m.map_budget(kappa, lo - 1), "budget: " + std::to_string(lo - 1));
  // Quality mode: the error of the all-FP16 map is the least reachable; asking for less is an error.
  double e_min = 0.0;
  for (double k : kappa) e_min += m.predicted_error(k, Tier::FP16);
  auto q = m.map_quality(kappa, e_min * 1.0000001, KnapsackMethod::Auto, &s);
  CHECK(s.exact && s.error <= e_min * 1.0000001);
  CHECK(q[2] == Tier::FP16);
  CHECK(q[4] == Tier::INT2);  // zero curvature: no error at any tier, the cheapest suffices
  CHECK_THROWS(m.map_quality(kappa, e_min * 0.5), "minimum achievable predicted error");
  CHECK_THROWS(kvprec::knapsack_method_from_name("exact"), "auto, dp or greedy");
  KnapsackProblem bad = m.problem(kappa);
  bad.errors[3] = -1.0;
  CHECK_THROWS(kvprec::solve_budget(bad, hi, KnapsackMethod::Auto), "errors: entry 3");
}

}  // namespace

int main() {
  test_formulas();
  test_mapper_tiers();
  test_dp_against_brute_force();
  test_greedy_gap_and_switch();
  test_mapper_budget_and_quality();
  return kvprec_test::finish("test_precision_mapper");
}
