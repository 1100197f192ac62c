// The tensor-core MXFP4 GEMMs (single and grouped over experts) against
// cpu::MxFp4MatMul on bf16-rounded x, at odd shapes, for both CTA tiles, and
// their shape checks; and the decode kernels (MxFp4GroupedGateUp,
// MxFp4GroupedMatMulDecode) on f32 x against the CPU twin and for
// determinism. Needs a GPU: skips cleanly without one.
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
#include <cstring>
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


// ---------------------------------------------------------------------------
// Decode kernels (MxFp4GroupedGateUp, MxFp4GroupedMatMulDecode): f32 x split
// exactly into three bf16 terms, so the products are exact and only the fp32
// summation order differs from the CPU twin (cpu::MxFp4MatMul, then the CPU
// SwiGLU of ModelRunner::MoeBlock). Bound per pre-activation: kRel * sum|x w|
// + 1e-6, the same tensor-core adder bound as above. SwiGLU is 1-Lipschitz in
// the clamped u and has |silu'| <= 1.1, so per h value
//   |dh| <= 1.1 |u_c| Bg + |silu(g_c)| Bu + 1e-5 |h| + 1e-6
// (Bg, Bu the pre-activation bounds; 1e-5 |h| covers expf's ulps).
struct DecodeCase {
  int64_t in, out;
  std::vector<int> group_rows;  // rows per group (0 = an empty group)
};

struct DecodeProblem {
  int64_t E, in, out, N;
  std::vector<float> x;  // [N, in], full f32 (not bf16-rounded)
  std::vector<uint8_t> c1, s1, c3, s3;
  std::vector<int32_t> offsets, experts, rows;
};

DecodeProblem MakeDecodeProblem(std::mt19937_64& rng, const DecodeCase& dc) {
  DecodeProblem p;
  p.E = static_cast<int64_t>(dc.group_rows.size()) + 2;
  p.in = dc.in, p.out = dc.out;
  p.N = 1;
  for (int r : dc.group_rows) p.N = std::max<int64_t>(p.N, r);
  p.N += 3;
  std::normal_distribution<float> n01;
  p.x.resize(p.N * p.in);
  for (auto& v : p.x) v = n01(rng);
  auto fill = [&](std::vector<uint8_t>& c, std::vector<uint8_t>& s) {
    c.resize(p.E * p.out * p.in / 2);
    s.resize(p.E * p.out * p.in / 32);
    for (auto& b : c) b = static_cast<uint8_t>(rng() & 0xff);
    for (auto& b : s) b = static_cast<uint8_t>(118 + rng() % 14);  // 2^-9 .. 2^4: includes scale bytes > 128
  };
  fill(p.c1, p.s1);
  fill(p.c3, p.s3);
  // Group g uses expert (3 g + 1) % E (non-sorted), rows drawn without
  // repetition inside a group (as top-k routing gives).
  p.offsets = {0};
  for (size_t g = 0; g < dc.group_rows.size(); ++g) {
    p.experts.push_back(static_cast<int32_t>((3 * g + 1) % p.E));
    std::vector<int32_t> ids(p.N);
    for (int32_t i = 0; i < p.N; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), rng);
    p.rows.insert(p.rows.end(), ids.begin(), ids.begin() + dc.group_rows[g]);
    p.offsets.push_back(static_cast<int32_t>(p.rows.size()));
  }
  return p;
}

// want[m, o] = the CPU twin and mag[m, o] = sum_i |x_i w_i| for W = codes.
void CpuGrouped(const DecodeProblem& p, const std::vector<uint8_t>& codes, const std::vector<uint8_t>& scales,
                std::vector<float>& want, std::vector<double>& mag) {
  const int64_t M = static_cast<int64_t>(p.rows.size()), in = p.in, out = p.out;
  want.assign(M * out, 0.0f);
  mag.assign(M * out, 0.0);
  std::vector<float> w(out * in), xg;
  for (size_t g = 0; g + 1 < p.offsets.size(); ++g) {
    const int64_t e = p.experts[g], m0 = p.offsets[g], n = p.offsets[g + 1] - m0;
    if (n == 0) continue;
    xg.assign(n * in, 0.0f);
    for (int64_t i = 0; i < n; ++i) std::copy_n(p.x.begin() + p.rows[m0 + i] * in, in, xg.begin() + i * in);
    cpu::MxFp4MatMul(xg.data(), n, in, codes.data() + e * out * in / 2, scales.data() + e * out * in / 32, out,
                     want.data() + m0 * out);
    cpu::DequantizeMxFp4(codes.data() + e * out * in / 2, scales.data() + e * out * in / 32, out, in, w.data());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t o = 0; o < out; ++o) {
        double s = 0.0;
        for (int64_t k = 0; k < in; ++k) s += std::fabs(static_cast<double>(xg[i * in + k]) * w[o * in + k]);
        mag[(m0 + i) * out + o] = s;
      }
  }
}

