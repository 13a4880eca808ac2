// MixedPrecisionBuffer (kvprec/buffer.h): paged pools per tier, a host block table, the model-dtype tail and
// the optional host shadow. Quantization goes through kvprec/quantize.h, so pages are bit-identical to the
// Python reference (kvprec/ops/reference/quantize.py).
//
// Every mutating call validates all of its arguments and computes everything that can fail (quantization
// included) before it changes any state, so a rejected call leaves the buffer as it was. append seals with
// quantize_append straight into freshly taken pages, checks the FP16 range from the amax it returns (one
// synchronisation), and puts the pools back as they were if that check refuses.
#include "kvprec/buffer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <set>
#include <stdexcept>
#include <string>

#include "kvprec/errors.h"
#include "kvprec/quantize.h"

namespace kvprec {
namespace {

// One tier's pool: six tensors with `capacity` pages along dim 0 (PoolView), handed out page by page.
// Pages [0, high) have been used at least once; `free` holds those returned since, and the lowest free page
// is reused first, so a pool that shrinks and grows again stays compact.
struct Pool {
  PoolView t;
  int64_t capacity = 0;
  int64_t high = 0;
  std::set<int32_t> free;

  int64_t live() const { return high - static_cast<int64_t>(free.size()); }
};

bool is_float_model_dtype(at::ScalarType d) { return d == at::kFloat || d == at::kHalf || d == at::kBFloat16; }

// Grow `pool` to hold at least `need` pages, by at least a quarter of its capacity (amortised O(1) copies per
// page, at most 4), pages in use are copied. A quarter, not a doubling: reserved pool bytes are device memory a
// compressed cache must not waste; doubling would let an INT4 cache reserve up to 2x its live pages (e.g. the
// first seal after a prefill of a power-of-two block count), a quarter bounds that at 1.25x.
void reserve(Pool& pool, Tier tier, const BlockGeometry& g, c10::Device device, int64_t need) {
  if (need <= pool.capacity) return;
  const int64_t cap = std::max<int64_t>(need, pool.capacity + std::max<int64_t>(1, pool.capacity / 4));
  const int64_t t = g.block_size, d = g.head_dim;
  auto make = [&](std::vector<int64_t> page_shape, at::ScalarType dtype, const at::Tensor& old) {
    page_shape.insert(page_shape.begin(), cap);
    at::Tensor fresh = at::zeros(page_shape, at::TensorOptions().dtype(dtype).device(device));
    if (old.defined() && pool.high > 0) fresh.narrow(0, 0, pool.high).copy_(old.narrow(0, 0, pool.high));
    return fresh;
  };
  PoolView& p = pool.t;
  if (tier_is_integer(tier)) {
    const int64_t row = tier_row_bytes(tier, d), groups = d / g.group_size;
    p.k = make({t, row}, at::kByte, p.k);
    p.v = make({t, row}, at::kByte, p.v);
    p.k_scale = make({d}, at::kHalf, p.k_scale);
    p.k_zero = make({d}, at::kHalf, p.k_zero);
    p.v_scale = make({t, groups}, at::kHalf, p.v_scale);
    p.v_zero = make({t, groups}, at::kHalf, p.v_zero);
  } else {
    p.k = make({t, d}, tier_float_dtype(tier), p.k);
    p.v = make({t, d}, tier_float_dtype(tier), p.v);
  }
  pool.capacity = cap;
}

std::vector<int32_t> allocate(Pool& pool, Tier tier, const BlockGeometry& g, c10::Device device, int64_t n) {
  std::vector<int32_t> pages;
  pages.reserve(n);
  while (static_cast<int64_t>(pages.size()) < n && !pool.free.empty()) {
    pages.push_back(*pool.free.begin());
    pool.free.erase(pool.free.begin());
  }
  const int64_t fresh = n - static_cast<int64_t>(pages.size());
  reserve(pool, tier, g, device, pool.high + fresh);
  for (int64_t i = 0; i < fresh; ++i) pages.push_back(static_cast<int32_t>(pool.high++));
  return pages;
}

at::Tensor index_tensor(const std::vector<int64_t>& v, c10::Device device) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(device);
}

at::Tensor index_tensor(const std::vector<int32_t>& v, c10::Device device) {
  return index_tensor(std::vector<int64_t>(v.begin(), v.end()), device);
}

// Page-wise copies between the pool and QuantizedBlocks (keys and values of N pages).
void write_pages(Pool& pool, Tier tier, const at::Tensor& pages, const QuantizedBlock& qk, const QuantizedBlock& qv) {
  const c10::Device dev = pool.t.k.device();
  pool.t.k.index_copy_(0, pages, qk.codes.to(dev));
  pool.t.v.index_copy_(0, pages, qv.codes.to(dev));
  if (tier_is_integer(tier)) {
    pool.t.k_scale.index_copy_(0, pages, qk.scale.to(dev));
    pool.t.k_zero.index_copy_(0, pages, qk.zero.to(dev));
    pool.t.v_scale.index_copy_(0, pages, qv.scale.to(dev));
    pool.t.v_zero.index_copy_(0, pages, qv.zero.to(dev));
  }
}

std::pair<QuantizedBlock, QuantizedBlock> read_pages(const Pool& pool, Tier tier, const at::Tensor& pages) {
  const PoolView& p = pool.t;
  if (!tier_is_integer(tier)) return {{p.k.index_select(0, pages), {}, {}}, {p.v.index_select(0, pages), {}, {}}};
  return {{p.k.index_select(0, pages), p.k_scale.index_select(0, pages), p.k_zero.index_select(0, pages)},
          {p.v.index_select(0, pages), p.v_scale.index_select(0, pages), p.v_zero.index_select(0, pages)}};
}

// Rows of one block grouped by tier: rows[tier] are flat (b * H + h) indices, in increasing order.
using RowsByTier = std::array<std::vector<int64_t>, kNumTiers>;

// The rows of block j of a block-major table (or of one block's tiers, j = 0), grouped by tier. The block must
// not be evicted.
RowsByTier rows_by_tier(const std::vector<int8_t>& table_tier, int64_t j, int64_t rows) {
  RowsByTier out;
  for (int64_t r = 0; r < rows; ++r) out[table_tier[j * rows + r]].push_back(r);
  return out;
}

// Return the page of table entry e to its pool; an evicted entry holds none.
void release_entry(std::array<Pool, kNumTiers>& pools, const std::vector<int8_t>& table_tier,
                   const std::vector<int32_t>& table_page, int64_t e) {
  if (table_tier[e] != kEvictedTier) pools[table_tier[e]].free.insert(table_page[e]);
}

}  // namespace

