// CPU quantizers: see kvprec/quantize.h for the algorithm and the error bound. The inner loops work on
// FP32 arrays; the FP16 rounding uses c10::Half (round to nearest even, as torch's .half()).
// Compiled with -ffp-contract=off: x' = code * scale + zero must be two roundings, as in the torch reference.
#include "kvprec/quantize.h"

#include "kvprec/cpu_kernels.h"
#include "kvprec/cpu_quantize_loops.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace kvprec {
namespace {

constexpr float kFp16Max = 65504.0f;

c10::Half half_from_bits(uint16_t bits) { return c10::Half(bits, c10::Half::from_bits()); }

// Largest FP16 value <= x.
c10::Half fp16_round_down(float x) {
  c10::Half h(x);
  if (static_cast<float>(h) > x) {
    uint16_t b = h.x;
    if (b == 0x0000 || b == 0x8000) b = 0x8001;  // +-0 -> the negative subnormal nearest zero
    else if (b & 0x8000) b = static_cast<uint16_t>(b + 1);  // negative: one step away from zero
    else b = static_cast<uint16_t>(b - 1);
    h = half_from_bits(b);
  }
  return h;
}

// Smallest FP16 value >= x.
c10::Half fp16_round_up(float x) {
  c10::Half h(x);
  if (static_cast<float>(h) < x) {
    uint16_t b = h.x;
    if (b == 0x0000 || b == 0x8000) b = 0x0001;
    else if (b & 0x8000) b = static_cast<uint16_t>(b - 1);  // negative: one step toward zero
    else b = static_cast<uint16_t>(b + 1);
    h = half_from_bits(b);
  }
  return h;
}

// FP16 zero (min rounded down) and scale ((max - zero) / qmax rounded up) of one group, and their FP32 values.
inline void group_scale_zero(float mn, float mx, int qmax, c10::Half* scale, c10::Half* zero, float* sf, float* zf) {
  mn = mn + 0.0f;  // -0 -> +0: the stored bits must not depend on which zero came first
  mx = mx + 0.0f;
  const c10::Half z = fp16_round_down(mn);
  *zf = static_cast<float>(z);
  const c10::Half sh = fp16_round_up((mx - *zf) / static_cast<float>(qmax));
  *sf = static_cast<float>(sh);
  *scale = sh;
  *zero = z;
}

// The code of one value: encode_one of kvprec/cpu_quantize_loops.h (included above; this file's baseline build).

// One quantization group of n values x[i * stride]; codes written to codes[i * stride] (unpacked).
void quantize_group(const float* x, int64_t n, int64_t stride, int qmax, uint8_t* codes, c10::Half* scale,
                    c10::Half* zero) {
  float mn = std::numeric_limits<float>::infinity(), mx = -mn;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i * stride];
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  float sf, zf;
  group_scale_zero(mn, mx, qmax, scale, zero, &sf, &zf);
  for (int64_t i = 0; i < n; ++i) codes[i * stride] = encode_one(x[i * stride], zf, sf, static_cast<float>(qmax));
}

at::Tensor checked_fp32(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 3, what, ": expected a [N, T, D] tensor, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), what, ": expected a floating dtype (float32, float16, bfloat16), got ",
              x.scalar_type());
  at::Tensor xf = x.to(at::kCPU).to(at::kFloat).contiguous();
  if (xf.numel() > 0) {
    const float amax = xf.abs().max().item<float>();
    TORCH_CHECK(std::isfinite(amax) && amax <= kFp16Max, what,
                ": integer tiers store FP16 scales, so values must be finite with |x| <= 65504; got max |x| = ",
                amax);
  }
  return xf;
}

void check_integer_tier(Tier tier, const char* what) {
  TORCH_CHECK(tier_is_integer(tier), what, ": tier ", tier_name(tier), " is a float tier here; expected int8, int4 or int2");
}

}  // namespace

at::Tensor store_float(const at::Tensor& x, Tier tier, const char* what) {
  // FP16 storage of a wider dtype (FP32, BF16) must not turn |x| > 65504 into inf: refuse it, as the integer
  // tiers do. BF16 and FP32 storage cover every finite input.
  if (tier == Tier::FP16 && x.scalar_type() != at::kHalf && x.numel() > 0) {
    const float amax = x.abs().max().to(at::kFloat).item<float>();
    TORCH_CHECK_VALUE(!(amax > kFp16Max), what, ": the fp16 tier holds |x| <= 65504; got max |x| = ", amax);
  }
  return x.to(tier_float_dtype(tier), /*non_blocking=*/false, /*copy=*/true).contiguous();
}

