#include "model/kernels/cuda/mxfp4.cuh"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kWarps = 8;        // warps per CTA
constexpr int kRowsPerWarp = 2;  // output rows per warp (each x value feeds both)
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;
constexpr int kTokenTile = 8;    // rows of x consumed per decoded weight word
constexpr int kChunkBlocks = 32; // MX blocks per staged k-chunk: one per lane
constexpr int kPad = 36;         // floats per staged block: 32 + 4 of skew

// Note [MXFP4 GEMV layout]: lane l of every warp owns MX block c0 + l of the
// current k-chunk, so the 16-byte code loads of a warp are one coalesced
// 512-byte read. x for the chunk is staged once per CTA in shared memory with
// a 36-float stride per 32-value block: a quarter-warp's 128-bit reads of
// eight lanes' blocks then hit eight distinct 4-bank groups (a 32-float
// stride would put all lanes on the same banks — the old kernel's reads of x
// straight from global memory at that stride touched 32 cache lines per
// instruction and capped it at ~2 TFLOP/s). Each decoded weight word (8
// values) is used by kRowsPerWarp rows x kTokenTile tokens of FMAs.
//
// grid: (ceil(out / kRowsPerCta), groups). Warp w of CTA (bx, g) computes
// output columns bx * kRowsPerCta + w * kRowsPerWarp + r for every row of
// group g, kTokenTile rows at a time.
__global__ void __launch_bounds__(kWarps * 32) MxFp4GroupedKernel(
    const float* __restrict__ x, int64_t in, const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
    int64_t out, const int32_t* __restrict__ group_offsets, const int32_t* __restrict__ group_expert,
    const int32_t* __restrict__ row_index, int64_t single_rows, float* __restrict__ y) {
  __shared__ __align__(16) float xs[kTokenTile][kChunkBlocks * kPad];
  __shared__ float lut[16];  // e2m1 code -> value
  if (threadIdx.x < 16) lut[threadIdx.x] = internal::E2M1(threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + warp * kRowsPerWarp;
  const int g = blockIdx.y;
  const int64_t m0 = group_offsets ? group_offsets[g] : 0;
  const int64_t m1 = group_offsets ? group_offsets[g + 1] : single_rows;
  const int64_t e = group_expert ? group_expert[g] : 0;
  const int64_t blocks = in / 32;
  const uint8_t* crow[kRowsPerWarp];
  const uint8_t* srow[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t o = o0 + r < out ? o0 + r : out - 1;  // clamped; stores are guarded
    crow[r] = codes + (e * out + o) * (in / 2);
    srow[r] = scales + (e * out + o) * blocks;
  }
  for (int64_t t0 = m0; t0 < m1; t0 += kTokenTile) {
    const int nt = static_cast<int>(m1 - t0 < kTokenTile ? m1 - t0 : kTokenTile);
    float acc[kRowsPerWarp][kTokenTile];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int t = 0; t < kTokenTile; ++t) acc[r][t] = 0.0f;
    // Codes and scales of the next chunk are loaded one chunk ahead, so the
    // HBM reads overlap the staging of x and the FMAs of the current chunk.
    uint4 q_next[kRowsPerWarp];
    uint8_t s_next[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) q_next[r] = make_uint4(0, 0, 0, 0), s_next[r] = 127;
    auto load_chunk = [&](int64_t c0) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (c0 + lane < blocks) {
          q_next[r] = __ldg(reinterpret_cast<const uint4*>(crow[r] + (c0 + lane) * 16));
          s_next[r] = __ldg(srow[r] + c0 + lane);
        }
      }
    };
    load_chunk(0);
    for (int64_t c0 = 0; c0 < blocks; c0 += kChunkBlocks) {
      const int nb = static_cast<int>(blocks - c0 < kChunkBlocks ? blocks - c0 : kChunkBlocks);
      uint4 q[kRowsPerWarp];
      float sc[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        q[r] = q_next[r];
        sc[r] = internal::E8M0(s_next[r]);
      }
      if (c0 + kChunkBlocks < blocks) load_chunk(c0 + kChunkBlocks);
      __syncthreads();  // the previous chunk is consumed
      // Only the nt live rows are staged (decode: nt = 1).
      for (int idx = threadIdx.x; idx < nt * kChunkBlocks * 8; idx += kWarps * 32) {
        const int t = idx / (kChunkBlocks * 8);
        const int b = (idx / 8) % kChunkBlocks;
        const int k = idx % 8;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (b < nb) {
          const int64_t m = t0 + t;
          const float* xr = x + (row_index ? static_cast<int64_t>(row_index[m]) : m) * in;
          v = __ldg(reinterpret_cast<const float4*>(xr + (c0 + b) * 32) + k);
        }
        *reinterpret_cast<float4*>(&xs[t][b * kPad + 4 * k]) = v;
      }
      __syncthreads();
      if (lane < nb) {
        // The block's E8M0 scale is a power of two, so it is applied once to
        // the block's partial dot product: sc * sum(e2m1 * x) equals
        // sum((e2m1 * sc) * x) in fp32 (no rounding moves) outside the
        // subnormal range; e2m1 values come from a 16-entry table.
        float part[kRowsPerWarp][kTokenTile];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
          for (int t = 0; t < kTokenTile; ++t) part[r][t] = 0.0f;
#pragma unroll
        for (int word = 0; word < 4; ++word) {
          float w[kRowsPerWarp][8];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const uint32_t bits = word == 0 ? q[r].x : word == 1 ? q[r].y : word == 2 ? q[r].z : q[r].w;
#pragma unroll
            for (int k = 0; k < 8; ++k) w[r][k] = lut[(bits >> (4 * k)) & 0xfu];
          }
#pragma unroll
          for (int t = 0; t < kTokenTile; ++t) {
            if (t < nt) {
              const float4 a = *reinterpret_cast<const float4*>(&xs[t][lane * kPad + 8 * word]);
              const float4 c = *reinterpret_cast<const float4*>(&xs[t][lane * kPad + 8 * word + 4]);
#pragma unroll
              for (int r = 0; r < kRowsPerWarp; ++r)
                part[r][t] += w[r][0] * a.x + w[r][1] * a.y + w[r][2] * a.z + w[r][3] * a.w + w[r][4] * c.x +
                              w[r][5] * c.y + w[r][6] * c.z + w[r][7] * c.w;
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
          for (int t = 0; t < kTokenTile; ++t)
            if (t < nt) acc[r][t] += sc[r] * part[r][t];
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int t = 0; t < kTokenTile; ++t) {
        const float s = internal::WarpSum(acc[r][t]);
        if (lane == 0 && t < nt && o0 + r < out) y[(t0 + t) * out + o0 + r] = s;
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
  const dim3 grid(static_cast<unsigned>((out + kRowsPerCta - 1) / kRowsPerCta), 1);
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
  const dim3 grid(static_cast<unsigned>((out + kRowsPerCta - 1) / kRowsPerCta), static_cast<unsigned>(groups));
  MxFp4GroupedKernel<<<grid, kWarps * 32, 0, stream>>>(x, in, codes, scales, out, group_offsets, group_expert,
                                                       row_index, 0, y);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
