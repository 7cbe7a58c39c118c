// What every CPU kernel shares: the ATen headers, float conversion, and scratch memory.
//
// The same sources are compiled once per instruction set (see pagoda_kernels/cpu_build.py).
// CPU_CAPABILITY_AVX512 or CPU_CAPABILITY_AVX2 picks ATen's Vectorized implementation;
// PAGODA_OPS_NS names the operator namespace, so that every variant can be loaded in one
// process and tested against the others.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace pagoda {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = fVec::size();

// Rounds a float to T and back: the rounding a torch op in T makes after each step.
template <typename T>
inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

template <>
inline float round_to<float>(float x) {
  return x;
}

// n values of T, as floats.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

// n floats stored as T.
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

// A per-thread buffer of at least n floats, kept between calls.
inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[4];
  auto& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

#define PAGODA_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor")

}  // namespace pagoda
