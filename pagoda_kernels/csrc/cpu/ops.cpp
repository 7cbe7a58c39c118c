// The one translation unit of the CPU extension: it registers every kernel as a torch
// operator in the namespace PAGODA_OPS_NS (one per instruction set). One unit, so that
// each variant compiles ATen's headers once.
#include "attention.h"
#include "cache.h"
#include "common.h"
#include "pointwise.h"
#include "threads.h"

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
  m.def(
      "paged_attention_decode(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor context_lens, float scale, int? sliding_window) -> Tensor");
  m.def(
      "paged_attention_prefill(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor query_start_loc, Tensor context_lens, float scale, "
      "int? sliding_window) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) "
      "-> (Tensor, Tensor)");
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, "
      "Tensor cos_sin_cache, bool is_neox) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("bind_threads(int[] cpus) -> int[]", &pagoda::bind_threads);
}

PAGODA_LIBRARY_IMPL(PAGODA_OPS_NS, CPU, m) {
  m.impl("reshape_and_cache", &pagoda::reshape_and_cache);
  m.impl("paged_attention_decode", &pagoda::paged_attention_decode);
  m.impl("paged_attention_prefill", &pagoda::paged_attention_prefill);
  m.impl("rms_norm", &pagoda::rms_norm);
  m.impl("fused_add_rms_norm", &pagoda::fused_add_rms_norm);
  m.impl("rotary_embedding", &pagoda::rotary_embedding);
  m.impl("silu_and_mul", &pagoda::silu_and_mul);
  m.impl("argmax_rows", &pagoda::argmax_rows);
}
