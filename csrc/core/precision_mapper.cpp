// PrecisionMapper and the multiple-choice knapsack: see kvprec/precision_mapper.h for the formulas, the
// algorithms and their sources. Plain C++ on std::vector; kvprec/analysis/precision.py mirrors it step for step (same
// tie-breaks) so the two can be compared choice for choice.
#include "kvprec/precision_mapper.h"

#include <algorithm>
#include <functional>
#include <cmath>
#include <limits>
#include <numeric>
#include <sstream>
#include <stdexcept>

namespace kvprec {
namespace {

constexpr double kErrorSlack = 1e-12;           // relative, for error comparisons (see the header)
constexpr int64_t kDpHardLimit = int64_t{1} << 31;  // an explicit method="dp" larger than this would need > 2 GiB

double within(double max_error) { return max_error + std::fabs(max_error) * kErrorSlack; }

std::string fmt(double x) {
  std::ostringstream s;
  s.precision(17);
  s << x;
  return s.str();
}

// Extra costs above each item's cheapest choice, in units of their gcd.
struct Units {
  std::vector<int64_t> delta;  // [I * J]
  int64_t unit = 1;
  int64_t max_units = 0;       // sum_i max_j delta_ij
};

Units to_units(const KnapsackProblem& p) {
  Units u;
  u.delta.resize(p.costs.size());
  int64_t g = 0;
  for (int64_t i = 0; i < p.items; ++i) {
    int64_t lo = std::numeric_limits<int64_t>::max();
    for (int64_t j = 0; j < p.choices; ++j) lo = std::min(lo, p.cost(i, j));
    for (int64_t j = 0; j < p.choices; ++j) {
      const int64_t d = p.cost(i, j) - lo;
      u.delta[i * p.choices + j] = d;
      g = std::gcd(g, d);
    }
  }
  u.unit = g > 0 ? g : 1;
  for (int64_t i = 0; i < p.items; ++i) {
    int64_t hi = 0;
    for (int64_t j = 0; j < p.choices; ++j) {
      u.delta[i * p.choices + j] /= u.unit;
      hi = std::max(hi, u.delta[i * p.choices + j]);
    }
    u.max_units += hi;
  }
  return u;
}

int64_t columns_for(const KnapsackProblem& p, const Units& u, int64_t budget) {
  if (budget < 0) return u.max_units;
  return std::clamp<int64_t>((budget - p.min_cost()) / u.unit, 0, u.max_units);  // an infeasible budget: 0
}

void fill_totals(const KnapsackProblem& p, KnapsackSolution& s) {
  s.error = 0.0;
  s.cost = 0;
  for (int64_t i = 0; i < p.items; ++i) {
    s.error += p.error(i, s.choice[i]);
    s.cost += p.cost(i, s.choice[i]);
  }
}

// best[w] = least total error with extra cost <= w units, for w = 0..W; choice table for reconstruction.
struct DpTable {
  int64_t W = 0;
  std::vector<double> best;
  std::vector<int8_t> choice;  // [I * (W + 1)]
};

DpTable run_dp(const KnapsackProblem& p, const Units& u, int64_t W) {
  if (p.choices > 127) throw std::invalid_argument("knapsack: the exact DP takes at most 127 choices per item, got " +
                                                   std::to_string(p.choices) + "; use method='greedy'");
  const int64_t cols = W + 1;
  if (p.items > 0 && cols > kDpHardLimit / p.items)
    throw std::invalid_argument("knapsack: the exact DP would need " + fmt(static_cast<double>(p.items) * cols) +
                                " table cells (more than 2^31); use method='greedy' or 'auto'");
  DpTable t;
  t.W = W;
  t.best.assign(cols, 0.0);  // no items: error 0 at every capacity
  t.choice.assign(static_cast<size_t>(p.items * cols), 0);
  std::vector<double> next(cols);
  for (int64_t i = 0; i < p.items; ++i) {
    std::fill(next.begin(), next.end(), std::numeric_limits<double>::infinity());
    int8_t* ch = t.choice.data() + i * cols;
    for (int64_t j = 0; j < p.choices; ++j) {
      const int64_t d = u.delta[i * p.choices + j];
      const double e = p.error(i, j);
      for (int64_t w = d; w < cols; ++w) {
        const double cand = t.best[w - d] + e;
        if (cand < next[w]) {  // strict: the lowest j wins ties (kvprec/analysis/precision.py: argmin)
          next[w] = cand;
          ch[w] = static_cast<int8_t>(j);
        }
      }
    }
    t.best.swap(next);
  }
  return t;
}

std::vector<int64_t> reconstruct(const KnapsackProblem& p, const Units& u, const DpTable& t, int64_t w) {
  std::vector<int64_t> choice(p.items);
  for (int64_t i = p.items - 1; i >= 0; --i) {
    const int64_t j = t.choice[i * (t.W + 1) + w];
    choice[i] = j;
    w -= u.delta[i * p.choices + j];
  }
  return choice;
}

// Lower convex hull of item i's (cost, error) points, as choice indices from cheapest to most precise.
std::vector<int64_t> item_hull(const KnapsackProblem& p, int64_t i) {
  std::vector<int64_t> order(p.choices);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    if (p.cost(i, a) != p.cost(i, b)) return p.cost(i, a) < p.cost(i, b);
    if (p.error(i, a) != p.error(i, b)) return p.error(i, a) < p.error(i, b);
    return a < b;
  });
  std::vector<int64_t> hull;
  for (int64_t j : order) {
    if (!hull.empty() && !(p.error(i, j) < p.error(i, hull.back()))) continue;  // dominated: costs more, no better
    while (hull.size() >= 2) {
      const int64_t a = hull[hull.size() - 2], b = hull.back();
      const double lhs = (p.error(i, a) - p.error(i, b)) * static_cast<double>(p.cost(i, j) - p.cost(i, b));
      const double rhs = (p.error(i, b) - p.error(i, j)) * static_cast<double>(p.cost(i, b) - p.cost(i, a));
      if (lhs <= rhs) hull.pop_back();  // b is on or above the chord a-j: never the better upgrade
      else break;
    }
    hull.push_back(j);
  }
  return hull;
}