// ------------------------------------------------------------------------------------------------------
// MemoryReport

int64_t MemoryReport::resident_bytes() const {
  int64_t total = tail_bytes + table_bytes;
  for (int64_t b : tier_bytes) total += b;
  return total;
}

double MemoryReport::bits_per_element() const {
  return elements == 0 ? 0.0 : static_cast<double>(resident_bytes()) * 8.0 / static_cast<double>(elements);
}

double MemoryReport::compression_vs_fp16() const {
  const int64_t r = resident_bytes();
  return r == 0 ? 0.0 : static_cast<double>(elements) * 2.0 / static_cast<double>(r);
}

// ------------------------------------------------------------------------------------------------------
// State

struct MixedPrecisionBuffer::State {
  std::array<Pool, kNumTiers> pools;
  // Block table, block-major: entry (j, b, h) at (j * B + b) * H + h, so sealing block j appends B * H
  // entries and crop truncates; std::vector grows by doubling.
  std::vector<int8_t> table_tier;
  std::vector<int32_t> table_page;
  at::Tensor tail_k, tail_v;                     // [B, H, T, D] model dtype, on the buffer's device
  std::vector<at::Tensor> shadow_k, shadow_v;    // one [B, H, T, D] model-dtype CPU tensor per sealed block

  Pool& pool(Tier t) { return pools[tier_index(t)]; }
  const Pool& pool(Tier t) const { return pools[tier_index(t)]; }

  // Store the quantized K/V of `rows` (flat b * H + h) of block j in fresh pages of `tier` and point the
  // table entries (j, rows) at them. The table must already hold block j (bh entries per block).
  void place(int64_t j, int64_t bh, Tier tier, const std::vector<int64_t>& rows, const QuantizedBlock& qk,
             const QuantizedBlock& qv, const BlockGeometry& g, c10::Device device) {
    const std::vector<int32_t> pages = allocate(pool(tier), tier, g, device, static_cast<int64_t>(rows.size()));
    write_pages(pool(tier), tier, index_tensor(pages, device), qk, qv);
    for (size_t i = 0; i < rows.size(); ++i) {
      table_tier[j * bh + rows[i]] = static_cast<int8_t>(tier);
      table_page[j * bh + rows[i]] = pages[i];
    }
  }
};

MixedPrecisionBuffer::MixedPrecisionBuffer(const BufferOptions& options) : opts_(options) {
  if (opts_.group_size == 0 && opts_.head_dim > 0) opts_.group_size = default_group_size(opts_.head_dim);
  TORCH_CHECK_VALUE(opts_.batch >= 1, "batch: ", opts_.batch, " is not accepted; expected >= 1");
  TORCH_CHECK_VALUE(opts_.kv_heads >= 1, "kv_heads: ", opts_.kv_heads, " is not accepted; expected >= 1");
  value_errors([&] { geometry().check(); });
  TORCH_CHECK_VALUE(is_float_model_dtype(opts_.dtype), "dtype: ", c10::toString(opts_.dtype),
                    " is not accepted; the model dtype must be float32, float16 or bfloat16");
  const int64_t ti = static_cast<int64_t>(opts_.default_tier);
  TORCH_CHECK_VALUE(ti >= 0 && ti < kNumTiers, "default_tier: id ", ti, " is not a tier; accepted 0..5");
  state_ = std::make_shared<State>();
  const auto o = at::TensorOptions().dtype(opts_.dtype).device(opts_.device);
  state_->tail_k = at::zeros({opts_.batch, opts_.kv_heads, opts_.block_size, opts_.head_dim}, o);
  state_->tail_v = at::zeros_like(state_->tail_k);
}

