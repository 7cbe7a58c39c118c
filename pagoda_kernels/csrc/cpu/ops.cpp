// The one translation unit of the CPU extension: it registers every kernel as a torch
// operator in the namespace PAGODA_OPS_NS (one per instruction set). One unit, so that
// each variant compiles ATen's headers once.
#include "cache.h"
#include "common.h"

#ifndef PAGODA_OPS_NS
#error "PAGODA_OPS_NS names the operator namespace (pagoda_kernels/cpu_build.py sets it)"
#endif

// One more macro level, so that PAGODA_OPS_NS is expanded before TORCH_LIBRARY pastes it.
#define PAGODA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define PAGODA_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

PAGODA_LIBRARY(PAGODA_OPS_NS, m) {
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
}

PAGODA_LIBRARY_IMPL(PAGODA_OPS_NS, CPU, m) {
  m.impl("reshape_and_cache", &pagoda::reshape_and_cache);
}
