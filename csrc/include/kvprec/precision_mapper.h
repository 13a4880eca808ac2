// PrecisionMapper: from curvature to precision tiers, by threshold, under a byte budget, or under an error
// budget. Torch-free (std::vector); the op glue is csrc/python/ops_analysis.cpp, the Python mirror and
// brute-force oracle kvprec/analysis/precision.py.
//
// ---- Required bits (docs/design.md, "Precision policy") --------------------------------------------------------
// The precision obstruction bound: storing K_t with unit roundoff u = 2^-p perturbs the attention output by
// about c * kappa_t * D^2 * u, so keeping that below eps needs
//     p_t = log2(c * kappa_t * D^2 / eps)          (kappa_t = 0 -> -inf: any tier will do)
// with kappa_t from kvprec/curvature.h and D the head dimension. Defaults:
//   c   = 1       the bound's constant is O(1) and model dependent; 1 is the bare leading-order term, with no
//                 safety factor. c only shifts every p_t by log2(c), so it is the knob to calibrate against
//                 measured output error.
//   eps = 2^-11   the unit roundoff of FP16, the dtype attention runs in: ask the cache to add no more error
//                 than rounding the attention output to FP16 already does.
//   D   = head_dim of the block geometry (default 128).
//
// ---- Threshold mode ----------------------------------------------------------------------------------
// tier(p) = the cheapest candidate by page bytes (BlockGeometry::page_bytes) whose tier_effective_bits >= p;
// equal page bytes go to the higher effective bits (FP16 over BF16). If no candidate covers p, the most
// precise candidate (a "saturated" choice; the mapper counts them).
//
// ---- Budget mode: multiple-choice knapsack (MCKP) ----------------------------------------------------
// Items i (a block of one KV head in one layer), choices j (candidate tiers). Giving item i tier j costs
// c_ij bytes (page bytes) and has predicted error, the bound inverted,
//     e_ij = c * kappa_i * D^2 * 2^(-p_eff(j)),
// kappa_i the block's summed curvature (errors of positions add). Minimise sum_i e_i,j(i) subject to
// sum_i c_i,j(i) <= budget.
//   Exact: dynamic programming over cost (Kellerer, Pferschy, Pisinger, "Knapsack Problems", 2004, ch. 11).
//     Each item's cheapest cost is paid up front; the extra costs d_ij = c_ij - min_j c_ij are counted in
//     units of g = gcd of all d_ij (page sizes share large powers of two: 1024 bytes for T=64, D=128, G=64), so
//     the table has W + 1 = floor((budget - sum_i min_j c_ij) / g) + 1 columns, capped at sum_i max_j d_ij / g.
//     O(I * W * J) time, I * (W + 1) bytes for the choice table.
//   Greedy: each item's choices reduced to the lower convex hull of (cost, error) (dominated and non-convex
//     choices dropped); every item starts at its cheapest hull point; hull segments (upgrades) are taken in
//     order of error reduction per byte, an upgrade applying only after the previous one of its item, while
//     the budget allows. The LP relaxation of MCKP is solved by the same order, taking the first upgrade that
//     does not fit fractionally (Sinha & Zoltners, Oper. Res. 27(3), 1979); its value is a lower bound on the
//     optimum, reported so that the gap (error - lower_bound) is known.
//   Auto: exact when I * (W + 1) <= kDpMaxCells (2^25: a 32 MiB choice table, about 10^8 cell updates with
//     J = 4, a fraction of a second), greedy above.
//
// ---- Quality-threshold mode ---------------------------------------------------------------------------
// Minimise sum_i c_i,j(i) subject to sum_i e_i,j(i) <= max_error. Exact: the same DP over all costs
// (W = sum_i max_j d_ij / g); the answer is the cheapest column whose minimum error is <= max_error (the DP's
// cost-error frontier). Greedy: upgrades in the same order until the error is <= max_error; the lower bound is
// on bytes (the LP relaxation: the last upgrade taken fractionally).
// Errors are compared with a relative slack of 1e-12 (sums formed in different orders differ in the last bits).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvprec/formats.h"