TEST(CudaMxFp4DecodeTest, GateUpAndMatMulMatchCpuTwinAtOddShapes) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 41;
  std::mt19937_64 rng(seed);
  const float limit = 7.0f;  // V4's swiglu_limit scale: some g and u clamp
  const std::vector<DecodeCase> cases = {
      {4096, 72, {1, 7, 0, 19}},          // V4 in; rows 1, 7, 19 (3 passes); an empty group
      {640, 111, {111, 1, 0, 5, 2, 9}},  // in not a power of two (nor % 512); 111 rows = 14 passes
      {96, 19, {3, 1, 6}},               // in < one 512-k chunk, in / 32 odd (byte scale loads)
      {2048, 200, {1}},                  // one row, out % 32 != 0
  };
  for (const DecodeCase& dc : cases) {
    DecodeProblem p = MakeDecodeProblem(rng, dc);
    const int64_t M = static_cast<int64_t>(p.rows.size()), in = p.in, out = p.out;
    const int groups = static_cast<int>(dc.group_rows.size());
    std::vector<float> g_want, u_want;
    std::vector<double> g_mag, u_mag;
    CpuGrouped(p, p.c1, p.s1, g_want, g_mag);
    CpuGrouped(p, p.c3, p.s3, u_want, u_mag);
    auto dx = Up(p.x), dc1 = Up(p.c1), ds1 = Up(p.s1), dc3 = Up(p.c3), ds3 = Up(p.s3);
    auto doff = Up(p.offsets), dexp = Up(p.experts), drows = Up(p.rows);
    const std::string tag = "in=" + std::to_string(in) + " out=" + std::to_string(out);
    for (float lim : {limit, 0.0f}) {
      auto dh = Zeros(std::max<int64_t>(M, 1) * out * 4);
      ASSERT_TRUE(cuda::MxFp4GroupedGateUp(dx.as<float>(), in, dc1.as<uint8_t>(), ds1.as<uint8_t>(), dc3.as<uint8_t>(),
                                           ds3.as<uint8_t>(), out, lim, groups, doff.as<int32_t>(),
                                           dexp.as<int32_t>(), drows.as<int32_t>(), dh.as<float>(), nullptr)
                      .ok());
      const std::vector<float> h = Down<float>(dh, M * out);
      int bad = 0;
      double worst = 0.0;
      for (int64_t i = 0; i < M * out; ++i) {
        float gi = g_want[i], ui = u_want[i];
        if (lim > 0) {
          gi = std::min(gi, lim);
          ui = std::clamp(ui, -lim, lim);
        }
        const float want = cpu::Silu(gi) * ui;
        const double bg = kRel * g_mag[i] + 1e-6, bu = kRel * u_mag[i] + 1e-6;
        const double bound = 1.1 * std::fabs(ui) * bg + std::fabs(cpu::Silu(gi)) * bu + 1e-5 * std::fabs(want) + 1e-6;
        const double err = std::fabs(static_cast<double>(h[i]) - want);
        worst = std::max(worst, err / bound);
        if (!(err <= bound) && bad++ < 5)
          ADD_FAILURE() << "gate/up " << tag << " limit " << lim << " (seed " << seed << "): [" << i / out << ", "
                        << i % out << "] got " << h[i] << " want " << want << " bound " << bound;
      }
      std::printf("gate/up %-18s limit %.0f: max err / bound = %.3f\n", tag.c_str(), lim, worst);
    }
    // The down-projection kernel on the same problem (W1 as the matrix).
    auto dy = Zeros(std::max<int64_t>(M, 1) * out * 4);
    ASSERT_TRUE(cuda::MxFp4GroupedMatMulDecode(dx.as<float>(), in, dc1.as<uint8_t>(), ds1.as<uint8_t>(), out, groups,
                                               doff.as<int32_t>(), dexp.as<int32_t>(), drows.as<int32_t>(),
                                               dy.as<float>(), nullptr)
                    .ok());
    const std::vector<float> y = Down<float>(dy, M * out);
    int bad = 0;
    double worst = 0.0;
    for (int64_t i = 0; i < M * out; ++i) {
      const double err = std::fabs(static_cast<double>(y[i]) - g_want[i]);
      worst = std::max(worst, err / std::max(g_mag[i], 1e-30));
      if (!(err <= kRel * g_mag[i] + 1e-6) && bad++ < 5)
        ADD_FAILURE() << "matmul " << tag << " (seed " << seed << "): [" << i / out << ", " << i % out << "] got "
                      << y[i] << " want " << g_want[i] << " sum|x w| " << g_mag[i];
    }
    std::printf("matmul  %-18s max err / sum|x w| = %.2e (bound %.0e)\n", tag.c_str(), worst, kRel);
  }
}

