#include "model/kernels/cuda/norm_rope.cuh"

#include <algorithm>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

using internal::BlockSum;

__global__ void EmbedKernel(const float* __restrict__ embed, const int64_t* __restrict__ tokens, int64_t d, int hc,
                            float* __restrict__ X) {
  const int64_t r = blockIdx.x;
  const float* e = embed + tokens[r] * d;
  float* x = X + r * hc * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = e[i];
    for (int j = 0; j < hc; ++j) x[j * d + i] = v;
  }
}

// Row blockIdx.x of x -> y (one block per row).
__device__ __forceinline__ void RmsNormRow(const float* x, int64_t D, const float* __restrict__ weight, float eps,
                                           float* y) {
  __shared__ float scratch[32];
  const float* xt = x + static_cast<int64_t>(blockIdx.x) * D;
  float* yt = y + static_cast<int64_t>(blockIdx.x) * D;
  float ss = 0.0f;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) ss += xt[i] * xt[i];
  ss = BlockSum(ss, scratch);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(D) + eps);
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = xt[i] * r;
    yt[i] = weight ? weight[i] * v : v;
  }
}

__global__ void RmsNormKernel(const float* x, int64_t D, const float* __restrict__ weight, float eps, float* y) {
  RmsNormRow(x, D, weight, eps, y);
}

// RmsNormRow, then (after the block's y is complete) warp w quantizes the
// 128-blocks w, w + warps, ... of the row, four values a lane.
__global__ void RmsNormQuantKernel(const float* x, int64_t D, const float* __restrict__ weight, float eps, float* y,
                                   uint16_t* __restrict__ xq) {
  RmsNormRow(x, D, weight, eps, y);
  const float* yt = y + static_cast<int64_t>(blockIdx.x) * D;
  __syncthreads();  // yt complete (global writes of this block are visible to it)
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  uint16_t* qt = xq + static_cast<int64_t>(blockIdx.x) * D;
  for (int64_t k0 = (threadIdx.x >> 5) * 128; k0 < D; k0 += warps * 128) {
    float v[4];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + 4 * lane + j;
      v[j] = k < D ? yt[k] : 0.0f;
      amax = fmaxf(amax, fabsf(v[j]));
    }
    const float sc = internal::Fp8Pow2Scale(internal::WarpMax(amax));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + 4 * lane + j;
      if (k < D) qt[k] = internal::ExactBf16Bits(internal::Fp8RoundTrip(v[j], sc));
    }
  }
}

// grid (rows * heads), one head row a block: RmsNormKernel's arithmetic, the
// row kept in shared memory, then RopeKernel's on its trailing dims.
__global__ void RmsNormRopeKernel(const float* x, int64_t heads, int64_t D, const float* __restrict__ weight, float eps,
                                  int64_t rope_dim, const int64_t* __restrict__ positions,
                                  const float* __restrict__ inv_freq, float* y) {
  extern __shared__ float row[];
  __shared__ float scratch[32];
  const int64_t hr = blockIdx.x;
  const float* xt = x + hr * D;
  float* yt = y + hr * D;
  float ss = 0.0f;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = xt[i];
    row[i] = v;
    ss += v * v;
  }
  ss = BlockSum(ss, scratch);  // syncs: row[] complete
  const float r = 1.0f / sqrtf(ss / static_cast<float>(D) + eps);
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = row[i] * r;
    row[i] = weight ? weight[i] * v : v;
  }
  __syncthreads();
  const float pos = static_cast<float>(positions[hr / heads]);
  const int64_t off = D - rope_dim, half = rope_dim / 2;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    float v = row[i];
    if (i >= off) {
      const int64_t p = (i - off) / 2;
      const float angle = inv_freq[p] * pos;  // fp32, as the reference
      const float c = cosf(angle), s = sinf(angle);
      const float a = row[off + 2 * p], b = row[off + 2 * p + 1];
      v = (i - off) % 2 == 0 ? a * c - b * s : b * c + a * s;
    }
    yt[i] = v;
  }
  (void)half;
}