at::ScalarType tier_float_dtype(Tier tier) {
  switch (tier) {
    case Tier::FP32: return at::kFloat;
    case Tier::FP16: return at::kHalf;
    case Tier::BF16: return at::kBFloat16;
    default: TORCH_CHECK(false, "tier_float_dtype: ", tier_name(tier), " is an integer tier");
  }
}

at::Tensor pack_codes(const at::Tensor& codes, Tier tier) {
  check_integer_tier(tier, "pack_codes");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "pack_codes: codes must be uint8, got ", codes.scalar_type());
  const int per_byte = tier_codes_per_byte(tier), bits = tier_bits(tier);
  const int64_t d = codes.size(-1);
  TORCH_CHECK(d % per_byte == 0, "pack_codes: last dimension ", d, " is not a multiple of ", per_byte);
  if (per_byte == 1) return codes.contiguous();
  at::Tensor c = codes.contiguous();
  auto out_sizes = c.sizes().vec();
  out_sizes.back() = d / per_byte;
  at::Tensor out = at::empty(out_sizes, c.options());
  const uint8_t* src = c.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t n_out = out.numel();
  for (int64_t j = 0; j < n_out; ++j) {
    uint8_t byte = 0;
    for (int i = 0; i < per_byte; ++i) byte |= static_cast<uint8_t>(src[j * per_byte + i] << (bits * i));
    dst[j] = byte;
  }
  return out;
}

at::Tensor unpack_codes(const at::Tensor& packed, Tier tier, int64_t head_dim) {
  check_integer_tier(tier, "unpack_codes");
  const int per_byte = tier_codes_per_byte(tier), bits = tier_bits(tier);
  TORCH_CHECK(packed.size(-1) * per_byte == head_dim, "unpack_codes: packed last dimension ", packed.size(-1),
              " does not hold head_dim ", head_dim, " codes of ", tier_name(tier));
  if (per_byte == 1) return packed.contiguous();
  // Vectorised over the whole tensor: code i of a byte is (byte >> (bits * i)) & (2^bits - 1).
  at::Tensor shifts = at::arange(per_byte, packed.options().dtype(at::kByte)) * bits;
  at::Tensor codes = at::bitwise_and(at::bitwise_right_shift(packed.unsqueeze(-1), shifts), (1 << bits) - 1);
  auto out_sizes = packed.sizes().vec();
  out_sizes.back() = head_dim;
  return codes.reshape(out_sizes);
}

QuantizedBlock quantize_keys(const at::Tensor& x, Tier tier) {
#ifdef KVPREC_WITH_CUDA
  if (x.is_cuda()) return quantize_keys_cuda(x, tier);
#endif
  if (!tier_is_integer(tier)) return {store_float(x, tier, "quantize_keys: x"), {}, {}};
  at::Tensor xf = checked_fp32(x, "quantize_keys: x");
  const int64_t n = xf.size(0), t = xf.size(1), d = xf.size(2);
  auto opts = xf.options();
  at::Tensor codes = at::empty({n, t, d}, opts.dtype(at::kByte));
  at::Tensor scale = at::empty({n, d}, opts.dtype(at::kHalf));
  at::Tensor zero = at::empty({n, d}, opts.dtype(at::kHalf));
  const float* px = xf.data_ptr<float>();
  uint8_t* pc = codes.data_ptr<uint8_t>();
  auto* ps = scale.data_ptr<at::Half>();
  auto* pz = zero.data_ptr<at::Half>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < d; ++c)  // one group = one channel over the block's positions (stride d)
      quantize_group(px + i * t * d + c, t, d, tier_qmax(tier), pc + i * t * d + c, ps + i * d + c, pz + i * d + c);
  return {pack_codes(codes, tier), scale, zero};
}

