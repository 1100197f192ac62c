// The 1 x 128 activation quantizer (one warp per block, four values a lane)
// and the cuBLASLt block-scaled FP8 plan. See fp8_gemm.cuh.
#include "model/kernels/cuda/fp8_gemm.cuh"

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <climits>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kBlock = 128;
constexpr float kE4M3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;  // V4_SPEC: amax floored at 1e-4
constexpr size_t kWorkspaceBytes = size_t{32} << 20;

// The block scale from its amax; the host twin in the test computes the same
// expressions (IEEE division, frexp), so the scales agree bit for bit.
__device__ __forceinline__ float BlockScale(float amax, Fp8ScaleRule rule) {
  const float r = fmaxf(amax, kAmaxFloor) / kE4M3Max;
  if (rule == Fp8ScaleRule::kAmax) return r;
  int e = 0;
  const float m = frexpf(r, &e);  // r = m * 2^e, m in [0.5, 1)
  return ldexpf(1.0f, m == 0.5f ? e - 1 : e);
}

__device__ __forceinline__ float4 Load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 Load4(const uint16_t* p) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  return make_float4(__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xffff0000u), __uint_as_float(v.y << 16),
                     __uint_as_float(v.y & 0xffff0000u));
}

// grid: (ceil(stride * blocks / 8)), 256 threads; warp w handles block (t, kb)
// with w = kb * stride + t, so the scale stores of a warp row are coalesced.
template <typename X>
__global__ void Fp8QuantizeKernel(const X* __restrict__ x, int64_t T, int64_t in, int64_t stride, Fp8ScaleRule rule,
                                  uint8_t* __restrict__ q, float* __restrict__ scales) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t blocks = in / kBlock;
  if (w >= stride * blocks) return;
  const int64_t kb = w / stride, t = w % stride;
  const int64_t off = t * in + kb * kBlock + 4 * lane;
  if (t >= T) {  // padding row: zero codes, unit scale
    *reinterpret_cast<uint32_t*>(q + off) = 0;
    if (lane == 0) scales[w] = 1.0f;
    return;
  }
  const float4 v = Load4(x + off);
  const float amax = internal::WarpMax(fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
  const float s = BlockScale(amax, rule);
  const uint32_t b0 = __nv_cvt_float_to_fp8(v.x / s, __NV_SATFINITE, __NV_E4M3);
  const uint32_t b1 = __nv_cvt_float_to_fp8(v.y / s, __NV_SATFINITE, __NV_E4M3);
  const uint32_t b2 = __nv_cvt_float_to_fp8(v.z / s, __NV_SATFINITE, __NV_E4M3);
  const uint32_t b3 = __nv_cvt_float_to_fp8(v.w / s, __NV_SATFINITE, __NV_E4M3);
  *reinterpret_cast<uint32_t*>(q + off) = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24);
  if (lane == 0) scales[w] = s;
}

template <typename X>
absl::Status Quantize(const X* x, int64_t T, int64_t in, Fp8ScaleRule rule, uint8_t* q, float* scales,
                      cudaStream_t stream) {
  if (T < 0 || in <= 0 || in % kBlock != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("FP8 activation quantizer: T = ", T, ", in = ", in, " (in must be a positive multiple of 128)"));
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(q) % 4 != 0)
    return absl::InvalidArgumentError("FP8 activation quantizer: x must be 16-byte and x_fp8 4-byte aligned");
  if (T == 0) return absl::OkStatus();
  const int64_t warps = Fp8ActScaleStride(T) * (in / kBlock);
  const int64_t grid = (warps + 7) / 8;
  if (grid > INT_MAX) return absl::InvalidArgumentError("FP8 activation quantizer: too large");
  Fp8QuantizeKernel<X><<<static_cast<unsigned>(grid), 256, 0, stream>>>(x, T, in, Fp8ActScaleStride(T), rule, q,
                                                                         scales);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status LtStatus(cublasStatus_t st, const char* call) {
  if (st == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(call, " failed: ", cublasGetStatusName(st), " (", cublasGetStatusString(st),
                                          ")"));
}
#define RETORT_LT_RETURN(call)                          \
  do {                                                  \
    ::absl::Status s_ = LtStatus((call), #call);        \
    if (!s_.ok()) return s_;                            \
  } while (0)

}  // namespace

absl::Status Fp8QuantizeActivations(const float* x, int64_t T, int64_t in, Fp8ScaleRule rule, uint8_t* x_fp8,
                                    float* x_scales, cudaStream_t stream) {
  return Quantize(x, T, in, rule, x_fp8, x_scales, stream);
}
absl::Status Fp8QuantizeActivationsBf16(const uint16_t* x_bf16, int64_t T, int64_t in, Fp8ScaleRule rule,
                                        uint8_t* x_fp8, float* x_scales, cudaStream_t stream) {
  return Quantize(x_bf16, T, in, rule, x_fp8, x_scales, stream);
}