// grid: (rows, ceil(heads * rope_dim/2 / blockDim)), one rotated pair a thread.
__global__ void RopeKernel(float* x, int64_t heads, int64_t dim, int64_t rope_dim, const int64_t* __restrict__ positions,
                           const float* __restrict__ inv_freq, float sign) {
  const int64_t r = blockIdx.x, half = rope_dim / 2;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (k >= heads * half) return;
  const float pos = static_cast<float>(positions[r]);
  const int64_t h = k / half, i = k % half;
  const float angle = inv_freq[i] * pos;  // fp32, as the reference
  const float c = cosf(angle), s = sign * sinf(angle);
  float* v = x + (r * heads + h) * dim + (dim - rope_dim);
  const float a = v[2 * i], b = v[2 * i + 1];
  v[2 * i] = a * c - b * s;
  v[2 * i + 1] = b * c + a * s;
}

__global__ void SwiGluKernel(const float* g, const float* u, int64_t n, float limit, float* h) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float gi = g[i], ui = u[i];
    if (limit > 0.0f) {
      gi = fminf(gi, limit);
      ui = fminf(fmaxf(ui, -limit), limit);
    }
    h[i] = gi / (1.0f + expf(-gi)) * ui;
  }
}

int RmsNormThreads(int64_t D) {
  // About four values a thread (decode rows are latency-bound: one block
  // per row, so its loads must be in flight together). Fixed by D alone.
  return static_cast<int>(std::clamp<int64_t>((D / 4 + 31) / 32 * 32, 32, 1024));
}

}  // namespace

absl::Status EmbedToStreams(const float* embed, const int64_t* tokens, int64_t rows, int64_t d, int hc, float* X,
                            cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  EmbedKernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(embed, tokens, d, hc, X);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status RmsNorm(const float* x, int64_t T, int64_t D, const float* weight, float eps, float* y,
                     cudaStream_t stream) {
  if (T == 0) return absl::OkStatus();
  if (T > 0x7fffffff) return absl::InvalidArgumentError(absl::StrCat("RmsNorm: too many rows ", T));
  RmsNormKernel<<<static_cast<unsigned>(T), RmsNormThreads(D), 0, stream>>>(x, D, weight, eps, y);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status RmsNormQuant(const float* x, int64_t T, int64_t D, const float* weight, float eps, float* y,
                          uint16_t* xq, cudaStream_t stream) {
  if (T == 0) return absl::OkStatus();
  if (T > 0x7fffffff) return absl::InvalidArgumentError(absl::StrCat("RmsNormQuant: too many rows ", T));
  RmsNormQuantKernel<<<static_cast<unsigned>(T), RmsNormThreads(D), 0, stream>>>(x, D, weight, eps, y, xq);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status RmsNormRope(const float* x, int64_t rows, int64_t heads, int64_t D, const float* weight, float eps,
                         int64_t rope_dim, const int64_t* positions, const float* inv_freq, float* y,
                         cudaStream_t stream) {
  if (rope_dim % 2 != 0 || rope_dim > D)
    return absl::InvalidArgumentError(absl::StrCat("RmsNormRope: rope_dim ", rope_dim, " must be even and <= ", D));
  if (D > 8192) return absl::InvalidArgumentError(absl::StrCat("RmsNormRope: D ", D, " > 8192"));
  if (rows == 0 || heads == 0) return absl::OkStatus();
  if (rows * heads > 0x7fffffff) return absl::InvalidArgumentError("RmsNormRope: too many rows");
  RmsNormRopeKernel<<<static_cast<unsigned>(rows * heads), RmsNormThreads(D), sizeof(float) * D, stream>>>(
      x, heads, D, weight, eps, rope_dim, positions, inv_freq, y);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status RopeAtPositions(float* x, int64_t rows, int64_t heads, int64_t dim, int64_t rope_dim,
                             const int64_t* positions, const float* inv_freq, float sign, cudaStream_t stream) {
  if (rope_dim % 2 != 0 || rope_dim > dim)
    return absl::InvalidArgumentError(absl::StrCat("RoPE: rope_dim ", rope_dim, " must be even and <= dim ", dim));
  if (rows == 0 || rope_dim == 0) return absl::OkStatus();
  const int64_t work = heads * rope_dim / 2;
  const int threads = work >= 256 ? 256 : 32 * static_cast<int>((work + 31) / 32);
  const unsigned blocks = static_cast<unsigned>((work + threads - 1) / threads);
  RopeKernel<<<dim3(static_cast<unsigned>(rows), blocks), threads, 0, stream>>>(x, heads, dim, rope_dim, positions,
                                                                                inv_freq, sign);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status SwiGlu(const float* g, const float* u, int64_t n, float limit, float* h, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65535);
  SwiGluKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(g, u, n, limit, h);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
