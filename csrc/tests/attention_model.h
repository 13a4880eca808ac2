// What the CPU attention kernels compute for the scores, modelled with ATen for the C++ tests (kvprec/cpu_kernels.h
// states it): on the scalar path, and for float storage on every path, scale * q . k on the keys as attend reads them
// (FP32, dequantized); on the SIMD paths, integer keys are scored from their codes with the query quantized per page
// and row:
//   q' = q * ks (FP32), a = max |q'|, qs = a / QMAX, inv = QMAX / a (FP32), qi = round_half_even(q' * inv),
//   s_t = scale * (qs * sum_c qi_c code_tc + sum_c q_c kz_c),
// unless the page's scale / zero could reach the FP16 clamp (then as the scalar path). Also the contract's bound on
// how far such a score is from the score of the dequantized keys:
//   scale * (0.52 qs sum_c code_tc + (D + 8) 2^-23 sum_c |q_c| (|code_tc ks_c| + |kz_c|)).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "kvprec/buffer.h"
#include "kvprec/cpu_isa.h"
#include "kvprec/quantize.h"

namespace kvprec_test {

struct ModelScores {
  at::Tensor s;      // [B, Hq, Q, L] FP64: the scores the kernel computes (before softcap and masks)
  at::Tensor bound;  // [B, Hq, Q, L] FP64: |s - scale q . k_dequantized| <= bound (0 where exact up to FP32)
};

inline float key_qmax(kvprec::Tier t, int64_t D) {
  return t == kvprec::Tier::INT8 ? static_cast<float>(std::min<int64_t>(32767, 2147483647 / (255 * D))) : 127.0f;
}

// k [B, Hkv, L, D]: the keys as attend reads them (FP32); q [B, Hq, Q, D].
inline ModelScores model_scores(const kvprec::MixedPrecisionBuffer& buf, const at::Tensor& q, const at::Tensor& k,
                                double scale) {
  using namespace kvprec;
  const BufferOptions& o = buf.options();
  const int64_t B = o.batch, Hkv = o.kv_heads, D = o.head_dim, T = o.block_size, Hq = q.size(1), Q = q.size(2);
  const int64_t G = Hq / Hkv;
  const at::Tensor qf = q.to(at::kFloat), qd = q.to(at::kDouble);
  ModelScores m;
  m.s = at::matmul(qd, k.to(at::kDouble).repeat_interleave(G, 1).transpose(-1, -2)) * scale;
  m.bound = at::zeros_like(m.s);
  if (active_cpu_isa() == CpuIsa::Scalar) return m;
  const at::Tensor tiers = buf.tiers().contiguous(), pages = buf.pages().contiguous();
  const int64_t nb = buf.num_sealed_blocks();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t j = 0; j < nb; ++j) {
        const int8_t id = tiers.data_ptr<int8_t>()[(b * Hkv + h) * nb + j];
        if (id < 0 || !tier_is_integer(static_cast<Tier>(id))) continue;
        const Tier tier = static_cast<Tier>(id);
        const PoolView pool = buf.pool(tier);
        const int64_t page = pages.data_ptr<int32_t>()[(b * Hkv + h) * nb + j];
        const at::Tensor codes = unpack_codes(pool.k[page], tier, D).to(at::kDouble);  // [T, D]
        const at::Tensor ks = pool.k_scale[page].to(at::kFloat), kz = pool.k_zero[page].to(at::kFloat);
        const float qm = static_cast<float>(tier_qmax(tier));
        const float limit = 65504.0f * (1.0f - 0x1p-20f);
        if (!((kz.abs() + ks.abs() * qm) < limit).all().item<bool>()) continue;  // the clamp could bind: as scalar
        const float qmax = key_qmax(tier, D);
        const at::Tensor rows = qf[b].narrow(0, h * G, G).reshape({G * Q, D});  // [R, D]
        const at::Tensor qp = rows * ks;                                         // FP32 products
        const at::Tensor a = qp.abs().amax(1);
        at::Tensor qs = at::empty_like(a), inv = at::empty_like(a);
        for (int64_t r = 0; r < a.size(0); ++r) {  // FP32 scalar arithmetic, as the kernel
          const float ar = a.data_ptr<float>()[r];
          qs.data_ptr<float>()[r] = ar / qmax;
          inv.data_ptr<float>()[r] = ar > 0.0f ? qmax / ar : 0.0f;
        }
        const at::Tensor qi = at::round(qp * inv.unsqueeze(1)).to(at::kDouble);  // half to even
        const at::Tensor s = (qs.to(at::kDouble).unsqueeze(1) * at::matmul(qi, codes.t()) +
                              at::matmul(rows.to(at::kDouble), kz.to(at::kDouble)).unsqueeze(1)) * scale;
        const at::Tensor kd = codes * ks.to(at::kDouble);  // |code ks|
        const at::Tensor fp = at::matmul(rows.abs().to(at::kDouble), (kd.abs() + kz.abs().to(at::kDouble)).t());
        const at::Tensor bound = (0.52 * qs.to(at::kDouble).unsqueeze(1) * codes.sum(1).unsqueeze(0) +
                                  (D + 8) * std::ldexp(1.0, -23) * fp) * scale;
        m.s[b].narrow(0, h * G, G).narrow(2, j * T, T).copy_(s.view({G, Q, T}));
        m.bound[b].narrow(0, h * G, G).narrow(2, j * T, T).copy_(bound.view({G, Q, T}));
      }
  return m;
}

}  // namespace kvprec_test
