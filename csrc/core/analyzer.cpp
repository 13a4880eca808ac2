// KVCacheAnalyzer and DynamicPrecisionAdjuster: see kvprec/analyzer.h for the pipeline and the rules.
#include "kvprec/errors.h"
#include "kvprec/analyzer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <utility>

namespace kvprec {
namespace {


// The lower median by effective bits of a set of tiers.
Tier median_tier(std::vector<Tier> tiers) {
  std::sort(tiers.begin(), tiers.end(), [](Tier a, Tier b) {
    if (tier_effective_bits(a) != tier_effective_bits(b)) return tier_effective_bits(a) < tier_effective_bits(b);
    return tier_index(a) < tier_index(b);
  });
  return tiers[(tiers.size() - 1) / 2];
}

std::vector<Tier> head_tiers(const at::Tensor& tiers, int64_t head) {
  std::vector<Tier> out;
  at::Tensor row = tiers[head].contiguous();
  for (int64_t j = 0; j < row.numel(); ++j) out.push_back(static_cast<Tier>(row.data_ptr<int8_t>()[j]));
  return out;
}

bool same_geometry(const BlockGeometry& a, const BlockGeometry& b) {
  return a.block_size == b.block_size && a.head_dim == b.head_dim && a.group_size == b.group_size;
}

std::string geometry_text(const BlockGeometry& g) {
  return "(block_size " + std::to_string(g.block_size) + ", head_dim " + std::to_string(g.head_dim) + ", group_size " +
         std::to_string(g.group_size) + ")";
}

}  // namespace

const char* map_mode_name(MapMode m) {
  switch (m) {
    case MapMode::Threshold: return "threshold";
    case MapMode::Budget: return "budget";
    case MapMode::Quality: return "quality";
  }
  return "?";
}

void AnalyzerOptions::check() const {
  value_errors([&] {
    mapper.check();
    return 0;
  });
  resolve_scale(scale, mapper.geometry.head_dim);
  TORCH_CHECK_VALUE(query_reduce == Reduce::Mean || query_reduce == Reduce::Max, "query_reduce: ",
                    reduce_name(query_reduce), " is not accepted; use mean or max (a sum would grow with the number "
                    "of calibration inputs)");
}

// ---- PrecisionMap -----------------------------------------------------------------------------------------

int64_t PrecisionMap::kv_heads(int64_t layer) const {
  TORCH_CHECK_VALUE(layer >= 0 && layer < num_layers(), "layer: ", layer, " is out of range; the map has ",
                    num_layers(), " layers");
  return tiers[layer].size(0);
}

int64_t PrecisionMap::mapped_blocks(int64_t layer) const {
  kv_heads(layer);
  return tiers[layer].size(1);
}

at::Tensor PrecisionMap::default_tiers(int64_t layer) const {
  const int64_t H = kv_heads(layer);
  at::Tensor out = at::empty({H}, at::kChar);
  for (int64_t h = 0; h < H; ++h)
    out[h] = static_cast<int64_t>(tier_index(median_tier(head_tiers(tiers[layer], h))));
  return out;
}

Tier PrecisionMap::tier(int64_t layer, int64_t head, int64_t block) const {
  const int64_t H = kv_heads(layer);
  TORCH_CHECK_VALUE(head >= 0 && head < H, "head: ", head, " is out of range; layer ", layer, " has ", H, " KV heads");
  TORCH_CHECK_VALUE(block >= 0, "block: ", block, " is not accepted; expected >= 0");
  if (block < mapped_blocks(layer)) return static_cast<Tier>(tiers[layer][head][block].item<int8_t>());
  return median_tier(head_tiers(tiers[layer], head));
}

at::Tensor PrecisionMap::seal_tiers(int64_t layer, int64_t batch, int64_t first_block, int64_t count) const {
  const int64_t H = kv_heads(layer), nb = mapped_blocks(layer);
  TORCH_CHECK_VALUE(batch >= 1 && first_block >= 0 && count >= 0, "seal_tiers: batch ", batch, ", first_block ",
                    first_block, ", count ", count, " are not accepted; expected batch >= 1, the others >= 0");
  at::Tensor row = at::empty({H, count}, at::kChar);
  const at::Tensor fallback = default_tiers(layer);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < count; ++j) {
      const int64_t block = first_block + j;
      row[h][j] = block < nb ? tiers[layer][h][block] : fallback[h];
    }
  return row.unsqueeze(0).expand({batch, H, count}).contiguous();
}

