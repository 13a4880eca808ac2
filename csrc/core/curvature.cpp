// Attention curvature and locality patterns (CPU, ATen). Formulas and conventions: kvprec/curvature.h; the
// pure-torch oracle is kvprec/analysis/curvature.py.
#include "kvprec/curvature.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace kvprec {
namespace {

// Working set of one chunk of queries: about this many FP64 elements per [B, Hq, C, N] temporary (16 MiB), so a
// long calibration sequence never materialises its full [Hq, Q, N] attention map in the reductions.
constexpr int64_t kChunkElements = int64_t{1} << 21;

struct Inputs {
  at::Tensor q, k, v;  // 4-D, FP64, contiguous
  at::Tensor vn;       // ||v_t||^2 [B, Hkv, N], once for all chunks
  bool batched = false;
  int64_t B = 0, Hq = 0, Hkv = 0, G = 0, Q = 0, N = 0, D = 0, Dv = 0;
  double scale = 0.0;
  bool causal = true;
  at::ScalarType out_dtype = at::kFloat;
};

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating tensor (float32, float64, float16, bfloat16), got ", t.scalar_type());
  TORCH_CHECK_VALUE(at::isfinite(t).all().item<bool>(), op, ": ", name, " contains non-finite values");
}

Inputs prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v, double scale,
               bool causal) {
  check_float(op, "q", q);
  check_float(op, "k", k);
  TORCH_CHECK_VALUE(q.dim() == 3 || q.dim() == 4, op, ": q must be [Hq, Q, D] or [B, Hq, Q, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == q.dim(), op, ": k must have q's rank (", q.dim(), "): [Hkv, N, D] or [B, Hkv, N, D], got shape ",
              k.sizes());
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": q and k must be on one device, got ", q.device(), " and ", k.device());
  Inputs in;
  in.batched = q.dim() == 4;
  in.q = (in.batched ? q : q.unsqueeze(0)).to(at::kDouble).contiguous();
  in.k = (in.batched ? k : k.unsqueeze(0)).to(at::kDouble).contiguous();
  in.B = in.q.size(0);
  in.Hq = in.q.size(1);
  in.Q = in.q.size(2);
  in.D = in.q.size(3);
  in.Hkv = in.k.size(1);
  in.N = in.k.size(2);
  TORCH_CHECK_VALUE(in.k.size(0) == in.B, op, ": k has batch ", in.k.size(0), " but q has batch ", in.B);
  TORCH_CHECK_VALUE(in.k.size(3) == in.D, op, ": k has head_dim ", in.k.size(3), " but q has head_dim ", in.D);
  TORCH_CHECK_VALUE(in.B >= 1 && in.Hq >= 1 && in.Q >= 1 && in.D >= 1 && in.Hkv >= 1 && in.N >= 1, op,
              ": empty input: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK_VALUE(in.Hq % in.Hkv == 0, op, ": query heads (", in.Hq, ") must be a multiple of KV heads (", in.Hkv,
              ") for GQA");
  in.G = in.Hq / in.Hkv;
  TORCH_CHECK_VALUE(!causal || in.Q <= in.N, op, ": causal alignment puts query i at position N - Q + i, so it needs Q <= N; got Q=",
              in.Q, ", N=", in.N);
  if (v != nullptr) {
    check_float(op, "v", *v);
    TORCH_CHECK_VALUE(v->dim() == q.dim(), op, ": v must be [Hkv, N, Dv] (or [B, Hkv, N, Dv]) like k, got shape ", v->sizes());
    in.v = (in.batched ? *v : v->unsqueeze(0)).to(at::kDouble).contiguous();
    TORCH_CHECK_VALUE(in.v.size(0) == in.B && in.v.size(1) == in.Hkv && in.v.size(2) == in.N, op,
                ": v must match k in batch, heads and positions; k ", k.sizes(), ", v ", v->sizes());
    TORCH_CHECK_VALUE(v->device() == q.device(), op, ": v must be on q's device ", q.device());
    in.Dv = in.v.size(3);
    in.vn = in.v.pow(2).sum(-1).contiguous();
  }
  in.scale = resolve_scale(scale, in.D);
  in.causal = causal;
  in.out_dtype = (q.scalar_type() == at::kDouble && k.scalar_type() == at::kDouble &&
                  (v == nullptr || v->scalar_type() == at::kDouble))
                     ? at::kDouble
                     : at::kFloat;
  return in;
}

