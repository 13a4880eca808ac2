// KVCacheAnalyzer: calibration attention inputs -> curvature -> a precision map per (layer, KV head, block) ->
// a report -> adaptive buffers configured from the map. DynamicPrecisionAdjuster: keeps live buffers under a
// byte budget by re-tiering their sealed blocks, least important first.
//
// Pipeline (kvprec/curvature.h and kvprec/precision_mapper.h hold the formulas):
//   1. add_calibration(layer, q, k, v): per-position curvature kappa_t, reduced over the calibration inputs, the
//      query heads of each GQA group and the queries that see t (AnalyzerOptions::query_reduce, default Mean),
//      per KV head: [Hkv, N_max] (CurvatureAccumulator). add_reduced(layer, pos_sum, pos_max, count) takes the
//      same statistics of one input already reduced on a device (kvprec/analysis/analyzer.py does that on a GPU).
//   2. per block of T positions: kappa_max (the block's most sensitive position: threshold mode needs every
//      position's bound to hold) and kappa_sum (predicted errors of positions add: the knapsack modes).
//   3. analyze(request):
//        Threshold: tier = PrecisionMapper::tier_for_bits(required_bits(kappa_max)) per block;
//        Budget:    one multiple-choice knapsack over all (layer, head, block) items, errors from kappa_sum,
//                   costs page bytes, total page bytes <= budget_bytes;
//        Quality:   the fewest page bytes with total predicted error <= max_error.
//   4. report per (layer, head): tier histogram, page bytes (K + V data + FP16 scales/zeros) and
//      bits per element = 8 * page bytes / (blocks * T * D * 2), predicted error sum_blocks c kappa_sum D^2 2^-p_eff,
//      largest required bits, saturated blocks (required bits above the chosen tier's).
//   5. buffer_options() / append(): a MixedPrecisionBuffer whose sealed blocks take the mapped tiers. Blocks past
//      the calibrated length take the head's default tier: the median of its mapped tiers by effective bits
//      (the lower median for an even count), i.e. the typical block of that head.
//
// DynamicPrecisionAdjuster (budget enforcement on live buffers):
//   Importance of a sealed block (layer, b, h, j): its score s = block curvature kappa_sum from the map (blocks past
//   the calibrated length: the head's median), or the attention mass it has received (observe(): sum over decode
//   steps, queries and the query heads of the group of AttentionResult::block_mass; H2O's accumulated attention,
//   arXiv:2306.14048; a block never observed has mass 0).
//   Demotion (resident bytes above the budget): one step = the next candidate tier with fewer page bytes; the step
//   that adds the least predicted error per byte freed, s * (2^-p_eff(next) - 2^-p_eff(now)) / bytes freed, goes first
//   (ties: lower layer, then older block, then batch row, then head), until the budget is met. All steps of a block
//   are applied as one set_block_tiers call, so each block is re-quantized once from the highest copy held.
//   Promotion (resident bytes below the budget): only for buffers that keep a shadow (has_shadow()); the step with
//   the largest error reduction per byte that still fits goes first. Without a shadow nothing is promoted: lost bits
//   are not restored, and the adjuster does not pretend otherwise.
//   A budget below what every sealed block at the cheapest candidate would take (plus the tails and block tables,
//   which re-tiering cannot shrink) is refused before anything changes, naming the budget and that minimum.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <string>
#include <vector>

#include "kvprec/buffer.h"
#include "kvprec/curvature.h"
#include "kvprec/formats.h"
#include "kvprec/precision_mapper.h"

namespace kvprec {

enum class MapMode : int8_t { Threshold = 0, Budget = 1, Quality = 2 };
const char* map_mode_name(MapMode m);

struct AnalyzerOptions {
  MapperOptions mapper;                // c, eps, block geometry (T, D, G), candidate tiers
  double scale = 0.0;                  // softmax scale; 0 = 1/sqrt(D)
  bool causal = true;                  // calibration queries are the last Q positions, causal (prefill)
  Reduce query_reduce = Reduce::Mean;  // over inputs, query heads of the group, queries (Mean or Max)
  void check() const;
};

struct MapRequest {
  MapMode mode = MapMode::Threshold;
  int64_t budget_bytes = 0;  // Budget: total page bytes of every (layer, head, block) of one sequence
  double max_error = 0.0;    // Quality: total predicted error
  KnapsackMethod method = KnapsackMethod::Auto;
};

struct HeadReport {
  int64_t layer = 0, head = 0, blocks = 0;
  std::array<int64_t, kNumTiers> tier_blocks{};  // histogram, indexed by tier id
  int64_t page_bytes = 0;
  double bits_per_element = 0.0;
  double predicted_error = 0.0;
  double max_required_bits = 0.0;
  int64_t saturated = 0;
};

struct PrecisionReport {
  MapMode mode = MapMode::Threshold;
  std::vector<HeadReport> heads;  // layer-major
  int64_t page_bytes = 0;
  double bits_per_element = 0.0;
  double predicted_error = 0.0;
  bool exact = true;              // knapsack modes: solved by the DP
  double lower_bound = 0.0;       // knapsack modes: on the optimal error (Budget) or bytes (Quality)
  std::string to_markdown() const;
};

struct PrecisionMap {
  BlockGeometry geometry;
  std::vector<at::Tensor> tiers;      // per layer: int8 tier ids [Hkv, nb]
  std::vector<at::Tensor> kappa_max;  // per layer: FP64 [Hkv, nb]
  std::vector<at::Tensor> kappa_sum;  // per layer: FP64 [Hkv, nb]
  PrecisionReport report;