double PrecisionMap::block_curvature(int64_t layer, int64_t head, int64_t block) const {
  const int64_t H = kv_heads(layer), nb = mapped_blocks(layer);
  TORCH_CHECK_VALUE(head >= 0 && head < H, "head: ", head, " is out of range; layer ", layer, " has ", H, " KV heads");
  if (block < nb) return kappa_sum[layer][head][block].item<double>();
  at::Tensor sorted = std::get<0>(kappa_sum[layer][head].sort());
  return sorted[(nb - 1) / 2].item<double>();
}

std::string PrecisionReport::to_markdown() const {
  std::ostringstream s;
  s << "Precision map (" << map_mode_name(mode) << " mode): " << page_bytes << " page bytes, " << bits_per_element
    << " bits/element including scales and zeros, predicted error " << predicted_error;
  if (mode != MapMode::Threshold)
    s << (exact ? " (exact DP)" : " (greedy; LP lower bound ") << (exact ? "" : std::to_string(lower_bound) + ")");
  s << "\n\n| layer | head | blocks |";
  for (Tier t : kAllTiers) s << ' ' << tier_name(t) << " |";
  s << " bytes | bits/elem | predicted error | max required bits | saturated |\n|---|---|---|";
  for (int i = 0; i < kNumTiers; ++i) s << "---|";
  s << "---|---|---|---|---|\n";
  for (const HeadReport& h : heads) {
    s << "| " << h.layer << " | " << h.head << " | " << h.blocks << " |";
    for (Tier t : kAllTiers) s << ' ' << h.tier_blocks[tier_index(t)] << " |";
    char line[160];
    std::snprintf(line, sizeof(line), " %lld | %.3f | %.4g | %.2f | %lld |\n", static_cast<long long>(h.page_bytes),
                  h.bits_per_element, h.predicted_error, h.max_required_bits, static_cast<long long>(h.saturated));
    s << line;
  }
  return s.str();
}

// ---- KVCacheAnalyzer ----------------------------------------------------------------------------------------

KVCacheAnalyzer::KVCacheAnalyzer(AnalyzerOptions options)
    : opts_((options.check(), std::move(options))), mapper_(opts_.mapper) {}

void KVCacheAnalyzer::add_calibration(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(layer >= 0, "layer: ", layer, " is not accepted; expected >= 0");
  TORCH_CHECK_VALUE(k.defined() && k.dim() >= 3, "add_calibration: k must be [Hkv, N, D] or [B, Hkv, N, D]");
  const int64_t D = opts_.mapper.geometry.head_dim;
  TORCH_CHECK_VALUE(k.size(-1) == D, "add_calibration: k has head_dim ", k.size(-1), " but the geometry's head_dim is ",
                    D, " (MapperOptions::geometry)");
  if (layer < num_layers() && layers_[layer].kv_heads() > 0) return layers_[layer].add(q, k, v);
  CurvatureAccumulator first(k.size(-3), opts_.scale, opts_.causal);
  first.add(q, k, v);  // a refused first input leaves no layer behind
  if (layer >= num_layers()) layers_.resize(layer + 1);
  layers_[layer] = std::move(first);
}

void KVCacheAnalyzer::add_reduced(int64_t layer, const at::Tensor& pos_sum, const at::Tensor& pos_max,
                                  const at::Tensor& count) {
  TORCH_CHECK_VALUE(layer >= 0, "layer: ", layer, " is not accepted; expected >= 0");
  TORCH_CHECK_VALUE(pos_sum.defined() && (pos_sum.dim() == 2 || pos_sum.dim() == 3),
                    "add_reduced: pos_sum must be [Hkv, N] or [B, Hkv, N]",
                    pos_sum.defined() ? ", got shape " + c10::str(pos_sum.sizes()) : std::string());
  if (layer < num_layers() && layers_[layer].kv_heads() > 0) return layers_[layer].add_reduced(pos_sum, pos_max, count);
  CurvatureAccumulator first(pos_sum.size(-2), opts_.scale, opts_.causal);
  first.add_reduced(pos_sum, pos_max, count);  // a refused first input leaves no layer behind
  if (layer >= num_layers()) layers_.resize(layer + 1);
  layers_[layer] = std::move(first);
}

