// attend() for a buffer on the CPU: one fused pass, no ATen op per block (kvprec/buffer.h; the math is the one
// written at the top of attention.cpp, which keeps the ATen implementation for other devices). This file is the
// driver: work split, masks, windows, the online softmax and the outputs. The per-block products run in the kernels
// of the active instruction-set path (kvprec/cpu_isa.h, kvprec/cpu_kernels.h: scalar, AVX2, AVX-512), whose header
// states what each computes (FP tiers in FP32 on the stored values; integer tiers, on the SIMD paths, scored from
// their codes within a stated bound).
//
// Why fused: the ATen loop costs ~30 ops per block (block() alone is index_select + dequantize + index_copy per
// tier), and at decode shapes (a few query rows, 64 x head_dim elements per block) the dispatch overhead is what
// runs, not the arithmetic. Here a block costs one pass over its page.
//
// Work split. One work item is (batch row b, KV head h, tile of queries [i0, i1), split j); its rows are the G
// query heads of h times those queries (row r = g * n + i - i0, n = i1 - i0), at most kTileRows of them (more only
// when G alone is larger). Decode (Q = 1) is one tile per (b, h); a prefill chunk is cut into tiles, so that a
// tile's scores stay in cache and a causal tile stops at the block of its last query. Tiles of one (b, h) are
// ordered 0, last, 1, last - 1, ... so that the workers, which take items in turn from a shared counter
// (run_items), each get a mix of cheap early tiles and expensive late ones. When there are fewer (b, h, tile) than
// threads (batch 1 with few KV heads on many cores), each one's blocks are cut into S contiguous ranges
// (flash-decoding split); each range keeps its own (m, l, acc) and a second pass merges them in range order:
//   M = max_j m_j;  l = sum_j l_j e^(m_j - M);  acc = sum_j acc_j e^(m_j - M);  lse = M + log l.
// S depends only on the shape and the thread count (split_count), and nothing else is merged across threads, so
// the result is the same bits for a given thread count (and for any thread count while S = 1). at::parallel_for
// is header code: it runs on ATen's OpenMP pool only where this file is compiled with OpenMP, else serially.
//
// What a worker holds, allocated once per call (FP32): q [rows, D] the item's query rows; s [rows, T]
// the block's scores, then p; pv [rows, D]; m, l, alpha, psum, lo, hi [rows], acc [rows, D] the online-softmax state
// and each row's visible range; sums, refs [rows, nchunks] per-block sum_t p_t and reference max, for block_mass;
// and the kernels' scratch (cpu::work_floats: a few [T, D] arrays).
//
// Per row and block: the positions it may see form one range [lo, hi) (causal and window, bottom-right aligned);
// a block outside every row's range is not read at all, and a row whose range misses the block keeps its state
// (what the ATen path computes too: psum = 0 with alpha = 1, or l = acc = 0 while m = -inf). Inside the range
// the user mask sets s = -inf. Then, as in attention.cpp:
//   m' = max(m, max s); ref = m' or 0 while m' = -inf; alpha = exp(m - ref); p = exp(s - ref);
//   l = l * alpha + sum p; acc = acc * alpha + sum_t p_t v_t.
// What differs from ATen: summation orders (dot products, sum p, sum p v), exp (the kernels' exp_sum: a Cephes
// polynomial within 1 ulp, as ATen's vectorized Sleef expf is), tanh and log (libm), and the integer tiers'
// keys on the SIMD paths (kvprec/cpu_kernels.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kvprec/buffer.h"
#include "kvprec/cpu_kernels.h"

