// Decode-path attention pieces against the CPU forward's code (model.cc
// ModelRunner::Compress and the attention loop, transcribed): compressor
// emission (CSA overlap, HCA), lightning indexer scores + top-k, and decode
// attention with sinks over window + selected entries. Needs a GPU.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "model/kernels/cpu/cpu_kernels.h"
#include "model/kernels/cuda/attention.cuh"
#include "model/kernels/cuda/compressor.cuh"
#include "model/kernels/cuda/indexer.cuh"
#include "tests/kernels/cuda_test_util.h"

namespace retort {
namespace {

using testing::AllClose;
using testing::Down;
using testing::RandomFloats;
using testing::Up;
using testing::Zeros;

void CpuRope(float* x, int64_t dim, int64_t rope_dim, const std::vector<float>& inv_freq, int64_t pos) {
  const int64_t half = rope_dim / 2;
  std::vector<float> cs(half), sn(half);
  for (int64_t i = 0; i < half; ++i) {
    const float angle = inv_freq[i] * static_cast<float>(pos);
    cs[i] = std::cos(angle);
    sn[i] = std::sin(angle);
  }
  cpu::ApplyRope(x, 1, dim, rope_dim, cs.data(), sn.data(), 1.0f);
}

// ModelRunner::Compress for one sequence, all tokens (entries appended).
std::vector<float> CpuCompress(int m, int64_t c, bool overlap, int64_t rope_dim, const std::vector<float>& kv,
                               const std::vector<float>& score, const std::vector<float>& ape,
                               const std::vector<float>& norm, const std::vector<float>& inv_freq, int64_t n) {
  const int64_t w = (overlap ? 2 : 1) * c;
  std::vector<float> entries, pkv, psc, prev_kv, prev_sc;
  bool has_prev = false;
  int pending = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int slot = static_cast<int>(t % m);
    pkv.insert(pkv.end(), kv.begin() + t * w, kv.begin() + (t + 1) * w);
    for (int64_t i = 0; i < w; ++i) psc.push_back(score[t * w + i] + ape[slot * w + i]);
    if (++pending < m) continue;
    std::vector<float> entry(c);
    for (int64_t ch = 0; ch < c; ++ch) {
      float mx = -std::numeric_limits<float>::infinity();
      const int64_t off = overlap ? c : 0;
      if (overlap && has_prev)
        for (int j = 0; j < m; ++j) mx = std::max(mx, prev_sc[j * c + ch]);
      for (int j = 0; j < m; ++j) mx = std::max(mx, psc[j * w + off + ch]);
      float denom = 0.0f, acc = 0.0f;
      if (overlap && has_prev)
        for (int j = 0; j < m; ++j) {
          const float e = std::exp(prev_sc[j * c + ch] - mx);
          denom += e;
          acc += e * prev_kv[j * c + ch];
        }
      for (int j = 0; j < m; ++j) {
        const float e = std::exp(psc[j * w + off + ch] - mx);
        denom += e;
        acc += e * pkv[j * w + off + ch];
      }
      entry[ch] = acc / denom;
    }
    cpu::RmsNorm(entry.data(), 1, c, norm.data(), 1e-6f, entry.data());
    CpuRope(entry.data(), c, rope_dim, inv_freq, t + 1 - m);
    entries.insert(entries.end(), entry.begin(), entry.end());
    if (overlap) {
      prev_kv.resize(m * c);
      prev_sc.resize(m * c);
      for (int j = 0; j < m; ++j)
        for (int64_t ch = 0; ch < c; ++ch) prev_kv[j * c + ch] = pkv[j * w + ch], prev_sc[j * c + ch] = psc[j * w + ch];
      has_prev = true;
    }
    pkv.clear();
    psc.clear();
    pending = 0;
  }
  return entries;
}

std::vector<float> InvFreq(int64_t rope_dim) {
  std::vector<float> f(rope_dim / 2);
  for (size_t i = 0; i < f.size(); ++i) f[i] = std::pow(160000.0f, -2.0f * i / rope_dim);
  return f;
}

TEST(CudaAttentionTest, CompressorDecodeEmissionMatchesCpuCsaAndHca) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 31;
  std::mt19937_64 rng(seed);
  struct Case { int m; int64_t c; bool overlap; int64_t steps; int64_t B; };
  for (Case k : {Case{4, 512, true, 19, 3}, Case{4, 128, true, 111, 1}, Case{8, 96, false, 19, 7}, Case{1, 64, false, 7, 2},
                 Case{128, 512, false, 260, 1}}) {
    const int64_t c = k.c, w = (k.overlap ? 2 : 1) * c, rope_dim = 64, cap = k.steps / k.m + 1;
    auto ape = RandomFloats(rng, k.m * w), norm = RandomFloats(rng, c, 0.5f, 1.5f);
    auto inv_freq = InvFreq(rope_dim);
    std::vector<std::vector<float>> kv(k.B), sc(k.B);
    for (int64_t b = 0; b < k.B; ++b) kv[b] = RandomFloats(rng, k.steps * w, -2.f, 2.f), sc[b] = RandomFloats(rng, k.steps * w, -3.f, 3.f);
    cuda::CompressorShape s;
    s.m = k.m, s.c = c, s.overlap = k.overlap, s.rope_dim = rope_dim, s.cap = cap;
    auto pkv = Zeros(k.B * k.m * w * 4), psc = Zeros(k.B * k.m * w * 4), prk = Zeros(k.B * k.m * c * 4),
         prs = Zeros(k.B * k.m * c * 4), ent = Zeros(k.B * cap * c * 4);
    auto dape = Up(ape), dnorm = Up(norm), dfreq = Up(inv_freq);
    cuda::CompressorStateView st{pkv.as<float>(), psc.as<float>(), prk.as<float>(), prs.as<float>(), ent.as<float>()};
    for (int64_t t = 0; t < k.steps; ++t) {  // decode: one token per sequence per step
      std::vector<float> kvt(k.B * w), sct(k.B * w);
      std::vector<int64_t> pos(k.B, t);
      for (int64_t b = 0; b < k.B; ++b) {
        std::copy(kv[b].begin() + t * w, kv[b].begin() + (t + 1) * w, kvt.begin() + b * w);
        std::copy(sc[b].begin() + t * w, sc[b].begin() + (t + 1) * w, sct.begin() + b * w);
      }
      auto dkv = Up(kvt), dsc = Up(sct), dpos = Up(pos);
      ASSERT_TRUE(cuda::CompressorDecodeStep(s, k.B, dkv.as<float>(), dsc.as<float>(), dape.as<float>(), dnorm.as<float>(),
                                             dfreq.as<float>(), dpos.as<int64_t>(), st, nullptr).ok());
    }
    auto got = Down<float>(ent, k.B * cap * c);
    const int64_t n_entries = k.steps / k.m;
    for (int64_t b = 0; b < k.B; ++b) {
      auto want = CpuCompress(k.m, c, k.overlap, rope_dim, kv[b], sc[b], ape, norm, inv_freq, k.steps);
      ASSERT_EQ(static_cast<int64_t>(want.size()), n_entries * c);
      std::vector<float> g(got.begin() + b * cap * c, got.begin() + (b * cap + n_entries) * c);
      // Bound: expf/cosf/sinf ulp differences and the norm's reduction order:
      // 1e-5 absolute on unit-RMS entries.
      EXPECT_TRUE(AllClose(g, want, 1e-5f, 1e-5f, seed, "compressor m=" + std::to_string(k.m) + " b=" + std::to_string(b)));
    }
  }
}