int64_t MixedPrecisionBuffer::blocks_sealed_by(int64_t new_tokens) const {
  TORCH_CHECK_VALUE(new_tokens >= 0, "new_tokens: ", new_tokens, " is not accepted; expected >= 0");
  return (tail_len() + new_tokens) / opts_.block_size;
}

// ------------------------------------------------------------------------------------------------------
// append

namespace {

void check_kv(const at::Tensor& x, const char* name, const BufferOptions& o) {
  TORCH_CHECK_VALUE(x.defined(), "append: ", name, " is undefined; expected a [B, H, n, D] float tensor");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(0) == o.batch && x.size(1) == o.kv_heads && x.size(3) == o.head_dim,
                    "append: ", name, " has shape ", x.sizes(), "; expected [B, H, n, D] = [", o.batch, ", ",
                    o.kv_heads, ", n, ", o.head_dim, "]");
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "append: ", name, " has dtype ",
                    c10::toString(x.scalar_type()), "; expected a floating dtype (float32, float16, bfloat16)");
}

// Tier ids tensor `tiers` (int8, shape `shape`) checked and copied to the host; `lowest` is -1 where "leave as
// is" is allowed.
at::Tensor checked_tier_ids(const at::Tensor& tiers, const char* what, at::IntArrayRef shape, int lowest) {
  TORCH_CHECK_VALUE(tiers.scalar_type() == at::kChar, what, ": dtype ", c10::toString(tiers.scalar_type()),
                    " is not accepted; expected int8 tier ids");
  TORCH_CHECK_VALUE(tiers.sizes() == shape, what, ": shape ", tiers.sizes(), " is not accepted; expected ", shape);
  at::Tensor host = tiers.to(at::kCPU).contiguous();
  const int8_t* p = host.data_ptr<int8_t>();
  for (int64_t i = 0; i < host.numel(); ++i)
    TORCH_CHECK_VALUE(p[i] >= lowest && p[i] < kNumTiers, what, ": value ", static_cast<int>(p[i]),
                      " is not accepted; tier ids are ", lowest, "..5",
                      lowest < 0 ? " (-1 = leave as is; " : " (", "0 fp32, 1 fp16, 2 bf16, 3 int8, 4 int4, 5 int2)");
  return host;
}

// Page ids as a host int64 tensor (quantize_append range-checks host pages, and uploads them without blocking).
at::Tensor host_pages(const std::vector<int64_t>& v) { return at::tensor(v, at::TensorOptions().dtype(at::kLong)); }

// A host copy of a [B, H, T, D] block in the model dtype (the shadow), whatever the source's layout.
at::Tensor host_copy(const at::Tensor& src) {
  return at::empty(src.sizes(), src.options().device(at::kCPU)).copy_(src);
}

}  // namespace

void MixedPrecisionBuffer::append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& seal_tiers) {
  check_kv(k, "k", opts_);
  check_kv(v, "v", opts_);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "append: k ", k.sizes(), " and v ", v.sizes(), " must have the same shape");
  const int64_t n = k.size(2), bh = opts_.batch * opts_.kv_heads, T = opts_.block_size;
  const int64_t sealing = blocks_sealed_by(n);

  // Seal tiers as a host table [B*H, sealing] (row-major, as tiers[b, h, s]).
  std::vector<int8_t> tiers(bh * sealing, static_cast<int8_t>(opts_.default_tier));
  if (seal_tiers.defined()) {
    at::Tensor host = checked_tier_ids(seal_tiers, "seal_tiers", {opts_.batch, opts_.kv_heads, sealing}, 0);
    std::copy(host.data_ptr<int8_t>(), host.data_ptr<int8_t>() + host.numel(), tiers.begin());
  }

  State& st = *state_;
  const at::Tensor kk = k.to(opts_.device, opts_.dtype), vv = v.to(opts_.device, opts_.dtype);
  const int64_t tl = tail_len();
  if (sealing == 0) {
    st.tail_k.narrow(2, tl, n).copy_(kk);
    st.tail_v.narrow(2, tl, n).copy_(vv);
    seq_len_ += n;
    return;
  }
  // The first block sealed completes the tail when the tail holds tokens; the others are quantized straight from
  // k and v (views, no copy); what is left over becomes the new tail.
  const bool from_tail = tl > 0;
  const int64_t head = from_tail ? T - tl : 0, direct = sealing - (from_tail ? 1 : 0), rest = n - head - direct * T;
  if (from_tail) {  // slots past tail_len are not visible: a refused append still leaves the buffer as it was
    st.tail_k.narrow(2, tl, head).copy_(kk.narrow(2, 0, head));
    st.tail_v.narrow(2, tl, head).copy_(vv.narrow(2, 0, head));
  }
  at::Tensor kb, vb;
  if (direct > 0) {
    kb = kk.narrow(2, head, direct * T).unflatten(2, {direct, T});
    vb = vv.narrow(2, head, direct * T).unflatten(2, {direct, T});
  }
  seal_blocks(tiers, sealing, from_tail, kb, vb);  // throws before committing anything
  if (rest > 0) {  // after the seal read the tail (stream order on a GPU)
    st.tail_k.narrow(2, 0, rest).copy_(kk.narrow(2, n - rest, rest));
    st.tail_v.narrow(2, 0, rest).copy_(vv.narrow(2, n - rest, rest));
  }
  seq_len_ += n;
}

