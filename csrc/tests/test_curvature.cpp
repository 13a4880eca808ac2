// Curvature closed form against finite differences of a plain C++ attention, plus the reductions, the
// accumulator and the locality patterns on inputs built to show each pattern.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "check.h"
#include "kvprec/curvature.h"

using kvprec::Reduce;

namespace {

// o = sum_{t < n} softmax(scale * q.K_t) v_t, FP64, K and V row-major [n, D].
std::vector<double> attend(const std::vector<double>& q, const std::vector<double>& K, const std::vector<double>& V,
                           int64_t n, int64_t d, double scale) {
  std::vector<double> s(n), o(d, 0.0);
  double mx = -INFINITY, z = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    double dot = 0.0;
    for (int64_t j = 0; j < d; ++j) dot += q[j] * K[t * d + j];
    s[t] = scale * dot;
    mx = std::max(mx, s[t]);
  }
  for (int64_t t = 0; t < n; ++t) z += (s[t] = std::exp(s[t] - mx));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < d; ++j) o[j] += s[t] / z * V[t * d + j];
  return o;
}

std::vector<double> to_vec(const at::Tensor& x) {
  at::Tensor c = x.contiguous().to(at::kDouble);
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// ||J_t|| and ||H_t|| of one query and position by central differences on K_t.
std::pair<double, double> finite_differences(std::vector<double> q, std::vector<double> K, const std::vector<double>& V,
                                             int64_t n, int64_t d, double scale, int64_t t) {
  const double h1 = 1e-5, h2 = 1e-3;
  double jac = 0.0, hess = 0.0;
  for (int64_t a = 0; a < d; ++a) {
    std::vector<double> kp = K, km = K;
    kp[t * d + a] += h1;
    km[t * d + a] -= h1;
    auto op = attend(q, kp, V, n, d, scale), om = attend(q, km, V, n, d, scale);
    for (int64_t j = 0; j < d; ++j) jac += std::pow((op[j] - om[j]) / (2 * h1), 2);
    for (int64_t b = 0; b < d; ++b) {
      auto shifted = [&](double sa, double sb) {
        std::vector<double> k2 = K;
        k2[t * d + a] += sa;
        k2[t * d + b] += sb;
        return attend(q, k2, V, n, d, scale);
      };
      auto pp = shifted(h2, h2), pm = shifted(h2, -h2), mp = shifted(-h2, h2), mm = shifted(-h2, -h2);
      for (int64_t j = 0; j < d; ++j) hess += std::pow((pp[j] - pm[j] - mp[j] + mm[j]) / (4 * h2 * h2), 2);
    }
  }
  return {std::sqrt(jac), std::sqrt(hess)};
}

void test_closed_form_vs_finite_differences() {
  at::manual_seed(0);
  const int64_t Hq = 4, Hkv = 2, Q = 3, N = 6, D = 4;
  const double scale = 0.7;
  at::Tensor q = at::randn({Hq, Q, D}, at::kDouble), k = at::randn({Hkv, N, D}, at::kDouble);
  at::Tensor v = at::randn({Hkv, N, D}, at::kDouble);
  auto r = kvprec::attention_curvature(q, k, v, scale, /*causal=*/true);
  CHECK(r.kappa.sizes() == at::IntArrayRef({Hq, Q, N}));
  CHECK(r.kappa.scalar_type() == at::kDouble);
  double worst_j = 0.0, worst_h = 0.0;
  for (int64_t h = 0; h < Hq; ++h) {
    const int64_t g = h / (Hq / Hkv);  // GQA
    for (int64_t i = 0; i < Q; ++i) {
      const int64_t n = N - Q + i + 1;  // causal, bottom-right aligned
      auto qv = to_vec(q[h][i]), K = to_vec(k[g]), V = to_vec(v[g]);
      for (int64_t t = 0; t < N; ++t) {
        if (t >= n) {
          CHECK(r.attn[h][i][t].item<double>() == 0.0);
          CHECK(r.kappa[h][i][t].item<double>() == 0.0);
          continue;
        }
        auto [jn, hn] = finite_differences(qv, K, V, n, D, scale, t);
        const double jc = r.jac_norm[h][i][t].item<double>(), hc = r.hess_norm[h][i][t].item<double>();
        worst_j = std::max(worst_j, std::fabs(jn - jc) / (jn + 1e-12));
        worst_h = std::max(worst_h, std::fabs(hn - hc) / (hn + 1e-9));
        const double a = r.attn[h][i][t].item<double>();
        CHECK_NEAR(r.kappa[h][i][t].item<double>(), a * jc * hc, 1e-15);
      }
    }
  }
  // Central differences: O(h^2) truncation; h = 1e-5 for J, 1e-3 for H (whose rounding error grows as 1/h^2).
  CHECK(worst_j < 1e-6);
  CHECK(worst_h < 1e-4);
  std::printf("  finite differences: worst relative error ||J|| %.2e, ||H|| %.2e\n", worst_j, worst_h);
  // The factors in the closed form, once more: ||H|| / ||J|| = scale |1 - 2 a| ||q||.
  const double a = r.attn[1][2][3].item<double>();
  CHECK_NEAR(r.hess_norm[1][2][3].item<double>() / r.jac_norm[1][2][3].item<double>(),
             scale * std::fabs(1 - 2 * a) * q[1][2].norm().item<double>(), 1e-12);
}

void test_shapes_gqa_batch_dtype() {
  at::manual_seed(1);
  at::Tensor q = at::randn({2, 4, 5, 8}), k = at::randn({2, 2, 7, 8}), v = at::randn({2, 2, 7, 8});
  auto r = kvprec::attention_curvature(q, k, v, 0.0, true);
  CHECK(r.kappa.sizes() == at::IntArrayRef({2, 4, 5, 7}));
  CHECK(r.kappa.scalar_type() == at::kFloat);
  // Batch rows are independent; GQA equals repeating the KV heads.
  auto r1 = kvprec::attention_curvature(q[1], k[1].repeat_interleave(2, 0), v[1].repeat_interleave(2, 0), 0.0, true);
  CHECK(at::allclose(r.kappa[1], r1.kappa, 1e-6, 1e-9));
  // scale 0 = 1/sqrt(D).
  auto r2 = kvprec::attention_curvature(q, k, v, 1.0 / std::sqrt(8.0), true);
  CHECK(at::equal(r.kappa, r2.kappa));
  // Attention rows sum to one; not causal: every position is seen.
  CHECK(at::allclose(r.attn.sum(-1), at::ones({2, 4, 5}), 1e-5, 1e-6));
  auto nc = kvprec::attention_curvature(q, k, v, 0.0, false);
  CHECK((nc.attn > 0).all().item<bool>());
  // FP16 inputs are computed in FP64 and returned FP32.
  auto rh = kvprec::attention_curvature(q.to(at::kHalf), k.to(at::kHalf), v.to(at::kHalf), 0.0, true);
  CHECK(rh.kappa.scalar_type() == at::kFloat);
  // Q = 1 (decode) and N = 1.
  auto rd = kvprec::attention_curvature(q.narrow(2, 0, 1), k, v, 0.0, true);
  CHECK(rd.kappa.sizes() == at::IntArrayRef({2, 4, 1, 7}));
  auto r_one = kvprec::attention_curvature(q.narrow(2, 0, 1), k.narrow(2, 0, 1), v.narrow(2, 0, 1), 0.0, true);
  CHECK(at::allclose(r_one.attn, at::ones_like(r_one.attn)));
  CHECK((r_one.kappa == 0).all().item<bool>());  // a = 1: v_t = o, nothing to perturb
}

void test_errors() {
  at::Tensor q = at::randn({4, 3, 8}), k = at::randn({2, 5, 8}), v = at::randn({2, 5, 8});
  CHECK_THROWS(kvprec::attention_curvature(q, k, v, -1.0, true), "scale");
  CHECK_THROWS(kvprec::attention_curvature(q.narrow(0, 0, 3), k, v, 0.0, true), "multiple of KV heads");
  CHECK_THROWS(kvprec::attention_curvature(at::randn({4, 6, 8}), k, v, 0.0, true), "Q <= N");
  CHECK_THROWS(kvprec::attention_curvature(q, at::randn({2, 5, 4}), v, 0.0, true), "head_dim");
  CHECK_THROWS(kvprec::attention_curvature(q[0], k, v, 0.0, true), "q must be");
  CHECK_THROWS(kvprec::attention_curvature(q, k, at::randn({2, 4, 8}), 0.0, true), "v must match k");
  CHECK_THROWS(kvprec::attention_curvature(q.to(at::kInt), k, v, 0.0, true), "floating");
  at::Tensor bad = q.clone();
  bad[0][0][0] = NAN;
  CHECK_THROWS(kvprec::attention_curvature(bad, k, v, 0.0, true), "non-finite");
  CHECK_THROWS(kvprec::reduce_from_name("median", "query_reduce"), "accepted mean, max, sum");
}

void test_reductions() {
  at::manual_seed(2);
  const int64_t Hq = 4, Hkv = 2, Q = 5, N = 11, T = 4;
  at::Tensor q = at::randn({Hq, Q, 8}, at::kDouble), k = at::randn({Hkv, N, 8}, at::kDouble);
  at::Tensor v = at::randn({Hkv, N, 8}, at::kDouble);
  auto r = kvprec::attention_curvature(q, k, v, 0.0, true);
  at::Tensor kg = r.kappa.view({Hkv, 2, Q, N});
  // Mean over (head in group, query that sees t): query i sees t iff t <= N - Q + i.
  at::Tensor seen = at::arange(N).unsqueeze(0) <= (N - Q + at::arange(Q)).unsqueeze(1);  // [Q, N]
  at::Tensor mean = kg.sum({1, 2}) / (2 * seen.sum(0)).to(at::kDouble);
  auto m = kvprec::curvature_reduce(q, k, v, 0.0, true, T, Reduce::Mean, Reduce::Max);
  CHECK(at::allclose(m.position, mean, 1e-12, 1e-15));
  CHECK(m.block.sizes() == at::IntArrayRef({Hkv, 3}));
  CHECK_NEAR(m.block[1][2].item<double>(), mean[1].narrow(0, 8, 3).max().item<double>(), 1e-15);
  auto x = kvprec::curvature_reduce(q, k, v, 0.0, true, T, Reduce::Max, Reduce::Sum);
  CHECK(at::allclose(x.position, kg.amax({1, 2}), 1e-12, 1e-15));
  CHECK_NEAR(x.block[0][0].item<double>(), kg[0].amax({0, 1}).narrow(0, 0, 4).sum().item<double>(), 1e-14);
  // Mean per block divides the partial last block by the positions present (3 of 4).
  at::Tensor bm = kvprec::block_reduce(mean, T, Reduce::Mean);
  CHECK_NEAR(bm[0][2].item<double>(), mean[0].narrow(0, 8, 3).mean().item<double>(), 1e-15);
  CHECK_THROWS(kvprec::block_reduce(mean, 0, Reduce::Max), "block_size");

  // Accumulator: two inputs of different lengths share slots from position 0.
  kvprec::CurvatureAccumulator acc(Hkv, 0.0, true);
  acc.add(q, k, v);
  at::Tensor q2 = at::randn({1, Hq, 3, 8}, at::kDouble);  // batched input of length 7
  at::Tensor k2 = at::randn({1, Hkv, 7, 8}, at::kDouble), v2 = at::randn({1, Hkv, 7, 8}, at::kDouble);
  acc.add(q2, k2, v2);
  CHECK(acc.inputs() == 2);
  CHECK(acc.max_len() == N);
  auto r2 = kvprec::attention_curvature(q2[0], k2[0], v2[0], 0.0, true).kappa.view({Hkv, 2, 3, 7});
  at::Tensor seen2 = at::arange(7).unsqueeze(0) <= (4 + at::arange(3)).unsqueeze(1);
  at::Tensor sum = kg.sum({1, 2}).clone();
  sum.narrow(1, 0, 7).add_(r2.sum({1, 2}));
  at::Tensor cnt = (2 * seen.sum(0)).to(at::kDouble).unsqueeze(0).repeat({Hkv, 1});
  cnt.narrow(1, 0, 7).add_((2 * seen2.sum(0)).to(at::kDouble));
  CHECK(at::allclose(acc.mean(), sum / cnt, 1e-12, 1e-15));
  at::Tensor mx = kg.amax({1, 2}).clone();
  mx.narrow(1, 0, 7).copy_(at::maximum(mx.narrow(1, 0, 7), r2.amax({1, 2})));
  CHECK(at::allclose(acc.max(), mx, 0, 0));
  CHECK(acc.block(T, Reduce::Max, Reduce::Max).sizes() == at::IntArrayRef({Hkv, 3}));
  CHECK_THROWS(acc.add(q, k.narrow(0, 0, 1), v.narrow(0, 0, 1)), "KV heads");
}

// count_t = B * G * (causal ? min(Q, N - t) : Q): the (batch row, query head, query) triples that see position t.
at::Tensor visible_count(int64_t B, int64_t G, int64_t Q, int64_t N, bool causal) {
  at::Tensor seen = causal ? at::clamp_max(N - at::arange(N, at::kDouble), static_cast<double>(Q))
                           : at::full({N}, static_cast<double>(Q), at::kDouble);
  return seen * static_cast<double>(B * G);
}

void test_add_reduced_equals_add() {
  at::manual_seed(4);
  const int64_t Hq = 6, Hkv = 2, G = 3, D = 8;
  for (bool causal : {true, false}) {
    kvprec::CurvatureAccumulator direct(Hkv, 0.3, causal), reduced(Hkv, 0.3, causal);
    // Inputs of different lengths, batched and not, FP32 and FP64, Q < N and Q = N (a prefill): the reduced path
    // fed by curvature_reduce of the same q, k, v accumulates the same statistics bit for bit.
    struct Case {
      int64_t B, Q, N;
      at::ScalarType dtype;
    };
    for (const Case& c : {Case{2, 5, 11, at::kDouble}, Case{0, 7, 7, at::kFloat}, Case{1, 1, 13, at::kFloat},
                          Case{0, 3, 4, at::kDouble}}) {
      std::vector<int64_t> lead;
      if (c.B > 0) lead.push_back(c.B);
      auto mk = [&](int64_t h, int64_t n) {
        std::vector<int64_t> shape = lead;
        shape.insert(shape.end(), {h, n, D});
        return at::randn(shape, at::kDouble).to(c.dtype);
      };
      at::Tensor q = mk(Hq, c.Q), k = mk(Hkv, c.N), v = mk(Hkv, c.N);
      direct.add(q, k, v);
      auto s = kvprec::curvature_reduce(q, k, v, 0.3, causal, 4, Reduce::Sum, Reduce::Sum);
      auto m = kvprec::curvature_reduce(q, k, v, 0.3, causal, 4, Reduce::Max, Reduce::Max);
      CHECK(s.position.sizes() == (c.B > 0 ? at::IntArrayRef({c.B, Hkv, c.N}) : at::IntArrayRef({Hkv, c.N})));
      reduced.add_reduced(s.position, m.position, visible_count(std::max<int64_t>(c.B, 1), G, c.Q, c.N, causal));
    }
    CHECK(reduced.inputs() == direct.inputs() && direct.inputs() == 5);
    CHECK(reduced.max_len() == 13);
    CHECK(at::equal(reduced.sum(), direct.sum()));
    CHECK(at::equal(reduced.max(), direct.max()));
    CHECK(at::equal(reduced.count(), direct.count()));
    CHECK(at::equal(reduced.mean(), direct.mean()));
    CHECK(at::equal(reduced.block(4, Reduce::Mean, Reduce::Sum), direct.block(4, Reduce::Mean, Reduce::Sum)));
    CHECK((direct.sum() > 0).all().item<bool>());  // the comparison is not between zeros
  }
  // A per-head count [Hkv, N] and an integer count are accepted.
  kvprec::CurvatureAccumulator a(Hkv, 0.0, true), b(Hkv, 0.0, true);
  at::Tensor pos = at::rand({Hkv, 5}, at::kDouble);
  a.add_reduced(pos, pos, at::full({5}, 3, at::kLong));
  b.add_reduced(pos.to(at::kFloat), pos, at::full({Hkv, 5}, 3.0, at::kDouble));
  CHECK(at::equal(a.count(), b.count()) && at::allclose(a.sum(), b.sum(), 1e-7, 0));
}

void test_add_reduced_errors() {
  const int64_t H = 2, N = 5;
  kvprec::CurvatureAccumulator acc(H, 0.0, true);
  at::Tensor pos = at::rand({H, N}, at::kDouble), cnt = at::ones({N}, at::kDouble);
  CHECK_THROWS(acc.add_reduced(pos.view({H * N}), pos.view({H * N}), cnt), "pos_sum must be [Hkv, N] or [B, Hkv, N]");
  CHECK_THROWS(acc.add_reduced(pos, pos.narrow(1, 0, 4), cnt), "pos_max must have pos_sum's shape");
  CHECK_THROWS(acc.add_reduced(at::rand({3, N}, at::kDouble), at::rand({3, N}, at::kDouble), cnt),
               "pos_sum has 3 KV heads, the accumulator 2");
  CHECK_THROWS(acc.add_reduced(pos, pos, at::ones({N + 1})), "count must be [N] or [Hkv, N]");
  CHECK_THROWS(acc.add_reduced(pos, pos, at::ones({3, N})), "count must be [N] or [Hkv, N]");
  CHECK_THROWS(acc.add_reduced(pos.to(at::kInt), pos, cnt), "pos_sum must be a floating tensor");
  CHECK_THROWS(acc.add_reduced(pos, pos.to(at::kLong), cnt), "pos_max must be a floating tensor");
  CHECK_THROWS(acc.add_reduced(pos, pos, cnt.to(at::kBool)), "count must be a floating or integer tensor");
  CHECK_THROWS(acc.add_reduced(-pos, pos, cnt), "pos_sum must be finite and >= 0");
  at::Tensor inf = pos.clone();
  inf[0][0] = INFINITY;
  CHECK_THROWS(acc.add_reduced(pos, inf, cnt), "pos_max must be finite and >= 0");
  at::Tensor zero = cnt.clone();
  zero[2] = 0.0;
  CHECK_THROWS(acc.add_reduced(pos, pos, zero), "count is 0 at a position where");
  acc.add_reduced(at::zeros({H, N}, at::kDouble), at::zeros({H, N}, at::kDouble), zero);  // nothing seen, nothing there
  CHECK(acc.inputs() == 1);
  CHECK_THROWS(kvprec::CurvatureAccumulator().add_reduced(pos, pos, cnt), "default-constructed");
  CHECK(acc.inputs() == 1);  // refused calls changed nothing
}

void test_locality() {
  at::manual_seed(3);
  const int64_t N = 32, D = 16, Q = 8;
  // Head 0: a sink at position 0 (its key aligned with every query); head 1: sharp recency (each query
  // attends to its own position); keys in 3 direction clusters for KV head 0.
  at::Tensor dirs = at::randn({3, D}, at::kDouble);
  dirs = dirs / dirs.norm(2, -1, true);
  at::Tensor k = at::empty({2, N, D}, at::kDouble);
  for (int64_t t = 0; t < N; ++t) k[0][t] = dirs[t % 3] * (1.0 + 0.01 * t) + 0.01 * at::randn({D}, at::kDouble);
  at::Tensor sink = at::randn({D}, at::kDouble);
  k[0][0] = sink / sink.norm() * 5.0;  // a fourth direction, long: the sink
  k[1] = at::randn({N, D}, at::kDouble);
  at::Tensor q = at::empty({2, Q, D}, at::kDouble);
  for (int64_t i = 0; i < Q; ++i) {
    q[0][i] = k[0][0] * 10.0;                 // all queries -> position 0 (a sink)
    q[1][i] = k[1][N - Q + i] * 10.0;         // query i -> its own position
  }
  kvprec::LocalityOptions opt;
  opt.window = 1;
  auto p = kvprec::attention_locality(q, k, 1.0, true, opt);
  CHECK(p.recency_share.sizes() == at::IntArrayRef({2}));
  CHECK(p.recency_share[1].item<double>() > 0.99);
  CHECK(p.recency_share[0].item<double>() < 0.05);
  CHECK(p.anchor_mask.sizes() == at::IntArrayRef({2, N}));
  CHECK(p.anchor_mask[0][0].item<bool>());
  CHECK(p.anchor_mask[0].sum().item<int64_t>() >= 1);
  CHECK(p.anchor_share[0].item<double>() > 0.5);
  CHECK(!p.anchor_mask[1].any().item<bool>());  // each position is hit by one query of 8 < 0.9 * 8
  // Clusters in order of creation: the sink (0), then the directions of positions 1, 2, 3 (ids 1, 2, 3).
  CHECK(p.cluster_count[0].item<int64_t>() == 4);
  at::Tensor expect = (at::arange(N) - 1).remainder(3) + 1;
  expect[0] = 0;
  CHECK(at::equal(p.cluster_id[0], expect));
  // Uniform baseline of a window of 1: (1/Q) sum_i 1 / (N - Q + i + 1).
  double u = 0.0;
  for (int64_t i = 0; i < Q; ++i) u += 1.0 / static_cast<double>(N - Q + i + 1);
  CHECK_NEAR(p.recency_uniform[0].item<double>(), u / Q, 1e-12);
  // Top clusters hold everything when there are fewer clusters than top_clusters.
  CHECK_NEAR(p.cluster_top_share[0].item<double>(), 1.0, 1e-12);
  opt.top_clusters = 1;
  auto p1 = kvprec::attention_locality(q, k, 1.0, true, opt);
  CHECK(p1.cluster_top_share[0].item<double>() > 0.5);  // the sink's cluster
  opt.anchor_fraction = 0.0;
  CHECK_THROWS(kvprec::attention_locality(q, k, 1.0, true, opt), "anchor_fraction");
  // Leader clustering: threshold 1 keeps only identical directions together; -1 puts everything in one.
  CHECK(kvprec::leader_clusters(k[1], -1.0).second == 1);
  CHECK(kvprec::leader_clusters(at::cat({k[1], k[1] * 2.0}), 1.0 - 1e-12).second == N);
}

}  // namespace

int main() {
  test_closed_form_vs_finite_differences();
  test_shapes_gqa_batch_dtype();
  test_errors();
  test_reductions();
  test_add_reduced_equals_add();
  test_add_reduced_errors();
  test_locality();
  return kvprec_test::finish("test_curvature");
}