struct Segment {
  int64_t item;
  int64_t k;      // from hull[k] to hull[k + 1]
  double ratio;   // error reduction per byte
  int64_t dc;
  double de;
};

struct Greedy {
  std::vector<std::vector<int64_t>> hulls;
  std::vector<Segment> segments;  // sorted: ratio descending, then item, then k
};

Greedy prepare_greedy(const KnapsackProblem& p) {
  Greedy g;
  g.hulls.resize(p.items);
  for (int64_t i = 0; i < p.items; ++i) {
    g.hulls[i] = item_hull(p, i);
    const auto& h = g.hulls[i];
    for (size_t k = 0; k + 1 < h.size(); ++k) {
      const int64_t dc = p.cost(i, h[k + 1]) - p.cost(i, h[k]);
      const double de = p.error(i, h[k]) - p.error(i, h[k + 1]);
      g.segments.push_back({i, static_cast<int64_t>(k), de / static_cast<double>(dc), dc, de});
    }
  }
  std::sort(g.segments.begin(), g.segments.end(), [](const Segment& a, const Segment& b) {
    if (a.ratio != b.ratio) return a.ratio > b.ratio;
    if (a.item != b.item) return a.item < b.item;
    return a.k < b.k;
  });
  return g;
}

double start_error(const KnapsackProblem& p, const Greedy& g) {
  double e = 0.0;
  for (int64_t i = 0; i < p.items; ++i) e += p.error(i, g.hulls[i][0]);
  return e;
}

