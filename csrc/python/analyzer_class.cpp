// torch.classes.kvprec.KVCacheAnalyzer: the C++ KVCacheAnalyzer (kvprec/analyzer.h) as a TorchScript custom
// class. kvprec/analysis/analyzer.py wraps it (tier names, defaults, a PrecisionMap dataclass); this glue only converts
// types so that the schema stays fixed: tiers as int ids, modes, reductions and knapsack methods as names, the
// report as flat tensors and numbers. Argument errors surface in Python as ValueError naming the argument.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "kvprec/errors.h"
#include "kvprec/analyzer.h"

namespace {

using kvprec::value_errors;

using kvprec::KVCacheAnalyzer;
using kvprec::Tier;


kvprec::MapMode mode_from_name(const std::string& name) {
  if (name == "threshold") return kvprec::MapMode::Threshold;
  if (name == "budget") return kvprec::MapMode::Budget;
  if (name == "quality") return kvprec::MapMode::Quality;
  TORCH_CHECK_VALUE(false, "mode: '", name, "' is not accepted; use threshold, budget or quality");
}

// Per-head report rows, layer-major: int64 [R, 11] = (layer, head, blocks, blocks per tier id 0..5, page_bytes,
// saturated) and FP64 [R, 3] = (bits_per_element, predicted_error, max_required_bits).
std::tuple<at::Tensor, at::Tensor> head_rows(const kvprec::PrecisionReport& rep) {
  const int64_t R = static_cast<int64_t>(rep.heads.size());
  at::Tensor ints = at::empty({R, 5 + kvprec::kNumTiers}, at::kLong);
  at::Tensor reals = at::empty({R, 3}, at::kDouble);
  auto pi = ints.accessor<int64_t, 2>();
  auto pr = reals.accessor<double, 2>();
  for (int64_t r = 0; r < R; ++r) {
    const kvprec::HeadReport& h = rep.heads[r];
    pi[r][0] = h.layer;
    pi[r][1] = h.head;
    pi[r][2] = h.blocks;
    for (int t = 0; t < kvprec::kNumTiers; ++t) pi[r][3 + t] = h.tier_blocks[t];
    pi[r][3 + kvprec::kNumTiers] = h.page_bytes;
    pi[r][4 + kvprec::kNumTiers] = h.saturated;
    pr[r][0] = h.bits_per_element;
    pr[r][1] = h.predicted_error;
    pr[r][2] = h.max_required_bits;
  }
  return {ints, reals};
}

struct AnalyzerHolder : torch::CustomClassHolder {
  KVCacheAnalyzer analyzer;
  explicit AnalyzerHolder(kvprec::AnalyzerOptions o) : analyzer(std::move(o)) {}
};

using Self = c10::intrusive_ptr<AnalyzerHolder>;

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvprec, m) {
  m.class_<AnalyzerHolder>("KVCacheAnalyzer")
      .def(torch::init([](double c, double eps, int64_t block_size, int64_t head_dim, int64_t group_size,
                          std::vector<int64_t> candidates, double scale, bool causal, const std::string& query_reduce) {
        kvprec::AnalyzerOptions o;
        o.mapper.c = c;
        o.mapper.eps = eps;
        o.mapper.geometry = {block_size, head_dim, group_size};
        o.mapper.candidates.clear();
        for (int64_t id : candidates) {
          TORCH_CHECK_VALUE(id >= 0 && id < kvprec::kNumTiers, "candidates: id ", id,
                            " is not a tier; accepted 0..5 (fp32, fp16, bf16, int8, int4, int2)");
          o.mapper.candidates.push_back(kvprec::tier_from_index(id));
        }
        o.scale = scale;
        o.causal = causal;
        o.query_reduce = kvprec::reduce_from_name(query_reduce, "query_reduce");
        return value_errors([&] { return c10::make_intrusive<AnalyzerHolder>(std::move(o)); });
      }))
      // q [B?, Hq, Q, D], k/v [B?, Hkv, N, D] of one layer on one calibration input (post-RoPE).
      .def("add_calibration", [](const Self& s, int64_t layer, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v) { s->analyzer.add_calibration(layer, q, k, v); })
      // pos_sum, pos_max [B?, Hkv, N] and count [N] or [Hkv, N] of one layer on one calibration input, reduced on a
      // device (kvprec/analysis/analyzer.py: the Triton curvature reduction); CPU tensors.
      .def("add_reduced", [](const Self& s, int64_t layer, const at::Tensor& pos_sum, const at::Tensor& pos_max,
                             const at::Tensor& count) { s->analyzer.add_reduced(layer, pos_sum, pos_max, count); })
      .def("num_layers", [](const Self& s) { return s->analyzer.num_layers(); })
      // Accumulated per-position statistics of one layer: (sum, max, count) FP64 [Hkv, N_max], inputs.
      .def("curvature",
           [](const Self& s, int64_t layer) {
             const kvprec::CurvatureAccumulator& acc = s->analyzer.curvature(layer);
             return std::make_tuple(acc.sum(), acc.max(), acc.count(), acc.inputs());
           })
      // analyze(mode, budget_bytes, max_error, method) ->
      //   (tiers, kappa_max, kappa_sum, default_tiers: per layer, [Hkv, nb] int8 / FP64 / FP64 and [Hkv] int8,
      //    markdown, page_bytes, bits_per_element, predicted_error, exact, lower_bound, head ints, head reals)
      .def("analyze", [](const Self& s, const std::string& mode, int64_t budget_bytes, double max_error,
                         const std::string& method) {
        kvprec::MapRequest r;
        r.mode = mode_from_name(mode);
        r.budget_bytes = budget_bytes;
        r.max_error = max_error;
        r.method = value_errors([&] { return kvprec::knapsack_method_from_name(method); });
        const kvprec::PrecisionMap map = s->analyzer.analyze(r);
        std::vector<at::Tensor> defaults;
        for (int64_t l = 0; l < map.num_layers(); ++l) defaults.push_back(map.default_tiers(l));
        const kvprec::PrecisionReport& rep = map.report;
        auto [ints, reals] = head_rows(rep);
        return std::make_tuple(map.tiers, map.kappa_max, map.kappa_sum, defaults, rep.to_markdown(), rep.page_bytes,
                               rep.bits_per_element, rep.predicted_error, rep.exact, rep.lower_bound, ints, reals);
      });
}
