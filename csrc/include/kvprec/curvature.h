// Attention curvature: how sensitive one attention output is to a perturbation of one cached key, in closed
// form, and the locality patterns of the attention maps that explain where the sensitivity sits.
//
// ---- The closed form (docs/design.md, "Precision policy") -------------------------------------------------
// One query q [D], keys K [N, D], values V [N, Dv], scale s (0 means 1/sqrt(D)):
//   s_t = s * q.K_t,   a = softmax(s_.),   o = sum_t a_t v_t                                 [Dv]
// Softmax derivative d a_u / d s_t = a_u (delta_ut - a_t), hence
//   d o / d s_t     = sum_u v_u a_u (delta_ut - a_t) = a_t (v_t - o)
//   d^2 o / d s_t^2 = d/ds_t [a_t (v_t - o)] = a_t (1 - a_t)(v_t - o) - a_t * a_t (v_t - o)
//                   = a_t (1 - 2 a_t)(v_t - o).
// s_t is linear in K_t with d s_t / d K_t = s * q, so
//   J_t = d o / d K_t       = s a_t (v_t - o) q^T                      [Dv, D], rank one
//   H_t = d^2 o / d K_t^2   = s^2 a_t (1 - 2 a_t) (v_t - o) (x) q (x) q   [Dv, D, D]
// and their Frobenius norms are products of vector norms:
//   ||J_t|| = s a_t ||v_t - o|| ||q||
//   ||H_t|| = s^2 a_t |1 - 2 a_t| ||v_t - o|| ||q||^2
//   kappa_t = a_t ||J_t|| ||H_t|| = s^3 a_t^3 |1 - 2 a_t| ||v_t - o||^2 ||q||^3.
// Note what the formula says: kappa vanishes where a_t = 0 (unattended), where v_t = o (the output already
// equals that value) and at a_t = 1/2 (the inflection point of the logistic a_t(s_t), where the second
// derivative changes sign). Positions masked by causality have a_t = 0 and kappa 0.
// Checked against autograd (python_tests/test_curvature.py) and finite differences (csrc/tests/test_curvature.cpp).
//
// ---- Shapes and conventions ---------------------------------------------------------------------------
//   q [Hq, Q, D] or [B, Hq, Q, D];  k [Hkv, N, D], v [Hkv, N, Dv] (same rank as q, same B).
//   GQA: query head h reads KV head h / (Hq / Hkv) (Hq must be a multiple of Hkv).
//   causal: bottom-right alignment, query i sits at position p_i = N - Q + i and sees t <= p_i (needs Q <= N).
//   Not causal: every query sees every position; p_i = N - Q + i is still its position (for recency).
// Arithmetic is FP64 inside: ||v_t - o||^2 is formed as ||v_t||^2 - 2 v_t.o + ||o||^2 (a matmul instead of a
// [Q, N, Dv] difference tensor), which cancels when a_t -> 1; FP64 keeps that error near 1e-16 ||v||^2.
// Results are FP32 for FP16/BF16/FP32 inputs and FP64 for FP64 inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string_view>
#include <utility>

namespace kvprec {

// 0 -> 1/sqrt(head_dim); negative or non-finite -> error naming the argument.
double resolve_scale(double scale, int64_t head_dim);

// Per query, head and position: kappa, a (attention weights), ||J||, ||H||, each [B?, Hq, Q, N] (B present when q
// has it). Materialises [B, Hq, Q, N] four times: for long calibration runs use curvature_reduce or
// CurvatureAccumulator, which work in chunks of queries.
struct CurvatureResult {
  at::Tensor kappa, attn, jac_norm, hess_norm;
};
CurvatureResult attention_curvature(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                    bool causal);

// How values are combined: over queries (and the query heads of a GQA group), over the positions of a block.
enum class Reduce : int8_t { Mean = 0, Max = 1, Sum = 2 };
Reduce reduce_from_name(std::string_view name, const char* what);  // "mean" | "max" | "sum"
const char* reduce_name(Reduce r);

// Per KV head and position, reduced over the Hq/Hkv query heads of the group and the queries that see the
// position (causal: queries i with p_i >= t; else all Q): position [B?, Hkv, N], FP64.
//   Mean: the average over those (head, query) pairs; Max: the largest; Sum: the total.
// Then per block of block_size positions (the last block may be partial): block [B?, Hkv, ceil(N / T)], FP64.
//   Max (the default of the mapper's threshold mode): a block gets one tier, so it must satisfy the bound of
//   its most sensitive position. Sum (the budget modes): the predicted errors of positions add up, so the
//   error of giving a block a tier is proportional to its summed curvature. Mean: Sum / positions in block.
struct CurvatureMap {
  at::Tensor position, block;
};
CurvatureMap curvature_reduce(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal,
                              int64_t block_size, Reduce query_reduce, Reduce block_reduce);

// position [..., N] -> [..., ceil(N / block_size)] with `r` over each block (Mean divides by the positions present).
at::Tensor block_reduce(const at::Tensor& position, int64_t block_size, Reduce r);

// Aggregates per-position curvature of one layer over calibration inputs of possibly different lengths N:
// position t of every input is the same slot (inputs are aligned at their first token, where attention
// sinks and other positional anchors live). Each batch row counts as one input. Statistics over all
// (input, query head of the group, query that sees t): sum, max and count, [Hkv, N_max], FP64.
class CurvatureAccumulator {
 public:
  CurvatureAccumulator() = default;
  CurvatureAccumulator(int64_t kv_heads, double scale, bool causal);

