// CUDA row/elementwise ops, mHC and the MoE router against their CPU twins
// (cpu_kernels and the ModelRunner code they mirror), at odd shapes. Needs a
// GPU: skips cleanly without one.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "model/kernels/cpu/cpu_kernels.h"
#include "model/kernels/cuda/fp8_gemm.cuh"
#include "model/kernels/cuda/mhc.cuh"
#include "model/kernels/cuda/moe_router.cuh"
#include "model/kernels/cuda/norm_rope.cuh"
#include "tests/kernels/cuda_test_util.h"

namespace retort {
namespace {

using testing::AllClose;
using testing::Down;
using testing::RandomFloats;
using testing::Up;
using testing::Zeros;

constexpr int64_t kRows[] = {1, 7, 19, 111, 989};

TEST(CudaOpsTest, RmsNormMatchesCpu) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 11;
  std::mt19937_64 rng(seed);
  for (int64_t T : kRows)
    for (int64_t D : {int64_t{7}, int64_t{128}, int64_t{989}, int64_t{4096}})
      for (bool weighted : {false, true}) {
        auto x = RandomFloats(rng, T * D, -3.0f, 3.0f);
        auto w = RandomFloats(rng, D, 0.5f, 1.5f);
        std::vector<float> want(T * D);
        cpu::RmsNorm(x.data(), T, D, weighted ? w.data() : nullptr, 1e-6f, want.data());
        auto dx = Up(x), dw = Up(w);
        auto dy = Zeros(x.size() * 4);
        ASSERT_TRUE(cuda::RmsNorm(dx.as<float>(), T, D, weighted ? dw.as<float>() : nullptr, 1e-6f, dy.as<float>(), nullptr).ok());
        // Bound: the sum of squares is reduced in another order (fp32): 2e-6 relative.
        EXPECT_TRUE(AllClose(Down<float>(dy, x.size()), want, 1e-6f, 2e-6f, seed, "rmsnorm T=" + std::to_string(T) + " D=" + std::to_string(D)));
      }
}

TEST(CudaOpsTest, RopeAndInverseMatchCpuAtPerRowPositions) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 12;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> posd(0, 70000);
  for (int64_t rows : kRows) {
    const int64_t heads = 3, dim = 96, rope_dim = 64, half = rope_dim / 2;
    std::vector<float> inv_freq(half);
    for (int64_t i = 0; i < half; ++i) inv_freq[i] = std::pow(160000.0f, -2.0f * i / rope_dim);
    std::vector<int64_t> pos(rows);
    for (auto& p : pos) p = posd(rng);
    auto x = RandomFloats(rng, rows * heads * dim);
    for (float sign : {1.0f, -1.0f}) {
      std::vector<float> want = x;
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<float> cs(half), sn(half);
        for (int64_t i = 0; i < half; ++i) {
          const float angle = inv_freq[i] * static_cast<float>(pos[r]);
          cs[i] = std::cos(angle);
          sn[i] = std::sin(angle);
        }
        cpu::ApplyRope(want.data() + r * heads * dim, heads, dim, rope_dim, cs.data(), sn.data(), sign);
      }
      auto dx = Up(x), dp = Up(pos), df = Up(inv_freq);
      ASSERT_TRUE(cuda::RopeAtPositions(dx.as<float>(), rows, heads, dim, rope_dim, dp.as<int64_t>(), df.as<float>(), sign, nullptr).ok());
      // Bound: device cosf/sinf vs glibc (<= 2 ulp each) on |x| <= 1: 1e-6 absolute
      // (the nope dims must be bitwise unchanged, covered by the same bound).
      EXPECT_TRUE(AllClose(Down<float>(dx, x.size()), want, 1e-6f, 0.0f, seed, "rope rows=" + std::to_string(rows)));
    }
  }
}

