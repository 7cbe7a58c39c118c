// Paged attention that reads each key and value where it lies in the cache.
//
// One core, attend(), serves every case: a tile of query rows of one sequence and one KV
// head (its G query heads for a decode, G heads of several tokens for a prefill chunk or a
// multi-query decode) walks that sequence's blocks once. Each key and value is read once
// for all the rows, and an online softmax (running max and sum per row) folds block after
// block into the rows' accumulators, so no row's scores over the whole context are kept.
//
// Conventions are pagoda_kernels/attention.py's: caches [blocks, block_size, kv_heads, D],
// a query at position p sees keys j <= p, and with a window w only those with p - j < w.
#pragma once

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common.h"

namespace pagoda {

// The query rows one task attends with, and their running softmax state.
struct Rows {
  int64_t count = 0;
  std::vector<float> q;      // [count][dp], scaled
  std::vector<int64_t> pos;  // [count] position of each row's token
  std::vector<float> acc;    // [count][dp] weighted sum of values, not yet divided by sum
  std::vector<float> max;    // [count] largest score so far
  std::vector<float> sum;    // [count] sum of exp(score - max) so far
  std::vector<const void*> raw;  // [count] each query as given (bf16 dot products read it)
  float scale = 1.f;             // what q is scaled by

  void reset(int64_t n, int64_t dp) {
    count = n;
    q.resize(n * dp);
    raw.resize(n);
    pos.resize(n);
    acc.assign(n * dp, 0.f);
    max.assign(n, -std::numeric_limits<float>::infinity());
    sum.assign(n, 0.f);
  }
};

// Where one KV head's rows of a sequence lie in the cache.
template <typename T>
struct PagedHead {
  const T* k;              // the key cache, offset to this KV head
  const T* v;              // the value cache, likewise
  const int64_t* table;    // the sequence's blocks in order
  int64_t block_size;
  int64_t token_stride;    // kv_heads * D
  int64_t dim;
};

// Per-thread buffers for one block: its values in float, the rows' scores, and the
// per-lane partial products the scores are summed from.
struct BlockScratch {
  std::vector<float> v, scores;
  std::vector<Vec> parts;
};

// The longest head, in vectors, that the kernels keep in registers (256 floats).
constexpr int kMaxVectors = 256 / kLanes;
// The most query rows one task attends with (a prefill tile, or a decode's group).
constexpr int64_t kMaxRows = 64;

// Row r's scores of keys [j0, j0 + n) in sc, masked to what the row sees, become its
// weights exp(score - new max) in place, and its running max and sum move on; alpha is
// what its accumulator must be scaled by. False, with nothing changed but the mask, when
// the row sees none of these keys.
inline bool fold_scores(Rows& rows, int64_t r, float* sc, int64_t j0, int64_t n,
                        int64_t window, float& alpha) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t np = round_up(n);
  const int64_t p = rows.pos[r];
  const bool all_visible = j0 + n - 1 <= p && (window <= 0 || p - j0 < window);
  if (!all_visible) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t key = j0 + j;
      if (key > p || (window > 0 && p - key >= window)) sc[j] = neg_inf;
    }
  }
  std::fill(sc + n, sc + np, neg_inf);
  Vec top(neg_inf);
  for (int64_t i = 0; i < np; i += kLanes) top = at::vec::maximum(top, Vec::loadu(sc + i));
  const float block_max = hmax(top);
  if (block_max == neg_inf) return false;
  const float new_max = std::max(rows.max[r], block_max);
  alpha = std::exp(rows.max[r] - new_max);
  Vec total(0.f);
  for (int64_t i = 0; i < np; i += kLanes) {
    Vec e = (Vec::loadu(sc + i) - Vec(new_max)).exp_u20();
    e.store(sc + i);
    total = total + e;
  }
  rows.sum[r] = rows.sum[r] * alpha + hsum(total);
  rows.max[r] = new_max;
  return true;
}

