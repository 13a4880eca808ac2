// BufferOptions in one call, for the C++ tests that build MixedPrecisionBuffers (test_buffer, test_attention).
#pragma once

#include "kvprec/buffer.h"

namespace kvprec_test {

// B batch rows, H KV heads, head_dim D, block_size T, default tier; G is the value quantization group.
inline kvprec::BufferOptions opts(int64_t B, int64_t H, int64_t D, int64_t T, kvprec::Tier tier,
                                  at::ScalarType dtype = at::kFloat, bool shadow = false, int64_t G = 32) {
  kvprec::BufferOptions o;
  o.batch = B;
  o.kv_heads = H;
  o.head_dim = D;
  o.block_size = T;
  o.group_size = G;
  o.dtype = dtype;
  o.default_tier = tier;
  o.shadow = shadow;
  return o;
}

}  // namespace kvprec_test
