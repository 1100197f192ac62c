// The tensor-core MXFP4 GEMMs (single and grouped over experts) against
// cpu::MxFp4MatMul on bf16-rounded x, at odd shapes, for both CTA tiles, and
// their shape checks. Needs a GPU: skips cleanly without one.
//
// Bound: x (bf16) times a decoded weight (e2m1 x 2^k, <= 2 significant bits)
// is exact in fp32, so the GPU and the CPU twin add the same products in a
// different order (the tensor cores' fp32 adder tree in blocks of 16 k, the
// CPU sequentially). Per output |got - want| <= 5e-5 * sum_i |x_i w_i| + 1e-6;
// a single wrong weight of average size moves an output by ~1/in of that sum
// (2.4e-4 at in = 4096, more at smaller in), so the bound still catches it.
// The largest observed ratio err / sum|x w| is printed for the record.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/kernels/cpu/cpu_kernels.h"
#include "model/kernels/cuda/mxfp4.cuh"
#include "model/tensor/dtype.h"
#include "tests/kernels/cuda_test_util.h"

namespace retort {
namespace {

using testing::Down;
using testing::Up;
using testing::Zeros;

constexpr double kRel = 5e-5;

struct Problem {
  std::vector<uint16_t> xbf;  // bf16 bits, what the kernel reads
  std::vector<float> x;       // the same values in f32, what the twin reads
  std::vector<uint8_t> codes, scales;
};

Problem RandomProblem(std::mt19937_64& rng, int64_t rows, int64_t in, int64_t weight_rows, int scale_lo,
                      int scale_hi) {
  Problem p;
  std::normal_distribution<float> n01;
  p.xbf.resize(rows * in);
  p.x.resize(rows * in);
  for (int64_t i = 0; i < rows * in; ++i) {
    p.xbf[i] = F32ToBf16(n01(rng));
    p.x[i] = Bf16ToF32(p.xbf[i]);
  }
  p.codes.resize(weight_rows * in / 2);
  p.scales.resize(weight_rows * in / 32);
  for (auto& c : p.codes) c = static_cast<uint8_t>(rng() & 0xff);
  for (auto& s : p.scales) s = static_cast<uint8_t>(scale_lo + rng() % (scale_hi - scale_lo + 1));
  return p;
}

// Checks got against want row by row; x rows given by x_row(m), weights by
// the dequantized w [out, in]. Returns the worst err / sum|x w|.
template <typename XRow>
double CheckRows(const std::vector<float>& got, const std::vector<float>& want, int64_t m0, int64_t m1, XRow x_row,
                 const std::vector<float>& w, int64_t in, int64_t out, uint64_t seed, const std::string& what,
                 bool* ok) {
  double worst = 0.0;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x_row(m);
    for (int64_t o = 0; o < out; ++o) {
      double mag = 0.0;
      for (int64_t i = 0; i < in; ++i) mag += std::fabs(static_cast<double>(xr[i]) * w[o * in + i]);
      const double err = std::fabs(static_cast<double>(got[m * out + o]) - want[m * out + o]);
      worst = std::max(worst, err / std::max(mag, 1e-30));
      if (!(err <= kRel * mag + 1e-6)) {
        if (*ok)
          ADD_FAILURE() << what << " (seed " << seed << "): [" << m << ", " << o << "] got " << got[m * out + o]
                        << " want " << want[m * out + o] << " sum|x w| " << mag;
        *ok = false;
      }
    }
  }
  return worst;
}

const char* TileName(cuda::MxFp4MmaTile t) {
  switch (t) {
    case cuda::MxFp4MmaTile::kAuto: return "auto";
    case cuda::MxFp4MmaTile::k128x256: return "128x256";
    case cuda::MxFp4MmaTile::k64x256: return "64x256";
    case cuda::MxFp4MmaTile::k64x128: return "64x128";
    case cuda::MxFp4MmaTile::k64x64: return "64x64";
    case cuda::MxFp4MmaTile::k128x256SmemDecode: return "128x256smem";
  }
  return "?";
}

TEST(CudaMxFp4MmaTest, MatchesCpuTwinAtOddShapes) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 31;
  std::mt19937_64 rng(seed);
  struct S {
    int64_t M, in, out;
    int scale_lo, scale_hi;  // E8M0 bytes; > 128 takes the two-multiply decode
  };
  // out: tails of every kind (not a multiple of 8, 128 or 256); in: multiples of 128.
  const S shapes[] = {{1, 128, 8, 118, 128},      {7, 384, 19, 118, 128},    {19, 1024, 111, 100, 140},
                      {111, 640, 989, 118, 128},  {989, 2048, 264, 120, 131}, {4096, 1024, 136, 118, 128},
                      {300, 4096, 513, 0, 128}};
  for (const S& s : shapes) {
    Problem p = RandomProblem(rng, s.M, s.in, s.out, s.scale_lo, s.scale_hi);
    std::vector<float> want(s.M * s.out), w(s.out * s.in);
    cpu::MxFp4MatMul(p.x.data(), s.M, s.in, p.codes.data(), p.scales.data(), s.out, want.data());
    cpu::DequantizeMxFp4(p.codes.data(), p.scales.data(), s.out, s.in, w.data());
    auto dx = Up(p.xbf), dc = Up(p.codes), ds = Up(p.scales);
    for (cuda::MxFp4MmaTile tile : {cuda::MxFp4MmaTile::k128x256, cuda::MxFp4MmaTile::k64x256,
                                    cuda::MxFp4MmaTile::k64x128, cuda::MxFp4MmaTile::k64x64,
                                    cuda::MxFp4MmaTile::k128x256SmemDecode}) {
      auto dy = Zeros(want.size() * 4);
      ASSERT_TRUE(cuda::MxFp4MatMulTensorCore(dx.as<uint16_t>(), s.M, s.in, dc.as<uint8_t>(), ds.as<uint8_t>(), s.out,
                                              dy.as<float>(), nullptr, tile)
                      .ok());
      const std::vector<float> got = Down<float>(dy, want.size());
      const std::string what = std::string("mma ") + TileName(tile) + " M=" + std::to_string(s.M) +
                               " in=" + std::to_string(s.in) + " out=" + std::to_string(s.out);
      bool ok = true;
      const double worst = CheckRows(
          got, want, 0, s.M, [&](int64_t m) { return p.x.data() + m * s.in; }, w, s.in, s.out, seed, what, &ok);
      std::printf("%-40s max err / sum|x w| = %.2e (bound %.0e)\n", what.c_str(), worst, kRel);
      EXPECT_TRUE(ok) << what;
    }
  }
}

