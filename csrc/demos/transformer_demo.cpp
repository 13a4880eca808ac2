// transformer_demo: a small decoder-only transformer written in LibTorch (ATen) generates tokens with an
// adaptive mixed-precision KV cache, next to the same model on an FP16 cache. It prints the per-layer
// precision maps from a calibration prefill, a dynamic adjustment (the byte budget tightens half-way and the
// adjuster demotes blocks while generation goes on), memory before/after, and the measured output error:
// relative logit error and top-1 agreement per step, the adaptive run teacher-forced on the reference tokens so
// both see the same inputs. Every number printed is computed in this run. Weights are random (seeded):
// this shows the mechanism and its measured error, not a trained model's quality.
//
//   transformer_demo [--tokens N] [--prompt P] [--layers L]   (limits and why: usage() below, printed by --help)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "demo_args.h"
#include "kvprec/analyzer.h"
#include "kvprec/buffer.h"

using namespace kvprec;

namespace {

struct Config {
  int64_t vocab = 256, hidden = 256, layers = 4, q_heads = 8, kv_heads = 2, head_dim = 32, ffn = 512;
  int64_t block = 32, value_group = 32;
  double rope_theta = 10000.0;
};

// Pre-norm Llama-style layer: RMSNorm, attention with GQA and RoPE, RMSNorm, SiLU-gated MLP.
struct Layer {
  at::Tensor wq, wk, wv, wo, w_gate, w_up, w_down, norm1, norm2;
};

struct Model {
  Config cfg;
  at::Tensor embed, final_norm;  // the LM head is tied to the embedding
  std::vector<Layer> layers;

  explicit Model(const Config& c) : cfg(c) {
    at::manual_seed(7);
    auto init = [](int64_t out, int64_t in) { return at::randn({out, in}) / std::sqrt(static_cast<double>(in)); };
    embed = at::randn({c.vocab, c.hidden});
    final_norm = at::ones({c.hidden});
    for (int64_t l = 0; l < c.layers; ++l) {
      Layer L;
      L.wq = init(c.q_heads * c.head_dim, c.hidden) * 2.0;  // a sharper attention than a plain 1/sqrt(in) init
      L.wk = init(c.kv_heads * c.head_dim, c.hidden) * 2.0;
      L.wv = init(c.kv_heads * c.head_dim, c.hidden);
      L.wo = init(c.hidden, c.q_heads * c.head_dim);
      L.w_gate = init(c.ffn, c.hidden);
      L.w_up = init(c.ffn, c.hidden);
      L.w_down = init(c.hidden, c.ffn);
      L.norm1 = at::ones({c.hidden});
      L.norm2 = at::ones({c.hidden});
      layers.push_back(L);
    }
  }

  static at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w) {
    return x * at::rsqrt(x.pow(2).mean(-1, true) + 1e-6) * w;
  }

  // Rotary embedding of x [B, H, S, D] at positions [S] (rotate-half convention).
  at::Tensor rope(const at::Tensor& x, const at::Tensor& positions) const {
    const int64_t half = cfg.head_dim / 2;
    at::Tensor inv = at::pow(cfg.rope_theta, -at::arange(half, at::kFloat) * 2.0 / static_cast<double>(cfg.head_dim));
    at::Tensor ang = positions.to(at::kFloat).unsqueeze(1) * inv.unsqueeze(0);  // [S, D/2]
    at::Tensor cos = at::cat({ang.cos(), ang.cos()}, -1), sin = at::cat({ang.sin(), ang.sin()}, -1);
    at::Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
    return x * cos + at::cat({-x2, x1}, -1) * sin;
  }

  struct Calibration {  // per layer: q [Hq, S, D], k/v [Hkv, S, D] of a prefill
    std::vector<at::Tensor> q, k, v;
  };

