// What every CPU kernel shares: the ATen headers, the checks and a few vector helpers.
//
// The same sources are compiled once per instruction set (see pagoda_kernels/cpu_build.py).
// CPU_CAPABILITY_AVX512 or CPU_CAPABILITY_AVX2 picks ATen's Vectorized implementation;
// PAGODA_OPS_NS names the operator namespace, so that every variant can be loaded in one
// process and tested against the others.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace pagoda {

#define PAGODA_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor")

// float, bfloat16 and half: the dtypes a model runs in (no double path to compile).
#define PAGODA_DISPATCH_FLOATS(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                    \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__))

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

inline float hsum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  __m256 x = v;
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
#endif
}

inline float hmax(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(v);
#else
  __m256 x = v;
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtss_f32(m);
#endif
}

// sums[j] = the sum of parts[j]'s lanes, for kLanes vectors at once: a transpose
// and add tree, about three instructions per vector instead of a full reduction each.
inline Vec lane_sums(const Vec* parts) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 pairs[8], quads[4], octs[2];
  for (int k = 0; k < 8; ++k) {
    const __m512 a = parts[2 * k], b = parts[2 * k + 1];
    pairs[k] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(pairs[2 * k]), b = _mm512_castps_pd(pairs[2 * k + 1]);
    quads[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Each 128-bit lane of quads[k] now holds parts 4k..4k+3, each summed over that lane.
  for (int k = 0; k < 2; ++k) {
    const __m512 a = quads[2 * k], b = quads[2 * k + 1];
    octs[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(octs[0], octs[1], 0x88),
                       _mm512_shuffle_f32x4(octs[0], octs[1], 0xDD));
#else
  const __m256 h01 = _mm256_hadd_ps(parts[0], parts[1]), h23 = _mm256_hadd_ps(parts[2], parts[3]);
  const __m256 h45 = _mm256_hadd_ps(parts[4], parts[5]), h67 = _mm256_hadd_ps(parts[6], parts[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
#endif
}

// n elements of src as float in dst; dst is zero up to round_up(n), so that padded dot
// products over it are exact.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    std::copy_n(src, n, dst);
    i = n;
  } else {
    using TVec = at::vec::Vectorized<T>;
    for (; i + TVec::size() <= n; i += TVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(TVec::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + kLanes);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
  for (; i < round_up(n); ++i) dst[i] = 0.f;
}

// n floats of src rounded to T in dst (round to nearest even, as torch's casts do).
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy_n(src, n, dst);
  } else {
    using TVec = at::vec::Vectorized<T>;
    int64_t i = 0;
    for (; i + TVec::size() <= n; i += TVec::size()) {
      at::vec::convert_from_float<T>(Vec::loadu(src + i), Vec::loadu(src + i + kLanes))
          .store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// v as T would hold it, back in float: how the torch reference rounds between its ops.
template <typename T>
inline Vec round_to(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v));
    return lo;
  }
}

}  // namespace pagoda
