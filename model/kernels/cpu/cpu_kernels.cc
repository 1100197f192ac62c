#include "model/kernels/cpu/cpu_kernels.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

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

void MxFp4MatMul(const float* x, int64_t T, int64_t in, const uint8_t* codes, const uint8_t* scales,
                 int64_t out, float* y) {
  const int64_t blocks = in / 32;
  // Rows of W are split across threads; each thread decodes a 32-value block
  // once and applies it to every row of x (so decode cost is amortised over T).
  ParallelFor(out, std::max<int64_t>(1, 256 / std::max<int64_t>(1, T)), [&](int64_t o0, int64_t o1) {
    std::vector<float> acc(static_cast<size_t>(T));
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
          float s = 0.0f;
          for (int j = 0; j < 32; ++j) s += w[j] * xt[j];
          acc[t] += s;
        }
      }
      for (int64_t t = 0; t < T; ++t) y[t * out + o] = acc[t];
    }
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