void MixedPrecisionBuffer::seal_blocks(const std::vector<int8_t>& tiers, int64_t count, bool from_tail,
                                       const at::Tensor& kb, const at::Tensor& vb) {
  State& st = *state_;
  const int64_t B = opts_.batch, H = opts_.kv_heads, bh = B * H, T = opts_.block_size, D = opts_.head_dim;
  const int64_t G = opts_.group_size, direct = count - (from_tail ? 1 : 0);
  const BlockGeometry g = geometry();

  // Pages are taken block by block, tier by tier, as sealing one block at a time took them (same pages, same
  // pool growth). The pools are saved first (tensor handles and free lists) and put back if anything fails.
  const std::array<Pool, kNumTiers> saved = st.pools;
  std::vector<int32_t> page(count * bh);  // (block s, row r) at s * bh + r
  std::array<bool, kNumTiers> present{};
  for (int64_t s = 0; s < count; ++s) {
    RowsByTier rows;
    for (int64_t r = 0; r < bh; ++r) rows[tiers[r * count + s]].push_back(r);
    for (Tier tier : kAllTiers) {
      const auto& rr = rows[tier_index(tier)];
      if (rr.empty()) continue;
      present[tier_index(tier)] = true;
      const std::vector<int32_t> got =
          allocate(st.pool(tier), tier, g, opts_.device, static_cast<int64_t>(rr.size()));
      for (size_t q = 0; q < rr.size(); ++q) page[s * bh + rr[q]] = got[q];
    }
  }

  // Integer tiers (FP16 scales) and FP16 storage of a wider model dtype need finite values with |x| <= 65504:
  // their calls raise amax (keys, values of the block completing the tail; keys, values read straight from the
  // input), read once below. Other tiers store any value.
  const bool wide = opts_.dtype != at::kHalf;
  auto needs_range = [wide](Tier t) { return tier_is_integer(t) || (wide && t == Tier::FP16); };
  bool checked = false;
  for (Tier tier : kAllTiers) checked = checked || (present[tier_index(tier)] && needs_range(tier));
  try {
    const at::Tensor amax =
        checked ? at::zeros({4}, at::TensorOptions().dtype(at::kFloat).device(opts_.device)) : at::Tensor();
    for (Tier tier : kAllTiers) {
      if (!present[tier_index(tier)]) continue;
      const PoolView& p = st.pool(tier).t;
      auto slot = [&](int64_t i) { return needs_range(tier) ? amax.narrow(0, i, 1) : at::Tensor(); };
      // pages: this tier's page of each block, -1 where the row is held at another tier (skipped by the kernel)
      if (from_tail) {
        std::vector<int64_t> pg(bh);
        for (int64_t r = 0; r < bh; ++r) pg[r] = tiers[r * count] == static_cast<int8_t>(tier) ? page[r] : -1;
        const at::Tensor pages = host_pages(pg);
        quantize_append(st.tail_k.view({bh, T, D}), tier, true, G, pages, p.k, p.k_scale, p.k_zero, slot(0));
        quantize_append(st.tail_v.view({bh, T, D}), tier, false, G, pages, p.v, p.v_scale, p.v_zero, slot(1));
      }
      if (direct > 0) {
        const int64_t s0 = from_tail ? 1 : 0;
        std::vector<int64_t> pg(bh * direct);
        for (int64_t r = 0; r < bh; ++r)
          for (int64_t j = 0; j < direct; ++j)
            pg[r * direct + j] =
                tiers[r * count + s0 + j] == static_cast<int8_t>(tier) ? page[(s0 + j) * bh + r] : -1;
        const at::Tensor pages = host_pages(pg).view({B, H, direct});
        quantize_append(kb, tier, true, G, pages, p.k, p.k_scale, p.k_zero, slot(2));
        quantize_append(vb, tier, false, G, pages, p.v, p.v_scale, p.v_zero, slot(3));
      }
    }
    if (checked) {
      const at::Tensor host = amax.to(at::kCPU);  // the one synchronisation of this append
      static const char* names[4] = {"k (with the tail keys it completes)", "v (with the tail values it completes)",
                                     "k", "v"};
      for (int i = 0; i < 4; ++i) {
        const float m = host.data_ptr<float>()[i];
        const char* name = names[i];
        TORCH_CHECK_VALUE(std::isfinite(m) && m <= 65504.0f, "append: ", name,
                          " would be sealed at an integer tier (FP16 scales) or the fp16 tier, which need finite "
                          "values with |x| <= 65504; got max |x| = ", m);
      }
    }
  } catch (...) {
    st.pools = saved;  // the pages taken above go back, pool growth included
    throw;
  }

  // Commit: block table, shadow, block count.
  const int64_t j0 = num_blocks_;
  st.table_tier.resize((j0 + count) * bh);
  st.table_page.resize((j0 + count) * bh);
  for (int64_t s = 0; s < count; ++s)
    for (int64_t r = 0; r < bh; ++r) {
      st.table_tier[(j0 + s) * bh + r] = tiers[r * count + s];
      st.table_page[(j0 + s) * bh + r] = page[s * bh + r];
    }
  if (opts_.shadow)
    for (int64_t s = 0; s < count; ++s) {
      const bool tail = from_tail && s == 0;
      const int64_t j = s - (from_tail ? 1 : 0);
      st.shadow_k.push_back(host_copy(tail ? st.tail_k : kb.select(2, j)));
      st.shadow_v.push_back(host_copy(tail ? st.tail_v : vb.select(2, j)));
    }
  num_blocks_ += count;
}

