// The small per-token ops around attention and the MLP: RMSNorm (with the residual add
// before it), rotary embeddings in place, SiLU-and-mul, and the greedy argmax of a step's
// logits. Each computes in float and rounds to the activations' dtype wherever the torch
// reference's separate ops round, so that both give the same bits or nearly so.
#pragma once

#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace pagoda {

inline int64_t rows_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

inline void check_rows(const at::Tensor& x, const char* name) {
  PAGODA_CHECK_CPU(x);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be [rows, width], rows contiguous");
}

// out = weight * round(x / rms(x)); with residual, x = round(x + residual) first and is
// returned as the next residual.
template <typename T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                   double eps, at::Tensor& out, at::Tensor* sum_out) {
  const int64_t rows = x.size(0), width = x.size(1);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const T* rp = residual ? static_cast<const T*>(residual->const_data_ptr()) : nullptr;
  const T* wp = static_cast<const T*>(weight.const_data_ptr());
  T* op = static_cast<T*>(out.data_ptr());
  T* sp = sum_out ? static_cast<T*>(sum_out->data_ptr()) : nullptr;
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0;
  const int64_t wp_len = round_up(width);
  std::vector<float> weight_f(wp_len);
  to_float(wp, weight_f.data(), width);
  at::parallel_for(0, rows, rows_grain(width), [&](int64_t begin, int64_t end) {
    std::vector<float> h(wp_len), other(wp_len);
    for (int64_t row = begin; row < end; ++row) {
      to_float(xp + row * xs, h.data(), width);
      if (rp) {
        to_float(rp + row * rs, other.data(), width);
        for (int64_t i = 0; i < wp_len; i += kLanes) {
          round_to<T>(Vec::loadu(h.data() + i) + Vec::loadu(other.data() + i)).store(h.data() + i);
        }
        from_float(h.data(), sp + row * width, width);
      }
      Vec squares(0.f);
      for (int64_t i = 0; i < wp_len; i += kLanes) {
        const Vec v = Vec::loadu(h.data() + i);
        squares = at::vec::fmadd(v, v, squares);
      }
      const float inv = 1.f / std::sqrt(hsum(squares) / static_cast<float>(width) +
                                        static_cast<float>(eps));
      for (int64_t i = 0; i < wp_len; i += kLanes) {
        const Vec normed = round_to<T>(Vec::loadu(h.data() + i) * Vec(inv));
        round_to<T>(normed * Vec::loadu(weight_f.data() + i)).store(h.data() + i);
      }
      from_float(h.data(), op + row * width, width);
    }
  });
}

inline void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "weight must be [width], contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x must share a dtype");
}

inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, weight);
  auto out = at::empty(x.sizes(), x.options());
  PAGODA_DISPATCH_FLOATS(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x, nullptr, weight, eps, out, nullptr);
  });
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x,
                                                             const at::Tensor& residual,
                                                             const at::Tensor& weight,
                                                             double eps) {
  check_norm(x, weight);
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual must be like x");
  auto out = at::empty(x.sizes(), x.options());
  auto sum = at::empty(x.sizes(), x.options());
  PAGODA_DISPATCH_FLOATS(x.scalar_type(), "fused_add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(x, &residual, weight, eps, out, &sum);
  });
  return std::make_tuple(out, sum);
}