int64_t chunk_queries(const Inputs& in) {
  const int64_t per_query = std::max<int64_t>(1, in.B * in.Hq * in.N);
  return std::clamp<int64_t>(kChunkElements / per_query, 1, in.Q);
}

// Position p_i = N - Q + i of queries i0 .. i0 + C - 1, FP64 [C, 1].
at::Tensor query_positions(const Inputs& in, int64_t i0, int64_t C) {
  return at::arange(in.N - in.Q + i0, in.N - in.Q + i0 + C, in.q.options()).unsqueeze(1);
}

at::Tensor key_positions(const Inputs& in) { return at::arange(in.N, in.q.options()).unsqueeze(0); }  // [1, N]

// Attention weights of queries [i0, i0 + C): [B, Hkv, G, C, N] (a view of a [B, Hkv, G*C, N] tensor), and
// the chunk's queries as [B, Hkv, G*C, D].
std::pair<at::Tensor, at::Tensor> chunk_attention(const Inputs& in, int64_t i0, int64_t C) {
  at::Tensor qc = in.q.view({in.B, in.Hkv, in.G, in.Q, in.D}).narrow(3, i0, C).reshape({in.B, in.Hkv, in.G * C, in.D});
  at::Tensor s = at::matmul(qc, in.k.transpose(-1, -2)).mul_(in.scale);  // [B, Hkv, G*C, N]
  at::Tensor s5 = s.view({in.B, in.Hkv, in.G, C, in.N});
  if (in.causal) s5.masked_fill_(key_positions(in) > query_positions(in, i0, C), -std::numeric_limits<double>::infinity());
  return {at::softmax(s, -1).view({in.B, in.Hkv, in.G, C, in.N}), qc};
}

// Where the closed form goes: per-element outputs [B, Hkv, G*C, N] and/or per-position accumulators [B, Hkv, N]
// (undefined tensors are skipped). One fused pass over the chunk: the element-wise chain written with tensor ops
// made ~8 passes over [B, Hq, C, N] and took 70% of the time.
struct Sinks {
  at::Tensor jac, hess, kappa;  // written
  at::Tensor sum, max;          // accumulated (kappa >= 0, masked entries are 0: neutral for both)
};