  // Forward of tokens [S] for batch 1, appending to the buffers; returns logits [S, vocab] (FP32).
  // With `map`, sealed blocks take the map's tiers (KVCacheAnalyzer::append); with `calib`, records q/k/v.
  at::Tensor forward(const at::Tensor& tokens, std::vector<std::unique_ptr<MixedPrecisionBuffer>>& cache,
                     const PrecisionMap* map, Calibration* calib, std::vector<at::Tensor>* block_mass) const {
    const int64_t s = tokens.size(0), start = cache[0]->seq_len();
    at::Tensor positions = at::arange(start, start + s, at::kLong);
    at::Tensor h = embed.index_select(0, tokens).unsqueeze(0);  // [1, S, hidden]
    for (int64_t l = 0; l < cfg.layers; ++l) {
      const Layer& L = layers[l];
      at::Tensor x = rms_norm(h, L.norm1);
      auto heads = [&](const at::Tensor& w, int64_t n) {
        return at::matmul(x, w.t()).view({1, s, n, cfg.head_dim}).transpose(1, 2);  // [1, n, S, D]
      };
      at::Tensor q = rope(heads(L.wq, cfg.q_heads), positions), k = rope(heads(L.wk, cfg.kv_heads), positions);
      at::Tensor v = heads(L.wv, cfg.kv_heads);
      if (calib) {
        calib->q.push_back(q[0]);
        calib->k.push_back(k[0]);
        calib->v.push_back(v[0]);
      }
      if (map) KVCacheAnalyzer::append(*cache[l], *map, l, k.to(at::kHalf), v.to(at::kHalf));
      else cache[l]->append(k.to(at::kHalf), v.to(at::kHalf));
      AttentionOptions aopts;
      aopts.block_mass = block_mass != nullptr;
      AttentionResult r = attend(*cache[l], q.to(at::kHalf), {}, aopts);
      if (block_mass) (*block_mass)[l] = r.block_mass;
      at::Tensor o = r.out.to(at::kFloat).transpose(1, 2).reshape({1, s, cfg.q_heads * cfg.head_dim});
      h = h + at::matmul(o, L.wo.t());
      at::Tensor y = rms_norm(h, L.norm2);
      h = h + at::matmul(at::silu(at::matmul(y, L.w_gate.t())) * at::matmul(y, L.w_up.t()), L.w_down.t());
    }
    return at::matmul(rms_norm(h, final_norm), embed.t())[0];
  }
};

std::vector<std::unique_ptr<MixedPrecisionBuffer>> make_cache(const Config& c, Tier tier) {
  std::vector<std::unique_ptr<MixedPrecisionBuffer>> cache;
  for (int64_t l = 0; l < c.layers; ++l) {
    BufferOptions o;
    o.kv_heads = c.kv_heads;
    o.head_dim = c.head_dim;
    o.block_size = c.block;
    o.group_size = c.value_group;
    o.default_tier = tier;
    cache.push_back(std::make_unique<MixedPrecisionBuffer>(o));
  }
  return cache;
}

int64_t resident(const std::vector<std::unique_ptr<MixedPrecisionBuffer>>& cache) {
  int64_t total = 0;
  for (const auto& b : cache) total += b->memory().resident_bytes();
  return total;
}

void print_tiers(const std::vector<std::unique_ptr<MixedPrecisionBuffer>>& cache, const char* title) {
  std::printf("%s (sealed blocks per head; 1=fp16 3=int8 4=int4 5=int2):\n", title);
  for (size_t l = 0; l < cache.size(); ++l) {
    at::Tensor t = cache[l]->tiers()[0];  // [H, NB]
    std::printf("  layer %zu:", l);
    for (int64_t h = 0; h < t.size(0); ++h) {
      std::printf("  h%lld ", static_cast<long long>(h));
      for (int64_t j = 0; j < t.size(1); ++j) std::printf("%d", static_cast<int>(t[h][j].item<int8_t>()));
    }
    std::printf("\n");
  }
}

// Upper limits: bounds on run time, not limits of the library. The prefill and its calibration are quadratic in
// P (every prompt query attends to every earlier position), each generated token is one forward pass over all
// layers and the cache, and both scale with L. At all three caps a run took 80 s and 340 MB on one core.
constexpr int64_t kMaxPrompt = 2048, kMaxTokens = 512, kMaxLayers = 16;