QuantizedBlock quantize_values(const at::Tensor& x, Tier tier, int64_t group_size) {
#ifdef KVPREC_WITH_CUDA
  if (x.is_cuda()) return quantize_values_cuda(x, tier, group_size);
#endif
  if (!tier_is_integer(tier)) return {store_float(x, tier, "quantize_values: x"), {}, {}};
  at::Tensor xf = checked_fp32(x, "quantize_values: x");
  const int64_t n = xf.size(0), t = xf.size(1), d = xf.size(2);
  TORCH_CHECK(group_size > 0 && d % group_size == 0, "quantize_values: group_size ", group_size,
              " must divide head_dim ", d);
  const int64_t groups = d / group_size;
  auto opts = xf.options();
  at::Tensor codes = at::empty({n, t, d}, opts.dtype(at::kByte));
  at::Tensor scale = at::empty({n, t, groups}, opts.dtype(at::kHalf));
  at::Tensor zero = at::empty({n, t, groups}, opts.dtype(at::kHalf));
  const float* px = xf.data_ptr<float>();
  uint8_t* pc = codes.data_ptr<uint8_t>();
  auto* ps = scale.data_ptr<at::Half>();
  auto* pz = zero.data_ptr<at::Half>();
  const int64_t rows = n * t;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g)  // one group = group_size consecutive channels of one token
      quantize_group(px + r * d + g * group_size, group_size, 1, tier_qmax(tier), pc + r * d + g * group_size,
                     ps + r * groups + g, pz + r * groups + g);
  return {pack_codes(codes, tier), scale, zero};
}

namespace {

// x'[i] = code[i] * scale[group(i)] + zero[group(i)] in FP32 for codes [N, T, D], as two separate ATen ops
// (a multiply, then an add: two roundings, exactly as the torch reference), clamped to the input contract
// |x| <= 65504 (so a cast to FP16 never overflows to inf), then one cast to dtype.
at::Tensor dequantize_impl(const QuantizedBlock& q, Tier tier, int64_t head_dim, at::ScalarType dtype, bool keys,
                           int64_t group_size) {
  if (!tier_is_integer(tier)) return q.codes.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor codes = unpack_codes(q.codes.to(at::kCPU), tier, head_dim).to(at::kFloat);
  TORCH_CHECK(codes.dim() == 3, "dequantize: codes must be [N, T, D*bits/8]");
  const int64_t n = codes.size(0), t = codes.size(1), d = head_dim;
  at::Tensor scale = q.scale.to(at::kCPU).to(at::kFloat), zero = q.zero.to(at::kCPU).to(at::kFloat);
  if (keys) {
    TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.size(1) == d, "dequantize_keys: scale must be [N, D]");
    return at::add(at::mul(codes, scale.unsqueeze(1)), zero.unsqueeze(1)).clamp_(-kFp16Max, kFp16Max).to(dtype);
  }
  const int64_t groups = d / group_size;
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == n && scale.size(1) == t && scale.size(2) == groups,
              "dequantize_values: scale must be [N, T, D/G]");
  at::Tensor y = at::add(at::mul(codes.view({n, t, groups, group_size}), scale.unsqueeze(-1)), zero.unsqueeze(-1));
  y.clamp_(-kFp16Max, kFp16Max);
  return y.view({n, t, d}).to(dtype);
}

}  // namespace

at::Tensor dequantize_keys(const QuantizedBlock& q, Tier tier, int64_t head_dim, at::ScalarType dtype) {
#ifdef KVPREC_WITH_CUDA
  if (q.codes.is_cuda()) return dequantize_keys_cuda(q, tier, head_dim, dtype);
#endif
  return dequantize_impl(q, tier, head_dim, dtype, /*keys=*/true, 0);
}

at::Tensor dequantize_values(const QuantizedBlock& q, Tier tier, int64_t head_dim, int64_t group_size,
                             at::ScalarType dtype) {
#ifdef KVPREC_WITH_CUDA
  if (q.codes.is_cuda()) return dequantize_values_cuda(q, tier, head_dim, group_size, dtype);
#endif
  if (tier_is_integer(tier))
    TORCH_CHECK(group_size > 0 && head_dim % group_size == 0, "dequantize_values: group_size ", group_size,
                " must divide head_dim ", head_dim);
  return dequantize_impl(q, tier, head_dim, dtype, /*keys=*/false, group_size);
}

// ------------------------------------------------------------------------------------------------------
// quantize_append (see kvprec/quantize.h)

namespace {

// The FP32 bit pattern of |v|: an integer max over these is a max of |v| that propagates NaN (NaN > inf).
inline uint32_t abs_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u & 0x7fffffffu;
}