// The CPU attention's indexer scores for one query.
std::vector<float> CpuIndexerScores(const float* q, const float* w, const float* keys, int64_t n, int Hi, int Di) {
  std::vector<float> scores(n);
  const float wscale = 1.0f / std::sqrt(static_cast<float>(Hi)), sscale = 1.0f / std::sqrt(static_cast<float>(Di));
  for (int64_t i = 0; i < n; ++i) {
    float acc = 0.0f;
    for (int h = 0; h < Hi; ++h) {
      float dot = 0.0f;
      for (int e = 0; e < Di; ++e) dot += q[h * Di + e] * keys[i * Di + e];
      acc += std::max(dot, 0.0f) * sscale * (w[h] * wscale);
    }
    scores[i] = acc;
  }
  return scores;
}

// Top-k of `scores` (ties to the lower index), ascending: the CPU's selection.
std::vector<int32_t> CpuTopK(const std::vector<float>& scores, int64_t k) {
  const int64_t n = static_cast<int64_t>(scores.size());
  k = std::min(k, n);
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t i, int32_t j) {
    return scores[i] > scores[j] || (scores[i] == scores[j] && i < j);
  });
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

TEST(CudaAttentionTest, IndexerScoresAndTopKMatchCpu) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 32;
  std::mt19937_64 rng(seed);
  // (Hi, Di): a small shape, the fixtures' Di = 16 (below a warp) and V4-Flash's 64 x 128.
  for (auto [Hi, Di] : {std::pair<int, int>{8, 128}, {8, 16}, {64, 128}})
  for (int64_t cap : {int64_t{1}, int64_t{7}, int64_t{19}, int64_t{111}, int64_t{989}, int64_t{5000}}) {
    // 27 rows at cap 5000 take the many-rows kernel (128 entries a block).
    const int64_t B = cap == 5000 ? 27 : 3;
    const int k = 64;
    auto q = RandomFloats(rng, B * Hi * Di), w = RandomFloats(rng, B * Hi), keys = RandomFloats(rng, B * cap * Di);
    // Duplicate keys make exact score ties (same inputs, same arithmetic):
    // the lower entry index must win.
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 1; i < cap; i += 3)
        std::copy(keys.begin() + (b * cap + i - 1) * Di, keys.begin() + (b * cap + i) * Di, keys.begin() + (b * cap + i) * Di);
    std::vector<int32_t> visible(B);
    for (int64_t b = 0; b < B; ++b) visible[b] = static_cast<int32_t>(std::max<int64_t>(1, cap - b * (cap / 3)));
    auto dq = Up(q), dw = Up(w), dk = Up(keys), dv = Up(visible);
    auto dscores = Zeros(B * cap * 4), dsel = Zeros(B * k * 4), dcount = Zeros(B * 4);
    ASSERT_TRUE(cuda::IndexerScores(dq.as<float>(), dw.as<float>(), dk.as<float>(), dv.as<int32_t>(), B, Hi, Di, cap, dscores.as<float>(), nullptr).ok());
    ASSERT_TRUE(cuda::TopKAscending(dscores.as<float>(), dv.as<int32_t>(), B, cap, k, dsel.as<int32_t>(), dcount.as<int32_t>(), nullptr).ok());
    auto gs = Down<float>(dscores, B * cap);
    auto gsel = Down<int32_t>(dsel, B * k);
    auto gcount = Down<int32_t>(dcount, B);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = visible[b];
      auto want = CpuIndexerScores(q.data() + b * Hi * Di, w.data() + b * Hi, keys.data() + b * cap * Di, n, Hi, Di);
      std::vector<float> got(gs.begin() + b * cap, gs.begin() + b * cap + n);
      // Bound: same summation order as the CPU up to FMA contraction: 2e-5 absolute (|q|,|k| <= 1).
      EXPECT_TRUE(AllClose(got, want, 2e-5f, 1e-5f, seed,
                           "indexer scores Hi=" + std::to_string(Hi) + " Di=" + std::to_string(Di) +
                               " cap=" + std::to_string(cap)));
      // Selection is exact against the CPU's top-k over the device's scores...
      auto want_sel = CpuTopK(got, k);
      ASSERT_EQ(gcount[b], static_cast<int32_t>(want_sel.size())) << "seed " << seed << " cap " << cap;
      EXPECT_EQ(std::vector<int32_t>(gsel.begin() + b * k, gsel.begin() + b * k + gcount[b]), want_sel)
          << "seed " << seed << " cap " << cap << " b " << b;
      // ...and within the score bound of the CPU's own selection.
      if (n > k) {
        auto cpu_sel = CpuTopK(want, k);
        float kth = std::numeric_limits<float>::infinity();
        for (int32_t i : cpu_sel) kth = std::min(kth, want[i]);
        for (int32_t i : want_sel) EXPECT_GE(want[i], kth - 4e-5f) << "seed " << seed << " entry " << i;
      }
    }
  }
}

