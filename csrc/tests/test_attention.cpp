// attend(): block-wise online-softmax attention over a MixedPrecisionBuffer against a dense FP32 softmax
// computed from gather() (the same K/V values, so the only difference is summation order: 1e-5 holds).
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "check.h"
#include "kvprec/buffer.h"

using namespace kvprec;

namespace {

struct Case {
  int64_t B = 2, Hq = 4, Hkv = 2, D = 32, T = 16, L = 50, Q = 1;
  Tier tier = Tier::FP32;
  AttentionOptions opt;
  bool mask = false;
};

struct Dense {
  at::Tensor out, lse, mass;
};

// Dense reference: K/V [B, Hkv, L, D] repeated to Hq heads, scores [B, Hq, Q, L] with the same scale, cap and
// masks, a plain softmax; block mass = probabilities summed over each block of T positions.
Dense dense(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, const Case& c) {
  const int64_t G = c.Hq / c.Hkv;
  const at::Tensor kk = k.to(at::kFloat).repeat_interleave(G, 1), vv = v.to(at::kFloat).repeat_interleave(G, 1);
  const double scale = c.opt.scale > 0 ? c.opt.scale : 1.0 / std::sqrt(static_cast<double>(c.D));
  at::Tensor s = at::matmul(q.to(at::kFloat), kk.transpose(-1, -2)) * scale;
  if (c.opt.softcap > 0) s = c.opt.softcap * at::tanh(s / c.opt.softcap);
  const at::Tensor qpos = at::arange(c.L - c.Q, c.L, at::kLong).unsqueeze(1), kpos = at::arange(c.L, at::kLong).unsqueeze(0);
  at::Tensor allowed = kpos <= qpos;
  if (c.opt.sliding_window > 0) allowed = allowed & (kpos > qpos - c.opt.sliding_window);
  at::Tensor full = allowed.view({1, 1, c.Q, c.L});
  if (mask.defined()) full = full & mask.unsqueeze(1);
  s = s.masked_fill(full.logical_not(), -std::numeric_limits<float>::infinity());
  const at::Tensor lse = at::logsumexp(s, -1);
  at::Tensor p = at::softmax(s, -1);
  p = at::where(at::isnan(p), at::zeros_like(p), p);  // rows with nothing visible: softmax of all -inf
  const int64_t nb = (c.L + c.T - 1) / c.T;
  const at::Tensor padded = at::constant_pad_nd(p, {0, nb * c.T - c.L});
  return {at::matmul(p, vv), lse, padded.view({c.B, c.Hq, c.Q, nb, c.T}).sum(-1)};
}

double max_abs(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

void run(const Case& c, const char* name) {
  const int failed_before = kvprec_test::failures();
  BufferOptions o;
  o.batch = c.B;
  o.kv_heads = c.Hkv;
  o.head_dim = c.D;
  o.block_size = c.T;
  o.group_size = 8;
  o.dtype = at::kFloat;
  o.default_tier = c.tier;
  MixedPrecisionBuffer buf(o);
  // Scores of order a few units: the softmax is neither uniform nor one-hot.
  buf.append(at::randn({c.B, c.Hkv, c.L, c.D}) * 1.5, at::randn({c.B, c.Hkv, c.L, c.D}));
  const at::Tensor q = at::randn({c.B, c.Hq, c.Q, c.D}) * 1.5;
  at::Tensor mask;
  if (c.mask) {
    mask = at::rand({c.B, c.Q, c.L}) > 0.3;
    mask[0][0].fill_(false);  // one query row that may attend to nothing
  }
  AttentionOptions opt = c.opt;
  opt.block_mass = true;
  const AttentionResult r = attend(buf, q, mask, opt);
  const auto [k, v] = buf.gather(0, c.L);
  const Dense d = dense(q, k, v, mask, c);

  const int64_t nb = (c.L + c.T - 1) / c.T;
  CHECK(r.out.sizes() == at::IntArrayRef({c.B, c.Hq, c.Q, c.D}) && r.out.scalar_type() == at::kFloat);
  CHECK(r.lse.sizes() == at::IntArrayRef({c.B, c.Hq, c.Q}));
  CHECK(r.block_mass.sizes() == at::IntArrayRef({c.B, c.Hq, c.Q, nb}));
  CHECK(!at::isnan(r.out).any().item<bool>() && !at::isnan(r.lse).any().item<bool>());
  const at::Tensor seen = d.lse.isfinite();  // rows that may attend to at least one position
  CHECK_NEAR(max_abs(r.out, d.out), 0.0, 1e-5);
  CHECK(at::equal(r.lse.isfinite(), seen));
  CHECK_NEAR(max_abs(at::where(seen, r.lse, at::zeros_like(r.lse)), at::where(seen, d.lse, at::zeros_like(d.lse))), 0.0,
             1e-5);
  CHECK_NEAR(max_abs(r.block_mass, d.mass), 0.0, 1e-5);
  const at::Tensor row_sums = r.block_mass.sum(-1);
  CHECK_NEAR(max_abs(row_sums, seen.to(at::kFloat)), 0.0, 1e-5);  // 1 where anything is visible, else 0
  if (c.mask) CHECK(r.out[0].select(1, 0).abs().max().item<float>() == 0.0f && std::isinf(r.lse[0][0][0].item<float>()));
  if (kvprec_test::failures() > failed_before)
    std::fprintf(stderr, "  (case %s: L=%ld Q=%ld Hq=%ld Hkv=%ld tier=%s)\n", name, static_cast<long>(c.L),
                 static_cast<long>(c.Q), static_cast<long>(c.Hq), static_cast<long>(c.Hkv), tier_name(c.tier));
}

void test_errors() {
  BufferOptions o;
  o.batch = 2;
  o.kv_heads = 2;
  o.head_dim = 32;
  o.block_size = 16;
  o.group_size = 8;
  o.dtype = at::kFloat;
  MixedPrecisionBuffer buf(o);
  buf.append(at::randn({2, 2, 20, 32}), at::randn({2, 2, 20, 32}));
  const AttentionOptions opt;
  CHECK_THROWS(attend(buf, at::randn({2, 3, 1, 32}), {}, opt), "multiple of kv_heads");
  CHECK_THROWS(attend(buf, at::randn({2, 4, 1, 16}), {}, opt), "attend: q has shape");
  CHECK_THROWS(attend(buf, at::randn({2, 4, 1, 32}).to(at::kHalf), {}, opt), "attend: q has dtype");
  CHECK_THROWS(attend(buf, at::randn({2, 4, 21, 32}), {}, opt), "seq_len = 20");
  CHECK_THROWS(attend(buf, at::randn({2, 4, 2, 32}), at::ones({2, 1, 20}, at::kBool), opt), "attend: mask has shape");
  CHECK_THROWS(attend(buf, at::randn({2, 4, 1, 32}), at::ones({2, 1, 20}), opt), "attend: mask has dtype");
  AttentionOptions bad;
  bad.sliding_window = -1;
  CHECK_THROWS(attend(buf, at::randn({2, 4, 1, 32}), {}, bad), "sliding_window");
}

// Half model dtype: the output is cast once to FP16; the online softmax itself stays in FP32.
void test_half_dtype() {
  BufferOptions o;
  o.batch = 1;
  o.kv_heads = 2;
  o.head_dim = 64;
  o.block_size = 16;
  o.group_size = 32;
  o.dtype = at::kHalf;
  o.default_tier = Tier::INT8;
  MixedPrecisionBuffer buf(o);
  buf.append(at::randn({1, 2, 40, 64}).to(at::kHalf), at::randn({1, 2, 40, 64}).to(at::kHalf));
  const at::Tensor q = at::randn({1, 2, 3, 64}).to(at::kHalf);
  const AttentionResult r = attend(buf, q, {}, {});
  CHECK(r.out.scalar_type() == at::kHalf && r.lse.scalar_type() == at::kFloat && !r.block_mass.defined());
  // Reference on the FP32-dequantized blocks (what attend reads) and the tail; FP16 output rounding
  // (2^-11 relative, |out| < 4 here) is the only extra error.
  std::vector<at::Tensor> ks, vs;
  for (int64_t j = 0; j < buf.num_sealed_blocks(); ++j) {
    auto [k, v] = buf.block(j, at::kFloat);
    ks.push_back(k);
    vs.push_back(v);
  }
  ks.push_back(buf.tail_keys().to(at::kFloat));
  vs.push_back(buf.tail_values().to(at::kFloat));
  Case c;
  c.B = 1;
  c.Hq = 2;
  c.Hkv = 2;
  c.D = 64;
  c.L = 40;
  c.Q = 3;
  const Dense d = dense(q, at::cat(ks, 2), at::cat(vs, 2), {}, c);
  CHECK_NEAR(max_abs(r.out.to(at::kFloat), d.out), 0.0, 4.0 * std::ldexp(1.0, -11));
  CHECK_NEAR(max_abs(r.lse, d.lse), 0.0, 1e-5);
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (int64_t L : {1, 7, 16, 50, 123}) {
    for (int64_t Q : {1, 5}) {
      if (Q > L) continue;
      for (Tier tier : {Tier::FP32, Tier::INT4}) {
        Case c;
        c.L = L;
        c.Q = Q;
        c.tier = tier;
        run(c, "plain/gqa");
        c.Hq = c.Hkv = 2;
        run(c, "mha");
        c.Hq = 6;
        c.Hkv = 1;
        run(c, "mqa");
        c.Hq = 4;
        c.Hkv = 2;
        // Windows 35 (L=50, Q=1) and 88 (L=123, Q=5) put the earliest query's first visible position on the
        // last position of a block (L - Q - W + 1 = 15 or 31), the edge of the block-skipping test.
        for (int64_t w : {1, 20, 35, 88}) {
          c.opt.sliding_window = w;
          run(c, "sliding window");
        }
        c.opt.sliding_window = 0;
        c.opt.softcap = 2.0;
        c.opt.scale = 0.5;
        run(c, "softcap");
        c.opt = {};
        c.mask = true;
        run(c, "mask");
        c.opt.sliding_window = 9;
        run(c, "mask + window");
      }
    }
  }
  test_errors();
  test_half_dtype();
  return kvprec_test::finish("test_attention");
}