// Folds keys [j0, j0 + n) (all in one block) into every row's softmax state, for any head
// size nv (in vectors): through float copies of the keys and values.
template <typename T>
void attend_block(Rows& rows, const PagedHead<T>& head, int64_t block, int64_t j0, int64_t n,
                  int nv, int64_t window, BlockScratch& s) {
  const int64_t dp = nv * kLanes;
  const int64_t np = round_up(n);
  const int64_t first = head.table[block] * head.block_size + (j0 - block * head.block_size);
  // Scores: each key row is converted once, multiplied into every row's query, and the
  // products of kLanes keys are summed across lanes together.
  for (int64_t c = 0; c < np; c += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - c);
    for (int64_t j = 0; j < m; ++j) {
      float kf[kMaxVectors * kLanes];
      to_float(head.k + (first + c + j) * head.token_stride, kf, head.dim);
      for (int64_t r = 0; r < rows.count; ++r) {
        const float* q = rows.q.data() + r * dp;
        Vec a = Vec::loadu(q) * Vec::loadu(kf);
        for (int i = 1; i < nv; ++i) {
          a = at::vec::fmadd(Vec::loadu(q + i * kLanes), Vec::loadu(kf + i * kLanes), a);
        }
        s.parts[r * kLanes + j] = a;
      }
    }
    for (int64_t r = 0; r < rows.count; ++r) {
      for (int64_t j = m; j < kLanes; ++j) s.parts[r * kLanes + j] = Vec(0.f);
      lane_sums(s.parts.data() + r * kLanes).store(s.scores.data() + r * np + c);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    to_float(head.v + (first + j) * head.token_stride, s.v.data() + j * dp, head.dim);
  }
  for (int64_t r = 0; r < rows.count; ++r) {
    float alpha;
    if (!fold_scores(rows, r, s.scores.data() + r * np, j0, n, window, alpha)) continue;
    const float* sc = s.scores.data() + r * np;
    float* acc_row = rows.acc.data() + r * dp;
    Vec acc[kMaxVectors];
    for (int i = 0; i < nv; ++i) acc[i] = Vec::loadu(acc_row + i * kLanes) * Vec(alpha);
    for (int64_t j = 0; j < n; ++j) {
      const Vec w(sc[j]);
      const float* v = s.v.data() + j * dp;
      for (int i = 0; i < nv; ++i) acc[i] = at::vec::fmadd(w, Vec::loadu(v + i * kLanes), acc[i]);
    }
    for (int i = 0; i < nv; ++i) acc[i].store(acc_row + i * kLanes);
  }
}

// NV vectors of float from src (NV * kLanes elements).
template <typename T, int NV>
inline void load_floats(const T* src, Vec* out) {
  if constexpr (std::is_same_v<T, float>) {
    for (int i = 0; i < NV; ++i) out[i] = Vec::loadu(src + i * kLanes);
  } else {
    using TVec = at::vec::Vectorized<T>;
    for (int i = 0; i + 1 < NV; i += 2) {
      auto [lo, hi] = at::vec::convert_to_float<T>(TVec::loadu(src + i * kLanes));
      out[i] = lo;
      out[i + 1] = hi;
    }
    if constexpr (NV % 2 == 1) {
      auto [lo, hi] = at::vec::convert_to_float<T>(TVec::loadu(src + (NV - 1) * kLanes, kLanes));
      out[NV - 1] = lo;
    }
  }
}

// Registers the value accumulators may take: a group of rows shares each converted value.
constexpr int kAccRegisters = kLanes == 16 ? 16 : 8;

#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

// Whether the scores of a bf16 head of NV vectors come from the CPU's bf16 dot products
// (unscaled, straight from the raw query and keys) rather than from float copies.
template <typename T, int NV>
constexpr bool kRawDot = kBf16Dot && std::is_same_v<T, c10::BFloat16> && NV % 2 == 0;