namespace kvprec {
namespace {

constexpr int64_t kTileRows = 64;         // rows (query heads x queries) per work item
constexpr int64_t kMinBlocksPerSplit = 4;  // a split range reads at least this many blocks
constexpr int64_t kPrefetchAhead = 2;      // blocks whose pages are asked into cache ahead of the one computed
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Raw view of one tier's pool (PoolView's tensors, contiguous CPU), bytes per page of K / V data.
struct PoolPtrs {
  const uint8_t* k = nullptr;
  const uint8_t* v = nullptr;
  const uint16_t *ks = nullptr, *kz = nullptr, *vs = nullptr, *vz = nullptr;  // FP16 bit patterns
  int64_t page_bytes = 0;
};

// Everything the kernel reads and writes, as raw pointers (set up once by attend_cpu below).
struct Problem {
  int64_t B, Hkv, D, T, VG, L, Q, G, nchunks, sealed, W, tile_q, tiles, splits;
  float scale, softcap;
  const cpu::Kernels* K;
  const int8_t* tiers;    // [B, Hkv, sealed]
  const int32_t* pages;   // [B, Hkv, sealed]
  std::array<PoolPtrs, kNumTiers> pools;
  const char* tail_k;     // tail element (b, h, t, d) at tail + (b * ts0 + h * ts1 + t * ts2 + d) * elem
  const char* tail_v;
  int64_t ts0, ts1, ts2;
  at::ScalarType dtype;   // model dtype (tail and output)
  const float* q;         // [B, Hq, Q, D] FP32
  const bool* mask;       // [B, Q, L] or null
  void* out;              // [B, Hq, Q, D] model dtype
  float* lse;             // [B, Hq, Q]
  float* mass;            // [B, Hq, Q, nchunks] or null
  // splits > 1: per (b, h, tile, split) the state of its rows (m, l [rows_max], acc [rows_max, D]) and per
  // (b, h, tile) the block sums / references [rows_max, nchunks] for block_mass.
  float *part_m, *part_l, *part_acc, *part_sums, *part_refs;
  int64_t rows_max;
};

struct Scratch {
  std::vector<float> q, s, pv, m, l, alpha, psum, acc, sums, refs, work;
  std::vector<int64_t> lo, hi;
  cpu::Work w;
  Scratch(const Problem& p, int64_t rows)
      : q(rows * p.D), s(rows * p.T), pv(rows * p.D), m(rows), l(rows), alpha(rows), psum(rows), acc(rows * p.D),
        sums(p.mass ? rows * p.nchunks : 0), refs(sums.size()), work(cpu::work_floats(rows, p.D, p.T, p.VG)),
        lo(rows), hi(rows) {
    w.f = work.data();
    w.nf = static_cast<int64_t>(work.size());
  }
};

// How many split ranges each (b, h, tile) gets: 1 while there are at least as many of them as threads; else enough
// that every thread gets work and the items divide evenly where possible, at least kMinBlocksPerSplit blocks each.
int64_t split_count(int64_t items, int64_t nchunks, int64_t threads) {
  if (items >= threads || nchunks < 2 * kMinBlocksPerSplit) return 1;
  const int64_t need = (threads + items - 1) / items, cap = nchunks / kMinBlocksPerSplit;
  int64_t s = need;
  while (s < 4 * need && (items * s) % threads != 0) ++s;
  if ((items * s) % threads != 0) s = need;
  return std::clamp<int64_t>(s, 1, cap);
}

cpu::Elem elem_of(Tier t) {
  switch (t) {
    case Tier::FP32: return cpu::Elem::F32;
    case Tier::FP16: return cpu::Elem::F16;
    case Tier::BF16: return cpu::Elem::BF16;
    case Tier::INT8: return cpu::Elem::U8;
    case Tier::INT4: return cpu::Elem::U4;
    case Tier::INT2: return cpu::Elem::U2;
  }
  return cpu::Elem::F32;
}

cpu::Elem elem_of(at::ScalarType dt) {
  return dt == at::kFloat ? cpu::Elem::F32 : dt == at::kHalf ? cpu::Elem::F16 : cpu::Elem::BF16;
}

// K (keys) or V of block c of (b, h): a sealed block's page, or the tail (len positions).
cpu::Rows block_rows(const Problem& p, int64_t b, int64_t h, int64_t c, int64_t len, bool keys) {
  cpu::Rows r;
  if (c >= p.sealed) {
    const int64_t elem = static_cast<int64_t>(c10::elementSize(p.dtype));
    r.elem = elem_of(p.dtype);
    r.data = reinterpret_cast<const uint8_t*>(keys ? p.tail_k : p.tail_v) + (b * p.ts0 + h * p.ts1) * elem;
    r.ld = p.ts2 * elem;
    r.n = len;
    return r;
  }
  const int64_t e = (b * p.Hkv + h) * p.sealed + c, page = p.pages[e];
  const Tier tier = static_cast<Tier>(p.tiers[e]);
  const PoolPtrs& pool = p.pools[tier_index(tier)];
  r.elem = elem_of(tier);
  r.data = (keys ? pool.k : pool.v) + page * pool.page_bytes;
  r.ld = tier_row_bytes(tier, p.D);
  r.n = p.T;
  if (tier_is_integer(tier)) {
    const int64_t meta = page * (keys ? p.D : p.T * (p.D / p.VG));  // first scale / zero of the page
    r.scale = (keys ? pool.ks : pool.vs) + meta;
    r.zero = (keys ? pool.kz : pool.vz) + meta;
  }
  return r;
}

// One cache line at p asked into cache. An asm statement on x86: GCC 12 left no prefetch instruction of
// __builtin_prefetch in this file's object (the loops below vanished), and a prefetch must not be optimized away.
inline void prefetch_line(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Ask for an integer block's codes, scales and zeros to be brought into cache while the current block is computed.
// Float blocks are left to the hardware prefetcher: asking for FP32 pages too made (1, 32, 8, 128, 16384) FP32
// decode about 7% slower, while INT4 ran about 11% faster (1 thread, AVX2 path, one buffer attended over and over;
// over buffers larger than the cache, bench/bench_decode_attention.py, the INT4 gain is within the noise).
void prefetch(const cpu::Rows& r, int64_t D, int64_t VG, bool keys) {
  if (!r.scale) return;
  const int64_t bytes = r.n * r.ld;
  for (int64_t o = 0; o < bytes; o += 64) prefetch_line(r.data + o);
  const int64_t meta = 2 * (keys ? D : r.n * (D / VG));
  for (int64_t o = 0; o < meta; o += 64) {
    prefetch_line(reinterpret_cast<const char*>(r.scale) + o);
    prefetch_line(reinterpret_cast<const char*>(r.zero) + o);
  }
}

// e^x for x <= 0 with the kernels' exp (the same function as the softmax's).
float exp_le0(const cpu::Kernels& K, float x) {
  K.exp_sum(&x, 1, 0.0f);
  return x;
}

// Blocks [c_begin, c_end) of (b, h) for queries [i0, i1): the online-softmax state of the item's rows in w.m, w.l,
// w.acc and, for block_mass, the per-block sums / references in sums, refs (row stride nchunks).
void attend_range(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t c_begin, int64_t c_end,
                  Scratch& w, float* sums, float* refs) {
  const cpu::Kernels& K = *p.K;
  const int64_t D = p.D, n = i1 - i0, rows = p.G * n, Hq = p.Hkv * p.G;
  for (int64_t g = 0; g < p.G; ++g)
    std::memcpy(w.q.data() + g * n * D, p.q + ((b * Hq + h * p.G + g) * p.Q + i0) * D, n * D * sizeof(float));
  std::fill_n(w.m.begin(), rows, kNegInf);
  std::fill_n(w.l.begin(), rows, 0.0f);
  std::fill_n(w.acc.begin(), rows * D, 0.0f);
  // Query i sits at position L - Q + i; it sees (pos - W, pos] (W = 0: [0, pos]).
  const int64_t first_pos = p.L - p.Q + i0, last_pos = p.L - p.Q + i1 - 1;
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t start = c * p.T, len = std::min(p.T, p.L - start);
    if (start > last_pos) break;                                   // causal: no later block is seen either
    if (p.W > 0 && start + len - 1 <= first_pos - p.W) continue;   // below every row's window
    // Visible ranges, and the positions [t_lo, t_hi) that some row sees.
    int64_t t_lo = len, t_hi = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = p.L - p.Q + i0 + r % n;
      w.hi[r] = std::min(len, pos - start + 1);
      w.lo[r] = p.W > 0 ? std::max<int64_t>(0, pos - p.W + 1 - start) : 0;
      if (w.lo[r] < w.hi[r]) {
        t_lo = std::min(t_lo, w.lo[r]);
        t_hi = std::max(t_hi, w.hi[r]);
      }
    }
    if (t_lo >= t_hi) continue;
    // Keys ahead before the scores, values ahead after them: two shorter bursts of prefetches (a long one stalls on
    // the cache's miss buffers).
    const int64_t f_first = c == c_begin ? c + 1 : c + kPrefetchAhead;
    const int64_t f_end = std::min({c + kPrefetchAhead + 1, c_end, p.sealed});
    for (int64_t f = f_first; f < f_end; ++f) prefetch(block_rows(p, b, h, f, p.T, true), D, p.VG, true);
    // Scores of every row over the positions some row sees (a row's own range is applied below).
    K.scores(w.q.data(), rows, D, block_rows(p, b, h, c, len, true), t_lo, t_hi, p.scale, w.s.data(), p.T, w.w);
    for (int64_t f = f_first; f < f_end; ++f) prefetch(block_rows(p, b, h, f, p.T, false), D, p.VG, false);
    // Softmax statistics per row; s becomes p over [t_lo, t_hi) (0 outside the row's range).
    for (int64_t r = 0; r < rows; ++r) {
      float* s = w.s.data() + r * p.T;
      const int64_t lo = w.lo[r], hi = w.hi[r];
      if (lo >= hi) {  // nothing of this block is visible to the row: its state is unchanged
        std::fill(s + t_lo, s + t_hi, 0.0f);
        w.alpha[r] = 0.0f;  // (e^0, not used)
        continue;
      }
      const bool* mrow = p.mask ? p.mask + (b * p.Q + i0 + r % n) * p.L + start : nullptr;
      if (p.softcap > 0.0f)
        for (int64_t t = lo; t < hi; ++t) s[t] = std::tanh(s[t] / p.softcap) * p.softcap;
      if (mrow)
        for (int64_t t = lo; t < hi; ++t) s[t] = mrow[t] ? s[t] : kNegInf;
      const float m_new = std::max(w.m[r], K.max(s + lo, hi - lo));
      const float ref = std::isinf(m_new) ? 0.0f : m_new;  // m_new is -inf or finite
      w.alpha[r] = w.m[r] - ref;  // its exponential below, all rows in one call
      w.psum[r] = K.exp_sum(s + lo, hi - lo, ref);
      w.m[r] = m_new;
      std::fill(s + t_lo, s + lo, 0.0f);
      std::fill(s + hi, s + t_hi, 0.0f);
      if (sums) {
        sums[r * p.nchunks + c] = w.psum[r];
        refs[r * p.nchunks + c] = ref;
      }
    }
    K.exp_sum(w.alpha.data(), rows, 0.0f);  // alpha = e^(m - ref) (the same bits as one row at a time)
    // pv = p v over [t_lo, t_hi), then acc = acc * alpha + pv and l = l * alpha + psum for the rows that see the block.
    K.values(w.s.data(), p.T, rows, D, p.VG, block_rows(p, b, h, c, len, false), t_lo, t_hi, w.pv.data(), w.w);
    for (int64_t r = 0; r < rows; ++r) {
      if (w.lo[r] >= w.hi[r]) continue;
      const float alpha = w.alpha[r];
      float* acc = w.acc.data() + r * D;
      const float* pv = w.pv.data() + r * D;
      for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * alpha + pv[d];
      w.l[r] = w.l[r] * alpha + w.psum[r];
    }
  }
}

