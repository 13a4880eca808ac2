// torch.classes.kvprec.MixedPrecisionBuffer: the C++ MixedPrecisionBuffer and attend() (kvprec/buffer.h) as a
// TorchScript custom class. kvprec/storage/buffer.py wraps it in a Python class that accepts torch dtypes, devices and
// tier names; this glue only converts types (tier ids as int, dtype and device as strings, undefined tensors as
// empty ones) so that the schema stays fixed.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "kvprec/buffer.h"

namespace {

using kvprec::MixedPrecisionBuffer;

// "float32" / "float" / "torch.float32", "float16" / "half", "bfloat16" -> the model dtype.
at::ScalarType parse_dtype(std::string name) {
  if (name.rfind("torch.", 0) == 0) name = name.substr(6);
  if (name == "float32" || name == "float") return at::kFloat;
  if (name == "float16" || name == "half") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  TORCH_CHECK_VALUE(false, "dtype: '", name, "' is not accepted; use float32, float16 or bfloat16");
}

std::string dtype_name(at::ScalarType d) {
  switch (d) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(d);
  }
}

at::Tensor or_empty(const at::Tensor& t) { return t.defined() ? t : at::empty({0}); }

struct BufferHolder : torch::CustomClassHolder {
  MixedPrecisionBuffer buffer;
  explicit BufferHolder(const kvprec::BufferOptions& o) : buffer(o) {}
};

using Self = c10::intrusive_ptr<BufferHolder>;

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvprec, m) {
  m.class_<BufferHolder>("MixedPrecisionBuffer")
      .def(torch::init([](int64_t batch, int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t group_size,
                          const std::string& dtype, const std::string& device, int64_t default_tier, bool shadow) {
        kvprec::BufferOptions o;
        o.batch = batch;
        o.kv_heads = kv_heads;
        o.head_dim = head_dim;
        o.block_size = block_size;
        o.group_size = group_size;
        o.dtype = parse_dtype(dtype);
        o.device = c10::Device(device);
        TORCH_CHECK_VALUE(default_tier >= 0 && default_tier < kvprec::kNumTiers, "default_tier: id ", default_tier,
                          " is not a tier; accepted 0..5 (fp32, fp16, bf16, int8, int4, int2)");
        o.default_tier = kvprec::tier_from_index(default_tier);
        o.shadow = shadow;
        return c10::make_intrusive<BufferHolder>(o);
      }))
      // Options (batch follows index_batch).
      .def("batch", [](const Self& s) { return s->buffer.options().batch; })
      .def("kv_heads", [](const Self& s) { return s->buffer.options().kv_heads; })
      .def("head_dim", [](const Self& s) { return s->buffer.options().head_dim; })
      .def("block_size", [](const Self& s) { return s->buffer.options().block_size; })
      .def("group_size", [](const Self& s) { return s->buffer.options().group_size; })
      .def("dtype", [](const Self& s) { return dtype_name(s->buffer.options().dtype); })
      .def("device", [](const Self& s) { return s->buffer.options().device.str(); })
      .def("default_tier", [](const Self& s) { return static_cast<int64_t>(s->buffer.options().default_tier); })
      .def("has_shadow", [](const Self& s) { return s->buffer.has_shadow(); })
      // State.
      .def("seq_len", [](const Self& s) { return s->buffer.seq_len(); })
      .def("num_sealed_blocks", [](const Self& s) { return s->buffer.num_sealed_blocks(); })
      .def("evicted_blocks", [](const Self& s) { return s->buffer.evicted_blocks(); })
      .def("tail_len", [](const Self& s) { return s->buffer.tail_len(); })
      .def("blocks_sealed_by", [](const Self& s, int64_t n) { return s->buffer.blocks_sealed_by(n); })
      .def("tiers", [](const Self& s) { return s->buffer.tiers(); })
      .def("pages", [](const Self& s) { return s->buffer.pages(); })
      .def("pool",
           [](const Self& s, int64_t tier) {
             const kvprec::PoolView p = s->buffer.pool(kvprec::tier_from_index(tier));
             return std::make_tuple(or_empty(p.k), or_empty(p.k_scale), or_empty(p.k_zero), or_empty(p.v),
                                    or_empty(p.v_scale), or_empty(p.v_zero));
           })
      .def("tail_keys", [](const Self& s) { return s->buffer.tail_keys(); })
      .def("tail_values", [](const Self& s) { return s->buffer.tail_values(); })
      .def("block",
           [](const Self& s, int64_t index, std::optional<std::string> dtype) {
             auto [k, v] = s->buffer.block(index, dtype ? parse_dtype(*dtype) : at::ScalarType::Undefined);
             return std::make_tuple(k, v);
           })
      .def("gather",
           [](const Self& s, int64_t start, int64_t end) {
             auto [k, v] = s->buffer.gather(start, end);
             return std::make_tuple(k, v);
           })
      .def("shadow_block",
           [](const Self& s, int64_t index) {
             auto [k, v] = s->buffer.shadow_block(index);
             return std::make_tuple(k, v);
           })
      // Mutation.
      .def("append", [](const Self& s, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& seal_tiers) { s->buffer.append(k, v, seal_tiers.value_or(at::Tensor())); })
      .def("set_block_tiers", [](const Self& s, int64_t index, const at::Tensor& tiers) { s->buffer.set_block_tiers(index, tiers); })
      .def("crop", [](const Self& s, int64_t new_len) { s->buffer.crop(new_len); })
      .def("evict_blocks", [](const Self& s, int64_t count) { s->buffer.evict_blocks(count); })
      .def("index_batch", [](const Self& s, const at::Tensor& idx) { s->buffer.index_batch(idx); })
      .def("reset", [](const Self& s) { s->buffer.reset(); })
      // memory(): bytes per tier under the tier's name, pages under "pages_<name>", then the other fields.
      .def("memory",
           [](const Self& s) {
             const kvprec::MemoryReport r = s->buffer.memory();
             c10::Dict<std::string, int64_t> d;
             for (kvprec::Tier t : kvprec::kAllTiers) {
               d.insert(kvprec::tier_name(t), r.tier_bytes[kvprec::tier_index(t)]);
               d.insert(std::string("pages_") + kvprec::tier_name(t), r.tier_pages[kvprec::tier_index(t)]);
             }
             d.insert("tail", r.tail_bytes);
             d.insert("table", r.table_bytes);
             d.insert("shadow", r.shadow_bytes);
             d.insert("reserved", r.reserved_bytes);
             d.insert("tokens", r.tokens);
             d.insert("elements", r.elements);
             d.insert("resident", r.resident_bytes());
             return d;
           })
      // attend(q, mask?, scale, window, softcap, block_mass) -> (out, lse, block_mass or an empty tensor).
      .def("attend", [](const Self& s, const at::Tensor& q, const std::optional<at::Tensor>& mask, double scale,
                        int64_t window, double softcap, bool block_mass) {
        kvprec::AttentionOptions o;
        o.scale = scale;
        o.sliding_window = window;
        o.softcap = softcap;
        o.block_mass = block_mass;
        const kvprec::AttentionResult r = kvprec::attend(s->buffer, q, mask.value_or(at::Tensor()), o);
        return std::make_tuple(r.out, r.lse, or_empty(r.block_mass));
      });
}
