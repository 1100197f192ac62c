#include "model/kernels/cpu/cpu_kernels.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <vector>

#include "model/base/logging.h"
#include "model/base/thread_pool.h"
#include "model/tensor/dtype.h"

namespace retort::cpu {

// Note [Batch-invariant MatMul]
// y[t][o] must have the same bits whatever T, the position of row t, the other
// rows and the thread count: the V4 forward batches sequences (and the MoE
// groups rows per expert), and a sequence's logits must not depend on who
// shares its step (the rollout worker's resume-after-kill promise). So every
// element is computed by one fixed instruction sequence:
//   acc (8 lanes) = 0
//   for i = 0, 8, 16, ... < in:  acc = fma(x[t, i:i+8], w[o, i:i+8], acc)
//     (the last in % 8 values through a zero-filled masked load)
//   y[t][o] = ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7))
// Register tiles of R rows x C columns only run R*C such sequences side by
// side, and tiles (and the threads that run them) only choose which elements
// are computed when, so tile shapes and boundaries may depend on T and the
// pool size without changing any bit. The scalar build keeps the same
// property with one out-of-line 8-lane dot product used for every element.
// An AVX-512 tile, used when the CPU has it, runs the same per-lane sequence
// two 8-lane halves at a time, so it gives the AVX2 tile's bits.
namespace {

#if defined(__AVX2__) && defined(__FMA__)

// Lanes [0, n) set, n in [0, 8].
inline __m256i TailMask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The fixed horizontal reduction of Note [Batch-invariant MatMul].
inline float ReduceLanes(__m256 a) {
  const __m128 s =
      _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));  // a_l + a_{l+4}
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));                     // s0 + s2, s1 + s3
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// y[r][c] (row stride ldy) for R rows of x from `x` (row stride in) and C rows
// of w from `w` (row stride in). R * C + R + 1 <= 16 keeps it in registers.
template <int R, int C>
void DenseTile(const float* x, const float* w, int64_t in, float* y, int64_t ldy) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    __m256 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * in + i);
    for (int c = 0; c < C; ++c) {
      const __m256 wv = _mm256_loadu_ps(w + c * in + i);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
    }
  }
  if (i < in) {
    const __m256i m = TailMask(in - i);
    __m256 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_maskload_ps(x + r * in + i, m);
    for (int c = 0; c < C; ++c) {
      const __m256 wv = _mm256_maskload_ps(w + c * in + i, m);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * ldy + c] = ReduceLanes(acc[r][c]);
}

constexpr int64_t kTileRows = 3;  // register tile: 3 rows x 4 columns
constexpr int64_t kTileCols = 4;

// Columns [c0, c1) of R rows, 4 at a time, then the remainder.
template <int R>
void DenseRowStrip(const float* x, const float* w, int64_t in, int64_t c0, int64_t c1, float* y,
                   int64_t ldy) {
  int64_t c = c0;
  for (; c + kTileCols <= c1; c += kTileCols)
    DenseTile<R, kTileCols>(x, w + c * in, in, y + c, ldy);
  switch (c1 - c) {
    case 3:
      DenseTile<R, 3>(x, w + c * in, in, y + c, ldy);
      break;
    case 2:
      DenseTile<R, 2>(x, w + c * in, in, y + c, ldy);
      break;
    case 1:
      DenseTile<R, 1>(x, w + c * in, in, y + c, ldy);
      break;
    default:
      break;
  }
}

// The AVX-512 tile computes the AVX2 tile's bits (Note [Batch-invariant
// MatMul]) at twice the width: a 16-lane register holds the 8-lane
// accumulators of two rows of x for one column of W, x[r][i:i+8] and
// x[r+1][i:i+8] side by side, against w[c][i:i+8] broadcast to both halves.
// Each half is the same lane-wise FMA chain, zero-filled tail and reduction,
// so the choice of path (by CPU, at run time) never changes a bit; the build
// stays x86-64-v3 and only these functions are compiled for AVX-512.
#define RETORT_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl")))
// GCC 12's AVX-512 headers build the cast/broadcast intrinsics from an
// "undefined" vector and then warn about it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

constexpr int64_t kWideRowPairs = 3;  // register tile: 6 rows x 8 columns
constexpr int64_t kWideCols = 8;