// The rows' products with kLanes keys starting at `key` (m of them real), per lane:
// s.parts[r * kLanes + j] sums to row r's score of key j.
template <typename T, int NV>
inline void block_scores(const Rows& rows, const PagedHead<T>& head, int64_t key, int64_t m,
                         BlockScratch& s) {
  constexpr int64_t dp = NV * kLanes;
#if defined(__AVX512BF16__)
  if constexpr (kRawDot<T, NV>) {
    // bf16 pairs multiplied and summed in float by the CPU itself: no conversion, and a
    // group of queries held in registers across the keys.
    constexpr int kPairs = NV / 2;
    constexpr int kRows = std::max(1, 16 / kPairs);
    for (int64_t r0 = 0; r0 < rows.count; r0 += kRows) {
      const int64_t rc = std::min<int64_t>(kRows, rows.count - r0);
      __m512i qv[kRows][kPairs];
      for (int g = 0; g < kRows && g < rc; ++g) {
        const T* q = static_cast<const T*>(rows.raw[r0 + g]);
        for (int i = 0; i < kPairs; ++i) qv[g][i] = _mm512_loadu_si512(q + 2 * i * kLanes);
      }
      for (int64_t j = 0; j < m; ++j) {
        const T* k = head.k + (key + j) * head.token_stride;
        __m512i kv[kPairs];
        for (int i = 0; i < kPairs; ++i) kv[i] = _mm512_loadu_si512(k + 2 * i * kLanes);
        for (int g = 0; g < kRows && g < rc; ++g) {
          __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)qv[g][0], (__m512bh)kv[0]);
          for (int i = 1; i < kPairs; ++i) {
            a = _mm512_dpbf16_ps(a, (__m512bh)qv[g][i], (__m512bh)kv[i]);
          }
          s.parts[(r0 + g) * kLanes + j] = a;
        }
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < m; ++j) {
    Vec kf[NV];
    load_floats<T, NV>(head.k + (key + j) * head.token_stride, kf);
    for (int64_t r = 0; r < rows.count; ++r) {
      const float* q = rows.q.data() + r * dp;
      Vec a = Vec::loadu(q) * kf[0];
      for (int i = 1; i < NV; ++i) a = at::vec::fmadd(Vec::loadu(q + i * kLanes), kf[i], a);
      s.parts[r * kLanes + j] = a;
    }
  }
}

// attend_block for a head of exactly NV vectors: keys and values go from the cache into
// registers, and groups of rows accumulate in registers.
template <typename T, int NV>
void attend_block_fast(Rows& rows, const PagedHead<T>& head, int64_t block, int64_t j0,
                       int64_t n, int64_t window, BlockScratch& s) {
  constexpr int64_t dp = NV * kLanes;
  constexpr int kGroup = std::max(1, kAccRegisters / NV);
  const int64_t np = round_up(n);
  const int64_t first = head.table[block] * head.block_size + (j0 - block * head.block_size);
  for (int64_t c = 0; c < np; c += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - c);
    block_scores<T, NV>(rows, head, first + c, m, s);
    const Vec scale(kRawDot<T, NV> ? rows.scale : 1.f);
    for (int64_t r = 0; r < rows.count; ++r) {
      for (int64_t j = m; j < kLanes; ++j) s.parts[r * kLanes + j] = Vec(0.f);
      (lane_sums(s.parts.data() + r * kLanes) * scale).store(s.scores.data() + r * np + c);
    }
  }
  float alpha[kMaxRows];
  for (int64_t r = 0; r < rows.count; ++r) {
    float* sc = s.scores.data() + r * np;
    if (!fold_scores(rows, r, sc, j0, n, window, alpha[r])) {
      std::fill(sc, sc + np, 0.f);  // the row's group still walks these keys: weight 0
      alpha[r] = 1.f;
    }
  }
  for (int64_t r0 = 0; r0 < rows.count; r0 += kGroup) {
    const int64_t rc = std::min<int64_t>(kGroup, rows.count - r0);
    Vec acc[kGroup][NV];
    for (int g = 0; g < kGroup; ++g) {
      if (g >= rc) break;
      const float* a = rows.acc.data() + (r0 + g) * dp;
      for (int i = 0; i < NV; ++i) acc[g][i] = Vec::loadu(a + i * kLanes) * Vec(alpha[r0 + g]);
    }
    for (int64_t j = 0; j < n; ++j) {
      Vec v[NV];
      load_floats<T, NV>(head.v + (first + j) * head.token_stride, v);
      for (int g = 0; g < kGroup; ++g) {
        if (g >= rc) break;
        const Vec w(s.scores[(r0 + g) * np + j]);
        for (int i = 0; i < NV; ++i) acc[g][i] = at::vec::fmadd(w, v[i], acc[g][i]);
      }
    }
    for (int g = 0; g < kGroup; ++g) {
      if (g >= rc) break;
      float* a = rows.acc.data() + (r0 + g) * dp;
      for (int i = 0; i < NV; ++i) acc[g][i].store(a + i * kLanes);
    }
  }
}

// Blocks asked for ahead, into L2 (into L1 they crowd out the block in use). Measured
// in a run of the tiny Llama: 0.80 ms a layer without, 0.63-0.72 ms with (noisy).
constexpr int64_t kPrefetchAhead = 2;

