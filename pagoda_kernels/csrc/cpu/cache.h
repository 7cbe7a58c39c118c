// The KV-cache write: each new token's key and value rows go to their slot.
#pragma once

#include "common.h"

namespace pagoda {

// key, value [T, kv_heads, head_dim]; caches [num_blocks, block_size, kv_heads, head_dim];
// slot_mapping [T] (int64): slot s is row s % block_size of block s / block_size, and -1
// marks a padding token that is not stored.
inline void reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                              const at::Tensor& key_cache, const at::Tensor& value_cache,
                              const at::Tensor& slot_mapping) {
  PAGODA_CHECK_CPU(key);
  PAGODA_CHECK_CPU(key_cache);
  TORCH_CHECK(key.dim() == 3 && key_cache.dim() == 4, "key [T, H, D], cache [N, B, H, D]");
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() &&
                  value.scalar_type() == value_cache.scalar_type(),
              "keys and values must have the cache's dtype");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "the caches must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64");
  const int64_t tokens = key.size(0);
  const int64_t heads = key.size(1), dim = key.size(2);
  TORCH_CHECK(key_cache.size(2) == heads && key_cache.size(3) == dim, "cache shape mismatch");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "head_dim must be contiguous");
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t row = heads * dim;
  auto slots = slot_mapping.contiguous();
  const int64_t* slot = static_cast<const int64_t*>(slots.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "reshape_and_cache", [&] {
    const scalar_t* k = static_cast<const scalar_t*>(key.const_data_ptr());
    const scalar_t* v = static_cast<const scalar_t*>(value.const_data_ptr());
    scalar_t* kc = static_cast<scalar_t*>(key_cache.data_ptr());
    scalar_t* vc = static_cast<scalar_t*>(value_cache.data_ptr());
    const int64_t kt = key.stride(0), kh = key.stride(1);
    const int64_t vt = value.stride(0), vh = value.stride(1);
    at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t s = slot[t];
        if (s < 0) continue;
        TORCH_CHECK(s < num_slots, "slot ", s, " is outside the cache");
        for (int64_t h = 0; h < heads; ++h) {
          std::copy_n(k + t * kt + h * kh, dim, kc + s * row + h * dim);
          std::copy_n(v + t * vt + h * vh, dim, vc + s * row + h * dim);
        }
      }
    });
  });
}

}  // namespace pagoda
