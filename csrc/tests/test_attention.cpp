// attend(): block-wise online-softmax attention over a MixedPrecisionBuffer against a dense FP32 softmax
// computed from gather() (the same K/V values, so the only difference is summation order: 1e-5 holds), and the
// fused CPU kernel (attention_cpu.cpp) under stress against a dense FP64 computation: every tier, tiers mixed per
// (row, head, block) with pages out of order, awkward lengths and head_dims, GQA groups wider than a work item,
// many query tiles, masks that hide whole rows or whole blocks of a row, windows that skip blocks, softcap,
// FP32 / FP16 / BF16 model dtypes, results the same for a given thread count, and the flash-decoding split (more
// threads than (b, h, tile) items). Everything runs once per CPU instruction-set path this CPU has (kvprec/cpu_isa.h;
// the others are skipped with a message). On the SIMD paths integer keys are scored from their codes: the
// reference then uses the kernel's modelled scores (attention_model.h; same tolerances), and the distance to the
// dequantized keys' attention is checked against the contract's bound (check_bound).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "attention_model.h"
#include "buffer_options.h"
#include "check.h"
#include "kvprec/buffer.h"
#include "kvprec/cpu_isa.h"

using namespace kvprec;
using kvprec_test::opts;

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

// Dense reference in `dt` (FP32 for the small cases, FP64 for the stress cases): K/V [B, Hkv, L, D] repeated to Hq
// heads, scores [B, Hq, Q, L] with the same scale, cap and masks, a plain softmax; out [B, Hq, Q, D], lse [B, Hq, Q],
// block mass [B, Hq, Q, nblocks] = probabilities summed over each block of T positions. Config: Case or Stress.
// `scores` [B, Hq, Q, L], when given, replaces scale * q k^T (the kernel's modelled scores).
template <typename Config>
Dense dense(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, const Config& c,
            at::ScalarType dt = at::kFloat, const at::Tensor& scores = at::Tensor()) {
  const int64_t G = c.Hq / c.Hkv;
  const at::Tensor kk = k.to(dt).repeat_interleave(G, 1), vv = v.to(dt).repeat_interleave(G, 1);
  const double scale = c.opt.scale > 0 ? c.opt.scale : 1.0 / std::sqrt(static_cast<double>(c.D));
  at::Tensor s = scores.defined() ? scores.to(dt) : at::matmul(q.to(dt), kk.transpose(-1, -2)) * scale;
  if (c.opt.softcap > 0) s = c.opt.softcap * at::tanh(s / c.opt.softcap);
  const at::Tensor qpos = at::arange(c.L - c.Q, c.L, at::kLong).unsqueeze(1), kpos = at::arange(c.L, at::kLong).unsqueeze(0);
  at::Tensor allowed = kpos <= qpos;
  if (c.opt.sliding_window > 0) allowed = allowed & (kpos > qpos - c.opt.sliding_window);
  at::Tensor full = allowed.view({1, 1, c.Q, c.L});
  if (mask.defined()) full = full & mask.unsqueeze(1);
  s = s.masked_fill(full.logical_not(), -std::numeric_limits<double>::infinity());
  const at::Tensor lse = at::logsumexp(s, -1);
  at::Tensor p = at::softmax(s, -1);
  p = at::where(at::isnan(p), at::zeros_like(p), p);  // rows with nothing visible: softmax of all -inf
  const int64_t nb = (c.L + c.T - 1) / c.T;
  const at::Tensor padded = at::constant_pad_nd(p, {0, nb * c.T - c.L});
  return {at::matmul(p, vv), lse, padded.view({c.B, c.Hq, c.Q, nb, c.T}).sum(-1)};
}