// ------------------------------------------------------------------------------------------------------
// Reading

namespace {

// A block-major host table (entry (j, r) at j * rows + r, r = b * H + h) as a [B, H, nb] CPU tensor.
template <typename T>
at::Tensor table_as_bhn(const std::vector<T>& table, int64_t B, int64_t H, int64_t nb, at::ScalarType dtype) {
  at::Tensor out = at::empty({B, H, nb}, dtype);
  T* p = out.data_ptr<T>();
  for (int64_t r = 0; r < B * H; ++r)
    for (int64_t j = 0; j < nb; ++j) p[r * nb + j] = table[j * B * H + r];
  return out;
}

}  // namespace

at::Tensor MixedPrecisionBuffer::tiers() const {
  return table_as_bhn(state_->table_tier, opts_.batch, opts_.kv_heads, num_blocks_, at::kChar);
}

at::Tensor MixedPrecisionBuffer::pages() const {
  return table_as_bhn(state_->table_page, opts_.batch, opts_.kv_heads, num_blocks_, at::kInt);
}

PoolView MixedPrecisionBuffer::pool(Tier tier) const { return state_->pool(tier).t; }

at::Tensor MixedPrecisionBuffer::tail_keys() const { return state_->tail_k.narrow(2, 0, tail_len()); }
at::Tensor MixedPrecisionBuffer::tail_values() const { return state_->tail_v.narrow(2, 0, tail_len()); }

// Block j's pages of rows `rows` (flat b * H + h, all held at `tier`), dequantized to `dtype` on the buffer's
// device: K and V [rows, T, D] in the order of `rows`.
std::pair<at::Tensor, at::Tensor> MixedPrecisionBuffer::dequantize_rows(int64_t j, Tier tier,
                                                                        const std::vector<int64_t>& rows,
                                                                        at::ScalarType dtype) const {
  const int64_t bh = opts_.batch * opts_.kv_heads;
  std::vector<int64_t> pages(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) pages[i] = state_->table_page[j * bh + rows[i]];
  const auto [qk, qv] = read_pages(state_->pool(tier), tier, index_tensor(pages, opts_.device));
  return {dequantize_keys(qk, tier, opts_.head_dim, dtype).to(opts_.device),
          dequantize_values(qv, tier, opts_.head_dim, opts_.group_size, dtype).to(opts_.device)};
}

std::pair<at::Tensor, at::Tensor> MixedPrecisionBuffer::block(int64_t index, at::ScalarType dtype) const {
  TORCH_CHECK_VALUE(index >= 0 && index < num_blocks_, "block: index ", index, " is out of range; ", num_blocks_,
                    " sealed blocks");
  TORCH_CHECK_VALUE(index >= evicted_, "block: block ", index, " was evicted (blocks 0..", evicted_ - 1,
                    " are gone: they fell out of a sliding window); positions from ", evicted_ * opts_.block_size,
                    " on are held");
  if (dtype == at::ScalarType::Undefined) dtype = opts_.dtype;
  TORCH_CHECK_VALUE(is_float_model_dtype(dtype), "block: dtype ", c10::toString(dtype),
                    " is not accepted; expected float32, float16 or bfloat16");
  const int64_t B = opts_.batch, H = opts_.kv_heads, T = opts_.block_size, D = opts_.head_dim;
  const RowsByTier rows = rows_by_tier(state_->table_tier, index, B * H);
  const auto o = at::TensorOptions().dtype(dtype).device(opts_.device);
  at::Tensor k, v;
  for (Tier tier : kAllTiers) {
    const auto& r = rows[tier_index(tier)];
    if (r.empty()) continue;
    auto [dk, dv] = dequantize_rows(index, tier, r, dtype);
    if (static_cast<int64_t>(r.size()) == B * H) {  // one tier for the whole block (the usual case): no scatter
      k = dk;
      v = dv;
      break;
    }
    if (!k.defined()) {
      k = at::empty({B * H, T, D}, o);
      v = at::empty({B * H, T, D}, o);
    }
    const at::Tensor idx = index_tensor(r, opts_.device);
    k.index_copy_(0, idx, dk);
    v.index_copy_(0, idx, dv);
  }
  return {k.view({B, H, T, D}), v.view({B, H, T, D})};
}