template <int RP, int C>
RETORT_AVX512 void DenseTileAvx512(const float* x, const float* w, int64_t in, float* y,
                                   int64_t ldy) {
  __m512 acc[RP][C];
  for (int p = 0; p < RP; ++p)
    for (int c = 0; c < C; ++c) acc[p][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    __m512 xv[RP];
    for (int p = 0; p < RP; ++p)
      xv[p] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(x + 2 * p * in + i)),
                                 _mm256_loadu_ps(x + (2 * p + 1) * in + i), 1);
    for (int c = 0; c < C; ++c) {
      const __m512 wv = _mm512_broadcast_f32x8(_mm256_loadu_ps(w + c * in + i));
      for (int p = 0; p < RP; ++p) acc[p][c] = _mm512_fmadd_ps(xv[p], wv, acc[p][c]);
    }
  }
  if (i < in) {
    const __mmask8 m = static_cast<__mmask8>((1u << (in - i)) - 1);
    __m512 xv[RP];
    for (int p = 0; p < RP; ++p)
      xv[p] =
          _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_maskz_loadu_ps(m, x + 2 * p * in + i)),
                             _mm256_maskz_loadu_ps(m, x + (2 * p + 1) * in + i), 1);
    for (int c = 0; c < C; ++c) {
      const __m512 wv = _mm512_broadcast_f32x8(_mm256_maskz_loadu_ps(m, w + c * in + i));
      for (int p = 0; p < RP; ++p) acc[p][c] = _mm512_fmadd_ps(xv[p], wv, acc[p][c]);
    }
  }
  for (int p = 0; p < RP; ++p)
    for (int c = 0; c < C; ++c) {
      y[2 * p * ldy + c] = ReduceLanes(_mm512_castps512_ps256(acc[p][c]));
      y[(2 * p + 1) * ldy + c] = ReduceLanes(_mm512_extractf32x8_ps(acc[p][c], 1));
    }
}

template <int C>
RETORT_AVX512 void DenseTileAvx512Cols(const float* x, const float* w, int64_t in, float* y,
                                       int64_t ldy) {
  DenseTileAvx512<kWideRowPairs, C>(x, w, in, y, ldy);
}

// 6 rows, columns [c0, c1).
RETORT_AVX512 void DenseRowStripAvx512(const float* x, const float* w, int64_t in, int64_t c0,
                                       int64_t c1, float* y, int64_t ldy) {
  using Tile = void (*)(const float*, const float*, int64_t, float*, int64_t);
  static constexpr Tile kByCols[kWideCols] = {nullptr,
                                              DenseTileAvx512Cols<1>,
                                              DenseTileAvx512Cols<2>,
                                              DenseTileAvx512Cols<3>,
                                              DenseTileAvx512Cols<4>,
                                              DenseTileAvx512Cols<5>,
                                              DenseTileAvx512Cols<6>,
                                              DenseTileAvx512Cols<7>};
  int64_t c = c0;
  for (; c + kWideCols <= c1; c += kWideCols)
    DenseTileAvx512<kWideRowPairs, kWideCols>(x, w + c * in, in, y + c, ldy);
  if (c < c1) kByCols[c1 - c](x, w + c * in, in, y + c, ldy);
}

#pragma GCC diagnostic pop
#undef RETORT_AVX512

bool CpuHasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

// Rows [t0, t1) x columns [c0, c1) of y; 6-row strips on AVX-512 when `wide`.
void DenseBlock(const float* x, int64_t t0, int64_t t1, int64_t in, const float* w, int64_t c0,
                int64_t c1, int64_t out, float* y, bool wide) {
  int64_t t = t0;
  if (wide)
    for (; t + 2 * kWideRowPairs <= t1; t += 2 * kWideRowPairs)
      DenseRowStripAvx512(x + t * in, w, in, c0, c1, y + t * out, out);
  for (; t + kTileRows <= t1; t += kTileRows)
    DenseRowStrip<kTileRows>(x + t * in, w, in, c0, c1, y + t * out, out);
  if (t1 - t == 2) DenseRowStrip<2>(x + t * in, w, in, c0, c1, y + t * out, out);
  if (t1 - t == 1) DenseRowStrip<1>(x + t * in, w, in, c0, c1, y + t * out, out);
}

#else  // !(__AVX2__ && __FMA__)

