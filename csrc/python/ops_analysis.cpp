// Registration of the analysis ops (schemas + CPU kernels): curvature (kvprec/curvature.h) and the precision
// mapper / knapsack (kvprec/precision_mapper.h). Fake kernels live in kvprec/ops/native.py; references in
// kvprec/analysis/curvature.py and kvprec/analysis/precision.py. Argument errors surface in Python as ValueError.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "kvprec/errors.h"
#include "kvprec/curvature.h"
#include "kvprec/formats.h"
#include "kvprec/precision_mapper.h"

namespace {

using kvprec::value_errors;

using kvprec::Reduce;
using kvprec::Tier;


std::vector<Tier> tiers_of(at::IntArrayRef ids) {
  std::vector<Tier> out;
  for (int64_t id : ids) out.push_back(kvprec::tier_from_index(id));
  return out;
}

at::Tensor cpu_double(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                    x.scalar_type());
  return x.to(at::kDouble).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_curvature_cpu(const at::Tensor& q,
                                                                                   const at::Tensor& k,
                                                                                   const at::Tensor& v, double scale,
                                                                                   bool causal) {
  auto r = kvprec::attention_curvature(q, k, v, scale, causal);
  return {r.kappa, r.attn, r.jac_norm, r.hess_norm};
}

std::tuple<at::Tensor, at::Tensor> curvature_reduce_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        double scale, bool causal, int64_t block_size,
                                                        c10::string_view query_reduce, c10::string_view block_reduce) {
  auto r = kvprec::curvature_reduce(q, k, v, scale, causal, block_size,
                                    kvprec::reduce_from_name(query_reduce, "query_reduce"),
                                    kvprec::reduce_from_name(block_reduce, "block_reduce"));
  return {r.position, r.block};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_locality_cpu(
    const at::Tensor& q, const at::Tensor& k, double scale, bool causal, int64_t window, double anchor_factor,
    double anchor_fraction, double cluster_threshold, int64_t top_clusters) {
  kvprec::LocalityOptions o;
  o.window = window;
  o.anchor_factor = anchor_factor;
  o.anchor_fraction = anchor_fraction;
  o.cluster_threshold = cluster_threshold;
  o.top_clusters = top_clusters;
  auto p = kvprec::attention_locality(q, k, scale, causal, o);
  return {p.recency_share, p.recency_uniform, p.anchor_mask, p.anchor_share, p.cluster_id, p.cluster_count,
          p.cluster_top_share};
}

at::Tensor required_bits_cpu(const at::Tensor& kappa, double c, int64_t head_dim, double eps) {
  at::Tensor x = cpu_double(kappa, "required_bits", "kappa");
  at::Tensor out = at::empty_like(x);
  const double* px = x.data_ptr<double>();
  double* po = out.data_ptr<double>();
  value_errors([&] {
    for (int64_t i = 0; i < x.numel(); ++i) po[i] = kvprec::required_bits(px[i], c, head_dim, eps);
    return 0;
  });
  return out;
}

at::Tensor map_tiers_cpu(const at::Tensor& bits, at::IntArrayRef candidates, int64_t block_size, int64_t head_dim,
                         int64_t group_size) {
  at::Tensor x = cpu_double(bits, "map_tiers", "bits");
  return value_errors([&] {
    kvprec::MapperOptions o;
    o.geometry = {block_size, head_dim, group_size};
    o.candidates = tiers_of(candidates);
    const kvprec::PrecisionMapper m(o);
    at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kChar));
    const double* px = x.data_ptr<double>();
    int8_t* po = out.data_ptr<int8_t>();
    for (int64_t i = 0; i < x.numel(); ++i) po[i] = static_cast<int8_t>(kvprec::tier_index(m.tier_for_bits(px[i])));
    return out;
  });
}

at::Tensor tier_errors_cpu(const at::Tensor& kappa, at::IntArrayRef candidates, double c, int64_t head_dim) {
  at::Tensor x = cpu_double(kappa, "tier_errors", "kappa");
  return value_errors([&] {
    TORCH_CHECK_VALUE(!candidates.empty(), "tier_errors: candidates is empty; give at least one tier id");
    const auto tiers = tiers_of(candidates);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.push_back(static_cast<int64_t>(tiers.size()));
    at::Tensor out = at::empty(shape, x.options());
    const double* px = x.data_ptr<double>();
    double* po = out.data_ptr<double>();
    for (int64_t i = 0; i < x.numel(); ++i)
      for (size_t j = 0; j < tiers.size(); ++j) *po++ = kvprec::predicted_error(px[i], tiers[j], c, head_dim);
    return out;
  });
}

