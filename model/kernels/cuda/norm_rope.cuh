// CUDA twins of the CPU elementwise/row ops: embedding gather into mHC
// streams, RMSNorm (weighted / unweighted) and interleaved RoPE and its
// inverse on trailing dims. All pointers are device pointers, row-major and
// contiguous; launchers enqueue on `stream` and return the launch status.
#ifndef RETORT_MODEL_KERNELS_CUDA_NORM_ROPE_CUH_
#define RETORT_MODEL_KERNELS_CUDA_NORM_ROPE_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace retort::cuda {

// X[r, j, :] = embed[tokens[r], :] for j < hc (Model::Step's stream init).
// tokens: i64 [rows] (must be in [0, vocab): not checked on the device).
[[nodiscard]] absl::Status EmbedToStreams(const float* embed, const int64_t* tokens, int64_t rows, int64_t d, int hc,
                                          float* X, cudaStream_t stream);

// y[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * (weight ? weight : 1), x: [T, D]
// (cpu::RmsNorm). In place allowed.
[[nodiscard]] absl::Status RmsNorm(const float* x, int64_t T, int64_t D, const float* weight, float eps, float* y,
                                   cudaStream_t stream);

// RmsNorm that also writes xq [T, D] bf16 = the FP8 activation quantization
// of its output (Fp8QuantDequant(y, T, D, D): 1 x 128 blocks, the last one
// possibly partial), bit for bit: the few-row FP8 GEMM's input, without a
// separate quantization launch.
[[nodiscard]] absl::Status RmsNormQuant(const float* x, int64_t T, int64_t D, const float* weight, float eps, float* y,
                                        uint16_t* xq, cudaStream_t stream);

// RmsNorm of each head row of x [rows, heads, D] (weight [D] or nullptr),
// then RoPE (sign +1) on its trailing rope_dim dims at positions[row]: the
// same values as RmsNorm then RopeAtPositions, in one launch. In place
// allowed.
[[nodiscard]] absl::Status RmsNormRope(const float* x, int64_t rows, int64_t heads, int64_t D, const float* weight,
                                       float eps, int64_t rope_dim, const int64_t* positions, const float* inv_freq,
                                       float* y, cudaStream_t stream);

// Interleaved RoPE on the trailing `rope_dim` dims of x [rows, heads, dim]:
// row r is at position positions[r] (i64, device), pair i rotates by
// angle = positions[r] * inv_freq[i] computed in fp32 (as ModelRunner::Rope);
// sign +1 rotates, -1 applies the inverse (cpu::ApplyRope).
[[nodiscard]] absl::Status RopeAtPositions(float* x, int64_t rows, int64_t heads, int64_t dim, int64_t rope_dim,
                                           const int64_t* positions, const float* inv_freq, float sign,
                                           cudaStream_t stream);

// SwiGLU with the V4 clamps: h = silu(min(g, limit)) * clamp(u, -limit, limit)
// element-wise over n values (limit <= 0: no clamp). h may alias g or u.
[[nodiscard]] absl::Status SwiGlu(const float* g, const float* u, int64_t n, float limit, float* h,
                                  cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_NORM_ROPE_CUH_