const CurvatureAccumulator& KVCacheAnalyzer::curvature(int64_t layer) const {
  TORCH_CHECK_VALUE(layer >= 0 && layer < num_layers() && layers_[layer].inputs() > 0, "layer ", layer,
                    " has no calibration input; call add_calibration(", layer, ", q, k, v) first");
  return layers_[layer];
}

PrecisionMap KVCacheAnalyzer::analyze(const MapRequest& request) const {
  TORCH_CHECK_VALUE(num_layers() > 0, "analyze: no calibration input; call add_calibration(layer, q, k, v) first");
  const BlockGeometry& g = opts_.mapper.geometry;
  PrecisionMap map;
  map.geometry = g;
  std::vector<double> kmax, ksum;  // items layer-major, then head, then block
  for (int64_t l = 0; l < num_layers(); ++l) {
    const CurvatureAccumulator& acc = curvature(l);
    map.kappa_max.push_back(acc.block(g.block_size, opts_.query_reduce, Reduce::Max).contiguous());
    map.kappa_sum.push_back(acc.block(g.block_size, opts_.query_reduce, Reduce::Sum).contiguous());
    const at::Tensor& a = map.kappa_max.back();
    const at::Tensor& b = map.kappa_sum.back();
    kmax.insert(kmax.end(), a.data_ptr<double>(), a.data_ptr<double>() + a.numel());
    ksum.insert(ksum.end(), b.data_ptr<double>(), b.data_ptr<double>() + b.numel());
  }

  std::vector<Tier> chosen;
  KnapsackSolution sol;
  value_errors([&] {
    switch (request.mode) {
      case MapMode::Threshold: chosen = mapper_.map_threshold(kmax); break;
      case MapMode::Budget: chosen = mapper_.map_budget(ksum, request.budget_bytes, request.method, &sol); break;
      case MapMode::Quality: chosen = mapper_.map_quality(ksum, request.max_error, request.method, &sol); break;
    }
    return 0;
  });

  PrecisionReport& rep = map.report;
  rep.mode = request.mode;
  rep.exact = request.mode == MapMode::Threshold || sol.exact;
  rep.lower_bound = sol.lower_bound;
  size_t item = 0;
  int64_t elements = 0;
  for (int64_t l = 0; l < num_layers(); ++l) {
    const int64_t H = map.kappa_max[l].size(0), nb = map.kappa_max[l].size(1);
    at::Tensor t = at::empty({H, nb}, at::kChar);
    int8_t* pt = t.data_ptr<int8_t>();
    for (int64_t h = 0; h < H; ++h) {
      HeadReport hr;
      hr.layer = l;
      hr.head = h;
      hr.blocks = nb;
      hr.max_required_bits = -INFINITY;
      for (int64_t j = 0; j < nb; ++j, ++item) {
        const Tier tier = chosen[item];
        pt[h * nb + j] = static_cast<int8_t>(tier_index(tier));
        const double bits = mapper_.required_bits(kmax[item]);
        hr.tier_blocks[tier_index(tier)] += 1;
        hr.page_bytes += mapper_.page_bytes(tier);
        hr.predicted_error += mapper_.predicted_error(ksum[item], tier);
        hr.max_required_bits = std::max(hr.max_required_bits, bits);
        hr.saturated += mapper_.covers(tier, bits) ? 0 : 1;
      }
      const int64_t el = nb * g.block_size * g.head_dim * 2;
      hr.bits_per_element = 8.0 * static_cast<double>(hr.page_bytes) / static_cast<double>(el);
      rep.page_bytes += hr.page_bytes;
      rep.predicted_error += hr.predicted_error;
      elements += el;
      rep.heads.push_back(hr);
    }
    map.tiers.push_back(t);
  }
  rep.bits_per_element = 8.0 * static_cast<double>(rep.page_bytes) / static_cast<double>(elements);
  return map;
}

BufferOptions KVCacheAnalyzer::buffer_options(const PrecisionMap& map, int64_t layer, int64_t batch,
                                              at::ScalarType dtype, c10::Device device, bool shadow) {
  BufferOptions o;
  o.batch = batch;
  o.kv_heads = map.kv_heads(layer);
  o.head_dim = map.geometry.head_dim;
  o.block_size = map.geometry.block_size;
  o.group_size = map.geometry.group_size;
  o.dtype = dtype;
  o.device = device;
  std::vector<Tier> all;
  for (int64_t h = 0; h < o.kv_heads; ++h) {
    auto t = head_tiers(map.tiers[layer], h);
    all.insert(all.end(), t.begin(), t.end());
  }
  o.default_tier = all.empty() ? Tier::FP16 : median_tier(all);
  o.shadow = shadow;
  return o;
}

