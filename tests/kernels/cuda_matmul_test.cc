// MXFP4 (single and grouped over experts) and dense f32/bf16 GEMMs against
// cpu::MxFp4MatMul / cpu::MatMul at odd shapes. Needs a GPU: skips cleanly.
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "model/kernels/cpu/cpu_kernels.h"
#include "model/kernels/cuda/dense_gemm.cuh"
#include "model/kernels/cuda/mxfp4.cuh"
#include "model/tensor/dtype.h"
#include "tests/kernels/cuda_test_util.h"

namespace retort {
namespace {

using testing::Down;
using testing::RandomFloats;
using testing::Up;
using testing::Zeros;

// |got - want| <= rel * sum_i |x_i w_i| + 1e-6 per output: the bound for two
// fp32 dot products of the same exact products summed in different orders.
::testing::AssertionResult DotClose(const std::vector<float>& got, const std::vector<float>& want,
                                    const std::vector<float>& x, const std::vector<float>& w, int64_t T, int64_t in,
                                    int64_t out, float rel, uint64_t seed, const std::string& what) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < out; ++o) {
      double mag = 0.0;
      for (int64_t i = 0; i < in; ++i) mag += std::fabs(static_cast<double>(x[t * in + i]) * w[o * in + i]);
      const double err = std::fabs(static_cast<double>(got[t * out + o]) - want[t * out + o]);
      if (!(err <= rel * mag + 1e-6))
        return ::testing::AssertionFailure() << what << " (seed " << seed << "): [" << t << ", " << o << "] got "
                                             << got[t * out + o] << " want " << want[t * out + o] << " |x||w| " << mag;
    }
  return ::testing::AssertionSuccess();
}

void RandomMxFp4(std::mt19937_64& rng, int64_t out, int64_t in, std::vector<uint8_t>& codes, std::vector<uint8_t>& scales) {
  codes.resize(out * in / 2);
  scales.resize(out * in / 32);
  for (auto& c : codes) c = static_cast<uint8_t>(rng() & 0xff);
  for (auto& s : scales) s = static_cast<uint8_t>(120 + rng() % 12);  // 2^-7 .. 2^4
}

TEST(CudaMatMulTest, MxFp4MatMulMatchesCpu) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 21;
  std::mt19937_64 rng(seed);
  struct S { int64_t T, in, out; };
  for (S s : {S{1, 32, 1}, S{1, 4096, 7}, S{7, 96, 19}, S{19, 2048, 111}, S{111, 320, 989}, S{9, 4096, 2048}}) {
    std::vector<uint8_t> codes, scales;
    RandomMxFp4(rng, s.out, s.in, codes, scales);
    auto x = RandomFloats(rng, s.T * s.in);
    std::vector<float> want(s.T * s.out), w(s.out * s.in);
    cpu::MxFp4MatMul(x.data(), s.T, s.in, codes.data(), scales.data(), s.out, want.data());
    cpu::DequantizeMxFp4(codes.data(), scales.data(), s.out, s.in, w.data());
    auto dx = Up(x), dc = Up(codes), ds = Up(scales);
    auto dy = Zeros(want.size() * 4);
    ASSERT_TRUE(cuda::MxFp4MatMul(dx.as<float>(), s.T, s.in, dc.as<uint8_t>(), ds.as<uint8_t>(), s.out, dy.as<float>(), nullptr).ok());
    // Bound: 1e-5 * sum|x w| (fp32 summation-order difference over <= 4096 terms).
    EXPECT_TRUE(DotClose(Down<float>(dy, want.size()), want, x, w, s.T, s.in, s.out, 1e-5f, seed,
                         "mxfp4 T=" + std::to_string(s.T) + " in=" + std::to_string(s.in) + " out=" + std::to_string(s.out)));
  }
}