  int64_t num_layers() const { return static_cast<int64_t>(tiers.size()); }
  int64_t kv_heads(int64_t layer) const;
  int64_t mapped_blocks(int64_t layer) const;
  Tier tier(int64_t layer, int64_t head, int64_t block) const;  // past the map: the head's default tier
  at::Tensor default_tiers(int64_t layer) const;                 // int8 [Hkv]
  // Tiers for sealing blocks first_block .. first_block + count - 1: int8 [batch, Hkv, count].
  at::Tensor seal_tiers(int64_t layer, int64_t batch, int64_t first_block, int64_t count) const;
  // kappa_sum of the block; past the map, the median of the head's kappa_sum.
  double block_curvature(int64_t layer, int64_t head, int64_t block) const;
};

class KVCacheAnalyzer {
 public:
  explicit KVCacheAnalyzer(AnalyzerOptions options = {});

  const AnalyzerOptions& options() const { return opts_; }
  const PrecisionMapper& mapper() const { return mapper_; }

  // q [B?, Hq, Q, D], k/v [B?, Hkv, N, D] of one layer's attention on one calibration input (post-RoPE).
  // D must be the geometry's head_dim; every call for a layer must have the same Hkv.
  void add_calibration(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
  // The same layer's statistics on one calibration input, already reduced by a kernel (on the GPU: the Triton
  // curvature reduction with query_reduce sum and max, computed with this analyzer's scale, causality and
  // head_dim): pos_sum, pos_max [B?, Hkv, N], count [N] or [Hkv, N]; CurvatureAccumulator::add_reduced gives
  // the shapes, the count and the equivalence with add_calibration. Every call for a layer must have the same Hkv.
  void add_reduced(int64_t layer, const at::Tensor& pos_sum, const at::Tensor& pos_max, const at::Tensor& count);
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  const CurvatureAccumulator& curvature(int64_t layer) const;

  PrecisionMap analyze(const MapRequest& request = {}) const;

  // Options of a buffer for `layer` of the map: its geometry and heads; default_tier = the layer's median tier
  // (used only by appends that bypass append() below).
  static BufferOptions buffer_options(const PrecisionMap& map, int64_t layer, int64_t batch, at::ScalarType dtype,
                                      c10::Device device, bool shadow);
  // buffer.append(k, v) with the mapped tiers for the blocks this append seals.
  static void append(MixedPrecisionBuffer& buffer, const PrecisionMap& map, int64_t layer, const at::Tensor& k,
                     const at::Tensor& v);

 private:
  AnalyzerOptions opts_;
  PrecisionMapper mapper_;
  std::vector<CurvatureAccumulator> layers_;
};

enum class ImportanceScore : int8_t { Curvature = 0, AttentionMass = 1 };

struct AdjustResult {
  int64_t bytes_before = 0;  // sum of resident_bytes() over the buffers
  int64_t bytes_after = 0;
  int64_t demotions = 0;     // (layer, block, batch row, head) entries whose tier went down
  int64_t promotions = 0;    // ... up (shadow only)
};

class DynamicPrecisionAdjuster {
 public:
  // buffers[l] is layer l's buffer (not owned; must outlive the adjuster). Curvature scores need `map`.
  DynamicPrecisionAdjuster(std::vector<MixedPrecisionBuffer*> buffers, MapperOptions mapper, ImportanceScore score,
                           const PrecisionMap* map = nullptr);

  // Accumulates attention mass of layer: block_mass [B, Hq, Q, nb] (AttentionResult::block_mass; nb may include
  // the tail block). Needed for ImportanceScore::AttentionMass.
  void observe(int64_t layer, const at::Tensor& block_mass);
  at::Tensor scores(int64_t layer) const;  // FP64 [B, Hkv, num_sealed_blocks]

  int64_t resident_bytes() const;
  int64_t min_resident_bytes() const;  // every sealed block at the cheapest candidate
  AdjustResult enforce(int64_t budget_bytes);

 private:
  std::vector<MixedPrecisionBuffer*> buffers_;
  PrecisionMapper mapper_;
  ImportanceScore score_;
  const PrecisionMap* map_;
  std::vector<at::Tensor> mass_;  // per layer: FP64 [B, Hkv, nb observed]
};

}  // namespace kvprec