KnapsackSolution greedy_budget(const KnapsackProblem& p, int64_t budget) {
  const Greedy g = prepare_greedy(p);
  const int64_t room = budget - p.min_cost();
  // LP relaxation: upgrades in order, the first that does not fit taken fractionally.
  double lp = start_error(p, g);
  int64_t lp_room = room;
  for (const Segment& s : g.segments) {
    if (s.dc <= lp_room) {
      lp_room -= s.dc;
      lp -= s.de;
    } else {
      lp -= s.de * static_cast<double>(lp_room) / static_cast<double>(s.dc);
      break;
    }
  }
  // Integer greedy: the same order, skipping what does not fit (and, after a skip, that item's later upgrades).
  std::vector<int64_t> pos(p.items, 0);
  int64_t left = room;
  for (const Segment& s : g.segments) {
    if (pos[s.item] == s.k && s.dc <= left) {
      pos[s.item] = s.k + 1;
      left -= s.dc;
    }
  }
  KnapsackSolution sol;
  sol.choice.resize(p.items);
  for (int64_t i = 0; i < p.items; ++i) sol.choice[i] = g.hulls[i][pos[i]];
  fill_totals(p, sol);
  sol.lower_bound = std::max(0.0, std::min(lp, sol.error));
  sol.exact = false;
  return sol;
}

KnapsackSolution greedy_quality(const KnapsackProblem& p, double max_error) {
  const Greedy g = prepare_greedy(p);
  std::vector<int64_t> pos(p.items, 0);
  double err = start_error(p, g);
  int64_t cost = p.min_cost();
  double bound = static_cast<double>(cost);
  for (const Segment& s : g.segments) {
    if (err <= within(max_error)) break;
    // Within an item, upgrades come in hull order and none is skipped, so pos[s.item] == s.k here.
    pos[s.item] = s.k + 1;
    const double before = err;
    bound = static_cast<double>(cost) + static_cast<double>(s.dc) * (before - max_error) / s.de;
    err -= s.de;
    cost += s.dc;
  }
  KnapsackSolution sol;
  sol.choice.resize(p.items);
  for (int64_t i = 0; i < p.items; ++i) sol.choice[i] = g.hulls[i][pos[i]];
  fill_totals(p, sol);
  sol.lower_bound = std::clamp(bound, static_cast<double>(p.min_cost()), static_cast<double>(sol.cost));
  sol.exact = false;
  return sol;
}

bool use_dp(const KnapsackProblem& p, KnapsackMethod method, int64_t budget) {
  if (method == KnapsackMethod::DP) return true;
  if (method == KnapsackMethod::Greedy) return false;
  return p.choices <= 127 && p.dp_cells(budget) <= kDpMaxCells;
}

}  // namespace

// ---- scalar formulas -------------------------------------------------------------------------------------

static void check_bound_args(double c, int64_t head_dim, double eps) {
  if (!(std::isfinite(c) && c > 0.0))
    throw std::invalid_argument("c: " + fmt(c) + " is not accepted; use a positive constant (default 1)");
  if (head_dim < 1)
    throw std::invalid_argument("head_dim: " + std::to_string(head_dim) + " is not accepted; use a positive head dimension");
  if (!(std::isfinite(eps) && eps > 0.0))
    throw std::invalid_argument("eps: " + fmt(eps) + " is not accepted; use a positive error tolerance (default 2^-11)");
}

static void check_kappa(double kappa) {
  if (!(std::isfinite(kappa) && kappa >= 0.0))
    throw std::invalid_argument("kappa: " + fmt(kappa) + " is not accepted; curvature must be finite and >= 0");
}

double required_bits(double kappa, double c, int64_t head_dim, double eps) {
  check_bound_args(c, head_dim, eps);
  check_kappa(kappa);
  const double d = static_cast<double>(head_dim);
  return std::log2(c * kappa * d * d / eps);
}

double predicted_error(double kappa, Tier tier, double c, int64_t head_dim) {
  check_bound_args(c, head_dim, 1.0);
  check_kappa(kappa);
  const double d = static_cast<double>(head_dim);
  return c * kappa * d * d * std::exp2(-tier_effective_bits(tier));
}

// ---- knapsack -----------------------------------------------------------------------------------------------

KnapsackMethod knapsack_method_from_name(const std::string& name) {
  if (name == "auto") return KnapsackMethod::Auto;
  if (name == "dp") return KnapsackMethod::DP;
  if (name == "greedy") return KnapsackMethod::Greedy;
  throw std::invalid_argument("method: '" + name + "' is not accepted; use auto, dp or greedy");
}

