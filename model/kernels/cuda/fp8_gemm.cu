// The 1 x 128 activation quantizer (one warp per block, four values a lane)
// and the cuBLASLt block-scaled FP8 plan. See fp8_gemm.cuh.
#include "model/kernels/cuda/fp8_gemm.cuh"

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kBlock = 128;
constexpr float kE4M3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;  // V4_SPEC: amax floored at 1e-4
constexpr size_t kWorkspaceBytes = kFp8GemmWorkspaceBytes;

// The block scale from its amax; the host twin in the test computes the same
// expressions (IEEE division, frexp), so the scales agree bit for bit.
__device__ __forceinline__ float BlockScale(float amax, Fp8ScaleRule rule) {
  if (rule == Fp8ScaleRule::kPow2) return internal::Fp8Pow2Scale(amax);
  return fmaxf(amax, kAmaxFloor) / kE4M3Max;
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
  bool owns_workspace = true;
  ~Plan() {
    if (workspace && owns_workspace) cudaFree(workspace);
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
  return Create(T, in, out, output, nullptr);
}

absl::StatusOr<Fp8BlockGemm> Fp8BlockGemm::Create(int64_t T, int64_t in, int64_t out, Fp8GemmOutput output,
                                                  void* workspace) {
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
  if (workspace) {
    plan->workspace = workspace;
    plan->owns_workspace = false;
  } else {
    RETORT_CUDA_RETURN(cudaMalloc(&plan->workspace, kWorkspaceBytes));
  }
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


// ---- FP8 weights: block quantizer, activation quant-dequant, few-row GEMM ----

namespace {

// One CTA (256 threads) per 128 x 128 block; cpu::QuantizeFp8Blocks's math.
__global__ void Fp8QuantizeWeightsKernel(const float* __restrict__ w, int64_t out, int64_t in,
                                         uint8_t* __restrict__ codes, float* __restrict__ scales) {
  __shared__ float red[32];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBlock, c0 = static_cast<int64_t>(blockIdx.y) * kBlock;
  const int64_t rows = (out - r0 < kBlock ? out - r0 : kBlock), cols = (in - c0 < kBlock ? in - c0 : kBlock);
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < rows * cols; i += blockDim.x)
    amax = fmaxf(amax, fabsf(w[(r0 + i / cols) * in + c0 + i % cols]));
  amax = internal::BlockMax(amax, red);
  float scale = 1.0f;
  if (amax > 0.0f) {  // PowerOfTwoScale(amax, 448): 2^ceil(log2(amax / 448)), exponent clamped to E8M0's [1, 254]
    int e = 0;
    const float m = frexpf(amax / kE4M3Max, &e);
    const int exponent = min(max((m == 0.5f ? e - 1 : e) + 127, 1), 254);
    scale = __int_as_float(exponent << 23);
  }
  if (threadIdx.x == 0) scales[blockIdx.x * gridDim.y + blockIdx.y] = scale;
  for (int64_t i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int64_t at = (r0 + i / cols) * in + c0 + i % cols;
    codes[at] = __nv_cvt_float_to_fp8(w[at] / scale, __NV_SATFINITE, __NV_E4M3);
  }
}

// One warp per (row, 128-block of a group), four values a lane.
__global__ void Fp8QuantDequantKernel(const float* __restrict__ x, int64_t T, int64_t in, int64_t group_in,
                                      uint16_t* __restrict__ xq) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t per_group = (group_in + kBlock - 1) / kBlock, per_row = (in / group_in) * per_group;
  if (w >= T * per_row) return;
  const int64_t t = w / per_row, b = w % per_row;
  const int64_t k0 = (b / per_group) * group_in + (b % per_group) * kBlock;
  const int64_t k1 = min(k0 + kBlock, (b / per_group + 1) * group_in);
  float v[4];
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + 4 * lane + j;
    v[j] = k < k1 ? x[t * in + k] : 0.0f;
    amax = fmaxf(amax, fabsf(v[j]));
  }
  const float s = internal::Fp8Pow2Scale(internal::WarpMax(amax));
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + 4 * lane + j;
    if (k < k1) xq[t * in + k] = internal::ExactBf16Bits(internal::Fp8RoundTrip(v[j], s));
  }
}