std::string usage(const Config& c) {
  const std::string t = std::to_string(c.block);
  return "usage: transformer_demo [--tokens N] [--prompt P] [--layers L] [--help]\n"
         "  --tokens N  tokens to generate, an integer in [2, " + std::to_string(kMaxTokens) + "] (default 64). The\n"
         "              budget tightens after N / 2 steps; each half reports its own error.\n"
         "  --prompt P  prompt length, an integer in [1, " + std::to_string(kMaxPrompt) + "] (default 256). The map\n"
         "              covers the ceil(P / " + t + ") blocks the prompt touches. With P = 1 the calibration\n"
         "              sees one key: a softmax over one position does not depend on it, so the curvature is 0,\n"
         "              the map's largest required bits print as -inf (log2 of 0) and no tier is predicted to\n"
         "              cost any error.\n"
         "  --layers L  decoder layers, an integer in [1, " + std::to_string(kMaxLayers) + "] (default " +
         std::to_string(c.layers) + ").\n"
         "  P + N >= " + t + ": blocks of " + t + " positions are quantized only when sealed (full); a shorter\n"
         "              run keeps every position in the FP16 tail, with nothing to compress.\n"
         "Exit codes: 0 done; 1 the run failed a self-check or the library raised an error; 2 a bad argument.\n";
}