struct Fp8BlockGemm::Plan {
  cublasLtHandle_t lt = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  void* workspace = nullptr;
  ~Plan() {
    if (workspace) cudaFree(workspace);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (lt) cublasLtDestroy(lt);
  }
};

Fp8BlockGemm::Fp8BlockGemm() = default;
Fp8BlockGemm::~Fp8BlockGemm() = default;
Fp8BlockGemm::Fp8BlockGemm(Fp8BlockGemm&&) noexcept = default;
Fp8BlockGemm& Fp8BlockGemm::operator=(Fp8BlockGemm&&) noexcept = default;

absl::StatusOr<Fp8BlockGemm> Fp8BlockGemm::Create(int64_t T, int64_t in, int64_t out, Fp8GemmOutput output) {
  if (T < 1 || T > INT_MAX || in <= 0 || in > INT_MAX || out <= 0 || out > INT_MAX)
    return absl::InvalidArgumentError(absl::StrCat("FP8 block GEMM: T = ", T, ", in = ", in, ", out = ", out));
  if (in % kBlock != 0 || (in / kBlock) % 4 != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("FP8 block GEMM: in = ", in, " must be a multiple of 512 (128-blocks, scale rows 16-byte aligned)"));
  if (out % 16 != 0) return absl::InvalidArgumentError(absl::StrCat("FP8 block GEMM: out = ", out, " % 16 != 0"));
  auto plan = std::make_unique<Plan>();
  RETORT_LT_RETURN(cublasLtCreate(&plan->lt));
  RETORT_LT_RETURN(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // cuBLASLt is column-major: A = W viewed as [in, out] (op T), B = x viewed
  // as [in, T] (op N), D = y viewed as [out, T] — y row-major [T, out].
  const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
  RETORT_LT_RETURN(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
  RETORT_LT_RETURN(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
  const int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  RETORT_LT_RETURN(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof(a_mode)));
  RETORT_LT_RETURN(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof(b_mode)));
  RETORT_CUDA_RETURN(cudaMalloc(&plan->workspace, kWorkspaceBytes));
  // Placeholder scale pointers (aligned, device) for the heuristic; Run sets the real ones.
  RETORT_LT_RETURN(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &plan->workspace,
                                                  sizeof(void*)));
  RETORT_LT_RETURN(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &plan->workspace,
                                                  sizeof(void*)));
  const cudaDataType_t dtype = output == Fp8GemmOutput::kF32 ? CUDA_R_32F : CUDA_R_16BF;
  RETORT_LT_RETURN(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_8F_E4M3, in, out, in));
  // n = T padded to a multiple of 4: cuBLASLt 13.1 on sm_90 offers no
  // block-scaled algorithm otherwise (seen for T = 1, 7, 19, 111, 989).
  const int64_t n = Fp8ActScaleStride(T);
  RETORT_LT_RETURN(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_8F_E4M3, in, n, in));
  RETORT_LT_RETURN(cublasLtMatrixLayoutCreate(&plan->d, dtype, out, n, out));
  cublasLtMatmulPreference_t pref = nullptr;
  RETORT_LT_RETURN(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = kWorkspaceBytes;
  cublasStatus_t st =
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(plan->lt, plan->desc, plan->a, plan->b, plan->d, plan->d, pref, 1, &result,
                                        &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || (st == CUBLAS_STATUS_SUCCESS && found == 0))
    return absl::UnimplementedError(absl::StrCat(
        "FP8 block GEMM: cuBLASLt ", cublasLtGetVersion(), " has no block-scaled (BLK128x128 x VEC128) e4m3 algorithm ",
        "for T=", T, " in=", in, " out=", out, output == Fp8GemmOutput::kF32 ? " f32" : " bf16", " output here"));
  RETORT_LT_RETURN(st);
  plan->algo = result.algo;
  Fp8BlockGemm g;
  g.plan_ = std::move(plan);
  return g;
}

absl::Status Fp8BlockGemm::Run(const uint8_t* x_fp8, const float* x_scales, const uint8_t* w_fp8,
                               const float* w_scales, void* y, cudaStream_t stream) const {
  if (!plan_) return absl::FailedPreconditionError("FP8 block GEMM: empty plan");
  RETORT_LT_RETURN(
      cublasLtMatmulDescSetAttribute(plan_->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scales, sizeof(w_scales)));
  RETORT_LT_RETURN(
      cublasLtMatmulDescSetAttribute(plan_->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scales, sizeof(x_scales)));
  const float alpha = 1.0f, beta = 0.0f;
  RETORT_LT_RETURN(cublasLtMatmul(plan_->lt, plan_->desc, &alpha, w_fp8, plan_->a, x_fp8, plan_->b, &beta, y, plan_->d,
                                  y, plan_->d, &plan_->algo, plan_->workspace, kWorkspaceBytes, stream));
  return absl::OkStatus();
}

}  // namespace retort::cuda
