// FP8 block-scaled dense projections (V4's FP8 dense weights, DeepSeek
// layout): y [T, out] = dequant(x) dequant(W)^T with
//   W: e4m3 [out, in], one f32 scale per 128 x 128 block,
//      w_scales [ceil(out/128), in/128] row-major (the checkpoint's order;
//      E8M0 checkpoint scales are converted to f32 once, at load);
//   x: e4m3 [Tp, in] quantized per 1 x 128 block along in by
//      Fp8QuantizeActivations, x_scales stored "outer-dim major":
//      x_scales[kb * Tp + t] (cuBLASLt's VEC128_32F order), where
//      Tp = Fp8ActScaleStride(T) = T rounded up to a multiple of 4: rows
//      T..Tp-1 are padding (zero codes, unit scales, written by the quantizer)
//      because cuBLASLt has no block-scaled algorithm for other row counts;
//   y: [Tp, out]; rows T..Tp-1 come out zero.
// The product runs in cuBLASLt (CUDA 12.9+ on sm_90: A scale mode
// BLK128x128_32F, B scale mode VEC128_32F, fp32 accumulation promoted per
// 128-K block, no fast accumulation) — no hand-written kernel is needed.
//
// Fp8BlockGemm is a plan: descriptors and the heuristic's algorithm are built
// once for (T, in, out, output type) and reused; it owns a cuBLASLt handle and
// a workspace (RAII, move-only, thread-compatible). Device pointers throughout.
#ifndef RETORT_MODEL_KERNELS_CUDA_FP8_GEMM_CUH_
#define RETORT_MODEL_KERNELS_CUDA_FP8_GEMM_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace retort::cuda {

// Padded row count Tp of x_fp8 / y and leading dimension of x_scales: T
// rounded up to a multiple of 4.
inline int64_t Fp8ActScaleStride(int64_t T) { return (T + 3) / 4 * 4; }

// How the per-block activation scale is chosen from the block's amax (floored
// at 1e-4, V4_SPEC §FP8): kAmax: amax / 448 exactly; kPow2: 2^ceil(log2(amax /
// 448)) (V4 deployment, "scale_fmt ue8m0"). Either way |x / scale| <= 448.
enum class Fp8ScaleRule { kAmax, kPow2 };

// x [T, in] (f32, or bf16 bit patterns) -> x_fp8 [Tp, in] e4m3 (round to
// nearest even, saturating) and x_scales [in/128, Tp] f32 (padding rows:
// zero codes, scale 1). in % 128 == 0. Equals the host's
// F32ToE4M3(x / scale) bit for bit.
[[nodiscard]] absl::Status Fp8QuantizeActivations(const float* x, int64_t T, int64_t in, Fp8ScaleRule rule,
                                                  uint8_t* x_fp8, float* x_scales, cudaStream_t stream);
[[nodiscard]] absl::Status Fp8QuantizeActivationsBf16(const uint16_t* x_bf16, int64_t T, int64_t in, Fp8ScaleRule rule,
                                                      uint8_t* x_fp8, float* x_scales, cudaStream_t stream);

enum class Fp8GemmOutput { kF32, kBf16 };

inline constexpr size_t kFp8GemmWorkspaceBytes = size_t{32} << 20;

class Fp8BlockGemm {
 public:
  Fp8BlockGemm();
  ~Fp8BlockGemm();
  Fp8BlockGemm(Fp8BlockGemm&&) noexcept;
  Fp8BlockGemm& operator=(Fp8BlockGemm&&) noexcept;
  Fp8BlockGemm(const Fp8BlockGemm&) = delete;
  Fp8BlockGemm& operator=(const Fp8BlockGemm&) = delete;

  // InvalidArgument unless T >= 1, in % 128 == 0 with (in / 128) % 4 == 0
  // (the weight-scale rows 16-byte aligned) and out % 16 == 0; Unimplemented
  // when this cuBLASLt has no algorithm for the combination (e.g. a GPU other
  // than sm_90, or a library before 12.9).
  [[nodiscard]] static absl::StatusOr<Fp8BlockGemm> Create(int64_t T, int64_t in, int64_t out, Fp8GemmOutput output);
  // The same, using a caller's device workspace (>= kFp8GemmWorkspaceBytes,
  // outliving the plan, not used concurrently by another stream) instead of
  // allocating one: for plan caches with many row counts.
  [[nodiscard]] static absl::StatusOr<Fp8BlockGemm> Create(int64_t T, int64_t in, int64_t out, Fp8GemmOutput output,
                                                           void* workspace);