void KnapsackProblem::check() const {
  if (items < 0) throw std::invalid_argument("knapsack: items " + std::to_string(items) + " must be >= 0");
  if (choices < 1) throw std::invalid_argument("knapsack: choices " + std::to_string(choices) + " must be >= 1");
  const auto n = static_cast<size_t>(items * choices);
  if (errors.size() != n || costs.size() != n)
    throw std::invalid_argument("knapsack: errors and costs must hold items * choices = " + std::to_string(n) +
                                " values, got " + std::to_string(errors.size()) + " and " + std::to_string(costs.size()));
  for (size_t x = 0; x < n; ++x) {
    if (!(std::isfinite(errors[x]) && errors[x] >= 0.0))
      throw std::invalid_argument("errors: entry " + std::to_string(x) + " is " + fmt(errors[x]) +
                                  "; predicted errors must be finite and >= 0");
    if (costs[x] < 0)
      throw std::invalid_argument("costs: entry " + std::to_string(x) + " is " + std::to_string(costs[x]) +
                                  "; byte costs must be >= 0");
  }
}

namespace {

// sum over items of the best of that item's choices, by `better` (std::less: the minimum), of `value(i, j)`.
template <typename V, typename Value, typename Better>
V sum_of_best(int64_t items, int64_t choices, Value value, Better better) {
  V s = 0;
  for (int64_t i = 0; i < items; ++i) {
    V best = value(i, 0);
    for (int64_t j = 1; j < choices; ++j) best = std::min(best, value(i, j), better);
    s += best;
  }
  return s;
}

}  // namespace

int64_t KnapsackProblem::min_cost() const {
  return sum_of_best<int64_t>(items, choices, [this](int64_t i, int64_t j) { return cost(i, j); }, std::less<>());
}

int64_t KnapsackProblem::max_cost() const {
  return sum_of_best<int64_t>(items, choices, [this](int64_t i, int64_t j) { return cost(i, j); },
                              std::greater<>());
}

double KnapsackProblem::min_error() const {
  return sum_of_best<double>(items, choices, [this](int64_t i, int64_t j) { return error(i, j); }, std::less<>());
}

int64_t KnapsackProblem::dp_cells(int64_t budget) const {
  const Units u = to_units(*this);
  const int64_t cols = columns_for(*this, u, budget) + 1;
  if (items > 0 && cols > std::numeric_limits<int64_t>::max() / items) return std::numeric_limits<int64_t>::max();
  return items * cols;
}

KnapsackSolution solve_budget(const KnapsackProblem& p, int64_t budget, KnapsackMethod method) {
  p.check();
  const int64_t lo = p.min_cost();
  if (budget < lo)
    throw std::invalid_argument("budget: " + std::to_string(budget) +
                                " bytes is below the minimum achievable " + std::to_string(lo) +
                                " bytes (every item at its cheapest choice)");
  if (!use_dp(p, method, budget)) return greedy_budget(p, budget);
  const Units u = to_units(p);
  const DpTable t = run_dp(p, u, columns_for(p, u, budget));
  KnapsackSolution sol;
  sol.choice = reconstruct(p, u, t, t.W);
  fill_totals(p, sol);
  sol.lower_bound = sol.error;
  sol.exact = true;
  return sol;
}

KnapsackSolution solve_quality(const KnapsackProblem& p, double max_error, KnapsackMethod method) {
  p.check();
  if (std::isnan(max_error)) throw std::invalid_argument("max_error: NaN is not accepted");
  const double lo = p.min_error();
  if (lo > within(max_error))
    throw std::invalid_argument("max_error: " + fmt(max_error) + " is below the minimum achievable predicted error " +
                                fmt(lo) + " (every item at its most precise choice)");
  if (!use_dp(p, method, -1)) return greedy_quality(p, max_error);
  const Units u = to_units(p);
  const DpTable t = run_dp(p, u, u.max_units);
  int64_t w = 0;
  while (w < t.W && t.best[w] > within(max_error)) ++w;  // best[] is non-increasing and best[W] = min_error() <= max_error
  KnapsackSolution sol;
  sol.choice = reconstruct(p, u, t, w);
  fill_totals(p, sol);
  sol.lower_bound = static_cast<double>(sol.cost);
  sol.exact = true;
  return sol;
}

