// attend(): attention of Q queries over a MixedPrecisionBuffer, one block at a time (flash-decoding style),
// in FP32. A buffer on the CPU goes to the fused kernel of attention_cpu.cpp (same math, no ATen op per block);
// on another device (a CUDA buffer read without the CUDA kernels) the ATen loop below runs. Both are what the
// fused GPU kernels are checked against.
//
// Layout: the Hq = Hkv * G query heads are grouped under their KV head without repeating K/V:
//   q [B, Hq, Q, D] -> [B, Hkv, G*Q, D], row r = g * Q + i (query head hkv * G + g, query i),
// so each block is one batched matmul [B, Hkv, G*Q, D] x [B, Hkv, D, T].
//
// Per chunk c (sealed block c, then the tail), with running max m, sum l and accumulator acc per row:
//   s     = scale * q k^T;  s = softcap * tanh(s / softcap) if softcap > 0;  s = -inf where masked
//   m'    = max(m, max_t s);  ref = m' (0 while m' = -inf, so that exp never sees -inf - -inf)
//   l     = l * exp(m - ref) + sum_t exp(s - ref);   acc = acc * exp(m - ref) + exp(s - ref) v
// and at the end out = acc / l, lse = m + log l. Block mass (softmax probability of chunk c) is
//   mass_c = sum_t exp(s - ref_c) * exp(ref_c - m) / l,
// which needs only the per-chunk sums and references kept on the way.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "kvprec/buffer.h"

namespace kvprec {
namespace detail {
// attention_cpu.cpp: the fused CPU kernel, for arguments already checked here.
AttentionResult attend_cpu(const MixedPrecisionBuffer& buffer, const at::Tensor& q, const at::Tensor& mask,
                           const AttentionOptions& options);
}  // namespace detail

AttentionResult attend(const MixedPrecisionBuffer& buffer, const at::Tensor& q, const at::Tensor& mask,
                       const AttentionOptions& options) {
  const BufferOptions& bo = buffer.options();
  const int64_t B = bo.batch, Hkv = bo.kv_heads, D = bo.head_dim, T = bo.block_size, L = buffer.seq_len();
  TORCH_CHECK_VALUE(q.defined() && q.dim() == 4, "attend: q must be [B, Hq, Q, D], got ",
                    q.defined() ? q.sizes() : at::IntArrayRef{});
  const int64_t Hq = q.size(1), Q = q.size(2);
  TORCH_CHECK_VALUE(q.size(0) == B && q.size(3) == D, "attend: q has shape ", q.sizes(), "; expected [B, Hq, Q, D] with B = ",
                    B, " and D = ", D, " (the buffer's batch and head_dim)");
  TORCH_CHECK_VALUE(Hq >= 1 && Hq % Hkv == 0, "attend: q has ", Hq, " heads; expected a positive multiple of kv_heads = ",
                    Hkv, " (GQA)");
  TORCH_CHECK_VALUE(q.scalar_type() == bo.dtype, "attend: q has dtype ", c10::toString(q.scalar_type()),
                    "; expected the buffer's model dtype ", c10::toString(bo.dtype));
  TORCH_CHECK_VALUE(Q >= 1 && Q <= L, "attend: q holds ", Q, " queries; expected 1 <= Q <= seq_len = ", L,
                    " (queries are the newest positions of the buffer: append their K/V first)");
  if (mask.defined()) {
    TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, "attend: mask has dtype ", c10::toString(mask.scalar_type()),
                      "; expected bool (true = may attend)");
    TORCH_CHECK_VALUE(mask.dim() == 3 && mask.size(0) == B && mask.size(1) == Q && mask.size(2) == L,
                      "attend: mask has shape ", mask.sizes(), "; expected [B, Q, seq_len] = [", B, ", ", Q, ", ", L, "]");
  }
  TORCH_CHECK_VALUE(std::isfinite(options.scale) && options.scale >= 0.0, "attend: scale ", options.scale,
                    " is not accepted; expected >= 0 (0 = 1/sqrt(head_dim))");
  TORCH_CHECK_VALUE(options.sliding_window >= 0, "attend: sliding_window ", options.sliding_window,
                    " is not accepted; expected >= 0 (0 = no window)");
  // Evicted blocks are skipped only because no query's window reaches them (block c is skipped when its last
  // position c*T + T - 1 <= L - Q - W): check that, rather than read pages that are gone.
  const int64_t evicted = buffer.evicted_blocks();
  TORCH_CHECK_VALUE(evicted == 0 || (options.sliding_window > 0 && evicted * T - 1 <= L - Q - options.sliding_window),
                    "attend: blocks 0..", evicted - 1, " of the buffer were evicted (positions < ", evicted * T,
                    "), but a query at position ", L - Q, " with sliding_window ", options.sliding_window,
                    " (0 = none) would see them; attend with the window the blocks were evicted for");
  TORCH_CHECK_VALUE(std::isfinite(options.softcap) && options.softcap >= 0.0, "attend: softcap ", options.softcap,
                    " is not accepted; expected >= 0 (0 = no capping)");
  if (buffer.options().device.is_cpu()) return detail::attend_cpu(buffer, q, mask, options);

