#include "model/kernels/cuda/mhc.cuh"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kMaxMix = 24;
constexpr int kMaxHcSlices = 64;  // HcMaps stages up to this many slices' partials in shared memory
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

// The block's mix projection of X[i0, i1) of one row: out[k] (k < mix) =
// sum_i X_i fn[k, i] and out[kMaxMix] = sum_i X_i^2, reduced over the block
// in a fixed order. Every thread of the block calls it; out is shared memory.
__device__ __forceinline__ void BlockMix(const float* __restrict__ xr, const float* __restrict__ fn, int64_t width,
                                         int64_t i0, int64_t i1, int mix, float* out) {
  __shared__ float part[kThreads / 32][kMaxMix + 1];
  float acc[kMaxMix + 1];
#pragma unroll
  for (int k = 0; k <= kMaxMix; ++k) acc[k] = 0.0f;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += kThreads) {
    const float v = xr[i];
    acc[kMaxMix] += v * v;
#pragma unroll
    for (int k = 0; k < kMaxMix; ++k)
      if (k < mix) acc[k] += v * fn[k * width + i];
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k <= kMaxMix; ++k) {
    const float t = internal::WarpSum(acc[k]);
    if (lane == 0) part[warp][k] = t;
  }
  __syncthreads();
  if (threadIdx.x <= kMaxMix) {
    float t = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) t += part[w][threadIdx.x];
    out[threadIdx.x] = t;
  }
  __syncthreads();
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
  __shared__ float mixes[kMaxMix + 1];
  __shared__ float pre[4];
  __shared__ float cm[16];

  BlockMix(xr, fn, width, 0, width, mix, mixes);
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
  const int64_t r = blockIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
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

// Note [Split mHC mix projection]: at decode a row's mix projection is 24 dot
// products of length hc*d = 16384 over a 1.5 MB fn; one block per row (the
// kernel above) leaves all but one SM idle. The split path runs it over
// (rows, slices) blocks writing per-slice partial sums (fixed slice order, so
// deterministic), then one small block per row reduces them and computes the
// maps and Sinkhorn, then (rows, d/256) blocks collapse the streams.
constexpr int64_t kSliceWidth = 256;  // one value a thread: a decode row spreads over hc*d/256 blocks

int64_t Slices(const HcParams& p) { return (p.hc * p.d + kSliceWidth - 1) / kSliceWidth; }

// grid (rows, slices): partial[r][s][k] for k < mix, and sum of squares at k = kMaxMix.
__global__ void __launch_bounds__(kThreads) HcMixPartialKernel(HcParams p, int mix, const float* __restrict__ X,
                                                               const float* __restrict__ fn,
                                                               float* __restrict__ partial) {
  const int64_t width = p.hc * p.d, r = blockIdx.x, s = blockIdx.y;
  __shared__ float mixes[kMaxMix + 1];
  const int64_t i0 = s * kSliceWidth, i1 = i0 + kSliceWidth < width ? i0 + kSliceWidth : width;
  BlockMix(X + r * width, fn, width, i0, i1, mix, mixes);
  if (threadIdx.x <= kMaxMix) partial[(r * gridDim.y + s) * (kMaxMix + 1) + threadIdx.x] = mixes[threadIdx.x];
}

// Sinkhorn of an hc x hc matrix in shared memory by one warp, element (i, j)
// on lane i*hc + j: the same arithmetic per element as Sinkhorn() above (row
// softmax + eps, then alternating column / row normalisations, each sum in
// index order), without its serial chain of hc*hc divisions per pass.
__device__ void SinkhornWarp(float* m, int hc, int iters, float eps) {
  // Element (i, j) lives in lane i*hc + j's register; row and column sums
  // gather it by shuffles (all lanes take part; lanes past hc*hc compute
  // nothing they keep).
  const int lane = threadIdx.x & 31;
  const bool on = lane < hc * hc;
  const int i = on ? lane / hc : 0, j = on ? lane % hc : 0;
  float v = on ? m[lane] : 0.0f;
  __syncwarp();
  float mx = -INFINITY;
  for (int k = 0; k < hc; ++k) mx = fmaxf(mx, __shfl_sync(0xffffffffu, v, i * hc + k));
  v = expf(v - mx);
  float sum = 0.0f;
  for (int k = 0; k < hc; ++k) sum += __shfl_sync(0xffffffffu, v, i * hc + k);
  v = v / sum + eps;
  for (int it = 0; it < iters; ++it) {
    if (it > 0) {
      float rs = 0.0f;
      for (int k = 0; k < hc; ++k) rs += __shfl_sync(0xffffffffu, v, i * hc + k);
      v = v / (rs + eps);
    }
    float cs = 0.0f;
    for (int k = 0; k < hc; ++k) cs += __shfl_sync(0xffffffffu, v, k * hc + j);
    v = v / (cs + eps);
  }
  if (on) m[lane] = v;
  __syncwarp();
}