kvprec::KnapsackProblem to_problem(const at::Tensor& errors, const at::Tensor& costs, const char* op) {
  TORCH_CHECK_VALUE(errors.dim() == 2, op, ": errors must be [items, choices], got shape ", errors.sizes());
  at::Tensor e = cpu_double(errors, op, "errors");
  TORCH_CHECK_VALUE(costs.device().is_cpu(), op, ": costs must be a CPU tensor, got ", costs.device());
  TORCH_CHECK_VALUE(!at::isFloatingType(costs.scalar_type()) && !at::isComplexType(costs.scalar_type()) &&
                        costs.scalar_type() != at::kBool,
                    op, ": costs must be an integer tensor of bytes, got ", costs.scalar_type());
  const int64_t I = e.size(0), J = e.size(1);
  TORCH_CHECK_VALUE((costs.dim() == 1 && costs.size(0) == J) || (costs.dim() == 2 && costs.size(0) == I && costs.size(1) == J),
                    op, ": costs must be [choices] (", J, ") or [items, choices] ([", I, ", ", J, "]), got shape ",
                    costs.sizes());
  at::Tensor c = costs.to(at::kLong).expand({I, J}).contiguous();
  kvprec::KnapsackProblem p;
  p.items = I;
  p.choices = J;
  p.errors.assign(e.data_ptr<double>(), e.data_ptr<double>() + I * J);
  p.costs.assign(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + I * J);
  return p;
}

std::tuple<at::Tensor, at::Tensor> pack(const kvprec::KnapsackSolution& s) {
  at::Tensor choice = at::empty({static_cast<int64_t>(s.choice.size())}, at::kLong);
  std::copy(s.choice.begin(), s.choice.end(), choice.data_ptr<int64_t>());
  at::Tensor summary = at::empty({4}, at::kDouble);
  auto a = summary.accessor<double, 1>();
  a[0] = s.error;
  a[1] = static_cast<double>(s.cost);
  a[2] = s.lower_bound;
  a[3] = s.exact ? 1.0 : 0.0;
  return {choice, summary};
}

std::tuple<at::Tensor, at::Tensor> knapsack_tiers_cpu(const at::Tensor& errors, const at::Tensor& costs, int64_t budget,
                                                      c10::string_view method) {
  return value_errors([&] {
    auto p = to_problem(errors, costs, "knapsack_tiers");
    return pack(kvprec::solve_budget(p, budget, kvprec::knapsack_method_from_name(std::string(method))));
  });
}

std::tuple<at::Tensor, at::Tensor> knapsack_min_bytes_cpu(const at::Tensor& errors, const at::Tensor& costs,
                                                          double max_error, c10::string_view method) {
  return value_errors([&] {
    auto p = to_problem(errors, costs, "knapsack_min_bytes");
    return pack(kvprec::solve_quality(p, max_error, kvprec::knapsack_method_from_name(std::string(method))));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvprec, m) {
  // q [B?, Hq, Q, D], k [B?, Hkv, N, D], v [B?, Hkv, N, Dv] -> four [B?, Hq, Q, N] tensors (kvprec/curvature.h).
  m.def("attention_curvature(Tensor q, Tensor k, Tensor v, float scale, bool causal) -> "
        "(Tensor kappa, Tensor attn, Tensor jac_norm, Tensor hess_norm)");
  m.def("curvature_reduce(Tensor q, Tensor k, Tensor v, float scale, bool causal, int block_size, "
        "str query_reduce=\"mean\", str block_reduce=\"max\") -> (Tensor position, Tensor block)");
  m.def("attention_locality(Tensor q, Tensor k, float scale, bool causal, int window=64, float anchor_factor=4.0, "
        "float anchor_fraction=0.9, float cluster_threshold=0.8, int top_clusters=4) -> (Tensor recency_share, "
        "Tensor recency_uniform, Tensor anchor_mask, Tensor anchor_share, Tensor cluster_id, Tensor cluster_count, "
        "Tensor cluster_top_share)");
  m.def("required_bits(Tensor kappa, float c, int head_dim, float eps) -> Tensor");
  m.def("map_tiers(Tensor bits, int[] candidates, int block_size, int head_dim, int group_size) -> Tensor");
  m.def("tier_errors(Tensor kappa, int[] candidates, float c, int head_dim) -> Tensor");
  m.def("knapsack_tiers(Tensor errors, Tensor costs, int budget, str method=\"auto\") -> (Tensor choice, Tensor summary)");
  m.def("knapsack_min_bytes(Tensor errors, Tensor costs, float max_error, str method=\"auto\") -> "
        "(Tensor choice, Tensor summary)");
}

TORCH_LIBRARY_IMPL(kvprec, CPU, m) {
  m.impl("attention_curvature", &attention_curvature_cpu);
  m.impl("curvature_reduce", &curvature_reduce_cpu);
  m.impl("attention_locality", &attention_locality_cpu);
  m.impl("required_bits", &required_bits_cpu);
  m.impl("map_tiers", &map_tiers_cpu);
  m.impl("tier_errors", &tier_errors_cpu);
  m.impl("knapsack_tiers", &knapsack_tiers_cpu);
  m.impl("knapsack_min_bytes", &knapsack_min_bytes_cpu);
}
