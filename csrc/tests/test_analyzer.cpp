// KVCacheAnalyzer: the map against the mapper applied to the accumulated curvature, the report's arithmetic, the
// knapsack modes against the threshold map, buffers configured from the map; DynamicPrecisionAdjuster: demotion
// order, budget, refusal of impossible budgets, and promotion only from a shadow.
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "check.h"
#include "kvprec/analyzer.h"

using namespace kvprec;

namespace {

constexpr int64_t kT = 16, kD = 32, kG = 8, kHq = 4, kHkv = 2;
// A tolerance loose enough that the synthetic blocks below need between about 1 and 6 bits: the map mixes tiers.
constexpr double kEps = 50.0;

AnalyzerOptions options(double eps) {
  AnalyzerOptions o;
  o.mapper.geometry = {kT, kD, kG};
  o.mapper.eps = eps;
  return o;
}

// A layer's calibration input of length n: peaky attention (queries scaled up) so curvature varies across blocks.
struct Calib {
  at::Tensor q, k, v;
};
Calib calib(int64_t n, double q_gain) {
  return {at::randn({kHq, n, kD}) * q_gain, at::randn({kHkv, n, kD}), at::randn({kHkv, n, kD})};
}

KVCacheAnalyzer calibrated(double eps) {
  at::manual_seed(0);
  KVCacheAnalyzer a(options(eps));
  for (int64_t layer = 0; layer < 2; ++layer)
    for (int64_t n : {64, 50}) {
      Calib c = calib(n, 2.0 + layer);
      a.add_calibration(layer, c.q, c.k, c.v);
    }
  return a;
}

std::vector<double> flat(const at::Tensor& t) {
  at::Tensor c = t.contiguous().to(at::kDouble);
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

int64_t distinct_tiers(const PrecisionMap& m) {
  std::vector<bool> seen(kNumTiers, false);
  for (const at::Tensor& t : m.tiers)
    for (int64_t i = 0; i < t.numel(); ++i) seen[t.view(-1)[i].item<int8_t>()] = true;
  int64_t n = 0;
  for (bool s : seen) n += s;
  return n;
}

void test_threshold_map_and_report() {
  KVCacheAnalyzer a = calibrated(kEps);
  CHECK(a.num_layers() == 2 && a.curvature(0).inputs() == 2 && a.curvature(0).max_len() == 64);
  PrecisionMap m = a.analyze();
  CHECK(m.num_layers() == 2 && m.tiers[0].sizes() == at::IntArrayRef({kHkv, 4}));
  CHECK(distinct_tiers(m) >= 2);  // the test data exercise more than one tier
  const PrecisionMapper& mp = a.mapper();
  int64_t bytes = 0;
  for (int64_t l = 0; l < 2; ++l) {
    // The map is the mapper applied to the block max of the mean curvature.
    auto kmax = flat(a.curvature(l).block(kT, Reduce::Mean, Reduce::Max));
    auto ksum = flat(a.curvature(l).block(kT, Reduce::Mean, Reduce::Sum));
    auto want = mp.map_threshold(kmax);
    for (int64_t i = 0; i < kHkv * 4; ++i) CHECK(m.tiers[l].view(-1)[i].item<int8_t>() == tier_index(want[i]));
    for (int64_t h = 0; h < kHkv; ++h) {
      const HeadReport& r = m.report.heads[l * kHkv + h];
      CHECK(r.layer == l && r.head == h && r.blocks == 4);
      int64_t count = 0, hb = 0;
      double err = 0.0, maxbits = -INFINITY;
      for (int64_t j = 0; j < 4; ++j) {
        const Tier t = want[h * 4 + j];
        hb += mp.page_bytes(t);
        err += mp.predicted_error(ksum[h * 4 + j], t);
        maxbits = std::max(maxbits, mp.required_bits(kmax[h * 4 + j]));
      }
      for (int64_t c : r.tier_blocks) count += c;
      CHECK(count == 4 && r.page_bytes == hb);
      CHECK_NEAR(r.predicted_error, err, 1e-12 * (1 + err));
      CHECK_NEAR(r.max_required_bits, maxbits, 1e-12);
      CHECK_NEAR(r.bits_per_element, 8.0 * hb / (4 * kT * kD * 2), 1e-12);  // metadata included
      CHECK(r.saturated == 0 || mp.tier_for_bits(maxbits) == Tier::FP16);
      bytes += hb;
    }
  }
  CHECK(m.report.page_bytes == bytes);
  const std::string md = m.report.to_markdown();
  CHECK(md.find("threshold mode") != std::string::npos);
  CHECK(md.find("| 1 | 1 | 4 |") != std::string::npos);
  std::printf("%s\n", md.c_str());
  CHECK_THROWS(KVCacheAnalyzer(options(kEps)).analyze(), "no calibration input");
  KVCacheAnalyzer gap(options(kEps));
  gap.add_calibration(1, at::randn({kHq, 8, kD}), at::randn({kHkv, 8, kD}), at::randn({kHkv, 8, kD}));
  CHECK_THROWS(gap.analyze(), "layer 0 has no calibration input");
  CHECK_THROWS(gap.add_calibration(0, at::randn({kHq, 8, 16}), at::randn({kHkv, 8, 16}), at::randn({kHkv, 8, 16})),
               "head_dim");
}

// add_reduced with the statistics curvature_reduce computes from the same inputs (what the GPU path hands over)
// gives the map add_calibration gives.
void test_add_reduced_gives_the_same_map() {
  KVCacheAnalyzer direct = calibrated(kEps);
  KVCacheAnalyzer reduced(options(kEps));
  at::manual_seed(0);  // the inputs of calibrated()
  for (int64_t layer = 0; layer < 2; ++layer)
    for (int64_t n : {64, 50}) {
      Calib c = calib(n, 2.0 + layer);
      const double scale = 1.0 / std::sqrt(static_cast<double>(kD));  // the options' scale 0, resolved
      auto s = curvature_reduce(c.q, c.k, c.v, scale, true, kT, Reduce::Sum, Reduce::Sum);
      auto m = curvature_reduce(c.q, c.k, c.v, scale, true, kT, Reduce::Max, Reduce::Max);
      // A prefill (Q = N): query i sees t <= i, so position t is seen by N - t queries of each of the G heads.
      at::Tensor count = (n - at::arange(n, at::kDouble)) * static_cast<double>(kHq / kHkv);
      reduced.add_reduced(layer, s.position, m.position, count);
    }
  for (int64_t l = 0; l < 2; ++l) {
    CHECK(reduced.curvature(l).inputs() == direct.curvature(l).inputs());
    CHECK(at::equal(reduced.curvature(l).sum(), direct.curvature(l).sum()));
    CHECK(at::equal(reduced.curvature(l).count(), direct.curvature(l).count()));
  }
  PrecisionMap a = direct.analyze(), b = reduced.analyze();
  for (int64_t l = 0; l < 2; ++l)
    CHECK(at::equal(a.tiers[l], b.tiers[l]) && at::equal(a.kappa_max[l], b.kappa_max[l]) &&
          at::equal(a.kappa_sum[l], b.kappa_sum[l]));
  CHECK(a.report.to_markdown() == b.report.to_markdown());
  at::Tensor pos = at::rand({kHkv, 8}, at::kDouble);
  CHECK_THROWS(reduced.add_reduced(-1, pos, pos, at::ones({8})), "layer: -1");
  CHECK_THROWS(reduced.add_reduced(2, pos.view({-1}), pos, at::ones({8})), "pos_sum must be [Hkv, N]");
  CHECK_THROWS(reduced.add_reduced(0, pos.narrow(0, 0, 1), pos.narrow(0, 0, 1), at::ones({8})),
               "1 KV heads, the accumulator 2");
  // A refused first input of a layer leaves no layer behind (nor its head count for the next call).
  CHECK_THROWS(reduced.add_reduced(3, pos.narrow(0, 0, 1), pos.narrow(0, 0, 1), at::zeros({8})), "count is 0");
  CHECK_THROWS(reduced.add_calibration(3, at::randn({kHq, 9, kD}), at::randn({1, 8, kD}), at::randn({1, 8, kD})),
               "Q <= N");
  CHECK(reduced.num_layers() == 2);
  reduced.add_reduced(2, pos, pos, at::ones({8}));
  CHECK(reduced.num_layers() == 3 && reduced.curvature(2).kv_heads() == kHkv);
}

void test_knapsack_modes() {
  KVCacheAnalyzer a = calibrated(kEps);
  PrecisionMap th = a.analyze();
  // The threshold map is one feasible answer of each knapsack mode, so neither can do worse than it.
  MapRequest budget{MapMode::Budget, th.report.page_bytes, 0.0, KnapsackMethod::Auto};
  PrecisionMap bm = a.analyze(budget);
  CHECK(bm.report.page_bytes <= th.report.page_bytes);
  CHECK(bm.report.predicted_error <= th.report.predicted_error * (1 + 1e-12));
  CHECK(bm.report.exact);
  MapRequest quality{MapMode::Quality, 0, th.report.predicted_error, KnapsackMethod::Auto};
  PrecisionMap qm = a.analyze(quality);
  CHECK(qm.report.page_bytes <= th.report.page_bytes);
  CHECK(qm.report.predicted_error <= th.report.predicted_error * (1 + 1e-12));
  // Greedy agrees with its bound; the DP is at least as good.
  budget.method = KnapsackMethod::Greedy;
  PrecisionMap gm = a.analyze(budget);
  CHECK(!gm.report.exact && gm.report.lower_bound <= bm.report.predicted_error * (1 + 1e-12));
  CHECK(gm.report.predicted_error >= bm.report.predicted_error * (1 - 1e-12));
  // Impossible budget: named, with the minimum.
  const int64_t least = 2 * kHkv * 4 * a.mapper().page_bytes(Tier::INT2);
  budget.budget_bytes = least - 1;
  CHECK_THROWS(a.analyze(budget), "minimum achievable " + std::to_string(least));
  budget.budget_bytes = least;
  PrecisionMap lm = a.analyze(budget);
  CHECK(lm.report.heads[0].tier_blocks[tier_index(Tier::INT2)] == 4);
}

void test_buffer_from_map() {
  KVCacheAnalyzer a = calibrated(kEps);
  PrecisionMap m = a.analyze();
  BufferOptions o = KVCacheAnalyzer::buffer_options(m, 1, 2, at::kFloat, c10::Device(c10::kCPU), false);
  CHECK(o.kv_heads == kHkv && o.block_size == kT && o.head_dim == kD && o.group_size == kG && o.batch == 2);
  MixedPrecisionBuffer buf(o);
  at::Tensor k = at::randn({2, kHkv, 85, kD}), v = at::randn({2, kHkv, 85, kD});
  KVCacheAnalyzer::append(buf, m, 1, k.narrow(2, 0, 40), v.narrow(2, 0, 40));
  KVCacheAnalyzer::append(buf, m, 1, k.narrow(2, 40, 45), v.narrow(2, 40, 45));
  CHECK(buf.num_sealed_blocks() == 5);
  at::Tensor t = buf.tiers();
  CHECK(at::equal(t.narrow(2, 0, 4), m.tiers[1].unsqueeze(0).expand({2, kHkv, 4})));
  // Past the calibrated length: the head's default (median) tier.
  CHECK(at::equal(t.select(2, 4), m.default_tiers(1).unsqueeze(0).expand({2, kHkv})));
  CHECK(m.tier(1, 0, 9) == static_cast<Tier>(m.default_tiers(1)[0].item<int8_t>()));
  BufferOptions other = o;
  other.block_size = 32;
  MixedPrecisionBuffer wrong(other);
  CHECK_THROWS(KVCacheAnalyzer::append(wrong, m, 1, k, v), "geometry");
}

// Two layers of buffers, every block at FP16 (a tiny eps maps everything there).
struct Fixture {
  KVCacheAnalyzer analyzer = calibrated(1e-30);
  PrecisionMap map = analyzer.analyze();
  std::vector<MixedPrecisionBuffer> buffers;
  at::Tensor k0;
  explicit Fixture(bool shadow) {
    at::manual_seed(5);
    for (int64_t l = 0; l < 2; ++l) {
      buffers.emplace_back(KVCacheAnalyzer::buffer_options(map, l, 1, at::kFloat, c10::Device(c10::kCPU), shadow));
      at::Tensor k = at::randn({1, kHkv, 64, kD}), v = at::randn({1, kHkv, 64, kD});
      if (l == 0) k0 = k;
      KVCacheAnalyzer::append(buffers.back(), map, l, k, v);
    }
  }
  std::vector<MixedPrecisionBuffer*> ptrs() { return {&buffers[0], &buffers[1]}; }
};

void test_adjuster_demotes_least_important_first() {
  Fixture f(false);
  CHECK((f.buffers[0].tiers() == tier_index(Tier::FP16)).all().item<bool>());
  DynamicPrecisionAdjuster adj(f.ptrs(), f.analyzer.options().mapper, ImportanceScore::Curvature, &f.map);
  const MapperOptions& mo = f.analyzer.options().mapper;
  const int64_t fp16 = mo.geometry.page_bytes(Tier::FP16), int8 = mo.geometry.page_bytes(Tier::INT8);
  const int64_t before = adj.resident_bytes();
  // Room for exactly one FP16 -> INT8 step: it goes to the block of least curvature.
  AdjustResult r = adj.enforce(before - (fp16 - int8));
  CHECK(r.demotions == 1 && r.promotions == 0 && r.bytes_before == before && r.bytes_after == before - (fp16 - int8));
  double least = INFINITY;
  int64_t least_l = -1, least_h = -1, least_j = -1;
  for (int64_t l = 0; l < 2; ++l)
    for (int64_t h = 0; h < kHkv; ++h)
      for (int64_t j = 0; j < 4; ++j)
        if (f.map.block_curvature(l, h, j) < least) {
          least = f.map.block_curvature(l, h, j);
          least_l = l, least_h = h, least_j = j;
        }
  CHECK(f.buffers[least_l].tiers()[0][least_h][least_j].item<int8_t>() == tier_index(Tier::INT8));
  // A tighter budget: met exactly or just under (steps are whole pages), never over.
  const int64_t budget = before - 5 * (fp16 - int8) - 1000;
  r = adj.enforce(budget);
  CHECK(r.bytes_after <= budget && r.bytes_after == adj.resident_bytes() && r.demotions >= 5);
  // Impossible: below every sealed block at INT2; refused, and nothing changes.
  const at::Tensor tiers_before = f.buffers[1].tiers();
  const int64_t floor = adj.min_resident_bytes();
  CHECK_THROWS(adj.enforce(floor - 1), "minimum achievable " + std::to_string(floor));
  CHECK(at::equal(f.buffers[1].tiers(), tiers_before));
  r = adj.enforce(floor);
  CHECK(r.bytes_after == floor);
  CHECK((f.buffers[0].tiers() == tier_index(Tier::INT2)).all().item<bool>());
  // No shadow: a generous budget promotes nothing (the lost bits are gone).
  r = adj.enforce(before * 2);
  CHECK(r.promotions == 0 && r.bytes_after == floor);
  CHECK((f.buffers[1].tiers() == tier_index(Tier::INT2)).all().item<bool>());
}

void test_adjuster_promotes_from_shadow() {
  Fixture f(true);
  DynamicPrecisionAdjuster adj(f.ptrs(), f.analyzer.options().mapper, ImportanceScore::Curvature, &f.map);
  const int64_t before = adj.resident_bytes();
  adj.enforce(adj.min_resident_bytes());
  CHECK((f.buffers[0].tiers() == tier_index(Tier::INT2)).all().item<bool>());
  AdjustResult r = adj.enforce(before);
  CHECK(r.promotions == 2 * kHkv * 4 && r.bytes_after == before);
  CHECK((f.buffers[0].tiers() == tier_index(Tier::FP16)).all().item<bool>());
  // Promoted from the shadow: the data are the original values at FP16, not an upcast of INT2 codes.
  at::Tensor k = f.buffers[0].block(2).first;
  CHECK(at::equal(k, f.k0.narrow(2, 2 * kT, kT).to(at::kHalf).to(at::kFloat)));
}

void test_adjuster_attention_mass() {
  Fixture f(false);
  DynamicPrecisionAdjuster adj(f.ptrs(), f.analyzer.options().mapper, ImportanceScore::AttentionMass);
  // Mass over 3 decode steps: layer 0 head 1 block 2 receives most; layer 1 head 0 block 0 next; the tail block (4)
  // is part of block_mass but not sealed.
  for (int step = 0; step < 3; ++step) {
    at::Tensor m0 = at::full({1, kHq, 1, 5}, 0.01, at::kFloat), m1 = at::full({1, kHq, 1, 5}, 0.01, at::kFloat);
    m0[0][2][0][2] = 0.9;  // query head 2 reads KV head 1
    m1[0][1][0][0] = 0.5;  // query head 1 reads KV head 0
    adj.observe(0, m0);
    adj.observe(1, m1);
  }
  at::Tensor s0 = adj.scores(0);
  CHECK(s0.sizes() == at::IntArrayRef({1, kHkv, 4}));
  CHECK_NEAR(s0[0][1][2].item<double>(), 3 * (0.9 + 0.01), 1e-6);  // FP32 inputs
  const MapperOptions& mo = f.analyzer.options().mapper;
  const int64_t fp16 = mo.geometry.page_bytes(Tier::FP16), int8 = mo.geometry.page_bytes(Tier::INT8);
  // Room for 14 FP16 -> INT8 steps among 16 blocks: the 14 least attended take them (their further INT8 -> INT4
  // steps add more error per byte than the first step of the two heavy blocks would: 0.06 * 0.0628 / 8192
  // against 1.53 * 0.0034 / 14848), the two most attended keep FP16.
  AdjustResult r = adj.enforce(adj.resident_bytes() - 14 * (fp16 - int8));
  CHECK(r.demotions == 14);
  CHECK(f.buffers[0].tiers()[0][1][2].item<int8_t>() == tier_index(Tier::FP16));
  CHECK(f.buffers[1].tiers()[0][0][0].item<int8_t>() == tier_index(Tier::FP16));
  CHECK((f.buffers[0].tiers() == tier_index(Tier::INT8)).sum().item<int64_t>() == 7);
  CHECK_THROWS(adj.observe(0, at::ones({2, kHq, 1, 5})), "block_mass");

  // Blocks a sliding window evicted hold no page: the adjuster neither counts nor re-tiers them.
  f.buffers[1].evict_blocks(2);
  const int64_t before = adj.resident_bytes(), floor_before = adj.min_resident_bytes();
  CHECK(floor_before <= before);
  AdjustResult r2 = adj.enforce(floor_before);
  CHECK(r2.bytes_after == floor_before && r2.demotions > 0);
  CHECK((f.buffers[1].tiers().narrow(2, 0, 2) == kEvictedTier).all().item<bool>());
  CHECK_THROWS(DynamicPrecisionAdjuster(f.ptrs(), mo, ImportanceScore::Curvature), "PrecisionMap");
}

}  // namespace

int main() {
  test_threshold_map_and_report();
  test_add_reduced_gives_the_same_map();
  test_knapsack_modes();
  test_buffer_from_map();
  test_adjuster_demotes_least_important_first();
  test_adjuster_promotes_from_shadow();
  test_adjuster_attention_mass();
  return kvprec_test::finish("test_analyzer");
}