  // q [B?, Hq, Q, D], k [B?, Hkv, N, D], v [B?, Hkv, N, Dv], CPU tensors: the closed form in FP64, reduced here.
  void add(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

  // The statistics of one calibration input that a kernel has already reduced (for example on the GPU, by the
  // Triton curvature reduction kvprec/ops/triton/curvature.py), so that only [B?, Hkv, N] crosses to the host:
  //   pos_sum [B?, Hkv, N]  per batch row, KV head and position: the sum of kappa over the group's query heads
  //                         and the queries that see t;
  //   pos_max [B?, Hkv, N]  the max over the same (query head, query) pairs;
  //   count   [N] or [Hkv, N]  the number of (batch row, query head, query) triples that see t:
  //                         count_t = B * G * (causal ? min(Q, N - t) : Q),  G = Hq / Hkv
  //                         (query i sits at N - Q + i and, causal, sees t <= N - Q + i).
  // Equivalence: with pos_sum = curvature_reduce(q, k, v, s, c, T, Reduce::Sum, *).position, pos_max = the same
  // with Reduce::Max, and count as above, add_reduced(pos_sum, pos_max, count) accumulates exactly what
  // add(q, k, v) accumulates for an accumulator of scale s and causality c: bit for bit from this file's
  // curvature_reduce (csrc/tests/test_curvature.cpp), within the producing kernel's tolerance from another one.
  // The scale, causality and head_dim the statistics were computed with are not visible here: matching them is
  // the caller's part. A 2-D pos_sum is one input; a 3-D one is B inputs. Floating pos_sum / pos_max (converted
  // to FP64), a floating or integer count; CPU tensors (the statistics are host-side, small), all finite and
  // >= 0, and count > 0 wherever pos_sum or pos_max is (a position no query saw has no curvature).
  void add_reduced(const at::Tensor& pos_sum, const at::Tensor& pos_max, const at::Tensor& count);

  int64_t kv_heads() const { return kv_heads_; }
  int64_t inputs() const { return inputs_; }
  int64_t max_len() const { return sum_.defined() ? sum_.size(1) : 0; }
  at::Tensor sum() const { return sum_; }
  at::Tensor max() const { return max_; }
  at::Tensor count() const { return count_; }
  // Mean over (input, head, query) per slot; a slot no query saw is 0 (no evidence of curvature).
  at::Tensor mean() const;
  // position statistic (Mean or Max; Sum = sum()) reduced per block: [Hkv, ceil(N_max / T)].
  at::Tensor block(int64_t block_size, Reduce query_reduce, Reduce block_reduce) const;

 private:
  // The one place statistics are added: s, m, c FP64 [Hkv, N] on one device, `inputs` calibration rows.
  void accumulate(const at::Tensor& s, const at::Tensor& m, const at::Tensor& c, int64_t inputs);

  int64_t kv_heads_ = 0;
  double scale_ = 0.0;
  bool causal_ = true;
  int64_t inputs_ = 0;
  at::Tensor sum_, max_, count_;
};

// ---- Locality patterns ------------------------------------------------------------------------------------
// Computed from the attention weights a_{i,t} of each query head (same q/k conventions as above). n_i is the
// number of positions query i sees (causal: p_i + 1; else N), so 1 / n_i is the uniform weight.
//
// Recency bias (StreamingLLM's local window, arXiv:2309.17453):
//   recency_share[h]   = (1/Q) sum_i sum_{t in (p_i - w, p_i]} a_{i,t}           the mass on the last w positions
//   recency_uniform[h] = (1/Q) sum_i |(p_i - w, p_i] n [0, n_i)| / n_i             the same under uniform attention
// Positional anchors (attention sinks, StreamingLLM; heavy hitters, H2O arXiv:2306.14048):
//   t is an anchor of head h iff #{i : a_{i,t} > k / n_i} >= f * Q, i.e. it receives more than k times the
//   uniform weight in at least a fraction f of all Q queries (queries that cannot see t count against it).
//   anchor_mask [h, t]; anchor_share[h] = (1/Q) sum_i sum_{t anchor} a_{i,t}.
// Semantic clustering (keys that are close in direction share attention):
//   per KV head, leader clustering of the keys by cosine similarity (Hartigan 1975, "leader" algorithm):
//   keys in position order; key t joins the existing cluster whose leader (first key) has the highest cosine
//   with it if that cosine >= tau, otherwise it leads a new cluster. A zero key has cosine 0 with everything.
//   cluster_id [Hkv, N] (0-based, in order of creation), cluster_count [Hkv];
//   cluster_top_share[h] = sum of the m largest cluster masses M_c = (1/Q) sum_i sum_{t in c} a_{i,t}
//   (the clusters of query head h's KV head; m = min(top_clusters, cluster_count)).
struct LocalityOptions {
  int64_t window = 64;              // w: one default block
  double anchor_factor = 4.0;       // k: well above uniform, below a sink's typical share
  double anchor_fraction = 0.9;     // f: "keeps" high attention: nearly every query
  double cluster_threshold = 0.8;   // tau
  int64_t top_clusters = 4;         // m
  void check() const;
};

// Shapes: [B?, Hq] for the shares, anchor_mask bool [B?, Hq, N], cluster_id int64 [B?, Hkv, N],
// cluster_count int64 [B?, Hkv]; shares FP64.
struct LocalityPatterns {
  at::Tensor recency_share, recency_uniform, anchor_mask, anchor_share, cluster_id, cluster_count, cluster_top_share;
};
LocalityPatterns attention_locality(const at::Tensor& q, const at::Tensor& k, double scale, bool causal,
                                    const LocalityOptions& options);

// Leader clustering of one set of keys [N, D] (any float dtype): cluster ids int64 [N] and the count.
std::pair<at::Tensor, int64_t> leader_clusters(const at::Tensor& keys, double threshold);

}  // namespace kvprec