int run(const Config& cfg, int64_t new_tokens, int64_t prompt) {
  at::set_num_threads(1);
  const Model model(cfg);
  std::printf("kvprec transformer_demo: %lld layers, hidden %lld, %lld query / %lld KV heads of dim %lld, blocks of %lld; "
              "prompt %lld tokens, %lld new tokens (random weights, seed 7)\n",
              static_cast<long long>(cfg.layers), static_cast<long long>(cfg.hidden), static_cast<long long>(cfg.q_heads),
              static_cast<long long>(cfg.kv_heads), static_cast<long long>(cfg.head_dim), static_cast<long long>(cfg.block),
              static_cast<long long>(prompt), static_cast<long long>(new_tokens));
  at::manual_seed(11);
  at::Tensor prompt_tokens = at::randint(0, cfg.vocab, {prompt}, at::kLong);

  // 1. reference: FP16 cache, greedy generation; its prefill doubles as the calibration run.
  auto ref_cache = make_cache(cfg, Tier::FP16);
  Model::Calibration calib;
  at::Tensor logits = model.forward(prompt_tokens, ref_cache, nullptr, &calib, nullptr);
  std::vector<int64_t> tokens;
  std::vector<at::Tensor> ref_logits;
  for (int64_t i = 0; i < new_tokens; ++i) {
    at::Tensor last = logits[-1];
    ref_logits.push_back(last);
    tokens.push_back(last.argmax().item<int64_t>());
    logits = model.forward(at::full({1}, tokens.back(), at::kLong), ref_cache, nullptr, nullptr, nullptr);
  }

  // 2. analysis: curvature of the prefill attention -> a precision map per layer under a byte budget of
  //    0.4 x the FP16 pages (a multiple-choice knapsack over every (layer, head, block); INT4 pages of this
  //    geometry are already 0.31 x FP16, metadata included).
  AnalyzerOptions aopts;
  aopts.mapper.geometry = {cfg.block, cfg.head_dim, cfg.value_group};
  aopts.mapper.candidates = {Tier::INT4, Tier::INT8, Tier::FP16};
  KVCacheAnalyzer analyzer(aopts);
  for (int64_t l = 0; l < cfg.layers; ++l) analyzer.add_calibration(l, calib.q[l], calib.k[l], calib.v[l]);
  // The analyzer maps every block the prompt touches, ceil(P / T), the partial last one included (it seals
  // during generation); the budget covers the same blocks, so it is never below what the map must hold.
  const int64_t mapped_blocks = (prompt + cfg.block - 1) / cfg.block;
  MapRequest request;
  request.mode = MapMode::Budget;
  request.budget_bytes = static_cast<int64_t>(0.4 * cfg.layers * cfg.kv_heads * mapped_blocks *
                                              aopts.mapper.geometry.page_bytes(Tier::FP16));
  const PrecisionMap map = analyzer.analyze(request);
  std::printf("\nprecision map from the calibration prefill:\n%s\n", map.report.to_markdown().c_str());

  // 3. adaptive run, teacher-forced on the reference tokens; half-way, the budget tightens to 85% of what the
  //    cache holds then, and the adjuster demotes the least important blocks (accumulated attention mass).
  auto cache = make_cache(cfg, Tier::INT4);
  for (int64_t l = 0; l < cfg.layers; ++l)
    cache[l] = std::make_unique<MixedPrecisionBuffer>(
        KVCacheAnalyzer::buffer_options(map, l, 1, at::kHalf, c10::Device(c10::kCPU), false));
  std::vector<MixedPrecisionBuffer*> raw;
  for (auto& b : cache) raw.push_back(b.get());
  DynamicPrecisionAdjuster adjuster(raw, aopts.mapper, ImportanceScore::AttentionMass, &map);
  std::vector<at::Tensor> mass(cfg.layers);
  logits = model.forward(prompt_tokens, cache, &map, nullptr, &mass);
  for (int64_t l = 0; l < cfg.layers; ++l) adjuster.observe(l, mass[l]);
  print_tiers(cache, "tiers after the prefill");

  double err_first = 0.0, err_second = 0.0;
  int64_t agree_first = 0, agree_second = 0;
  const int64_t half = new_tokens / 2;
  for (int64_t i = 0; i < new_tokens; ++i) {
    if (i == half) {
      const int64_t before = resident(cache);
      const int64_t budget = static_cast<int64_t>(0.85 * static_cast<double>(before));
      const AdjustResult r = adjuster.enforce(std::max(budget, adjuster.min_resident_bytes()));
      std::printf("\nstep %lld: budget tightened to %lld bytes -> %lld demotions, %lld -> %lld bytes\n",
                  static_cast<long long>(i), static_cast<long long>(budget), static_cast<long long>(r.demotions),
                  static_cast<long long>(r.bytes_before), static_cast<long long>(r.bytes_after));
      print_tiers(cache, "tiers after the adjustment");
    }
    at::Tensor last = logits[-1];
    const double err = ((last - ref_logits[i]).norm() / ref_logits[i].norm()).item<double>();
    const bool agree = last.argmax().item<int64_t>() == tokens[i];
    (i < half ? err_first : err_second) += err;
    (i < half ? agree_first : agree_second) += agree ? 1 : 0;
    logits = model.forward(at::full({1}, tokens[i], at::kLong), cache, nullptr, nullptr, &mass);
    for (int64_t l = 0; l < cfg.layers; ++l) adjuster.observe(l, mass[l]);
  }

  const int64_t ref_bytes = resident(ref_cache), bytes = resident(cache);
  std::printf("\nmemory (all layers, %lld positions): FP16 cache %lld bytes, adaptive %lld bytes (%.2fx smaller)\n",
              static_cast<long long>(ref_cache[0]->seq_len()), static_cast<long long>(ref_bytes),
              static_cast<long long>(bytes), static_cast<double>(ref_bytes) / static_cast<double>(bytes));
  std::printf("measured output error vs the FP16 cache (teacher-forced):\n");
  std::printf("  steps 0..%lld   (map from calibration): mean relative logit error %.3e, top-1 agreement %lld/%lld\n",
              static_cast<long long>(half - 1), err_first / half, static_cast<long long>(agree_first),
              static_cast<long long>(half));
  std::printf("  steps %lld..%lld (after the adjustment): mean relative logit error %.3e, top-1 agreement %lld/%lld\n",
              static_cast<long long>(half), static_cast<long long>(new_tokens - 1),
              err_second / (new_tokens - half), static_cast<long long>(agree_second),
              static_cast<long long>(new_tokens - half));
  if (!std::isfinite(err_first) || !std::isfinite(err_second)) {
    std::fprintf(stderr, "transformer_demo: the measured logit error is not finite (%g, %g)\n", err_first, err_second);
    return 1;
  }
  if (bytes >= ref_bytes) {  // not for want of a sealed block: the command line asks for P + N >= T
    std::fprintf(stderr, "transformer_demo: the adaptive cache (%lld bytes) is not smaller than the FP16 one (%lld)\n",
                 static_cast<long long>(bytes), static_cast<long long>(ref_bytes));
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return demo::guarded_main("transformer_demo", [&] {
    Config cfg;
    int64_t new_tokens = 64, prompt = 256;
    demo::Parser args(usage(cfg));
    args.add_int("--tokens", &new_tokens, 2, kMaxTokens,
                 "two halves of at least one step: before and after the budget tightens");
    args.add_int("--prompt", &prompt, 1, kMaxPrompt);
    args.add_int("--layers", &cfg.layers, 1, kMaxLayers);
    if (!args.parse(argc, argv)) return 0;
    if (prompt + new_tokens < cfg.block)
      throw demo::UsageError("--prompt " + std::to_string(prompt) + " + --tokens " + std::to_string(new_tokens) +
                             " = " + std::to_string(prompt + new_tokens) + " positions is not accepted; expected >= " +
                             std::to_string(cfg.block) +
                             " (one full block is sealed and quantized; fewer stay in the FP16 tail)");
    return run(cfg, new_tokens, prompt);
  });
}