// The closed form on queries [i0, i0 + C): returns the attention weights a [B, Hkv, G, C, N] FP64.
at::Tensor chunk_curvature(const Inputs& in, int64_t i0, int64_t C, const Sinks& out) {
  auto [a5, qc] = chunk_attention(in, i0, C);
  const int64_t GC = in.G * C, N = in.N;
  const at::Tensor a = a5.reshape({in.B, in.Hkv, GC, N});                         // contiguous (a view)
  const at::Tensor o = at::matmul(a, in.v);                                        // [B, Hkv, GC, Dv]
  const at::Tensor cross = at::matmul(o, in.v.transpose(-1, -2)).contiguous();     // o_i . v_t
  const at::Tensor on = o.pow(2).sum(-1).contiguous();                             // [B, Hkv, GC]
  const at::Tensor qn = qc.norm(2, -1).contiguous();                               // [B, Hkv, GC]
  const double s = in.scale;
  const double* pa = a.data_ptr<double>();
  const double* pc = cross.data_ptr<double>();
  const double* pvn = in.vn.data_ptr<double>();
  const double* pon = on.data_ptr<double>();
  const double* pqn = qn.data_ptr<double>();
  double* pj = out.jac.defined() ? out.jac.data_ptr<double>() : nullptr;
  double* ph = out.hess.defined() ? out.hess.data_ptr<double>() : nullptr;
  double* pk = out.kappa.defined() ? out.kappa.data_ptr<double>() : nullptr;
  double* psum = out.sum.defined() ? out.sum.data_ptr<double>() : nullptr;
  double* pmax = out.max.defined() ? out.max.data_ptr<double>() : nullptr;
  // One (batch row, KV head) per task: its accumulator row is written by that task only.
  at::parallel_for(0, in.B * in.Hkv, 1, [&](int64_t bh0, int64_t bh1) {
    for (int64_t bh = bh0; bh < bh1; ++bh)
      for (int64_t r = bh * GC; r < (bh + 1) * GC; ++r) {
        const double qn1 = pqn[r], qn2 = qn1 * qn1;
        for (int64_t t = 0; t < N; ++t) {
          const int64_t e = r * N + t;
          const double at_ = pa[e];
          // ||v_t - o||^2 = ||v_t||^2 + ||o||^2 - 2 o.v_t, clamped: the expansion can round below zero.
          const double dist = std::sqrt(std::max(0.0, pvn[bh * N + t] + pon[r] - 2.0 * pc[e]));
          const double jac = s * at_ * dist * qn1;
          const double hess = s * s * at_ * std::fabs(1.0 - 2.0 * at_) * dist * qn2;
          const double kappa = at_ * jac * hess;
          if (pj != nullptr) pj[e] = jac;
          if (ph != nullptr) ph[e] = hess;
          if (pk != nullptr) pk[e] = kappa;
          if (psum != nullptr) psum[bh * N + t] += kappa;
          if (pmax != nullptr) pmax[bh * N + t] = std::max(pmax[bh * N + t], kappa);
        }
      }
  });
  return a5;
}

at::Tensor finish(const at::Tensor& x5, const Inputs& in) {  // [B, Hkv, G, Q, N] -> [B?, Hq, Q, N]
  at::Tensor x = x5.reshape({in.B, in.Hq, x5.size(3), x5.size(4)}).to(in.out_dtype);
  return in.batched ? x : x.squeeze(0);
}

// Number of (query head, query) pairs of chunk [i0, i0 + C) that see each position: FP64 [N].
at::Tensor visible_counts(const Inputs& in, int64_t i0, int64_t C) {
  if (!in.causal) return at::full({in.N}, static_cast<double>(in.G * C), in.q.options());
  return (key_positions(in) <= query_positions(in, i0, C)).sum(0).to(at::kDouble).mul_(static_cast<double>(in.G));
}

struct PositionStats {
  at::Tensor sum, max;  // [B, Hkv, N]
  at::Tensor count;     // [N]
};

PositionStats position_stats(const Inputs& in) {
  PositionStats st;
  st.sum = at::zeros({in.B, in.Hkv, in.N}, in.q.options());
  st.max = at::zeros({in.B, in.Hkv, in.N}, in.q.options());  // kappa >= 0
  st.count = at::zeros({in.N}, in.q.options());
  const int64_t step = chunk_queries(in);
  for (int64_t i0 = 0; i0 < in.Q; i0 += step) {
    const int64_t C = std::min(step, in.Q - i0);
    chunk_curvature(in, i0, C, {at::Tensor(), at::Tensor(), at::Tensor(), st.sum, st.max});
    st.count.add_(visible_counts(in, i0, C));
  }
  return st;
}

}  // namespace

double resolve_scale(double scale, int64_t head_dim) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale >= 0.0, "scale: ", scale,
              " is not accepted; use a positive softmax scale, or 0 for 1/sqrt(head_dim)");
  return scale == 0.0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : scale;
}

Reduce reduce_from_name(std::string_view name, const char* what) {
  if (name == "mean") return Reduce::Mean;
  if (name == "max") return Reduce::Max;
  if (name == "sum") return Reduce::Sum;
  TORCH_CHECK_VALUE(false, what, ": '", std::string(name), "' is not a reduction; accepted mean, max, sum");
  return Reduce::Mean;
}

