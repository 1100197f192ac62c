// CPU reference kernels: the numerical specification of retort's ops.
//
// Plain loops with fp32 accumulation; the matmuls have a fast path (a
// register-tiled AVX2 kernel for dense f32 weights, with AVX-512 tiles of
// identical bits where the CPU has them; a blocked MXFP4 kernel that decodes
// 32-value blocks in registers) tested against the plain loop. Both matmuls
// are batch-invariant: row t of y has the same bits whatever the other rows of
// x, T and the thread count (Note [Batch-invariant MatMul] in the .cc). All
// pointers are row-major and contiguous; shapes are given explicitly.
// Functions are thread-safe and parallelise internally over the default
// ThreadPool.
#ifndef RETORT_MODEL_KERNELS_CPU_CPU_KERNELS_H_
#define RETORT_MODEL_KERNELS_CPU_CPU_KERNELS_H_

#include <cstdint>

namespace retort {
class ThreadPool;
}  // namespace retort

namespace retort::cpu {

// y[t, o] = sum_i x[t, i] * w[o, i]   (x: [T, in], w: [out, in], y: [T, out]).
// Batch-invariant: y[t, o] depends only on x[t, :] and w[o, :], bit for bit.
// (Not OpenBLAS, whose sgemm picks gemv for T = 1 and T- and thread-dependent
// blockings otherwise; the learner's backward GEMMs stay on OpenBLAS.)
void MatMul(const float* x, int64_t T, int64_t in, const float* w, int64_t out, float* y);
// The same with plain loops (the specification MatMul is tested against).
void MatMulReference(const float* x, int64_t T, int64_t in, const float* w, int64_t out, float* y);

// y = x W^T with W in MXFP4: codes [out, in/2] (two e2m1 per byte, low nibble
// first), scales [out, in/32] E8M0. The weights are never expanded in memory:
// each 32-value block is decoded into registers and consumed by all T rows of x.
// in % 32 == 0. Batch-invariant like MatMul.
void MxFp4MatMul(const float* x, int64_t T, int64_t in, const uint8_t* codes, const uint8_t* scales,
                 int64_t out, float* y);
// Dequantizes MXFP4 to f32 [out, in] (reference / tests / QAT; not the hot path).
void DequantizeMxFp4(const uint8_t* codes, const uint8_t* scales, int64_t out, int64_t in, float* w);
// Dequantizes FP8 e4m3 [rows, cols] with E8M0 scales per 128x128 block
// ([ceil(rows/128), ceil(cols/128)]) to f32.
void DequantizeFp8Blocks(const uint8_t* codes, const uint8_t* scales, int64_t rows, int64_t cols, float* w);

// The one MXFP4 quantizer (QAT and released-layout export both use it): the
// `n` <= 32 values of one block get the E8M0 scale 2^ceil(log2(amax / 6))
// (6 = the largest e2m1 value, so nothing saturates) and the e2m1 code of
// x / scale, rounded to nearest, ties to even (one code per byte in `codes`).
// Returns the scale's E8M0 byte; an all-zero block gets 127 (scale 1) and zero codes.
uint8_t QuantizeMxFp4Block(const float* x, int64_t n, uint8_t* codes);
// W f32 [out, in] (in % 32 == 0) -> packed codes u8 [out, in/2] (low nibble =
// even element) and E8M0 scales [out, in/32]: the inverse of DequantizeMxFp4
// on its grid.
void QuantizeMxFp4(const float* w, int64_t out, int64_t in, uint8_t* codes, uint8_t* scales);
// W f32 [rows, cols] -> e4m3 codes [rows, cols] and E8M0 scales per 128x128
// block [ceil(rows/128), ceil(cols/128)], scale 2^ceil(log2(amax / 448)) (448 =
// the largest e4m3 value, so nothing saturates; the UE8M0 rule of V4_SPEC.md
// §4), codes round to nearest even. An all-zero block gets scale 1. The
// inverse of DequantizeFp8Blocks on its grid.
void QuantizeFp8Blocks(const float* w, int64_t rows, int64_t cols, uint8_t* codes, uint8_t* scales);

// y[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * (weight ? weight : 1); x: [T, D]. In place allowed.
void RmsNorm(const float* x, int64_t T, int64_t D, const float* weight, float eps, float* y);

// Interleaved RoPE (pairs (2i, 2i+1)) on the trailing `rope_dim` dims of each of
// `rows` vectors of width `dim`, all at one position with per-pair angles
// `angle[i] = pos * inv_freq[i]`: sign = +1 rotates, -1 applies the inverse.
void ApplyRope(float* x, int64_t rows, int64_t dim, int64_t rope_dim, const float* cos_t,
               const float* sin_t, float sign);

// softmax-free helpers
inline float Sigmoid(float x) { return 1.0f / (1.0f + __builtin_expf(-x)); }
inline float Silu(float x) { return x / (1.0f + __builtin_expf(-x)); }
// log(1 + e^x), stable for large |x|; matches torch.nn.functional.softplus (threshold 20).
float Softplus(float x);

// Sinkhorn projection of the hc x hc mHC combination logits (in place, row-major
// [i][j]): row softmax + eps, column normalise, then (iters-1) x (row, column)
// normalisations, each dividing by (sum + eps).
void SinkhornProject(float* m, int hc, int iters, float eps);

namespace internal {
// Which tiles MatMul may use: kFastest picks AVX-512 tiles where the CPU has
// them (the same bits as kAvx2; tests check it), kAvx2 never does.
enum class MatMulPath { kFastest, kAvx2 };
// MatMul on an explicit pool and path (tests pin the thread count with it).
void MatMulOnPool(ThreadPool& pool, const float* x, int64_t T, int64_t in, const float* w,
                  int64_t out, float* y, MatMulPath path);
void MxFp4MatMulOnPool(ThreadPool& pool, const float* x, int64_t T, int64_t in,
                       const uint8_t* codes, const uint8_t* scales, int64_t out, float* y);
}  // namespace internal

}  // namespace retort::cpu

#endif  // RETORT_MODEL_KERNELS_CPU_CPU_KERNELS_H_
