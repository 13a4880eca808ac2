// Registration of the storage-format ops (schemas + CPU kernels). Fake kernels live in kvprec/ops/native.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kvprec/formats.h"
#include "kvprec/quantize.h"

namespace {

using kvprec::QuantizedBlock;
using kvprec::Tier;

// Float tiers carry no metadata: scale and zero are returned empty (FP16, numel 0) so the schema stays fixed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> as_tuple(const QuantizedBlock& q, const at::Tensor& like) {
  auto empty = [&] { return at::empty({0}, like.options().dtype(at::kHalf)); };
  return {q.codes, q.scale.defined() ? q.scale : empty(), q.zero.defined() ? q.zero : empty()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_keys_cpu(const at::Tensor& x, int64_t tier) {
  return as_tuple(kvprec::quantize_keys(x, kvprec::tier_from_index(tier)), x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_values_cpu(const at::Tensor& x, int64_t tier,
                                                                   int64_t group_size) {
  return as_tuple(kvprec::quantize_values(x, kvprec::tier_from_index(tier), group_size), x);
}

at::Tensor dequantize_keys_cpu(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t tier,
                               int64_t head_dim, at::ScalarType dtype) {
  return kvprec::dequantize_keys({codes, scale, zero}, kvprec::tier_from_index(tier), head_dim, dtype);
}

at::Tensor dequantize_values_cpu(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                                 int64_t tier, int64_t head_dim, int64_t group_size, at::ScalarType dtype) {
  return kvprec::dequantize_values({codes, scale, zero}, kvprec::tier_from_index(tier), head_dim, group_size, dtype);
}

// In place: writes pages of codes / scale / zero and raises amax (see kvprec/quantize.h).
void quantize_append_impl(const at::Tensor& x, const at::Tensor& pages, const at::Tensor& codes,
                          const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& zero,
                          const std::optional<at::Tensor>& amax, int64_t tier, bool keys, int64_t group_size) {
  kvprec::quantize_append(x, kvprec::tier_from_index(tier), keys, group_size, pages, codes,
                          scale.value_or(at::Tensor()), zero.value_or(at::Tensor()), amax.value_or(at::Tensor()));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvprec, m) {
  m.def("quantize_keys(Tensor x, int tier) -> (Tensor codes, Tensor scale, Tensor zero)");
  m.def("quantize_values(Tensor x, int tier, int group_size) -> (Tensor codes, Tensor scale, Tensor zero)");
  m.def("dequantize_keys(Tensor codes, Tensor scale, Tensor zero, int tier, int head_dim, ScalarType dtype) -> Tensor");
  m.def("dequantize_values(Tensor codes, Tensor scale, Tensor zero, int tier, int head_dim, int group_size, "
        "ScalarType dtype) -> Tensor");
  m.def("quantize_append(Tensor x, Tensor pages, Tensor(a!) codes, Tensor(b!)? scale, Tensor(c!)? zero, "
        "Tensor(d!)? amax, int tier, bool keys, int group_size) -> ()");
  m.def("tier_table() -> Tensor");
}

TORCH_LIBRARY_IMPL(kvprec, CPU, m) {
  m.impl("quantize_keys", &quantize_keys_cpu);
  m.impl("quantize_values", &quantize_values_cpu);
  m.impl("dequantize_keys", &dequantize_keys_cpu);
  m.impl("dequantize_values", &dequantize_values_cpu);
  m.impl("quantize_append", &quantize_append_impl);
}

#ifdef KVPREC_WITH_CUDA
// The same entry points dispatch to the CUDA kernels for CUDA tensors (csrc/core/quantize.cpp).
TORCH_LIBRARY_IMPL(kvprec, CUDA, m) {
  m.impl("quantize_keys", &quantize_keys_cpu);
  m.impl("quantize_values", &quantize_values_cpu);
  m.impl("dequantize_keys", &dequantize_keys_cpu);
  m.impl("dequantize_values", &dequantize_values_cpu);
  m.impl("quantize_append", &quantize_append_impl);
}
#endif

// tier_table(): one row per tier id: [bits, qmax, codes_per_byte, effective_bits * 1e6] (int64), so the Python
// mirror of formats.h can be checked against the header itself.
TORCH_LIBRARY_IMPL(kvprec, CompositeExplicitAutograd, m) {
  m.impl("tier_table", []() {
    at::Tensor t = at::empty({kvprec::kNumTiers, 4}, at::kLong);
    auto a = t.accessor<int64_t, 2>();
    for (Tier tier : kvprec::kAllTiers) {
      const int i = kvprec::tier_index(tier);
      a[i][0] = kvprec::tier_bits(tier);
      a[i][1] = kvprec::tier_qmax(tier);
      a[i][2] = kvprec::tier_codes_per_byte(tier);
      a[i][3] = static_cast<int64_t>(kvprec::tier_effective_bits(tier) * 1e6);
    }
    return t;
  });
}