// The fused launches equal the separate ones bit for bit: RmsNormQuant =
// RmsNorm then Fp8QuantDequant; RmsNormRope = RmsNorm (per head row) then
// RopeAtPositions. Odd widths exercise the partial last 128-block.
TEST(CudaOpsTest, FusedNormQuantAndNormRopeEqualTheSeparateOps) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 13;
  std::mt19937_64 rng(seed);
  for (int64_t T : kRows)
    for (int64_t D : {int64_t{64}, int64_t{304}, int64_t{1024}, int64_t{4096}}) {
      auto x = RandomFloats(rng, T * D, -3.0f, 3.0f);
      auto w = RandomFloats(rng, D, 0.5f, 1.5f);
      auto dx = Up(x), dw = Up(w);
      auto y1 = Zeros(4 * T * D), y2 = Zeros(4 * T * D), q1 = Zeros(2 * T * D), q2 = Zeros(2 * T * D);
      ASSERT_TRUE(cuda::RmsNorm(dx.as<float>(), T, D, dw.as<float>(), 1e-6f, y1.as<float>(), nullptr).ok());
      ASSERT_TRUE(cuda::Fp8QuantDequant(y1.as<float>(), T, D, D, q1.as<uint16_t>(), nullptr).ok());
      ASSERT_TRUE(
          cuda::RmsNormQuant(dx.as<float>(), T, D, dw.as<float>(), 1e-6f, y2.as<float>(), q2.as<uint16_t>(), nullptr)
              .ok());
      ASSERT_EQ(Down<float>(y1, T * D), Down<float>(y2, T * D)) << "T=" << T << " D=" << D;
      ASSERT_EQ(Down<uint16_t>(q1, T * D), Down<uint16_t>(q2, T * D)) << "T=" << T << " D=" << D;
    }
  std::uniform_int_distribution<int64_t> posd(0, 70000);
  for (int64_t rows : kRows)
    for (int64_t heads : {int64_t{1}, int64_t{5}}) {
      const int64_t D = 192, rope_dim = 64;
      std::vector<float> inv_freq(rope_dim / 2);
      for (int64_t i = 0; i < rope_dim / 2; ++i) inv_freq[i] = std::pow(10000.0f, -2.0f * i / rope_dim);
      std::vector<int64_t> pos(rows);
      for (auto& p : pos) p = posd(rng);
      auto x = RandomFloats(rng, rows * heads * D, -3.0f, 3.0f);
      auto w = RandomFloats(rng, D, 0.5f, 1.5f);
      auto dx = Up(x), dw = Up(w), dp = Up(pos), df = Up(inv_freq);
      for (bool weighted : {false, true}) {
        const float* wp = weighted ? dw.as<float>() : nullptr;
        auto y1 = Zeros(4 * x.size()), y2 = Zeros(4 * x.size());
        ASSERT_TRUE(cuda::RmsNorm(dx.as<float>(), rows * heads, D, wp, 1e-6f, y1.as<float>(), nullptr).ok());
        ASSERT_TRUE(cuda::RopeAtPositions(y1.as<float>(), rows, heads, D, rope_dim, dp.as<int64_t>(), df.as<float>(),
                                          1.0f, nullptr)
                        .ok());
        ASSERT_TRUE(cuda::RmsNormRope(dx.as<float>(), rows, heads, D, wp, 1e-6f, rope_dim, dp.as<int64_t>(),
                                      df.as<float>(), y2.as<float>(), nullptr)
                        .ok());
        ASSERT_EQ(Down<float>(y1, x.size()), Down<float>(y2, x.size())) << "rows=" << rows << " heads=" << heads;
      }
    }
}

TEST(CudaOpsTest, EmbedToStreamsCopiesRowsExactly) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 13;
  std::mt19937_64 rng(seed);
  const int64_t V = 111, d = 19;
  const int hc = 4;
  auto embed = RandomFloats(rng, V * d);
  for (int64_t rows : kRows) {
    std::vector<int64_t> tok(rows);
    for (auto& t : tok) t = static_cast<int64_t>(rng() % V);
    std::vector<float> want(rows * hc * d);
    for (int64_t r = 0; r < rows; ++r)
      for (int j = 0; j < hc; ++j) std::copy(embed.begin() + tok[r] * d, embed.begin() + (tok[r] + 1) * d, want.begin() + (r * hc + j) * d);
    auto de = Up(embed), dt = Up(tok);
    auto dx = Zeros(want.size() * 4);
    ASSERT_TRUE(cuda::EmbedToStreams(de.as<float>(), dt.as<int64_t>(), rows, d, hc, dx.as<float>(), nullptr).ok());
    EXPECT_TRUE(AllClose(Down<float>(dx, want.size()), want, 0.0f, 0.0f, seed, "embed"));  // exact copy
  }
}

