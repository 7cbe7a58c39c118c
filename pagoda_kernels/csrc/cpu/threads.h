// Binding the OpenMP threads that run torch's CPU ops, one to each core.
//
// The threads torch computes on are an OpenMP team that the kernel may move between cores
// at any time; a thread moved away from its core leaves its L1/L2 contents behind. Binding
// thread i of the team to cpus[i] is what vLLM's CPU worker does at start. It has to run
// inside a parallel region, because a thread can only be named to the kernel by itself.
#pragma once

#include <omp.h>
#include <sched.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace pagoda {

// Binds thread i of an OpenMP team of cpus.size() threads to cpus[i] and returns the CPU
// each thread then runs on (so the caller can check it took). The team size becomes the
// process's OpenMP thread count, as torch.set_num_threads would make it.
inline std::vector<int64_t> bind_threads(std::vector<int64_t> cpus) {
  const int n = static_cast<int>(cpus.size());
  TORCH_CHECK(n > 0, "bind_threads needs at least one CPU");
  omp_set_num_threads(n);
  std::vector<int64_t> got(n, -1);
  std::vector<int> errors(n, 0);
#pragma omp parallel num_threads(n)
  {
    const int i = omp_get_thread_num();
    cpu_set_t mask;
    CPU_ZERO(&mask);
    CPU_SET(static_cast<int>(cpus[i]), &mask);
    errors[i] = sched_setaffinity(0, sizeof(mask), &mask);
    got[i] = sched_getcpu();
  }
  for (int i = 0; i < n; ++i) {
    TORCH_CHECK(errors[i] == 0, "could not bind OpenMP thread ", i, " to CPU ", cpus[i]);
  }
  return got;
}

}  // namespace pagoda