TEST(CudaAttentionTest, DecodeAttentionWithSinksMatchesCpu) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 33;
  std::mt19937_64 rng(seed);
  struct Case { int64_t B, H, D, win, cap, nsel; bool hca; };
  for (Case k : {Case{1, 1, 32, 4, 0, 0, false}, Case{7, 19, 64, 8, 19, 7, false}, Case{3, 64, 512, 128, 111, 111, true},
                 Case{2, 9, 512, 128, 989, 64, false}}) {
    const int64_t D = k.D;
    auto q = RandomFloats(rng, k.B * k.H * D, -0.3f, 0.3f);
    auto ring = RandomFloats(rng, k.B * k.win * D), ents = RandomFloats(rng, k.B * std::max<int64_t>(k.cap, 1) * D);
    auto sinks = RandomFloats(rng, k.H, -1.0f, 3.0f);
    for (auto& v : q) v *= 8.0f;  // sharpen the softmax a little
    std::vector<int64_t> pos(k.B);
    std::vector<int32_t> count(k.B), sel(k.B * std::max<int64_t>(k.nsel, 1), 0);
    for (int64_t b = 0; b < k.B; ++b) {
      pos[b] = (b % 2 == 0) ? static_cast<int64_t>(rng() % (2 * k.win)) : k.win + 1000;  // partial and full windows
      count[b] = k.cap == 0 ? 0 : static_cast<int32_t>(k.hca ? k.cap - b % 3 : std::min<int64_t>(k.nsel, k.cap) - b % 2);
      if (!k.hca)
        for (int64_t i = 0; i < count[b]; ++i) sel[b * k.nsel + i] = static_cast<int32_t>((i * 37 + b) % k.cap);
    }
    // CPU: the attention loop of AttentionBlock for one query (keys: window then compressed).
    std::vector<float> want(k.B * k.H * D, 0.0f);
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    for (int64_t b = 0; b < k.B; ++b) {
      std::vector<const float*> keys;
      for (int64_t j = std::max<int64_t>(0, pos[b] - k.win + 1); j <= pos[b]; ++j) keys.push_back(ring.data() + (b * k.win + j % k.win) * D);
      for (int64_t i = 0; i < count[b]; ++i)
        keys.push_back(ents.data() + (b * k.cap + (k.hca ? i : sel[b * k.nsel + i])) * D);
      std::vector<float> logits(keys.size());
      for (int64_t h = 0; h < k.H; ++h) {
        const float* qh = q.data() + (b * k.H + h) * D;
        float mx = sinks[h];
        for (size_t j = 0; j < keys.size(); ++j) {
          float dot = 0.0f;
          for (int64_t e = 0; e < D; ++e) dot += qh[e] * keys[j][e];
          logits[j] = dot * scale;
          mx = std::max(mx, logits[j]);
        }
        float denom = std::exp(sinks[h] - mx);
        for (auto& l : logits) denom += (l = std::exp(l - mx));
        float* oh = want.data() + (b * k.H + h) * D;
        for (size_t j = 0; j < keys.size(); ++j)
          for (int64_t e = 0; e < D; ++e) oh[e] += logits[j] / denom * keys[j][e];
      }
    }
    auto dq = Up(q), dring = Up(ring), dents = Up(ents), dsinks = Up(sinks), dpos = Up(pos), dcount = Up(count), dsel = Up(sel);
    auto dout = Zeros(want.size() * 4);
    cuda::DecodeAttentionArgs a;
    a.B = k.B, a.H = k.H, a.D = D, a.q = dq.as<float>(), a.window = dring.as<float>(), a.win = k.win;
    a.positions = dpos.as<int64_t>(), a.sinks = dsinks.as<float>(), a.out = dout.as<float>();
    if (k.cap > 0) {
      a.entries = dents.as<float>(), a.cap = k.cap, a.count = dcount.as<int32_t>();
      if (!k.hca) a.selected = dsel.as<int32_t>(), a.sel_stride = k.nsel;
    }
    ASSERT_TRUE(cuda::DecodeAttention(a, nullptr).ok());
    // Bound: online vs two-pass softmax and dot order: 2e-5 absolute (|kv| <= 1).
    EXPECT_TRUE(AllClose(Down<float>(dout, want.size()), want, 2e-5f, 1e-5f, seed,
                         "attention H=" + std::to_string(k.H) + " D=" + std::to_string(D)));
  }
}