const char* reduce_name(Reduce r) {
  switch (r) {
    case Reduce::Mean: return "mean";
    case Reduce::Max: return "max";
    case Reduce::Sum: return "sum";
  }
  return "?";
}

CurvatureResult attention_curvature(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                    bool causal) {
  const Inputs in = prepare("attention_curvature", q, k, &v, scale, causal);
  const std::vector<int64_t> shape = {in.B, in.Hkv, in.G, in.Q, in.N};
  Sinks out;
  out.jac = at::empty(shape, in.q.options());
  out.hess = at::empty(shape, in.q.options());
  out.kappa = at::empty(shape, in.q.options());
  at::Tensor a = chunk_curvature(in, 0, in.Q, out);
  return {finish(out.kappa, in), finish(a, in), finish(out.jac, in), finish(out.hess, in)};
}

at::Tensor block_reduce(const at::Tensor& position, int64_t block_size, Reduce r) {
  TORCH_CHECK_VALUE(block_size >= 1, "block_size: ", block_size, " is not accepted; use a positive number of positions");
  TORCH_CHECK_VALUE(position.dim() >= 1 && position.size(-1) >= 1, "block_reduce: position must be [..., N] with N >= 1, got ",
              position.sizes());
  const int64_t n = position.size(-1);
  const int64_t nb = (n + block_size - 1) / block_size;
  const int64_t pad = nb * block_size - n;
  const double fill = r == Reduce::Max ? -std::numeric_limits<double>::infinity() : 0.0;
  at::Tensor x = at::constant_pad_nd(position.to(at::kDouble), {0, pad}, fill);
  std::vector<int64_t> shape(position.sizes().begin(), position.sizes().end() - 1);
  shape.push_back(nb);
  shape.push_back(block_size);
  x = x.view(shape);
  if (r == Reduce::Max) return x.amax(-1);
  at::Tensor s = x.sum(-1);
  if (r == Reduce::Sum) return s;
  at::Tensor counts = at::full({nb}, static_cast<double>(block_size), s.options());
  counts[nb - 1] = static_cast<double>(n - (nb - 1) * block_size);
  return s / counts;
}

CurvatureMap curvature_reduce(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal,
                              int64_t block_size, Reduce query_reduce, Reduce block_reduce_kind) {
  const Inputs in = prepare("curvature_reduce", q, k, &v, scale, causal);
  TORCH_CHECK_VALUE(block_size >= 1, "curvature_reduce: block_size ", block_size, " is not accepted; use a positive size");
  PositionStats st = position_stats(in);
  at::Tensor pos;
  switch (query_reduce) {
    case Reduce::Mean: pos = st.sum / st.count.clamp_min(1.0); break;  // causal: every t is seen by query Q-1
    case Reduce::Max: pos = st.max; break;
    case Reduce::Sum: pos = st.sum; break;
  }
  if (!in.batched) pos = pos.squeeze(0);
  return {pos, block_reduce(pos, block_size, block_reduce_kind)};
}

// ---- accumulator ----------------------------------------------------------------------------------------

CurvatureAccumulator::CurvatureAccumulator(int64_t kv_heads, double scale, bool causal)
    : kv_heads_(kv_heads), scale_(scale), causal_(causal) {
  TORCH_CHECK_VALUE(kv_heads >= 1, "CurvatureAccumulator: kv_heads ", kv_heads, " is not accepted; use >= 1");
  resolve_scale(scale, 1);  // validates; the head_dim-dependent default is resolved per input
}

