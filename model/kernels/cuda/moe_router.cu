#include "model/kernels/cuda/moe_router.cuh"

#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <cstdint>

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

// grid (E): block e counts the pairs routed to expert e (pass 0) or writes
// their permuted positions in (row, slot) order (pass 1, after the scan).
template <int kPass>
__global__ void __launch_bounds__(kThreads) MoeBucketKernel(const int32_t* __restrict__ idx, int64_t n, int E,
                                                            int32_t* __restrict__ counts,
                                                            const int32_t* __restrict__ offsets,
                                                            int32_t* __restrict__ row_index,
                                                            int32_t* __restrict__ slot_pos, int k) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int base_s;
  const int e = blockIdx.x;
  if (threadIdx.x == 0) base_s = kPass == 1 ? offsets[e] : 0;
  __syncthreads();
  for (int64_t c0 = 0; c0 < n; c0 += kThreads) {
    const int64_t i = c0 + threadIdx.x;
    const int hit = (i < n && idx[i] == e) ? 1 : 0;
    int rank, total;
    Scan(tmp).ExclusiveSum(hit, rank, total);
    if (kPass == 1 && hit) {
      const int pos = base_s + rank;
      row_index[pos] = static_cast<int32_t>(i / k);
      slot_pos[i] = pos;
    }
    __syncthreads();
    if (threadIdx.x == 0) base_s += total;
    __syncthreads();
  }
  if (kPass == 0 && threadIdx.x == 0) counts[e] = base_s;
}

// One block: exclusive scan of counts into offsets; active experts become
// groups 0..n_active-1, the rest empty.
__global__ void __launch_bounds__(kThreads) MoeGroupsKernel(const int32_t* __restrict__ counts, int E, int groups,
                                                            int total, int32_t* __restrict__ offsets,
                                                            int32_t* __restrict__ group_offsets,
                                                            int32_t* __restrict__ group_expert) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int off_s, grp_s;
  if (threadIdx.x == 0) off_s = 0, grp_s = 0;
  __syncthreads();
  for (int e0 = 0; e0 < E; e0 += kThreads) {
    const int e = e0 + threadIdx.x;
    const int c = e < E ? counts[e] : 0;
    const int active = c > 0 ? 1 : 0;
    int off, off_total, g, g_total;
    Scan(tmp).ExclusiveSum(c, off, off_total);
    __syncthreads();
    Scan(tmp).ExclusiveSum(active, g, g_total);
    if (e < E) offsets[e] = off_s + off;
    if (active) {
      group_offsets[grp_s + g] = off_s + off;
      group_expert[grp_s + g] = e;
    }
    __syncthreads();
    if (threadIdx.x == 0) off_s += off_total, grp_s += g_total;
    __syncthreads();
  }
  for (int g = grp_s + threadIdx.x; g < groups; g += kThreads) group_offsets[g] = total, group_expert[g] = 0;
  if (threadIdx.x == 0) group_offsets[groups] = total;
}

// grid (rows, ceil(d / 256)): one output value a thread, so a decode row
// spreads over d / 256 blocks instead of looping in one.
__global__ void MoeCombineKernel(const float* __restrict__ y, const int32_t* __restrict__ slot_pos,
                                 const float* __restrict__ weights, int k, int64_t d,
                                 const float* __restrict__ shared, float* __restrict__ out) {
  __shared__ int32_t pos[16];
  __shared__ float wt[16];
  const int64_t r = blockIdx.x, i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (threadIdx.x < k) {
    pos[threadIdx.x] = slot_pos[r * k + threadIdx.x];
    wt[threadIdx.x] = weights[r * k + threadIdx.x];
  }
  __syncthreads();
  if (i >= d) return;
  float acc = 0.0f;
  for (int j = 0; j < k; ++j) acc += y[static_cast<int64_t>(pos[j]) * d + i] * wt[j];
  if (shared) acc += shared[r * d + i];
  out[r * d + i] = acc;
}

__global__ void GatherRowsKernel(const float* __restrict__ x, const int32_t* __restrict__ row_index, int64_t d,
                                 float* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const float* src = x + static_cast<int64_t>(row_index[i]) * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[i * d + j] = src[j];
}

}  // namespace

absl::Status MoePermute(const int32_t* idx, int64_t rows, int k, int E, int groups, int32_t* scratch,
                        int32_t* row_index, int32_t* slot_pos, int32_t* group_offsets, int32_t* group_expert,
                        cudaStream_t stream) {
  const int64_t n = rows * k;
  if (E < 1 || k < 1 || groups < 1 || groups > E)
    return absl::InvalidArgumentError(absl::StrCat("MoePermute: bad E=", E, " k=", k, " groups=", groups));
  if (n > INT32_MAX) return absl::InvalidArgumentError("MoePermute: too many routed pairs");
  if (rows == 0) return absl::OkStatus();
  int32_t* counts = scratch;
  int32_t* offsets = scratch + E;
  MoeBucketKernel<0><<<E, kThreads, 0, stream>>>(idx, n, E, counts, nullptr, nullptr, nullptr, k);
  RETORT_CUDA_LAUNCH_CHECK();
  MoeGroupsKernel<<<1, kThreads, 0, stream>>>(counts, E, groups, static_cast<int>(n), offsets, group_offsets,
                                              group_expert);
  RETORT_CUDA_LAUNCH_CHECK();
  MoeBucketKernel<1><<<E, kThreads, 0, stream>>>(idx, n, E, nullptr, offsets, row_index, slot_pos, k);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status MoeCombine(const float* y, const int32_t* slot_pos, const float* weights, int64_t rows, int k, int64_t d,
                        const float* shared, float* out, cudaStream_t stream) {
  if (rows == 0 || d == 0) return absl::OkStatus();
  if (k > 16) return absl::InvalidArgumentError(absl::StrCat("MoeCombine: k = ", k, " > 16"));
  MoeCombineKernel<<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>((d + 255) / 256)), 256, 0, stream>>>(
      y, slot_pos, weights, k, d, shared, out);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status GatherRows(const float* x, const int32_t* row_index, int64_t n, int64_t d, float* out,
                        cudaStream_t stream) {
  if (n == 0 || d == 0) return absl::OkStatus();
  GatherRowsKernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(x, row_index, d, out);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

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