std::pair<at::Tensor, at::Tensor> MixedPrecisionBuffer::shadow_block(int64_t index) const {
  TORCH_CHECK_VALUE(opts_.shadow, "shadow_block: this buffer keeps no host shadow (built with shadow=false)");
  TORCH_CHECK_VALUE(index >= evicted_ && index < num_blocks_, "shadow_block: index ", index, " is not accepted; held "
                    "sealed blocks are ", evicted_, "..", num_blocks_ - 1);
  return {state_->shadow_k[index].clone(), state_->shadow_v[index].clone()};
}

std::pair<at::Tensor, at::Tensor> MixedPrecisionBuffer::gather(int64_t start, int64_t end) const {
  TORCH_CHECK_VALUE(0 <= start && start <= end && end <= seq_len_, "gather: range [", start, ", ", end,
                    ") is not accepted; expected 0 <= start <= end <= seq_len = ", seq_len_);
  const int64_t T = opts_.block_size;
  TORCH_CHECK_VALUE(start == end || start >= evicted_ * T, "gather: range [", start, ", ", end, ") reaches evicted "
                    "positions: blocks 0..", evicted_ - 1, " fell out of a sliding window; positions from ",
                    evicted_ * T, " on are held");
  std::vector<at::Tensor> ks, vs;
  const int64_t sealed_end = std::min(end, num_blocks_ * T);
  for (int64_t j = start / T; j * T < sealed_end; ++j) {
    const int64_t lo = std::max(start, j * T), hi = std::min(sealed_end, (j + 1) * T);
    auto [k, v] = block(j);
    ks.push_back(k.narrow(2, lo - j * T, hi - lo));
    vs.push_back(v.narrow(2, lo - j * T, hi - lo));
  }
  if (end > num_blocks_ * T) {
    const int64_t lo = std::max(start, num_blocks_ * T) - num_blocks_ * T, hi = end - num_blocks_ * T;
    ks.push_back(state_->tail_k.narrow(2, lo, hi - lo));
    vs.push_back(state_->tail_v.narrow(2, lo, hi - lo));
  }
  if (ks.empty()) {
    const auto o = at::TensorOptions().dtype(opts_.dtype).device(opts_.device);
    return {at::empty({opts_.batch, opts_.kv_heads, 0, opts_.head_dim}, o),
            at::empty({opts_.batch, opts_.kv_heads, 0, opts_.head_dim}, o)};
  }
  return {at::cat(ks, 2), at::cat(vs, 2)};
}

// ------------------------------------------------------------------------------------------------------
// Re-tiering, crop, batch selection, reset

