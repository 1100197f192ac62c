#include "model/kernels/cuda/random_fill.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "model/kernels/cuda/cuda_runtime.cuh"

namespace retort::cuda {
namespace {

// splitmix64 of seed ^ index: a good 64-bit mix, one multiply chain per value.
__device__ __forceinline__ uint64_t Mix(uint64_t seed, uint64_t i) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (i + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ float Unit(uint64_t seed, uint64_t i) {
  return static_cast<float>(Mix(seed, i) >> 40) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
}

__global__ void FillUniformKernel(float* p, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = lo + (hi - lo) * Unit(seed, i);
}
__global__ void FillUniformBf16Kernel(uint16_t* p, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const __nv_bfloat16 b = __float2bfloat16_rn(lo + (hi - lo) * Unit(seed, i));
    p[i] = *reinterpret_cast<const uint16_t*>(&b);
  }
}
__global__ void FillBytesKernel(uint8_t* p, int64_t n, uint64_t seed, uint32_t lo, uint32_t span) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = static_cast<uint8_t>(lo + Mix(seed, i) % span);
}

unsigned Blocks(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4 * 132 * 8)); }

}  // namespace

absl::Status FillUniform(float* p, int64_t n, uint64_t seed, float lo, float hi, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  FillUniformKernel<<<Blocks(n), 256, 0, stream>>>(p, n, seed, lo, hi);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}
absl::Status FillUniformBf16(uint16_t* p, int64_t n, uint64_t seed, float lo, float hi, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  FillUniformBf16Kernel<<<Blocks(n), 256, 0, stream>>>(p, n, seed, lo, hi);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}
absl::Status FillBytes(uint8_t* p, int64_t n, uint64_t seed, uint8_t lo, uint8_t hi, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  if (hi < lo) return absl::InvalidArgumentError("FillBytes: hi < lo");
  FillBytesKernel<<<Blocks(n), 256, 0, stream>>>(p, n, seed, lo, static_cast<uint32_t>(hi) - lo + 1);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