void CurvatureAccumulator::add(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(kv_heads_ >= 1, "CurvatureAccumulator::add: default-constructed accumulator; give it kv_heads");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK_VALUE(!t->defined() || t->device().is_cpu(), "CurvatureAccumulator::add: q, k, v must be CPU tensors, "
                      "got ", t->device(), "; on a GPU reduce them there (curvature_reduce with Reduce::Sum and "
                      "Reduce::Max) and pass the results to add_reduced");
  const Inputs in = prepare("CurvatureAccumulator::add", q, k, &v, scale_, causal_);
  TORCH_CHECK_VALUE(in.Hkv == kv_heads_, "CurvatureAccumulator::add: k has ", in.Hkv, " KV heads, the accumulator ", kv_heads_);
  PositionStats st = position_stats(in);
  at::Tensor c = (st.count * static_cast<double>(in.B)).unsqueeze(0).expand({in.Hkv, in.N});
  accumulate(st.sum.sum(0), st.max.amax(0), c, in.B);
}

void CurvatureAccumulator::add_reduced(const at::Tensor& pos_sum, const at::Tensor& pos_max, const at::Tensor& count) {
  constexpr const char* op = "CurvatureAccumulator::add_reduced";
  TORCH_CHECK_VALUE(kv_heads_ >= 1, op, ": default-constructed accumulator; give it kv_heads");
  TORCH_CHECK_VALUE(pos_sum.defined() && pos_max.defined() && count.defined(), op,
                    ": pos_sum, pos_max and count must be defined tensors");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"pos_sum", &pos_sum}, {"pos_max", &pos_max},
                         {"count", &count}})
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor (copy the reduced statistics to the "
                      "host), got ", t->device());
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"pos_sum", &pos_sum}, {"pos_max", &pos_max}})
    TORCH_CHECK_VALUE(at::isFloatingType(t->scalar_type()), op, ": ", name,
                      " must be a floating tensor (float64 preferred; float32, float16, bfloat16 are widened), got ",
                      t->scalar_type());
  TORCH_CHECK_VALUE(count.scalar_type() != at::kBool && !at::isComplexType(count.scalar_type()), op,
                    ": count must be a floating or integer tensor, got ", count.scalar_type());
  TORCH_CHECK_VALUE(pos_sum.dim() == 2 || pos_sum.dim() == 3, op,
                    ": pos_sum must be [Hkv, N] or [B, Hkv, N], got shape ", pos_sum.sizes());
  TORCH_CHECK_VALUE(pos_max.sizes() == pos_sum.sizes(), op, ": pos_max must have pos_sum's shape ", pos_sum.sizes(),
                    ", got ", pos_max.sizes());
  const int64_t B = pos_sum.dim() == 3 ? pos_sum.size(0) : 1, H = pos_sum.size(-2), N = pos_sum.size(-1);
  TORCH_CHECK_VALUE(B >= 1 && N >= 1, op, ": empty statistics: pos_sum ", pos_sum.sizes());
  TORCH_CHECK_VALUE(H == kv_heads_, op, ": pos_sum has ", H, " KV heads, the accumulator ", kv_heads_);
  TORCH_CHECK_VALUE((count.dim() == 1 && count.size(0) == N) ||
                        (count.dim() == 2 && count.size(0) == H && count.size(1) == N),
                    op, ": count must be [N] or [Hkv, N] = [", N, "] or [", H, ", ", N, "] (pos_sum ", pos_sum.sizes(),
                    "), got ", count.sizes());
  at::Tensor s = pos_sum.to(at::kDouble), m = pos_max.to(at::kDouble);
  at::Tensor c = count.to(at::kDouble);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"pos_sum", &s}, {"pos_max", &m}, {"count", &c}})
    TORCH_CHECK_VALUE(at::isfinite(*t).all().item<bool>() && (*t >= 0).all().item<bool>(), op, ": ", name,
                      " must be finite and >= 0 (kappa and counts are)");
  if (s.dim() == 3) {
    s = s.sum(0);
    m = m.amax(0);
  }
  c = c.dim() == 1 ? c.unsqueeze(0).expand({H, N}) : c;
  TORCH_CHECK_VALUE(((c > 0) | ((s == 0) & (m == 0))).all().item<bool>(), op,
                    ": count is 0 at a position where pos_sum or pos_max is not: every position with curvature was "
                    "seen by some (query head, query); count_t = B * G * (causal ? min(Q, N - t) : Q)");
  accumulate(s, m, c, B);
}