TEST(CudaMxFp4MmaTest, GroupedOverExpertsWithPermutationMatchesCpuTwin) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 32;
  std::mt19937_64 rng(seed);
  const int64_t E = 7, in = 512, out = 300, tokens = 211, top_k = 3;
  Problem p = RandomProblem(rng, tokens, in, E * out, 118, 129);
  // Route each token to top_k distinct experts, then group the pairs by expert
  // (expert 5 gets none: an absent group).
  std::vector<std::vector<int32_t>> by_expert(E);
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int32_t> ids = {0, 1, 2, 3, 4, 6};
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int k = 0; k < top_k; ++k) by_expert[ids[k]].push_back(static_cast<int32_t>(t));
  }
  std::vector<int32_t> offsets = {0}, experts, rows;
  for (int32_t e : {6, 2, 0, 4, 1, 3}) {  // groups in a non-sorted expert order
    experts.push_back(e);
    rows.insert(rows.end(), by_expert[e].begin(), by_expert[e].end());
    offsets.push_back(static_cast<int32_t>(rows.size()));
  }
  const int groups = static_cast<int>(experts.size());
  const int64_t M = static_cast<int64_t>(rows.size());
  auto dx = Up(p.xbf), dc = Up(p.codes), ds = Up(p.scales), doff = Up(offsets), dexp = Up(experts), drows = Up(rows);
  for (cuda::MxFp4MmaTile tile : {cuda::MxFp4MmaTile::kAuto, cuda::MxFp4MmaTile::k128x256,
                                  cuda::MxFp4MmaTile::k64x256, cuda::MxFp4MmaTile::k64x128,
                                  cuda::MxFp4MmaTile::k64x64, cuda::MxFp4MmaTile::k128x256SmemDecode}) {
    auto dy = Zeros(M * out * 4);
    // rows hint deliberately low for the explicit tiles: CTAs then loop over M tiles.
    const int64_t hint = tile == cuda::MxFp4MmaTile::kAuto ? M : groups;
    ASSERT_TRUE(cuda::MxFp4GroupedMatMulTensorCore(dx.as<uint16_t>(), in, dc.as<uint8_t>(), ds.as<uint8_t>(), out,
                                                   groups, hint, doff.as<int32_t>(), dexp.as<int32_t>(),
                                                   drows.as<int32_t>(), dy.as<float>(), nullptr, tile)
                    .ok());
    const std::vector<float> got = Down<float>(dy, M * out);
    double worst = 0.0;
    bool ok = true;
    std::vector<float> w(out * in), xg, want(M * out);
    for (int g = 0; g < groups; ++g) {
      const int64_t e = experts[g], n = offsets[g + 1] - offsets[g];
      xg.assign(n * in, 0.0f);
      for (int64_t i = 0; i < n; ++i)
        std::copy_n(p.x.begin() + rows[offsets[g] + i] * in, in, xg.begin() + i * in);
      cpu::MxFp4MatMul(xg.data(), n, in, p.codes.data() + e * out * in / 2, p.scales.data() + e * out * in / 32, out,
                       want.data() + offsets[g] * out);
      cpu::DequantizeMxFp4(p.codes.data() + e * out * in / 2, p.scales.data() + e * out * in / 32, out, in, w.data());
      worst = std::max(worst, CheckRows(
                                  got, want, offsets[g], offsets[g + 1],
                                  [&](int64_t m) { return p.x.data() + rows[m] * in; }, w, in, out, seed,
                                  std::string("grouped ") + TileName(tile) + " g=" + std::to_string(g), &ok));
    }
    std::printf("grouped %-8s M=%lld: max err / sum|x w| = %.2e (bound %.0e)\n", TileName(tile),
                static_cast<long long>(M), worst, kRel);
    EXPECT_TRUE(ok);
  }
}

