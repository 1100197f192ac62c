// CPU kernels: fast paths against their plain twins on odd shapes, and the
// matmuls' batch invariance (a row's bits whatever the batch around it and the
// thread count); Sinkhorn, RoPE and the block decoders against hand-checkable
// properties.
#include "model/kernels/cpu/cpu_kernels.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "model/base/thread_pool.h"
#include "model/tensor/dtype.h"

namespace retort::cpu {
namespace {

constexpr uint64_t kSeed = 20261122;

std::vector<float> Random(std::mt19937_64& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Small integers make every partial sum exact in fp32 (|sum| <= 4 * 4 * 4096
// < 2^24), so any summation order gives the reference's bits: an indexing or
// tail bug cannot hide inside a tolerance. Sentinels after y catch stray writes.
TEST(CpuKernelsTest, MatMulIsExactOnIntegerInputsAtOddShapes) {
  std::mt19937_64 rng(kSeed);
  std::uniform_int_distribution<int> small(-4, 4);
  constexpr float kSentinel = 12345.0f;
  for (int64_t T : {1, 2, 3, 4, 7, 19, 111}) {
    for (int64_t in : {0, 1, 7, 8, 9, 19, 111, 989, 4096}) {
      for (int64_t out : {1, 3, 4, 5, 7, 19, 65, 111, 989}) {
        if (T * in * out > (int64_t{1} << 26)) continue;
        std::vector<float> x(T * in), w(out * in);
        for (auto& v : x) v = static_cast<float>(small(rng));
        for (auto& v : w) v = static_cast<float>(small(rng));
        std::vector<float> y(T * out + 16, kSentinel), r(T * out);
        MatMul(x.data(), T, in, w.data(), out, y.data());
        MatMulReference(x.data(), T, in, w.data(), out, r.data());
        for (int64_t i = 0; i < T * out; ++i)
          ASSERT_EQ(y[i], r[i]) << "seed " << kSeed << " T=" << T << " in=" << in << " out=" << out
                                << " at " << i;
        for (int64_t i = T * out; i < T * out + 16; ++i)
          ASSERT_EQ(y[i], kSentinel) << "write past y: T=" << T << " in=" << in << " out=" << out;
      }
    }
  }
}

// Random floats against the plain loop. Both are within (in + 3) ulp-units of
// sum |x_i w_i| of the exact value (first-order dot-product bound; MatMul's
// 8 lanes of in/8 terms plus 3 reduction adds is tighter), so
// |y - r| <= 2 (in + 3) 2^-24 sum |x_i w_i| bounds their difference.
TEST(CpuKernelsTest, MatMulMatchesReferenceOnOddShapes) {
  std::mt19937_64 rng(kSeed);
  for (int64_t T : {1, 2, 7, 19, 111}) {
    for (int64_t in : {1, 7, 19, 111, 989, 4096}) {
      for (int64_t out : {1, 7, 19, 111, 989}) {
        if (T * in * out > (int64_t{1} << 26)) continue;
        auto x = Random(rng, T * in), w = Random(rng, out * in);
        std::vector<float> y(T * out), r(T * out);
        MatMul(x.data(), T, in, w.data(), out, y.data());
        MatMulReference(x.data(), T, in, w.data(), out, r.data());
        for (int64_t t = 0; t < T; ++t)
          for (int64_t o = 0; o < out; ++o) {
            double abs_sum = 0;
            for (int64_t i = 0; i < in; ++i) abs_sum += std::fabs(x[t * in + i] * w[o * in + i]);
            const double bound = 2.0 * (in + 3) * std::ldexp(1.0, -24) * abs_sum;
            ASSERT_LE(std::fabs(y[t * out + o] - r[t * out + o]), bound)
                << "seed " << kSeed << " T=" << T << " in=" << in << " out=" << out << " t=" << t
                << " o=" << o;
          }
      }
    }
  }
}

// Shapes for the invariance tests: `in` and `out` around the register tile
// (3 x 4), the 8-lane step and the cache blocks (48 rows, 64 columns).
struct Shape {
  int64_t in, out;
};
constexpr Shape kInvarianceShapes[] = {{1, 1},     {7, 19},    {19, 7},   {8, 4},
                                       {9, 5},     {111, 111}, {989, 19}, {111, 989},
                                       {4096, 65}, {989, 131}, {4096, 7}, {33, 1}};

// Every row of a batch must have exactly the bits it gets alone (T = 1), for
// batches of several sizes whose other rows are random: each position of each
// batch holds a row whose solo result is known.
TEST(CpuKernelsTest, MatMulRowsAreBatchInvariant) {
  std::mt19937_64 rng(kSeed);
  for (const Shape& s : kInvarianceShapes) {
    auto w = Random(rng, s.out * s.in);
    for (int64_t T : {2, 3, 7, 19, 111}) {
      auto x = Random(rng, T * s.in);
      std::vector<float> y(T * s.out), solo(s.out);
      MatMul(x.data(), T, s.in, w.data(), s.out, y.data());
      for (int64_t t = 0; t < T; ++t) {
        MatMul(x.data() + t * s.in, 1, s.in, w.data(), s.out, solo.data());
        ASSERT_EQ(std::memcmp(solo.data(), y.data() + t * s.out, s.out * sizeof(float)), 0)
            << "seed " << kSeed << " in=" << s.in << " out=" << s.out << " T=" << T << " row " << t;
      }
    }
  }
}

// The same for a column: y[t][o] must not depend on which other rows of W
// share the call (the MoE and grouped projections slice W by rows).
TEST(CpuKernelsTest, MatMulColumnsAreInvariantToTheOtherWeightRows) {
  std::mt19937_64 rng(kSeed);
  for (const Shape& s : kInvarianceShapes) {
    const int64_t T = 19;
    auto x = Random(rng, T * s.in), w = Random(rng, s.out * s.in);
    std::vector<float> y(T * s.out), col(T);
    MatMul(x.data(), T, s.in, w.data(), s.out, y.data());
    for (int64_t o = 0; o < s.out; ++o) {
      MatMul(x.data(), T, s.in, w.data() + o * s.in, 1, col.data());
      for (int64_t t = 0; t < T; ++t)
        ASSERT_EQ(std::memcmp(&col[t], &y[t * s.out + o], sizeof(float)), 0)
            << "seed " << kSeed << " in=" << s.in << " out=" << s.out << " t=" << t << " o=" << o;
    }
  }
}

// Pools of 1, 2, 3 and 5 threads (oversubscribing the machine is fine) must
// all give the bits of the default pool.
TEST(CpuKernelsTest, MatMulIsThreadCountInvariant) {
  std::mt19937_64 rng(kSeed);
  std::vector<std::unique_ptr<ThreadPool>> pools;
  for (int workers : {0, 1, 2, 4}) pools.push_back(std::make_unique<ThreadPool>(workers));
  for (const Shape& s : kInvarianceShapes) {
    auto w = Random(rng, s.out * s.in);
    for (int64_t T : {1, 19, 111}) {
      auto x = Random(rng, T * s.in);
      std::vector<float> want(T * s.out), got(T * s.out);
      MatMul(x.data(), T, s.in, w.data(), s.out, want.data());
      for (auto& pool : pools) {
        internal::MatMulOnPool(*pool, x.data(), T, s.in, w.data(), s.out, got.data(),
                               internal::MatMulPath::kFastest);
        ASSERT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0)
            << "seed " << kSeed << " in=" << s.in << " out=" << s.out << " T=" << T
            << " threads=" << pool->num_threads();
      }
    }
  }
}

// The AVX-512 tiles (where this CPU has them) must give the AVX2 tiles' bits,
// so which machine ran a step never changes a sample.
TEST(CpuKernelsTest, MatMulPathsAgreeBitwise) {
  std::mt19937_64 rng(kSeed);
  ThreadPool pool(1);
  for (const Shape& s : kInvarianceShapes) {
    auto w = Random(rng, s.out * s.in);
    for (int64_t T : {1, 5, 6, 7, 13, 48, 111}) {
      auto x = Random(rng, T * s.in);
      std::vector<float> fastest(T * s.out), avx2(T * s.out);
      internal::MatMulOnPool(pool, x.data(), T, s.in, w.data(), s.out, fastest.data(),
                             internal::MatMulPath::kFastest);
      internal::MatMulOnPool(pool, x.data(), T, s.in, w.data(), s.out, avx2.data(),
                             internal::MatMulPath::kAvx2);
      ASSERT_EQ(std::memcmp(fastest.data(), avx2.data(), avx2.size() * sizeof(float)), 0)
          << "seed " << kSeed << " in=" << s.in << " out=" << s.out << " T=" << T;
    }
  }
}

TEST(CpuKernelsTest, MxFp4MatMulMatchesDequantizedReference) {
  std::mt19937_64 rng(kSeed);
  std::uniform_int_distribution<int> byte(0, 255), sc(120, 130);
  for (int64_t T : {1, 7, 19}) {
    for (int64_t in : {32, 96, 224}) {
      for (int64_t out : {1, 7, 111}) {
        std::vector<uint8_t> codes(out * in / 2), scales(out * in / 32);
        for (auto& c : codes) c = static_cast<uint8_t>(byte(rng));
        for (auto& s : scales) s = static_cast<uint8_t>(sc(rng));
        auto x = Random(rng, T * in);
        std::vector<float> w(out * in), y(T * out), r(T * out);
        DequantizeMxFp4(codes.data(), scales.data(), out, in, w.data());
        MxFp4MatMul(x.data(), T, in, codes.data(), scales.data(), out, y.data());
        MatMulReference(x.data(), T, in, w.data(), out, r.data());
        for (int64_t i = 0; i < T * out; ++i)
          ASSERT_NEAR(y[i], r[i], 1e-5f * (1 + std::fabs(r[i])) * std::sqrt(static_cast<float>(in)))
              << "seed " << kSeed << " T=" << T << " in=" << in << " out=" << out;
      }
    }
  }
}

// MxFp4MatMul: each row alone, inside batches, and on pools of several sizes.
TEST(CpuKernelsTest, MxFp4MatMulIsBatchAndThreadCountInvariant) {
  std::mt19937_64 rng(kSeed);
  std::uniform_int_distribution<int> byte(0, 255), sc(120, 130);
  std::vector<std::unique_ptr<ThreadPool>> pools;
  for (int workers : {0, 1, 2, 4}) pools.push_back(std::make_unique<ThreadPool>(workers));
  for (const Shape& s :
       {Shape{32, 1}, Shape{32, 19}, Shape{224, 111}, Shape{992, 7}, Shape{4096, 65}}) {
    std::vector<uint8_t> codes(s.out * s.in / 2), scales(s.out * s.in / 32);
    for (auto& c : codes) c = static_cast<uint8_t>(byte(rng));
    for (auto& v : scales) v = static_cast<uint8_t>(sc(rng));
    for (int64_t T : {2, 3, 7, 19, 111}) {
      auto x = Random(rng, T * s.in);
      std::vector<float> y(T * s.out), solo(s.out), got(T * s.out);
      MxFp4MatMul(x.data(), T, s.in, codes.data(), scales.data(), s.out, y.data());
      for (int64_t t = 0; t < T; ++t) {
        MxFp4MatMul(x.data() + t * s.in, 1, s.in, codes.data(), scales.data(), s.out, solo.data());
        ASSERT_EQ(std::memcmp(solo.data(), y.data() + t * s.out, s.out * sizeof(float)), 0)
            << "seed " << kSeed << " in=" << s.in << " out=" << s.out << " T=" << T << " row " << t;
      }
      for (auto& pool : pools) {
        internal::MxFp4MatMulOnPool(*pool, x.data(), T, s.in, codes.data(), scales.data(), s.out,
                                    got.data());
        ASSERT_EQ(std::memcmp(y.data(), got.data(), y.size() * sizeof(float)), 0)
            << "seed " << kSeed << " in=" << s.in << " out=" << s.out << " T=" << T
            << " threads=" << pool->num_threads();
      }
    }
  }
}

TEST(CpuKernelsTest, MxFp4DecodesLowNibbleFirstWithItsScale) {
  // Row 0: bytes 0x21 -> elements (1: 0.5, 2: 1.0); scale 2^1.
  std::vector<uint8_t> codes(16, 0), scales = {128};
  codes[0] = 0x21;
  codes[15] = 0xF7;  // elements 30 = code 7 (6.0), 31 = code 15 (-6.0)
  std::vector<float> w(32);
  DequantizeMxFp4(codes.data(), scales.data(), 1, 32, w.data());
  EXPECT_EQ(w[0], 1.0f);
  EXPECT_EQ(w[1], 2.0f);
  EXPECT_EQ(w[30], 12.0f);
  EXPECT_EQ(w[31], -12.0f);
}

TEST(CpuKernelsTest, Fp8BlockScalesApplyPer128x128Block) {
  const int64_t rows = 130, cols = 129;                // 2 x 2 blocks, ragged edges
  std::vector<uint8_t> codes(rows * cols, 0x38);       // 1.0
  std::vector<uint8_t> scales = {127, 128, 129, 126};  // 1, 2, 4, 0.5
  std::vector<float> w(rows * cols);
  DequantizeFp8Blocks(codes.data(), scales.data(), rows, cols, w.data());
  EXPECT_EQ(w[0], 1.0f);
  EXPECT_EQ(w[128], 2.0f);
  EXPECT_EQ(w[128 * cols], 4.0f);
  EXPECT_EQ(w[129 * cols + 128], 0.5f);
}

// The quantizers invert the decoders on their grids and pick the smallest
// power-of-two scale that does not saturate (V4_SPEC.md §4).
TEST(CpuKernelsTest, Fp8BlockQuantizerPicksUe8m0ScalesAndRoundsToNearest) {
  std::mt19937_64 rng(kSeed);
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int64_t rows = 131, cols = 257;  // 2 x 3 blocks, ragged edges
  std::vector<float> w = Random(rng, rows * cols, 0.03f);
  w[5] = 0.0f;
  w[130 * cols + 256] = 7.0f;  // the amax of the last block
  const int64_t srows = 2, scols = 3;
  std::vector<uint8_t> codes(rows * cols), scales(srows * scols);
  QuantizeFp8Blocks(w.data(), rows, cols, codes.data(), scales.data());
  // 7 / 448 = 2^-6 * 1.0 -> ceil(log2) = -6 exactly: scale 2^-6, 7 -> code 448.
  EXPECT_EQ(scales[srows * scols - 1], 127 - 6);
  std::vector<float> back(rows * cols);
  DequantizeFp8Blocks(codes.data(), scales.data(), rows, cols, back.data());
  EXPECT_EQ(back[130 * cols + 256], 7.0f);
  EXPECT_EQ(back[5], 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float scale = E8M0ToF32(scales[(r / 128) * scols + c / 128]);
      const float x = w[r * cols + c] / scale;
      ASSERT_LE(std::fabs(x), 448.0f) << r << "," << c;
      // Nearest e4m3 (RNE): within half a step of 2^(floor(log2|x|) - 3) (subnormal step 2^-9).
      const float step =
          std::fabs(x) < 0.015625f ? 0.001953125f : std::ldexp(1.0f, std::ilogb(x) - 3);
      ASSERT_LE(std::fabs(back[r * cols + c] / scale - x), step / 2) << r << "," << c;
    }
  for (int64_t b = 0; b < srows * scols; ++b) {  // no smaller scale would avoid saturation
    float amax = 0;
    for (int64_t r = (b / scols) * 128; r < std::min(rows, (b / scols + 1) * 128); ++r)
      for (int64_t c = (b % scols) * 128; c < std::min(cols, (b % scols + 1) * 128); ++c)
        amax = std::max(amax, std::fabs(w[r * cols + c]));
    EXPECT_GT(amax, 448.0f * E8M0ToF32(scales[b]) / 2) << "block " << b;
  }
  // On its own grid the quantizer is exact.
  std::vector<uint8_t> codes2(rows * cols), scales2(srows * scols);
  QuantizeFp8Blocks(back.data(), rows, cols, codes2.data(), scales2.data());
  std::vector<float> again(rows * cols);
  DequantizeFp8Blocks(codes2.data(), scales2.data(), rows, cols, again.data());
  EXPECT_EQ(again, back);
}

TEST(CpuKernelsTest, MxFp4QuantizerPacksLowNibbleFirstAndInvertsTheDecoder) {
  std::vector<float> w(64, 0.0f);
  w[0] = 1.0f;  // block 0: amax 12 -> scale 2 (12/6 = 2^1), codes 0.5, 1, 6, -6
  w[1] = 2.0f;
  w[30] = 12.0f;
  w[31] = -12.0f;
  w[32] = 0.3f;  // block 1: amax 0.3 -> scale 2^-4 (ceil(log2(0.05))): 4.8 -> 4, 1.25 -> 1
  w[33] = 0.078125f;
  std::vector<uint8_t> codes(32), scales(2);
  QuantizeMxFp4(w.data(), 1, 64, codes.data(), scales.data());
  EXPECT_EQ(scales[0], 128);
  EXPECT_EQ(codes[0], 0x21);
  EXPECT_EQ(codes[15], 0xF7);
  EXPECT_EQ(scales[1], 127 - 4);
  EXPECT_EQ(codes[16],
            0x26);  // element 32: code 6 (4.0); 33: 1.25, a tie of 1 and 1.5 -> even code 2
  std::vector<float> back(64);
  DequantizeMxFp4(codes.data(), scales.data(), 1, 64, back.data());
  EXPECT_EQ(back[32], 0.25f);
  EXPECT_EQ(back[33], 0.0625f);
  std::mt19937_64 rng(kSeed);
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int64_t out = 7, in = 96;
  std::vector<float> r = Random(rng, out * in);
  std::vector<uint8_t> rc(out * in / 2), rs(out * in / 32);
  QuantizeMxFp4(r.data(), out, in, rc.data(), rs.data());
  std::vector<float> decoded(out * in), redecoded(out * in);
  DequantizeMxFp4(rc.data(), rs.data(), out, in, decoded.data());
  QuantizeMxFp4(decoded.data(), out, in, rc.data(), rs.data());
  DequantizeMxFp4(rc.data(), rs.data(), out, in, redecoded.data());
  EXPECT_EQ(redecoded, decoded);
}

TEST(CpuKernelsTest, SinkhornIsDoublyStochastic) {
  // mHC combination logits are O(1) (scale2 * mix + base); 20 alternating
  // normalisations end on a column step, so columns sum to 1 exactly and rows
  // to within the convergence of the iteration.
  std::mt19937_64 rng(kSeed);
  for (int trial = 0; trial < 100; ++trial) {
    auto m = Random(rng, 16, 1.0f);
    SinkhornProject(m.data(), 4, 20, 1e-6f);
    for (int i = 0; i < 4; ++i) {
      float row = 0, col = 0;
      for (int j = 0; j < 4; ++j) {
        row += m[i * 4 + j];
        col += m[j * 4 + i];
        EXPECT_GT(m[i * 4 + j], 0.0f);
      }
      EXPECT_NEAR(col, 1.0f, 1e-5f) << "seed " << kSeed << " trial " << trial;
      EXPECT_NEAR(row, 1.0f, 1e-5f) << "seed " << kSeed << " trial " << trial;
    }
  }
}

TEST(CpuKernelsTest, InverseRopeUndoesRopeAndRotatesOnlyTrailingPairs) {
  std::mt19937_64 rng(kSeed);
  const int64_t dim = 24, rope = 8;
  auto x = Random(rng, 3 * dim), orig = x;
  std::vector<float> c(rope / 2), s(rope / 2);
  for (int i = 0; i < rope / 2; ++i) {
    c[i] = std::cos(0.37f * (i + 1));
    s[i] = std::sin(0.37f * (i + 1));
  }
  ApplyRope(x.data(), 3, dim, rope, c.data(), s.data(), 1.0f);
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t i = 0; i < dim - rope; ++i) EXPECT_EQ(x[r * dim + i], orig[r * dim + i]);
  // Pair (2i, 2i+1) rotates by angle_i: the norm of each pair is kept.
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t i = 0; i < rope / 2; ++i) {
      const float* a = &x[r * dim + dim - rope + 2 * i];
      const float* b = &orig[r * dim + dim - rope + 2 * i];
      EXPECT_NEAR(a[0] * a[0] + a[1] * a[1], b[0] * b[0] + b[1] * b[1], 1e-5f);
      EXPECT_NEAR(a[0], b[0] * c[i] - b[1] * s[i], 1e-6f);
    }
  ApplyRope(x.data(), 3, dim, rope, c.data(), s.data(), -1.0f);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], orig[i], 1e-6f);
}

TEST(CpuKernelsTest, RmsNormAndSoftplus) {
  std::vector<float> x = {3.0f, 4.0f}, w = {1.0f, 2.0f}, y(2);
  RmsNorm(x.data(), 1, 2, w.data(), 0.0f, y.data());
  const float r = 1.0f / std::sqrt(12.5f);
  EXPECT_NEAR(y[0], 3 * r, 1e-6f);
  EXPECT_NEAR(y[1], 8 * r, 1e-6f);
  EXPECT_NEAR(Softplus(0.0f), std::log(2.0f), 1e-7f);
  EXPECT_EQ(Softplus(30.0f), 30.0f);
  EXPECT_NEAR(Softplus(-30.0f), std::exp(-30.0f), 1e-15f);
}

}  // namespace
}  // namespace retort::cpu