void KVCacheAnalyzer::append(MixedPrecisionBuffer& buffer, const PrecisionMap& map, int64_t layer, const at::Tensor& k,
                             const at::Tensor& v) {
  TORCH_CHECK_VALUE(same_geometry(buffer.geometry(), map.geometry), "append: the buffer's geometry ",
                    geometry_text(buffer.geometry()), " differs from the map's ", geometry_text(map.geometry));
  TORCH_CHECK_VALUE(buffer.options().kv_heads == map.kv_heads(layer), "append: the buffer has ",
                    buffer.options().kv_heads, " KV heads, layer ", layer, " of the map ", map.kv_heads(layer));
  TORCH_CHECK_VALUE(k.defined() && k.dim() == 4, "append: k must be [B, H, n, D]");
  const int64_t sealing = buffer.blocks_sealed_by(k.size(2));
  buffer.append(k, v, map.seal_tiers(layer, buffer.options().batch, buffer.num_sealed_blocks(), sealing));
}

// ---- DynamicPrecisionAdjuster -------------------------------------------------------------------------------

DynamicPrecisionAdjuster::DynamicPrecisionAdjuster(std::vector<MixedPrecisionBuffer*> buffers, MapperOptions mapper,
                                                   ImportanceScore score, const PrecisionMap* map)
    : buffers_(std::move(buffers)),
      mapper_(value_errors([&] { return PrecisionMapper(std::move(mapper)); })),
      score_(score),
      map_(map) {
  TORCH_CHECK_VALUE(!buffers_.empty(), "DynamicPrecisionAdjuster: buffers is empty; give one buffer per layer");
  for (size_t l = 0; l < buffers_.size(); ++l) {
    TORCH_CHECK_VALUE(buffers_[l] != nullptr, "DynamicPrecisionAdjuster: buffer of layer ", l, " is null");
    TORCH_CHECK_VALUE(same_geometry(buffers_[l]->geometry(), mapper_.options().geometry), "DynamicPrecisionAdjuster: ",
                      "layer ", l, " buffer geometry ", geometry_text(buffers_[l]->geometry()),
                      " differs from the mapper's ", geometry_text(mapper_.options().geometry));
  }
  if (score_ == ImportanceScore::Curvature) {
    TORCH_CHECK_VALUE(map_ != nullptr, "DynamicPrecisionAdjuster: curvature scores need a PrecisionMap (map is null); "
                      "or use ImportanceScore::AttentionMass with observe()");
    TORCH_CHECK_VALUE(map_->num_layers() >= static_cast<int64_t>(buffers_.size()), "DynamicPrecisionAdjuster: the map has ",
                      map_->num_layers(), " layers, the buffers ", buffers_.size());
    for (size_t l = 0; l < buffers_.size(); ++l)
      TORCH_CHECK_VALUE(map_->kv_heads(l) == buffers_[l]->options().kv_heads, "DynamicPrecisionAdjuster: layer ", l,
                        " buffer has ", buffers_[l]->options().kv_heads, " KV heads, the map ", map_->kv_heads(l));
  }
  mass_.resize(buffers_.size());
}

void DynamicPrecisionAdjuster::observe(int64_t layer, const at::Tensor& block_mass) {
  TORCH_CHECK_VALUE(layer >= 0 && layer < static_cast<int64_t>(buffers_.size()), "observe: layer ", layer,
                    " is out of range; ", buffers_.size(), " buffers");
  const BufferOptions& o = buffers_[layer]->options();
  TORCH_CHECK_VALUE(block_mass.defined() && block_mass.dim() == 4 && block_mass.size(0) == o.batch &&
                        block_mass.size(1) % o.kv_heads == 0,
                    "observe: block_mass must be [B, Hq, Q, nb] with B = ", o.batch, " and Hq a multiple of ",
                    o.kv_heads, ", got shape ", block_mass.sizes());
  const int64_t G = block_mass.size(1) / o.kv_heads, nb = block_mass.size(3);
  at::Tensor m = block_mass.to(at::kCPU, at::kDouble).sum(2).view({o.batch, o.kv_heads, G, nb}).sum(2);
  at::Tensor& acc = mass_[layer];
  if (!acc.defined() || acc.size(0) != o.batch) {
    TORCH_CHECK_VALUE(!acc.defined(), "observe: layer ", layer, " was observed with batch ", acc.defined() ? acc.size(0) : 0,
                      " and now ", o.batch, "; the batch changed, so the accumulated mass no longer matches");
    acc = at::zeros({o.batch, o.kv_heads, 0}, at::kDouble);
  }
  if (nb > acc.size(2)) acc = at::constant_pad_nd(acc, {0, nb - acc.size(2)}, 0.0);
  acc.narrow(2, 0, nb).add_(m);
}