TEST(CudaMxFp4MmaTest, RejectsUnsupportedShapes) {
  RETORT_SKIP_WITHOUT_CUDA();
  auto x = Zeros(4096 * 2), c = Zeros(4096), s = Zeros(256), y = Zeros(4096 * 4);
  // in must be a multiple of 128 (one pipeline stage); 96 is a valid MX size but not supported here.
  absl::Status st = cuda::MxFp4MatMulTensorCore(x.as<uint16_t>(), 2, 96, c.as<uint8_t>(), s.as<uint8_t>(), 8,
                                                y.as<float>(), nullptr);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("multiple of 128"), std::string::npos) << st;
  st = cuda::MxFp4MatMulTensorCore(x.as<uint16_t>() + 1, 2, 128, c.as<uint8_t>(), s.as<uint8_t>(), 8, y.as<float>(),
                                   nullptr);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  st = cuda::MxFp4GroupedMatMulTensorCore(x.as<uint16_t>(), 128, c.as<uint8_t>(), s.as<uint8_t>(), 8, 1, 2, nullptr,
                                          nullptr, nullptr, y.as<float>(), nullptr);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  // Empty problems are fine.
  EXPECT_TRUE(cuda::MxFp4MatMulTensorCore(x.as<uint16_t>(), 0, 128, c.as<uint8_t>(), s.as<uint8_t>(), 8, y.as<float>(),
                                          nullptr)
                  .ok());
}

}  // namespace
}  // namespace retort
