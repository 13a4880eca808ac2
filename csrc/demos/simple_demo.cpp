// simple_demo: curvature analysis -> precision map -> adaptive buffer -> memory saved and the MEASURED
// attention-output error against an FP16 cache, next to uniform tiers. Every number printed is computed in
// this run.
//
// The K/V/q are synthetic, built to have the structure real caches show (stated, not claimed as real data):
// a few attention-sink positions at the start, a recency bias, persistent outlier key channels, and queries
// that share a common direction. Calibration queries and test queries are separate draws.
//
//   simple_demo [--seq N] [--ratio R]     (limits and why: usage() below, printed by --help)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "demo_args.h"
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

// The value-group size G is the demo's choice (32), not the library default; the limits below follow from it.
const BlockGeometry kGeometry{kBlock, kHeadDim, kValueGroup};

// Largest --seq: a bound on run time, not a limit of the library. Every step is linear in N on one thread
// (calibration curvature [Hq, 32 queries, N], the knapsack over 4 * ceil(N / 64) blocks, 2 x 32 attention
// passes per buffer); at the cap a run takes about 35 s and 1.2 GB on one core. Nothing else depends on it.
constexpr int64_t kMaxSeq = 65536;

// The smallest budget ratio the default map can meet: every block at INT4, the cheapest of its candidates
// (INT4 / INT8 / FP16). 9728 / 32768 = 0.296875 at T=64, D=128, G=32 (FP16 scale/zero per key channel and per
// value group included).
double min_ratio() {
  return static_cast<double>(kGeometry.page_bytes(Tier::INT4)) / static_cast<double>(kGeometry.page_bytes(Tier::FP16));
}

std::string usage() {
  const std::string t = std::to_string(kBlock), r = demo::format_real(min_ratio());
  return "usage: simple_demo [--seq N] [--ratio R] [--help]\n"
         "  --seq N    positions in the synthetic cache, an integer in [" + t + ", " + std::to_string(kMaxSeq) +
         "]\n"
         "             (default 2048). Blocks of " + t + " positions are quantized only when sealed (full), so a\n"
         "             shorter cache would be all tail with nothing to compress. N need not be a multiple of " + t +
         ":\n"
         "             the last N mod " + t + " positions stay in the tail at FP16.\n"
         "  --ratio R  the byte budget as a fraction of the FP16 pages of the ceil(N / " + t + ") mapped blocks,\n"
         "             a number in [" + r + ", 1] (default 1/3). " + r + " is INT4 page / FP16 page, " +
         std::to_string(kGeometry.page_bytes(Tier::INT4)) + " / " + std::to_string(kGeometry.page_bytes(Tier::FP16)) +
         "\n"
         "             bytes at T=" + t + ", D=" + std::to_string(kHeadDim) + ", G=" + std::to_string(kValueGroup) +
         " with the scales and zeros: the default map picks among\n"
         "             INT4 / INT8 / FP16, so no smaller budget can be met.\n"
         "Exit codes: 0 done; 1 the run failed a self-check or the library raised an error; 2 a bad argument.\n";
}

int run(int64_t n, double ratio) {
  at::set_num_threads(1);
  const Synthetic data = make_data(n, 32);
  std::printf("kvprec simple_demo: Hkv=%lld (GQA x%lld), D=%lld, N=%lld positions in blocks of %lld, FP16 model dtype\n",
              static_cast<long long>(kKvHeads), static_cast<long long>(kGroup), static_cast<long long>(kHeadDim),
              static_cast<long long>(n), static_cast<long long>(kBlock));

  // 1. analysis: curvature of the calibration queries' attention over the cache content.
  AnalyzerOptions aopts;
  aopts.mapper.geometry = kGeometry;
  KVCacheAnalyzer analyzer(aopts);
  analyzer.add_calibration(0, data.q_calib, data.k, data.v);

  // 2. mapping: a byte budget of `ratio` x the FP16 pages, solved as a multiple-choice knapsack over the blocks
  //    the analyzer maps: ceil(N / T), the partial last block included (it is sealed if the cache grows). The
  //    default candidates are INT4, INT8 and FP16; a second map also offers INT2 (the aggressive end), where keys
  //    move far enough that the second-order curvature model stops predicting the damage (the table shows it).
  const int64_t mapped_blocks = (n + kBlock - 1) / kBlock;
  const int64_t fp16_pages = kKvHeads * mapped_blocks * kGeometry.page_bytes(Tier::FP16);
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

  // The budget governs the sealed pages; the resident bytes add the tail (the unsealed last block, FP16) and
  // the block table, which no tier choice changes and which weigh most in a short cache.
  const MemoryReport m = adaptive.memory(), m_ref = ref.memory();
  int64_t pages = 0, ref_pages = 0;
  for (int t = 0; t < kNumTiers; ++t) {
    pages += m.tier_bytes[t];
    ref_pages += m_ref.tier_bytes[t];
  }
  std::printf("\nadaptive cache: %lld sealed blocks per head, pages %lld bytes = %.3f x FP16 pages (%lld); budget %lld "
              "bytes for the %lld mapped blocks per head;\n"
              "resident with the tail and block table %lld bytes, compression vs FP16 %.2fx (%lld bytes); "
              "attention-output error %.2e\n",
              static_cast<long long>(adaptive.num_sealed_blocks()), static_cast<long long>(pages),
              static_cast<double>(pages) / static_cast<double>(ref_pages), static_cast<long long>(ref_pages),
              static_cast<long long>(request.budget_bytes), static_cast<long long>(mapped_blocks),
              static_cast<long long>(m.resident_bytes()), m.compression_vs_fp16(),
              static_cast<long long>(m_ref.resident_bytes()), err_adaptive);
  if (!std::isfinite(err_adaptive)) {
    std::fprintf(stderr, "simple_demo: the measured attention-output error is not finite (%g)\n", err_adaptive);
    return 1;
  }
  if (pages > request.budget_bytes) {
    std::fprintf(stderr, "simple_demo: the sealed pages (%lld bytes) exceed the budget (%lld bytes)\n",
                 static_cast<long long>(pages), static_cast<long long>(request.budget_bytes));
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return demo::guarded_main("simple_demo", [&] {
    int64_t n = 2048;
    double ratio = 1.0 / 3.0;
    demo::Parser args(usage());
    args.add_int("--seq", &n, kBlock, kMaxSeq,
                 "shorter than one block of " + std::to_string(kBlock) + " seals nothing to compress");
    args.add_real("--ratio", &ratio, min_ratio(), 1.0,
                  "below INT4 page / FP16 page no map of INT4/INT8/FP16 meets the budget");
    if (!args.parse(argc, argv)) return 0;
    return run(n, ratio);
  });
}