at::Tensor DynamicPrecisionAdjuster::scores(int64_t layer) const {
  TORCH_CHECK_VALUE(layer >= 0 && layer < static_cast<int64_t>(buffers_.size()), "scores: layer ", layer,
                    " is out of range; ", buffers_.size(), " buffers");
  const BufferOptions& o = buffers_[layer]->options();
  const int64_t nb = buffers_[layer]->num_sealed_blocks();
  if (score_ == ImportanceScore::Curvature) {
    at::Tensor s = at::empty({o.kv_heads, nb}, at::kDouble);
    for (int64_t h = 0; h < o.kv_heads; ++h)
      for (int64_t j = 0; j < nb; ++j) s[h][j] = map_->block_curvature(layer, h, j);
    return s.unsqueeze(0).expand({o.batch, o.kv_heads, nb}).contiguous();
  }
  at::Tensor s = at::zeros({o.batch, o.kv_heads, nb}, at::kDouble);
  const at::Tensor& acc = mass_[layer];
  if (acc.defined()) {
    TORCH_CHECK_VALUE(acc.size(0) == o.batch, "scores: layer ", layer, " mass was observed with batch ", acc.size(0),
                      ", the buffer now has batch ", o.batch);
    const int64_t n = std::min(nb, acc.size(2));
    s.narrow(2, 0, n).copy_(acc.narrow(2, 0, n));
  }
  return s;
}

int64_t DynamicPrecisionAdjuster::resident_bytes() const {
  int64_t total = 0;
  for (const MixedPrecisionBuffer* b : buffers_) total += b->memory().resident_bytes();
  return total;
}

int64_t DynamicPrecisionAdjuster::min_resident_bytes() const {
  const int64_t floor = mapper_.page_bytes(mapper_.ladder().front());
  int64_t total = resident_bytes();
  for (const MixedPrecisionBuffer* b : buffers_) {
    at::Tensor t = b->tiers().contiguous();
    const int8_t* p = t.data_ptr<int8_t>();
    for (int64_t i = 0; i < t.numel(); ++i)
      if (p[i] != kEvictedTier)  // an evicted block holds no page
        total -= std::max<int64_t>(0, mapper_.page_bytes(static_cast<Tier>(p[i])) - floor);
  }
  return total;
}

namespace {

struct Step {
  double key;  // demotion: error added per byte freed (smallest first); promotion: error removed per byte (largest first)
  int64_t layer, block, b, h;
  size_t entry;
  Tier to;
};

struct Entry {
  int64_t layer, block, b, h;
  Tier original, now;
  double score;
  bool shadow;
};

}  // namespace

