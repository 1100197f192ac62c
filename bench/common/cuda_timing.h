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

// HBM bandwidth in GB/s from a 2 GiB device-to-device copy on `stream` (read +
// write counted; the best of 5), or 0 when the buffers cannot be allocated.
inline double MeasureCopyBandwidthGBs(cudaStream_t stream) {
  const size_t bytes = size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) {
    cudaFree(a);
    return 0.0;
  }
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream);
  float best = 1e30f;
  for (int i = 0; i < 5; ++i) {
    cudaEventRecord(e0, stream);
    cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream);
    cudaEventRecord(e1, stream);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    best = std::min(best, ms);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (best * 1e-3) / 1e9;
}

}  // namespace retort::bench

#endif  // RETORT_BENCH_COMMON_CUDA_TIMING_H_