// Rotates rows [tokens, heads, dim] of x in place by their token's cos and sin (row t of
// each table, already rounded to T as the reference casts them), neox style: the two
// halves of each head.
template <typename T>
void rotate_neox(const at::Tensor& x, const float* cos, const float* sin, int64_t table_width) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  const int64_t hp = round_up(half);
  T* xp = static_cast<T*>(x.data_ptr());
  const int64_t ts = x.stride(0), hs = x.stride(1);
  at::parallel_for(0, tokens, std::max<int64_t>(1, 64 / std::max<int64_t>(heads, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> buf(half + hp + kLanes), o1(hp), o2(hp);
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * table_width;
      const float* s = sin + t * table_width;
      for (int64_t h = 0; h < heads; ++h) {
        T* row = xp + t * ts + h * hs;
        to_float(row, buf.data(), dim);
        for (int64_t i = 0; i < hp; i += kLanes) {
          const Vec x1 = Vec::loadu(buf.data() + i), x2 = Vec::loadu(buf.data() + half + i);
          const Vec cv = Vec::loadu(c + i), sv = Vec::loadu(s + i);
          round_to<T>(round_to<T>(x1 * cv) - round_to<T>(x2 * sv)).store(o1.data() + i);
          round_to<T>(round_to<T>(x2 * cv) + round_to<T>(x1 * sv)).store(o2.data() + i);
        }
        from_float(o1.data(), row, half);
        from_float(o2.data(), row + half, half);
      }
    }
  });
}

// The same for GPT-J style: interleaved pairs (x[2i], x[2i + 1]).
template <typename T>
void rotate_gptj(const at::Tensor& x, const float* cos, const float* sin, int64_t table_width) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  T* xp = static_cast<T*>(x.data_ptr());
  const int64_t ts = x.stride(0), hs = x.stride(1);
  auto r = [](float v) { return static_cast<float>(static_cast<T>(v)); };
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * table_width;
      const float* s = sin + t * table_width;
      for (int64_t h = 0; h < heads; ++h) {
        T* row = xp + t * ts + h * hs;
        for (int64_t i = 0; i < dim / 2; ++i) {
          const float x0 = row[2 * i], x1 = row[2 * i + 1];
          row[2 * i] = static_cast<T>(r(r(x0 * c[i]) - r(x1 * s[i])));
          row[2 * i + 1] = static_cast<T>(r(r(x1 * c[i]) + r(x0 * s[i])));
        }
      }
    }
  });
}

// query [T, heads, D] and key [T, kv_heads, D] rotated in place; cos_sin_cache
// [max_position, D] (float32) holds cos in its first half and sin in its second.
inline void rotary_embedding(const at::Tensor& positions, const at::Tensor& query,
                             const at::Tensor& key, const at::Tensor& cos_sin_cache,
                             bool is_neox) {
  PAGODA_CHECK_CPU(query);
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && query.stride(2) == 1 && key.stride(2) == 1,
              "query and key must be [tokens, heads, head_dim], head_dim contiguous");
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), "query and key must share a dtype");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2,
              "cos_sin_cache must be float32 [positions, rotary_dim]");
  const int64_t dim = query.size(2), width = cos_sin_cache.size(1), half = width / 2;
  TORCH_CHECK(width == dim && key.size(2) == dim && dim % 2 == 0,
              "the rotary width must be the (even) head size");
  TORCH_CHECK(positions.numel() == query.size(0) && key.size(0) == query.size(0),
              "one position per token");
  auto pos_c = positions.to(at::kLong).contiguous();
  const int64_t* pos = static_cast<const int64_t*>(pos_c.const_data_ptr());
  const int64_t max_pos = cos_sin_cache.size(0);
  for (int64_t t = 0; t < positions.numel(); ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " is outside the table");
  }
  PAGODA_DISPATCH_FLOATS(query.scalar_type(), "rotary_embedding", [&] {
    // cos and sin of the step's positions, rounded to the activations' dtype once.
    const int64_t tokens = positions.numel(), hp = round_up(half);
    std::vector<float> cos(tokens * hp + kLanes), sin(tokens * hp + kLanes);
    auto table = cos_sin_cache.contiguous();
    const float* tp = static_cast<const float*>(table.const_data_ptr());
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t i = 0; i < half; ++i) {
        cos[t * hp + i] = static_cast<float>(static_cast<scalar_t>(tp[pos[t] * width + i]));
        sin[t * hp + i] = static_cast<float>(static_cast<scalar_t>(tp[pos[t] * width + half + i]));
      }
    }
    for (const at::Tensor* x : {&query, &key}) {
      if (is_neox) {
        rotate_neox<scalar_t>(*x, cos.data(), sin.data(), hp);
      } else {
        rotate_gptj<scalar_t>(*x, cos.data(), sin.data(), hp);
      }
    }
  });
}