// 16 e4m3 weights (one 16-byte load) -> floats.
__device__ __forceinline__ void DecodeE4M3x16(const uint4& q, float* f) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 lo = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(
        static_cast<__nv_fp8x2_storage_t>(words[i] & 0xffffu), __NV_E4M3)));
    const float2 hi = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(
        static_cast<__nv_fp8x2_storage_t>(words[i] >> 16), __NV_E4M3)));
    f[4 * i] = lo.x, f[4 * i + 1] = lo.y, f[4 * i + 2] = hi.x, f[4 * i + 3] = hi.y;
  }
}
// 16 bf16 (two 16-byte loads) -> floats.
__device__ __forceinline__ void LoadBf16x16(const uint16_t* p, float* f) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(p)), b = __ldg(reinterpret_cast<const uint4*>(p) + 1);
  const uint32_t words[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    f[2 * i] = __uint_as_float(words[i] << 16);
    f[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// 16 f32 -> floats rounded to bf16 (round to nearest even, as F32ToBf16).
__device__ __forceinline__ void LoadF32AsBf16x16(const float* p, float* f) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p) + i);
    f[4 * i] = __bfloat162float(__float2bfloat16_rn(v.x));
    f[4 * i + 1] = __bfloat162float(__float2bfloat16_rn(v.y));
    f[4 * i + 2] = __bfloat162float(__float2bfloat16_rn(v.z));
    f[4 * i + 3] = __bfloat162float(__float2bfloat16_rn(v.w));
  }
}