// grid (rows), 32 threads: reduce the slices, then the maps (Sinkhorn by the
// warp). pre -> pre_out [rows, hc].
template <bool kHead>
__global__ void HcMapsKernel(HcParams p, int64_t slices, const float* __restrict__ partial,
                             const float* __restrict__ base, const float* __restrict__ scale,
                             float* __restrict__ pre_out, float* __restrict__ post, float* __restrict__ comb) {
  const int hc = p.hc;
  const int64_t r = blockIdx.x, width = hc * p.d;
  __shared__ float mixes[kMaxMix + 1];
  __shared__ float cm[16];
  // The slices' partials come in with all their loads in flight at once
  // (a serial chain of `slices` global loads per lane took ~15 us at decode),
  // then each lane sums its column in slice order.
  constexpr int kPerLane = kMaxHcSlices * (kMaxMix + 1) / 32;  // blockDim.x == 32
  __shared__ float part[kMaxHcSlices * (kMaxMix + 1)];
  const int n = static_cast<int>(slices) * (kMaxMix + 1);
  const bool staged = slices <= kMaxHcSlices;
  if (staged) {  // a fixed trip count, so every load is issued before the first store
    float v[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int i = static_cast<int>(threadIdx.x) + 32 * k;
      v[k] = i < n ? __ldg(partial + r * n + i) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int i = static_cast<int>(threadIdx.x) + 32 * k;
      if (i < n) part[i] = v[k];
    }
  }
  __syncthreads();
  if (threadIdx.x <= kMaxMix) {
    float t = 0.0f;
    if (staged) {
      for (int64_t s = 0; s < slices; ++s) t += part[s * (kMaxMix + 1) + threadIdx.x];
    } else {
      for (int64_t s = 0; s < slices; ++s) t += partial[(r * slices + s) * (kMaxMix + 1) + threadIdx.x];
    }
    mixes[threadIdx.x] = t;
  }
  __syncthreads();
  const float inv = 1.0f / sqrtf(mixes[kMaxMix] / static_cast<float>(width) + p.rms_eps);
  const int t = threadIdx.x;
  if (t < hc) pre_out[r * hc + t] = SigmoidF(mixes[t] * inv * scale[0] + base[t]) + p.hc_eps;
  if constexpr (!kHead) {
    if (t < hc) post[r * hc + t] = 2.0f * SigmoidF(mixes[hc + t] * inv * scale[1] + base[hc + t]);
    if (t < hc * hc) cm[t] = mixes[2 * hc + t] * inv * scale[2] + base[2 * hc + t];
    __syncwarp();
    SinkhornWarp(cm, hc, p.sinkhorn_iters, p.hc_eps);
    if (t < hc * hc) comb[r * hc * hc + t] = cm[t];
  }
}

// grid (rows, ceil(d / 256)): u[r, i] = sum_j pre[r, j] X[r, j, i].
__global__ void HcCollapseKernel(int hc, int64_t d, const float* __restrict__ X, const float* __restrict__ pre,
                                 float* __restrict__ u) {
  const int64_t r = blockIdx.x, i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (i >= d) return;
  float t = 0.0f;
  for (int j = 0; j < hc; ++j) t += pre[r * hc + j] * X[(r * hc + j) * d + i];
  u[r * d + i] = t;
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
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((p.d + 255) / 256));
  HcPostKernel<<<grid, 256, 0, stream>>>(p.hc, p.d, F, post, comb, X);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

int64_t HcScratchFloats(const HcParams& p, int64_t rows) { return rows * (Slices(p) * (kMaxMix + 1) + p.hc); }

namespace {
template <bool kHead>
absl::Status HcSplit(const HcParams& p, const float* X, int64_t rows, const float* fn, const float* base,
                     const float* scale, float* u, float* post, float* comb, float* scratch, cudaStream_t stream) {
  if (absl::Status s = CheckHc(p); !s.ok()) return s;
  if (rows == 0) return absl::OkStatus();
  const int64_t slices = Slices(p);
  if (slices > 65535) return absl::InvalidArgumentError("mHC: hc * d too large");
  float* partial = scratch;
  float* pre = scratch + rows * slices * (kMaxMix + 1);
  const int mix = kHead ? p.hc : (2 + p.hc) * p.hc;
  HcMixPartialKernel<<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(slices)), kThreads, 0, stream>>>(
      p, mix, X, fn, partial);
  RETORT_CUDA_LAUNCH_CHECK();
  HcMapsKernel<kHead><<<static_cast<unsigned>(rows), 32, 0, stream>>>(p, slices, partial, base, scale, pre, post,
                                                                      comb);
  RETORT_CUDA_LAUNCH_CHECK();
  HcCollapseKernel<<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>((p.d + 255) / 256)), 256, 0, stream>>>(
      p.hc, p.d, X, pre, u);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}
}  // namespace

absl::Status HcPre(const HcParams& p, const float* X, int64_t rows, const float* fn, const float* base,
                   const float* scale, float* u, float* post, float* comb, float* scratch, cudaStream_t stream) {
  return HcSplit<false>(p, X, rows, fn, base, scale, u, post, comb, scratch, stream);
}

absl::Status HcHead(const HcParams& p, const float* X, int64_t rows, const float* fn, const float* base,
                    const float* scale, float* y, float* scratch, cudaStream_t stream) {
  return HcSplit<true>(p, X, rows, fn, base, scale, y, nullptr, nullptr, scratch, stream);
}

}  // namespace retort::cuda
