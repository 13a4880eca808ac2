// CPU quantizers: see kvprec/quantize.h for the algorithm and the error bound. The inner loops work on
// FP32 arrays; the FP16 rounding uses c10::Half (round to nearest even, as torch's .half()).
// Compiled with -ffp-contract=off: x' = code * scale + zero must be two roundings, as in the torch reference.
#include "kvprec/quantize.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

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

// One quantization group of n values x[i * stride]; codes written to codes[i * stride] (unpacked).
void quantize_group(const float* x, int64_t n, int64_t stride, int qmax, uint8_t* codes, c10::Half* scale,
                    c10::Half* zero) {
  float mn = std::numeric_limits<float>::infinity(), mx = -mn;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i * stride];
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  mn = mn + 0.0f;  // -0 -> +0: the stored bits must not depend on which zero came first
  mx = mx + 0.0f;
  const c10::Half z = fp16_round_down(mn);
  const float zf = static_cast<float>(z);
  const float s = (mx - zf) / static_cast<float>(qmax);
  const c10::Half sh = fp16_round_up(s);
  const float sf = static_cast<float>(sh);
  for (int64_t i = 0; i < n; ++i) {
    float c = 0.0f;
    if (sf > 0.0f) {
      c = std::nearbyint((x[i * stride] - zf) / sf);
      c = c < 0.0f ? 0.0f : (c > static_cast<float>(qmax) ? static_cast<float>(qmax) : c);
    }
    codes[i * stride] = static_cast<uint8_t>(c);
  }
  *scale = sh;
  *zero = z;
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

}  // namespace kvprec