// Asks for a block's keys and values of this head ahead of use: at decode sizes the
// cache does not stay in the CPU's caches from one layer to the next, and blocks lie
// anywhere, so the hardware cannot guess the next one.
template <typename T>
inline void prefetch_block(const PagedHead<T>& head, int64_t block) {
  const int64_t bytes = head.dim * static_cast<int64_t>(sizeof(T));
  const int64_t first = head.table[block] * head.block_size;
  for (int64_t j = 0; j < head.block_size; ++j) {
    const char* k = reinterpret_cast<const char*>(head.k + (first + j) * head.token_stride);
    const char* v = reinterpret_cast<const char*>(head.v + (first + j) * head.token_stride);
    for (int64_t b = 0; b < bytes; b += 64) {
      _mm_prefetch(k + b, _MM_HINT_T1);
      _mm_prefetch(v + b, _MM_HINT_T1);
    }
  }
}

template <typename T, int NV>
void attend_blocks(Rows& rows, const PagedHead<T>& head, int64_t lo, int64_t hi, int nv,
                   int64_t window, BlockScratch& s) {
  const int64_t bs = head.block_size;
  const int64_t last = hi / bs;
  for (int64_t b = lo / bs; b < lo / bs + kPrefetchAhead && b <= last; ++b) {
    prefetch_block(head, b);
  }
  for (int64_t block = lo / bs; block <= last; ++block) {
    const int64_t j0 = std::max(lo, block * bs);
    const int64_t j1 = std::min(hi + 1, (block + 1) * bs);
    if (block + kPrefetchAhead <= last) prefetch_block(head, block + kPrefetchAhead);
    if constexpr (NV > 0) {
      attend_block_fast<T, NV>(rows, head, block, j0, j1 - j0, window, s);
    } else {
      attend_block<T>(rows, head, block, j0, j1 - j0, nv, window, s);
    }
  }
}

// Every row of `rows` over the keys some row sees, block by block.
template <typename T>
void attend(Rows& rows, const PagedHead<T>& head, int64_t dp, int64_t window, BlockScratch& s) {
  if (rows.count == 0) return;
  const auto [lo_it, hi_it] = std::minmax_element(rows.pos.begin(), rows.pos.end());
  const int64_t hi = *hi_it;
  const int64_t lo = window > 0 ? std::max<int64_t>(0, *lo_it - window + 1) : 0;
  const int64_t bs = head.block_size;
  s.v.resize(bs * dp);
  s.scores.resize(rows.count * round_up(bs));
  s.parts.resize(rows.count * kLanes);
  const int nv = static_cast<int>(dp / kLanes);
  // Heads of whole vectors in the usual sizes take the register path.
  switch (head.dim == dp && rows.count <= kMaxRows ? nv : 0) {
    case 4: return attend_blocks<T, 4>(rows, head, lo, hi, nv, window, s);
    case 5: return attend_blocks<T, 5>(rows, head, lo, hi, nv, window, s);
    case 8: return attend_blocks<T, 8>(rows, head, lo, hi, nv, window, s);
    case 10: return attend_blocks<T, 10>(rows, head, lo, hi, nv, window, s);
    case 16: return attend_blocks<T, 16>(rows, head, lo, hi, nv, window, s);
    default: return attend_blocks<T, 0>(rows, head, lo, hi, nv, window, s);
  }
}

// Row r's result, acc / sum, into out.
template <typename T>
void write_row(const Rows& rows, int64_t r, int64_t dp, int64_t dim, T* out) {
  float* acc = const_cast<float*>(rows.acc.data()) + r * dp;
  const Vec inv(rows.sum[r] > 0.f ? 1.f / rows.sum[r] : 0.f);
  for (int64_t i = 0; i < dp; i += kLanes) (Vec::loadu(acc + i) * inv).store(acc + i);
  from_float(acc, out, dim);
}

template <typename T>
void load_query(Rows& rows, int64_t r, const T* q, int64_t dim, int64_t dp, float scale) {
  float* dst = rows.q.data() + r * dp;
  rows.raw[r] = q;
  rows.scale = scale;
  to_float(q, dst, dim);
  for (int64_t i = 0; i < dp; i += kLanes) (Vec::loadu(dst + i) * Vec(scale)).store(dst + i);
}

struct Shape {
  int64_t heads, kv_heads, group, dim, dp, block_size, width, num_blocks;
};