TEST(CudaOpsTest, SwiGluWithClampsMatchesCpu) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 14;
  std::mt19937_64 rng(seed);
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{19}, int64_t{111}, int64_t{989}, int64_t{2048 * 7}})
    for (float limit : {0.0f, 10.0f}) {
      auto g = RandomFloats(rng, n, -15.0f, 15.0f), u = RandomFloats(rng, n, -15.0f, 15.0f);
      std::vector<float> want(n);
      for (int64_t i = 0; i < n; ++i) {
        float gi = g[i], ui = u[i];
        if (limit > 0) {
          gi = std::min(gi, limit);
          ui = std::clamp(ui, -limit, limit);
        }
        want[i] = cpu::Silu(gi) * ui;
      }
      auto dg = Up(g), du = Up(u);
      auto dh = Zeros(n * 4);
      ASSERT_TRUE(cuda::SwiGlu(dg.as<float>(), du.as<float>(), n, limit, dh.as<float>(), nullptr).ok());
      // Bound: expf differs from glibc by <= 2 ulp: 1e-6 relative + 1e-7 absolute.
      EXPECT_TRUE(AllClose(Down<float>(dh, n), want, 1e-7f, 1e-6f, seed, "swiglu n=" + std::to_string(n)));
    }
}

// ModelRunner::HcPre / HcPost / hc_head, transcribed (the CPU specification).
void CpuHcPre(const cuda::HcParams& p, const std::vector<float>& X, int64_t rows, const std::vector<float>& fn,
              const std::vector<float>& base, const std::vector<float>& scale, std::vector<float>& u,
              std::vector<float>& post, std::vector<float>& comb) {
  const int hc = p.hc;
  const int64_t d = p.d, width = hc * d, mix = (2 + hc) * hc;
  std::vector<float> mixes(rows * mix);
  cpu::MatMul(X.data(), rows, width, fn.data(), mix, mixes.data());
  u.assign(rows * d, 0.0f);
  post.resize(rows * hc);
  comb.resize(rows * hc * hc);
  std::vector<float> pre(hc);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = X.data() + r * width;
    float ss = 0.0f;
    for (int64_t i = 0; i < width; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(width) + p.rms_eps);
    const float* mr = mixes.data() + r * mix;
    for (int j = 0; j < hc; ++j) {
      pre[j] = cpu::Sigmoid(mr[j] * inv * scale[0] + base[j]) + p.hc_eps;
      post[r * hc + j] = 2.0f * cpu::Sigmoid(mr[hc + j] * inv * scale[1] + base[hc + j]);
    }
    float* cm = comb.data() + r * hc * hc;
    for (int k = 0; k < hc * hc; ++k) cm[k] = mr[2 * hc + k] * inv * scale[2] + base[2 * hc + k];
    cpu::SinkhornProject(cm, hc, p.sinkhorn_iters, p.hc_eps);
    for (int j = 0; j < hc; ++j)
      for (int64_t i = 0; i < d; ++i) u[r * d + i] += pre[j] * xr[j * d + i];
  }
}