// One out-of-line function computes every element, so each gets the same
// instructions however the compiler treats the surrounding loops.
[[gnu::noinline]] float DenseDot(const float* x, const float* w, int64_t in) {
  float a[8] = {};
  int64_t i = 0;
  for (; i + 8 <= in; i += 8)
    for (int l = 0; l < 8; ++l) a[l] += x[i + l] * w[i + l];
  for (int l = 0; i + l < in; ++l) a[l] += x[i + l] * w[i + l];
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

bool CpuHasAvx512() { return false; }

void DenseBlock(const float* x, int64_t t0, int64_t t1, int64_t in, const float* w, int64_t c0,
                int64_t c1, int64_t out, float* y, bool /*wide*/) {
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t c = c0; c < c1; ++c) y[t * out + c] = DenseDot(x + t * in, w + c * in, in);
}

#endif

// Cache tiles: a block of kBlockCols rows of W (kBlockCols * in floats) stays
// in L2 while kBlockRows rows of x pass over it, 3 at a time from L1.
constexpr int64_t kBlockRows = 48;
constexpr int64_t kBlockCols = 64;
// Below this many multiply-adds a matmul runs on the calling thread: waking
// the pool costs about what ~20 us of single-core work saves.
constexpr int64_t kMinParallelMacs = 1 << 19;

}  // namespace

namespace internal {

void MatMulOnPool(ThreadPool& pool, const float* x, int64_t T, int64_t in, const float* w,
                  int64_t out, float* y, MatMulPath path) {
  if (T == 0 || out == 0) return;
  const bool wide = path == MatMulPath::kFastest && CpuHasAvx512();
  // Tiles are ordered column block major, so a thread's contiguous range of
  // tiles reuses one block of W across row blocks.
  const int64_t row_blocks = (T + kBlockRows - 1) / kBlockRows;
  const int64_t col_blocks = (out + kBlockCols - 1) / kBlockCols;
  const int64_t tiles = row_blocks * col_blocks;
  const int64_t grain = T * in * out < kMinParallelMacs ? tiles : 1;
  pool.ParallelFor(tiles, grain, [&](int64_t b, int64_t e) {
    for (int64_t tile = b; tile < e; ++tile) {
      const int64_t cb = tile / row_blocks, rb = tile % row_blocks;
      DenseBlock(x, rb * kBlockRows, std::min(T, (rb + 1) * kBlockRows), in, w, cb * kBlockCols,
                 std::min(out, (cb + 1) * kBlockCols), out, y, wide);
    }
  });
}

}  // namespace internal

void MatMul(const float* x, int64_t T, int64_t in, const float* w, int64_t out, float* y) {
  internal::MatMulOnPool(ThreadPool::Default(), x, T, in, w, out, y,
                         internal::MatMulPath::kFastest);
}

void MatMulReference(const float* x, int64_t T, int64_t in, const float* w, int64_t out, float* y) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < out; ++o) {
      float acc = 0.0f;
      for (int64_t i = 0; i < in; ++i) acc += x[t * in + i] * w[o * in + i];
      y[t * out + o] = acc;
    }
}

namespace {

// e2m1 code -> value, as a table the compiler keeps in registers/L1.
constexpr float kE2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                             -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

inline void DecodeBlock32(const uint8_t* codes16, float scale, float* w32) {
  for (int j = 0; j < 16; ++j) {
    const uint8_t b = codes16[j];
    w32[2 * j] = kE2M1[b & 0xf] * scale;
    w32[2 * j + 1] = kE2M1[b >> 4] * scale;
  }
}

}  // namespace

#if defined(__AVX2__) && defined(__FMA__)
// Decodes 32 e2m1 codes (16 bytes, low nibble first) times `scale` into four
// 8-lane registers: nibbles are interleaved into bytes, widened to int32
// lanes and looked up in an 8-entry magnitude table; bit 3 is the sign.
inline void DecodeBlock32Avx2(const uint8_t* codes16, float scale, __m256* w) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes16));
  const __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0f));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0f));
  const __m128i first = _mm_unpacklo_epi8(lo, hi);   // elements 0..15
  const __m128i second = _mm_unpackhi_epi8(lo, hi);  // elements 16..31
  const __m256 mags = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m128i parts[4] = {first, _mm_srli_si128(first, 8), second, _mm_srli_si128(second, 8)};
  for (int q = 0; q < 4; ++q) {
    const __m256i idx = _mm256_cvtepu8_epi32(parts[q]);
    const __m256 mag = _mm256_permutevar8x32_ps(mags, idx);  // uses the low 3 bits
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(idx, _mm256_set1_epi32(8)), 28);
    w[q] = _mm256_mul_ps(_mm256_xor_ps(mag, _mm256_castsi256_ps(sign)), vscale);
  }
}
#endif

