// What every CPU kernel shares: the ATen headers and the checks.
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

#include <algorithm>
#include <cstdint>

namespace pagoda {

#define PAGODA_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor")

}  // namespace pagoda