TEST(CudaMatMulTest, MxFp4GroupedOverExpertsWithPermutationMatchesCpu) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 22;
  std::mt19937_64 rng(seed);
  const int64_t E = 5, in = 256, out = 111, N = 19;
  std::vector<uint8_t> codes, scales;
  RandomMxFp4(rng, E * out, in, codes, scales);  // stacked [E, out, in/2]
  auto x = RandomFloats(rng, N * in);
  // Groups: expert 3 gets rows {4, 0, 18}, expert 0 gets 1 row, expert 4 gets 11 rows.
  std::vector<int32_t> group_expert = {3, 0, 4};
  std::vector<int32_t> row_index = {4, 0, 18, 7};
  for (int i = 0; i < 11; ++i) row_index.push_back((i * 5 + 1) % N);
  std::vector<int32_t> offsets = {0, 3, 4, 15};
  const int64_t M = static_cast<int64_t>(row_index.size());
  std::vector<float> want(M * out), xin, yexp, wdq(out * in), xall, wall;
  for (int g = 0; g < 3; ++g) {
    const int64_t e = group_expert[g], n = offsets[g + 1] - offsets[g];
    xin.assign(n * in, 0.0f);
    for (int64_t i = 0; i < n; ++i)
      std::copy(x.begin() + row_index[offsets[g] + i] * in, x.begin() + (row_index[offsets[g] + i] + 1) * in, xin.begin() + i * in);
    yexp.assign(n * out, 0.0f);
    cpu::MxFp4MatMul(xin.data(), n, in, codes.data() + e * out * in / 2, scales.data() + e * out * in / 32, out, yexp.data());
    std::copy(yexp.begin(), yexp.end(), want.begin() + offsets[g] * out);
  }
  auto dx = Up(x), dc = Up(codes), ds = Up(scales), dge = Up(group_expert), dri = Up(row_index), doff = Up(offsets);
  auto dy = Zeros(want.size() * 4);
  ASSERT_TRUE(cuda::MxFp4GroupedMatMul(dx.as<float>(), in, dc.as<uint8_t>(), ds.as<uint8_t>(), out, 3, doff.as<int32_t>(),
                                       dge.as<int32_t>(), dri.as<int32_t>(), dy.as<float>(), nullptr).ok());
  auto got = Down<float>(dy, want.size());
  // Bound: 1e-5 relative to max(|want|, 1) * sqrt-free worst case is loose here;
  // use the per-output |x||w| bound against each group's dequantized expert.
  for (int g = 0; g < 3; ++g) {
    const int64_t e = group_expert[g], n = offsets[g + 1] - offsets[g];
    cpu::DequantizeMxFp4(codes.data() + e * out * in / 2, scales.data() + e * out * in / 32, out, in, wdq.data());
    xall.assign(n * in, 0.0f);
    for (int64_t i = 0; i < n; ++i)
      std::copy(x.begin() + row_index[offsets[g] + i] * in, x.begin() + (row_index[offsets[g] + i] + 1) * in, xall.begin() + i * in);
    std::vector<float> gg(got.begin() + offsets[g] * out, got.begin() + offsets[g + 1] * out);
    std::vector<float> ww(want.begin() + offsets[g] * out, want.begin() + offsets[g + 1] * out);
    EXPECT_TRUE(DotClose(gg, ww, xall, wdq, n, in, out, 1e-5f, seed, "grouped g=" + std::to_string(g)));
  }
}

TEST(CudaMatMulTest, DenseF32AndBf16MatchCpuMatMul) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 23;
  std::mt19937_64 rng(seed);
  auto blas = cuda::Blas::Create();
  ASSERT_TRUE(blas.ok()) << blas.status();
  struct S { int64_t T, in, out; };
  for (S s : {S{1, 1, 1}, S{1, 4096, 7}, S{7, 19, 111}, S{19, 989, 111}, S{111, 64, 989}, S{989, 7, 19}}) {
    auto x = RandomFloats(rng, s.T * s.in), w = RandomFloats(rng, s.out * s.in);
    std::vector<float> want(s.T * s.out);
    cpu::MatMul(x.data(), s.T, s.in, w.data(), s.out, want.data());
    auto dx = Up(x), dw = Up(w);
    auto dy = Zeros(want.size() * 4);
    ASSERT_TRUE(cuda::MatMulF32(*blas, dx.as<float>(), s.T, s.in, dw.as<float>(), s.out, dy.as<float>(), nullptr).ok());
    const std::string tag = " T=" + std::to_string(s.T) + " in=" + std::to_string(s.in) + " out=" + std::to_string(s.out);
    // Bound: 1e-5 * sum|x w| (no TF32: a TF32 product would miss it by ~1e-3).
    EXPECT_TRUE(DotClose(Down<float>(dy, want.size()), want, x, w, s.T, s.in, s.out, 1e-5f, seed, "f32" + tag));

    // bf16: the CPU twin rounds x and W to bf16 (RNE) and multiplies in f32.
    std::vector<float> xb(x.size()), wb(w.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = Bf16ToF32(F32ToBf16(x[i]));
    for (size_t i = 0; i < w.size(); ++i) wb[i] = Bf16ToF32(F32ToBf16(w[i]));
    std::vector<float> wantb(s.T * s.out);
    cpu::MatMul(xb.data(), s.T, s.in, wb.data(), s.out, wantb.data());
    auto dxb = Zeros(x.size() * 2), dwb = Zeros(w.size() * 2);
    ASSERT_TRUE(cuda::F32ToBf16(dx.as<float>(), static_cast<int64_t>(x.size()), dxb.as<uint16_t>(), nullptr).ok());
    ASSERT_TRUE(cuda::F32ToBf16(dw.as<float>(), static_cast<int64_t>(w.size()), dwb.as<uint16_t>(), nullptr).ok());
    // The conversion itself is exact-equal to the host's F32ToBf16.
    auto got_xb = Down<uint16_t>(dxb, x.size());
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(got_xb[i], F32ToBf16(x[i])) << "seed " << seed << " i " << i;
    ASSERT_TRUE(cuda::MatMulBf16(*blas, dxb.as<uint16_t>(), s.T, s.in, dwb.as<uint16_t>(), s.out, dy.as<float>(), nullptr).ok());
    // Bound: bf16 x bf16 products are exact in fp32; fp32 accumulation: 1e-5 * sum|x w|.
    EXPECT_TRUE(DotClose(Down<float>(dy, wantb.size()), wantb, xb, wb, s.T, s.in, s.out, 1e-5f, seed, "bf16" + tag));
  }
}

}  // namespace
}  // namespace retort