  const double scale = options.scale > 0.0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(D));
  const int64_t G = Hq / Hkv, R = G * Q, W = options.sliding_window;
  const c10::Device dev = bo.device;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(dev);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  const at::Tensor qf = q.to(dev, at::kFloat).reshape({B, Hkv, R, D});
  at::Tensor m = at::full({B, Hkv, R}, neg_inf, f32);
  at::Tensor l = at::zeros({B, Hkv, R}, f32);
  at::Tensor acc = at::zeros({B, Hkv, R, D}, f32);
  const at::Tensor user_mask = mask.defined() ? mask.to(dev) : at::Tensor();
  // Position of each row's query: row r = g * Q + i is at L - Q + i.
  const at::Tensor qpos = (at::arange(Q, at::TensorOptions().dtype(at::kLong).device(dev)) + (L - Q)).repeat({G});

  const int64_t nchunks = (L + T - 1) / T, sealed = buffer.num_sealed_blocks();
  std::vector<at::Tensor> sums(options.block_mass ? nchunks : 0), refs(options.block_mass ? nchunks : 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t start = c * T, len = std::min(T, L - start);
    // The earliest query (position L - Q) has the lowest window; a chunk below it is seen by no query: skip
    // its dequantization (this is what makes sliding-window decode cost O(window)).
    if (W > 0 && start + len - 1 <= L - Q - W) {
      if (options.block_mass) sums[c] = refs[c] = at::zeros({B, Hkv, R}, f32);
      continue;
    }
    at::Tensor k, v;  // [B, Hkv, len, D] FP32
    if (c < sealed) {
      std::tie(k, v) = buffer.block(c, at::kFloat);
    } else {
      k = buffer.tail_keys().to(at::kFloat);
      v = buffer.tail_values().to(at::kFloat);
    }
    at::Tensor s = at::matmul(qf, k.transpose(-1, -2)).mul_(scale);  // [B, Hkv, R, len]
    if (options.softcap > 0.0) s = s.div_(options.softcap).tanh_().mul_(options.softcap);

    const at::Tensor kpos = at::arange(start, start + len, qpos.options());
    at::Tensor allowed = kpos.unsqueeze(0) <= qpos.unsqueeze(1);  // [R, len]: causal, bottom-right aligned
    if (W > 0) allowed = allowed & (kpos.unsqueeze(0) > (qpos - W).unsqueeze(1));
    at::Tensor full = allowed.view({1, 1, R, len});
    if (user_mask.defined()) full = full & user_mask.narrow(2, start, len).repeat({1, G, 1}).unsqueeze(1);
    s.masked_fill_(full.logical_not(), neg_inf);

    const at::Tensor m_new = at::maximum(m, std::get<0>(s.max(-1)));
    const at::Tensor ref = at::where(at::isinf(m_new), at::zeros_like(m_new), m_new);  // m_new is -inf or finite
    const at::Tensor alpha = at::exp(m - ref);
    const at::Tensor p = at::exp(s - ref.unsqueeze(-1));
    const at::Tensor psum = p.sum(-1);
    l = l * alpha + psum;
    acc = acc * alpha.unsqueeze(-1) + at::matmul(p, v);
    m = m_new;
    if (options.block_mass) {
      sums[c] = psum;
      refs[c] = ref;
    }
  }

  // Rows that saw no position keep l = 0, acc = 0, m = -inf: out 0, lse -inf, mass 0.
  const at::Tensor seen = l > 0;
  const at::Tensor l_safe = at::where(seen, l, at::ones_like(l));
  AttentionResult result;
  result.out = (acc / l_safe.unsqueeze(-1)).reshape({B, Hq, Q, D}).to(bo.dtype);
  result.lse = at::where(seen, m + at::log(l_safe), at::full_like(m, neg_inf)).reshape({B, Hq, Q});
  if (options.block_mass) {
    const at::Tensor s_all = at::stack(sums, -1), r_all = at::stack(refs, -1);  // [B, Hkv, R, nchunks]
    const at::Tensor m_safe = at::where(seen, m, at::zeros_like(m)).unsqueeze(-1);
    // exp(ref_c - m) <= 1 wherever the chunk contributed (ref_c <= final m); elsewhere the sum is 0 and the
    // factor is not evaluated into the result (it could overflow when ref_c was a placeholder 0).
    const at::Tensor mass = at::where(s_all > 0, s_all * at::exp(r_all - m_safe) / l_safe.unsqueeze(-1),
                                      at::zeros_like(s_all));
    result.block_mass = mass.reshape({B, Hq, Q, nchunks});
  }
  return result;
}

}  // namespace kvprec
