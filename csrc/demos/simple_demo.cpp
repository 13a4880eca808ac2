// simple_demo: curvature analysis -> precision map -> adaptive buffer -> memory saved and the MEASURED
// attention-output error against an FP16 cache, next to uniform tiers. Every number printed is computed in
// this run.
//
// The K/V/q are synthetic, built to have the structure real caches show (stated, not claimed as real data):
// a few attention-sink positions at the start, a recency bias, persistent outlier key channels, and queries
// that share a common direction. Calibration queries and test queries are separate draws.
//
//   simple_demo [--seq N] [--ratio R]     R: the budget as a fraction of the FP16 page bytes (default 1/3)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kvprec/analyzer.h"
#include "kvprec/buffer.h"

using namespace kvprec;

namespace {

constexpr int64_t kKvHeads = 4, kGroup = 2, kHeadDim = 128, kBlock = 64, kValueGroup = 32;

struct Synthetic {
  at::Tensor k, v;            // [Hkv, N, D] FP32
  at::Tensor q_calib, q_test; // [Hq, Q, D] FP32
};

Synthetic make_data(int64_t n, int64_t queries) {
  at::manual_seed(1234);
  const int64_t d = kHeadDim;
  at::Tensor channel_scale = at::ones({d});
  channel_scale.index_put_({at::indexing::Slice(0, 6)}, 8.0);  // persistent outlier channels (as KIVI reports)
  at::Tensor u = at::randn({d}), w = at::randn({d});
  u = u / u.norm();
  w = w - (w * u).sum() * u;
  w = w / w.norm();
  at::Tensor k = at::randn({kKvHeads, n, d}) * channel_scale;
  at::Tensor pos = at::arange(n, at::kFloat) / static_cast<double>(n);
  k = k + 9.0 * at::pow(pos, 8).view({1, n, 1}) * w;  // recency: later keys lean toward the queries' w
  k.index({at::indexing::Slice(), at::indexing::Slice(0, 4)}) += 14.0 * u;  // sinks at positions 0..3
  at::Tensor v = at::randn({kKvHeads, n, d});
  auto draw_q = [&](int64_t count) {
    return at::randn({kKvHeads * kGroup, count, d}) * 0.6 + 1.2 * u + 1.4 * w;
  };
  return {k, v, draw_q(queries), draw_q(queries)};
}

// Relative error ||o - o_ref|| / ||o_ref|| of decode attention for each test query (the query attends to all N).
double attention_error(const MixedPrecisionBuffer& buf, const MixedPrecisionBuffer& ref, const at::Tensor& q_test) {
  double sum = 0.0;
  const int64_t queries = q_test.size(1);
  for (int64_t i = 0; i < queries; ++i) {
    at::Tensor q = q_test.index({at::indexing::Slice(), at::indexing::Slice(i, i + 1)}).unsqueeze(0).to(at::kHalf);
    at::Tensor o = attend(buf, q, {}, {}).out.to(at::kFloat);
    at::Tensor o_ref = attend(ref, q, {}, {}).out.to(at::kFloat);
    sum += ((o - o_ref).norm() / o_ref.norm()).item<double>();
  }
  return sum / static_cast<double>(queries);
}

BufferOptions options_for(Tier tier) {
  BufferOptions o;
  o.batch = 1;
  o.kv_heads = kKvHeads;
  o.head_dim = kHeadDim;
  o.block_size = kBlock;
  o.group_size = kValueGroup;
  o.dtype = at::kHalf;
  o.default_tier = tier;
  return o;
}

void print_row(const char* name, const MixedPrecisionBuffer& buf, double err) {
  const MemoryReport m = buf.memory();
  std::printf("  %-34s %10lld  %6.2f  %6.2fx   %.2e\n", name, static_cast<long long>(m.resident_bytes()),
              m.bits_per_element(), m.compression_vs_fp16(), err);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t n = 2048;
  double ratio = 1.0 / 3.0;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--seq") && i + 1 < argc) n = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--ratio") && i + 1 < argc) ratio = std::atof(argv[++i]);
    else {
      std::fprintf(stderr, "usage: simple_demo [--seq N (a multiple of %lld)] [--ratio R in (0, 1]]\n",
                   static_cast<long long>(kBlock));
      return 2;
    }
  }
  if (n <= 0 || n % kBlock != 0 || !(ratio > 0.0 && ratio <= 1.0)) {
    std::fprintf(stderr, "simple_demo: --seq must be a positive multiple of %lld and --ratio in (0, 1]\n",
                 static_cast<long long>(kBlock));
    return 2;
  }
  at::set_num_threads(1);
  const Synthetic data = make_data(n, 32);
  std::printf("kvprec simple_demo: Hkv=%lld (GQA x%lld), D=%lld, N=%lld positions in blocks of %lld, FP16 model dtype\n",
              static_cast<long long>(kKvHeads), static_cast<long long>(kGroup), static_cast<long long>(kHeadDim),
              static_cast<long long>(n), static_cast<long long>(kBlock));

  // 1. analysis: curvature of the calibration queries' attention over the cache content.
  AnalyzerOptions aopts;
  aopts.mapper.geometry = {kBlock, kHeadDim, kValueGroup};
  KVCacheAnalyzer analyzer(aopts);
  analyzer.add_calibration(0, data.q_calib, data.k, data.v);

  // 2. mapping: a byte budget of `ratio` x the FP16 pages, solved as a multiple-choice knapsack. The default
  //    candidates are INT4, INT8 and FP16; a second map also offers INT2 (the aggressive end), where keys move
  //    far enough that the second-order curvature model stops predicting the damage (the table shows it).
  const int64_t blocks = n / kBlock;
  const int64_t fp16_pages = kKvHeads * blocks * aopts.mapper.geometry.page_bytes(Tier::FP16);
  MapRequest request;
  request.mode = MapMode::Budget;
  request.budget_bytes = static_cast<int64_t>(ratio * static_cast<double>(fp16_pages));
  AnalyzerOptions default_opts = aopts;
  default_opts.mapper.candidates = {Tier::INT4, Tier::INT8, Tier::FP16};
  KVCacheAnalyzer default_analyzer(default_opts);
  default_analyzer.add_calibration(0, data.q_calib, data.k, data.v);
  const PrecisionMap map = default_analyzer.analyze(request);
  const PrecisionMap map_int2 = analyzer.analyze(request);
  std::printf("\nprecision map, default policy (budget %lld bytes = %.3f x FP16 pages; INT4/INT8/FP16):\n%s\n",
              static_cast<long long>(request.budget_bytes), ratio, map.report.to_markdown().c_str());

  // 3. buffers: FP16 reference, the adaptive buffer from the map, and uniform tiers for comparison.
  at::Tensor k16 = data.k.unsqueeze(0).to(at::kHalf), v16 = data.v.unsqueeze(0).to(at::kHalf);
  MixedPrecisionBuffer ref(options_for(Tier::FP16));
  ref.append(k16, v16);
  MixedPrecisionBuffer adaptive(KVCacheAnalyzer::buffer_options(map, 0, 1, at::kHalf, c10::Device(c10::kCPU), false));
  KVCacheAnalyzer::append(adaptive, map, 0, k16, v16);
  MixedPrecisionBuffer adaptive_int2(
      KVCacheAnalyzer::buffer_options(map_int2, 0, 1, at::kHalf, c10::Device(c10::kCPU), false));
  KVCacheAnalyzer::append(adaptive_int2, map_int2, 0, k16, v16);

  // 4. measured attention-output error on test queries, and memory from the buffers' own accounting.
  std::printf("  %-34s %10s  %6s  %7s   %s\n", "cache", "bytes", "bits/el", "vs FP16", "rel. error of attention output");
  print_row("FP16 (reference)", ref, 0.0);
  const double err_adaptive = attention_error(adaptive, ref, data.q_test);
  print_row("adaptive (curvature, budget)", adaptive, err_adaptive);
  print_row("adaptive, INT2 allowed", adaptive_int2, attention_error(adaptive_int2, ref, data.q_test));
  for (Tier t : {Tier::INT8, Tier::INT4, Tier::INT2}) {
    MixedPrecisionBuffer uniform(options_for(t));
    uniform.append(k16, v16);
    const std::string name = std::string("uniform ") + tier_name(t);
    print_row(name.c_str(), uniform, attention_error(uniform, ref, data.q_test));
  }

  const MemoryReport m = adaptive.memory();
  std::printf("\nadaptive cache: %.2fx smaller than FP16 (%lld -> %lld bytes), attention-output error %.2e\n",
              m.compression_vs_fp16(), static_cast<long long>(ref.memory().resident_bytes()),
              static_cast<long long>(m.resident_bytes()), err_adaptive);
  if (!std::isfinite(err_adaptive)) {
    std::fprintf(stderr, "simple_demo: the measured error is not finite\n");
    return 1;
  }
  if (ratio <= 1.0 / 3.0 && m.compression_vs_fp16() < 2.5) {
    std::fprintf(stderr, "simple_demo: compression %.2fx is below the 2.5x the default policy must reach\n",
                 m.compression_vs_fp16());
    return 1;
  }
  return 0;
}