std::string shape_str(std::vector<int64_t> v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

void check_append_args(const at::Tensor& x, Tier tier, bool keys, int64_t group_size, const at::Tensor& pages,
                       const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                       const at::Tensor& amax) {
  constexpr const char* what = "quantize_append";
  TORCH_CHECK_VALUE(x.defined() && x.dim() >= 3 && x.dim() <= 5, what,
                    ": x must be a [..., T, D] tensor with 1 to 3 leading dims, got shape ",
                    x.defined() ? x.sizes() : at::IntArrayRef{});
  const at::ScalarType xt = x.scalar_type();
  TORCH_CHECK_VALUE(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16, what, ": x has dtype ",
                    c10::toString(xt), "; expected float32, float16 or bfloat16");
  const int64_t t = x.size(-2), d = x.size(-1);
  if (tier_is_integer(tier)) {
    TORCH_CHECK_VALUE(d % tier_codes_per_byte(tier) == 0, what, ": head_dim ", d, " of x is not a multiple of ",
                      tier_codes_per_byte(tier), " (", tier_name(tier), " packs ", tier_codes_per_byte(tier),
                      " codes per byte)");
    TORCH_CHECK_VALUE(keys || (group_size > 0 && d % group_size == 0), what, ": group_size ", group_size,
                      " must divide head_dim ", d);
  }
  const at::IntArrayRef lead = x.sizes().slice(0, x.dim() - 2);
  TORCH_CHECK_VALUE(pages.defined() && (pages.scalar_type() == at::kInt || pages.scalar_type() == at::kLong) &&
                        pages.sizes() == lead,
                    what, ": pages must be int32 or int64 with shape x.shape[:-2] = ", lead, ", got ",
                    pages.defined() ? c10::toString(pages.scalar_type()) : "undefined", " ",
                    pages.defined() ? pages.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(pages.is_cpu() || pages.device() == x.device(), what, ": pages is on ", pages.device(),
                    "; expected the host or x's device ", x.device());
  const bool integer = tier_is_integer(tier);
  const int64_t width = integer ? tier_row_bytes(tier, d) : d;
  const at::ScalarType ct = integer ? at::kByte : tier_float_dtype(tier);
  TORCH_CHECK_VALUE(codes.defined() && codes.dim() == 3 && codes.size(1) == t && codes.size(2) == width &&
                        codes.scalar_type() == ct && codes.is_contiguous(),
                    what, ": codes must be a contiguous ", c10::toString(ct), " pool [P, ", t, ", ", width, "] for ",
                    tier_name(tier), " (block_size ", t, ", head_dim ", d, "), got ",
                    codes.defined() ? c10::toString(codes.scalar_type()) : "undefined", " ",
                    codes.defined() ? codes.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(codes.device() == x.device(), what, ": codes is on ", codes.device(), "; expected x's device ",
                    x.device());
  const int64_t p = codes.size(0);
  const std::vector<int64_t> meta =
      keys ? std::vector<int64_t>{p, d} : std::vector<int64_t>{p, t, d / std::max<int64_t>(group_size, 1)};
  for (auto [name, m] : {std::pair<const char*, const at::Tensor*>{"scale", &scale}, {"zero", &zero}}) {
    if (!integer) {
      TORCH_CHECK_VALUE(!m->defined() || m->numel() == 0, what, ": ", name,
                        " must be None (or empty) for the float tier ", tier_name(tier));
      continue;
    }
    TORCH_CHECK_VALUE(m->defined() && m->scalar_type() == at::kHalf && m->sizes() == at::IntArrayRef(meta) &&
                          m->is_contiguous() && m->device() == x.device(),
                      what, ": ", name, " must be a contiguous float16 ", shape_str(meta), " on ", x.device(),
                      keys ? " (keys: [P, D])" : " (values: [P, T, D/group_size])", ", got ",
                      m->defined() ? c10::toString(m->scalar_type()) : "undefined", " ",
                      m->defined() ? m->sizes() : at::IntArrayRef{});
  }
  TORCH_CHECK_VALUE(!amax.defined() || (amax.scalar_type() == at::kFloat && amax.numel() == 1 &&
                                        amax.device() == x.device()),
                    what, ": amax must be a float32 tensor of one element on ", x.device(), ", got ",
                    c10::toString(amax.scalar_type()), " ", amax.sizes(), " on ", amax.device());
  if (pages.is_cpu() && pages.numel() > 0) {
    const at::Tensor flat = pages.reshape({-1}).to(at::kLong).contiguous();
    const int64_t* pp = flat.data_ptr<int64_t>();
    for (int64_t i = 0; i < flat.numel(); ++i)
      TORCH_CHECK_VALUE(pp[i] < p, what, ": pages[", i, "] (flat index) = ", pp[i],
                        " is out of range; the pool holds ", p, " pages (a negative entry skips its block)");
  }
}

// Leading dims of x padded in front to three (size 1, stride 0): block i = (i0, i1, i2), row-major.
struct Lead {
  int64_t size[3] = {1, 1, 1};
  int64_t stride[3] = {0, 0, 0};
  explicit Lead(const at::Tensor& x) {
    const int64_t nl = x.dim() - 2;
    for (int64_t k = 0; k < nl; ++k) {
      size[3 - nl + k] = x.size(k);
      stride[3 - nl + k] = x.stride(k);
    }
  }
  int64_t count() const { return size[0] * size[1] * size[2]; }
  int64_t offset(int64_t i) const {
    const int64_t i2 = i % size[2], i1 = (i / size[2]) % size[1], i0 = i / (size[1] * size[2]);
    return i0 * stride[0] + i1 * stride[1] + i2 * stride[2];
  }
};

// A contiguous row of the input as FP32. FP16 uses c10's exact conversion (fp16_ieee_to_fp32_value), written on
// the bit patterns so that the loop vectorizes (c10::Half's operator float does not); BF16 is the upper half.
inline void row_to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void row_to_float(const c10::Half* src, float* dst, int64_t n) {
  const auto* h = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t w = static_cast<uint32_t>(h[i]) << 16;
    const uint32_t two_w = w + w;
    const float normalized = std::bit_cast<float>((two_w >> 4) + 0x70000000u) * 0x1.0p-112f;
    const float denormalized = std::bit_cast<float>((two_w >> 17) | 0x3F000000u) - 0.5f;
    const uint32_t tiny = 0u - static_cast<uint32_t>(two_w < (1u << 27));  // all ones for subnormals and zeros
    const uint32_t magnitude =
        (std::bit_cast<uint32_t>(denormalized) & tiny) | (std::bit_cast<uint32_t>(normalized) & ~tiny);
    dst[i] = std::bit_cast<float>((w & 0x80000000u) | magnitude);
  }
}

inline void row_to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* h = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(h[i]) << 16);
}