template <typename out_t>
void store_row(const float* acc, float l, int64_t d, void* out, int64_t offset) {
  out_t* o = static_cast<out_t*>(out) + offset;
  for (int64_t c = 0; c < d; ++c) o[c] = static_cast<out_t>(acc[c] / l);  // nearest even, as ATen's .to()
}

// Outputs of the rows of (b, h, queries [i0, i1)) from their final state. Rows that saw no position keep l = 0,
// acc = 0, m = -inf: out 0, lse -inf, mass 0.
void finish_rows(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t i1, const float* m, const float* l,
                 const float* acc_all, const float* sums, const float* refs) {
  const int64_t D = p.D, n = i1 - i0, rows = p.G * n, Hq = p.Hkv * p.G;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = (b * Hq + h * p.G + r / n) * p.Q + i0 + r % n;
    const bool seen = l[r] > 0.0f;
    const float l_safe = seen ? l[r] : 1.0f;
    const float* acc = acc_all + r * D;
    switch (p.dtype) {
      case at::kFloat: store_row<float>(acc, l_safe, D, p.out, o * D); break;
      case at::kHalf: store_row<c10::Half>(acc, l_safe, D, p.out, o * D); break;
      default: store_row<c10::BFloat16>(acc, l_safe, D, p.out, o * D); break;
    }
    p.lse[o] = seen ? m[r] + std::log(l_safe) : kNegInf;
    if (p.mass) {
      const float m_safe = seen ? m[r] : 0.0f;
      for (int64_t c = 0; c < p.nchunks; ++c) {  // ref_c <= m wherever block c contributed: exponent <= 0
        const float sc = sums[r * p.nchunks + c], ref = refs[r * p.nchunks + c];
        p.mass[o * p.nchunks + c] = sc > 0.0f ? sc * exp_le0(*p.K, ref - m_safe) / l_safe : 0.0f;
      }
    }
  }
}

