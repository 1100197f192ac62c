#include "model/kernels/cuda/moe_router.cuh"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"

namespace retort::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float SoftplusF(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// (value, index) "better than": larger value, ties to the lower index.
__device__ __forceinline__ bool Better(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

// Dynamic shared memory: sc [E], key [E].
__global__ void __launch_bounds__(kThreads) MoeRouteKernel(const float* __restrict__ logits, int E, int k,
                                                           const float* __restrict__ bias,
                                                           const int64_t* __restrict__ tid2eid,
                                                           const int64_t* __restrict__ tokens, float scaling,
                                                           int32_t* __restrict__ idx, float* __restrict__ weights) {
  extern __shared__ float smem[];
  float* sc = smem;
  float* key = smem + E;
  __shared__ float wv[kThreads / 32];
  __shared__ int wi[kThreads / 32];
  __shared__ int chosen[16];
  const int64_t r = blockIdx.x;
  for (int e = threadIdx.x; e < E; e += kThreads) {
    sc[e] = sqrtf(SoftplusF(logits[r * E + e]));
    key[e] = sc[e] + (bias ? bias[e] : 0.0f);
  }
  __syncthreads();
  if (tid2eid) {
    if (threadIdx.x < k) chosen[threadIdx.x] = static_cast<int>(tid2eid[tokens[r] * k + threadIdx.x]);
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int s = 0; s < k; ++s) {
      float bv = -INFINITY;
      int bi = 0x7fffffff;
      for (int e = threadIdx.x; e < E; e += kThreads) {
        bool taken = false;
        for (int q = 0; q < s; ++q) taken |= chosen[q] == e;
        if (!taken && Better(key[e], e, bv, bi)) bv = key[e], bi = e;
      }
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (Better(ov, oi, bv, bi)) bv = ov, bi = oi;
      }
      if (lane == 0) wv[warp] = bv, wi[warp] = bi;
      __syncthreads();
      if (threadIdx.x == 0) {
        float v = wv[0];
        int i = wi[0];
        for (int w = 1; w < kThreads / 32; ++w)
          if (Better(wv[w], wi[w], v, i)) v = wv[w], i = wi[w];
        chosen[s] = i;
      }
      __syncthreads();
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int s = 0; s < k; ++s) sum += sc[chosen[s]];
    for (int s = 0; s < k; ++s) {
      idx[r * k + s] = chosen[s];
      weights[r * k + s] = sc[chosen[s]] / (sum + 1e-20f) * scaling;
    }
  }
}

}  // namespace

absl::Status MoeRoute(const float* logits, int64_t rows, int E, int k, const float* bias, const int64_t* tid2eid,
                      const int64_t* tokens, float scaling, int32_t* idx, float* weights, cudaStream_t stream) {
  if (E < 1 || E > 4096 || k < 1 || k > 16 || k > E)
    return absl::InvalidArgumentError(absl::StrCat("MoeRoute: need 1 <= k <= 16, k <= E <= 4096; got E=", E, " k=", k));
  if (tid2eid && !tokens) return absl::InvalidArgumentError("MoeRoute: hash routing needs tokens");
  if (rows == 0) return absl::OkStatus();
  MoeRouteKernel<<<static_cast<unsigned>(rows), kThreads, 2 * E * sizeof(float), stream>>>(
      logits, E, k, bias, tid2eid, tokens, scaling, idx, weights);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