// ---- mapper ---------------------------------------------------------------------------------------------------

void MapperOptions::check() const {
  check_bound_args(c, geometry.head_dim, eps);
  geometry.check();
  if (candidates.empty()) throw std::invalid_argument("candidates: empty; give at least one tier");
  for (size_t a = 0; a < candidates.size(); ++a)
    for (size_t b = a + 1; b < candidates.size(); ++b)
      if (candidates[a] == candidates[b])
        throw std::invalid_argument(std::string("candidates: ") + tier_name(candidates[a]) + " is listed twice");
}

PrecisionMapper::PrecisionMapper(MapperOptions options) : opts_(std::move(options)) {
  opts_.check();
  ladder_ = opts_.candidates;
  std::stable_sort(ladder_.begin(), ladder_.end(), [&](Tier a, Tier b) {
    if (page_bytes(a) != page_bytes(b)) return page_bytes(a) < page_bytes(b);
    return tier_effective_bits(a) > tier_effective_bits(b);
  });
}

double PrecisionMapper::required_bits(double kappa) const {
  return kvprec::required_bits(kappa, opts_.c, opts_.geometry.head_dim, opts_.eps);
}

double PrecisionMapper::predicted_error(double kappa, Tier t) const {
  return kvprec::predicted_error(kappa, t, opts_.c, opts_.geometry.head_dim);
}

Tier PrecisionMapper::tier_for_bits(double bits) const {
  if (std::isnan(bits)) throw std::invalid_argument("bits: NaN is not accepted");
  for (Tier t : ladder_)
    if (covers(t, bits)) return t;
  Tier best = ladder_.front();  // saturated: the most precise candidate (the cheaper one on a tie)
  for (Tier t : ladder_)
    if (tier_effective_bits(t) > tier_effective_bits(best)) best = t;
  return best;
}

std::vector<Tier> PrecisionMapper::map_threshold(const std::vector<double>& kappa, int64_t* saturated) const {
  std::vector<Tier> out(kappa.size());
  int64_t sat = 0;
  for (size_t i = 0; i < kappa.size(); ++i) {
    const double bits = required_bits(kappa[i]);
    out[i] = tier_for_bits(bits);
    sat += covers(out[i], bits) ? 0 : 1;
  }
  if (saturated != nullptr) *saturated = sat;
  return out;
}

KnapsackProblem PrecisionMapper::problem(const std::vector<double>& kappa) const {
  KnapsackProblem p;
  p.items = static_cast<int64_t>(kappa.size());
  p.choices = static_cast<int64_t>(ladder_.size());
  p.errors.reserve(p.items * p.choices);
  p.costs.reserve(p.items * p.choices);
  for (double k : kappa)
    for (Tier t : ladder_) {
      p.errors.push_back(predicted_error(k, t));
      p.costs.push_back(page_bytes(t));
    }
  return p;
}

std::vector<Tier> PrecisionMapper::map_budget(const std::vector<double>& kappa, int64_t budget_bytes,
                                              KnapsackMethod method, KnapsackSolution* solution) const {
  KnapsackSolution s = solve_budget(problem(kappa), budget_bytes, method);
  std::vector<Tier> out(kappa.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = ladder_[s.choice[i]];
  if (solution != nullptr) *solution = std::move(s);
  return out;
}

std::vector<Tier> PrecisionMapper::map_quality(const std::vector<double>& kappa, double max_error,
                                               KnapsackMethod method, KnapsackSolution* solution) const {
  KnapsackSolution s = solve_quality(problem(kappa), max_error, method);
  std::vector<Tier> out(kappa.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = ladder_[s.choice[i]];
  if (solution != nullptr) *solution = std::move(s);
  return out;
}

}  // namespace kvprec