AdjustResult DynamicPrecisionAdjuster::enforce(int64_t budget_bytes) {
  AdjustResult res;
  res.bytes_before = resident_bytes();
  const int64_t floor = min_resident_bytes();
  TORCH_CHECK_VALUE(budget_bytes >= floor, "budget: ", budget_bytes, " bytes is below the minimum achievable ", floor,
                    " bytes (every sealed block at ", tier_name(mapper_.ladder().front()),
                    "; the tails and block tables cannot be shrunk by re-tiering)");

  std::vector<Entry> entries;
  for (size_t l = 0; l < buffers_.size(); ++l) {
    const MixedPrecisionBuffer& buf = *buffers_[l];
    at::Tensor t = buf.tiers().contiguous(), s = scores(static_cast<int64_t>(l));
    const int64_t B = t.size(0), H = t.size(1), nb = t.size(2);
    auto ta = t.accessor<int8_t, 3>();
    auto sa = s.accessor<double, 3>();
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          if (ta[b][h][j] == kEvictedTier) continue;  // evicted by a sliding window: nothing to re-tier
          const Tier tier = static_cast<Tier>(ta[b][h][j]);
          entries.push_back({static_cast<int64_t>(l), j, b, h, tier, tier, sa[b][h][j], buf.has_shadow()});
        }
  }
  const auto& ladder = mapper_.ladder();
  auto pb = [&](Tier t) { return mapper_.page_bytes(t); };
  auto unit = [](Tier t) { return std::exp2(-tier_effective_bits(t)); };
  auto down = [&](Tier t, Tier* out) {  // the candidate with the most page bytes below t's (more bits on a tie)
    bool found = false;
    for (Tier c : ladder)
      if (pb(c) < pb(t) && (!found || pb(c) > pb(*out))) {
        *out = c;
        found = true;
      }
    return found;
  };
  auto up = [&](Tier t, Tier* out) {  // the cheapest candidate above t's page bytes with more bits
    for (Tier c : ladder)
      if (pb(c) > pb(t) && tier_effective_bits(c) > tier_effective_bits(t)) {
        *out = c;
        return true;
      }
    return false;
  };
  auto tie = [](const Step& a, const Step& b) {
    if (a.layer != b.layer) return a.layer > b.layer;
    if (a.block != b.block) return a.block > b.block;
    if (a.b != b.b) return a.b > b.b;
    return a.h > b.h;
  };

  int64_t planned = res.bytes_before;
  if (planned > budget_bytes) {
    auto later = [&](const Step& a, const Step& b) { return a.key != b.key ? a.key > b.key : tie(a, b); };
    std::priority_queue<Step, std::vector<Step>, decltype(later)> heap(later);
    auto push = [&](size_t i) {
      const Entry& e = entries[i];
      Tier to = e.now;
      if (!down(e.now, &to)) return;
      const double key = e.score * (unit(to) - unit(e.now)) / static_cast<double>(pb(e.now) - pb(to));
      heap.push({key, e.layer, e.block, e.b, e.h, i, to});
    };
    for (size_t i = 0; i < entries.size(); ++i) push(i);
    while (planned > budget_bytes && !heap.empty()) {
      const Step s = heap.top();
      heap.pop();
      Entry& e = entries[s.entry];
      planned -= pb(e.now) - pb(s.to);
      e.now = s.to;
      push(s.entry);
    }
  } else if (planned < budget_bytes) {
    auto worse = [&](const Step& a, const Step& b) { return a.key != b.key ? a.key < b.key : tie(a, b); };
    std::priority_queue<Step, std::vector<Step>, decltype(worse)> heap(worse);
    auto push = [&](size_t i) {
      const Entry& e = entries[i];
      Tier to = e.now;
      if (!e.shadow || !up(e.now, &to)) return;  // without a higher-precision copy, nothing to promote from
      const double key = e.score * (unit(e.now) - unit(to)) / static_cast<double>(pb(to) - pb(e.now));
      heap.push({key, e.layer, e.block, e.b, e.h, i, to});
    };
    for (size_t i = 0; i < entries.size(); ++i) push(i);
    while (!heap.empty()) {
      const Step s = heap.top();
      heap.pop();
      Entry& e = entries[s.entry];
      const int64_t extra = pb(s.to) - pb(e.now);
      if (planned + extra > budget_bytes) continue;  // does not fit: this entry stays where it is
      planned += extra;
      e.now = s.to;
      push(s.entry);
    }
  }

  // One set_block_tiers per (layer, block) that changes: each block re-quantized once from the highest copy held.
  size_t i = 0;
  while (i < entries.size()) {
    const int64_t l = entries[i].layer, j = entries[i].block;
    const BufferOptions& o = buffers_[l]->options();
    at::Tensor want = at::full({o.batch, o.kv_heads}, -1, at::kChar);
    bool change = false;
    for (; i < entries.size() && entries[i].layer == l && entries[i].block == j; ++i) {
      const Entry& e = entries[i];
      if (e.now == e.original) continue;
      want[e.b][e.h] = static_cast<int64_t>(tier_index(e.now));
      change = true;
      (pb(e.now) < pb(e.original) ? res.demotions : res.promotions) += 1;
    }
    if (change) buffers_[l]->set_block_tiers(j, want);
  }
  res.bytes_after = resident_bytes();
  TORCH_CHECK(res.bytes_after == planned, "DynamicPrecisionAdjuster: planned ", planned,
              " resident bytes but the buffers report ", res.bytes_after, " (page accounting disagrees)");
  return res;
}

}  // namespace kvprec