// x = [gate | up] along the last dimension: round(round(silu(gate)) * up).
inline at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), width = x.size(1) / 2;
  TORCH_CHECK(x.size(1) % 2 == 0, "x must hold gate and up halves");
  auto out = at::empty({rows, width}, x.options());
  PAGODA_DISPATCH_FLOATS(x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = static_cast<const scalar_t*>(x.const_data_ptr());
    scalar_t* op = static_cast<scalar_t*>(out.data_ptr());
    const int64_t xs = x.stride(0), wp = round_up(width);
    at::parallel_for(0, rows, rows_grain(width), [&](int64_t begin, int64_t end) {
      std::vector<float> gate(wp), up(wp);
      for (int64_t row = begin; row < end; ++row) {
        to_float(xp + row * xs, gate.data(), width);
        to_float(xp + row * xs + width, up.data(), width);
        for (int64_t i = 0; i < wp; i += kLanes) {
          const Vec g = Vec::loadu(gate.data() + i);
          const Vec silu = round_to<scalar_t>(g / (Vec(1.f) + g.neg().exp()));
          round_to<scalar_t>(silu * Vec::loadu(up.data() + i)).store(gate.data() + i);
        }
        from_float(gate.data(), op + row * width, width);
      }
    });
  });
  return out;
}

// The first lane of v equal to m, or -1.
inline int first_equal(const Vec& v, float m) {
#if defined(CPU_CAPABILITY_AVX512)
  const unsigned mask = _mm512_cmp_ps_mask(v, _mm512_set1_ps(m), _CMP_EQ_OQ);
#else
  const unsigned mask = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(m), _CMP_EQ_OQ));
#endif
  return mask ? __builtin_ctz(mask) : -1;
}

inline bool any_nan(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
#else
  return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0;
#endif
}

// Each row's index of its first maximum, as torch.argmax (a NaN counts as the maximum),
// read in the logits' own dtype: one vectorized pass for the maximum, one to find it.
template <typename T>
int64_t argmax_row(const T* x, int64_t width, float* buf) {
  constexpr int64_t kChunk = 1024;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  Vec top(neg_inf);
  bool nan = false;
  for (int64_t c = 0; c < width; c += kChunk) {
    const int64_t n = std::min(kChunk, width - c);
    to_float(x + c, buf, n);
    for (int64_t i = n; i < round_up(n); ++i) buf[i] = neg_inf;
    for (int64_t i = 0; i < n; i += kLanes) {
      const Vec v = Vec::loadu(buf + i);
      nan |= any_nan(v);
      top = at::vec::maximum(top, v);
    }
  }
  if (nan) {
    for (int64_t i = 0; i < width; ++i) {
      if (std::isnan(static_cast<float>(x[i]))) return i;
    }
  }
  const float m = hmax(top);
  for (int64_t c = 0; c < width; c += kChunk) {
    const int64_t n = std::min(kChunk, width - c);
    to_float(x + c, buf, n);
    for (int64_t i = n; i < round_up(n); ++i) buf[i] = neg_inf;
    for (int64_t i = 0; i < n; i += kLanes) {
      const int lane = first_equal(Vec::loadu(buf + i), m);
      if (lane >= 0) return c + i + lane;
    }
  }
  return 0;  // every value is -inf: the first
}

inline at::Tensor argmax_rows(const at::Tensor& x) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), width = x.size(1);
  TORCH_CHECK(width > 0, "argmax of empty rows");
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* op = static_cast<int64_t*>(out.data_ptr());
  PAGODA_DISPATCH_FLOATS(x.scalar_type(), "argmax_rows", [&] {
    const scalar_t* xp = static_cast<const scalar_t*>(x.const_data_ptr());
    const int64_t xs = x.stride(0);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(1024 + kLanes);
      for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * xs, width, buf.data());
    });
  });
  return out;
}

}  // namespace pagoda
