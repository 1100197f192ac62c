#include "model/kernels/cpu/cpu_kernels.h"

#include <cblas.h>
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

void MatMul(const float* x, int64_t T, int64_t in, const float* w, int64_t out, float* y) {
  if (T == 0 || out == 0) return;
  if (in == 0) {
    std::fill(y, y + T * out, 0.0f);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T), static_cast<int>(out),
              static_cast<int>(in), 1.0f, x, static_cast<int>(in), w, static_cast<int>(in), 0.0f, y,
              static_cast<int>(out));
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

void MxFp4MatMul(const float* x, int64_t T, int64_t in, const uint8_t* codes, const uint8_t* scales,
                 int64_t out, float* y) {
  const int64_t blocks = in / 32;
  // Rows of W are split across threads. Each 32-value block is decoded once
  // into registers and applied to every row of x; products accumulate in
  // 8-lane partial sums reduced once per output.
  ParallelFor(out, std::max<int64_t>(1, 256 / std::max<int64_t>(1, T)), [&](int64_t o0, int64_t o1) {
#if defined(__AVX2__) && defined(__FMA__)
    // 8-lane accumulators per row of x, kept as floats (std::vector<__m256>
    // would drop the type's alignment attribute).
    std::vector<float> accf(static_cast<size_t>(T) * 8 + 8);
    float* acc_base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(accf.data()) + 31) & ~uintptr_t{31});
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