// StepAttention's split-KV path (few rows: decode) against its one-block-per-
// row path (which the model tests hold to the reference), at odd row counts
// and key counts, ring + this step's rows + compressed entries (HCA: all
// visible; CSA: a selection). Bound: the splits merge in another order,
// 1e-5 relative on the output (softmax-weighted averages of |v| <= 1).
TEST(CudaAttentionTest, StepAttentionSplitKvMatchesSingleBlock) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 34;
  std::mt19937_64 rng(seed);
  const int64_t H = 19, D = 96, win = 7, cap = 989, slots = 3;
  for (bool csa : {false, true})
    for (int64_t rows_per_seq : {int64_t{1}, int64_t{7}}) {
      const int S = 3;
      const int64_t N = S * rows_per_seq;
      std::vector<int32_t> row_seq, seq_slot = {2, 0, 1}, seq_row0, count, selected;
      std::vector<int64_t> positions, seq_p0 = {5, 111, 900};
      const int64_t sel_stride = 64;
      for (int s = 0; s < S; ++s) {
        seq_row0.push_back(static_cast<int32_t>(s * rows_per_seq));
        for (int64_t t = 0; t < rows_per_seq; ++t) {
          row_seq.push_back(s);
          const int64_t p = seq_p0[s] + t;
          positions.push_back(p);
          const int64_t vis = std::min<int64_t>((p + 1) / 4, cap);
          const int64_t c = csa ? std::min<int64_t>(vis, sel_stride) : vis;
          count.push_back(static_cast<int32_t>(c));
          for (int64_t j = 0; j < sel_stride; ++j)
            selected.push_back(static_cast<int32_t>(j < c ? (vis > 0 ? (j * 7) % vis : 0) : 0));
        }
      }
      auto q = RandomFloats(rng, N * H * D), kv = RandomFloats(rng, N * D);
      auto ring = RandomFloats(rng, slots * win * D), entries = RandomFloats(rng, slots * cap * D);
      auto sinks = RandomFloats(rng, H);
      auto dq = Up(q), dkv = Up(kv), dring = Up(ring), dent = Up(entries), dsinks = Up(sinks);
      auto drs = Up(row_seq), dpos = Up(positions), dslot = Up(seq_slot), dp0 = Up(seq_p0), dr0 = Up(seq_row0);
      auto dcount = Up(count), dsel = Up(selected);
      cuda::StepAttentionArgs a;
      a.N = N, a.H = H, a.D = D, a.q = dq.as<float>(), a.kv = dkv.as<float>(), a.ring = dring.as<float>(), a.win = win;
      a.row_seq = drs.as<int32_t>(), a.positions = dpos.as<int64_t>(), a.seq_slot = dslot.as<int32_t>();
      a.seq_p0 = dp0.as<int64_t>(), a.seq_row0 = dr0.as<int32_t>(), a.entries = dent.as<float>(), a.cap = cap;
      a.selected = csa ? dsel.as<int32_t>() : nullptr, a.sel_stride = sel_stride, a.count = dcount.as<int32_t>();
      a.sinks = dsinks.as<float>();
      auto one = Zeros(N * H * D * 4), split = Zeros(N * H * D * 4);
      a.out = one.as<float>();
      ASSERT_TRUE(cuda::StepAttention(a, nullptr).ok());
      a.max_keys = win + *std::max_element(count.begin(), count.end());
      ASSERT_GT(cuda::StepAttentionSplits(N, H, a.max_keys), 1);
      auto scratch = Zeros(4 * cuda::StepAttentionScratchFloats(N, H, D, a.max_keys));
      a.partial = scratch.as<float>();
      a.out = split.as<float>();
      ASSERT_TRUE(cuda::StepAttention(a, nullptr).ok());
      EXPECT_TRUE(AllClose(Down<float>(split, N * H * D), Down<float>(one, N * H * D), 1e-5f, 1e-5f, seed,
                           std::string(csa ? "csa" : "hca") + " rows/seq=" + std::to_string(rows_per_seq)));
    }
}

}  // namespace
}  // namespace retort