TEST(CudaOpsTest, MhcPrePostAndHeadMatchModelRunner) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 15;
  std::mt19937_64 rng(seed);
  for (int64_t rows : kRows)
    for (int64_t d : {int64_t{19}, int64_t{256}, int64_t{1100}}) {  // 1100: 5 slices on the split path
      cuda::HcParams p;
      p.hc = 4;
      p.d = d;
      const int hc = p.hc, mix = (2 + hc) * hc;
      auto X = RandomFloats(rng, rows * hc * d, -2.0f, 2.0f);
      auto fn = RandomFloats(rng, mix * hc * d, -0.2f, 0.2f);
      auto base = RandomFloats(rng, mix, -1.0f, 1.0f);
      auto scale = RandomFloats(rng, 3, 0.5f, 2.0f);
      std::vector<float> u, post, comb;
      CpuHcPre(p, X, rows, fn, base, scale, u, post, comb);
      auto dX = Up(X), dfn = Up(fn), dbase = Up(base), dscale = Up(scale);
      auto du = Zeros(u.size() * 4), dpost = Zeros(post.size() * 4), dcomb = Zeros(comb.size() * 4);
      ASSERT_TRUE(cuda::HcPre(p, dX.as<float>(), rows, dfn.as<float>(), dbase.as<float>(), dscale.as<float>(),
                              du.as<float>(), dpost.as<float>(), dcomb.as<float>(), nullptr).ok());
      const std::string tag = " rows=" + std::to_string(rows) + " d=" + std::to_string(d);
      // Bounds: the mix dot products (width 4d) are summed in another order
      // (~1e-6 relative on mix); through sigmoid and 20 Sinkhorn rounds that
      // stays below 2e-5 absolute on post/comb (values in (0, 2)) and u.
      EXPECT_TRUE(AllClose(Down<float>(dpost, post.size()), post, 2e-5f, 0.0f, seed, "post" + tag));
      EXPECT_TRUE(AllClose(Down<float>(dcomb, comb.size()), comb, 2e-5f, 0.0f, seed, "comb" + tag));
      EXPECT_TRUE(AllClose(Down<float>(du, u.size()), u, 2e-5f, 2e-5f, seed, "u" + tag));
      {  // The split path (decode), same bounds.
        auto scratch = Zeros(4 * cuda::HcScratchFloats(p, rows));
        auto su = Zeros(u.size() * 4), spost = Zeros(post.size() * 4), scomb = Zeros(comb.size() * 4);
        ASSERT_TRUE(cuda::HcPre(p, dX.as<float>(), rows, dfn.as<float>(), dbase.as<float>(), dscale.as<float>(),
                                su.as<float>(), spost.as<float>(), scomb.as<float>(), scratch.as<float>(), nullptr)
                        .ok());
        EXPECT_TRUE(AllClose(Down<float>(spost, post.size()), post, 2e-5f, 0.0f, seed, "split post" + tag));
        EXPECT_TRUE(AllClose(Down<float>(scomb, comb.size()), comb, 2e-5f, 0.0f, seed, "split comb" + tag));
        EXPECT_TRUE(AllClose(Down<float>(su, u.size()), u, 2e-5f, 2e-5f, seed, "split u" + tag));
      }

      // HcPost on the device's own post/comb, against the CPU loop on the same inputs.
      auto F = RandomFloats(rng, rows * d);
      auto gpost = Down<float>(dpost, post.size()), gcomb = Down<float>(dcomb, comb.size());
      std::vector<float> want = X;
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<float> old(X.begin() + r * hc * d, X.begin() + (r + 1) * hc * d);
        for (int k = 0; k < hc; ++k)
          for (int64_t i = 0; i < d; ++i) {
            float v = gpost[r * hc + k] * F[r * d + i];
            for (int j = 0; j < hc; ++j) v += gcomb[r * hc * hc + j * hc + k] * old[j * d + i];
            want[(r * hc + k) * d + i] = v;
          }
      }
      auto dF = Up(F);
      ASSERT_TRUE(cuda::HcPost(p, dF.as<float>(), dpost.as<float>(), dcomb.as<float>(), rows, dX.as<float>(), nullptr).ok());
      // Bound: same operation order; only FMA contraction may differ: 1e-6 relative.
      EXPECT_TRUE(AllClose(Down<float>(dX, X.size()), want, 1e-6f, 1e-6f, seed, "hc_post" + tag));

      // hc_head: w_j = sigmoid(mix_j * inv * scale + base_j) + eps; y = sum w_j X_j.
      auto hfn = RandomFloats(rng, hc * hc * d, -0.2f, 0.2f);
      auto hbase = RandomFloats(rng, hc), hscale = RandomFloats(rng, 1, 0.5f, 2.0f);
      std::vector<float> hm(rows * hc), y(rows * d, 0.0f);
      cpu::MatMul(X.data(), rows, hc * d, hfn.data(), hc, hm.data());
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = X.data() + r * hc * d;
        float ss = 0.0f;
        for (int64_t i = 0; i < hc * d; ++i) ss += xr[i] * xr[i];
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hc * d) + p.rms_eps);
        for (int j = 0; j < hc; ++j) {
          const float w = cpu::Sigmoid(hm[r * hc + j] * inv * hscale[0] + hbase[j]) + p.hc_eps;
          for (int64_t i = 0; i < d; ++i) y[r * d + i] += w * xr[j * d + i];
        }
      }
      auto dX2 = Up(X), dhfn = Up(hfn), dhbase = Up(hbase), dhscale = Up(hscale);
      auto dy = Zeros(y.size() * 4);
      ASSERT_TRUE(cuda::HcHead(p, dX2.as<float>(), rows, dhfn.as<float>(), dhbase.as<float>(), dhscale.as<float>(), dy.as<float>(), nullptr).ok());
      EXPECT_TRUE(AllClose(Down<float>(dy, y.size()), y, 2e-5f, 2e-5f, seed, "hc_head" + tag));
      auto scratch = Zeros(4 * cuda::HcScratchFloats(p, rows));
      auto sy = Zeros(y.size() * 4);
      ASSERT_TRUE(cuda::HcHead(p, dX2.as<float>(), rows, dhfn.as<float>(), dhbase.as<float>(), dhscale.as<float>(),
                               sy.as<float>(), scratch.as<float>(), nullptr).ok());
      EXPECT_TRUE(AllClose(Down<float>(sy, y.size()), y, 2e-5f, 2e-5f, seed, "split hc_head" + tag));
    }
}

