// Kernel timing for the GPU benchmark programs (include only where CUDA is on).
#ifndef RETORT_BENCH_COMMON_CUDA_TIMING_H_
#define RETORT_BENCH_COMMON_CUDA_TIMING_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <vector>

namespace retort::bench {

// Time in ms of one launch of `fn` on `stream`: the median over 5 rounds of
// `reps` back-to-back launches between two events, divided by `reps` (so the
// host's launch latency is hidden behind the queue, as in a decode loop).
template <typename Fn>
double TimeMs(cudaStream_t stream, int reps, Fn fn) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) fn();
  std::vector<float> ms;
  for (int round = 0; round < 5; ++round) {
    cudaEventRecord(a, stream);
    for (int i = 0; i < reps; ++i) fn();
    cudaEventRecord(b, stream);
    cudaEventSynchronize(b);
    float t = 0;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t / reps);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace retort::bench

#endif  // RETORT_BENCH_COMMON_CUDA_TIMING_H_