inline Shape check_paged(const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& block_tables) {
  PAGODA_CHECK_CPU(query);
  PAGODA_CHECK_CPU(key_cache);
  TORCH_CHECK(query.dim() == 3, "query must be [tokens, heads, head_dim]");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "caches must be [blocks, block_size, kv_heads, head_dim], keys like values");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "the caches must be contiguous");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() &&
                  value_cache.scalar_type() == key_cache.scalar_type(),
              "query and caches must share a dtype");
  TORCH_CHECK(query.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2,
              "block_tables must be int64 [sequences, width]");
  Shape s;
  s.heads = query.size(1);
  s.kv_heads = key_cache.size(2);
  s.dim = query.size(2);
  TORCH_CHECK(key_cache.size(3) == s.dim, "query and cache head sizes differ");
  TORCH_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, s.heads,
              " query heads do not split over ", s.kv_heads, " KV heads");
  s.group = s.heads / s.kv_heads;
  s.dp = round_up(s.dim);
  s.block_size = key_cache.size(1);
  s.width = block_tables.size(1);
  s.num_blocks = key_cache.size(0);
  return s;
}

// Context lengths fit the tables, and every block a sequence uses is in the cache.
inline void check_contexts(const Shape& s, const int64_t* tables, const int64_t* ctx,
                           int64_t seqs) {
  for (int64_t i = 0; i < seqs; ++i) {
    TORCH_CHECK(ctx[i] >= 1 && ctx[i] <= s.width * s.block_size, "context length ", ctx[i],
                " of sequence ", i, " does not fit its block table");
    const int64_t used = (ctx[i] + s.block_size - 1) / s.block_size;
    for (int64_t b = 0; b < used; ++b) {
      const int64_t id = tables[i * s.width + b];
      TORCH_CHECK(id >= 0 && id < s.num_blocks, "block ", id, " is outside the cache");
    }
  }
}

template <typename T>
PagedHead<T> paged_head(const at::Tensor& key_cache, const at::Tensor& value_cache,
                        const Shape& s, const int64_t* table, int64_t kv_head) {
  const int64_t offset = kv_head * s.dim;
  return {static_cast<const T*>(key_cache.const_data_ptr()) + offset,
          static_cast<const T*>(value_cache.const_data_ptr()) + offset,
          table, s.block_size, s.kv_heads * s.dim, s.dim};
}

// query [S, heads, D]: one token per sequence, at position context_lens[s] - 1.
inline at::Tensor paged_attention_decode(const at::Tensor& query, const at::Tensor& key_cache,
                                         const at::Tensor& value_cache,
                                         const at::Tensor& block_tables,
                                         const at::Tensor& context_lens, double scale,
                                         std::optional<int64_t> sliding_window) {
  const Shape s = check_paged(query, key_cache, value_cache, block_tables);
  TORCH_CHECK(s.dp <= kMaxVectors * kLanes, "head sizes up to 256 are supported");
  const int64_t seqs = query.size(0);
  TORCH_CHECK(block_tables.size(0) == seqs && context_lens.numel() == seqs,
              "one block table and context length per sequence");
  auto out = at::empty({seqs, s.heads, s.dim}, query.options());
  auto tables_c = block_tables.contiguous();
  auto ctx_c = context_lens.to(at::kLong).contiguous();
  const int64_t* tables = static_cast<const int64_t*>(tables_c.const_data_ptr());
  const int64_t* ctx = static_cast<const int64_t*>(ctx_c.const_data_ptr());
  check_contexts(s, tables, ctx, seqs);
  const int64_t window = sliding_window.value_or(0);
  PAGODA_DISPATCH_FLOATS(query.scalar_type(), "paged_attention_decode", [&] {
    const scalar_t* q = static_cast<const scalar_t*>(query.const_data_ptr());
    scalar_t* o = static_cast<scalar_t*>(out.data_ptr());
    const int64_t qs = query.stride(0), qh = query.stride(1);
    at::parallel_for(0, seqs * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
      Rows rows;
      BlockScratch scratch;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t seq = task / s.kv_heads, kvh = task % s.kv_heads;
        rows.reset(s.group, s.dp);
        for (int64_t g = 0; g < s.group; ++g) {
          load_query(rows, g, q + seq * qs + (kvh * s.group + g) * qh, s.dim, s.dp, scale);
          rows.pos[g] = ctx[seq] - 1;
        }
        const auto head =
            paged_head<scalar_t>(key_cache, value_cache, s, tables + seq * s.width, kvh);
        attend(rows, head, s.dp, window, scratch);
        for (int64_t g = 0; g < s.group; ++g) {
          write_row(rows, g, s.dp, s.dim, o + (seq * s.heads + kvh * s.group + g) * s.dim);
        }
      }
    });
  });
  return out;
}