void CurvatureAccumulator::accumulate(const at::Tensor& s, const at::Tensor& m, const at::Tensor& c, int64_t inputs) {
  const int64_t N = s.size(1);
  const int64_t n_old = max_len();
  if (N > n_old) {
    auto grow = [&](const at::Tensor& t) {
      at::Tensor z = at::zeros({kv_heads_, N}, s.options());
      if (t.defined()) z.narrow(1, 0, n_old).copy_(t);
      return z;
    };
    sum_ = grow(sum_);
    max_ = grow(max_);
    count_ = grow(count_);
  }
  sum_.narrow(1, 0, N).add_(s);
  max_.narrow(1, 0, N).copy_(at::maximum(max_.narrow(1, 0, N), m));
  count_.narrow(1, 0, N).add_(c);
  inputs_ += inputs;
}

at::Tensor CurvatureAccumulator::mean() const {
  TORCH_CHECK_VALUE(sum_.defined(), "CurvatureAccumulator: no calibration input was added");
  return at::where(count_ > 0, sum_ / count_.clamp_min(1.0), at::zeros_like(sum_));
}

at::Tensor CurvatureAccumulator::block(int64_t block_size, Reduce query_reduce, Reduce block_reduce_kind) const {
  TORCH_CHECK_VALUE(sum_.defined(), "CurvatureAccumulator: no calibration input was added");
  const at::Tensor& pos = query_reduce == Reduce::Mean ? mean() : query_reduce == Reduce::Max ? max_ : sum_;
  return block_reduce(pos, block_size, block_reduce_kind);
}

// ---- locality -------------------------------------------------------------------------------------------

void LocalityOptions::check() const {
  TORCH_CHECK_VALUE(window >= 1, "window: ", window, " is not accepted; use >= 1 positions");
  TORCH_CHECK_VALUE(std::isfinite(anchor_factor) && anchor_factor > 0.0, "anchor_factor: ", anchor_factor,
              " is not accepted; use a positive multiple of the uniform weight (default 4)");
  TORCH_CHECK_VALUE(anchor_fraction > 0.0 && anchor_fraction <= 1.0, "anchor_fraction: ", anchor_fraction,
              " is not accepted; use a fraction of queries in (0, 1] (default 0.9)");
  TORCH_CHECK_VALUE(cluster_threshold >= -1.0 && cluster_threshold <= 1.0, "cluster_threshold: ", cluster_threshold,
              " is not accepted; use a cosine similarity in [-1, 1] (default 0.8)");
  TORCH_CHECK_VALUE(top_clusters >= 1, "top_clusters: ", top_clusters, " is not accepted; use >= 1");
}

std::pair<at::Tensor, int64_t> leader_clusters(const at::Tensor& keys, double threshold) {
  TORCH_CHECK_VALUE(keys.dim() == 2, "leader_clusters: keys must be [N, D], got shape ", keys.sizes());
  at::Tensor x = keys.to(at::kDouble).cpu().contiguous();  // a sequential scan: host code
  at::Tensor norm = x.norm(2, -1, /*keepdim=*/true);
  x = at::where(norm > 0, x / norm.clamp_min(std::numeric_limits<double>::min()), at::zeros_like(x)).contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  const double* px = x.data_ptr<double>();
  at::Tensor ids = at::empty({n}, at::kLong);
  int64_t* pid = ids.data_ptr<int64_t>();
  std::vector<int64_t> leaders;  // position of each cluster's first key
  for (int64_t t = 0; t < n; ++t) {
    const double* kt = px + t * d;
    int64_t best = -1;
    double best_cos = -std::numeric_limits<double>::infinity();
    for (size_t c = 0; c < leaders.size(); ++c) {
      const double* kl = px + leaders[c] * d;
      double dot = 0.0;
      for (int64_t j = 0; j < d; ++j) dot += kt[j] * kl[j];
      if (dot > best_cos) {  // strict: the earliest cluster wins ties
        best_cos = dot;
        best = static_cast<int64_t>(c);
      }
    }
    if (best >= 0 && best_cos >= threshold) {
      pid[t] = best;
    } else {
      pid[t] = static_cast<int64_t>(leaders.size());
      leaders.push_back(t);
    }
  }
  return {ids, static_cast<int64_t>(leaders.size())};
}