namespace internal {

void MxFp4MatMulOnPool(ThreadPool& pool, const float* x, int64_t T, int64_t in,
                       const uint8_t* codes, const uint8_t* scales, int64_t out, float* y) {
  const int64_t blocks = in / 32;
  // Rows of W are split across threads. Each 32-value block is decoded once
  // into registers and applied to every row of x; products accumulate in
  // 8-lane partial sums reduced once per output. Batch-invariant like MatMul
  // (Note [Batch-invariant MatMul]): each y[t][o] is the same chain of FMAs
  // over the blocks in order and the same final reduction, whatever T and
  // however the rows of W are split.
  pool.ParallelFor(
      out, std::max<int64_t>(1, 256 / std::max<int64_t>(1, T)), [&](int64_t o0, int64_t o1) {
#if defined(__AVX2__) && defined(__FMA__)
        // 8-lane accumulators per row of x, kept as floats (std::vector<__m256>
        // would drop the type's alignment attribute).
        std::vector<float> accf(static_cast<size_t>(T) * 8 + 8);
        float* acc_base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(accf.data()) + 31) &
                                                   ~uintptr_t{31});
        for (int64_t o = o0; o < o1; ++o) {
          for (int64_t t = 0; t < T; ++t) _mm256_store_ps(acc_base + 8 * t, _mm256_setzero_ps());
          const uint8_t* crow = codes + o * (in / 2);
          const uint8_t* srow = scales + o * blocks;
          for (int64_t b = 0; b < blocks; ++b) {
            __m256 w[4];
            DecodeBlock32Avx2(crow + b * 16, E8M0ToF32(srow[b]), w);
            const float* xb = x + b * 32;
            for (int64_t t = 0; t < T; ++t) {
              const float* xt = xb + t * in;
              __m256 a = _mm256_load_ps(acc_base + 8 * t);
              a = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xt), a);
              a = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xt + 8), a);
              a = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xt + 16), a);
              a = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xt + 24), a);
              _mm256_store_ps(acc_base + 8 * t, a);
            }
          }
          for (int64_t t = 0; t < T; ++t) {
            const float* a = acc_base + 8 * t;
            y[t * out + o] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
          }
        }
#else
    std::vector<float> acc(static_cast<size_t>(T) * 8);
    alignas(64) float w[32];
    for (int64_t o = o0; o < o1; ++o) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const uint8_t* crow = codes + o * (in / 2);
      const uint8_t* srow = scales + o * blocks;
      for (int64_t b = 0; b < blocks; ++b) {
        DecodeBlock32(crow + b * 16, E8M0ToF32(srow[b]), w);
        const float* xb = x + b * 32;
        for (int64_t t = 0; t < T; ++t) {
          const float* xt = xb + t * in;
          float* a = acc.data() + t * 8;
          for (int j = 0; j < 32; j += 8)
            for (int l = 0; l < 8; ++l) a[l] += w[j + l] * xt[j + l];
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        const float* a = acc.data() + t * 8;
        y[t * out + o] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
      }
    }
#endif
      });
}

}  // namespace internal

void MxFp4MatMul(const float* x, int64_t T, int64_t in, const uint8_t* codes, const uint8_t* scales,
                 int64_t out, float* y) {
  internal::MxFp4MatMulOnPool(ThreadPool::Default(), x, T, in, codes, scales, out, y);
}

void DequantizeMxFp4(const uint8_t* codes, const uint8_t* scales, int64_t out, int64_t in, float* w) {
  for (int64_t o = 0; o < out; ++o)
    for (int64_t b = 0; b < in / 32; ++b)
      DecodeBlock32(codes + o * (in / 2) + b * 16, E8M0ToF32(scales[o * (in / 32) + b]), w + o * in + b * 32);
}

void DequantizeFp8Blocks(const uint8_t* codes, const uint8_t* scales, int64_t rows, int64_t cols, float* w) {
  const int64_t scols = (cols + 127) / 128;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      w[r * cols + c] = E4M3ToF32(codes[r * cols + c]) * E8M0ToF32(scales[(r / 128) * scols + c / 128]);
}

namespace {

// E8M0 byte of 2^ceil(log2(amax / max_code)), clamped to the format's finite
// range; 127 (scale 1) for an all-zero block.
uint8_t PowerOfTwoScale(float amax, float max_code) {
  if (!(amax > 0.0f)) return 127;
  // frexp: amax / max_code = m * 2^e with m in [0.5, 1); ceil(log2) = e, or e - 1 when m == 0.5.
  int e = 0;
  const float m = std::frexp(amax / max_code, &e);
  const int exponent = m == 0.5f ? e - 1 : e;
  return static_cast<uint8_t>(std::clamp(exponent + 127, 1, 254));
}

}  // namespace