// Query tokens per prefill task: enough rows to share each block's conversion, few enough
// that a chunk's tasks spread over the threads.
constexpr int64_t kPrefillRows = 32;

// query [T, heads, D]: sequence s's chunk is rows query_start_loc[s] ..< [s + 1], the last
// tokens of its context_lens[s]; they see the cached prefix and, causally, each other.
inline at::Tensor paged_attention_prefill(const at::Tensor& query, const at::Tensor& key_cache,
                                          const at::Tensor& value_cache,
                                          const at::Tensor& block_tables,
                                          const at::Tensor& query_start_loc,
                                          const at::Tensor& context_lens, double scale,
                                          std::optional<int64_t> sliding_window) {
  const Shape s = check_paged(query, key_cache, value_cache, block_tables);
  TORCH_CHECK(s.dp <= kMaxVectors * kLanes, "head sizes up to 256 are supported");
  const int64_t seqs = block_tables.size(0);
  TORCH_CHECK(query_start_loc.numel() == seqs + 1 && context_lens.numel() == seqs,
              "query_start_loc has one more entry than there are sequences");
  auto out = at::empty({query.size(0), s.heads, s.dim}, query.options());
  auto tables_c = block_tables.contiguous();
  auto ctx_c = context_lens.to(at::kLong).contiguous();
  auto starts_c = query_start_loc.to(at::kLong).contiguous();
  const int64_t* tables = static_cast<const int64_t*>(tables_c.const_data_ptr());
  const int64_t* ctx = static_cast<const int64_t*>(ctx_c.const_data_ptr());
  const int64_t* starts = static_cast<const int64_t*>(starts_c.const_data_ptr());
  check_contexts(s, tables, ctx, seqs);
  TORCH_CHECK(starts[0] == 0 && starts[seqs] == query.size(0), "query_start_loc must span query");
  const int64_t tile = std::max<int64_t>(1, kPrefillRows / s.group);
  struct Task {
    int64_t seq, kvh, first, count;
  };
  std::vector<Task> tasks;
  for (int64_t i = 0; i < seqs; ++i) {
    const int64_t q_len = starts[i + 1] - starts[i];
    TORCH_CHECK(q_len >= 0 && q_len <= ctx[i], "sequence ", i, " has more queries than context");
    for (int64_t t = 0; t < q_len; t += tile) {
      for (int64_t h = 0; h < s.kv_heads; ++h) tasks.push_back({i, h, t, std::min(tile, q_len - t)});
    }
  }
  const int64_t window = sliding_window.value_or(0);
  PAGODA_DISPATCH_FLOATS(query.scalar_type(), "paged_attention_prefill", [&] {
    const scalar_t* q = static_cast<const scalar_t*>(query.const_data_ptr());
    scalar_t* o = static_cast<scalar_t*>(out.data_ptr());
    const int64_t qs = query.stride(0), qh = query.stride(1);
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      Rows rows;
      BlockScratch scratch;
      for (int64_t i = begin; i < end; ++i) {
        const Task& task = tasks[i];
        const int64_t q_len = starts[task.seq + 1] - starts[task.seq];
        const int64_t first_pos = ctx[task.seq] - q_len;
        rows.reset(task.count * s.group, s.dp);
        for (int64_t t = 0; t < task.count; ++t) {
          const int64_t token = starts[task.seq] + task.first + t;
          for (int64_t g = 0; g < s.group; ++g) {
            const int64_t r = t * s.group + g;
            load_query(rows, r, q + token * qs + (task.kvh * s.group + g) * qh, s.dim, s.dp,
                       scale);
            rows.pos[r] = first_pos + task.first + t;
          }
        }
        const auto head = paged_head<scalar_t>(key_cache, value_cache, s,
                                               tables + task.seq * s.width, task.kvh);
        attend(rows, head, s.dp, window, scratch);
        for (int64_t t = 0; t < task.count; ++t) {
          const int64_t token = starts[task.seq] + task.first + t;
          for (int64_t g = 0; g < s.group; ++g) {
            const int64_t h = task.kvh * s.group + g;
            write_row(rows, t * s.group + g, s.dp, s.dim, o + (token * s.heads + h) * s.dim);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace pagoda
