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
// Two paths, same weights:
//  - MxFp4MatMul / MxFp4GroupedMatMul: the decode (GEMV / small-M) path on
//    CUDA cores, f32 x; it reads W once per 8 rows of x.
//  - MxFp4MatMulTensorCore / MxFp4GroupedMatMulTensorCore: prefill-sized M on
//    the tensor cores (mma.sync m16n8k16 bf16, fp32 accumulation). x, code
//    and scale tiles go to shared memory by cp.async (3-4 stages); the
//    codes are decoded e2m1 x E8M0 -> bf16 (exact) either by each warp into
//    its own B fragments in registers, or (k128x256SmemDecode) once per CTA
//    into a double-buffered 32-k slice of bf16 W in shared memory. Dequantized
//    weights never exist in global memory.
//    x is bf16: deployment numerics (activations are bf16 there); the result
//    equals cpu::MxFp4MatMul on bf16-rounded x up to fp32 summation order.
//    See Note [MXFP4 MMA layout] in mxfp4.cu.
//
// Dispatch rule (which M uses which kernel), rows = rows per expert group,
// measured on an H200 with bench/mxfp4_gemm at the V4 expert shapes:
//   rows <  kMxFp4TensorCoreMinRows (16) -> the CUDA-core kernels (at 16 rows
//     they take ~45 us for gate/up, the tensor-core kernel ~53 us at 16..256
//     rows, where it is bound by the short grid, not by arithmetic);
//   rows >= 16 -> the tensor-core kernels with tile (kAuto):
//     k128x256SmemDecode when rows >= 128 and its grid covers >= 90% of the
//       SMs (~245-253 TFLOP/s at M = 2048..8192; W decoded once per CTA);
//     else 64 x 256 when its grid covers >= 90% of the SMs (two CTAs/SM;
//       best at M ~ 512..1024 and for grouped experts of ~10..100 rows);
//     else 64 x 64 (three CTAs/SM; M ~ 16..512 on one expert matrix).
//   128 x 256 (register decode, ~232 TFLOP/s at M = 8192) and 64 x 128 are
//   kept for tests and benchmarks only.
// bench/mxfp4_gemm measures both against cuBLAS bf16 on dequantized weights.
//
// Decode kernels (f32 x, exact products; MxFp4GroupedGateUp and
// MxFp4GroupedMatMulDecode below), measured on an H200 (HBM copy 4267 GB/s)
// with bench/mxfp4_gemm --decode at the V4-Flash expert shapes, 256 experts,
// 6 routed per token, bytes = codes + scales of the experts touched:
//   tokens  rows/expert  gate/up old -> new (%HBM)   down old -> new (%HBM)
//     1        1          66.8 -> 30.4 us (19 -> 41%)  35.8 -> 17.3 us (18 -> 36%)
//     8       ~1.1       430 -> 223 us  (22 -> 42%)   242 -> 117 us  (19 -> 40%)
//    64       ~1.9       2197 -> 1000 us (19 -> 42%)  1225 -> 535 us (17 -> 39%)
//   256       ~6.0       5029 -> 1837 us (11 -> 29%)  2648 -> 960 us (10 -> 28%)
// ("old" gate/up = 2 x MxFp4GroupedMatMul + SwiGlu.) Rule, rows = rows per
// expert group, f32 numerics:
//   grouped over an expert stack, rows < kMxFp4TensorCoreMinRows: the decode
//     kernels (2.0-2.8x the CUDA-core MxFp4GroupedMatMul at every row count
//     measured, 1..~6 rows per expert);
//   one expert matrix alone (a grid of only out / 32 or out / 64 CTAs, below
//     the 132 SMs): MxFp4GroupedGateUp still wins (1.3-1.65x at 1..64 rows),
//     but for the down shape MxFp4MatMul / MxFp4GroupedMatMul is faster
//     (the decode kernel is 0.77-0.92x there; it needs >= 3 groups to fill
//     the GPU).
// With bf16 activations the tensor-core kernels above remain the choice from
// 16 rows per expert (and Moe()'s 4-row grouped rule); the decode kernels were
// not measured against them at 4..16 rows.
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