LocalityPatterns attention_locality(const at::Tensor& q, const at::Tensor& k, double scale, bool causal,
                                    const LocalityOptions& options) {
  options.check();
  const Inputs in = prepare("attention_locality", q, k, nullptr, scale, causal);
  auto f64 = in.q.options();
  at::Tensor recency = at::zeros({in.B, in.Hkv, in.G}, f64);
  at::Tensor hits = at::zeros({in.B, in.Hkv, in.G, in.N}, f64);
  at::Tensor colsum = at::zeros({in.B, in.Hkv, in.G, in.N}, f64);
  double uniform = 0.0;
  const double w = static_cast<double>(options.window);
  const int64_t step = chunk_queries(in);
  for (int64_t i0 = 0; i0 < in.Q; i0 += step) {
    const int64_t C = std::min(step, in.Q - i0);
    at::Tensor a = chunk_attention(in, i0, C).first;  // [B, Hkv, G, C, N]
    at::Tensor p = query_positions(in, i0, C), t = key_positions(in);
    at::Tensor window = ((t <= p) & (t > p - w)).to(at::kDouble);                      // [C, N]
    at::Tensor n_vis = in.causal ? p + 1.0 : at::full_like(p, static_cast<double>(in.N));  // [C, 1]
    recency.add_((a * window).sum({3, 4}));
    hits.add_((a > (options.anchor_factor / n_vis)).sum(3).to(at::kDouble));
    colsum.add_(a.sum(3));
    uniform += (at::minimum(p + 1.0, at::full_like(p, w)) / n_vis).sum().item<double>();
  }
  const double Q = static_cast<double>(in.Q);
  at::Tensor anchor = hits >= options.anchor_fraction * Q;
  at::Tensor anchor_share = (colsum * anchor).sum(-1) / Q;

  at::Tensor ids = at::empty({in.B, in.Hkv, in.N}, at::kLong);
  at::Tensor counts = at::empty({in.B, in.Hkv}, at::kLong);
  at::Tensor top = at::empty({in.B, in.Hkv, in.G}, f64);
  for (int64_t b = 0; b < in.B; ++b) {
    for (int64_t h = 0; h < in.Hkv; ++h) {
      auto [cid, count] = leader_clusters(in.k[b][h], options.cluster_threshold);
      ids[b][h].copy_(cid);
      counts[b][h] = count;
      const int64_t m = std::min(options.top_clusters, count);
      for (int64_t g = 0; g < in.G; ++g) {
        at::Tensor mass = at::zeros({count}, f64).index_add_(0, cid, colsum[b][h][g]) / Q;
        top[b][h][g] = std::get<0>(at::topk(mass, m)).sum();
      }
    }
  }
  auto heads = [&](const at::Tensor& x) {  // [B, Hkv, G, ...] -> [B?, Hq, ...]
    std::vector<int64_t> shape = {in.B, in.Hq};
    for (int64_t d = 3; d < x.dim(); ++d) shape.push_back(x.size(d));
    at::Tensor y = x.reshape(shape);
    return in.batched ? y : y.squeeze(0);
  };
  auto kv = [&](const at::Tensor& x) { return in.batched ? x : x.squeeze(0); };
  LocalityPatterns out;
  out.recency_share = heads(recency / Q);
  out.recency_uniform = heads(at::full({in.B, in.Hkv, in.G}, uniform / Q, f64));
  out.anchor_mask = heads(anchor);
  out.anchor_share = heads(anchor_share);
  out.cluster_id = kv(ids.to(q.device()));
  out.cluster_count = kv(counts.to(q.device()));
  out.cluster_top_share = heads(top);
  return out;
}

}  // namespace kvprec