double max_abs(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

template <typename Config>
double scale_of(const Config& c) {
  return c.opt.scale > 0 ? c.opt.scale : 1.0 / std::sqrt(static_cast<double>(c.D));
}

// The contract's bound against the attention of the dequantized keys (`plain`): with e the largest score bound of a
// row (over the positions it may see), out within (e^2e - 1) max_t |v_t| per channel, lse within e, block mass
// within e^2e - 1; `tol` is the FP32 tolerance of the comparison on top.
template <typename Config>
void check_bound(const AttentionResult& r, const Dense& plain, const kvprec_test::ModelScores& m, const at::Tensor& v,
                 const at::Tensor& mask, const Config& c, double tol) {
  at::Tensor visible = at::arange(c.L, at::kLong).unsqueeze(0) <= at::arange(c.L - c.Q, c.L, at::kLong).unsqueeze(1);
  at::Tensor vis = visible.view({1, 1, c.Q, c.L});
  if (mask.defined()) vis = vis & mask.unsqueeze(1);
  const at::Tensor e = at::where(vis, m.bound, at::zeros_like(m.bound)).amax(-1);  // [B, Hq, Q]
  const at::Tensor grow = at::exp(2 * e) - 1;
  const at::Tensor vmax = v.to(at::kDouble).abs().amax(2).repeat_interleave(c.Hq / c.Hkv, 1).unsqueeze(2);  // [B, Hq, 1, D]
  const at::Tensor seen = plain.lse.isfinite();
  CHECK(((r.out.to(at::kDouble) - plain.out).abs() - grow.unsqueeze(-1) * vmax).max().item<double>() <= tol);
  const at::Tensor zero = at::zeros_like(plain.lse);
  CHECK(((at::where(seen, r.lse.to(at::kDouble), zero) - at::where(seen, plain.lse, zero)).abs() - e).max().item<double>() <= tol);
  CHECK(((r.block_mass.to(at::kDouble) - plain.mass).abs() - grow.unsqueeze(-1)).max().item<double>() <= tol);
}

void run(const Case& c, const char* name) {
  const int failed_before = kvprec_test::failures();
  MixedPrecisionBuffer buf(opts(c.B, c.Hkv, c.D, c.T, c.tier, at::kFloat, false, 8));
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
  const kvprec_test::ModelScores model = kvprec_test::model_scores(buf, q, k, scale_of(c));
  const Dense d = dense(q, k, v, mask, c, at::kFloat, model.s);
  check_bound(r, dense(q, k, v, mask, c, at::kDouble), model, v, mask, c, 1e-5);

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
  MixedPrecisionBuffer buf(opts(2, 2, 32, 16, Tier::INT4, at::kFloat, false, 8));
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

// The K/V that attend reads, [B, Hkv, L, D] FP32: gather() for an FP32 model dtype (checked to be the same as the
// blocks dequantized to FP32), else the blocks dequantized to FP32 and the tail (gather() would round integer
// tiers' values to the model dtype, which attend does not).
std::pair<at::Tensor, at::Tensor> what_attend_reads(const MixedPrecisionBuffer& buf) {
  std::vector<at::Tensor> ks, vs;
  for (int64_t j = 0; j < buf.num_sealed_blocks(); ++j) {
    auto [k, v] = buf.block(j, at::kFloat);
    ks.push_back(k);
    vs.push_back(v);
  }
  ks.push_back(buf.tail_keys().to(at::kFloat));
  vs.push_back(buf.tail_values().to(at::kFloat));
  at::Tensor k = at::cat(ks, 2), v = at::cat(vs, 2);
  if (buf.options().dtype == at::kFloat) {
    const auto [gk, gv] = buf.gather(0, buf.seq_len());
    CHECK(at::equal(gk, k) && at::equal(gv, v));
    k = gk;
    v = gv;
  }
  return {k, v};
}

// Half model dtype: the output is cast once to FP16; the online softmax itself stays in FP32.
void test_half_dtype() {
  MixedPrecisionBuffer buf(opts(1, 2, 64, 16, Tier::INT8, at::kHalf));
  buf.append(at::randn({1, 2, 40, 64}).to(at::kHalf), at::randn({1, 2, 40, 64}).to(at::kHalf));
  const at::Tensor q = at::randn({1, 2, 3, 64}).to(at::kHalf);
  const AttentionResult r = attend(buf, q, {}, {});
  CHECK(r.out.scalar_type() == at::kHalf && r.lse.scalar_type() == at::kFloat && !r.block_mass.defined());
  // Reference on the FP32-dequantized blocks (what attend reads) and the tail; FP16 output rounding
  // (2^-11 relative, |out| < 4 here) is the only extra error.
  const auto [k, v] = what_attend_reads(buf);
  Case c;
  c.B = 1;
  c.Hq = 2;
  c.Hkv = 2;
  c.D = 64;
  c.L = 40;
  c.Q = 3;
  const Dense d = dense(q, k, v, {}, c, at::kFloat, kvprec_test::model_scores(buf, q, k, scale_of(c)).s);
  CHECK_NEAR(max_abs(r.out.to(at::kFloat), d.out), 0.0, 4.0 * std::ldexp(1.0, -11));
  CHECK_NEAR(max_abs(r.lse, d.lse), 0.0, 1e-5);
}

// ---------------------------------------------------------------------------------------------------------------
// Fused CPU kernel under stress, against FP64.

struct Stress {
  int64_t B = 2, Hq = 4, Hkv = 2, D = 32, T = 16, VG = 8, L = 50, Q = 1;
  at::ScalarType dtype = at::kFloat;
  std::vector<Tier> tiers = {Tier::FP32};  // each sealed (row, head, block) draws its tier from these
  bool shuffle = false;                     // re-tier some blocks and reorder batch rows: pages out of order
  bool mask = false;
  AttentionOptions opt;
};

std::string describe(const Stress& c) {
  std::string t;
  for (Tier x : c.tiers) t += std::string(t.empty() ? "" : "+") + tier_name(x);
  return "B=" + std::to_string(c.B) + " Hq=" + std::to_string(c.Hq) + " Hkv=" + std::to_string(c.Hkv) +
         " D=" + std::to_string(c.D) + " T=" + std::to_string(c.T) + " L=" + std::to_string(c.L) +
         " Q=" + std::to_string(c.Q) + " dtype=" + c10::toString(c.dtype) + " tiers=" + t +
         " window=" + std::to_string(c.opt.sliding_window) + " softcap=" + std::to_string(c.opt.softcap) +
         (c.mask ? " mask" : "") + (c.shuffle ? " shuffled" : "");
}

// Random tier ids [B, H, n] drawn from `tiers`.
at::Tensor draw_tiers(const std::vector<Tier>& tiers, int64_t B, int64_t H, int64_t n) {
  const at::Tensor pick = at::randint(static_cast<int64_t>(tiers.size()), {B, H, n}, at::kLong);
  at::Tensor ids = at::empty({B, H, n}, at::kChar);
  for (int64_t i = 0; i < ids.numel(); ++i)
    ids.view({-1})[i] = static_cast<int64_t>(tier_index(tiers[pick.view({-1})[i].item<int64_t>()]));
  return ids;
}

void stress(const Stress& c) {
  const int failed_before = kvprec_test::failures();
  MixedPrecisionBuffer buf(opts(c.B, c.Hkv, c.D, c.T, c.tiers[0], c.dtype, false, c.VG));
  const auto model = at::TensorOptions().dtype(c.dtype);
  // Two appends (the second completes the tail and seals more blocks straight from the input), random tiers.
  const int64_t first = c.L / 3;
  for (int64_t n : {first, c.L - first}) {
    if (n == 0) continue;
    const at::Tensor tiers = draw_tiers(c.tiers, c.B, c.Hkv, buf.blocks_sealed_by(n));
    buf.append((at::randn({c.B, c.Hkv, n, c.D}) * 1.5).to(model), at::randn({c.B, c.Hkv, n, c.D}).to(model), tiers);
  }
  if (c.shuffle && buf.num_sealed_blocks() > 0) {
    // Demote every other block's rows to a random tier no higher than their own (pages freed and taken again),
    // then reverse the batch rows (every page copied to a fresh one).
    for (int64_t j = 0; j < buf.num_sealed_blocks(); j += 2) {
      const at::Tensor now = buf.tiers().select(2, j);
      at::Tensor want = at::maximum(now, draw_tiers(c.tiers, c.B, c.Hkv, 1).squeeze(2));
      buf.set_block_tiers(j, want);
    }
    buf.index_batch(at::arange(c.B - 1, -1, -1, at::kLong));
  }
  const at::Tensor q = (at::randn({c.B, c.Hq, c.Q, c.D}) * 1.5).to(model);
  at::Tensor mask;
  if (c.mask) {
    mask = at::rand({c.B, c.Q, c.L}) > 0.3;
    mask[0][0].fill_(false);                                    // a query that may attend to nothing
    if (c.L > 3 * c.T) mask[c.B - 1][c.Q - 1].narrow(0, 0, 2 * c.T).fill_(false);  // blind to its first blocks
    if (c.Q > 1 && c.L > 3 * c.T) mask[c.B - 1][0].narrow(0, c.T, c.T).fill_(false);  // a hole of one block
  }
  AttentionOptions opt = c.opt;
  opt.block_mass = true;
  const AttentionResult r = attend(buf, q, mask, opt);
  const auto [k, v] = what_attend_reads(buf);
  const kvprec_test::ModelScores scores = kvprec_test::model_scores(buf, q, k, scale_of(c));
  const Dense d = dense(q, k, v, mask, c, at::kDouble, scores.s);

  const int64_t nb = (c.L + c.T - 1) / c.T;
  CHECK(r.out.sizes() == at::IntArrayRef({c.B, c.Hq, c.Q, c.D}) && r.out.scalar_type() == c.dtype);
  CHECK(r.lse.sizes() == at::IntArrayRef({c.B, c.Hq, c.Q}) && r.lse.scalar_type() == at::kFloat);
  CHECK(r.block_mass.sizes() == at::IntArrayRef({c.B, c.Hq, c.Q, nb}) && r.block_mass.scalar_type() == at::kFloat);
  CHECK(!at::isnan(r.out).any().item<bool>() && !at::isnan(r.lse).any().item<bool>() &&
        !at::isnan(r.block_mass).any().item<bool>());
  // FP32 accumulation against FP64: 1e-5 on outputs of order one; the model dtype adds one rounding of the output
  // (unit roundoff 2^-11 FP16, 2^-8 BF16, relative to |out|).
  const double u = c.dtype == at::kHalf ? std::ldexp(1.0, -11) : c.dtype == at::kBFloat16 ? std::ldexp(1.0, -8) : 0.0;
  const at::Tensor err = (r.out.to(at::kDouble) - d.out).abs() - (d.out.abs() * u + 1e-5);
  CHECK(err.max().item<double>() <= 0.0);
  const at::Tensor seen = d.lse.isfinite();
  CHECK(at::equal(r.lse.isfinite(), seen));
  const at::Tensor zero = at::zeros_like(d.lse);
  CHECK_NEAR(max_abs(at::where(seen, r.lse.to(at::kDouble), zero), at::where(seen, d.lse, zero)), 0.0, 1e-5);
  CHECK_NEAR(max_abs(r.block_mass.to(at::kDouble), d.mass), 0.0, 1e-5);
  CHECK(at::equal(r.block_mass == 0, d.mass == 0));  // blocks a row cannot see (window, mask, causal) get exactly 0
  CHECK_NEAR(max_abs(r.block_mass.sum(-1).to(at::kDouble), seen.to(at::kDouble)), 0.0, 1e-5);
  const at::Tensor blind = seen.logical_not().unsqueeze(-1);
  CHECK(at::equal(r.out.to(at::kFloat).masked_select(blind), at::zeros({blind.sum().item<int64_t>() * c.D})));
  const double u_out = std::max(u, 1e-6);
  check_bound(r, dense(q, k, v, mask, c, at::kDouble), scores, v, mask, c, 2e-5 + 8 * u_out);
  // The same bits again for the same thread count; one thread (one range per item) and, where the blocks are enough
  // to split (8 or more), 8 threads (more than the (b, h, tile) items: each item's blocks in ranges, merged) agree to
  // rounding. (8 threads on a 2-core machine are slow: only there.)
  const AttentionResult again = attend(buf, q, mask, opt);
  CHECK(at::equal(again.out, r.out) && at::equal(again.lse, r.lse) && at::equal(again.block_mass, r.block_mass));
  const int threads = at::get_num_threads();
  for (int n : {1, 8}) {
    if (n == 8 && (nb < 8 || c.B * c.Hkv >= 8)) continue;
    at::set_num_threads(n);
    const AttentionResult other = attend(buf, q, mask, opt);
    CHECK((other.out.to(at::kDouble) - r.out.to(at::kDouble)).abs().max().item<double>() <= 4e-6 + 2 * u_out);
    CHECK(at::equal(other.lse.isfinite(), r.lse.isfinite()));
    CHECK_NEAR(max_abs(at::where(seen, other.lse, at::zeros_like(other.lse)), at::where(seen, r.lse, at::zeros_like(r.lse))),
               0.0, 4e-6);
    CHECK_NEAR(max_abs(other.block_mass, r.block_mass), 0.0, 4e-6);
    CHECK(at::equal(other.block_mass == 0, r.block_mass == 0));
  }
  at::set_num_threads(threads);
  if (kvprec_test::failures() > failed_before) std::fprintf(stderr, "  (stress case %s)\n", describe(c).c_str());
}

// Integer tiers at the FP16 limit: a group holding both -65504 and 65504 gets zero = -65504 and a scale rounded up
// so that the largest code lands past 65504 (INT4: 15 * 8736 - 65504 = 65536), where the clamp of
// x' = clamp(code * scale + zero) binds. Keys hit it in every channel (positions 0 and 1 of each block), values in
// every group (its first two channels). Small queries keep the softmax spread, so a missing clamp (an error of 32
// or more on many elements) shows in the output, whose FP32 rounding error is ~1e-6 of 65504.
void test_clamp_at_fp16_limit() {
  for (Tier tier : {Tier::INT8, Tier::INT4, Tier::INT2}) {
    Stress c;
    c.B = 1;
    c.Hq = 2;
    c.Hkv = 1;
    c.L = 40;
    c.Q = 2;
    c.tiers = {tier};
    MixedPrecisionBuffer buf(opts(1, 1, c.D, c.T, tier, at::kFloat, false, c.VG));
    at::Tensor k = (at::randn({1, 1, c.L, c.D}) * 20000).clamp(-65504, 65504);
    at::Tensor v = (at::randn({1, 1, c.L, c.D}) * 20000).clamp(-65504, 65504);
    for (int64_t j = 0; j * c.T < c.L; ++j) {
      k[0][0][j * c.T].fill_(65504);
      k[0][0][j * c.T + 1].fill_(-65504);
    }
    const at::Tensor vg = v.view({c.L, c.D / c.VG, c.VG});
    vg.select(2, 0).fill_(65504);
    vg.select(2, 1).fill_(-65504);
    buf.append(k, v);
    const at::Tensor q = at::randn({1, c.Hq, c.Q, c.D}) * 1e-5;
    AttentionOptions opt;
    opt.block_mass = true;
    const AttentionResult r = attend(buf, q, {}, opt);
    const auto [gk, gv] = buf.gather(0, c.L);
    CHECK(gk.abs().max().item<float>() == 65504.0f && gv.abs().max().item<float>() == 65504.0f);
    const Dense d = dense(q, gk, gv, {}, c, at::kDouble);
    CHECK_NEAR(max_abs(r.out.to(at::kDouble), d.out), 0.0, 65504 * 4e-6);
    CHECK_NEAR(max_abs(r.lse.to(at::kDouble), d.lse), 0.0, 1e-5);
    CHECK_NEAR(max_abs(r.block_mass.to(at::kDouble), d.mass), 0.0, 1e-5);
  }
}

void test_fused_cpu_kernel() {
  const std::vector<Tier> all(std::begin(kAllTiers), std::end(kAllTiers));
  // Every tier alone and all mixed, in every model dtype, decode and a prefill of several query tiles.
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (Tier t : kAllTiers) {
      Stress c;
      c.dtype = dtype;
      c.tiers = {t};
      c.L = 75;
      stress(c);
      c.Q = 70;  // G * Q = 140 rows: three tiles of 64 rows per (b, h)
      c.L = 123;
      c.mask = true;
      stress(c);
    }
    Stress c;
    c.dtype = dtype;
    c.tiers = all;
    c.shuffle = true;
    for (int64_t L : {1, 7, 16, 17, 63, 123, 257}) {
      c.L = L;
      for (int64_t Q : {int64_t{1}, int64_t{3}, L}) {
        if (Q > L) continue;
        c.Q = Q;
        c.mask = false;
        stress(c);
        c.mask = true;
        stress(c);
      }
    }
  }
  // Awkward head_dims (D % 8 == 4: the last channels of p v take the 4-wide block) and group sizes; block sizes
  // 1, 2 (fewer positions than a register block of scores), 8 and 64.
  for (auto [D, VG, T] : {std::array<int64_t, 3>{4, 4, 8}, {12, 4, 8}, {36, 12, 64}, {20, 20, 16}, {8, 4, 1},
                          {12, 12, 2}}) {
    Stress c;
    c.D = D;
    c.VG = VG;
    c.T = T;
    c.tiers = all;
    c.shuffle = true;
    c.L = 3 * T + 5;
    c.Q = 4;
    c.mask = true;
    stress(c);
  }
  // GQA: MHA, MQA, groups of 3, and a group of 65 query heads (wider than a 64-row work item: one query per item);
  // then the register blocks of the SIMD kernels at real head dims: 3 rows (SmolLM2's groups of 3 query heads at
  // D = 64, one value group per head) and 7 = 4 + 3 rows (D = 80: INT4 score rows of 40 code bytes, value groups
  // of 16).
  for (auto [Hq, Hkv, D, VG] : {std::array<int64_t, 4>{2, 2, 8, 4}, {6, 1, 8, 4}, {6, 2, 8, 4}, {65, 1, 8, 4},
                                {9, 3, 64, 64}, {7, 1, 80, 16}}) {
    Stress c;
    c.Hq = Hq;
    c.Hkv = Hkv;
    c.D = D;
    c.VG = VG;
    c.tiers = all;
    c.L = 40;
    for (int64_t Q : {1, 5}) {
      c.Q = Q;
      c.mask = Q > 1;
      stress(c);
    }
  }
  // Sliding windows that skip blocks for some tiles only (Q = 100: tiles of 32 queries), window edges on block
  // edges, with and without masks; softcap and an explicit scale.
  for (int64_t w : {1, 5, 16, 17, 47, 200}) {
    Stress c;
    c.tiers = all;
    c.L = 150;
    c.opt.sliding_window = w;
    for (int64_t Q : {1, 2, 100}) {
      c.Q = Q;
      c.mask = false;
      stress(c);
      c.mask = true;
      stress(c);
    }
  }
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    Stress c;
    c.dtype = dtype;
    c.tiers = all;
    c.L = 90;
    c.Q = 9;
    c.mask = true;
    c.opt.softcap = 1.0;
    c.opt.scale = 0.3;
    stress(c);
    c.opt.sliding_window = 20;
    stress(c);
  }
}

void run_cases() {
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
  test_fused_cpu_kernel();
  test_clamp_at_fp16_limit();
}

}  // namespace

int main() {
  const kvprec::CpuIsa active = kvprec::active_cpu_isa();
  for (kvprec::CpuIsa isa : kvprec::kAllCpuIsas) {
    const std::string why = kvprec::cpu_isa_unsupported_reason(isa);
    if (!why.empty()) {
      std::printf("SKIPPED CPU path %s: %s\n", kvprec::cpu_isa_name(isa), why.c_str());
      continue;
    }
    kvprec::set_cpu_isa(isa);
    at::manual_seed(0);
    const int before = kvprec_test::failures();
    run_cases();
    std::printf("CPU path %s: %d failed checks\n", kvprec::cpu_isa_name(isa), kvprec_test::failures() - before);
  }
  kvprec::set_cpu_isa(active);
  return kvprec_test::finish("test_attention");
}
