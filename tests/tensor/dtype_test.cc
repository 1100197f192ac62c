// Exact decoding of every low-precision code and scale edge.
#include "model/tensor/dtype.h"

#include <cmath>

#include "gtest/gtest.h"
#include "model/tensor/tensor.h"

namespace retort {
namespace {

TEST(DTypeTest, E4M3DecodesEveryCode) {
  // Reference: value = (-1)^s * 2^(e-7) * (1 + m/8), subnormal 2^-6 * m/8, 0x7f/0xff NaN.
  for (int v = 0; v < 256; ++v) {
    const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
    const float got = E4M3ToF32(static_cast<uint8_t>(v));
    if (e == 15 && m == 7) {
      EXPECT_TRUE(std::isnan(got)) << v;
      continue;
    }
    const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
    EXPECT_EQ(got, static_cast<float>(s ? -mag : mag)) << "code " << v;
  }
  EXPECT_EQ(E4M3ToF32(0x7e), 448.0f);
  EXPECT_EQ(E4M3ToF32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
}

TEST(DTypeTest, E4M3RoundTripAndSaturation) {
  for (int v = 0; v < 256; ++v) {
    if ((v & 0x7f) == 0x7f) continue;
    const float f = E4M3ToF32(static_cast<uint8_t>(v));
    const uint8_t back = F32ToE4M3(f);
    EXPECT_EQ(E4M3ToF32(back), f) << v;
  }
  EXPECT_EQ(E4M3ToF32(F32ToE4M3(1e9f)), 448.0f);
  EXPECT_EQ(E4M3ToF32(F32ToE4M3(-1e9f)), -448.0f);
  EXPECT_EQ(E4M3ToF32(F32ToE4M3(1.0625f)), 1.0f);   // tie between 1 and 1.125 -> even mantissa
  EXPECT_EQ(E4M3ToF32(F32ToE4M3(1.1875f)), 1.25f);  // tie between 1.125 and 1.25 -> even
}

TEST(DTypeTest, E8M0IsAPowerOfTwoAndFFIsNaN) {
  for (int v = 0; v < 255; ++v) EXPECT_EQ(E8M0ToF32(static_cast<uint8_t>(v)), std::ldexp(1.0f, v - 127)) << v;
  EXPECT_TRUE(std::isnan(E8M0ToF32(0xff)));
  EXPECT_EQ(E8M0ToF32(127), 1.0f);
  EXPECT_EQ(E8M0ToF32(0), std::ldexp(1.0f, -127));  // subnormal in fp32, still exact
}

TEST(DTypeTest, E2M1DecodesEveryCode) {
  const float mags[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  for (int c = 0; c < 16; ++c) {
    const float want = (c & 8) ? -mags[c & 7] : mags[c & 7];
    EXPECT_EQ(E2M1ToF32(static_cast<uint8_t>(c)), want) << c;
    if ((c & 7) != 0) {
      EXPECT_EQ(F32ToE2M1(want), c);
    }
  }
  EXPECT_EQ(F32ToE2M1(100.0f), 7);   // saturates at 6
  EXPECT_EQ(F32ToE2M1(-100.0f), 15);
  EXPECT_EQ(F32ToE2M1(2.5f), 4);     // tie 2 vs 3 -> even code (2)
  EXPECT_EQ(F32ToE2M1(-0.1f), 0);    // rounds to +0 (no negative zero code)
}

TEST(DTypeTest, Bf16AndF16RoundToNearestEven) {
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f)), 1.0f);
  EXPECT_EQ(F32ToBf16(1.0f + std::ldexp(1.0f, -8)), F32ToBf16(1.0f));  // exact tie -> even
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(std::nanf("")))));
  for (uint32_t v = 0; v < 0x10000; v += 7) {
    const float f = F16ToF32(static_cast<uint16_t>(v));
    if (std::isnan(f)) continue;
    EXPECT_EQ(F32ToF16(f), v) << v;
  }
  EXPECT_EQ(F16ToF32(F32ToF16(65520.0f)), INFINITY);
}

TEST(TensorTest, ViewsShareStorageAndSizesFollowDType) {
  Tensor t = Tensor::Zeros(DType::kF32, {4, 3});
  t.mutable_data<float>()[4] = 7.0f;
  Tensor row = t.Slice(1, 2);
  EXPECT_EQ(row.shape(), (Shape{1, 3}));
  EXPECT_EQ(row.data<float>()[1], 7.0f);
  EXPECT_EQ(t.Reshape({12}).data<float>()[4], 7.0f);
  EXPECT_EQ(Tensor::Zeros(DType::kMxFp4, {8, 64}).nbytes(), 256u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(Tensor::Zeros(DType::kF32, {3}).raw()) % 64, 0u);
  Tensor b = Tensor::Zeros(DType::kBF16, {2});
  b.mutable_data<uint16_t>()[0] = F32ToBf16(1.5f);
  EXPECT_EQ(b.ToF32()->data<float>()[0], 1.5f);
  EXPECT_FALSE(Tensor::Zeros(DType::kMxFp4, {2, 32}).ToF32().ok());
}

}  // namespace
}  // namespace retort
