#include "model/kernels/cuda/dense_gemm.cuh"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"

namespace retort::cuda {
namespace {

absl::Status BlasStatus(cublasStatus_t st, const char* call, const char* file, int line) {
  if (st == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(call, " failed at ", file, ":", line, ": ", cublasGetStatusName(st), " (",
                                          cublasGetStatusString(st), ")"));
}
#define RETORT_CUBLAS_RETURN(call)                                                 \
  do {                                                                             \
    ::absl::Status s_ = BlasStatus((call), #call, __FILE__, __LINE__);             \
    if (!s_.ok()) return s_;                                                       \
  } while (0)

__global__ void F32ToBf16Kernel(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const __nv_bfloat16 b = __float2bfloat16_rn(src[i]);
    dst[i] = *reinterpret_cast<const uint16_t*>(&b);
  }
}

absl::Status CheckDims(int64_t T, int64_t in, int64_t out) {
  if (T > INT_MAX || in > INT_MAX || out > INT_MAX)
    return absl::InvalidArgumentError(absl::StrCat("GEMM dims exceed int: T=", T, " in=", in, " out=", out));
  return absl::OkStatus();
}

}  // namespace

Blas::~Blas() {
  if (h_) cublasDestroy(h_);
}
Blas& Blas::operator=(Blas&& o) noexcept {
  if (this != &o) {
    if (h_) cublasDestroy(h_);
    h_ = o.h_;
    o.h_ = nullptr;
  }
  return *this;
}
absl::StatusOr<Blas> Blas::Create() {
  Blas b;
  RETORT_CUBLAS_RETURN(cublasCreate(&b.h_));
  // Pedantic: no TF32 or reduced-precision shortcuts for f32 GEMMs.
  RETORT_CUBLAS_RETURN(cublasSetMathMode(b.h_, CUBLAS_PEDANTIC_MATH));
  return b;
}

absl::Status MatMulF32(const Blas& blas, const float* x, int64_t T, int64_t in, const float* w, int64_t out, float* y,
                       cudaStream_t stream) {
  if (absl::Status s = CheckDims(T, in, out); !s.ok()) return s;
  if (T == 0 || out == 0) return absl::OkStatus();
  if (in == 0) {
    RETORT_CUDA_RETURN(cudaMemsetAsync(y, 0, sizeof(float) * T * out, stream));
    return absl::OkStatus();
  }
  RETORT_CUBLAS_RETURN(cublasSetStream(blas.get(), stream));
  const float alpha = 1.0f, beta = 0.0f;
  // Column-major view: y^T [out, T] = W [out, in] * x^T [in, T].
  RETORT_CUBLAS_RETURN(cublasSgemm(blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(T),
                                   static_cast<int>(in), &alpha, w, static_cast<int>(in), x, static_cast<int>(in),
                                   &beta, y, static_cast<int>(out)));
  return absl::OkStatus();
}

absl::Status MatMulBf16(const Blas& blas, const uint16_t* x, int64_t T, int64_t in, const uint16_t* w, int64_t out,
                        float* y, cudaStream_t stream) {
  if (absl::Status s = CheckDims(T, in, out); !s.ok()) return s;
  if (T == 0 || out == 0) return absl::OkStatus();
  if (in == 0) {
    RETORT_CUDA_RETURN(cudaMemsetAsync(y, 0, sizeof(float) * T * out, stream));
    return absl::OkStatus();
  }
  RETORT_CUBLAS_RETURN(cublasSetStream(blas.get(), stream));
  const float alpha = 1.0f, beta = 0.0f;
  RETORT_CUBLAS_RETURN(cublasGemmEx(blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(T),
                                    static_cast<int>(in), &alpha, w, CUDA_R_16BF, static_cast<int>(in), x, CUDA_R_16BF,
                                    static_cast<int>(in), &beta, y, CUDA_R_32F, static_cast<int>(out),
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status GroupedProjectionF32(const Blas& blas, const float* x, int64_t T, int64_t ldx, int G, int64_t per,
                                  const float* w, int64_t dg, float* y, cudaStream_t stream) {
  if (absl::Status s = CheckDims(T, ldx, G * dg); !s.ok()) return s;
  if (T == 0 || G == 0 || dg == 0) return absl::OkStatus();
  RETORT_CUBLAS_RETURN(cublasSetStream(blas.get(), stream));
  const float alpha = 1.0f, beta = 0.0f;
  // Per group, column-major: y_g^T [dg, T] (ld G*dg) = W_g [dg, per] * x_g^T [per, T] (ld ldx).
  RETORT_CUBLAS_RETURN(cublasSgemmStridedBatched(
      blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(dg), static_cast<int>(T), static_cast<int>(per), &alpha,
      w, static_cast<int>(per), dg * per, x, static_cast<int>(ldx), per, &beta, y, static_cast<int>(G * dg), dg, G));
  return absl::OkStatus();
}

absl::Status GroupedProjectionBf16(const Blas& blas, const uint16_t* x, int64_t T, int64_t ldx, int G, int64_t per,
                                   const uint16_t* w, int64_t dg, float* y, cudaStream_t stream) {
  if (absl::Status s = CheckDims(T, ldx, G * dg); !s.ok()) return s;
  if (T == 0 || G == 0 || dg == 0) return absl::OkStatus();
  RETORT_CUBLAS_RETURN(cublasSetStream(blas.get(), stream));
  const float alpha = 1.0f, beta = 0.0f;
  RETORT_CUBLAS_RETURN(cublasGemmStridedBatchedEx(
      blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(dg), static_cast<int>(T), static_cast<int>(per), &alpha,
      w, CUDA_R_16BF, static_cast<int>(per), dg * per, x, CUDA_R_16BF, static_cast<int>(ldx), per, &beta, y,
      CUDA_R_32F, static_cast<int>(G * dg), dg, G, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status F32ToBf16(const float* src, int64_t n, uint16_t* dst, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65535);
  F32ToBf16Kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(src, n, dst);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
