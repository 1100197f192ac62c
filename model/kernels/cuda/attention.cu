#include "model/kernels/cuda/attention.cuh"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kHeadsPerBlock = 8;  // one warp per head
constexpr int kKeyTile = 16;
constexpr int kMaxPerLane = 16;    // D <= 512

// grid (ceil(H / 8), B); dynamic smem: kKeyTile * D floats.
__global__ void __launch_bounds__(kHeadsPerBlock * 32) DecodeAttentionKernel(DecodeAttentionArgs a) {
  extern __shared__ float ktile[];
  const int64_t b = blockIdx.y, D = a.D;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t h = static_cast<int64_t>(blockIdx.x) * kHeadsPerBlock + warp;
  const bool active = h < a.H;
  const int per = static_cast<int>(D / 32);
  const int64_t p = a.positions[b];
  const int64_t nwin = p + 1 < a.win ? p + 1 : a.win;
  const int64_t first = p - nwin + 1;
  const int64_t ncomp = a.count ? a.count[b] : 0;
  const int64_t nk = nwin + ncomp;
  const float scale = 1.0f / sqrtf(static_cast<float>(D));

  float q[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    q[i] = (active && i < per) ? a.q[(b * a.H + h) * D + lane + 32 * i] : 0.0f;
    acc[i] = 0.0f;
  }
  // Running max starts at the sink: denominator = exp(sink - m) + sum exp(z - m).
  float run_max = active ? a.sinks[h] : 0.0f;
  float denom = 1.0f;

  for (int64_t k0 = 0; k0 < nk; k0 += kKeyTile) {
    const int nt = static_cast<int>(nk - k0 < kKeyTile ? nk - k0 : kKeyTile);
    __syncthreads();  // previous tile consumed
    for (int64_t idx = threadIdx.x; idx < nt * D; idx += blockDim.x) {
      const int64_t j = k0 + idx / D, e = idx % D;
      const float* src;
      if (j < nwin) {
        src = a.window + (b * a.win + (first + j) % a.win) * D;
      } else {
        const int64_t c = j - nwin;
        const int64_t ent = a.selected ? a.selected[b * a.sel_stride + c] : c;
        src = a.entries + (b * a.cap + ent) * D;
      }
      ktile[idx] = src[e];
    }
    __syncthreads();
    if (!active) continue;
    float z[kKeyTile];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kKeyTile; ++j) {
      float dot = 0.0f;
      if (j < nt) {
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i)
          if (i < per) dot += q[i] * ktile[j * D + lane + 32 * i];
      }
      dot = internal::WarpSum(dot);
      z[j] = j < nt ? dot * scale : -INFINITY;
      tile_max = fmaxf(tile_max, z[j]);
    }
    const float new_max = fmaxf(run_max, tile_max);
    const float f = expf(run_max - new_max);
    denom *= f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) acc[i] *= f;
    run_max = new_max;
#pragma unroll
    for (int j = 0; j < kKeyTile; ++j) {
      if (j < nt) {
        const float pj = expf(z[j] - run_max);
        denom += pj;
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i)
          if (i < per) acc[i] += pj * ktile[j * D + lane + 32 * i];
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i)
    if (i < per) a.out[(b * a.H + h) * D + lane + 32 * i] = acc[i] / denom;
}

}  // namespace

absl::Status DecodeAttention(const DecodeAttentionArgs& a, cudaStream_t stream) {
  if (a.D % 32 != 0 || a.D > 32 * kMaxPerLane || a.D <= 0)
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: D must be a multiple of 32 in [32, 512], got ", a.D));
  if (a.win < 1) return absl::InvalidArgumentError("DecodeAttention: window must be >= 1");
  if (a.count && !a.entries) return absl::InvalidArgumentError("DecodeAttention: count given without entries");
  if (a.B == 0 || a.H == 0) return absl::OkStatus();
  if (a.B > 65535) return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: B ", a.B, " > 65535"));
  const size_t smem = sizeof(float) * kKeyTile * a.D;
  if (smem > 48 * 1024)
    RETORT_CUDA_RETURN(cudaFuncSetAttribute(DecodeAttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((a.H + kHeadsPerBlock - 1) / kHeadsPerBlock), static_cast<unsigned>(a.B));
  DecodeAttentionKernel<<<grid, kHeadsPerBlock * 32, smem, stream>>>(a);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