void MixedPrecisionBuffer::set_block_tiers(int64_t index, const at::Tensor& tiers) {
  TORCH_CHECK_VALUE(index >= 0 && index < num_blocks_, "set_block_tiers: index ", index, " is out of range; ",
                    num_blocks_, " sealed blocks");
  TORCH_CHECK_VALUE(tiers.defined(), "set_block_tiers: tiers is undefined; expected int8 [B, H]");
  const at::Tensor host = checked_tier_ids(tiers, "set_block_tiers: tiers", {opts_.batch, opts_.kv_heads}, -1);
  State& st = *state_;
  const int64_t bh = opts_.batch * opts_.kv_heads, T = opts_.block_size, D = opts_.head_dim;
  const int8_t* want = host.data_ptr<int8_t>();
  if (index < evicted_) {
    for (int64_t r = 0; r < bh; ++r)
      TORCH_CHECK_VALUE(want[r] < 0, "set_block_tiers: block ", index, " was evicted (blocks 0..", evicted_ - 1,
                        " fell out of a sliding window); it has no tier to change (pass -1 for its rows)");
    return;
  }

  // Rows that change, by target tier. Tier ids are ordered by precision (effective bits 24, 11, 8, 7.99,
  // 3.91, 1.58), so a smaller id is a promotion, which only the shadow can serve.
  RowsByTier moves;
  for (int64_t r = 0; r < bh; ++r) {
    const int8_t from = st.table_tier[index * bh + r], to = want[r];
    if (to < 0 || to == from) continue;
    TORCH_CHECK(to > from || opts_.shadow, "set_block_tiers: block ", index, ", batch row ", r / opts_.kv_heads,
                ", head ", r % opts_.kv_heads, " is held at ", tier_name(static_cast<Tier>(from)), "; promoting it to ",
                tier_name(static_cast<Tier>(to)),
                " needs a higher-precision copy and none is held (the bits lost in demotion are not restored; "
                "keep a host shadow with shadow=true to allow promotion)");
    moves[to].push_back(r);
  }

  // Source of every moving row: the shadow (model dtype) when kept, else the current page dequantized to FP32.
  // All sources are read and all new pages quantized before any page is released or written.
  struct Move { Tier tier; std::vector<int64_t> rows; QuantizedBlock qk, qv; };
  std::vector<Move> done;
  for (Tier to : kAllTiers) {
    const auto& rows = moves[tier_index(to)];
    if (rows.empty()) continue;
    const int64_t n = static_cast<int64_t>(rows.size());
    at::Tensor sk, sv;
    if (opts_.shadow) {
      const at::Tensor idx = index_tensor(rows, at::kCPU);
      sk = st.shadow_k[index].reshape({bh, T, D}).index_select(0, idx);
      sv = st.shadow_v[index].reshape({bh, T, D}).index_select(0, idx);
    } else {
      const auto o = at::TensorOptions().dtype(at::kFloat).device(opts_.device);
      sk = at::empty({n, T, D}, o);
      sv = at::empty({n, T, D}, o);
      RowsByTier by_from;  // the moving rows grouped by the tier they are held at now, and their positions
      RowsByTier pos;
      for (int64_t i = 0; i < n; ++i) {
        const int8_t from = st.table_tier[index * bh + rows[i]];
        by_from[from].push_back(rows[i]);
        pos[from].push_back(i);
      }
      for (Tier from : kAllTiers) {
        if (by_from[tier_index(from)].empty()) continue;
        const auto [dk, dv] = dequantize_rows(index, from, by_from[tier_index(from)], at::kFloat);
        const at::Tensor dst = index_tensor(pos[tier_index(from)], opts_.device);
        sk.index_copy_(0, dst, dk);
        sv.index_copy_(0, dst, dv);
      }
    }
    done.push_back({to, rows, quantize_keys(sk, to), quantize_values(sv, to, opts_.group_size)});
  }

  for (const Move& m : done)
    for (int64_t r : m.rows) {
      const int64_t e = index * bh + r;
      release_entry(st.pools, st.table_tier, st.table_page, e);
    }
  for (const Move& m : done) st.place(index, bh, m.tier, m.rows, m.qk, m.qv, geometry(), opts_.device);
}

void MixedPrecisionBuffer::crop(int64_t new_len) {
  TORCH_CHECK_VALUE(new_len >= 0, "crop: new_len ", new_len, " is not accepted; expected >= 0 (positions to keep)");
  if (new_len >= seq_len_) return;
  State& st = *state_;
  const int64_t T = opts_.block_size, bh = opts_.batch * opts_.kv_heads;
  const int64_t keep = new_len / T, rem = new_len % T;
  TORCH_CHECK_VALUE(rem == 0 || keep >= evicted_, "crop: new_len ", new_len, " would make block ", keep,
                    " the tail again, but blocks 0..", evicted_ - 1, " were evicted (they fell out of a sliding "
                    "window); positions from ", evicted_ * T, " on are held");
  if (keep < num_blocks_) {
    if (rem > 0) {  // block `keep` becomes the tail again: exact from the shadow, else dequantized (lossy)
      at::Tensor k, v;
      if (opts_.shadow) {
        k = st.shadow_k[keep].to(opts_.device);
        v = st.shadow_v[keep].to(opts_.device);
      } else {
        std::tie(k, v) = block(keep);
      }
      st.tail_k.narrow(2, 0, rem).copy_(k.narrow(2, 0, rem));
      st.tail_v.narrow(2, 0, rem).copy_(v.narrow(2, 0, rem));
    }
    for (int64_t e = keep * bh; e < num_blocks_ * bh; ++e) release_entry(st.pools, st.table_tier, st.table_page, e);
    st.table_tier.resize(keep * bh);
    st.table_page.resize(keep * bh);
    if (opts_.shadow) {
      st.shadow_k.resize(keep);
      st.shadow_v.resize(keep);
    }
    num_blocks_ = keep;
    evicted_ = std::min(evicted_, keep);
  }
  seq_len_ = new_len;
}

void MixedPrecisionBuffer::evict_blocks(int64_t count) {
  TORCH_CHECK_VALUE(count >= 0 && count <= num_blocks_, "evict_blocks: count ", count,
                    " is not accepted; expected 0..", num_blocks_, " (sealed blocks; the tail cannot be evicted)");
  if (count <= evicted_) return;
  State& st = *state_;
  const int64_t bh = opts_.batch * opts_.kv_heads;
  for (int64_t e = evicted_ * bh; e < count * bh; ++e) {
    release_entry(st.pools, st.table_tier, st.table_page, e);
    st.table_tier[e] = kEvictedTier;
    st.table_page[e] = -1;
  }
  if (opts_.shadow)
    for (int64_t j = evicted_; j < count; ++j) {
      st.shadow_k[j] = at::Tensor();
      st.shadow_v[j] = at::Tensor();
    }
  evicted_ = count;
}