// min and max of n values in 8 independent lanes (the loop vectorizes), then the lanes combined. For finite
// values min / max do not depend on the order; only which of -0 / +0 comes out may, and group_scale_zero maps
// both to +0.
inline void min_max(const float* x, int64_t n, float* lo, float* hi) {
  constexpr int kLanes = 8;
  float l[kLanes], h[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    l[j] = std::numeric_limits<float>::infinity();
    h[j] = -std::numeric_limits<float>::infinity();
  }
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      l[j] = x[k + j] < l[j] ? x[k + j] : l[j];
      h[j] = x[k + j] > h[j] ? x[k + j] : h[j];
    }
  for (; k < n; ++k) {
    l[0] = x[k] < l[0] ? x[k] : l[0];
    h[0] = x[k] > h[0] ? x[k] : h[0];
  }
  for (int j = 1; j < kLanes; ++j) {
    l[0] = l[j] < l[0] ? l[j] : l[0];
    h[0] = h[j] > h[0] ? h[j] : h[0];
  }
  *lo = l[0];
  *hi = h[0];
}

template <typename out_t>
void store_tile(const std::vector<float>& tile, void* page) {
  out_t* o = static_cast<out_t*>(page);
  for (size_t e = 0; e < tile.size(); ++e) o[e] = static_cast<out_t>(tile[e]);  // c10::Half/BFloat16: nearest even
}