  // y: [Tp, out] f32 or bf16 as planned. Inputs as described at the top.
  [[nodiscard]] absl::Status Run(const uint8_t* x_fp8, const float* x_scales, const uint8_t* w_fp8,
                                 const float* w_scales, void* y, cudaStream_t stream) const;

 private:
  struct Plan;
  std::unique_ptr<Plan> plan_;
};


// ---- FP8 weights at decode row counts, and weight quantization ----------
//
// W e4m3 [out, K] with f32 block scales w_scales [ceil(out/128), ceil(K/128)]
// (the 128 x 128 grid; partial edge blocks allowed). The product below is the
// same block-scaled math as Fp8BlockGemm for the few-row case cuBLASLt serves
// badly (decode: T = 1..16): activations quantized per 1 x 128 block, e4m3
// weights decoded in registers, fp32 accumulation. Deterministic for a fixed
// shape (no atomics; fixed-order reductions).

// w [out, in] f32 -> codes e4m3 [out, in] and f32 scales [ceil(out/128),
// ceil(in/128)]: per 128 x 128 block scale 2^ceil(log2(amax/448)) (1 for an
// all-zero block), codes = e4m3(w / scale) round-to-nearest-even,
// saturating. Equals cpu::QuantizeFp8Blocks (with its E8M0 scales as f32) bit
// for bit, so re-quantizing weights that came from an FP8 checkpoint is exact.
[[nodiscard]] absl::Status Fp8QuantizeWeights(const float* w, int64_t out, int64_t in, uint8_t* codes, float* scales,
                                              cudaStream_t stream);

// x [T, in] f32 -> xq [T, in] bf16 holding the dequantized FP8 activation
// e4m3(x / s) * s exactly (e4m3 times a power of two is exact in bf16), with
// s = 2^ceil(log2(max(amax, 1e-4) / 448)) per 1 x 128 block. Blocks restart at
// every multiple of `group_in` (in % group_in == 0; group_in = in for a plain
// projection; a grouped projection's group width otherwise) and the last
// block of a group may be partial. On full blocks the values equal
// Fp8QuantizeActivations(kPow2)'s code * scale.
[[nodiscard]] absl::Status Fp8QuantDequant(const float* x, int64_t T, int64_t in, int64_t group_in, uint16_t* xq,
                                           cudaStream_t stream);

// y [T, out] f32 = xq W^T, where output row o reads the K inputs starting at
// column (o / out_per_group) * K of xq's row (xq [T, ldx] bf16 from
// Fp8QuantDequant; a plain projection has out_per_group = out, ldx = K).
// K % 16 == 0, ldx % 8 == 0, xq and w 16-byte aligned, out % out_per_group
// == 0. Any T >= 0 (passes of up to 8 rows; each pass reads W once).
// rows_per_warp (2 or 4; 0: chosen by shape) only changes the schedule, not
// a bit of y.
[[nodiscard]] absl::Status Fp8MatMulRows(const uint16_t* xq, int64_t T, int64_t ldx, const uint8_t* w,
                                         const float* w_scales, int64_t out, int64_t K, int64_t out_per_group,
                                         float* y, cudaStream_t stream, int rows_per_warp = 0);

// The same few-row kernel for bf16 weights W [out, K]: y [T, out] f32 = bf16(x)
// W^T, x [T, ldx] f32 rounded to bf16 on load (round to nearest even), fp32
// accumulation: the product cuBLAS's bf16 GEMM computes on F32ToBf16(x), in
// one launch and without split-K. K % 16 == 0, ldx % 4 == 0, x and w 16-byte
// aligned.
[[nodiscard]] absl::Status Bf16MatMulRows(const float* x, int64_t T, int64_t ldx, const uint16_t* w, int64_t out,
                                          int64_t K, float* y, cudaStream_t stream, int rows_per_warp = 0);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_FP8_GEMM_CUH_