// 16 weights of a row: one 16-byte load of e4m3, or two of bf16.
template <bool kFp8W>
struct WeightChunk {
  uint4 v[kFp8W ? 1 : 2];
  __device__ __forceinline__ void Load(const uint8_t* row, int64_t c) {
    const uint4* p = reinterpret_cast<const uint4*>(row) + (kFp8W ? c : 2 * c);
    v[0] = __ldg(p);
    if constexpr (!kFp8W) v[1] = __ldg(p + 1);
  }
  __device__ __forceinline__ void Decode(float* f) const {
    if constexpr (kFp8W) {
      DecodeE4M3x16(v[0], f);
    } else {
      const uint32_t words[8] = {v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        f[2 * i] = __uint_as_float(words[i] << 16);
        f[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
      }
    }
  }
};

// Note [Few-row GEMM layout]
// A warp owns R output rows (R = 2 or 4, aligned: same 128-row scale block,
// same group) and a share of their K: lane j of the `wpr` warps of a row set
// takes 16-value chunks j, j + 32 wpr, ... (coalesced 16-byte weight loads,
// two chunks of each row in flight). Each chunk lies inside one 128-block, so
// an FP8 chunk's dot product is scaled once (bf16 weights have no scales).
// Lane sums reduce by shuffles, the set's warps through shared memory in a
// fixed order. TT rows of x per pass share every weight load. x is bf16
// (FP8: quant-dequantized activations), or f32 rounded to bf16 on load (bf16
// weights: the cuBLAS bf16 GEMM's inputs). A row's sum does not depend on R,
// TT or the other rows: every output is one fixed sequence of operations.
template <int TT, int R, bool kFp8W, bool kF32X>
__global__ void __launch_bounds__(256) FewRowMatMulKernel(const void* __restrict__ xv, int64_t T, int64_t ldx,
                                                          const uint8_t* __restrict__ w,
                                                          const float* __restrict__ w_scales, int64_t out, int64_t K,
                                                          int64_t out_per_group, int wpr, float* __restrict__ y) {
  __shared__ float red[8][R][TT];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sets = 8 / wpr, set = warp / wpr, part = warp % wpr;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) * sets + set) * R;
  const int64_t chunks = K / 16, kb_per_row = (K + kBlock - 1) / kBlock, stride = 32 * wpr;
  const int64_t row_bytes = kFp8W ? K : 2 * K;
  float acc[R][TT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[r][t] = 0.0f;
  if (o0 < out) {
    const uint8_t* wr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wr[r] = w + (o0 + r < out ? o0 + r : o0) * row_bytes;
    const float* srow = kFp8W ? w_scales + (o0 / kBlock) * kb_per_row : nullptr;
    const int64_t xoff = (o0 / out_per_group) * K;
    for (int64_t c = part * 32 + lane; c < chunks; c += 2 * stride) {
      const int64_t c2 = c + stride;
      const bool two = c2 < chunks;
      WeightChunk<kFp8W> q[2][R];
#pragma unroll
      for (int r = 0; r < R; ++r) q[0][r].Load(wr[r], c);
      if (two) {
#pragma unroll
        for (int r = 0; r < R; ++r) q[1][r].Load(wr[r], c2);
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        if (u == 1 && !two) break;
        const int64_t cc = u == 0 ? c : c2;
        const float s = kFp8W ? __ldg(srow + (cc * 16) / kBlock) : 1.0f;
        float wv[R][16];
#pragma unroll
        for (int r = 0; r < R; ++r) q[u][r].Decode(wv[r]);
#pragma unroll
        for (int t = 0; t < TT; ++t) {
          if (t >= T) break;
          float xr[16];
          if constexpr (kF32X) LoadF32AsBf16x16(static_cast<const float*>(xv) + t * ldx + xoff + cc * 16, xr);
          else LoadBf16x16(static_cast<const uint16_t*>(xv) + t * ldx + xoff + cc * 16, xr);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float dt = 0.0f;
#pragma unroll
            for (int i = 0; i < 16; ++i) dt = fmaf(wv[r][i], xr[i], dt);
            if constexpr (kFp8W) acc[r][t] = fmaf(dt, s, acc[r][t]);
            else acc[r][t] += dt;
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      const float v = internal::WarpSum(acc[r][t]);
      if (lane == 0) red[warp][r][t] = v;
    }
  __syncthreads();
  const int i = threadIdx.x;
  if (i < sets * R * TT) {
    const int st = i / (R * TT), r = (i / TT) % R, t = i % TT;
    const int64_t o = (static_cast<int64_t>(blockIdx.x) * sets + st) * R + r;
    if (o < out && t < T) {
      float v = 0.0f;
      for (int q = 0; q < wpr; ++q) v += red[st * wpr + q][r][t];
      y[t * out + o] = v;
    }
  }
}

template <int R, bool kFp8W, bool kF32X>
absl::Status LaunchFewRowR(const void* x, int64_t T, int64_t ldx, const uint8_t* w, const float* w_scales,
                           int64_t out, int64_t K, int64_t out_per_group, int wpr, float* y, cudaStream_t stream) {
  const int64_t rows_per_block = R * (8 / wpr);
  const int64_t grid = (out + rows_per_block - 1) / rows_per_block;
  if (grid > INT_MAX) return absl::InvalidArgumentError("few-row GEMM: too large");
  const unsigned g = static_cast<unsigned>(grid);
  const size_t xsize = kF32X ? sizeof(float) : sizeof(uint16_t);
  for (int64_t t0 = 0; t0 < T; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, T - t0);
    const void* xt = static_cast<const uint8_t*>(x) + t0 * ldx * xsize;
    float* yy = y + t0 * out;
    if (n == 1)
      FewRowMatMulKernel<1, R, kFp8W, kF32X><<<g, 256, 0, stream>>>(xt, n, ldx, w, w_scales, out, K, out_per_group, wpr, yy);
    else if (n == 2)
      FewRowMatMulKernel<2, R, kFp8W, kF32X><<<g, 256, 0, stream>>>(xt, n, ldx, w, w_scales, out, K, out_per_group, wpr, yy);
    else if (n <= 4)
      FewRowMatMulKernel<4, R, kFp8W, kF32X><<<g, 256, 0, stream>>>(xt, n, ldx, w, w_scales, out, K, out_per_group, wpr, yy);
    else
      FewRowMatMulKernel<8, R, kFp8W, kF32X><<<g, 256, 0, stream>>>(xt, n, ldx, w, w_scales, out, K, out_per_group, wpr, yy);
    RETORT_CUDA_LAUNCH_CHECK();
  }
  return absl::OkStatus();
}

// rows_per_warp: 2 or 4, or 0 for the rule: 2 (bench/fp8_gemm on an H200:
// 4 rows a warp was 5-17% slower at every decode shape and T = 1, 4, 8).
template <bool kFp8W, bool kF32X>
absl::Status LaunchFewRow(const void* x, int64_t T, int64_t ldx, const uint8_t* w, const float* w_scales, int64_t out,
                          int64_t K, int64_t out_per_group, float* y, int rows_per_warp, cudaStream_t stream) {
  const int64_t chunks = K / 16;
  int wpr = 1;
  while (wpr < 8 && chunks >= 64 * 2 * wpr) wpr *= 2;  // >= 2 chunks a lane
  const bool four_ok = out_per_group == out || out_per_group % 4 == 0;
  int R = rows_per_warp;
  if (R == 0) R = 2;
  if (R != 2 && R != 4) return absl::InvalidArgumentError(absl::StrCat("few-row GEMM: rows_per_warp ", R));
  if (R == 4 && !four_ok) return absl::InvalidArgumentError("few-row GEMM: 4 rows a warp would straddle groups");
  if (R == 4) return LaunchFewRowR<4, kFp8W, kF32X>(x, T, ldx, w, w_scales, out, K, out_per_group, wpr, y, stream);
  return LaunchFewRowR<2, kFp8W, kF32X>(x, T, ldx, w, w_scales, out, K, out_per_group, wpr, y, stream);
}

}  // namespace

absl::Status Fp8QuantizeWeights(const float* w, int64_t out, int64_t in, uint8_t* codes, float* scales,
                                cudaStream_t stream) {
  if (out <= 0 || in <= 0) return absl::InvalidArgumentError(absl::StrCat("FP8 weights: shape [", out, ", ", in, "]"));
  const int64_t br = (out + kBlock - 1) / kBlock, bc = (in + kBlock - 1) / kBlock;
  if (br > INT_MAX || bc > 65535) return absl::InvalidArgumentError("FP8 weights: too large");
  Fp8QuantizeWeightsKernel<<<dim3(static_cast<unsigned>(br), static_cast<unsigned>(bc)), 256, 0, stream>>>(
      w, out, in, codes, scales);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status Fp8QuantDequant(const float* x, int64_t T, int64_t in, int64_t group_in, uint16_t* xq,
                             cudaStream_t stream) {
  if (T < 0 || in <= 0 || group_in <= 0 || in % group_in != 0)
    return absl::InvalidArgumentError(absl::StrCat("FP8 quant-dequant: T = ", T, ", in = ", in,
                                                   ", group_in = ", group_in, " (in % group_in must be 0)"));
  if (T == 0) return absl::OkStatus();
  const int64_t warps = T * (in / group_in) * ((group_in + kBlock - 1) / kBlock);
  const int64_t grid = (warps + 7) / 8;
  if (grid > INT_MAX) return absl::InvalidArgumentError("FP8 quant-dequant: too large");
  Fp8QuantDequantKernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(x, T, in, group_in, xq);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status Fp8MatMulRows(const uint16_t* xq, int64_t T, int64_t ldx, const uint8_t* w, const float* w_scales,
                           int64_t out, int64_t K, int64_t out_per_group, float* y, cudaStream_t stream,
                           int rows_per_warp) {
  if (T < 0 || out <= 0 || K <= 0 || K % 16 != 0 || ldx % 8 != 0 || out_per_group <= 0 || out % out_per_group != 0 ||
      (out_per_group != out && out_per_group % 2 != 0) || ldx < (out / out_per_group) * K)
    return absl::InvalidArgumentError(absl::StrCat("FP8 few-row GEMM: T = ", T, ", ldx = ", ldx, ", out = ", out,
                                                   ", K = ", K, ", out_per_group = ", out_per_group,
                                                   " (K % 16 == 0, ldx % 8 == 0, groups of an even row count)"));
  if (reinterpret_cast<uintptr_t>(xq) % 16 != 0 || reinterpret_cast<uintptr_t>(w) % 16 != 0)
    return absl::InvalidArgumentError("FP8 few-row GEMM: xq and w must be 16-byte aligned");
  if (T == 0) return absl::OkStatus();
  return LaunchFewRow<true, false>(xq, T, ldx, w, w_scales, out, K, out_per_group, y, rows_per_warp, stream);
}

absl::Status Bf16MatMulRows(const float* x, int64_t T, int64_t ldx, const uint16_t* w, int64_t out, int64_t K,
                            float* y, cudaStream_t stream, int rows_per_warp) {
  if (T < 0 || out <= 0 || K <= 0 || K % 16 != 0 || ldx % 4 != 0 || ldx < K)
    return absl::InvalidArgumentError(absl::StrCat("bf16 few-row GEMM: T = ", T, ", ldx = ", ldx, ", out = ", out,
                                                   ", K = ", K, " (K % 16 == 0, ldx % 4 == 0, ldx >= K)"));
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(w) % 16 != 0)
    return absl::InvalidArgumentError("bf16 few-row GEMM: x and w must be 16-byte aligned");
  if (T == 0) return absl::OkStatus();
  return LaunchFewRow<false, true>(x, T, ldx, reinterpret_cast<const uint8_t*>(w), nullptr, out, K, out, y, rows_per_warp,
                                   stream);
}

}  // namespace retort::cuda