// ModelRunner::MoeBlock's routing, transcribed.
void CpuRoute(const std::vector<float>& logits, int64_t rows, int E, int K, const float* bias, const int64_t* tid2eid,
              const std::vector<int64_t>& tokens, float scaling, std::vector<int32_t>& idx, std::vector<float>& wts) {
  idx.resize(rows * K);
  wts.resize(rows * K);
  std::vector<float> sc(E);
  std::vector<int64_t> order(E);
  for (int64_t r = 0; r < rows; ++r) {
    for (int e = 0; e < E; ++e) sc[e] = std::sqrt(cpu::Softplus(logits[r * E + e]));
    if (tid2eid) {
      for (int k = 0; k < K; ++k) idx[r * K + k] = static_cast<int32_t>(tid2eid[tokens[r] * K + k]);
    } else {
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int64_t i, int64_t j) {
        const float a = sc[i] + bias[i], b = sc[j] + bias[j];
        return a > b || (a == b && i < j);
      });
      for (int k = 0; k < K; ++k) idx[r * K + k] = static_cast<int32_t>(order[k]);
    }
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) sum += sc[idx[r * K + k]];
    for (int k = 0; k < K; ++k) wts[r * K + k] = sc[idx[r * K + k]] / (sum + 1e-20f) * scaling;
  }
}

TEST(CudaOpsTest, MoeRouterMatchesCpuIncludingTiesAndHashRouting) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 16;
  std::mt19937_64 rng(seed);
  const int K = 6;
  for (int E : {7, 19, 256})
    for (int64_t rows : kRows) {
      // Logits on a grid so that score+bias gaps (>= ~1e-3) dwarf ulp-level
      // differences between device and host softplus/sqrt: selections must be equal.
      std::vector<float> logits(rows * E), bias(E);
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<int> perm(E);
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int e = 0; e < E; ++e) logits[r * E + e] = -4.0f + 8.0f * perm[e] / E;
      }
      for (int e = 0; e < E; ++e) bias[e] = 0.0f;  // exact ties only where logits tie
      if (rows >= 7)  // row 3: all logits equal: every score ties; lower ids must win
        for (int e = 0; e < E; ++e) logits[3 * E + e] = 0.25f;
      std::vector<int64_t> tokens(rows);
      const int64_t vocab = 50;
      std::vector<int64_t> tid2eid(vocab * K);
      for (auto& t : tokens) t = static_cast<int64_t>(rng() % vocab);
      for (int64_t v = 0; v < vocab; ++v)
        for (int k = 0; k < K; ++k) tid2eid[v * K + k] = static_cast<int64_t>((v * 7 + k * 3) % E);
      if (E < K) continue;
      for (bool hash : {false, true}) {
        std::vector<int32_t> want_idx;
        std::vector<float> want_w;
        CpuRoute(logits, rows, E, K, bias.data(), hash ? tid2eid.data() : nullptr, tokens, 1.5f, want_idx, want_w);
        auto dl = Up(logits), db = Up(bias), dt2e = Up(tid2eid), dtok = Up(tokens);
        auto didx = Zeros(rows * K * 4), dw = Zeros(rows * K * 4);
        ASSERT_TRUE(cuda::MoeRoute(dl.as<float>(), rows, E, K, db.as<float>(), hash ? dt2e.as<int64_t>() : nullptr,
                                   dtok.as<int64_t>(), 1.5f, didx.as<int32_t>(), dw.as<float>(), nullptr).ok());
        EXPECT_EQ(Down<int32_t>(didx, rows * K), want_idx) << "seed " << seed << " E " << E << " rows " << rows << " hash " << hash;
        // Bound: softplus/sqrt differ by a few ulp: 2e-6 relative on the weights.
        EXPECT_TRUE(AllClose(Down<float>(dw, rows * K), want_w, 1e-7f, 2e-6f, seed, "route weights E=" + std::to_string(E)));
      }
    }
}

}  // namespace
}  // namespace retort