// Decode-shaped grouped products (1..16 rows per expert) on the tensor cores
// with exact f32 x: x is split into three bf16 terms (hi + mid + lo == x), so
// every product is exact and the result equals cpu::MxFp4MatMul up to fp32
// summation order, like MxFp4GroupedMatMul (Note [MXFP4 decode MMA] in
// mxfp4.cu). Same group interface as MxFp4GroupedMatMul: group g multiplies
// permuted rows m in [group_offsets[g], group_offsets[g+1]), reading x row
// row_index[m] (row_index == nullptr: row m), by expert group_expert[g], and
// writes output row m. Groups with no rows cost one CTA exit. Each expert's
// W is read once per pass of 8 rows; any row count is correct.
// in % 32 == 0 (else InvalidArgument); any out >= 0. x and codes 16-byte
// aligned. group_offsets / group_expert: device i32, required when groups > 0.
// Deterministic and batch-invariant: output row m depends only on x row
// row_index[m] and the expert's W, bit for bit (not on the other rows, groups
// or the launch), and no atomics are used.

// h [M, inter] = SwiGLU(x W1^T, x W3^T) with the V4 clamps, as cuda::SwiGlu /
// ModelRunner::MoeBlock: h = silu(min(g, limit)) * clamp(u, -limit, limit)
// (limit <= 0: no clamp). W1 and W3: codes [E, inter, in/2], scales
// [E, inter, in/32]. One launch; W1 and W3 rows are read once per pass for
// all of a group's rows, and g, u never reach global memory.
[[nodiscard]] absl::Status MxFp4GroupedGateUp(const float* x, int64_t in, const uint8_t* w1_codes,
                                              const uint8_t* w1_scales, const uint8_t* w3_codes,
                                              const uint8_t* w3_scales, int64_t inter, float limit, int groups,
                                              const int32_t* group_offsets, const int32_t* group_expert,
                                              const int32_t* row_index, float* h, cudaStream_t stream);

// y [M, out] = x W^T per group (the down projection: x = h, row_index =
// nullptr); W: codes [E, out, in/2], scales [E, out, in/32].
[[nodiscard]] absl::Status MxFp4GroupedMatMulDecode(const float* x, int64_t in, const uint8_t* codes,
                                                    const uint8_t* scales, int64_t out, int groups,
                                                    const int32_t* group_offsets, const int32_t* group_expert,
                                                    const int32_t* row_index, float* y, cudaStream_t stream);

// Rows per expert group from which the tensor-core kernels win (measured with
// bench/mxfp4_gemm on an H200: see the dispatch rule above).
inline constexpr int64_t kMxFp4TensorCoreMinRows = 16;

// CTA tile of the tensor-core kernels; kAuto picks by the rule above. The
// explicit tiles exist for tests and benchmarks.
enum class MxFp4MmaTile { kAuto, k128x256, k64x256, k64x128, k64x64, k128x256SmemDecode };

// y [T, out] f32 = x [T, in] (bf16 bit patterns) W^T. in % 128 == 0 (else
// InvalidArgument); any out >= 1 and T >= 0. x and codes 16-byte aligned,
// scales 4-byte aligned, y 8-byte aligned. Deterministic for a fixed shape
// and tile.
[[nodiscard]] absl::Status MxFp4MatMulTensorCore(const uint16_t* x_bf16, int64_t T, int64_t in, const uint8_t* codes,
                                                 const uint8_t* scales, int64_t out, float* y, cudaStream_t stream,
                                                 MxFp4MmaTile tile = MxFp4MmaTile::kAuto);

// Grouped over experts with the permutation interface of MxFp4GroupedMatMul
// (group_offsets [groups+1], group_expert [groups], row_index [rows] or
// nullptr, all device i32). `rows` = group_offsets[groups], known on the host
// (tokens x top-k); it only sizes the grid (a wrong value costs speed, not
// correctness). Same shape rules as MxFp4MatMulTensorCore.
[[nodiscard]] absl::Status MxFp4GroupedMatMulTensorCore(const uint16_t* x_bf16, int64_t in, const uint8_t* codes,
                                                        const uint8_t* scales, int64_t out, int groups, int64_t rows,
                                                        const int32_t* group_offsets, const int32_t* group_expert,
                                                        const int32_t* row_index, float* y, cudaStream_t stream,
                                                        MxFp4MmaTile tile = MxFp4MmaTile::kAuto);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_MXFP4_CUH_