// Queries [i0, i1) of tile k of (b, h) (tiles in the order 0, last, 1, last - 1, ...).
void tile_queries(const Problem& p, int64_t k, int64_t* i0, int64_t* i1) {
  const int64_t tile = k % 2 == 0 ? k / 2 : p.tiles - 1 - k / 2;
  *i0 = tile * p.tile_q;
  *i1 = std::min(p.Q, *i0 + p.tile_q);
}

// Items are handed out one at a time from a shared counter (each worker takes the next one when done), not as the
// fixed contiguous ranges of parallel_for: on a machine shared with other work a worker that loses its core for a
// while no longer holds back the items it was given. What an item computes does not depend on which worker runs
// it, so the result stays the same bits for a given thread count.
void run_items(const Problem& p) {
  const int64_t units = p.B * p.Hkv * p.tiles;  // (b, h, tile)
  const int64_t items = units * p.splits;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(items, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Scratch w(p, p.rows_max);
    for (int64_t item = next.fetch_add(1, std::memory_order_relaxed); item < items;
         item = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t unit = item / p.splits, j = item % p.splits;
      const int64_t bh = unit / p.tiles, b = bh / p.Hkv, h = bh % p.Hkv;
      int64_t i0, i1;
      tile_queries(p, unit % p.tiles, &i0, &i1);
      if (p.splits == 1) {
        if (p.mass) {  // blocks the item skips keep sum 0
          std::fill(w.sums.begin(), w.sums.end(), 0.0f);
          std::fill(w.refs.begin(), w.refs.end(), 0.0f);
        }
        attend_range(p, b, h, i0, i1, 0, p.nchunks, w, p.mass ? w.sums.data() : nullptr, w.refs.data());
        finish_rows(p, b, h, i0, i1, w.m.data(), w.l.data(), w.acc.data(), w.sums.data(), w.refs.data());
        continue;
      }
      const int64_t c0 = p.nchunks * j / p.splits, c1 = p.nchunks * (j + 1) / p.splits;
      float* sums = p.mass ? p.part_sums + unit * p.rows_max * p.nchunks : nullptr;
      float* refs = p.mass ? p.part_refs + unit * p.rows_max * p.nchunks : nullptr;
      attend_range(p, b, h, i0, i1, c0, c1, w, sums, refs);
      const int64_t rows = p.G * (i1 - i0);
      std::copy_n(w.m.begin(), rows, p.part_m + item * p.rows_max);
      std::copy_n(w.l.begin(), rows, p.part_l + item * p.rows_max);
      std::copy_n(w.acc.begin(), rows * p.D, p.part_acc + item * p.rows_max * p.D);
    }
  });
  if (p.splits == 1) return;
  // Merge the split ranges of each (b, h, tile), in range order.
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> m(p.rows_max), l(p.rows_max), acc(p.rows_max * p.D);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bh = unit / p.tiles;
      int64_t i0, i1;
      tile_queries(p, unit % p.tiles, &i0, &i1);
      const int64_t rows = p.G * (i1 - i0);
      for (int64_t r = 0; r < rows; ++r) {
        float mx = kNegInf;
        for (int64_t j = 0; j < p.splits; ++j) mx = std::max(mx, p.part_m[(unit * p.splits + j) * p.rows_max + r]);
        const float ref = std::isinf(mx) ? 0.0f : mx;
        float lr = 0.0f;
        float* a = acc.data() + r * p.D;
        std::fill_n(a, p.D, 0.0f);
        for (int64_t j = 0; j < p.splits; ++j) {
          const int64_t item = unit * p.splits + j;
          const float lj = p.part_l[item * p.rows_max + r];
          if (!(lj > 0.0f)) continue;  // the range saw nothing of this row
          const float f = exp_le0(*p.K, p.part_m[item * p.rows_max + r] - ref);
          lr += lj * f;
          const float* aj = p.part_acc + (item * p.rows_max + r) * p.D;
          for (int64_t d = 0; d < p.D; ++d) a[d] += aj[d] * f;
        }
        m[r] = mx;
        l[r] = lr;
      }
      const float* sums = p.mass ? p.part_sums + unit * p.rows_max * p.nchunks : nullptr;
      const float* refs = p.mass ? p.part_refs + unit * p.rows_max * p.nchunks : nullptr;
      finish_rows(p, bh / p.Hkv, bh % p.Hkv, i0, i1, m.data(), l.data(), acc.data(), sums, refs);
    }
  });
}

}  // namespace

