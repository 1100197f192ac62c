// MXFP4 matrix products on packed weights (V4 routed experts): y = x W^T with
// W given as codes [out, in/2] (two e2m1 per byte, low nibble first) and E8M0
// scales [out, in/32]. Lane l of a warp owns one 32-value block of a k-chunk
// (one coalesced 16-byte load of codes and one scale byte), decodes it in
// registers and multiplies it with x staged in shared memory (see Note
// [MXFP4 GEMV layout] in mxfp4.cu); each decoded value feeds 2 output rows x
// up to 8 rows of x, and products accumulate in fp32. Dequantized weights
// never exist in global memory. Matches cpu::MxFp4MatMul up to summation
// order; deterministic for a fixed shape.
//
// This is the decode (GEMV / small-M) path on CUDA cores: it reads W once per
// 8 rows of x. Prefill-sized M wants a tensor-core kernel (not here yet):
// bench/mxfp4_gemm measures both against cuBLAS bf16.
#ifndef RETORT_MODEL_KERNELS_CUDA_MXFP4_CUH_
#define RETORT_MODEL_KERNELS_CUDA_MXFP4_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace retort::cuda {

// x [T, in] f32, codes/scales as above (codes 16-byte aligned), y [T, out].
// in % 32 == 0.
[[nodiscard]] absl::Status MxFp4MatMul(const float* x, int64_t T, int64_t in, const uint8_t* codes,
                                       const uint8_t* scales, int64_t out, float* y, cudaStream_t stream);

// Grouped over experts with token permutation: experts stacked as codes
// [E, out, in/2], scales [E, out, in/32]. Group g (g < groups) multiplies the
// permuted rows m in [group_offsets[g], group_offsets[g+1]) — each reading x
// row row_index[m] (row_index == nullptr: row m) — by expert group_expert[g],
// writing y[m, :]. group_offsets [groups+1], group_expert [groups], row_index
// [M]: i32 device arrays (typically built on the device from the router).
[[nodiscard]] absl::Status MxFp4GroupedMatMul(const float* x, int64_t in, const uint8_t* codes,
                                              const uint8_t* scales, int64_t out, int groups,
                                              const int32_t* group_offsets, const int32_t* group_expert,
                                              const int32_t* row_index, float* y, cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_MXFP4_CUH_
