#include "model/kernels/cuda/mhc.cuh"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kMaxMix = 24;
constexpr int kThreads = 256;

__device__ __forceinline__ float SigmoidF(float x) { return 1.0f / (1.0f + expf(-x)); }

// Sinkhorn projection of an hc x hc matrix in place (cpu::SinkhornProject).
__device__ void Sinkhorn(float* m, int hc, int iters, float eps) {
  for (int i = 0; i < hc; ++i) {
    float* row = m + i * hc;
    float mx = row[0];
    for (int j = 1; j < hc; ++j) mx = fmaxf(mx, row[j]);
    float sum = 0.0f;
    for (int j = 0; j < hc; ++j) sum += (row[j] = expf(row[j] - mx));
    for (int j = 0; j < hc; ++j) row[j] = row[j] / sum + eps;
  }
  for (int it = 0; it < iters; ++it) {
    if (it > 0)
      for (int i = 0; i < hc; ++i) {
        float s = 0.0f;
        for (int j = 0; j < hc; ++j) s += m[i * hc + j];
        for (int j = 0; j < hc; ++j) m[i * hc + j] /= (s + eps);
      }
    for (int j = 0; j < hc; ++j) {
      float s = 0.0f;
      for (int i = 0; i < hc; ++i) s += m[i * hc + j];
      for (int i = 0; i < hc; ++i) m[i * hc + j] /= (s + eps);
    }
  }
}

// One block per row. head == true: hc_head (mix = hc rows, only the collapse).
template <bool kHead>
__global__ void __launch_bounds__(kThreads) HcPreKernel(HcParams p, const float* __restrict__ X,
                                                        const float* __restrict__ fn, const float* __restrict__ base,
                                                        const float* __restrict__ scale, float* __restrict__ u,
                                                        float* __restrict__ post, float* __restrict__ comb) {
  const int hc = p.hc;
  const int64_t d = p.d, width = hc * d;
  const int mix = kHead ? hc : (2 + hc) * hc;
  const int64_t r = blockIdx.x;
  const float* xr = X + r * width;
  __shared__ float part[kThreads / 32][kMaxMix + 1];
  __shared__ float mixes[kMaxMix + 1];
  __shared__ float pre[4];
  __shared__ float cm[16];

  float acc[kMaxMix + 1];
#pragma unroll
  for (int k = 0; k <= kMaxMix; ++k) acc[k] = 0.0f;
  for (int64_t i = threadIdx.x; i < width; i += kThreads) {
    const float v = xr[i];
    acc[kMaxMix] += v * v;
#pragma unroll
    for (int k = 0; k < kMaxMix; ++k)
      if (k < mix) acc[k] += v * fn[k * width + i];
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k <= kMaxMix; ++k) {
    const float s = internal::WarpSum(acc[k]);
    if (lane == 0) part[warp][k] = s;
  }
  __syncthreads();
  if (threadIdx.x <= kMaxMix) {
    float s = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) s += part[w][threadIdx.x];
    mixes[threadIdx.x] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const float inv = 1.0f / sqrtf(mixes[kMaxMix] / static_cast<float>(width) + p.rms_eps);
    for (int j = 0; j < hc; ++j) pre[j] = SigmoidF(mixes[j] * inv * scale[0] + base[j]) + p.hc_eps;
    if (!kHead) {
      for (int j = 0; j < hc; ++j) post[r * hc + j] = 2.0f * SigmoidF(mixes[hc + j] * inv * scale[1] + base[hc + j]);
      for (int k = 0; k < hc * hc; ++k) cm[k] = mixes[2 * hc + k] * inv * scale[2] + base[2 * hc + k];
      Sinkhorn(cm, hc, p.sinkhorn_iters, p.hc_eps);
      for (int k = 0; k < hc * hc; ++k) comb[r * hc * hc + k] = cm[k];
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    float s = 0.0f;
    for (int j = 0; j < hc; ++j) s += pre[j] * xr[j * d + i];
    u[r * d + i] = s;
  }
}

__global__ void HcPostKernel(int hc, int64_t d, const float* __restrict__ F, const float* __restrict__ post,
                             const float* __restrict__ comb, float* X) {
  const int64_t r = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= d) return;
  float old[4];
  float* xr = X + r * hc * d;
  for (int j = 0; j < hc; ++j) old[j] = xr[j * d + i];
  const float f = F[r * d + i];
  const float* cm = comb + r * hc * hc;
  for (int k = 0; k < hc; ++k) {
    float v = post[r * hc + k] * f;
    for (int j = 0; j < hc; ++j) v += cm[j * hc + k] * old[j];
    xr[k * d + i] = v;
  }
}

absl::Status CheckHc(const HcParams& p) {
  if (p.hc < 1 || p.hc > 4) return absl::InvalidArgumentError(absl::StrCat("mHC: hc must be in [1, 4], got ", p.hc));
  if (p.d <= 0) return absl::InvalidArgumentError(absl::StrCat("mHC: d must be positive, got ", p.d));
  return absl::OkStatus();
}

}  // namespace

absl::Status HcPre(const HcParams& p, const float* X, int64_t rows, const float* fn, const float* base,
                   const float* scale, float* u, float* post, float* comb, cudaStream_t stream) {
  if (absl::Status s = CheckHc(p); !s.ok()) return s;
  if (rows == 0) return absl::OkStatus();
  HcPreKernel<false><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(p, X, fn, base, scale, u, post, comb);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status HcHead(const HcParams& p, const float* X, int64_t rows, const float* fn, const float* base,
                    const float* scale, float* y, cudaStream_t stream) {
  if (absl::Status s = CheckHc(p); !s.ok()) return s;
  if (rows == 0) return absl::OkStatus();
  HcPreKernel<true><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(p, X, fn, base, scale, y, nullptr, nullptr);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status HcPost(const HcParams& p, const float* F, const float* post, const float* comb, int64_t rows, float* X,
                    cudaStream_t stream) {
  if (absl::Status s = CheckHc(p); !s.ok()) return s;
  if (rows == 0) return absl::OkStatus();
  if (rows > 65535) return absl::InvalidArgumentError(absl::StrCat("HcPost: rows ", rows, " > 65535 per launch"));
  const dim3 grid(static_cast<unsigned>((p.d + 255) / 256), static_cast<unsigned>(rows));
  HcPostKernel<<<grid, 256, 0, stream>>>(p.hc, p.d, F, post, comb, X);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