namespace detail {

// Called by attend() (attention.cpp) after it has checked the arguments, for a buffer on the CPU.
AttentionResult attend_cpu(const MixedPrecisionBuffer& buffer, const at::Tensor& q, const at::Tensor& mask,
                           const AttentionOptions& options) {
  const BufferOptions& bo = buffer.options();
  Problem p{};
  p.K = &cpu::kernels();  // throws the dispatcher's error (an unsupported KVPREC_CPU_ISA) before any work
  p.B = bo.batch;
  p.Hkv = bo.kv_heads;
  p.D = bo.head_dim;
  p.T = bo.block_size;
  p.VG = bo.group_size;
  p.L = buffer.seq_len();
  p.Q = q.size(2);
  p.G = q.size(1) / p.Hkv;
  p.nchunks = (p.L + p.T - 1) / p.T;
  p.sealed = buffer.num_sealed_blocks();
  p.W = options.sliding_window;
  p.tile_q = std::clamp<int64_t>(kTileRows / p.G, 1, p.Q);
  p.tiles = (p.Q + p.tile_q - 1) / p.tile_q;
  p.rows_max = p.G * p.tile_q;
  p.splits = split_count(p.B * p.Hkv * p.tiles, p.nchunks, at::get_num_threads());
  p.scale = static_cast<float>(options.scale > 0.0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(p.D)));
  p.softcap = static_cast<float>(options.softcap);
  p.dtype = bo.dtype;

