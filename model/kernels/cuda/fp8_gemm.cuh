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

  // y: [Tp, out] f32 or bf16 as planned. Inputs as described at the top.
  [[nodiscard]] absl::Status Run(const uint8_t* x_fp8, const float* x_scales, const uint8_t* w_fp8,
                                 const float* w_scales, void* y, cudaStream_t stream) const;

 private:
  struct Plan;
  std::unique_ptr<Plan> plan_;
};

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_FP8_GEMM_CUH_
