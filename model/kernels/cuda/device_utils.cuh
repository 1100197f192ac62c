// Device-side helpers shared by retort's CUDA kernels (internal; include only
// from .cu files in this folder): warp/block reductions and the exact e2m1 /
// E8M0 decoders. All reductions are deterministic for a fixed launch shape.
#ifndef RETORT_MODEL_KERNELS_CUDA_DEVICE_UTILS_CUH_
#define RETORT_MODEL_KERNELS_CUDA_DEVICE_UTILS_CUH_

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace retort::cuda::internal {

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets
// the result. `scratch` holds >= 32 floats of shared memory.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = WarpSum(v);
  __syncthreads();  // scratch may be in use by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nw ? scratch[lane] : 0.0f;
  return WarpSum(t);
}
__device__ __forceinline__ float BlockMax(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = WarpMax(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nw ? scratch[lane] : -INFINITY;
  return WarpMax(t);
}

// V4's dynamic FP8 activation scale of a block from its amax (floored at
// 1e-4): 2^ceil(log2(amax / 448)), so |x / scale| <= 448 (V4_SPEC §FP8).
__device__ __forceinline__ float Fp8Pow2Scale(float amax) {
  const float r = fmaxf(amax, 1e-4f) / 448.0f;
  int e = 0;
  const float m = frexpf(r, &e);  // r = m * 2^e, m in [0.5, 1)
  return ldexpf(1.0f, m == 0.5f ? e - 1 : e);
}
// e4m3(v / scale) * scale (round to nearest even, saturating): exact in bf16.
__device__ __forceinline__ float Fp8RoundTrip(float v, float scale) {
  const __nv_fp8_storage_t q = __nv_cvt_float_to_fp8(v / scale, __NV_SATFINITE, __NV_E4M3);
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(q, __NV_E4M3))) * scale;
}
// A float with at most 8 significant bits (e.g. Fp8RoundTrip's) -> its bf16 bits.
__device__ __forceinline__ uint16_t ExactBf16Bits(float v) { return static_cast<uint16_t>(__float_as_uint(v) >> 16); }

// E8M0 byte -> 2^(v-127), exactly as E8M0ToF32 (0xff is NaN, 0 is 2^-127).
__device__ __forceinline__ float E8M0(uint8_t v) {
  if (v == 0xff) return __int_as_float(0x7fc00000);
  if (v == 0) return __int_as_float(0x00400000);
  return __int_as_float(static_cast<int>(v) << 23);
}

// e2m1 code (low 4 bits) -> value.
__device__ __forceinline__ float E2M1(uint32_t code) {
  // Magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 built from the bit layout: exponent
  // e = bits 2..1, mantissa m = bit 0; e == 0 is subnormal (m * 0.5).
  const uint32_t e = (code >> 1) & 3u, m = code & 1u;
  const float mag = e == 0 ? 0.5f * static_cast<float>(m) : __int_as_float(static_cast<int>((e + 126u) << 23)) * (1.0f + 0.5f * m);
  return (code & 8u) ? -mag : mag;
}

// Order-preserving map float -> uint32 (larger float => larger key; -0 < +0).
__device__ __forceinline__ uint32_t OrderedKey(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

}  // namespace retort::cuda::internal

#endif  // RETORT_MODEL_KERNELS_CUDA_DEVICE_UTILS_CUH_