namespace kvprec {

constexpr double kDefaultC = 1.0;
constexpr double kDefaultEps = 1.0 / 2048.0;  // 2^-11, FP16 unit roundoff
constexpr int64_t kDpMaxCells = int64_t{1} << 25;

// p = log2(c * kappa * D^2 / eps); kappa >= 0 (0 -> -inf). Throws std::invalid_argument on bad arguments.
double required_bits(double kappa, double c, int64_t head_dim, double eps);
// e = c * kappa * D^2 * 2^(-tier_effective_bits(tier)).
double predicted_error(double kappa, Tier tier, double c, int64_t head_dim);

// ---- knapsack, stand-alone ---------------------------------------------------------------------------------

enum class KnapsackMethod : int8_t { Auto = 0, DP = 1, Greedy = 2 };
KnapsackMethod knapsack_method_from_name(const std::string& name);  // "auto" | "dp" | "greedy"

// errors and costs row-major [items, choices]; errors finite and >= 0, costs >= 0.
struct KnapsackProblem {
  int64_t items = 0;
  int64_t choices = 0;
  std::vector<double> errors;
  std::vector<int64_t> costs;

  void check() const;  // throws std::invalid_argument naming the field
  double error(int64_t i, int64_t j) const { return errors[i * choices + j]; }
  int64_t cost(int64_t i, int64_t j) const { return costs[i * choices + j]; }
  int64_t min_cost() const;     // sum_i min_j c_ij
  int64_t max_cost() const;     // sum_i max_j c_ij
  double min_error() const;     // sum_i min_j e_ij
  // Table cells the exact DP needs for a byte budget (budget mode) or for the whole frontier (budget < 0).
  int64_t dp_cells(int64_t budget) const;
};

struct KnapsackSolution {
  std::vector<int64_t> choice;  // [items]: the chosen j
  double error = 0.0;           // sum_i e_i,choice(i)
  int64_t cost = 0;             // sum_i c_i,choice(i)
  // Budget mode: a lower bound on the optimal error (== error when exact). Quality mode: on the optimal bytes.
  double lower_bound = 0.0;
  bool exact = false;           // solved by the DP
};

// Minimise error subject to cost <= budget. A budget below min_cost() throws std::invalid_argument naming the
// budget and the minimum achievable.
KnapsackSolution solve_budget(const KnapsackProblem& problem, int64_t budget, KnapsackMethod method);
// Minimise cost subject to error <= max_error. A max_error below min_error() throws, naming both.
KnapsackSolution solve_quality(const KnapsackProblem& problem, double max_error, KnapsackMethod method);

// ---- the mapper ----------------------------------------------------------------------------------------------

struct MapperOptions {
  double c = kDefaultC;
  double eps = kDefaultEps;
  BlockGeometry geometry;  // D = geometry.head_dim; page bytes per tier
  std::vector<Tier> candidates = {Tier::INT2, Tier::INT4, Tier::INT8, Tier::FP16};
  void check() const;  // throws std::invalid_argument naming the field
};

class PrecisionMapper {
 public:
  explicit PrecisionMapper(MapperOptions options = {});

  const MapperOptions& options() const { return opts_; }
  // Candidates sorted by (page bytes ascending, effective bits descending): the order tier_for_bits scans.
  const std::vector<Tier>& ladder() const { return ladder_; }
  int64_t page_bytes(Tier t) const { return opts_.geometry.page_bytes(t); }

  double required_bits(double kappa) const;
  double predicted_error(double kappa, Tier t) const;
  Tier tier_for_bits(double bits) const;
  bool covers(Tier t, double bits) const { return tier_effective_bits(t) >= bits; }

  // Threshold mode over block curvatures (use the per-block max, see curvature.h).
  std::vector<Tier> map_threshold(const std::vector<double>& kappa, int64_t* saturated = nullptr) const;
  // The MCKP of giving each block (its summed curvature kappa_i) one of the candidates; choice j = ladder()[j].
  KnapsackProblem problem(const std::vector<double>& kappa) const;
  std::vector<Tier> map_budget(const std::vector<double>& kappa, int64_t budget_bytes,
                               KnapsackMethod method = KnapsackMethod::Auto, KnapsackSolution* solution = nullptr) const;
  std::vector<Tier> map_quality(const std::vector<double>& kappa, double max_error,
                                KnapsackMethod method = KnapsackMethod::Auto, KnapsackSolution* solution = nullptr) const;

 private:
  MapperOptions opts_;
  std::vector<Tier> ladder_;
};

}  // namespace kvprec