// One CPU pass per block, blocks in parallel (at::parallel_for): the [T, D] tile is read once into FP32 (the
// largest |x| bit pattern on the way), then
//   keys:   per-channel min / max row by row, then codes row by row (inner loops over contiguous channels);
//   values: per (token, group) min / max, then every group's codes;
// then the codes are packed straight into the page. The min / max and code loops run in the active CPU path's
// build (kvprec/cpu_quantize_loops.h: 8 or 16 lanes wide on AVX2 / AVX-512), the FP16 scale / zero here. The arithmetic is quantize_group's, so the pages are those of
// quantize_keys / quantize_values bit for bit; amax is reduced per block, then in block order.
template <typename in_t>
void append_cpu(const at::Tensor& x, Tier tier, bool keys, int64_t group_size, const int64_t* pages,
                const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, uint32_t* amax) {
  const Lead lead(x);
  const int64_t n = lead.count(), t = x.size(-2), d = x.size(-1), st = x.stride(-2), sd = x.stride(-1);
  const int64_t p = codes.size(0);
  const bool integer = tier_is_integer(tier);
  const int qmax = tier_qmax(tier), per = integer ? tier_codes_per_byte(tier) : 1;
  const float qmax_f = static_cast<float>(qmax);
  const int64_t page_elems = integer ? t * d / per : t * d;
  const int64_t groups = keys ? 1 : d / std::max<int64_t>(group_size, 1);
  const int64_t meta = keys ? d : t * groups;
  const in_t* px = x.const_data_ptr<in_t>();
  auto* pc = static_cast<char*>(codes.data_ptr());
  const int64_t page_bytes = page_elems * static_cast<int64_t>(codes.element_size());
  c10::Half* ps = integer ? scale.data_ptr<at::Half>() : nullptr;
  c10::Half* pz = integer ? zero.data_ptr<at::Half>() : nullptr;
  std::vector<uint32_t> block_amax(n, 0);
  const cpu::QuantizeLoops& L = cpu::quantize_loops();  // the active CPU path's build of the loops
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(t * d), mn(d), mx(d), sf(std::max(d, t * groups)), zf(sf.size());
    std::vector<uint8_t> unpacked(integer ? t * d : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t page = pages[i];
      if (page < 0 || page >= p) continue;
      const in_t* base = px + lead.offset(i);
      uint32_t m = 0;
      for (int64_t r = 0; r < t; ++r) {
        const in_t* row = base + r * st;
        float* out = tile.data() + r * d;
        if (sd == 1) {
          row_to_float(row, out, d);
        } else {
          for (int64_t c = 0; c < d; ++c) out[c] = static_cast<float>(row[c * sd]);
        }
        for (int64_t c = 0; c < d; ++c) m = std::max(m, abs_bits(out[c]));
      }
      block_amax[i] = m;
      void* dst = pc + page * page_bytes;
      if (!integer) {
        switch (tier) {
          case Tier::FP32: store_tile<float>(tile, dst); break;
          case Tier::FP16: store_tile<c10::Half>(tile, dst); break;
          default: store_tile<c10::BFloat16>(tile, dst); break;
        }
        continue;
      }
      c10::Half* s = ps + page * meta;
      c10::Half* z = pz + page * meta;
      if (keys) {
        L.keys_min_max(tile.data(), t, d, mn.data(), mx.data());
        for (int64_t c = 0; c < d; ++c) group_scale_zero(mn[c], mx[c], qmax, s + c, z + c, &sf[c], &zf[c]);
        L.encode_keys(tile.data(), t, d, zf.data(), sf.data(), qmax_f, unpacked.data());
      } else {
        for (int64_t e = 0; e < t * groups; ++e) {  // (token, group) e = r * groups + g
          float lo, hi;
          min_max(tile.data() + e * group_size, group_size, &lo, &hi);
          group_scale_zero(lo, hi, qmax, s + e, z + e, &sf[e], &zf[e]);
        }
        L.encode_values(tile.data(), t, d, group_size, zf.data(), sf.data(), qmax_f, unpacked.data());
      }
      auto* out = static_cast<uint8_t*>(dst);
      if (per == 1) std::memcpy(out, unpacked.data(), page_elems);
      else L.pack(unpacked.data(), page_elems, per, out);
    }
  });
  if (amax != nullptr)
    for (uint32_t m : block_amax) *amax = std::max(*amax, m);
}

}  // namespace

void quantize_append(const at::Tensor& x, Tier tier, bool keys, int64_t group_size, const at::Tensor& pages,
                     const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& amax) {
  check_append_args(x, tier, keys, group_size, pages, codes, scale, zero, amax);
  if (x.numel() == 0) return;
#ifdef KVPREC_WITH_CUDA
  if (x.is_cuda()) return quantize_append_cuda(x, tier, keys, group_size, pages, codes, scale, zero, amax);
#endif
  TORCH_CHECK_VALUE(x.is_cpu(), "quantize_append: x is on ", x.device(),
                    "; this build has CPU kernels only (build with KVPREC_CUDA for CUDA tensors)");
  const at::Tensor pg = pages.reshape({-1}).to(at::kLong).contiguous();
  uint32_t* am = amax.defined() ? reinterpret_cast<uint32_t*>(amax.data_ptr<float>()) : nullptr;
  const int64_t* pp = pg.data_ptr<int64_t>();
  switch (x.scalar_type()) {
    case at::kFloat: append_cpu<float>(x, tier, keys, group_size, pp, codes, scale, zero, am); break;
    case at::kHalf: append_cpu<c10::Half>(x, tier, keys, group_size, pp, codes, scale, zero, am); break;
    default: append_cpu<c10::BFloat16>(x, tier, keys, group_size, pp, codes, scale, zero, am);
  }
}

}  // namespace kvprec
