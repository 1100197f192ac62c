#include "model/kernels/cuda/mxfp4.cuh"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kWarps = 8;     // output rows in flight per block (one per warp)
constexpr int kRowTile = 8;   // rows of x consumed per decoded weight block

// Decodes the 32 e2m1 values of one 16-byte code block times `scale`.
__device__ __forceinline__ void DecodeBlock(const uint4 q, float scale, float* w) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int b = 0; b < 4; ++b)
#pragma unroll
    for (int k = 0; k < 8; ++k) w[b * 8 + k] = internal::E2M1((words[b] >> (4 * k)) & 0xfu) * scale;
}

// grid: (ceil(out / kWarps), groups). Warp w of block (bx, g) computes output
// column o = bx * kWarps + w for every row of group g, kRowTile rows at a time.
__global__ void __launch_bounds__(kWarps * 32) MxFp4GroupedKernel(
    const float* __restrict__ x, int64_t in, const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
    int64_t out, const int32_t* __restrict__ group_offsets, const int32_t* __restrict__ group_expert,
    const int32_t* __restrict__ row_index, int64_t single_rows, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (o >= out) return;
  const int g = blockIdx.y;
  const int64_t m0 = group_offsets ? group_offsets[g] : 0;
  const int64_t m1 = group_offsets ? group_offsets[g + 1] : single_rows;
  const int64_t e = group_expert ? group_expert[g] : 0;
  const int64_t blocks = in / 32;
  const uint8_t* crow = codes + (e * out + o) * (in / 2);
  const uint8_t* srow = scales + (e * out + o) * blocks;
  for (int64_t t0 = m0; t0 < m1; t0 += kRowTile) {
    const int nt = static_cast<int>(m1 - t0 < kRowTile ? m1 - t0 : kRowTile);
    const float* xrow[kRowTile];
#pragma unroll
    for (int t = 0; t < kRowTile; ++t) {
      const int64_t m = t0 + (t < nt ? t : 0);
      xrow[t] = x + (row_index ? static_cast<int64_t>(row_index[m]) : m) * in;
    }
    float acc[kRowTile];
#pragma unroll
    for (int t = 0; t < kRowTile; ++t) acc[t] = 0.0f;
    for (int64_t b = lane; b < blocks; b += 32) {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(crow + b * 16));
      float w[32];
      DecodeBlock(q, internal::E8M0(__ldg(srow + b)), w);
#pragma unroll
      for (int t = 0; t < kRowTile; ++t) {
        if (t < nt) {
          const float4* xv = reinterpret_cast<const float4*>(xrow[t] + b * 32);
          float a = acc[t];
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            const float4 v = __ldg(xv + k);
            a += w[4 * k] * v.x + w[4 * k + 1] * v.y + w[4 * k + 2] * v.z + w[4 * k + 3] * v.w;
          }
          acc[t] = a;
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kRowTile; ++t) {
      const float s = internal::WarpSum(acc[t]);
      if (lane == 0 && t < nt) y[(t0 + t) * out + o] = s;
    }
  }
}

absl::Status CheckShapes(int64_t in, const float* x, const uint8_t* codes) {
  if (in % 32 != 0) return absl::InvalidArgumentError(absl::StrCat("MXFP4: in = ", in, " is not a multiple of 32"));
  if (reinterpret_cast<uintptr_t>(codes) % 16 != 0)
    return absl::InvalidArgumentError("MXFP4: codes must be 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return absl::InvalidArgumentError("MXFP4: x must be 16-byte aligned");
  return absl::OkStatus();
}

}  // namespace

absl::Status MxFp4MatMul(const float* x, int64_t T, int64_t in, const uint8_t* codes, const uint8_t* scales,
                         int64_t out, float* y, cudaStream_t stream) {
  if (absl::Status s = CheckShapes(in, x, codes); !s.ok()) return s;
  if (T == 0 || out == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>((out + kWarps - 1) / kWarps), 1);
  MxFp4GroupedKernel<<<grid, kWarps * 32, 0, stream>>>(x, in, codes, scales, out, nullptr, nullptr, nullptr, T, y);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status MxFp4GroupedMatMul(const float* x, int64_t in, const uint8_t* codes, const uint8_t* scales, int64_t out,
                                int groups, const int32_t* group_offsets, const int32_t* group_expert,
                                const int32_t* row_index, float* y, cudaStream_t stream) {
  if (absl::Status s = CheckShapes(in, x, codes); !s.ok()) return s;
  if (groups < 0 || groups > 65535) return absl::InvalidArgumentError(absl::StrCat("MXFP4: groups = ", groups));
  if (groups == 0 || out == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>((out + kWarps - 1) / kWarps), static_cast<unsigned>(groups));
  MxFp4GroupedKernel<<<grid, kWarps * 32, 0, stream>>>(x, in, codes, scales, out, group_offsets, group_expert,
                                                       row_index, 0, y);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
