// Quantize / dequantize one or more blocks to a tier (CPU, ATen). Bit-identical to kvprec/ops/reference/quantize.py, the
// pure-torch reference; python_tests/test_formats.py checks that on awkward shapes.
//
// Algorithm for one quantization group g (keys: the T positions of one channel of a block; values: G
// consecutive channels of one token), with qmax = 2^bits - 1 and all arithmetic in FP32:
//   zero  = fp16_round_down(min g)                  so that zero <= every x
//   scale = fp16_round_up((max g - zero) / qmax)     so that zero + qmax * scale >= every x
//   code  = clamp(round_half_even((x - zero) / scale), 0, qmax)     (code = 0 where scale == 0)
//   x'    = clamp(code * scale + zero, -65504, 65504)  (a multiply then an add: no fused multiply-add; the
//           clamp keeps an FP16 cast finite and never moves x' away from x, since |x| <= 65504)
// Because the stored FP16 scale and zero cover [min, max], no code is clipped and
//   |x - x'| <= scale / 2  (plus the FP32 rounding of the two operations, <= 2^-23 * (|x| + scale)).
// Inputs must be finite and within the FP16 range (|x| <= 65504), since scale and zero are FP16.
#pragma once

#include <ATen/core/Tensor.h>

#include "kvprec/formats.h"

namespace kvprec {

struct QuantizedBlock {
  at::Tensor codes;  // integer tiers: uint8 packed codes [N, T, D*bits/8]; float tiers: data [N, T, D] in the tier dtype
  at::Tensor scale;  // integer tiers: FP16, keys [N, D], values [N, T, D/G]; float tiers: undefined
  at::Tensor zero;   // same shape as scale
};

// The torch dtype that a float tier stores; throws for integer tiers.
at::ScalarType tier_float_dtype(Tier tier);
// x stored at float tier `tier` (a copy). FP16 storage of a wider dtype refuses |x| > 65504 (it would be inf).
at::Tensor store_float(const at::Tensor& x, Tier tier, const char* what);

// keys x [N, T, D] (float dtype) -> codes, scale/zero per (n, channel).
QuantizedBlock quantize_keys(const at::Tensor& x, Tier tier);
// values x [N, T, D] -> codes, scale/zero per (n, token, group of group_size channels).
QuantizedBlock quantize_values(const at::Tensor& x, Tier tier, int64_t group_size);

// Back to `dtype`, shape [N, T, head_dim]. Dequantization computes x' in FP32, then casts once.
at::Tensor dequantize_keys(const QuantizedBlock& q, Tier tier, int64_t head_dim, at::ScalarType dtype);
at::Tensor dequantize_values(const QuantizedBlock& q, Tier tier, int64_t head_dim, int64_t group_size,
                             at::ScalarType dtype);

// Pack / unpack codes along the last axis: codes uint8 [..., D] in [0, qmax] <-> packed uint8 [..., D*bits/8].
at::Tensor pack_codes(const at::Tensor& codes, Tier tier);
at::Tensor unpack_codes(const at::Tensor& packed, Tier tier, int64_t head_dim);

// quantize_append: whole blocks quantized straight into the pages of a pool, in place (the buffer's seal path;
// no temporary block, no copy). Arguments (checked, errors name the argument):
//   x      [..., T, D] float32/float16/bfloat16 with 1 to 3 leading dims (N blocks, row-major), any strides;
//   pages  int32/int64 of shape x.shape[:-2], on the host or x's device: block i goes to page pages[i]; a
//          negative entry skips the block (not read, not written). Host pages must lie below P (checked);
//          device pages are not checked (that would synchronise): the kernels skip entries >= P.
//          Non-negative entries must be distinct.
//   codes  the pool's data: integer tiers uint8 [P, T, D*bits/8], float tiers [P, T, D] in the tier dtype;
//   scale, zero  integer tiers FP16, keys [P, D], values [P, T, D/group_size]; float tiers undefined (or empty);
//   amax   optional float32 with one element on x's device: amax = max(amax, max |x|) over the blocks written,
//          NaN-propagating (an integer max of the FP32 bit patterns of |x|: NaN > inf > finite). Start it at 0.
// A written page holds exactly what quantize_keys / quantize_values (or store_float) give for its block, as
// long as the block is finite with |x| <= 65504 (integer tiers); otherwise its bytes are unspecified and amax
// says so: the caller reads amax once, after any number of calls, and discards those pages. The fused check
// is why this needs at most one synchronisation per seal where quantize_keys + write_pages needed several.
void quantize_append(const at::Tensor& x, Tier tier, bool keys, int64_t group_size, const at::Tensor& pages,
                     const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& amax);

#ifdef KVPREC_WITH_CUDA
// CUDA kernels (csrc/cuda/), same formats bit for bit; the functions above dispatch to them for CUDA tensors.
QuantizedBlock quantize_keys_cuda(const at::Tensor& x, Tier tier);
QuantizedBlock quantize_values_cuda(const at::Tensor& x, Tier tier, int64_t group_size);
at::Tensor dequantize_keys_cuda(const QuantizedBlock& q, Tier tier, int64_t head_dim, at::ScalarType dtype);
at::Tensor dequantize_values_cuda(const QuantizedBlock& q, Tier tier, int64_t head_dim, int64_t group_size,
                                  at::ScalarType dtype);
// Arguments already checked by quantize_append (csrc/core/quantize.cpp).
void quantize_append_cuda(const at::Tensor& x, Tier tier, bool keys, int64_t group_size, const at::Tensor& pages,
                          const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                          const at::Tensor& amax);
#endif

}  // namespace kvprec