uint8_t QuantizeMxFp4Block(const float* x, int64_t n, uint8_t* codes) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const uint8_t s = PowerOfTwoScale(amax, 6.0f);
  const float scale = E8M0ToF32(s);
  for (int64_t i = 0; i < n; ++i) codes[i] = F32ToE2M1(x[i] / scale);
  return s;
}

void QuantizeMxFp4(const float* w, int64_t out, int64_t in, uint8_t* codes, uint8_t* scales) {
  CHECK_EQ(in % 32, 0) << "MXFP4 rows need a multiple of 32 values";
  uint8_t block[32];
  for (int64_t o = 0; o < out; ++o)
    for (int64_t b = 0; b < in / 32; ++b) {
      scales[o * (in / 32) + b] = QuantizeMxFp4Block(w + o * in + b * 32, 32, block);
      uint8_t* dst = codes + o * (in / 2) + b * 16;
      for (int i = 0; i < 16; ++i) dst[i] = static_cast<uint8_t>(block[2 * i] | (block[2 * i + 1] << 4));
    }
}

void QuantizeFp8Blocks(const float* w, int64_t rows, int64_t cols, uint8_t* codes, uint8_t* scales) {
  const int64_t srows = (rows + 127) / 128, scols = (cols + 127) / 128;
  for (int64_t br = 0; br < srows; ++br)
    for (int64_t bc = 0; bc < scols; ++bc) {
      const int64_t r1 = std::min(rows, (br + 1) * 128), c1 = std::min(cols, (bc + 1) * 128);
      float amax = 0.0f;
      for (int64_t r = br * 128; r < r1; ++r)
        for (int64_t c = bc * 128; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
      const uint8_t s = PowerOfTwoScale(amax, 448.0f);
      scales[br * scols + bc] = s;
      const float scale = E8M0ToF32(s);
      for (int64_t r = br * 128; r < r1; ++r)
        for (int64_t c = bc * 128; c < c1; ++c) codes[r * cols + c] = F32ToE4M3(w[r * cols + c] / scale);
    }
}

void RmsNorm(const float* x, int64_t T, int64_t D, const float* weight, float eps, float* y) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * D;
    float ss = 0.0f;
    for (int64_t i = 0; i < D; ++i) ss += xt[i] * xt[i];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    float* yt = y + t * D;
    for (int64_t i = 0; i < D; ++i) yt[i] = weight ? weight[i] * (xt[i] * r) : xt[i] * r;
  }
}

void ApplyRope(float* x, int64_t rows, int64_t dim, int64_t rope_dim, const float* cos_t,
               const float* sin_t, float sign) {
  const int64_t off = dim - rope_dim;
  for (int64_t r = 0; r < rows; ++r) {
    float* v = x + r * dim + off;
    for (int64_t i = 0; i < rope_dim / 2; ++i) {
      const float c = cos_t[i], s = sign * sin_t[i];
      const float a = v[2 * i], b = v[2 * i + 1];
      v[2 * i] = a * c - b * s;
      v[2 * i + 1] = b * c + a * s;
    }
  }
}

float Softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

void SinkhornProject(float* m, int hc, int iters, float eps) {
  for (int i = 0; i < hc; ++i) {
    float* row = m + i * hc;
    float mx = row[0];
    for (int j = 1; j < hc; ++j) mx = std::max(mx, row[j]);
    float sum = 0.0f;
    for (int j = 0; j < hc; ++j) sum += (row[j] = std::exp(row[j] - mx));
    for (int j = 0; j < hc; ++j) row[j] = row[j] / sum + eps;
  }
  auto normalize_cols = [&] {
    for (int j = 0; j < hc; ++j) {
      float s = 0.0f;
      for (int i = 0; i < hc; ++i) s += m[i * hc + j];
      for (int i = 0; i < hc; ++i) m[i * hc + j] /= (s + eps);
    }
  };
  normalize_cols();
  for (int it = 1; it < iters; ++it) {
    for (int i = 0; i < hc; ++i) {
      float s = 0.0f;
      for (int j = 0; j < hc; ++j) s += m[i * hc + j];
      for (int j = 0; j < hc; ++j) m[i * hc + j] /= (s + eps);
    }
    normalize_cols();
  }
}

}  // namespace retort::cpu