  const at::Tensor tiers = buffer.tiers().contiguous(), pages = buffer.pages().contiguous();  // host copies
  p.tiers = tiers.data_ptr<int8_t>();
  p.pages = pages.data_ptr<int32_t>();
  std::array<bool, kNumTiers> used{};
  for (int64_t e = 0; e < tiers.numel(); ++e)
    if (p.tiers[e] != kEvictedTier) used[p.tiers[e]] = true;  // attend() checked the window skips evicted blocks
  std::array<PoolView, kNumTiers> views;  // keeps the pool tensors alive for the call
  for (Tier t : kAllTiers) {
    if (!used[tier_index(t)]) continue;
    PoolView& pv = views[tier_index(t)] = buffer.pool(t);
    PoolPtrs& pp = p.pools[tier_index(t)];
    TORCH_INTERNAL_ASSERT(pv.k.is_cpu() && pv.k.is_contiguous() && pv.v.is_contiguous());
    pp.k = static_cast<const uint8_t*>(pv.k.const_data_ptr());
    pp.v = static_cast<const uint8_t*>(pv.v.const_data_ptr());
    pp.page_bytes = pv.k.stride(0) * static_cast<int64_t>(pv.k.element_size());
    if (tier_is_integer(t)) {
      for (const at::Tensor* m : {&pv.k_scale, &pv.k_zero, &pv.v_scale, &pv.v_zero})
        TORCH_INTERNAL_ASSERT(m->scalar_type() == at::kHalf && m->is_contiguous());
      pp.ks = static_cast<const uint16_t*>(pv.k_scale.const_data_ptr());
      pp.kz = static_cast<const uint16_t*>(pv.k_zero.const_data_ptr());
      pp.vs = static_cast<const uint16_t*>(pv.v_scale.const_data_ptr());
      pp.vz = static_cast<const uint16_t*>(pv.v_zero.const_data_ptr());
    }
  }
  const at::Tensor tk = buffer.tail_keys(), tv = buffer.tail_values();  // views of [B, H, T, D]
  TORCH_INTERNAL_ASSERT(tk.stride(3) == 1 && tk.strides() == tv.strides());
  p.tail_k = static_cast<const char*>(tk.const_data_ptr());
  p.tail_v = static_cast<const char*>(tv.const_data_ptr());
  p.ts0 = tk.stride(0);
  p.ts1 = tk.stride(1);
  p.ts2 = tk.stride(2);