// Two runs are bitwise equal, and a group's output does not depend on which
// other groups share the launch (it equals the group launched alone).
TEST(CudaMxFp4DecodeTest, DeterministicAndIndependentOfOtherGroups) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 42;
  std::mt19937_64 rng(seed);
  DecodeProblem p = MakeDecodeProblem(rng, {1024, 160, {3, 8, 1, 0, 13}});
  const int64_t M = static_cast<int64_t>(p.rows.size()), in = p.in, out = p.out;
  const int groups = static_cast<int>(p.experts.size());
  auto dx = Up(p.x), dc1 = Up(p.c1), ds1 = Up(p.s1), dc3 = Up(p.c3), ds3 = Up(p.s3);
  auto doff = Up(p.offsets), dexp = Up(p.experts), drows = Up(p.rows);
  auto run = [&](const cuda::DeviceBuffer& off, const cuda::DeviceBuffer& ex, const cuda::DeviceBuffer& ri, int ng,
                 int64_t m, bool gate_up) {
    auto d = Zeros(std::max<int64_t>(m, 1) * out * 4);
    absl::Status st =
        gate_up ? cuda::MxFp4GroupedGateUp(dx.as<float>(), in, dc1.as<uint8_t>(), ds1.as<uint8_t>(), dc3.as<uint8_t>(),
                                           ds3.as<uint8_t>(), out, 7.0f, ng, off.as<int32_t>(), ex.as<int32_t>(),
                                           ri.as<int32_t>(), d.as<float>(), nullptr)
                : cuda::MxFp4GroupedMatMulDecode(dx.as<float>(), in, dc1.as<uint8_t>(), ds1.as<uint8_t>(), out, ng,
                                                 off.as<int32_t>(), ex.as<int32_t>(), ri.as<int32_t>(), d.as<float>(),
                                                 nullptr);
    EXPECT_TRUE(st.ok()) << st;
    return Down<float>(d, m * out);
  };
  for (bool gate_up : {true, false}) {
    const std::vector<float> a = run(doff, dexp, drows, groups, M, gate_up);
    const std::vector<float> b = run(doff, dexp, drows, groups, M, gate_up);
    ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << "two runs differ (gate_up " << gate_up << ")";
    // Group 1 (8 rows) alone.
    const int32_t m0 = p.offsets[1], n = p.offsets[2] - p.offsets[1];
    std::vector<int32_t> off1 = {0, n}, ex1 = {p.experts[1]}, ri1(p.rows.begin() + m0, p.rows.begin() + m0 + n);
    auto doff1 = Up(off1), dex1 = Up(ex1), dri1 = Up(ri1);
    const std::vector<float> alone = run(doff1, dex1, dri1, 1, n, gate_up);
    ASSERT_EQ(std::memcmp(alone.data(), a.data() + m0 * out, alone.size() * 4), 0)
        << "group 1 alone differs from group 1 among others (gate_up " << gate_up << ")";
  }
}

TEST(CudaMxFp4DecodeTest, RejectsUnsupportedShapes) {
  RETORT_SKIP_WITHOUT_CUDA();
  auto x = Zeros(4096 * 4), c = Zeros(4096), s = Zeros(256), y = Zeros(4096 * 4), off = Zeros(8), ex = Zeros(8);
  absl::Status st = cuda::MxFp4GroupedMatMulDecode(x.as<float>(), 48, c.as<uint8_t>(), s.as<uint8_t>(), 8, 1,
                                                   off.as<int32_t>(), ex.as<int32_t>(), nullptr, y.as<float>(), nullptr);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("multiple of 32"), std::string::npos) << st;
  st = cuda::MxFp4GroupedGateUp(x.as<float>() + 1, 64, c.as<uint8_t>(), s.as<uint8_t>(), c.as<uint8_t>(),
                                s.as<uint8_t>(), 8, 0.0f, 1, off.as<int32_t>(), ex.as<int32_t>(), nullptr, y.as<float>(),
                                nullptr);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  st = cuda::MxFp4GroupedMatMulDecode(x.as<float>(), 64, c.as<uint8_t>(), s.as<uint8_t>(), 8, 1, nullptr, nullptr,
                                      nullptr, y.as<float>(), nullptr);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(cuda::MxFp4GroupedMatMulDecode(x.as<float>(), 64, c.as<uint8_t>(), s.as<uint8_t>(), 8, 0, nullptr,
                                             nullptr, nullptr, y.as<float>(), nullptr)
                  .ok());
}

}  // namespace
}  // namespace retort
