// Dense projections through cuBLAS with fp32 accumulation: y = x W^T
// (x [T, in], W [out, in], y [T, out], row-major), in f32 (no TF32: the
// handle's math mode is pedantic) or bf16 inputs with f32 output, plus the
// f32 -> bf16 (round to nearest even) conversion for activations and weights.
//
// Blas owns a cuBLAS handle (RAII, move-only); it is thread-compatible (one
// per thread or stream owner). Device pointers throughout.
#ifndef RETORT_MODEL_KERNELS_CUDA_DENSE_GEMM_CUH_
#define RETORT_MODEL_KERNELS_CUDA_DENSE_GEMM_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

struct cublasContext;

namespace retort::cuda {

class Blas {
 public:
  Blas() = default;
  ~Blas();
  Blas(Blas&& o) noexcept : h_(o.h_) { o.h_ = nullptr; }
  Blas& operator=(Blas&& o) noexcept;
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  [[nodiscard]] static absl::StatusOr<Blas> Create();
  cublasContext* get() const { return h_; }

 private:
  cublasContext* h_ = nullptr;
};

// cpu::MatMul on the device (f32 in, f32 out, fp32 accumulation, no TF32).
[[nodiscard]] absl::Status MatMulF32(const Blas& blas, const float* x, int64_t T, int64_t in, const float* w,
                                     int64_t out, float* y, cudaStream_t stream);

// bf16 x [T, in] and W [out, in] (uint16 bit patterns), f32 y, fp32 accumulation.
[[nodiscard]] absl::Status MatMulBf16(const Blas& blas, const uint16_t* x, int64_t T, int64_t in, const uint16_t* w,
                                      int64_t out, float* y, cudaStream_t stream);

// The grouped output projection (V4_SPEC.md §2.2): x [T, G * per] (row
// stride ldx >= G * per), w [G, dg, per]; y [T, G * dg] with
// y[t, g*dg + j] = sum_i x[t, g*per + i] * w[g, j, i]. One strided-batched
// GEMM; f32 (pedantic) or bf16 inputs with f32 output.
[[nodiscard]] absl::Status GroupedProjectionF32(const Blas& blas, const float* x, int64_t T, int64_t ldx, int G,
                                                int64_t per, const float* w, int64_t dg, float* y,
                                                cudaStream_t stream);
[[nodiscard]] absl::Status GroupedProjectionBf16(const Blas& blas, const uint16_t* x, int64_t T, int64_t ldx, int G,
                                                 int64_t per, const uint16_t* w, int64_t dg, float* y,
                                                 cudaStream_t stream);

// dst[i] = bf16(src[i]) rounding to nearest even (NaN stays NaN).
[[nodiscard]] absl::Status F32ToBf16(const float* src, int64_t n, uint16_t* dst, cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_DENSE_GEMM_CUH_