void MixedPrecisionBuffer::index_batch(const at::Tensor& idx) {
  TORCH_CHECK_VALUE(idx.defined() && idx.dim() == 1 && (idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt),
                    "index_batch: idx must be a 1-D int64 (or int32) tensor of batch rows, got ",
                    idx.defined() ? c10::toString(idx.scalar_type()) : "undefined", " ",
                    idx.defined() ? idx.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(idx.numel() >= 1, "index_batch: idx is empty; expected at least one batch row");
  const at::Tensor host = idx.to(at::kCPU).to(at::kLong).contiguous();
  const int64_t* rows = host.data_ptr<int64_t>();
  const int64_t B = opts_.batch, H = opts_.kv_heads, nb = num_blocks_, nB = host.numel();
  for (int64_t i = 0; i < nB; ++i)
    TORCH_CHECK_VALUE(rows[i] >= 0 && rows[i] < B, "index_batch: idx[", i, "] = ", rows[i],
                      " is out of range; batch rows are 0..", B - 1);
  State& st = *state_;

  // Every kept (row, head, block) gets a fresh page holding a copy of its source page: pages are never shared,
  // so re-tiering one row later cannot change another. New pages are taken before old ones are released.
  std::vector<int8_t> new_tier(nb * nB * H);
  std::vector<int32_t> new_page(nb * nB * H);
  std::array<std::vector<int64_t>, kNumTiers> src_pages, dst_entries;
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t b = 0; b < nB; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t old_e = (j * B + rows[b]) * H + h, new_e = (j * nB + b) * H + h;
        const int8_t t = st.table_tier[old_e];
        new_tier[new_e] = t;
        if (t == kEvictedTier) {
          new_page[new_e] = -1;
          continue;
        }
        src_pages[t].push_back(st.table_page[old_e]);
        dst_entries[t].push_back(new_e);
      }
  for (Tier tier : kAllTiers) {
    const auto& src = src_pages[tier_index(tier)];
    if (src.empty()) continue;
    Pool& pool = st.pool(tier);
    const std::vector<int32_t> fresh =
        allocate(pool, tier, geometry(), opts_.device, static_cast<int64_t>(src.size()));
    const at::Tensor from = index_tensor(src, opts_.device), to = index_tensor(fresh, opts_.device);
    for (at::Tensor* t : {&pool.t.k, &pool.t.k_scale, &pool.t.k_zero, &pool.t.v, &pool.t.v_scale, &pool.t.v_zero})
      if (t->defined()) t->index_copy_(0, to, t->index_select(0, from));
    for (size_t i = 0; i < fresh.size(); ++i) new_page[dst_entries[tier_index(tier)][i]] = fresh[i];
  }
  for (int64_t e = 0; e < nb * B * H; ++e) release_entry(st.pools, st.table_tier, st.table_page, e);
  st.table_tier = std::move(new_tier);
  st.table_page = std::move(new_page);

  const at::Tensor dev_idx = host.to(opts_.device);
  st.tail_k = st.tail_k.index_select(0, dev_idx);
  st.tail_v = st.tail_v.index_select(0, dev_idx);
  for (auto* shadow : {&st.shadow_k, &st.shadow_v})
    for (at::Tensor& s : *shadow)
      if (s.defined()) s = s.index_select(0, host);  // evicted blocks hold no shadow
  opts_.batch = nB;
}

void MixedPrecisionBuffer::reset() {
  State& st = *state_;
  for (Pool& p : st.pools) {  // every page free; the capacity stays reserved
    p.high = 0;
    p.free.clear();
  }
  st.table_tier.clear();
  st.table_page.clear();
  st.shadow_k.clear();
  st.shadow_v.clear();
  seq_len_ = 0;
  num_blocks_ = 0;
  evicted_ = 0;
}

// ------------------------------------------------------------------------------------------------------
// Memory

MemoryReport MixedPrecisionBuffer::memory() const {
  const State& st = *state_;
  const BlockGeometry g = geometry();
  const int64_t B = opts_.batch, H = opts_.kv_heads, T = opts_.block_size, D = opts_.head_dim;
  const int64_t elem = static_cast<int64_t>(c10::elementSize(opts_.dtype));
  MemoryReport m;
  for (Tier t : kAllTiers) {
    const Pool& p = st.pool(t);
    m.tier_pages[tier_index(t)] = p.live();
    m.tier_bytes[tier_index(t)] = p.live() * g.page_bytes(t);
    m.reserved_bytes += p.capacity * g.page_bytes(t);
  }
  m.tail_bytes = 2 * B * H * T * D * elem;
  m.table_bytes = B * H * num_blocks_ * static_cast<int64_t>(sizeof(int8_t) + sizeof(int32_t));
  m.shadow_bytes = opts_.shadow ? (num_blocks_ - evicted_) * 2 * B * H * T * D * elem : 0;
  m.tokens = seq_len_;
  m.elements = B * H * (seq_len_ - evicted_ * T) * D * 2;  // held positions: evicted ones are not stored
  return m;
}

}  // namespace kvprec