  const at::Tensor qf = q.to(at::kCPU, at::kFloat).contiguous();
  p.q = qf.const_data_ptr<float>();
  const at::Tensor mk = mask.defined() ? mask.to(at::kCPU).contiguous() : at::Tensor();
  p.mask = mk.defined() ? mk.const_data_ptr<bool>() : nullptr;

  const int64_t Hq = q.size(1);
  AttentionResult result;
  result.out = at::empty({p.B, Hq, p.Q, p.D}, at::TensorOptions().dtype(bo.dtype));
  result.lse = at::empty({p.B, Hq, p.Q}, at::TensorOptions().dtype(at::kFloat));
  if (options.block_mass) result.block_mass = at::empty({p.B, Hq, p.Q, p.nchunks}, at::kFloat);
  p.out = result.out.data_ptr();
  p.lse = result.lse.data_ptr<float>();
  p.mass = options.block_mass ? result.block_mass.data_ptr<float>() : nullptr;

  std::vector<float> part;  // split state (only when splitting)
  if (p.splits > 1) {
    const int64_t units = p.B * p.Hkv * p.tiles, items = units * p.splits;
    const int64_t mass = p.mass ? 2 * units * p.rows_max * p.nchunks : 0;
    part.assign(items * p.rows_max * (2 + p.D) + mass, 0.0f);  // mass: blocks a range skips keep sum 0
    p.part_m = part.data();
    p.part_l = p.part_m + items * p.rows_max;
    p.part_acc = p.part_l + items * p.rows_max;
    p.part_sums = p.part_acc + items * p.rows_max * p.D;
    p.part_refs = p.part_sums + (p.mass ? units * p.rows_max * p.nchunks : 0);
  }
  run_items(p);
  return result;
}

}  // namespace detail
}  // namespace kvprec
